//! The composition root: every part of the gateway, built once from a
//! validated config and wired together. Request handlers (`http`) and the
//! server read it; lower layers receive only the parts they use.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Authenticator;
use crate::auth::ratelimit::LoginLimiter;
use crate::config::{Config, Loaded, StoreKind};
use crate::gate::Gate;
use crate::hub::Hubs;
use crate::routing::{Route, RouteTable};
use crate::session::{MemoryStore, RedisStore, Store, StoreError, UserLimit};
use crate::shutdown::Shutdown;
use crate::sockets::Sockets;
use crate::telemetry::Metrics;
use crate::token::{KeyError, TokenService};

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
    pub(crate) limiter: LoginLimiter,
    pub(crate) metrics: Arc<Metrics>,
    /// Sockets open on this instance: registry, lease releases, shutdown.
    pub(crate) sockets: Sockets,
    /// Shared-session hubs by (session, route).
    pub(crate) hubs: Hubs,
    /// The upgrade checks of SPEC §6 and the hand-over.
    pub(crate) gate: Gate,
    /// HTML served at `/` by `portcullis demo` only.
    pub(crate) demo_page: Option<String>,
}

impl App {
    pub async fn build(loaded: Loaded) -> Result<App, AppError> {
        let Loaded {
            config,
            keys,
            redis,
            ..
        } = loaded;
        let tokens = Arc::new(TokenService::new(&config.tokens, &keys)?);
        let store = match config.sessions.store {
            StoreKind::Memory => Store::Memory(MemoryStore::new()),
            StoreKind::Redis => {
                let target = redis
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
        let routes = RouteTable::new(
            config
                .routes
                .iter()
                .map(|rc| {
                    let pattern =
                        crate::routing::PathPattern::parse(&rc.path).expect("validated route path");
                    let upstreams = rc
                        .upstreams
                        .iter()
                        .map(|u| url::Url::parse(u).expect("validated upstream URL"))
                        .collect();
                    Route::from_config(rc, pattern, upstreams)
                })
                .collect(),
        );
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
        let gate = Gate::new(
            &config.server,
            Duration::from_secs(config.sessions.ttl_secs),
            tokens.clone(),
            store.clone(),
            sockets.clone(),
            hubs.clone(),
            metrics.clone(),
        );
        Ok(App {
            auth: Authenticator::from_config(&config.auth),
            limiter: LoginLimiter::new(config.auth.login_attempts_per_minute),
            metrics,
            sockets,
            hubs,
            gate,
            demo_page: None,
            routes,
            store,
            tokens,
            config,
        })
    }

    pub fn into_shared(self) -> Arc<App> {
        Arc::new(self)
    }

    /// The validated config this app was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }
}
