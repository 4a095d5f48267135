//! argon2id hashing and verification, always off the async workers.
//!
//! Verification is CPU-heavy (tens of ms, ~19 MiB each), so it runs on the
//! blocking pool behind a semaphore sized to the cores: a login flood queues
//! instead of spawning hundreds of threads and gigabytes of hash memory.
//!
//! The argon2 working memory is allocated once per concurrent verification
//! and reused, so what a login burst costs in memory does not depend on how
//! an allocator treats freed 19 MiB blocks: with glibc's, a 5 s burst left
//! the gateway at ~750 MiB RSS for good, and keeping RSS low by handing
//! every block back cost 29 % of the login rate, each hash faulting in
//! fresh pages (BENCHMARKS.md).

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

/// Verifies passwords on the blocking pool, bounded.
#[derive(Clone)]
pub struct Verifier {
    permits: Arc<Semaphore>,
    /// Verified against when the username is unknown, so an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: Arc<str>,
    /// Reusable argon2 working memory; never more buffers than permits.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
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
            memory: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// `hash` is `None` for an unknown user; the work done is the same.
    pub async fn verify(&self, hash: Option<&str>, password: Secret) -> bool {
        let known = hash.is_some();
        let hash: Arc<str> = hash.map_or_else(|| self.dummy_hash.clone(), Arc::from);
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return false;
        };
        let memory = self.memory.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let mut blocks = memory
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default();
            let ok = verify_with(&hash, password.expose(), &mut blocks);
            memory
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(blocks);
            ok
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

/// Verifies `password` against a PHC argon2 hash using `blocks` as working
/// memory (grown if this hash needs more). The comparison is constant-time
/// (`Output`'s equality).
fn verify_with(phc: &str, password: &[u8], blocks: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Some(expected), Some(salt)) =
        (Algorithm::try_from(hash.algorithm), hash.hash, hash.salt)
    else {
        return false;
    };
    let version = hash
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    if blocks.len() < params.block_count() {
        blocks.resize(params.block_count(), Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..])
        .is_err()
    {
        return false;
    }
    Output::new(&out).is_ok_and(|o| o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_and_passes_the_config_check() {
        let h = hash_password(b"pw");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(crate::formats::password_hash::check_argon2id(&h).is_ok());
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

    #[test]
    fn pooled_verification_agrees_with_the_reference_verifier() {
        use argon2::password_hash::PasswordVerifier;
        let h = hash_password(b"pw");
        let parsed = PasswordHash::new(&h).unwrap();
        let mut blocks = Vec::new();
        assert!(verify_with(&h, b"pw", &mut blocks));
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(!verify_with(&h, b"pW", &mut blocks));
        // A hash with other parameters reuses (and grows) the same memory.
        let small = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let h2 = small.hash_password(b"x", &salt).unwrap().to_string();
        assert!(verify_with(&h2, b"x", &mut blocks));
        assert!(!verify_with(&h2, b"y", &mut blocks));
        assert!(!verify_with("not a hash", b"x", &mut blocks));
    }
}
