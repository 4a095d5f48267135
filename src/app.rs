//! The composition root: every part of the gateway, built once from a
//! validated config and wired together. Request handlers (`http`) and the
//! server read it; lower layers receive only the parts they use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::Authenticator;
use crate::auth::ratelimit::LoginLimiter;
use crate::config::{Config, ConfigError, Loaded, RouteConfig, StoreKind};
use crate::gate::Gate;
use crate::hooks::Hooks;
use crate::hub::Hubs;
use crate::routing::{Route, RouteTable};
use crate::session::{MemoryStore, Outbox, RedisStore, Store, StoreError, UserLimit};
use crate::shutdown::Shutdown;
use crate::sockets::Sockets;
use crate::telemetry::Metrics;
use crate::tls::ServerCerts;
use crate::token::{KeyError, TokenService};
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("token keys: {0}")]
    Tokens(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct App {
    pub(crate) config: Config,
    pub(crate) routes: RouteTable,
    pub(crate) store: Arc<Store>,
    pub(crate) tokens: Arc<TokenService>,
    pub(crate) auth: Authenticator,
    /// Shared with the next config while `login_attempts_per_minute` stays
    /// the same, so a reload does not forgive failed attempts.
    pub(crate) limiter: Arc<LoginLimiter>,
    pub(crate) metrics: Arc<Metrics>,
    /// Sockets open on this instance: registry, lease releases, shutdown.
    pub(crate) sockets: Sockets,
    /// Shared-session hubs by (session, route).
    pub(crate) hubs: Hubs,
    /// The upgrade checks of SPEC §6 and the hand-over.
    pub(crate) gate: Gate,
    /// `[sessions.hooks]`, when configured (SPEC §11).
    pub(crate) hooks: Option<Arc<Hooks>>,
    /// The durable `on_end` queue and expiry index; only with `on_end`.
    pub(crate) outbox: Option<Arc<Outbox>>,
    /// HTML served at `/` by `portcullis demo` only.
    pub(crate) demo_page: Option<String>,
    /// The listener's TLS config when `[server.tls]` is set; its
    /// certificate is swapped by a reload, the config itself stays.
    pub(crate) tls: Option<ServerTls>,
}

/// What the listener terminates TLS with.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) certs: Arc<ServerCerts>,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

/// What stays across a reload: the store and its connections, the sockets
/// open on this instance, the hubs, the metrics, and the session hooks with
/// their `on_end` queue (the maintenance task delivering it was started
/// with them, so `sessions.hooks` is a restart-only setting).
struct Kept {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    sockets: Sockets,
    hubs: Hubs,
    tls: Option<ServerTls>,
    hooks: Option<Arc<Hooks>>,
    outbox: Option<Arc<Outbox>>,
}

impl App {
    pub async fn build(loaded: Loaded) -> Result<App, AppError> {
        let config = &loaded.config;
        let hooks = match (&config.sessions.hooks, &loaded.hook_secret) {
            (Some(cfg), Some(secret)) => Some(Arc::new(Hooks::new(cfg, secret))),
            _ => None,
        };
        let outbox = match &hooks {
            Some(h) if h.has_on_end() => Some(Arc::new(match &loaded.redis {
                None => Outbox::memory(),
                Some(target) => Outbox::redis(&outbox_url(target)?, &config.sessions.key_prefix)?,
            })),
            _ => None,
        };
        let store = match config.sessions.store {
            StoreKind::Memory => Store::Memory(MemoryStore::new()),
            StoreKind::Redis => {
                let target = loaded
                    .redis
                    .as_ref()
                    .expect("validated: a redis store has a target");
                Store::Redis(RedisStore::connect_to(target, &config.sessions.key_prefix).await?)
            }
        };
        let store = Arc::new(store.with_user_limit(UserLimit {
            max_sessions: config.auth.max_sessions_per_user,
            max_connections: config.server.max_connections_per_user,
            slack: Duration::from_secs(config.tokens.ttl_secs),
        }));
        let metrics = Arc::new(Metrics::new());
        let sockets = Sockets::new(
            config.server.max_connections,
            store.clone(),
            Shutdown::new(),
            metrics.clone(),
        );
        let hubs = Hubs::new(
            sockets.clone(),
            store.clone(),
            config.server.io_buffer_bytes,
        );
        let tls = loaded.tls.clone().map(|key| {
            let certs = ServerCerts::new(key);
            ServerTls {
                acceptor: tokio_rustls::TlsAcceptor::from(crate::tls::server_config(certs.clone())),
                certs,
            }
        });
        let kept = Kept {
            store,
            metrics,
            sockets,
            hubs,
            tls,
            hooks,
            outbox,
        };
        Self::assemble(kept, loaded, None)
    }

    /// The parts a config decides, around the parts that stay. `previous`
    /// lends what an unchanged setting should not lose: an identical
    /// route's upstream health and least-connections counts, the login
    /// limiter's memory of failed attempts.
    fn assemble(kept: Kept, loaded: Loaded, previous: Option<&App>) -> Result<App, AppError> {
        let Loaded {
            config,
            keys,
            hash,
            tls: new_cert,
            route_roots,
            ..
        } = loaded;
        let Kept {
            store,
            metrics,
            sockets,
            hubs,
            tls,
            hooks,
            outbox,
        } = kept;
        // On reload: new handshakes get the certificate just read and
        // checked; connections already open keep theirs.
        if let (Some(tls), Some(key), Some(_)) = (&tls, new_cert, previous) {
            tls.certs.replace(key);
        }
        let tokens = Arc::new(TokenService::new(&config.tokens, &keys)?);
        let routes = RouteTable::from_shared(
            config
                .routes
                .iter()
                .zip(route_roots)
                .map(|(rc, roots)| {
                    // An unchanged route whose CA is unchanged too (a
                    // `ca_file` may be rewritten in place).
                    let same = previous.and_then(|p| {
                        let old = p.config.routes.iter().find(|o| o.name == rc.name)?;
                        (old == rc && rc.ca_file.is_none())
                            .then(|| p.routes.get(&rc.name).cloned())?
                    });
                    same.unwrap_or_else(|| Arc::new(route_from(rc, roots)))
                })
                .collect(),
        );
        let limiter = match previous {
            Some(p)
                if p.config.auth.login_attempts_per_minute
                    == config.auth.login_attempts_per_minute =>
            {
                p.limiter.clone()
            }
            _ => Arc::new(LoginLimiter::new(config.auth.login_attempts_per_minute)),
        };
        sockets.registry().set_max(config.server.max_connections);
        let gate = Gate::new(
            &config.server,
            Duration::from_secs(config.sessions.ttl_secs),
            tokens.clone(),
            store.clone(),
            sockets.clone(),
            hubs.clone(),
            metrics.clone(),
        );
        metrics.set_config_hash(&hash);
        Ok(App {
            auth: Authenticator::from_config(&config.auth),
            limiter,
            metrics,
            sockets,
            hubs,
            gate,
            demo_page: previous.and_then(|p| p.demo_page.clone()),
            tls,
            hooks,
            outbox,
            routes,
            store,
            tokens,
            config,
        })
    }

    /// A new app from a reloaded config, keeping this one's store, sockets,
    /// hubs and metrics. Settings only read at start keep their running
    /// values; their names come back so the caller can say a restart is
    /// needed for them.
    pub fn reloaded(&self, mut loaded: Loaded) -> Result<(App, Vec<&'static str>), AppError> {
        let restart_only = keep_restart_only(&self.config, &mut loaded.config);
        let kept = Kept {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            sockets: self.sockets.clone(),
            hubs: self.hubs.clone(),
            tls: self.tls.clone(),
            hooks: self.hooks.clone(),
            outbox: self.outbox.clone(),
        };
        Ok((Self::assemble(kept, loaded, Some(self))?, restart_only))
    }

    /// The validated config this app was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// The URL the `on_end` queue connects with: the store's one Redis, with
/// the password from `redis_password_env`/`_file` when that is where it
/// comes from. Cluster and Sentinel are refused by the store itself.
fn outbox_url(target: &crate::config::RedisTarget) -> Result<String, StoreError> {
    match &target.topology {
        crate::config::Topology::Standalone(url) => {
            let mut url = url.clone();
            if let Some(p) = &target.password {
                let p = std::str::from_utf8(p.expose())
                    .map_err(|_| StoreError("redis password is not UTF-8".into()))?;
                url.set_password(Some(p))
                    .map_err(|()| StoreError("redis url cannot carry a password".into()))?;
            }
            Ok(url.to_string())
        }
        _ => Err(StoreError(
            "session hooks need a single Redis (redis_url) in this build".into(),
        )),
    }
}

/// `roots`: the route's `ca_file`, read by validation; without one, a
/// route with `wss://` upstreams trusts the system's roots.
fn route_from(rc: &RouteConfig, roots: Option<Arc<RootCertStore>>) -> Route {
    let pattern = crate::routing::PathPattern::parse(&rc.path).expect("validated route path");
    let upstreams: Vec<url::Url> = rc
        .upstreams
        .iter()
        .map(|u| url::Url::parse(u).expect("validated upstream URL"))
        .collect();
    let tls = upstreams
        .iter()
        .any(|u| u.scheme() == "wss")
        .then(|| crate::tls::client_config(roots.unwrap_or_else(crate::tls::system_roots)));
    Route::from_config(rc, pattern, upstreams).with_tls(tls)
}

/// Copies into `new` the running values of settings that only take effect
/// at start (what was bound, the store, threads and buffers made then),
/// and names those that differed.
fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($name:literal => $($field:ident).+),* $(,)?) => {$(
            if new.$($field).+ != running.$($field).+ {
                changed.push($name);
                new.$($field).+ = running.$($field).+.clone();
            }
        )*};
    }
    keep!(
        "server.listen" => server.listen,
        "server.worker_threads" => server.worker_threads,
        "server.io_buffer_bytes" => server.io_buffer_bytes,
        "server.shutdown_grace_ms" => server.shutdown_grace_ms,
        "sessions.store" => sessions.store,
        "sessions.redis_url" => sessions.redis_url,
        "sessions.key_prefix" => sessions.key_prefix,
        "sessions.audit_interval_secs" => sessions.audit_interval_secs,
        "auth.max_sessions_per_user" => auth.max_sessions_per_user,
        "server.max_connections_per_user" => server.max_connections_per_user,
        "sessions.hooks" => sessions.hooks,
    );
    // The listener is TLS or not for its life; its certificate and key
    // (the files named) are what a reload changes.
    if new.server.tls.is_some() != running.server.tls.is_some() {
        changed.push("server.tls (turning TLS on or off)");
        new.server.tls = running.server.tls.clone();
    }
    changed
}

/// The gateway as it runs: the current [`App`], which a reload replaces
/// whole. Each request takes one snapshot at its start and uses it to the
/// end, so it never sees half of one config and half of another; sockets
/// already open keep what they were handed (their route, their relay
/// settings) and are not touched by a reload.
pub struct Running {
    current: ArcSwap<App>,
    /// The file a reload reads; `None` for `demo`, which has none.
    path: Option<PathBuf>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (demo mode)")]
    NoFile,
    /// Worded as `portcullis check` words it.
    #[error("config error: {0}")]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] AppError),
    #[error("the reload task failed: {0}")]
    Task(String),
}

/// What a reload that took effect did.
#[derive(Debug)]
pub struct Reloaded {
    pub hash: String,
    pub routes: usize,
    /// Changed settings that keep their running value until a restart.
    pub restart_only: Vec<&'static str>,
    pub warnings: Vec<String>,
}

impl Running {
    pub fn new(app: App, path: Option<PathBuf>) -> Arc<Running> {
        Arc::new(Running {
            current: ArcSwap::from_pointee(app),
            path,
        })
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<App> {
        self.current.load_full()
    }

    /// Re-reads the config file with the same validation as `portcullis
    /// check` and, if it is valid, swaps in an app built from it. Invalid:
    /// nothing changes. Called from one signal loop, so reloads never race
    /// each other. File reads, key parsing and the password verifier's
    /// set-up (one argon2 hash) run on the blocking pool.
    pub async fn reload(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let loaded = Config::load(&path)?;
            let hash = loaded.hash.clone();
            let warnings = loaded.warnings.clone();
            let old = this.current();
            let (app, restart_only) = old.reloaded(loaded)?;
            let routes = app.routes.iter().count();
            this.current.store(Arc::new(app));
            Ok(Reloaded {
                hash,
                routes,
                restart_only,
                warnings,
            })
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?
    }
}
