//! The hand-over for `mode = "shared"` routes: attach a viewport to the
//! session's hub (which dials the runtime only for a new hub) and answer
//! `101` with its role and sequence position (SPEC §7).

use http::{HeaderName, HeaderValue, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{Admitted, Gate, dial_route, upgrade};
use crate::error::{ApiError, Body};
use crate::hub::AttachError;

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
    pub(super) async fn shared(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        a: Admitted<'_>,
    ) -> Result<Response<Body>, ApiError> {
        let resume = resume_from(a.query)?;
        let viewport = self
            .hubs
            .attach(
                &a.claims.sid,
                a.route,
                a.record.expires_at,
                resume,
                a.deadline,
                || async { dial_route(&a).await.map(|(_, d)| d) },
            )
            .await
            .map_err(|e| match e {
                AttachError::Upstream => ApiError::upstream_unavailable(),
                AttachError::Store(e) => ApiError::from(e),
            })?;

        let close_rx =
            self.sockets
                .registry()
                .register_socket(&a.claims.sid, &a.conn_id, a.record.expires_at);
        let start = viewport.start();
        let mut resp =
            upgrade::switching_protocols(a.accept, viewport.protocol(), &a.offered, None);
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
        let socket = async move {
            // A client that hangs up before the upgrade completes drops the
            // viewport here, which detaches it.
            let up = on_upgrade.await.ok()?;
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
            viewport.serve(ws, close_rx, shutdown).await
        };
        self.sockets.spawn(socket, a.held);
        Ok(resp)
    }
}
