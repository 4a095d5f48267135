//! Reads a PKCS#8 private-key PEM for a token algorithm: the key to sign with
//! and the public half's components.
//!
//! Public halves are derived from the private keys with `ring`, so an
//! operator configures one PEM per key and the JWKS can never disagree with it.

use jsonwebtoken::EncodingKey;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair,
};
use serde::Deserialize;

/// `tokens.algorithm`: how tokens are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    HS256,
    EdDSA,
    ES256,
    RS256,
}

/// Why key material is not a usable private key for its algorithm.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM key: {0}")]
    NotPem(pem::PemError),
    #[error("expected a PKCS#8 \"PRIVATE KEY\" PEM, found {0:?}")]
    NotPkcs8(String),
    /// `what` names the key type the algorithm needs ("an Ed25519").
    #[error("not {what} PKCS#8 key: {reason}")]
    WrongKind {
        what: &'static str,
        reason: ring::error::KeyRejected,
    },
    #[error("bad RSA public key: {0}")]
    RsaPublicKey(simple_asn1::ASN1DecodeErr),
    #[error("bad RSA public key: expected {0}")]
    RsaPublicKeyShape(&'static str),
    #[error("unusable private key: {0}")]
    Unusable(jsonwebtoken::errors::Error),
    #[error("HS256 keys are shared secrets, not PEM private keys")]
    NotAsymmetric,
}

/// The public half of an asymmetric key, as raw components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// The 32-byte Ed25519 public key.
    Ed25519 { x: Vec<u8> },
    /// The P-256 point's coordinates, 32 bytes each.
    P256 { x: Vec<u8>, y: Vec<u8> },
    /// The DER `RSAPublicKey` and its modulus and exponent (big-endian).
    Rsa {
        der: Vec<u8>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

/// A private key that signs, with its public half.
pub struct PrivateKey {
    pub encoding: EncodingKey,
    pub public: PublicKey,
}

fn pem_der(pem_bytes: &[u8]) -> Result<Vec<u8>, KeyError> {
    let parsed = pem::parse(pem_bytes).map_err(KeyError::NotPem)?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(KeyError::NotPkcs8(parsed.tag().to_string()));
    }
    Ok(parsed.into_contents())
}

fn wrong_kind(what: &'static str) -> impl FnOnce(ring::error::KeyRejected) -> KeyError {
    move |reason| KeyError::WrongKind { what, reason }
}

/// Parses `pem_bytes` as the PKCS#8 private key `alg` signs with; fails for
/// HS256, whose keys are not PEMs.
pub fn parse_private_pem(alg: Algorithm, pem_bytes: &[u8]) -> Result<PrivateKey, KeyError> {
    // Each arm also has jsonwebtoken read the key, after `ring` accepted it,
    // so a key that would not sign fails at start-up.
    let (public, encoding) = match alg {
        Algorithm::HS256 => return Err(KeyError::NotAsymmetric),
        Algorithm::EdDSA => {
            let der = pem_der(pem_bytes)?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                .map_err(wrong_kind("an Ed25519"))?;
            let x = pair.public_key().as_ref().to_vec();
            (
                PublicKey::Ed25519 { x },
                EncodingKey::from_ed_pem(pem_bytes),
            )
        }
        Algorithm::ES256 => {
            let der = pem_der(pem_bytes)?;
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &der,
                &SystemRandom::new(),
            )
            .map_err(wrong_kind("a P-256"))?;
            // Uncompressed SEC1 point: 0x04 || x || y.
            let point = pair.public_key().as_ref();
            let (x, y) = (point[1..33].to_vec(), point[33..65].to_vec());
            (
                PublicKey::P256 { x, y },
                EncodingKey::from_ec_pem(pem_bytes),
            )
        }
        Algorithm::RS256 => {
            let der = pem_der(pem_bytes)?;
            let pair = RsaKeyPair::from_pkcs8(&der).map_err(wrong_kind("an RSA"))?;
            let der = pair.public().as_ref().to_vec();
            let (n, e) = rsa_components(&der)?;
            (
                PublicKey::Rsa { der, n, e },
                EncodingKey::from_rsa_pem(pem_bytes),
            )
        }
    };
    let encoding = encoding.map_err(KeyError::Unusable)?;
    Ok(PrivateKey { encoding, public })
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), KeyError> {
    use simple_asn1::ASN1Block;
    let blocks = simple_asn1::from_der(der).map_err(KeyError::RsaPublicKey)?;
    match blocks.as_slice() {
        [ASN1Block::Sequence(_, items)] => match items.as_slice() {
            [ASN1Block::Integer(_, n), ASN1Block::Integer(_, e)] => {
                Ok((n.to_bytes_be().1, e.to_bytes_be().1))
            }
            _ => Err(KeyError::RsaPublicKeyShape("two integers")),
        },
        _ => Err(KeyError::RsaPublicKeyShape("a sequence")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &[u8] = include_bytes!("../../tests/fixtures/keys/ed25519_a.pem");
    const P256: &[u8] = include_bytes!("../../tests/fixtures/keys/p256_a.pem");
    const RSA: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa_a.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa_a_public.pem");

    #[test]
    fn each_algorithm_reads_its_own_key() {
        let ed = parse_private_pem(Algorithm::EdDSA, ED25519).unwrap();
        assert!(matches!(ed.public, PublicKey::Ed25519 { ref x } if x.len() == 32));
        let ec = parse_private_pem(Algorithm::ES256, P256).unwrap();
        assert!(
            matches!(ec.public, PublicKey::P256 { ref x, ref y } if x.len() == 32 && y.len() == 32)
        );
        let rsa = parse_private_pem(Algorithm::RS256, RSA).unwrap();
        assert!(matches!(rsa.public, PublicKey::Rsa { ref e, .. } if e == &[1, 0, 1]));
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let err = |alg, pem: &[u8]| parse_private_pem(alg, pem).err().unwrap().to_string();
        assert!(
            err(Algorithm::ES256, ED25519).starts_with("not a P-256 PKCS#8 key: "),
            "{}",
            err(Algorithm::ES256, ED25519)
        );
        assert!(err(Algorithm::RS256, P256).starts_with("not an RSA PKCS#8 key: "));
        assert!(
            err(Algorithm::EdDSA, b"a-long-enough-hs256-secret").starts_with("not a PEM key: ")
        );
        assert_eq!(
            err(Algorithm::RS256, RSA_PUBLIC),
            "expected a PKCS#8 \"PRIVATE KEY\" PEM, found \"PUBLIC KEY\""
        );
        assert!(matches!(
            parse_private_pem(Algorithm::HS256, ED25519),
            Err(KeyError::NotAsymmetric)
        ));
    }
}
