//! The WebSocket gate (SPEC §6): the ordered checks an upgrade must pass
//! before any upstream is dialled, then the hand-over of the socket.
//!
//! 0. an unambiguous request (one valid `Host`, no body, one `Origin`, key,
//!    version and `Authorization`) → else `400 bad_request`; the path was
//!    already checked by [`crate::routing::unsafe_path`] before routing
//! 1. a valid WebSocket upgrade → else `426 upgrade_required`
//! 2. `Origin` allowed → else `403 origin_not_allowed`
//! 3. a token that verifies → else `403 missing_token|invalid_token|token_expired`
//! 4. a live session (one atomic store call that also takes the socket's
//!    lease and slides the TTL) → else `403 session_not_found` / `503`
//! 5. limits (the session's, checked in the same store call as 4; this
//!    instance's; the user's on every instance, one more store call, only
//!    when `server.max_connections_per_user` is set) → else
//!    `503 too_many_connections`
//! 6. an upstream that completes its handshake → else `502 upstream_unavailable`
//!
//! Only then does the client get its `101`. What happens to the socket
//! after it belongs to [`crate::proxy::relay`] (exclusive routes) or
//! [`crate::hub`] (shared routes); its lease, slot and close codes to
//! [`crate::sockets`].

mod shared;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::either::Either as Io;

use crate::config::{Mode, ServerConfig};
use crate::error::{ApiError, Body};
use crate::hub::Hubs;
use crate::ids::connection_id;
use crate::proxy::dial::{Dialled, UpstreamRequest, dial};
use crate::proxy::relay::{self, Outcome, Pair, RelayConfig};
use crate::proxy::tls_io::TlsIo;
use crate::routing::Route;
use crate::session::{
    Attach, LeaseRequest, SessionRecord, SessionStore, Store, UserAttach, UserLease,
};
use crate::sockets::{Active, Held, Sockets};
use crate::telemetry::{Metrics, RouteResultLabel};
use crate::token::{Claims, TokenError, TokenService, credentials};

/// Retry-After for a full gateway, session or user: sockets come and go
/// quickly.
const FULL_RETRY_AFTER_SECS: u64 = 1;

/// The parts of the config the gate reads on every upgrade.
struct Settings {
    allowed_origins: Vec<String>,
    max_per_session: u32,
    /// Whether the store counts each user's sockets (SPEC §8).
    limits_users: bool,
    session_ttl: Duration,
    handshake_timeout: Duration,
    io_buffer: usize,
    ping_interval: Duration,
    pong_timeout: Duration,
}

/// Everything an upgrade touches, and nothing else of the app.
pub struct Gate {
    settings: Settings,
    tokens: Arc<TokenService>,
    store: Arc<Store>,
    sockets: Sockets,
    hubs: Hubs,
    metrics: Arc<Metrics>,
}

/// A request that passed checks 1–5, on its way to the hand-over.
struct Admitted<'a> {
    route: &'a Arc<Route>,
    rest: &'a str,
    query: Option<&'a str>,
    claims: Claims,
    record: SessionRecord,
    conn_id: String,
    offered: upgrade::Offered,
    /// The client's permessage-deflate offers; passed upstream on exclusive
    /// routes only.
    deflate_offer: Option<http::HeaderValue>,
    headers: http::HeaderMap,
    deadline: tokio::time::Instant,
    accept: String,
    held: Held,
}

impl Gate {
    pub fn new(
        server: &ServerConfig,
        session_ttl: Duration,
        tokens: Arc<TokenService>,
        store: Arc<Store>,
        sockets: Sockets,
        hubs: Hubs,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gate {
            settings: Settings {
                allowed_origins: server.allowed_origins.clone(),
                max_per_session: server.max_connections_per_session,
                limits_users: store.user_limit().limits_connections(),
                session_ttl,
                handshake_timeout: Duration::from_millis(server.handshake_timeout_ms),
                io_buffer: server.io_buffer_bytes,
                ping_interval: Duration::from_millis(server.ping_interval_ms),
                pong_timeout: Duration::from_millis(server.pong_timeout_ms),
            },
            tokens,
            store,
            sockets,
            hubs,
            metrics,
        }
    }

    /// Runs the checks for a request on `route`; on success returns the
    /// `101` and leaves a task serving the socket.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        route: Arc<Route>,
        rest: String,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ApiError> {
        let result = self.admit_and_hand_over(req, &route, &rest, peer).await;
        let label = match &result {
            Ok(_) => "accepted",
            Err(e) => e.code,
        };
        self.metrics
            .upgrades
            .get_or_create(&RouteResultLabel {
                route: route.name.clone(),
                result: label,
            })
            .inc();
        result
    }

    async fn admit_and_hand_over(
        &self,
        mut req: Request<Incoming>,
        route: &Arc<Route>,
        rest: &str,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ApiError> {
        // 1. A real upgrade.
        let accept = upgrade::check(&req)?;
        // Taken now (it does not consume the request head we still read); it
        // resolves only after our 101 is written.
        let on_upgrade = hyper::upgrade::on(&mut req);
        // 2. Origin.
        if let Some(origin) = req.headers().get(http::header::ORIGIN) {
            if !upgrade::origin_allowed(&self.settings.allowed_origins, origin) {
                return Err(ApiError::origin_not_allowed());
            }
        }
        // 3. Token.
        let query = req.uri().query();
        let token = credentials::for_upgrade(req.headers(), query)
            .ok_or_else(|| ApiError::token(TokenError::Missing, StatusCode::FORBIDDEN))?;
        let claims = self
            .tokens
            .verify(token)
            .map_err(|e| ApiError::token(e, StatusCode::FORBIDDEN))?;
        // 4 + 5. Session and per-session limit, atomically in the store.
        let conn_id = connection_id();
        let attach = self
            .store
            .attach(LeaseRequest {
                session_id: &claims.sid,
                conn_id: &conn_id,
                max_per_session: self.settings.max_per_session,
                session_ttl: self.settings.session_ttl,
            })
            .await?;
        let record = match attach {
            Attach::Attached(r) => r,
            Attach::NotFound => return Err(ApiError::session_ended(StatusCode::FORBIDDEN)),
            Attach::Full => return Err(ApiError::too_many_connections(FULL_RETRY_AFTER_SECS)),
        };
        // From here on the lease is given back when it drops (see `Lease`).
        let mut lease = self.sockets.lease(claims.sid.clone(), conn_id.clone());
        // 5. Gateway-wide limit (local to this instance): checked before the
        // user's, which costs a store round trip.
        let Some(slot) = self.sockets.try_reserve() else {
            return Err(ApiError::too_many_connections(FULL_RETRY_AFTER_SECS));
        };
        // 5. Per-user limit, on every instance. Taken after the session's
        // lease because the user comes from the session the store holds.
        if self.settings.limits_users {
            lease.hold_user_slot(record.user.clone());
            let user = self
                .store
                .attach_user(UserLease {
                    user: &record.user,
                    conn_id: &conn_id,
                    session_ttl: self.settings.session_ttl,
                })
                .await?;
            if user == UserAttach::Full {
                lease.no_user_slot();
                return Err(ApiError::too_many_connections(FULL_RETRY_AFTER_SECS));
            }
        }
        // 6. Dial, and hand the socket over.
        let admitted = Admitted {
            route,
            rest,
            query,
            offered: upgrade::offered_protocols(req.headers()),
            // Shared routes strip it: hubs and viewports decode messages
            // with tungstenite, which has no deflate.
            deflate_offer: matches!(route.mode, Mode::Exclusive)
                .then(|| upgrade::deflate_offer(req.headers()))
                .flatten(),
            headers: upgrade::forwarded_headers(req.headers(), &claims, peer),
            claims,
            record,
            conn_id,
            deadline: tokio::time::Instant::now() + self.settings.handshake_timeout,
            accept,
            held: Held {
                slot,
                lease,
                active: None,
            },
        };
        match route.mode {
            Mode::Shared => self.shared(on_upgrade, admitted).await,
            Mode::Exclusive => self.exclusive(on_upgrade, admitted).await,
        }
    }

    /// Exclusive routes: one runtime socket per client socket, relayed as
    /// bytes.
    async fn exclusive(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        mut a: Admitted<'_>,
    ) -> Result<Response<Body>, ApiError> {
        let Some((index, dialled)) = dial_route(&a).await else {
            return Err(ApiError::upstream_unavailable());
        };
        let close_rx =
            self.sockets
                .registry()
                .register_socket(&a.claims.sid, &a.conn_id, a.record.expires_at);
        let deflate = dialled.extensions.is_some();
        let resp = upgrade::switching_protocols(
            a.accept,
            dialled.protocol.clone(),
            &a.offered,
            dialled.extensions.clone(),
        );
        let cfg = RelayConfig {
            max_message: a.route.max_message_bytes,
            io_buffer: self.settings.io_buffer,
            ping_interval: self.settings.ping_interval,
            pong_timeout: self.settings.pong_timeout,
        };
        // Until hyper hands the client socket over, the task holds what the
        // relay will need; after, only the relay. `then` keeps the two stages
        // in one place of the task's memory instead of side by side: an idle
        // socket costs the larger of the two (BENCHMARKS.md, RSS per
        // connection).
        let Dialled {
            stream: upstream,
            early: upstream_early,
            ..
        } = dialled;
        let socket = on_upgrade.then(move |upgraded| {
            let client = match upgraded.map(client_io) {
                Ok(Some(c)) => c,
                _ => return Either::Right(std::future::ready(Outcome::Dropped)),
            };
            let (client, client_early) = client;
            let early = (client_early, upstream_early);
            // Each pairing is its own relay instance. The plain pair stays
            // inline in the task (the zero-buffer path, as small as before);
            // a pair with a TLS side is boxed beside rustls' own buffers.
            match (client, upstream) {
                (Either::Left(c), Io::Left(u)) => Either::Left(Either::Left(relay::relay(
                    Pair::new(c, u, early, deflate),
                    cfg,
                    close_rx,
                ))),
                (Either::Left(c), Io::Right(u)) => Either::Left(Either::Right(
                    relay::relay(Pair::new(c, upstream_tls(u), early, deflate), cfg, close_rx)
                        .boxed(),
                )),
                (Either::Right(c), Io::Left(u)) => Either::Left(Either::Right(
                    relay::relay(Pair::new(c, u, early, deflate), cfg, close_rx).boxed(),
                )),
                (Either::Right(c), Io::Right(u)) => Either::Left(Either::Right(
                    relay::relay(Pair::new(c, upstream_tls(u), early, deflate), cfg, close_rx)
                        .boxed(),
                )),
            }
        });
        // Hold the least-connections count while the socket lives.
        a.held.active = Some(Active::new(a.route.clone(), index));
        self.sockets
            .spawn(socket.map(Outcome::gateway_code), a.held);
        Ok(resp)
    }
}

/// The client's side of an upgraded connection, by what the listener
/// accepted it as, with the bytes hyper had already read past the request.
fn client_io(up: hyper::upgrade::Upgraded) -> Option<(Either<TcpStream, TlsIo>, bytes::Bytes)> {
    match up.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some((Either::Left(parts.io.into_inner()), parts.read_buf)),
        Err(up) => {
            let parts = up
                .downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>()
                .ok()?;
            let (tcp, conn) = parts.io.into_inner().into_inner();
            Some((Either::Right(TlsIo::new(tcp, conn)), parts.read_buf))
        }
    }
}

/// A dialled `wss://` runtime as the relay drives it.
fn upstream_tls(tls: Box<tokio_rustls::client::TlsStream<TcpStream>>) -> TlsIo {
    let (tcp, conn) = (*tls).into_inner();
    TlsIo::new(tcp, conn)
}

/// Tries the route's upstreams in balance order, each at most once, until
/// one completes its handshake or the deadline passes.
async fn dial_route(a: &Admitted<'_>) -> Option<(usize, Dialled)> {
    let route = a.route;
    for i in route.pool.order(&a.claims.sid) {
        let url = route.upstream_url(&route.pool.get(i).url, a.rest, a.query);
        let req = UpstreamRequest {
            url: &url,
            headers: &a.headers,
            protocols: a.offered.others.clone(),
            extensions: a.deflate_offer.clone(),
            tls: route.tls.clone(),
        };
        match tokio::time::timeout_at(a.deadline, dial(req)).await {
            Ok(Ok(d)) => {
                route.pool.mark_up(i);
                return Some((i, d));
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.name, upstream = %route.pool.get(i).url, error = %e, "upstream dial failed");
                route.pool.mark_down(i);
            }
            Err(_) => {
                tracing::warn!(route = %route.name, upstream = %route.pool.get(i).url, "upstream dial timed out");
                route.pool.mark_down(i);
                return None;
            }
        }
    }
    None
}
