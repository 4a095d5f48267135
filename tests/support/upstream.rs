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

/// Something a runtime connection did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `later:` frame was sent.
    SentLater,
    /// `stream:` finished sending.
    Streamed,
    /// The gateway closed this connection with a close frame (code).
    ClosedBy(u16),
    /// The connection ended without a close frame.
    Dropped,
}

/// What one upstream connection looked like on arrival.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
}

/// An echo runtime with a few commands (text messages):
/// `close:<code>:<reason>` closes with that code; `die` drops the TCP
/// connection without a close frame; `raw:<hex>` writes those bytes as-is;
/// `stream:<n>:<per_ms>` sends text frames "0".."n-1", `per_ms` frames per
/// millisecond-paced batch (0 = as fast as possible); `stream16k:<n>:<per_ms>` sends
/// n binary frames of 16 KiB, paced likewise; `later:<ms>:<text>` sends `text` after `ms`.
/// Every text message it receives is recorded; so is every close it sees.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    received: Arc<Mutex<Vec<String>>>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
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
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let received = Arc::new(Mutex::new(Vec::new()));
        let received2 = received.clone();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                let tx = tx.clone();
                let ev = ev_tx.clone();
                let received = received2.clone();
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
                    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
                    loop {
                        let msg = tokio::select! {
                            m = ws.next() => m,
                            Some(out) = out_rx.recv() => {
                                let is_later = out.is_text() && out.to_text().unwrap_or("").starts_with("\u{1}");
                                let out = if is_later { Message::text(&out.to_text().unwrap()[1..]) } else { out };
                                if ws.send(out).await.is_err() {
                                    let _ = ev.send(Event::Dropped).await;
                                    return;
                                }
                                if is_later {
                                    let _ = ev.send(Event::SentLater).await;
                                }
                                continue;
                            }
                        };
                        let Some(Ok(msg)) = msg else {
                            let _ = ev.send(Event::Dropped).await;
                            return;
                        };
                        if let Message::Text(t) = &msg {
                            received.lock().unwrap().push(t.to_string());
                        }
                        match msg {
                            Message::Close(f) => {
                                let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                                let _ = ev.send(Event::ClosedBy(code)).await;
                                // Flush tungstenite's queued close reply (the
                                // inherent `close` would send a second close).
                                let _ = SinkExt::close(&mut ws).await;
                                return;
                            }
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
                            Message::Text(t) if t.starts_with("stream:") => {
                                let mut parts = t.split(':').skip(1);
                                let n: u64 = parts.next().unwrap().parse().unwrap();
                                let per_ms: u64 = parts.next().map_or(0, |p| p.parse().unwrap());
                                for i in 0..n {
                                    if ws.send(Message::text(i.to_string())).await.is_err() {
                                        return;
                                    }
                                    if per_ms > 0 && i % per_ms == per_ms - 1 {
                                        tokio::time::sleep(Duration::from_millis(1)).await;
                                    }
                                }
                                let _ = ev.send(Event::Streamed).await;
                            }
                            Message::Text(t) if t.starts_with("stream16k:") => {
                                let mut parts = t[10..].split(':');
                                let n: u64 = parts.next().unwrap().parse().unwrap();
                                let per_ms: u64 = parts.next().map_or(0, |p| p.parse().unwrap());
                                let block = vec![0x5au8; 16 * 1024];
                                for i in 0..n {
                                    if ws.send(Message::binary(block.clone())).await.is_err() {
                                        let _ = ev.send(Event::Dropped).await;
                                        return;
                                    }
                                    if per_ms > 0 && i % per_ms == per_ms - 1 {
                                        tokio::time::sleep(Duration::from_millis(1)).await;
                                    }
                                }
                                let _ = ev.send(Event::Streamed).await;
                            }
                            Message::Text(t) if t.starts_with("later:") => {
                                let mut parts = t.splitn(3, ':').skip(1);
                                let ms: u64 = parts.next().unwrap().parse().unwrap();
                                let text = format!("\u{1}{}", parts.next().unwrap_or(""));
                                let out = out_tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                    let _ = out.send(Message::text(text)).await;
                                });
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
            received,
            events: tokio::sync::Mutex::new(ev_rx),
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

    /// Text messages received so far, over all connections.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// The next connection event, within `within`.
    pub async fn next_event(&self, within: Duration) -> Event {
        tokio::time::timeout(within, self.events.lock().await.recv())
            .await
            .unwrap_or_else(|_| panic!("no upstream event within {within:?}"))
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
