//! One viewport: a client socket that receives every frame of its hub from
//! its own cursor and, while it owns the session, writes to the runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::Hub;
use super::ring::{Next, ViewportHandle};
use crate::proxy::relay::CloseCmd;
use crate::shutdown::Shutdown;

/// Frames taken from the ring per lock.
const BATCH: usize = 64;
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A lagging viewport's close frame waits this long behind what its client
/// has not read yet, so a reader that resumes still learns why.
const LAG_CLOSE_WAIT: Duration = Duration::from_secs(5);
const NOT_OWNED: &str =
    r#"{"type":"error","code":"session_not_owned","message":"Session is owned by another client"}"#;

pub type ClientWs = WebSocketStream<TokioIo<Upgraded>>;

#[derive(Debug)]
enum End {
    Close(u16, String, Duration),
    /// The client left or its socket failed: nothing to say to it.
    Gone,
}

fn close(cmd: CloseCmd) -> End {
    End::Close(cmd.code, cmd.reason.to_string(), CLOSE_WAIT)
}

/// Serves one viewport until it or its hub ends. Returns the close code
/// sent to the client, if any.
pub async fn serve(
    hub: Arc<Hub>,
    id: u64,
    handle: ViewportHandle,
    mut ws: ClientWs,
    mut revoked: oneshot::Receiver<CloseCmd>,
    shutdown: Shutdown,
) -> Option<u16> {
    let mut wake = hub.wake.subscribe();
    let mut cursor = handle.cursor.load(Ordering::Acquire);
    let mut revoked_open = true;
    let lag = || End::Close(1013, "try_again_later".into(), LAG_CLOSE_WAIT);
    let end = 'outer: loop {
        let next = hub.ring().next_for(cursor, BATCH);
        match next {
            Next::Lagged => break lag(),
            Next::Closed(e) => break End::Close(e.code, e.reason, CLOSE_WAIT),
            Next::Send(batch) => {
                let n = batch.len() as u64;
                let send = async {
                    for m in batch {
                        ws.feed(m).await?;
                    }
                    ws.flush().await
                };
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => {
                            if r.is_err() { break 'outer End::Gone; }
                            break;
                        }
                        _ = handle.lagged.notified() => {
                            // A stale wake-up is possible; only a real gap counts.
                            if matches!(hub.ring().next_for(cursor, 0), Next::Lagged) {
                                break 'outer lag();
                            }
                        }
                        cmd = &mut revoked, if revoked_open => {
                            revoked_open = false;
                            if let Ok(cmd) = cmd { break 'outer close(cmd); }
                        }
                        _ = shutdown.begun() => break 'outer close(crate::proxy::relay::GOING_AWAY),
                    }
                }
                cursor += n;
                handle.cursor.store(cursor, Ordering::Release);
                continue;
            }
            Next::Wait => {}
        }
        tokio::select! {
            _ = wake.changed() => {}
            m = ws.next() => match m {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    // Both waits below depend on a peer (a slow runtime, a
                    // reader that writes but never reads): they stay
                    // interruptible by revocation and shutdown.
                    let owns = hub.ring().may_write(id);
                    let sent = tokio::select! {
                        r = async {
                            if owns {
                                hub.send_upstream(m).await.map_err(|()| close(crate::proxy::relay::UPSTREAM_GONE))
                            } else {
                                ws.send(Message::text(NOT_OWNED)).await.map_err(|_| End::Gone)
                            }
                        } => r,
                        cmd = &mut revoked, if revoked_open => {
                            revoked_open = false;
                            Err(close(cmd.unwrap_or(crate::proxy::relay::GOING_AWAY)))
                        }
                        _ = shutdown.begun() => Err(close(crate::proxy::relay::GOING_AWAY)),
                    };
                    if let Err(end) = sent {
                        break end;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break End::Gone,
                Some(Ok(_)) => {}
                Some(Err(WsError::Capacity(_))) => break close(crate::proxy::relay::TOO_BIG),
                Some(Err(_)) => break End::Gone,
            },
            cmd = &mut revoked, if revoked_open => {
                revoked_open = false;
                if let Ok(cmd) = cmd { break close(cmd); }
            }
            _ = shutdown.begun() => break close(crate::proxy::relay::GOING_AWAY),
        }
    };
    tracing::debug!(session = %hub.session_id, viewport = id, ?end, "viewport ending");
    let remaining = hub.ring().detach(id);
    if remaining == 0 {
        hub.viewports_changed();
    }
    match end {
        End::Gone => {
            // `SinkExt::close` flushes the close reply tungstenite queued
            // when the client's close arrived; the inherent `close` would
            // try to send a new close frame and fail.
            let _ = tokio::time::timeout(CLOSE_WAIT, SinkExt::close(&mut ws)).await;
            None
        }
        End::Close(code, reason, wait) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = tokio::time::timeout(wait, async {
                ws.close(Some(frame)).await?;
                // Wait for the client's close reply (or its hang-up).
                while let Some(Ok(_)) = ws.next().await {}
                Ok::<_, WsError>(())
            })
            .await;
            Some(code)
        }
    }
}
