//! Runtime hooks (SPEC §11, `[sessions.hooks]`): signed JSON POSTs that
//! tell the runtime a session is about to exist (`on_create`, which may
//! refuse it) and that one has ended (`on_end`).
//!
//! This module only sends one hook and says whether the runtime took it.
//! When a hook is sent, and what happens when it fails, is decided above:
//! the login path in `http::api` (a refused `on_create` undoes the session)
//! and the delivery loop in `maintenance` (an `on_end` stays in the store's
//! durable queue, `session::outbox`, until a `2xx`).
//!
//! # The signature
//!
//! `Portcullis-Signature` is the lowercase hex HMAC-SHA256 of the exact
//! request body under the hook secret. A runtime recomputes it over the
//! bytes it received and compares in constant time; anything else (absent,
//! not hex, another value) means the request is not from the gateway.

use std::time::Duration;

use ring::hmac;
use serde::Serialize;
use url::Url;

use crate::config::{HooksConfig, Secret};

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "Portcullis-Signature";

/// Why a hook was not taken. Never carries the secret or the body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("runtime hook timed out")]
    Timeout,
    #[error("runtime hook unreachable: {0}")]
    Unreachable(String),
    #[error("runtime hook answered {0}")]
    Refused(u16),
}

/// `on_create`'s body.
#[derive(Debug, Serialize)]
pub struct Created<'a> {
    pub session_id: &'a str,
    pub user: &'a str,
    /// RFC 3339 UTC, the session's expiry once the runtime says yes.
    pub expires_at: &'a str,
}

/// `on_end`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ended {
    pub session_id: String,
    pub user: String,
    /// `logout`, `deleted`, `expired`, `logout_all` or `backchannel_logout`.
    pub reason: String,
}

/// The configured hooks and their key.
pub struct Hooks {
    on_create: Option<Url>,
    on_end: Option<Url>,
    timeout: Duration,
    key: hmac::Key,
}

/// Lowercase hex HMAC-SHA256 of `body` under `secret`: the value of
/// [`SIGNATURE_HEADER`].
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body);
    hex(tag.as_ref())
}

/// The documented check a runtime makes: `signature` is the hex HMAC of
/// `body` under `secret`, compared in constant time (`ring::hmac::verify`).
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(tag) = unhex(signature) else {
        return false;
    };
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), body, &tag).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl Hooks {
    /// From the validated config (URLs already checked) and its secret.
    pub fn new(cfg: &HooksConfig, secret: &Secret) -> Hooks {
        let url = |u: &Option<String>| u.as_deref().map(|u| Url::parse(u).expect("validated"));
        Hooks {
            on_create: url(&cfg.on_create),
            on_end: url(&cfg.on_end),
            timeout: Duration::from_millis(cfg.timeout_ms),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose()),
        }
    }

    /// Whether login must ask the runtime first.
    pub fn has_on_create(&self) -> bool {
        self.on_create.is_some()
    }

    /// Whether ended sessions must be reported (and so tracked).
    pub fn has_on_end(&self) -> bool {
        self.on_end.is_some()
    }

    /// How long one hook call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Asks the runtime to accept a session; `Ok` only on a `2xx` within
    /// the timeout. Without `on_create` every session is accepted.
    pub async fn on_create(&self, created: &Created<'_>) -> Result<(), HookError> {
        match &self.on_create {
            Some(url) => self.post(url, body(created)).await,
            None => Ok(()),
        }
    }

    /// Reports an ended session; `Ok` only on a `2xx` within the timeout.
    pub async fn on_end(&self, ended: &Ended) -> Result<(), HookError> {
        match &self.on_end {
            Some(url) => self.post(url, body(ended)).await,
            None => Ok(()),
        }
    }

    async fn post(&self, url: &Url, body: Vec<u8>) -> Result<(), HookError> {
        let signature = hex(hmac::sign(&self.key, &body).as_ref());
        match tokio::time::timeout(self.timeout, send(url, body, &signature)).await {
            Ok(r) => r,
            Err(_) => Err(HookError::Timeout),
        }
    }
}

fn body<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("a struct of strings serialises")
}

/// One signed POST; `Ok` only on a `2xx`. The answer's body means nothing:
/// the connection is dropped unread (one connection per hook).
async fn send(url: &Url, body: Vec<u8>, signature: &str) -> Result<(), HookError> {
    let resp = crate::outbound::post_json(url, &[(SIGNATURE_HEADER, signature)], body)
        .await
        .map_err(|e| HookError::Unreachable(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(HookError::Refused(status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_and_refuses_tampering() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let body = br#"{"session_id":"a","user":"alice","reason":"logout"}"#;
        let sig = sign(secret, body);
        assert_eq!(sig.len(), 64);
        assert!(verify(secret, body, &sig));
        assert!(!verify(b"another secret, just as long as it", body, &sig));
        assert!(!verify(secret, br#"{"session_id":"b"}"#, &sig));
        assert!(!verify(secret, body, "zz"));
        assert!(!verify(secret, body, ""));
    }

    /// RFC 4231-style known answer (the value every HMAC library gives), so
    /// a runtime's check in any language agrees with the header.
    #[test]
    fn signature_is_lowercase_hex_hmac_sha256() {
        assert_eq!(
            sign(b"key", b"The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }
}
