//! Shared sessions (SPEC §7): the session is the thing, a socket is a
//! viewport onto it.
//!
//! One [`Hub`] per (session, route) owns the only upstream connection. Its
//! frames are numbered into a bounded replay [`ring::Ring`]; each viewport
//! task sends them to its client from its own cursor, so a slow viewport
//! never slows the upstream or the others — it falls behind the ring and is
//! closed `1013`. The owner's frames go upstream through a small bounded
//! channel (backpressure, as in exclusive mode).

pub mod ring;
mod viewport;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::sync::{Notify, OnceCell, mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::app::App;
use crate::proxy::dial::Dialled;
use crate::proxy::relay::CloseCmd;
use crate::routing::Route;
use crate::session::SessionStore;
use ring::Ring;

pub use viewport::serve as serve_viewport;

/// Owner frames queued towards the runtime before the owner is slowed.
const UPSTREAM_QUEUE: usize = 16;
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a hub ended; viewports deliver what the ring holds, then close so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub code: u16,
    pub reason: String,
}

impl From<CloseCmd> for Ending {
    fn from(c: CloseCmd) -> Self {
        Ending {
            code: c.code,
            reason: c.reason.to_string(),
        }
    }
}

/// The hub's link to its runtime, set once the dial succeeded.
pub struct Link {
    tx: mpsc::Sender<Message>,
    pub protocol: Option<HeaderValue>,
}

pub struct Hub {
    pub session_id: String,
    pub route: Arc<Route>,
    pub ring: Mutex<Ring>,
    /// Bumped on every new frame and on the end, to wake viewports.
    wake: watch::Sender<u64>,
    link: OnceCell<Link>,
    next_viewport: AtomicU64,
    viewports_changed: Notify,
    /// This hub's registry entry; unique per hub, so an old hub's teardown
    /// can never unregister its successor.
    watcher_id: String,
    created: std::time::Instant,
}

impl Hub {
    fn new(session_id: &str, route: Arc<Route>) -> Hub {
        let watcher_id = format!(
            "{}{}:{}",
            crate::gate::registry::UNLEASED_PREFIX,
            route.name,
            crate::ids::random_id()
        );
        let ring = Ring::new(route.replay_frames, route.replay_bytes);
        Hub {
            session_id: session_id.to_string(),
            route,
            ring: Mutex::new(ring),
            wake: watch::channel(0).0,
            link: OnceCell::new(),
            next_viewport: AtomicU64::new(1),
            viewports_changed: Notify::new(),
            watcher_id,
            created: std::time::Instant::now(),
        }
    }

    pub fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_ended(&self) -> bool {
        self.ring().closed.is_some()
    }

    pub fn new_viewport_id(&self) -> u64 {
        self.next_viewport.fetch_add(1, Ordering::Relaxed)
    }

    pub fn viewports_changed(&self) {
        self.viewports_changed.notify_one();
    }

    /// Sends an owner frame upstream; waits while the runtime is slow.
    pub async fn send_upstream(&self, m: Message) -> Result<(), ()> {
        let link = self.link.get().ok_or(())?;
        link.tx.send(m).await.map_err(|_| ())
    }

    pub fn protocol(&self) -> Option<HeaderValue> {
        self.link.get().and_then(|l| l.protocol.clone())
    }

    /// Dials the runtime once per hub; concurrent first viewports share the
    /// one dial. `dial` runs only if no link exists yet.
    pub async fn connect<F, Fut>(
        self: &Arc<Self>,
        app: &Arc<App>,
        expires_at: i64,
        dial: F,
    ) -> Result<(), ()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        self.link
            .get_or_try_init(|| async {
                let d = dial().await.ok_or(())?;
                let max = self.route.max_message_bytes as usize;
                let cfg = WebSocketConfig::default()
                    .read_buffer_size(16 * 1024)
                    .write_buffer_size(0)
                    .max_write_buffer_size(max + 64 * 1024)
                    .max_message_size(Some(max))
                    .max_frame_size(Some(max));
                let ws = WebSocketStream::from_partially_read(
                    d.stream,
                    d.early.to_vec(),
                    Role::Client,
                    Some(cfg),
                )
                .await;
                let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE);
                // The hub watches its session like a socket does, so
                // revocation, expiry and the sweep end it too.
                let close_rx = app.registry.register_unleased(
                    &self.session_id,
                    self.hub_conn_id(),
                    expires_at,
                );
                let hub = self.clone();
                let task_app = app.clone();
                app.shutdown
                    .spawn(async move { run(hub, task_app, ws, rx, close_rx).await });
                Ok(Link {
                    tx,
                    protocol: d.protocol,
                })
            })
            .await
            .map(|_| ())
    }

    fn hub_conn_id(&self) -> &str {
        &self.watcher_id
    }
}

/// Live hubs by (session, route).
#[derive(Default)]
pub struct Hubs {
    map: Mutex<HashMap<(String, String), Arc<Hub>>>,
}

impl Hubs {
    /// The live hub for this session and route, or a new one. An ended hub
    /// is never handed out again.
    pub fn get_or_create(&self, session_id: &str, route: &Arc<Route>) -> Arc<Hub> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (session_id.to_string(), route.name.clone());
        match map.get(&key) {
            Some(h) if !h.is_ended() => h.clone(),
            _ => {
                let h = Arc::new(Hub::new(session_id, route.clone()));
                map.insert(key, h.clone());
                h
            }
        }
    }

    /// Forgets `hub` if it is still the one registered for its key.
    pub fn remove(&self, hub: &Arc<Hub>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (hub.session_id.clone(), hub.route.name.clone());
        if map.get(&key).is_some_and(|h| Arc::ptr_eq(h, hub)) {
            map.remove(&key);
        }
    }

    /// Forgets hubs whose runtime dial failed and that nobody retried for
    /// `older_than`: their sessions may never come back.
    pub fn prune_unlinked(&self, older_than: Duration) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, h| h.link.get().is_some() || h.created.elapsed() < older_than);
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The hub's own task: reads the runtime into the ring, writes owner frames
/// to it, and ends the hub on runtime close, revocation, shutdown or when the
/// detach grace runs out.
async fn run(
    hub: Arc<Hub>,
    app: Arc<App>,
    ws: WebSocketStream<tokio::net::TcpStream>,
    mut rx: mpsc::Receiver<Message>,
    mut close_rx: oneshot::Receiver<CloseCmd>,
) {
    let (mut sink, mut stream) = ws.split();
    // The writer sends owner frames in order. `stop` ends it at once, even
    // mid-send to a runtime that stopped reading, with our close frame (or
    // none when the runtime closed first: then `close` flushes the reply
    // tungstenite queued).
    let (stop_tx, mut stop_rx) = oneshot::channel::<Option<CloseFrame>>();
    let writer = tokio::spawn(async move {
        let frame = loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        tokio::select! {
                            r = sink.send(m) => if r.is_err() { return; },
                            f = &mut stop_rx => break f.ok().flatten(),
                        }
                    }
                    None => break None,
                },
                f = &mut stop_rx => break f.ok().flatten(),
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if let Some(f) = frame {
                sink.send(Message::Close(Some(f))).await?;
            }
            sink.close().await
        })
        .await;
    });
    let grace = Duration::from_secs(hub.route.detach_grace_secs);
    let mut detached_at: Option<tokio::time::Instant> = None;
    let mut grace_over = false;
    let mut runtime_closed = false;
    let mut close_rx_open = true;
    let ending: Ending = loop {
        if hub.ring().viewports.is_empty() {
            detached_at.get_or_insert_with(tokio::time::Instant::now);
        } else {
            detached_at = None;
        }
        let deadline = detached_at.map(|t| t + grace);
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    let seq = {
                        let mut ring = hub.ring();
                        ring.push(m);
                        ring.next_seq()
                    };
                    hub.wake.send_replace(seq);
                }
                Some(Ok(Message::Close(f))) => {
                    runtime_closed = true;
                    break match f {
                        Some(f) => Ending { code: u16::from(f.code), reason: f.reason.to_string() },
                        None => Ending { code: 1000, reason: String::new() },
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(WsError::Capacity(_))) => break CloseCmd { code: 1009, reason: "message_too_big" }.into(),
                None | Some(Err(_)) => {
                    runtime_closed = true;
                    break crate::proxy::relay::UPSTREAM_GONE.into();
                }
            },
            cmd = &mut close_rx, if close_rx_open => {
                close_rx_open = false;
                if let Ok(cmd) = cmd {
                    break cmd.into();
                }
            }
            _ = app.shutdown.begun() => break crate::proxy::relay::GOING_AWAY.into(),
            _ = hub.viewports_changed.notified() => {}
            _ = sleep_until_opt(deadline) => {
                // Decide under the ring lock a viewport attaches under, so an
                // attach racing the grace either keeps the hub or sees it closed.
                let mut ring = hub.ring();
                if !ring.viewports.is_empty() {
                    continue;
                }
                ring.closed = Some(crate::proxy::relay::GOING_AWAY.into());
                grace_over = true;
                break crate::proxy::relay::GOING_AWAY.into();
            }
        }
    };
    // Never hand this hub out again, then let viewports drain and close.
    hub.ring().closed = Some(ending.clone());
    app.hubs.remove(&hub);
    hub.wake.send_modify(|v| *v = v.wrapping_add(1));
    let frame = (!runtime_closed).then(|| CloseFrame {
        code: CloseCode::from(ending.code),
        reason: ending.reason.clone().into(),
    });
    let _ = stop_tx.send(frame);
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_WAIT * 2, &mut writer)
        .await
        .is_err()
    {
        // Never leave a task (and the runtime's socket) behind.
        writer.abort();
    }
    app.registry.unregister(&hub.session_id, hub.hub_conn_id());
    if grace_over {
        // No viewport and no runtime connection any more: not DETACHED.
        let _ = tokio::time::timeout(CLOSE_WAIT, app.store.mark_idle(&hub.session_id)).await;
    }
    tracing::info!(session = %hub.session_id, route = %hub.route.name, code = ending.code, "hub ended");
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
