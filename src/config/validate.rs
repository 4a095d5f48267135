//! Checks a parsed config can actually run, and loads its key material.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;

use url::Url;

use super::defaults::{DEFAULT_HOOK_SECRET_ENV, DEFAULT_SIGNING_KEY_ENV};
use super::{
    Algorithm, AuthKind, Config, ConfigError, KeyMaterial, Loaded, Mode, Secret, StoreKind,
    TlsConfig,
};
use crate::formats::password_hash::check_argon2id;
use crate::formats::path::PathPattern;
use crate::formats::private_key::parse_private_pem;
use crate::formats::tls::{TlsFileError, certificates, certified_key, root_store};

/// Paths the gateway answers itself; no route may shadow them.
const RESERVED_PREFIXES: &[&str] = &["/api/auth", "/api/session"];
const RESERVED_PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/.well-known/jwks.json",
    "/api/auth/login",
    "/api/session/x",
];

/// Largest message a route may allow: beyond this a single client could pin
/// a large share of the machine's memory in one message.
const MAX_MESSAGE_LIMIT: u64 = 64 * 1024 * 1024;
const MIN_HS256_KEY_BYTES: usize = 32;

/// The signing key and the keys still accepted for verification.
#[derive(Debug, Clone)]
pub struct ValidatedKeys {
    pub signing: KeyMaterial,
    pub previous: Vec<KeyMaterial>,
}

/// What validation does with a secret it cannot read (a variable not set,
/// a key file it may not open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Every secret must be there and valid: `serve`, reload, plain `check`.
    Required,
    /// `check --skip-secrets`, for a CI job without the secrets: an
    /// unreadable secret is listed as not checked instead of failing. A
    /// secret that *is* readable is still checked (length, PEM kind).
    SkipUnreadable,
}

/// The result of validation, before it is split into what `serve` needs
/// ([`Loaded`]) or what `check` reports ([`super::Checked`]).
pub(super) struct Validated {
    pub config: Config,
    pub listen: SocketAddr,
    /// `None` only under [`Secrets::SkipUnreadable`] with a secret unread.
    pub keys: Option<ValidatedKeys>,
    pub warnings: Vec<String>,
    /// Secrets that could not be read and so were not checked.
    pub unchecked: Vec<ConfigError>,
    /// `None` also when its key was skipped.
    pub tls: Option<Arc<CertifiedKey>>,
    pub route_roots: Vec<Option<Arc<RootCertStore>>>,
    pub hook_secret: Option<Secret>,
    pub redis: Option<super::RedisTarget>,
}

impl Validated {
    pub(super) fn into_loaded(self, file: &str) -> Result<Loaded, ConfigError> {
        // Under `Secrets::Required` every unreadable secret was an error
        // already; this only guards against a caller mixing the modes.
        let keys = self
            .keys
            .ok_or_else(|| ConfigError::new(file, "tokens", "key material was not loaded"))?;
        Ok(Loaded {
            config: self.config,
            listen: self.listen,
            keys,
            hook_secret: self.hook_secret,
            redis: self.redis,
            warnings: self.warnings,
            hash: String::new(),
            tls: self.tls,
            route_roots: self.route_roots,
        })
    }
}

pub(super) fn validate(
    config: Config,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<Validated, ConfigError> {
    let err = |key: &str, msg: String| ConfigError::new(file, key, msg);
    let s = &config.server;
    let mut warnings = Vec::new();

    let listen: SocketAddr = s.listen.parse().map_err(|_| {
        err(
            "server.listen",
            format!("{:?} is not an address like 127.0.0.1:8080", s.listen),
        )
    })?;
    for (i, origin) in s.allowed_origins.iter().enumerate() {
        if origin != "*" && !is_origin(origin) {
            return Err(err(
                &format!("server.allowed_origins[{i}]"),
                format!("{origin:?} is not an origin like http://localhost:3000 or \"*\""),
            ));
        }
    }
    if s.max_connections == 0 {
        return Err(err("server.max_connections", "must be at least 1".into()));
    }
    if s.max_connections_per_session == 0 {
        return Err(err(
            "server.max_connections_per_session",
            "must be at least 1".into(),
        ));
    }
    // Not an error: a per-session limit above the gateway's simply never
    // binds, and refusing it made `max_connections = 2` alone fail on a
    // default the operator never wrote.
    if s.max_connections_per_session > s.max_connections {
        warnings.push(format!(
            "{file}: server.max_connections_per_session ({}) is above server.max_connections ({}); it never binds",
            s.max_connections_per_session, s.max_connections
        ));
    }
    if s.handshake_timeout_ms == 0 {
        return Err(err(
            "server.handshake_timeout_ms",
            "must be at least 1 (0 would disable the slowloris guard)".into(),
        ));
    }
    if s.body_timeout_ms == 0 {
        return Err(err(
            "server.body_timeout_ms",
            "must be at least 1 (0 would let a stalled request body hold its connection forever)"
                .into(),
        ));
    }
    if s.ping_interval_ms > 0 && s.pong_timeout_ms == 0 {
        return Err(err(
            "server.pong_timeout_ms",
            "must be at least 1 while pings are enabled".into(),
        ));
    }
    if s.worker_threads > 256 {
        return Err(err(
            "server.worker_threads",
            "must be between 0 (one per core) and 256".into(),
        ));
    }
    if !(1024..=1_048_576).contains(&s.io_buffer_bytes) {
        return Err(err(
            "server.io_buffer_bytes",
            "must be between 1024 and 1048576".into(),
        ));
    }

    let mut unchecked = Vec::new();
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let tls = match &s.tls {
        Some(t) => server_tls(file, base, t, secrets, &mut unchecked)?,
        None => None,
    };

    let ss = &config.sessions;
    let redis = super::store::validate(
        ss,
        ss.store == StoreKind::Redis,
        file,
        env,
        secrets,
        &mut unchecked,
    )?;
    if ss.key_prefix.is_empty() || ss.key_prefix.contains(['{', '}']) {
        return Err(err(
            "sessions.key_prefix",
            "must be non-empty and without '{' or '}' (they would break the session's hash tag)"
                .into(),
        ));
    }
    if ss.ttl_secs == 0 {
        return Err(err("sessions.ttl_secs", "must be at least 1".into()));
    }
    if !(1..=3600).contains(&ss.audit_interval_secs) {
        return Err(err(
            "sessions.audit_interval_secs",
            "must be 1 to 3600".into(),
        ));
    }

    let keys = load_keys(&config, file, env, secrets, &mut unchecked)?;
    let hook_secret = match &ss.hooks {
        Some(h) => load_hooks(h, file, env, secrets, &mut unchecked)?,
        None => None,
    };

    let a = &config.auth;
    match a.kind {
        AuthKind::Static => {
            if a.users.is_empty() {
                return Err(err(
                    "auth.users",
                    "auth.kind = \"static\" needs at least one [[auth.users]]".into(),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, u) in a.users.iter().enumerate() {
                if u.username.is_empty() || !seen.insert(u.username.as_str()) {
                    return Err(err(
                        &format!("auth.users[{i}].username"),
                        format!("{:?} is empty or listed twice", u.username),
                    ));
                }
                check_argon2id(&u.password_hash)
                    .map_err(|m| err(&format!("auth.users[{i}].password_hash"), m.to_string()))?;
            }
        }
        AuthKind::Upstream => {
            let Some(raw) = &a.url else {
                return Err(err("auth.url", "auth.kind = \"upstream\" needs url".into()));
            };
            let url = Url::parse(raw).map_err(|e| err("auth.url", format!("not a URL: {e}")))?;
            if url.scheme() != "http" || url.host().is_none() {
                return Err(err("auth.url", "must be an http:// URL with a host".into()));
            }
            if a.upstream_timeout_ms == 0 {
                return Err(err("auth.upstream_timeout_ms", "must be at least 1".into()));
            }
        }
    }

    let mut patterns: Vec<PathPattern> = Vec::new();
    let mut route_roots = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        if r.name.is_empty() {
            return Err(err(&key("name"), "must not be empty".into()));
        }
        if let Some(j) = config.routes[..i].iter().position(|o| o.name == r.name) {
            return Err(err(
                &key("name"),
                format!("{:?} is also the name of routes[{j}]", r.name),
            ));
        }
        let pattern = PathPattern::parse(&r.path)
            .map_err(|m| err(&key("path"), format!("{:?}: {m}", r.path)))?;
        if RESERVED_PREFIXES
            .iter()
            .any(|p| pattern.path() == *p || pattern.path().starts_with(&format!("{p}/")))
            || RESERVED_PATHS.iter().any(|p| pattern.matches(p).is_some())
        {
            return Err(err(
                &key("path"),
                format!(
                    "{:?} would shadow the gateway's own API (/api/auth/, /api/session, /healthz, /readyz, /metrics, /.well-known/)",
                    r.path
                ),
            ));
        }
        if let Some(j) = patterns.iter().position(|p| p.overlaps(&pattern)) {
            return Err(err(
                &key("path"),
                format!(
                    "{:?} overlaps routes[{j}].path {:?}",
                    r.path, config.routes[j].path
                ),
            ));
        }
        patterns.push(pattern);
        if r.upstreams.is_empty() {
            return Err(err(
                &key("upstreams"),
                "must list at least one ws:// or wss:// URL".into(),
            ));
        }
        for (k, u) in r.upstreams.iter().enumerate() {
            let ukey = format!("routes[{i}].upstreams[{k}]");
            let url = Url::parse(u).map_err(|e| err(&ukey, format!("{u:?} is not a URL: {e}")))?;
            if !matches!(url.scheme(), "ws" | "wss")
                || url.host().is_none()
                || url.fragment().is_some()
            {
                return Err(err(
                    &ukey,
                    format!("{u:?} must be a ws:// or wss:// URL with a host and no fragment"),
                ));
            }
        }
        let roots = match &r.ca_file {
            Some(path) => {
                let full = resolve(base, path);
                let pem = std::fs::read(&full).map_err(|e| {
                    err(
                        &key("ca_file"),
                        format!("cannot read {}: {e}", full.display()),
                    )
                })?;
                let roots = root_store(&pem)
                    .map_err(|m| err(&key("ca_file"), format!("{}: {m}", full.display())))?;
                if !r.upstreams.iter().any(|u| u.starts_with("wss://")) {
                    warnings.push(format!(
                        "{file}: {}: set, but no upstream of the route is wss://",
                        key("ca_file")
                    ));
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        route_roots.push(roots);
        if r.max_message_bytes == 0 || r.max_message_bytes > MAX_MESSAGE_LIMIT {
            return Err(err(
                &key("max_message_bytes"),
                format!("must be between 1 and {MAX_MESSAGE_LIMIT}"),
            ));
        }
        if r.mode == Mode::Shared {
            if r.replay_frames == 0 {
                return Err(err(
                    &key("replay_frames"),
                    "must be at least 1 on a shared route".into(),
                ));
            }
            if (r.replay_bytes as u64) < r.max_message_bytes {
                return Err(err(
                    &key("replay_bytes"),
                    format!(
                        "({}) is smaller than max_message_bytes ({}): a full-size frame could never be replayed",
                        r.replay_bytes, r.max_message_bytes
                    ),
                ));
            }
        }
    }

    Ok(Validated {
        config,
        listen,
        keys,
        hook_secret,
        warnings,
        unchecked,
        tls,
        route_roots,
        redis,
    })
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// `[server.tls]`: the certificate is read and parsed always; the key is a
/// secret (`check --skip-secrets` may leave it unread, and then the pair is
/// not matched).
fn server_tls(
    file: &str,
    base: &Path,
    t: &TlsConfig,
    secrets: Secrets,
    unchecked: &mut Vec<ConfigError>,
) -> Result<Option<Arc<CertifiedKey>>, ConfigError> {
    const CERT: &str = "server.tls.cert_file";
    const KEY: &str = "server.tls.key_file";
    let (cert_path, key_path) = (resolve(base, &t.cert_file), resolve(base, &t.key_file));
    // Every error names the key and the file it points at.
    let at = |key: &str, path: &Path, m: String| {
        ConfigError::new(file, key, format!("{}: {m}", path.display()))
    };
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| at(key, path, format!("cannot read: {e}")))
    };
    let cert = read(CERT, &cert_path)?;
    let key = read(KEY, &key_path).map(Secret::new);
    let Some(key) = read_or_skip(key, secrets, unchecked)? else {
        certificates(&cert).map_err(|m| at(CERT, &cert_path, m))?;
        return Ok(None);
    };
    certified_key(&cert, key.expose())
        .map(Some)
        .map_err(|e| match e {
            TlsFileError::Cert(m) => at(CERT, &cert_path, m),
            TlsFileError::Key(m) => at(KEY, &key_path, m),
        })
}

fn is_origin(s: &str) -> bool {
    match Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && (u.path() == "/" || u.path().is_empty())
                && !s.ends_with('/')
                && u.query().is_none()
        }
        Err(_) => false,
    }
}

/// Checks `[sessions.hooks]` and loads its HMAC secret. Hook URLs are
/// plain `http://`: the runtime is a sidecar or on the private network, and
/// the body is signed, not secret.
fn load_hooks(
    h: &super::HooksConfig,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    unchecked: &mut Vec<ConfigError>,
) -> Result<Option<Secret>, ConfigError> {
    let err = |key: &str, msg: String| ConfigError::new(file, key, msg);
    for (key, url) in [
        ("sessions.hooks.on_create", &h.on_create),
        ("sessions.hooks.on_end", &h.on_end),
    ] {
        let Some(url) = url else { continue };
        match Url::parse(url) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
            _ => {
                return Err(err(
                    key,
                    format!("{url:?} is not an http:// URL like http://runtime:9000/sessions"),
                ));
            }
        }
    }
    if h.on_create.is_none() && h.on_end.is_none() {
        return Err(err(
            "sessions.hooks",
            "set on_create, on_end or both (or remove the table)".into(),
        ));
    }
    if !(1..=60_000).contains(&h.timeout_ms) {
        return Err(err(
            "sessions.hooks.timeout_ms",
            "must be 1 to 60000".into(),
        ));
    }
    if h.secret_env.is_some() && h.secret_file.is_some() {
        return Err(err(
            "sessions.hooks.secret_file",
            "set either secret_env or secret_file, not both".into(),
        ));
    }
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let read = read_key(
        file,
        base,
        (
            "sessions.hooks.secret_env",
            Some(h.secret_env.as_deref().unwrap_or(DEFAULT_HOOK_SECRET_ENV)),
        ),
        ("sessions.hooks.secret_file", h.secret_file.as_deref()),
        env,
    );
    let Some(secret) = read_or_skip(read, secrets, unchecked)? else {
        return Ok(None);
    };
    // An HMAC key shorter than the hash gives less than its strength.
    if secret.expose().len() < MIN_HS256_KEY_BYTES {
        let key = if h.secret_file.is_some() {
            "sessions.hooks.secret_file"
        } else {
            "sessions.hooks.secret_env"
        };
        return Err(err(
            key,
            format!(
                "the hook secret needs at least {MIN_HS256_KEY_BYTES} bytes, this one has {}",
                secret.expose().len()
            ),
        ));
    }
    Ok(Some(secret))
}

/// Reads a secret; under [`Secrets::SkipUnreadable`] one that cannot be
/// read is recorded in `unchecked` and comes back `None`.
fn read_or_skip(
    read: Result<Secret, ConfigError>,
    secrets: Secrets,
    unchecked: &mut Vec<ConfigError>,
) -> Result<Option<Secret>, ConfigError> {
    match (read, secrets) {
        (Ok(secret), _) => Ok(Some(secret)),
        (Err(e), Secrets::SkipUnreadable) => {
            unchecked.push(e);
            Ok(None)
        }
        (Err(e), Secrets::Required) => Err(e),
    }
}

fn load_keys(
    config: &Config,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    unchecked: &mut Vec<ConfigError>,
) -> Result<Option<ValidatedKeys>, ConfigError> {
    let t = &config.tokens;
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    if t.signing_key_env.is_some() && t.signing_key_file.is_some() {
        return Err(ConfigError::new(
            file,
            "tokens.signing_key_file",
            "set either signing_key_env or signing_key_file, not both",
        ));
    }
    let signing = read_or_skip(
        read_key(
            file,
            base,
            (
                "tokens.signing_key_env",
                t.signing_key_env.as_deref().or(t
                    .signing_key_file
                    .is_none()
                    .then_some(DEFAULT_SIGNING_KEY_ENV)),
            ),
            ("tokens.signing_key_file", t.signing_key_file.as_deref()),
            env,
        ),
        secrets,
        unchecked,
    )?;
    let signing_key = if t.signing_key_file.is_some() {
        "tokens.signing_key_file"
    } else {
        "tokens.signing_key_env"
    };
    if let Some(signing) = &signing {
        check_key(file, signing_key, t.algorithm, signing)?;
    }
    if t.kid.is_empty() {
        return Err(ConfigError::new(file, "tokens.kid", "must not be empty"));
    }
    if t.ttl_secs == 0 {
        return Err(ConfigError::new(
            file,
            "tokens.ttl_secs",
            "must be at least 1",
        ));
    }
    let mut previous = Vec::new();
    for (i, p) in t.previous_keys.iter().enumerate() {
        let prefix = format!("tokens.previous_keys[{i}]");
        if p.kid.is_empty() || p.kid == t.kid || t.previous_keys[..i].iter().any(|o| o.kid == p.kid)
        {
            return Err(ConfigError::new(
                file,
                format!("{prefix}.kid"),
                format!("{:?} is empty or not unique among the token keys", p.kid),
            ));
        }
        if p.key_env.is_some() == p.key_file.is_some() {
            return Err(ConfigError::new(
                file,
                format!("{prefix}.key_env"),
                "set exactly one of key_env or key_file",
            ));
        }
        let secret = read_or_skip(
            read_key(
                file,
                base,
                (&format!("{prefix}.key_env"), p.key_env.as_deref()),
                (&format!("{prefix}.key_file"), p.key_file.as_deref()),
                env,
            ),
            secrets,
            unchecked,
        )?;
        let source = if p.key_file.is_some() {
            "key_file"
        } else {
            "key_env"
        };
        if let Some(secret) = secret {
            check_key(file, &format!("{prefix}.{source}"), t.algorithm, &secret)?;
            previous.push(KeyMaterial {
                kid: p.kid.clone(),
                secret,
            });
        }
    }
    if !unchecked.is_empty() {
        return Ok(None);
    }
    Ok(signing.map(|secret| ValidatedKeys {
        signing: KeyMaterial {
            kid: t.kid.clone(),
            secret,
        },
        previous,
    }))
}

fn read_key(
    file: &str,
    base: &Path,
    (env_key, env_name): (&str, Option<&str>),
    (file_key, path): (&str, Option<&Path>),
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    if let Some(path) = path {
        return read_beside(file, base, file_key, path).map(Secret::new);
    }
    let name = env_name.unwrap_or(DEFAULT_SIGNING_KEY_ENV);
    match env(name) {
        Some(v) if !v.is_empty() => Ok(Secret::new(v.into_bytes())),
        _ => Err(ConfigError::new(
            file,
            env_key,
            format!(
                "environment variable {name} is not set (the signing secret never lives in the TOML file)"
            ),
        )),
    }
}

/// Reads a file the config names under `key`, a relative path resolved
/// against the config's own directory (so a config can be run from
/// anywhere); an error names the key.
pub(super) fn read_beside(
    file: &str,
    base: &Path,
    key: &str,
    path: &Path,
) -> Result<Vec<u8>, ConfigError> {
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    std::fs::read(&full)
        .map_err(|e| ConfigError::new(file, key, format!("cannot read {}: {e}", full.display())))
}

/// `what` is the config key the material came from, so the error names it.
fn check_key(file: &str, what: &str, alg: Algorithm, secret: &Secret) -> Result<(), ConfigError> {
    if alg == Algorithm::HS256 && secret.expose().len() < MIN_HS256_KEY_BYTES {
        return Err(ConfigError::new(
            file,
            what,
            format!(
                "an HS256 key needs at least {MIN_HS256_KEY_BYTES} bytes, this one has {}",
                secret.expose().len()
            ),
        ));
    }
    if alg != Algorithm::HS256 {
        parse_private_pem(alg, secret.expose())
            .map_err(|m| ConfigError::new(file, what, m.to_string()))?;
    }
    Ok(())
}
