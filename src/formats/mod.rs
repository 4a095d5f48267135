//! Parses and checks the text formats an operator writes into the config.
//!
//! Route path patterns, argon2id PHC password hashes and PKCS#8 private-key
//! PEMs are each read in two places: `config` checks them at start-up so the
//! error names the key path, and `routing`, `auth` and `token` use the parsed
//! values. Both sides sit above this module and call the one implementation
//! here, so `config` imports nothing above it and no check is written twice.
//! This module imports nothing from the crate: its inputs are plain strings
//! and bytes, and the types it needs (`Algorithm`) are defined here and
//! re-exported where the rest of the crate expects them (`config::Algorithm`).
//!
//! Passing the checks into `config` instead (as function arguments or hooks)
//! would keep the parsers where they are used, but would change
//! `Config::validate`'s signature for every caller and hide which check runs;
//! a module below both is the smaller and more visible change.

pub mod password_hash;
pub mod path;
pub mod private_key;
pub mod tls;
