//! The HTTP edge: dispatch by path to the session API, the probes, the demo
//! page, or the WebSocket gate of a route.

pub mod api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::app::App;
use crate::error::{ApiError, Body, Fault, json_response};
use crate::telemetry::{EndpointLabel, FaultLabel, Metrics, redact_target};

/// Serves one request. Never fails: every refusal is a JSON response.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    // A refcounted copy; the redacted string is built only if debug logging
    // is on (tracing evaluates field values lazily), not on every upgrade.
    let uri = req.uri().clone();
    // Arrival, before any check: at trace only, for telling a request that
    // hangs in a handler from one that never arrived.
    tracing::trace!(
        %method,
        target = %redact_target(uri.path(), uri.query()),
        %peer,
        "request received"
    );
    let (endpoint, result) = dispatch(&app, req, peer).await;
    let resp = match result {
        Ok(resp) => {
            // SPEC §9: a refusal told in band after a `101` is still one.
            if let Some(e) = resp.extensions().get::<ApiError>() {
                refused(&app.metrics, endpoint, e);
            }
            resp
        }
        Err(e) => {
            refused(&app.metrics, endpoint, &e);
            e.into_response()
        }
    };
    app.metrics
        .request_duration
        .get_or_create(&EndpointLabel { endpoint })
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(
        %method,
        target = %redact_target(uri.path(), uri.query()),
        status = resp.status().as_u16(),
        endpoint,
        "request"
    );
    resp
}

/// Counts and logs a refusal, once, at the level its fault calls for.
fn refused(metrics: &Metrics, endpoint: &'static str, e: &ApiError) {
    if e.fault == Fault::Store {
        metrics.store_errors.inc();
    }
    metrics
        .refusals
        .get_or_create(&FaultLabel {
            fault: e.fault.as_str(),
        })
        .inc();
    let cause = e.cause.as_deref().unwrap_or("");
    match e.log_level() {
        tracing::Level::WARN => {
            tracing::warn!(
                endpoint,
                error = e.code,
                status = e.status.as_u16(),
                cause,
                "refused"
            )
        }
        tracing::Level::INFO => {
            tracing::info!(
                endpoint,
                error = e.code,
                status = e.status.as_u16(),
                cause,
                "refused"
            )
        }
        _ => tracing::debug!(
            endpoint,
            error = e.code,
            status = e.status.as_u16(),
            cause,
            "refused"
        ),
    }
}

/// The JavaScript client of SPEC §9 (`clients/js/`), served so a page on
/// any origin allowed to open sockets can load the version that matches
/// this gateway.
const CLIENT_JS: &str = include_str!("../../clients/js/portcullis.js");

fn client_module() -> Response<Body> {
    let mut resp = Response::new(Body::from(CLIENT_JS));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    resp
}

fn only(req: &Request<Incoming>, method: Method, allow: &'static str) -> Result<(), ApiError> {
    if req.method() == method || (method == Method::GET && req.method() == Method::HEAD) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(allow))
    }
}

async fn dispatch(
    app: &Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/api/auth/login" => (
            "login",
            async {
                only(&req, Method::POST, "POST")?;
                api::login(app, req, peer).await
            }
            .await,
        ),
        "/api/auth/logout" => (
            "logout",
            async {
                only(&req, Method::POST, "POST")?;
                api::logout(app, req).await
            }
            .await,
        ),
        "/api/auth/refresh" => (
            "refresh",
            async {
                only(&req, Method::POST, "POST")?;
                api::refresh(app, req).await
            }
            .await,
        ),
        "/api/session/create" => (
            "session_create",
            async {
                only(&req, Method::POST, "POST")?;
                api::create_session(app, req).await
            }
            .await,
        ),
        "/healthz" => (
            "healthz",
            only(&req, Method::GET, "GET")
                .map(|()| json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))),
        ),
        "/readyz" => (
            "readyz",
            match only(&req, Method::GET, "GET") {
                Ok(()) => Ok(api::readyz(&app.store, &app.metrics).await),
                Err(e) => Err(e),
            },
        ),
        "/metrics" => (
            "metrics",
            only(&req, Method::GET, "GET")
                .map(|()| api::metrics(&app.metrics, req.headers().get(header::ACCEPT))),
        ),
        "/.well-known/jwks.json" => (
            "jwks",
            only(&req, Method::GET, "GET").and_then(|()| api::jwks(&app.tokens)),
        ),
        "/portcullis.js" => (
            "client",
            only(&req, Method::GET, "GET").map(|()| client_module()),
        ),
        "/" if app.demo_page.is_some() => (
            "demo",
            only(&req, Method::GET, "GET").map(|()| {
                let mut resp = Response::new(Body::from(app.demo_page.clone().unwrap_or_default()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                resp
            }),
        ),
        p => match p.strip_prefix("/api/session/") {
            Some(id) if !id.contains('/') => {
                let id = id.to_string();
                let r = match *req.method() {
                    Method::GET => api::get_session(app, req, &id).await,
                    Method::DELETE => api::delete_session(app, req, &id).await,
                    _ => Err(ApiError::method_not_allowed("GET, DELETE")),
                };
                ("session", r)
            }
            _ => match crate::routing::unsafe_path(p) {
                Some(why) => ("not_found", Err(ApiError::bad_request(why))),
                None => match app.routes.lookup(p) {
                    Some((route, rest)) => {
                        let (route, rest) = (route.clone(), rest.to_string());
                        ("upgrade", app.gate.handle(req, route, rest, peer).await)
                    }
                    None => ("not_found", Err(ApiError::not_found())),
                },
            },
        },
    }
}
