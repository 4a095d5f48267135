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
//! With `portcullis=v1` in the query (SPEC §9), a refusal at checks 3–6 is
//! a `101` and an immediate close `4000 + status` with a JSON reason
//! instead, since a browser cannot read a refused handshake; an accepted
//! socket opens with the gateway's `portcullis.hello`.
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
use crate::hub::{Hubs, Viewport};
use crate::ids::connection_id;
use crate::proxy::dial::{Dialled, UpstreamRequest, dial};
use crate::proxy::relay::{self, Outcome, Pair, RelayConfig};
use crate::proxy::tls_io::TlsIo;
use crate::routing::Route;
use crate::session::{
    Attach, LeaseRequest, SessionRecord, SessionStore, Store, UserAttach, UserLease,
};
use crate::sockets::close::{refusal, refusal_reason};
use crate::sockets::contract;
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
    /// The client asked for the browser contract (SPEC §9).
    browser: bool,
    held: Held,
}

/// A request that passed checks 1-6, before its `101`.
enum Ready<'a> {
    Exclusive(Admitted<'a>, usize, Dialled),
    Shared(Admitted<'a>, Viewport),
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
        let browser = upgrade::browser_contract(req.uri().query());
        match self.admit(&req, route, rest, peer, browser).await {
            Ok(Ready::Exclusive(a, index, dialled)) => {
                Ok(self.exclusive(on_upgrade, accept, a, index, dialled))
            }
            Ok(Ready::Shared(a, viewport)) => Ok(self.shared(on_upgrade, accept, a, viewport)),
            // SPEC §9: a browser cannot read a refused handshake, so checks
            // 3-6 are told in band to a client that asked for it.
            Err(e) if browser && upgrade::told_in_band(&e) => {
                let offered = upgrade::offered_protocols(req.headers());
                Ok(refuse_in_band(on_upgrade, accept, &offered, e))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks 3-6: token, session, limits, runtime. Nothing is dialled
    /// before 3-5 pass.
    async fn admit<'a>(
        &self,
        req: &'a Request<Incoming>,
        route: &'a Arc<Route>,
        rest: &'a str,
        peer: SocketAddr,
        browser: bool,
    ) -> Result<Ready<'a>, ApiError> {
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
        // 6. Dial (or join the session's hub).
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
            browser,
            held: Held {
                slot,
                lease,
                active: None,
            },
        };
        match route.mode {
            Mode::Shared => {
                let viewport = self.join_hub(&admitted).await?;
                Ok(Ready::Shared(admitted, viewport))
            }
            Mode::Exclusive => {
                let Some((index, dialled)) = dial_route(&admitted).await else {
                    return Err(ApiError::upstream_unavailable());
                };
                Ok(Ready::Exclusive(admitted, index, dialled))
            }
        }
    }

    /// Exclusive routes: one runtime socket per client socket, relayed as
    /// bytes.
    fn exclusive(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        accept: String,
        mut a: Admitted<'_>,
        index: usize,
        dialled: Dialled,
    ) -> Response<Body> {
        let close_rx =
            self.sockets
                .registry()
                .register_socket(&a.claims.sid, &a.conn_id, a.record.expires_at);
        let deflate = dialled.extensions.is_some();
        let resp = upgrade::switching_protocols(
            accept,
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
        let hello = a
            .browser
            .then(|| contract::hello(&a.claims.sid, None).into_boxed_str());
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
                    Pair::new(c, u, early, deflate).with_hello(hello),
                    cfg,
                    close_rx,
                ))),
                (Either::Left(c), Io::Right(u)) => Either::Left(Either::Right(
                    relay::relay(
                        Pair::new(c, upstream_tls(u), early, deflate).with_hello(hello),
                        cfg,
                        close_rx,
                    )
                    .boxed(),
                )),
                (Either::Right(c), Io::Left(u)) => Either::Left(Either::Right(
                    relay::relay(
                        Pair::new(c, u, early, deflate).with_hello(hello),
                        cfg,
                        close_rx,
                    )
                    .boxed(),
                )),
                (Either::Right(c), Io::Right(u)) => Either::Left(Either::Right(
                    relay::relay(
                        Pair::new(c, upstream_tls(u), early, deflate).with_hello(hello),
                        cfg,
                        close_rx,
                    )
                    .boxed(),
                )),
            }
        });
        // Hold the least-connections count while the socket lives.
        a.held.active = Some(Active::new(a.route.clone(), index));
        self.sockets
            .spawn(socket.map(Outcome::gateway_code), a.held);
        resp
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

/// SPEC §9: the `101` of a refusal told in band, and one short task that
/// sends its close once hyper hands the socket over. The error rides along
/// in the response's extensions, so the HTTP layer still logs and counts
/// it as the refusal it is.
fn refuse_in_band(
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: String,
    offered: &upgrade::Offered,
    e: ApiError,
) -> Response<Body> {
    let code = refusal(e.status.as_u16());
    let reason = refusal_reason(e.code, e.retry_after);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            relay::refuse(TokioIo::new(up), code, &reason).await;
        }
    });
    let mut resp = upgrade::switching_protocols(accept, None, offered, None);
    resp.extensions_mut().insert(e);
    resp
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
