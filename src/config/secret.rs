//! Secret material whose `Debug` never prints it.

use std::fmt;

/// Bytes that must never reach a log line: signing keys, passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// One signing or verification key with its `kid`.
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    pub kid: String,
    pub secret: Secret,
}
