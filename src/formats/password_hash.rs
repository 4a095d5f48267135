//! Checks that a configured password hash is an argon2id PHC string.

use argon2::Algorithm;
use argon2::password_hash::PasswordHash;

/// Why a `[[auth.users]].password_hash` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("not a PHC password hash: {0}")]
    NotPhc(argon2::password_hash::Error),
    #[error("uses {0}, expected argon2id (make one with `portcullis hash-password`)")]
    NotArgon2id(String),
}

/// Config-time check that `hash` is an argon2id PHC hash.
pub fn check_argon2id(hash: &str) -> Result<(), HashError> {
    let parsed = PasswordHash::new(hash).map_err(HashError::NotPhc)?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(HashError::NotArgon2id(parsed.algorithm.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARGON2ID: &str = "$argon2id$v=19$m=19456,t=2,p=1$uA22mbySPVNtj4JvxXI/Xw$QTjBAjQvkyj07QszJAq8B8/OnyazU0xHvS1dAnv8Xp0";

    #[test]
    fn accepts_argon2id_and_refuses_the_rest() {
        assert_eq!(check_argon2id(ARGON2ID), Ok(()));
        assert!(check_argon2id("$2b$12$abcdefghijklmnopqrstuv").is_err());
        assert!(matches!(check_argon2id("plain"), Err(HashError::NotPhc(_))));
        let argon2i = ARGON2ID.replacen("argon2id", "argon2i", 1);
        assert_eq!(
            check_argon2id(&argon2i).unwrap_err().to_string(),
            "uses argon2i, expected argon2id (make one with `portcullis hash-password`)"
        );
    }
}
