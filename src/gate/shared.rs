//! The last step of the gate for `mode = "shared"` routes: find or create
//! the session's hub (dialling the runtime only for a new hub), attach a
//! viewport, and answer `101` with its role and sequence position.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::registry::Slot;
use super::upgrade::{self, Offered};
use super::{Lease, dial_route};
use crate::app::App;
use crate::error::{ApiError, Body};
use crate::routing::Route;
use crate::telemetry::CloseLabel;
use crate::token::Claims;

const ROLE: HeaderName = HeaderName::from_static("portcullis-role");
const SEQ: HeaderName = HeaderName::from_static("portcullis-seq");
const RESUME: HeaderName = HeaderName::from_static("portcullis-resume");

pub struct Attach<'a> {
    pub route: &'a Arc<Route>,
    pub rest: &'a str,
    pub query: Option<&'a str>,
    pub claims: &'a Claims,
    pub conn_id: &'a str,
    pub expires_at: i64,
    pub offered: &'a Offered,
    pub headers: http::HeaderMap,
    pub deadline: tokio::time::Instant,
    pub accept: String,
}

fn resume_from(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|p| p.strip_prefix("resume_from="))
    else {
        return Ok(None);
    };
    raw.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::bad_request("resume_from must be a non-negative integer"))
}

pub async fn attach(
    app: &Arc<App>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    ctx: Attach<'_>,
    slot: Slot,
    lease: Lease,
) -> Result<Response<Body>, ApiError> {
    let resume = resume_from(ctx.query)?;
    let mut on_upgrade = Some(on_upgrade);
    // A hub can end between lookup and attach; then take the fresh one.
    for _ in 0..2 {
        let hub = app.hubs.get_or_create(&ctx.claims.sid, ctx.route);
        let dialled = hub
            .connect(app, ctx.expires_at, || async {
                dial_route(
                    ctx.route,
                    ctx.rest,
                    ctx.query,
                    ctx.claims,
                    ctx.headers.clone(),
                    ctx.offered,
                    ctx.deadline,
                )
                .await
                .map(|(_, d)| d)
            })
            .await;
        if dialled.is_err() {
            // The hub stays registered without a runtime link: the next
            // viewport retries the dial on this same hub, so two attempts
            // can never end up with two runtime connections. Linkless hubs
            // nobody retries are pruned by the sweep.
            return Err(ApiError::upstream_unavailable());
        }
        let id = hub.new_viewport_id();
        let (start, handle) = {
            let mut ring = hub.ring();
            if ring.closed.is_some() {
                continue;
            }
            ring.attach(id, resume)
        };
        hub.viewports_changed();

        let close_rx = app
            .registry
            .register(&ctx.claims.sid, ctx.conn_id, ctx.expires_at);
        let protocol = hub
            .protocol()
            .filter(|p| {
                let p = p.to_str().unwrap_or("");
                ctx.offered
                    .others
                    .as_deref()
                    .unwrap_or("")
                    .split(',')
                    .any(|o| o.trim() == p)
            })
            .or_else(|| {
                ctx.offered
                    .bearer
                    .then(|| HeaderValue::from_static("bearer"))
            });
        let mut resp = upgrade::switching_protocols(ctx.accept.clone(), protocol);
        let h = resp.headers_mut();
        h.insert(
            ROLE,
            HeaderValue::from_static(if start.owner { "owner" } else { "reader" }),
        );
        h.insert(SEQ, HeaderValue::from(start.seq));
        if let Some(ok) = start.resume_ok {
            h.insert(
                RESUME,
                HeaderValue::from_static(if ok { "ok" } else { "gap" }),
            );
        }

        let on_upgrade = on_upgrade.take().expect("taken only on the returning path");
        let max = ctx.route.max_message_bytes as usize;
        let cfg = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(max + 64 * 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let task_app = app.clone();
        app.shutdown.spawn(async move {
            let app = task_app;
            let _slot = slot;
            app.metrics.open_sockets.inc();
            let code = match on_upgrade.await {
                Ok(up) => {
                    let ws =
                        WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg))
                            .await;
                    crate::hub::serve_viewport(hub, id, handle, ws, close_rx, app.shutdown.clone())
                        .await
                }
                Err(_) => {
                    if hub.ring().detach(id) == 0 {
                        hub.viewports_changed();
                    }
                    None
                }
            };
            if let Some(code) = code {
                app.metrics.closes.get_or_create(&CloseLabel { code }).inc();
            }
            app.metrics.open_sockets.dec();
            drop(lease);
        });
        return Ok(resp);
    }
    Err(ApiError::upstream_unavailable())
}
