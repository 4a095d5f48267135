//! Named defaults: the values SPEC §3 shows, in one place.

use super::{Algorithm, AuthKind, Balance, Mode, StoreKind};

pub const DEFAULT_SIGNING_KEY_ENV: &str = "PORTCULLIS_SIGNING_KEY";
pub const DEFAULT_HOOK_SECRET_ENV: &str = "PORTCULLIS_HOOK_SECRET";

pub fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
pub fn default_max_connections() -> u32 {
    50_000
}
pub fn default_max_connections_per_session() -> u32 {
    8
}
/// No limit: counting a user's sockets costs a store round trip per upgrade.
pub fn default_max_connections_per_user() -> u32 {
    0
}
pub fn default_handshake_timeout_ms() -> u64 {
    5_000
}
pub fn default_body_timeout_ms() -> u64 {
    5_000
}
pub fn default_shutdown_grace_ms() -> u64 {
    10_000
}
pub fn default_ping_interval_ms() -> u64 {
    30_000
}
pub fn default_pong_timeout_ms() -> u64 {
    10_000
}
pub fn default_io_buffer_bytes() -> usize {
    16 * 1024
}
pub fn default_store() -> StoreKind {
    StoreKind::Memory
}
pub fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".into()
}
pub fn default_key_prefix() -> String {
    "portcullis".into()
}
pub fn default_session_ttl() -> u64 {
    86_400
}
pub fn default_algorithm() -> Algorithm {
    Algorithm::HS256
}
pub fn default_kid() -> String {
    "k1".into()
}
pub fn default_issuer() -> String {
    "portcullis".into()
}
pub fn default_audience() -> String {
    "runtimes".into()
}
pub fn default_token_ttl() -> u64 {
    900
}
pub fn default_auth_kind() -> AuthKind {
    AuthKind::Static
}
pub fn default_login_attempts() -> u32 {
    10
}
pub fn default_max_sessions_per_user() -> u32 {
    100
}
pub fn default_upstream_auth_timeout_ms() -> u64 {
    5_000
}
pub fn default_balance() -> Balance {
    Balance::Session
}
pub fn default_mode() -> Mode {
    Mode::Exclusive
}
pub fn default_max_message_bytes() -> u64 {
    1_048_576
}
pub fn default_detach_grace_secs() -> u64 {
    60
}
pub fn default_replay_frames() -> usize {
    1024
}
pub fn default_replay_bytes() -> usize {
    4 * 1_048_576
}
pub fn default_audit_interval() -> u64 {
    60
}
/// A runtime that has not answered a session hook in two seconds is
/// treated as refusing it: a login waits at most this long on it.
pub fn default_hook_timeout_ms() -> u64 {
    2_000
}
