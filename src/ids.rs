//! Identifiers minted by the gateway: 128 bits from the OS CSPRNG, URL-safe.
//!
//! The server is the only source of session ids; nothing a client sends is
//! ever used as one.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// 128 random bits as 22 URL-safe base64 characters.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An id for one socket's lease: unique, not secret (it never leaves the
/// gateway and its store), so it costs no system call. A random per-process
/// half keeps instances sharing one Redis apart; a counter makes the other.
pub fn connection_id() -> String {
    static PROCESS: LazyLock<[u8; 8]> = LazyLock::new(|| {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
        bytes
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&*PROCESS);
    bytes[8..].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `s` could be an id we minted; lets handlers answer 404 without a
/// store round trip for garbage, and keeps odd bytes out of store keys.
pub fn looks_like_id(s: &str) -> bool {
    s.len() == 22
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_well_formed() {
        let a = random_id();
        let b = random_id();
        assert_ne!(a, b);
        assert!(looks_like_id(&a), "{a}");
        assert!(!looks_like_id("../../etc"));
        assert!(!looks_like_id("{abcdefghijklmnopqrst}"));
    }

    #[test]
    fn connection_ids_are_distinct_and_well_formed() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| connection_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| looks_like_id(id)));
    }
}
