//! Session tokens (SPEC §5): JWTs that let a client *open* sockets.
//!
//! The algorithm is pinned from config, never read from the token; the
//! header's `kid` picks among the current and previous keys so keys rotate
//! without logging everybody out.

pub mod credentials;
mod keys;

use std::collections::HashMap;

use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, TokensConfig, ValidatedKeys};
pub use crate::formats::private_key::KeyError;
use crate::ids::random_id;
use crate::time::now_unix;

/// The claims every Portcullis token carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub sid: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

/// Why a token was refused; each maps to one SPEC error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no session token was presented")]
    Missing,
    #[error("the session token is not valid")]
    Invalid,
    #[error("the session token has expired")]
    Expired,
}

impl TokenError {
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::Invalid => "invalid_token",
            TokenError::Expired => "token_expired",
        }
    }
}

/// A freshly signed token and when it stops opening sockets.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_at: i64,
}

pub struct TokenService {
    alg: jsonwebtoken::Algorithm,
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_secs: i64,
    jwks: Option<serde_json::Value>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("keys", &"MASKED")
            .finish()
    }
}

fn jwt_alg(alg: Algorithm) -> jsonwebtoken::Algorithm {
    match alg {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
    }
}

impl TokenService {
    /// Fails only for key material `config` would have refused.
    pub fn new(cfg: &TokensConfig, keys: &ValidatedKeys) -> Result<Self, KeyError> {
        let signing = &keys.signing;
        let signing_key = keys::token_key(cfg.algorithm, &signing.kid, signing.secret.expose())?;
        let mut decoding = HashMap::from([(signing.kid.clone(), signing_key.decoding)]);
        let mut jwks = Vec::from_iter(signing_key.jwk);
        for k in &keys.previous {
            let key = keys::token_key(cfg.algorithm, &k.kid, k.secret.expose())?;
            decoding.insert(k.kid.clone(), key.decoding);
            jwks.extend(key.jwk);
        }
        let alg = jwt_alg(cfg.algorithm);
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.set_issuer(&[&cfg.issuer]);
        validation.set_audience(&[&cfg.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(TokenService {
            alg,
            kid: cfg.kid.clone(),
            encoding: signing_key.encoding,
            decoding,
            validation,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            ttl_secs: cfg.ttl_secs as i64,
            jwks: (cfg.algorithm != Algorithm::HS256).then(|| serde_json::json!({ "keys": jwks })),
        })
    }

    /// Signs a token for `sid`. The caller must have created or checked the
    /// session in the store first: a token never precedes its session.
    pub fn issue(&self, user: &str, sid: &str) -> Issued {
        let iat = now_unix();
        let claims = Claims {
            sub: user.to_string(),
            sid: sid.to_string(),
            iat,
            exp: iat + self.ttl_secs,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: random_id(),
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .expect("signing with a key validated at start-up cannot fail");
        Issued {
            token,
            expires_at: claims.exp,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.alg != self.alg {
            return Err(TokenError::Invalid);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.decoding.get(kid))
            .ok_or(TokenError::Invalid)?;
        match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(TokenError::Expired),
            Err(_) => Err(TokenError::Invalid),
        }
    }

    /// The JWKS document, for asymmetric algorithms only.
    pub fn jwks(&self) -> Option<&serde_json::Value> {
        self.jwks.as_ref()
    }
}
