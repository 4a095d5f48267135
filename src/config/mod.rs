//! The TOML configuration (SPEC §3): parse with serde, then `validate()`.
//!
//! Parsing rejects unknown keys (`deny_unknown_fields`) and fills defaults from
//! named functions; validation then checks what types cannot express (route
//! overlaps, URL schemes, buffer combinations, key material). Every error names
//! the file, the key path (`routes[1].upstreams`) and what is wrong, so an
//! operator can fix it without reading code.

mod defaults;
mod secret;
mod store;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use serde::Deserialize;

pub use crate::formats::private_key::Algorithm;
pub use secret::{KeyMaterial, Secret};
pub use store::{RedisTarget, Topology, masked as masked_url};
pub use validate::{Secrets, ValidatedKeys};

use defaults::*;

/// A config problem: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(file: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Optional as a whole: the signing key defaults to `PORTCULLIS_SIGNING_KEY`.
    #[serde(default)]
    pub tokens: TokensConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// WebSocket `Origin` allowlist: `[]` admits no browser origin, `["*"]` any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_max_connections_per_session")]
    pub max_connections_per_session: u32,
    /// SPEC §8: one user's open sockets on every instance sharing the
    /// store; 0 = no limit (and no store traffic for it).
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: u32,
    /// From accept to the end of the request head: the slowloris guard.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Extension: from the end of the request head to the end of an API
    /// request's body, however slowly it arrives; then `408` and the
    /// connection is closed (the body-side slowloris guard).
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Extension: how often an idle proxied socket is pinged (0 = never).
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// Extension: a peer that sends nothing for this long after a ping is dropped.
    #[serde(default = "default_pong_timeout_ms")]
    pub pong_timeout_ms: u64,
    /// Extension: bytes read from a socket per readiness event; the buffer is
    /// borrowed only while data is moving, so idle sockets hold none.
    #[serde(default = "default_io_buffer_bytes")]
    pub io_buffer_bytes: usize,
    /// Extension: shard threads, each a single-threaded runtime with its own
    /// `SO_REUSEPORT` listener; 0 = one per core.
    #[serde(default)]
    pub worker_threads: usize,
    /// SPEC §12: serve HTTPS and `wss://` with this certificate and key;
    /// absent = plain HTTP. Both files are read again on `SIGHUP`.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: PEM files, relative paths against the config's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1 PEM): a secret.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redis,
    Memory,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    #[serde(default = "default_store")]
    pub store: StoreKind,
    /// One Redis (SPEC §10); unset means `redis://127.0.0.1:6379/0` unless
    /// another topology is named. Read the validated [`Loaded::redis`].
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes.
    pub redis_cluster_urls: Option<Vec<String>>,
    /// Sentinels watching the primary named `redis_sentinel_master`.
    pub redis_sentinel_urls: Option<Vec<String>>,
    pub redis_sentinel_master: Option<String>,
    /// Extension: the data nodes' password from the environment or a file,
    /// so it need not sit in a URL in the TOML file.
    pub redis_password_env: Option<String>,
    pub redis_password_file: Option<PathBuf>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_session_ttl")]
    pub ttl_secs: u64,
    /// One pass of the background audit over every session with a socket
    /// here, per this many seconds: the latest a revocation whose message
    /// was lost without any disconnect is enforced. Lower costs the store
    /// more (one command per 500 sessions per pass).
    #[serde(default = "default_audit_interval")]
    pub audit_interval_secs: u64,
    /// `[sessions.hooks]` (SPEC §11): tell the runtime of each session's
    /// start and end. Absent = no hooks, and logins cost no extra round trip.
    #[serde(default)]
    pub hooks: Option<HooksConfig>,
}

/// `[sessions.hooks]`: where the runtime hears of sessions. The secret
/// itself is loaded by `validate` into [`Loaded::hook_secret`], never kept
/// here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// `POST {"session_id","user","expires_at"}` before any token exists.
    pub on_create: Option<String>,
    /// `POST {"session_id","user","reason"}` after a session ends.
    pub on_end: Option<String>,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    /// Where the signing key comes from; `signing_key_file` wins when set and
    /// naming both explicitly is an error.
    pub signing_key_env: Option<String>,
    pub signing_key_file: Option<PathBuf>,
    #[serde(default = "default_kid")]
    pub kid: String,
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default = "default_token_ttl")]
    pub ttl_secs: u64,
    #[serde(default)]
    pub previous_keys: Vec<PreviousKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    pub kid: String,
    pub key_env: Option<String>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    Static,
    Upstream,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default = "default_auth_kind")]
    pub kind: AuthKind,
    /// Failed attempts per client IP and per username per minute; 0 = unlimited.
    #[serde(default = "default_login_attempts")]
    pub login_attempts_per_minute: u32,
    /// Extension: live sessions one user may hold across every instance
    /// (login and `POST /api/session/create` beyond it get `429
    /// too_many_sessions`); 0 = unlimited.
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: u32,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    pub url: Option<String>,
    /// Extension: how long the upstream verifier may take before login answers 502.
    #[serde(default = "default_upstream_auth_timeout_ms")]
    pub upstream_timeout_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            kind: default_auth_kind(),
            login_attempts_per_minute: default_login_attempts(),
            max_sessions_per_user: default_max_sessions_per_user(),
            users: Vec::new(),
            url: None,
            upstream_timeout_ms: default_upstream_auth_timeout_ms(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    pub password_hash: String,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not a password, but it is still offline-crackable material.
        f.debug_struct("UserConfig")
            .field("username", &self.username)
            .field("password_hash", &"MASKED")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    Session,
    RoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Exclusive,
    Shared,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub path: String,
    pub upstreams: Vec<String>,
    #[serde(default = "default_balance")]
    pub balance: Balance,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    #[serde(default = "default_detach_grace_secs")]
    pub detach_grace_secs: u64,
    #[serde(default = "default_replay_frames")]
    pub replay_frames: usize,
    /// Extension: byte cap of the replay ring, so a few huge frames cannot
    /// hold unbounded memory.
    #[serde(default = "default_replay_bytes")]
    pub replay_bytes: usize,
    /// SPEC §12: the CA (PEM) that `wss://` upstreams' certificates must
    /// chain to, instead of the system roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            allowed_origins: Vec::new(),
            max_connections: default_max_connections(),
            max_connections_per_session: default_max_connections_per_session(),
            max_connections_per_user: default_max_connections_per_user(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            body_timeout_ms: default_body_timeout_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            ping_interval_ms: default_ping_interval_ms(),
            pong_timeout_ms: default_pong_timeout_ms(),
            io_buffer_bytes: default_io_buffer_bytes(),
            worker_threads: 0,
            tls: None,
        }
    }
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            algorithm: default_algorithm(),
            signing_key_env: None,
            signing_key_file: None,
            kid: default_kid(),
            issuer: default_issuer(),
            audience: default_audience(),
            ttl_secs: default_token_ttl(),
            previous_keys: Vec::new(),
        }
    }
}

impl std::fmt::Debug for SessionsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `redis://:password@host` carries the store's password.
        let mask = |u: &String| match url::Url::parse(u) {
            Ok(url) => store::masked(&url),
            Err(_) => "(unparsable)".to_string(),
        };
        let masks =
            |l: &Option<Vec<String>>| l.as_ref().map(|l| l.iter().map(mask).collect::<Vec<_>>());
        f.debug_struct("SessionsConfig")
            .field("store", &self.store)
            .field("redis_url", &self.redis_url.as_ref().map(mask))
            .field("redis_cluster_urls", &masks(&self.redis_cluster_urls))
            .field("redis_sentinel_urls", &masks(&self.redis_sentinel_urls))
            .field("redis_sentinel_master", &self.redis_sentinel_master)
            .field("redis_password_env", &self.redis_password_env)
            .field("redis_password_file", &self.redis_password_file)
            .field("key_prefix", &self.key_prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            store: default_store(),
            redis_url: None,
            redis_cluster_urls: None,
            redis_sentinel_urls: None,
            redis_sentinel_master: None,
            redis_password_env: None,
            redis_password_file: None,
            key_prefix: default_key_prefix(),
            ttl_secs: default_session_ttl(),
            audit_interval_secs: default_audit_interval(),
            hooks: None,
        }
    }
}

/// A config that parsed and validated, with its key material loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub listen: SocketAddr,
    pub keys: ValidatedKeys,
    /// The HMAC key of `[sessions.hooks]`, when hooks are configured.
    pub hook_secret: Option<Secret>,
    /// Settings that are valid but probably not what was meant (a limit
    /// that never binds); logged at start and reload, printed by `check`.
    pub warnings: Vec<String>,
    /// SHA-256 of the file's text, hex (empty when not read from a file):
    /// `/metrics` shows which config is loaded.
    pub hash: String,
    /// `[server.tls]`'s certificate and key, read and matched.
    pub tls: Option<Arc<CertifiedKey>>,
    /// Per route (by index), the roots its `ca_file` names, if it names one.
    pub route_roots: Vec<Option<Arc<RootCertStore>>>,
    /// Where the Redis store lives; `None` with the memory store.
    pub redis: Option<RedisTarget>,
}

/// What `portcullis check` reports.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    pub listen: SocketAddr,
    pub warnings: Vec<String>,
    /// Secrets that could not be read and were not checked (only under
    /// [`Secrets::SkipUnreadable`]), each saying which key and why.
    pub unchecked_secrets: Vec<ConfigError>,
}

impl Config {
    /// Reads, parses and validates `path`; the environment supplies secrets.
    /// `serve`, reload and `check` all go through here (`check` by
    /// [`Config::check`]), so they agree on what is valid and say it in the
    /// same words.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let file = path.display().to_string();
        let (validated, hash) = Self::validate_file(path, Secrets::Required)?;
        let mut loaded = validated.into_loaded(&file)?;
        loaded.hash = hash;
        Ok(loaded)
    }

    /// What `portcullis check` runs: [`Config::load`]'s validation, with
    /// unreadable secrets listed instead of fatal under
    /// [`Secrets::SkipUnreadable`].
    pub fn check(path: &Path, secrets: Secrets) -> Result<Checked, ConfigError> {
        let (v, _) = Self::validate_file(path, secrets)?;
        Ok(Checked {
            config: v.config,
            listen: v.listen,
            warnings: v.warnings,
            unchecked_secrets: v.unchecked,
        })
    }

    fn validate_file(
        path: &Path,
        secrets: Secrets,
    ) -> Result<(validate::Validated, String), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&file, "(file)", format!("cannot read: {e}")))?;
        let config = Self::parse(&file, &text)?;
        let validated =
            validate::validate(config, &file, &|name| std::env::var(name).ok(), secrets)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let hash = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok((validated, hash))
    }

    /// Parses TOML, reporting the failing key by its path.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            // `message()` drops the location; without it a syntax error is hard to find.
            let at = e
                .span()
                .and_then(|span| text.get(..span.start))
                .map(|before| {
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                    format!("line {line}, column {column}: ")
                });
            ConfigError::new(
                file,
                "(syntax)",
                format!("{}{}", at.unwrap_or_default(), e.message()),
            )
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." || key.is_empty() {
                "(root)".to_string()
            } else {
                key
            };
            ConfigError::new(file, key, e.into_inner().message().to_string())
        })
    }

    /// Checks what types cannot and loads key material. `env` is injected so
    /// tests need not mutate the process environment.
    pub fn validate(
        self,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Loaded, ConfigError> {
        validate::validate(self, file, env, Secrets::Required)?.into_loaded(file)
    }
}
