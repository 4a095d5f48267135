//! The hand-over for `mode = "shared"` routes: attach a viewport to the
//! session's hub (which dials the runtime only for a new hub) and answer
//! `101` with its role and sequence position (SPEC §7).

use http::{HeaderName, HeaderValue, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{Admitted, Gate, dial_route, upgrade};
use crate::error::{ApiError, Body};
use crate::hub::{AttachError, Viewport};

const ROLE: HeaderName = HeaderName::from_static("portcullis-role");
const SEQ: HeaderName = HeaderName::from_static("portcullis-seq");
const RESUME: HeaderName = HeaderName::from_static("portcullis-resume");

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

impl Gate {
    /// Check 6 on a shared route: the session's hub, dialled only when
    /// none is live.
    pub(super) async fn join_hub(&self, a: &Admitted<'_>) -> Result<Viewport, ApiError> {
        let resume = resume_from(a.query)?;
        self.hubs
            .attach(
                &a.claims.sid,
                a.route,
                a.record.expires_at,
                resume,
                a.deadline,
                || async { dial_route(a).await.map(|(_, d)| d) },
            )
            .await
            .map_err(|e| match e {
                AttachError::Upstream => ApiError::upstream_unavailable(),
                AttachError::Store(e) => ApiError::from(e),
            })
    }

    /// The `101` with the viewport's role and sequence position, and the
    /// task that serves it.
    pub(super) fn shared(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        accept: String,
        a: Admitted<'_>,
        viewport: Viewport,
    ) -> Response<Body> {
        let close_rx =
            self.sockets
                .registry()
                .register_socket(&a.claims.sid, &a.conn_id, a.record.expires_at);
        let start = viewport.start();
        let mut resp = upgrade::switching_protocols(accept, viewport.protocol(), &a.offered, None);
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

        let cfg =
            crate::proxy::ws_config(a.route.max_message_bytes as usize, self.hubs.read_buffer());
        let shutdown = self.sockets.shutdown().clone();
        let browser = a.browser;
        let socket = async move {
            // A client that hangs up before the upgrade completes drops the
            // viewport here, which detaches it.
            let up = on_upgrade.await.ok()?;
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
            viewport.serve(ws, close_rx, shutdown, browser).await
        };
        self.sockets.spawn(socket, a.held);
        resp
    }
}
