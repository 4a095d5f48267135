//! Key material → jsonwebtoken keys, and the public JWKS for asymmetric ones.
//!
//! PEMs are read by [`crate::formats::private_key`], the same code that
//! checks them at config time; this module only shapes the result for
//! signing, verifying and publishing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde_json::{Value, json};

use crate::formats::private_key::{Algorithm, KeyError, PublicKey, parse_private_pem};

/// One configured key, ready to sign with, verify with and publish.
pub(crate) struct TokenKey {
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// The JWKS entry; `None` for HS256, whose key is secret.
    pub jwk: Option<Value>,
}

pub(crate) fn token_key(alg: Algorithm, kid: &str, secret: &[u8]) -> Result<TokenKey, KeyError> {
    if alg == Algorithm::HS256 {
        return Ok(TokenKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            jwk: None,
        });
    }
    let key = parse_private_pem(alg, secret)?;
    // `from_*_der` take the raw public key jsonwebtoken would decode from
    // the JWK's components.
    let (alg_name, decoding, mut jwk) = match &key.public {
        PublicKey::Ed25519 { x } => (
            "EdDSA",
            DecodingKey::from_ed_der(x),
            json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(x)}),
        ),
        PublicKey::P256 { x, y } => (
            "ES256",
            DecodingKey::from_ec_der(&[&[0x04][..], x, y].concat()),
            json!({"kty": "EC", "crv": "P-256", "x": B64.encode(x), "y": B64.encode(y)}),
        ),
        PublicKey::Rsa { der, n, e } => (
            "RS256",
            DecodingKey::from_rsa_der(der),
            json!({"kty": "RSA", "n": B64.encode(n), "e": B64.encode(e)}),
        ),
    };
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!(alg_name);
    jwk["use"] = json!("sig");
    Ok(TokenKey {
        encoding: key.encoding,
        decoding,
        jwk: Some(jwk),
    })
}
