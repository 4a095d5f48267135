//! argon2id hashing and verification, always off the async workers.
//!
//! Verification is CPU-heavy (tens of ms, ~19 MiB each), so it runs on the
//! blocking pool behind a semaphore sized to the cores: a login flood queues
//! instead of spawning hundreds of threads and gigabytes of hash memory.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2};
use tokio::sync::Semaphore;

use crate::config::Secret;

/// Hashes `password` with argon2id and the crate's recommended parameters
/// (m=19456 KiB, t=2, p=1, as OWASP suggests).
pub fn hash_password(password: &[u8]) -> String {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the OS random source is unavailable");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(password, &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

/// Config-time check that a string is an argon2id PHC hash.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash: {e}"))?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "uses {}, expected argon2id (make one with `portcullis hash-password`)",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// Verifies passwords on the blocking pool, bounded.
#[derive(Clone)]
pub struct Verifier {
    permits: Arc<Semaphore>,
    /// Verified against when the username is unknown, so an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: Arc<str>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Verifier {
            permits: Arc::new(Semaphore::new(cores)),
            dummy_hash: hash_password(b"portcullis-timing-equaliser").into(),
        }
    }

    /// `hash` is `None` for an unknown user; the work done is the same.
    pub async fn verify(&self, hash: Option<&str>, password: Secret) -> bool {
        let known = hash.is_some();
        let hash: Arc<str> = hash.map_or_else(|| self.dummy_hash.clone(), Arc::from);
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.expose(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_and_checks() {
        let h = hash_password(b"pw");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(check_hash(&h).is_ok());
        assert!(check_hash("$2b$12$abcdefghijklmnopqrstuv").is_err());
        assert!(check_hash("plain").is_err());
    }

    #[tokio::test]
    async fn verifies_right_and_refuses_wrong_and_unknown() {
        let v = Verifier::new();
        let h = hash_password(b"right");
        assert!(v.verify(Some(&h), Secret::new("right")).await);
        assert!(!v.verify(Some(&h), Secret::new("wrong")).await);
        assert!(
            !v.verify(None, Secret::new("portcullis-timing-equaliser"))
                .await
        );
    }
}
