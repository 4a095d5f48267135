//! Test support: real processes and servers on free ports, stopped when
//! dropped. Nothing here is a fake: a gateway test talks to the real binary
//! over real sockets.
#![allow(dead_code)]

pub mod browser;
pub mod gateway;
pub mod http;
pub mod pyws;
pub mod redis;
pub mod tap;
pub mod tls;
pub mod upstream;
pub mod viewports;
pub mod wait;
pub mod ws;

/// The bytes of `tests/fixtures/keys/<name>`.
pub fn key_fixture(name: &str) -> Vec<u8> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
