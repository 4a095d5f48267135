//! The built-in echo runtime `portcullis demo` routes `/ws/echo` to.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// The demo route's default `max_message_bytes`.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Small: a demo echo holds a few sockets, each reading short chat lines.
const READ_BUFFER: usize = 4096;

/// A text message `/count <n>` is answered with `n` numbered lines, one
/// every [`COUNT_EVERY`], so the page has a stream to reload in the middle
/// of (at most [`COUNT_MAX`]).
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);
const COUNT_MAX: u32 = 10_000;

/// Echoes every text and binary message back, until the listener's task is
/// dropped with the process; `/count <n>` streams lines instead.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: a demo need not do better than retry.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let cfg = crate::proxy::ws_config(MAX_MESSAGE, READ_BUFFER);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(cfg)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let count = msg
                    .to_text()
                    .ok()
                    .and_then(|t| t.strip_prefix("/count "))
                    .and_then(|n| n.trim().parse::<u32>().ok());
                if let Some(n) = count {
                    // The one socket is busy while it streams: a demo
                    // runtime, not a server.
                    for i in 1..=n.min(COUNT_MAX) {
                        tokio::time::sleep(COUNT_EVERY).await;
                        if ws
                            .send(Message::text(format!("line {i} of {n}")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    continue;
                }
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                    return;
                }
            }
        });
    }
}
