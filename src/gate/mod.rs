//! The WebSocket gate (SPEC §6): the ordered checks an upgrade must pass
//! before any upstream is dialled, then the hand-over to the relay.
//!
//! 1. a valid WebSocket upgrade → else `426 upgrade_required`
//! 2. `Origin` allowed → else `403 origin_not_allowed`
//! 3. a token that verifies → else `403 missing_token|invalid_token|token_expired`
//! 4. a live session (one atomic store call that also takes the socket's
//!    lease and slides the TTL) → else `403 session_not_found` / `503`
//! 5. limits → else `503 too_many_connections`
//! 6. an upstream that completes its handshake → else `502 upstream_unavailable`
//!
//! Only then does the client get its `101`.

pub mod maintenance;
pub mod registry;
pub mod release;
mod shared;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::app::App;
use crate::config::Mode;
use crate::error::{ApiError, Body};
use crate::http::credentials;
use crate::ids::connection_id;
use crate::proxy::dial::{Dialled, UpstreamRequest, dial};
use crate::proxy::relay::{self, Ended, Pair, RelayConfig};
use crate::routing::Route;
use crate::session::{Attach, LeaseRequest, SessionStore};
use crate::telemetry::{CloseLabel, RouteResultLabel};
use crate::token::Claims;

/// Retry-After for a full gateway or session: sockets come and go quickly.
pub(crate) const FULL_RETRY_AFTER_SECS: u64 = 1;
/// How long releasing a lease may take after a socket closes.
pub(crate) const DETACH_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the checks for a request on `route`; on success returns the `101`
/// and leaves a task relaying the socket.
pub async fn handle(
    app: &Arc<App>,
    req: Request<Incoming>,
    route: Arc<Route>,
    rest: String,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let result = gate(app, req, &route, &rest, peer).await;
    let label = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code,
    };
    app.metrics
        .upgrades
        .get_or_create(&RouteResultLabel {
            route: route.name.clone(),
            result: label,
        })
        .inc();
    result
}

async fn gate(
    app: &Arc<App>,
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
        if !upgrade::origin_allowed(&app.config.server.allowed_origins, origin) {
            return Err(ApiError::origin_not_allowed());
        }
    }
    // 3. Token.
    let query = req.uri().query();
    let token = credentials::for_upgrade(req.headers(), query)
        .ok_or_else(|| ApiError::token(crate::token::TokenError::Missing, StatusCode::FORBIDDEN))?;
    let claims = app
        .tokens
        .verify(token)
        .map_err(|e| ApiError::token(e, StatusCode::FORBIDDEN))?;
    // 4 + 5. Session and per-session limit, atomically in the store.
    let conn_id = connection_id();
    let server = &app.config.server;
    let attach = app
        .store
        .attach(LeaseRequest {
            session_id: &claims.sid,
            conn_id: &conn_id,
            lease: maintenance::LEASE,
            max_per_session: server.max_connections_per_session,
            session_ttl: Duration::from_secs(app.config.sessions.ttl_secs),
        })
        .await
        .map_err(|e| crate::http::api::store_error(app, &e))?;
    let record = match attach {
        Attach::Attached(r) => r,
        Attach::NotFound => return Err(ApiError::session_ended(StatusCode::FORBIDDEN)),
        Attach::Full => return Err(ApiError::too_many_connections(FULL_RETRY_AFTER_SECS)),
    };
    // From here on the lease is given back when `lease` drops: on a
    // refusal, when hyper drops this future because the client hung up
    // mid-dial, or when the socket task ends.
    let lease = Lease {
        app: app.clone(),
        sid: claims.sid.clone(),
        conn_id: conn_id.clone(),
    };
    // 5. Gateway-wide limit (local to this instance).
    let slot = match app.registry.try_reserve() {
        Some(slot) if !app.shutdown.is_begun() => slot,
        _ => return Err(ApiError::too_many_connections(FULL_RETRY_AFTER_SECS)),
    };
    // 6. Dial.
    let offered = upgrade::offered_protocols(req.headers());
    let headers = upgrade::forwarded_headers(req.headers(), &claims, peer);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(server.handshake_timeout_ms);
    if route.mode == Mode::Shared {
        let ctx = shared::Attach {
            route,
            rest,
            query,
            claims: &claims,
            conn_id: &conn_id,
            expires_at: record.expires_at,
            offered: &offered,
            headers,
            deadline,
            accept,
        };
        return shared::attach(app, on_upgrade, ctx, slot, lease).await;
    }
    let Some((index, dialled)) =
        dial_route(route, rest, query, &claims, headers, &offered, deadline).await
    else {
        return Err(ApiError::upstream_unavailable());
    };

    let close_rx = app
        .registry
        .register(&claims.sid, &conn_id, record.expires_at);
    let protocol = dialled
        .protocol
        .clone()
        .or_else(|| offered.bearer.then(|| HeaderValue::from_static("bearer")));
    let cfg = RelayConfig {
        max_message: route.max_message_bytes,
        io_buffer: server.io_buffer_bytes,
        ping_interval: Duration::from_millis(server.ping_interval_ms),
        pong_timeout: Duration::from_millis(server.pong_timeout_ms),
    };
    // Until hyper hands the client socket over, the task holds what the relay
    // will need; after, only the relay. `then` keeps the two stages in one
    // place of the task's memory instead of side by side: an idle socket
    // costs the larger of the two (BENCHMARKS.md, RSS per connection).
    let Dialled {
        stream: upstream,
        early: upstream_early,
        ..
    } = dialled;
    let socket = on_upgrade.then(move |upgraded| {
        match upgraded.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => {
                let pair = Pair {
                    client: parts.io.into_inner(),
                    client_early: parts.read_buf,
                    upstream,
                    upstream_early,
                };
                Either::Left(relay::relay(pair, cfg, close_rx))
            }
            _ => Either::Right(std::future::ready(Ended::Dropped)),
        }
    });
    // Hold the slot and the least-connections count while the socket lives.
    let active = Active::new(route.clone(), index);
    app.metrics.open_sockets.inc();
    let task_app = app.clone();
    // A combinator, not an `async` block: a block awaiting `socket` would
    // store it twice (the captured value and the awaited one).
    app.shutdown.spawn(socket.map(move |ended| {
        if let Ended::Gateway(code) = ended {
            task_app
                .metrics
                .closes
                .get_or_create(&CloseLabel { code })
                .inc();
        }
        task_app.metrics.open_sockets.dec();
        drop(active);
        drop(slot);
        drop(lease);
    }));
    Ok(upgrade::switching_protocols(accept, protocol))
}

/// A socket counted on its upstream (least-connections balancing) while it
/// lives.
struct Active(Arc<Route>, usize);

impl Active {
    fn new(route: Arc<Route>, index: usize) -> Self {
        route.pool.enter(index);
        Active(route, index)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.pool.leave(self.1);
    }
}

/// A socket's store lease and registry entry, released when dropped.
pub(crate) struct Lease {
    app: Arc<App>,
    sid: String,
    conn_id: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.app.registry.unregister(&self.sid, &self.conn_id);
        release::Releases::push(
            &self.app,
            std::mem::take(&mut self.sid),
            std::mem::take(&mut self.conn_id),
        );
    }
}

/// Tries the route's upstreams in balance order, each at most once, until
/// one completes its handshake or the deadline passes.
pub(crate) async fn dial_route(
    route: &Route,
    rest: &str,
    query: Option<&str>,
    claims: &Claims,
    headers: http::HeaderMap,
    offered: &upgrade::Offered,
    deadline: tokio::time::Instant,
) -> Option<(usize, Dialled)> {
    for i in route.pool.order(&claims.sid) {
        let url = route.upstream_url(&route.pool.get(i).url, rest, query);
        let req = UpstreamRequest {
            url: &url,
            headers: &headers,
            protocols: offered.others.clone(),
        };
        match tokio::time::timeout_at(deadline, dial(req)).await {
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

pub(crate) fn response_101() -> Response<Body> {
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp
}
