//! Real WebSocket runtimes on port 0 that record what reached them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What one upstream connection looked like on arrival.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
}

/// An echo runtime with a few commands (text messages):
/// `close:<code>:<reason>` closes with that code; `die` drops the TCP
/// connection without a close frame; `raw:<hex>` writes those bytes as-is.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrivals: tokio::sync::Mutex<mpsc::Receiver<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_with_protocol(None).await
    }

    /// `protocol`: the subprotocol this runtime picks when offered.
    pub async fn start_with_protocol(protocol: Option<&'static str>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(1024);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut record = None;
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let cb = |req: &Request, mut resp: Response| {
                        record = Some(Seen {
                            path: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        if let Some(p) = protocol {
                            let offered = req
                                .headers()
                                .get("sec-websocket-protocol")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            if offered.split(',').any(|o| o.trim() == p) {
                                resp.headers_mut()
                                    .insert("sec-websocket-protocol", p.parse().unwrap());
                            }
                        }
                        Ok(resp)
                    };
                    let cfg = WebSocketConfig::default()
                        .max_message_size(Some(64 << 20))
                        .max_frame_size(Some(64 << 20));
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_hdr_async_with_config(stream, cb, Some(cfg))
                            .await
                    else {
                        return;
                    };
                    if let Some(r) = record {
                        seen.lock().unwrap().push(r.clone());
                        let _ = tx.send(r).await;
                    }
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(t) if t.starts_with("close:") => {
                                let mut parts = t.splitn(3, ':').skip(1);
                                let code: u16 = parts.next().unwrap().parse().unwrap();
                                let reason = parts.next().unwrap_or("").to_string();
                                let _ = ws
                                    .close(Some(CloseFrame {
                                        code: code.into(),
                                        reason: reason.into(),
                                    }))
                                    .await;
                                // Finish the handshake: read until the peer's close.
                                while let Some(Ok(_)) = ws.next().await {}
                                return;
                            }
                            Message::Text(t) if t.as_str() == "die" => return,
                            Message::Text(t) if t.starts_with("raw:") => {
                                let bytes = hex(&t[4..]);
                                let _ = ws.get_mut().write_all(&bytes).await;
                            }
                            Message::Text(_) | Message::Binary(_) => {
                                let sent = ws.send(msg).await;
                                if sent.is_err() {
                                    return;
                                }
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            arrivals: tokio::sync::Mutex::new(rx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connections that completed a handshake so far.
    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The next connection to arrive, within a bound.
    pub async fn next_arrival(&self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.arrivals.lock().await.recv())
            .await
            .expect("no upstream connection arrived")
            .unwrap()
    }

    /// Stops accepting: the port refuses connections from now on.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
