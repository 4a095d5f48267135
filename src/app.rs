//! Everything a request handler needs, built once from a validated config.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::auth::ratelimit::LoginLimiter;
use crate::config::{Config, Loaded, StoreKind};
use crate::gate::registry::Registry;
use crate::hub::Hubs;
use crate::routing::{Route, RouteTable};
use crate::session::{MemoryStore, RedisStore, Store, StoreError};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::token::TokenService;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("token keys: {0}")]
    Tokens(#[from] crate::token::KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct App {
    pub config: Config,
    pub routes: RouteTable,
    pub store: Store,
    pub tokens: TokenService,
    pub auth: Authenticator,
    pub limiter: LoginLimiter,
    pub metrics: Metrics,
    /// Sockets open on this instance, by session.
    pub registry: Registry,
    /// Store leases of closed sockets, waiting to be released in a batch.
    pub releases: crate::gate::release::Releases,
    /// Shared-session hubs by (session, route).
    pub hubs: Hubs,
    /// Every socket task is tracked here so shutdown can close and drain it.
    pub shutdown: Shutdown,
    /// HTML served at `/` by `portcullis demo` only.
    pub demo_page: Option<String>,
}

impl App {
    pub async fn build(loaded: Loaded) -> Result<App, AppError> {
        let Loaded { config, keys, .. } = loaded;
        let tokens = TokenService::new(&config.tokens, &keys).map_err(AppError::Tokens)?;
        let store = match config.sessions.store {
            StoreKind::Memory => Store::Memory(MemoryStore::new()),
            StoreKind::Redis => Store::Redis(
                RedisStore::connect(&config.sessions.redis_url, &config.sessions.key_prefix)
                    .await?,
            ),
        };
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
        Ok(App {
            auth: Authenticator::from_config(&config.auth),
            limiter: LoginLimiter::new(config.auth.login_attempts_per_minute),
            metrics: Metrics::new(),
            registry: Registry::new(config.server.max_connections),
            hubs: Hubs::default(),
            releases: Default::default(),
            shutdown: Shutdown::new(),
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
}
