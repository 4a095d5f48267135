//! Checks a login's username and password with the configured backend.
//!
//! The backends are `password` (static argon2id users) and `upstream` (the
//! team's own verifier); `ratelimit` limits failed logins.

pub mod password;
pub mod ratelimit;
pub mod upstream;

use std::collections::HashMap;
use std::time::Duration;

use url::Url;

use crate::config::{AuthConfig, AuthKind, Secret};
use password::Verifier;
use upstream::UpstreamVerifier;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("auth upstream unavailable: {0}")]
    Unavailable(String),
}

/// The configured way to check a username and password.
pub enum Authenticator {
    Static {
        users: HashMap<String, String>,
        verifier: Verifier,
    },
    Upstream(UpstreamVerifier),
}

impl Authenticator {
    /// Builds from a validated `[auth]`.
    pub fn from_config(cfg: &AuthConfig) -> Self {
        match cfg.kind {
            AuthKind::Static => Authenticator::Static {
                users: cfg
                    .users
                    .iter()
                    .map(|u| (u.username.clone(), u.password_hash.clone()))
                    .collect(),
                verifier: Verifier::new(),
            },
            AuthKind::Upstream => Authenticator::Upstream(UpstreamVerifier::new(
                Url::parse(cfg.url.as_deref().unwrap_or_default()).expect("validated auth.url"),
                Duration::from_millis(cfg.upstream_timeout_ms),
            )),
        }
    }

    /// Returns the user name the session belongs to.
    pub async fn authenticate(
        &self,
        username: &str,
        password: Secret,
    ) -> Result<String, AuthError> {
        match self {
            Authenticator::Static { users, verifier } => {
                let hash = users.get(username).map(String::as_str);
                if verifier.verify(hash, password).await {
                    Ok(username.to_string())
                } else {
                    Err(AuthError::InvalidCredentials)
                }
            }
            Authenticator::Upstream(v) => v.verify(username, &password).await,
        }
    }
}
