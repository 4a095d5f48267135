//! Key material → jsonwebtoken keys, and the public JWKS for asymmetric ones.
//!
//! Public halves are derived from the PKCS#8 private keys with `ring`, so an
//! operator configures one PEM per key and the JWKS can never disagree with it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{DecodingKey, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair,
};
use serde_json::{Value, json};

use crate::config::Algorithm;

/// A key's public half, ready for verification and for the JWKS.
pub(crate) struct PublicHalf {
    pub decoding: DecodingKey,
    pub jwk: Option<Value>,
}

fn pem_der(pem_bytes: &[u8]) -> Result<Vec<u8>, String> {
    let parsed = pem::parse(pem_bytes).map_err(|e| format!("not a PEM key: {e}"))?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(format!(
            "expected a PKCS#8 \"PRIVATE KEY\" PEM, found {:?}",
            parsed.tag()
        ));
    }
    Ok(parsed.into_contents())
}

/// Config-time check that an asymmetric key is a usable PKCS#8 private key.
pub fn check_private_pem(alg: Algorithm, pem_bytes: &[u8]) -> Result<(), String> {
    public_half(alg, "check", pem_bytes).map(|_| ())
}

pub(crate) fn encoding_key(alg: Algorithm, secret: &[u8]) -> Result<EncodingKey, String> {
    let r = match alg {
        Algorithm::HS256 => return Ok(EncodingKey::from_secret(secret)),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(secret),
        Algorithm::ES256 => EncodingKey::from_ec_pem(secret),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(secret),
    };
    r.map_err(|e| format!("unusable private key: {e}"))
}

pub(crate) fn public_half(alg: Algorithm, kid: &str, secret: &[u8]) -> Result<PublicHalf, String> {
    let (alg_name, decoding, fields) = match alg {
        Algorithm::HS256 => {
            return Ok(PublicHalf {
                decoding: DecodingKey::from_secret(secret),
                jwk: None,
            });
        }
        Algorithm::EdDSA => {
            let der = pem_der(secret)?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
            let x = B64.encode(pair.public_key().as_ref());
            let decoding = DecodingKey::from_ed_components(&x).map_err(|e| e.to_string())?;
            (
                "EdDSA",
                decoding,
                json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            )
        }
        Algorithm::ES256 => {
            let der = pem_der(secret)?;
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &der,
                &SystemRandom::new(),
            )
            .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
            // Uncompressed SEC1 point: 0x04 || x || y.
            let point = pair.public_key().as_ref();
            let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
            let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| e.to_string())?;
            (
                "ES256",
                decoding,
                json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
            )
        }
        Algorithm::RS256 => {
            let der = pem_der(secret)?;
            let pair =
                RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("not an RSA PKCS#8 key: {e}"))?;
            let public_der = pair.public().as_ref();
            let (n, e) = rsa_components(public_der)?;
            let decoding = DecodingKey::from_rsa_der(public_der);
            (
                "RS256",
                decoding,
                json!({"kty": "RSA", "n": B64.encode(n), "e": B64.encode(e)}),
            )
        }
    };
    // Make sure the private half signs too, so a bad key fails at start-up.
    encoding_key(alg, secret)?;
    let mut jwk = fields;
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!(alg_name);
    jwk["use"] = json!("sig");
    Ok(PublicHalf {
        decoding,
        jwk: Some(jwk),
    })
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    use simple_asn1::ASN1Block;
    let blocks = simple_asn1::from_der(der).map_err(|e| format!("bad RSA public key: {e}"))?;
    match blocks.as_slice() {
        [ASN1Block::Sequence(_, items)] => match items.as_slice() {
            [ASN1Block::Integer(_, n), ASN1Block::Integer(_, e)] => {
                Ok((n.to_bytes_be().1, e.to_bytes_be().1))
            }
            _ => Err("bad RSA public key: expected two integers".into()),
        },
        _ => Err("bad RSA public key: expected a sequence".into()),
    }
}
