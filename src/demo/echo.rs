//! The built-in echo runtime `portcullis demo` routes `/ws/echo` to.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// The demo route's default `max_message_bytes`.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Small: a demo echo holds a few sockets, each reading short chat lines.
const READ_BUFFER: usize = 4096;

/// Echoes every text and binary message back, until the listener's task is
/// dropped with the process.
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
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                    return;
                }
            }
        });
    }
}
