//! Shared sessions (SPEC §7): one runtime connection per (session, route),
//! and the viewports that watch it.
//!
//! One [`Hub`] per (session, route) owns the only upstream connection. Its
//! frames are numbered into a bounded replay [`ring::Ring`]; each viewport
//! task sends them to its client from its own cursor, so a slow viewport
//! never slows the upstream or the others — it falls behind the ring and is
//! closed `1013`. The owner's frames go upstream through a small bounded
//! channel (backpressure, as in exclusive mode).

mod interrupts;
pub mod ring;
mod viewport;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::sync::{Notify, OnceCell, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::proxy::dial::Dialled;
use crate::routing::Route;
use crate::session::{SessionStore, Store};
use crate::sockets::close::{self, Close};
use crate::sockets::{CloseRx, HubId, Sockets};
use interrupts::Interrupts;
use ring::Ring;

pub use viewport::{ClientWs, Viewport};

/// Owner frames queued towards the runtime before the owner is slowed.
const UPSTREAM_QUEUE: usize = 16;
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How a hub ended, as its viewports are told after delivering what the
/// ring holds. Unlike [`Close`], the reason may be the runtime's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubClose {
    pub code: u16,
    pub reason: Cow<'static, str>,
}

impl From<Close> for HubClose {
    fn from(c: Close) -> Self {
        HubClose {
            code: c.code,
            reason: Cow::Borrowed(c.reason),
        }
    }
}

/// The hub's link to its runtime, set once the dial succeeded.
struct Link {
    tx: mpsc::Sender<Message>,
    protocol: Option<HeaderValue>,
}

/// Hub ids are unique per process (see [`HubId`]).
static NEXT_HUB: AtomicU64 = AtomicU64::new(1);

pub struct Hub {
    session_id: String,
    route: Arc<Route>,
    /// This hub's registry entry.
    id: HubId,
    ring: Mutex<Ring>,
    /// Bumped on every new frame and on the end, to wake viewports.
    wake: watch::Sender<u64>,
    link: OnceCell<Link>,
    next_viewport: AtomicU64,
    viewports_changed: Notify,
    created: std::time::Instant,
}

impl Hub {
    fn new(session_id: &str, route: Arc<Route>) -> Hub {
        let ring = Ring::new(route.replay_frames, route.replay_bytes);
        Hub {
            session_id: session_id.to_string(),
            route,
            id: HubId(NEXT_HUB.fetch_add(1, Ordering::Relaxed)),
            ring: Mutex::new(ring),
            wake: watch::channel(0).0,
            link: OnceCell::new(),
            next_viewport: AtomicU64::new(1),
            viewports_changed: Notify::new(),
            created: std::time::Instant::now(),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_ended(&self) -> bool {
        self.ring().is_closed()
    }

    /// Sends an owner frame upstream; waits while the runtime is slow.
    async fn send_upstream(&self, m: Message) -> Result<(), ()> {
        let link = self.link.get().ok_or(())?;
        link.tx.send(m).await.map_err(|_| ())
    }

    /// The subprotocol the runtime chose when the hub dialled it.
    fn protocol(&self) -> Option<HeaderValue> {
        self.link.get().and_then(|l| l.protocol.clone())
    }

    /// Dials the runtime once per hub; concurrent first viewports share the
    /// one dial. `dial` runs only if no link exists yet.
    async fn connect<F, Fut>(self: &Arc<Self>, hubs: &Hubs, expires_at: i64, dial: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        self.link
            .get_or_try_init(|| async {
                let d = dial().await.ok_or(())?;
                let cfg = crate::proxy::ws_config(
                    self.route.max_message_bytes as usize,
                    hubs.0.read_buffer,
                );
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
                let sockets = &hubs.0.sockets;
                let close_rx =
                    sockets
                        .registry()
                        .register_hub(&self.session_id, self.id, expires_at);
                sockets
                    .shutdown()
                    .spawn(run(self.clone(), hubs.clone(), ws, rx, close_rx));
                Ok::<_, ()>(Link {
                    tx,
                    protocol: d.protocol,
                })
            })
            .await
            .is_ok()
    }

    /// Attaches a viewport where `resume_from` asks (SPEC §7); `None` when
    /// the hub has ended meanwhile.
    fn attach(self: &Arc<Self>, resume_from: Option<u64>) -> Option<Viewport> {
        let id = self.next_viewport.fetch_add(1, Ordering::Relaxed);
        let (start, handle) = self.ring().attach(id, resume_from)?;
        self.viewports_changed.notify_one();
        Some(Viewport::new(self.clone(), id, start, handle))
    }

    /// A viewport left; the hub's grace clock starts when it was the last.
    fn detach(&self, viewport: u64) {
        if self.ring().detach(viewport) == 0 {
            self.viewports_changed.notify_one();
        }
    }
}

/// Live hubs by (session, route). Cheap to clone: one shared table.
#[derive(Clone)]
pub struct Hubs(Arc<HubsInner>);

struct HubsInner {
    map: Mutex<HashMap<(String, String), Arc<Hub>>>,
    sockets: Sockets,
    /// For `mark_idle` when a hub's grace runs out.
    store: Arc<Store>,
    /// Read buffer of each hub's runtime socket and each viewport.
    read_buffer: usize,
}

impl Hubs {
    pub fn new(sockets: Sockets, store: Arc<Store>, read_buffer: usize) -> Self {
        Hubs(Arc::new(HubsInner {
            map: Mutex::new(HashMap::new()),
            sockets,
            store,
            read_buffer,
        }))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Hub>>> {
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read buffer for a viewport's client socket.
    pub fn read_buffer(&self) -> usize {
        self.0.read_buffer
    }

    /// Attaches a viewport to the session's hub on `route`, creating the
    /// hub and dialling its runtime with `dial` when no live one exists.
    /// `None` when the runtime could not be dialled.
    ///
    /// A hub whose dial failed stays registered without a runtime link: the
    /// next viewport retries the dial on this same hub, so two attempts can
    /// never end up with two runtime connections. Linkless hubs nobody
    /// retries are pruned by [`Hubs::prune_unlinked`].
    pub async fn attach<F, Fut>(
        &self,
        session_id: &str,
        route: &Arc<Route>,
        expires_at: i64,
        resume_from: Option<u64>,
        dial: F,
    ) -> Option<Viewport>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        // A hub can end between lookup and attach; then take the fresh one.
        for _ in 0..2 {
            let hub = self.get_or_create(session_id, route);
            if !hub.connect(self, expires_at, &dial).await {
                return None;
            }
            if let Some(viewport) = hub.attach(resume_from) {
                return Some(viewport);
            }
        }
        None
    }

    /// The live hub for this session and route, or a new one. An ended hub
    /// is never handed out again.
    fn get_or_create(&self, session_id: &str, route: &Arc<Route>) -> Arc<Hub> {
        let mut map = self.map();
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
    fn remove(&self, hub: &Arc<Hub>) {
        let mut map = self.map();
        let key = (hub.session_id.clone(), hub.route.name.clone());
        if map.get(&key).is_some_and(|h| Arc::ptr_eq(h, hub)) {
            map.remove(&key);
        }
    }

    /// Forgets hubs whose runtime dial failed and that nobody retried for
    /// `older_than`: their sessions may never come back.
    pub fn prune_unlinked(&self, older_than: Duration) {
        self.map()
            .retain(|_, h| h.link.get().is_some() || h.created.elapsed() < older_than);
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a hub's task stopped.
#[derive(Debug)]
enum Stop {
    /// The runtime closed (with this code) or vanished: nothing more is
    /// sent to it.
    Runtime(HubClose),
    /// The gateway ends the hub (revocation, expiry, shutdown, a runtime
    /// message over the limit) and tells the runtime so.
    Gateway(HubClose),
    /// No viewport for the whole detach grace: the runtime is closed `1001`
    /// and the session is no longer `DETACHED`.
    Unattended,
}

impl Stop {
    /// What the viewports are told once they have delivered the ring.
    fn close(&self) -> HubClose {
        match self {
            Stop::Runtime(c) | Stop::Gateway(c) => c.clone(),
            Stop::Unattended => close::GOING_AWAY.into(),
        }
    }

    /// The close frame for the runtime, unless the runtime closed first.
    fn runtime_frame(&self) -> Option<CloseFrame> {
        match self {
            Stop::Runtime(_) => None,
            Stop::Gateway(_) | Stop::Unattended => {
                let c = self.close();
                Some(CloseFrame {
                    code: CloseCode::from(c.code),
                    reason: c.reason.into_owned().into(),
                })
            }
        }
    }
}

/// Whether any viewport is attached, and since when none is.
#[derive(Debug, Clone, Copy)]
enum Attachment {
    Attached,
    Detached { since: Instant },
}

impl Attachment {
    fn update(self, has_viewports: bool) -> Self {
        match (self, has_viewports) {
            (_, true) => Attachment::Attached,
            (Attachment::Attached, false) => Attachment::Detached {
                since: Instant::now(),
            },
            (detached, false) => detached,
        }
    }

    /// Resolves when the detach grace has run out; never while attached.
    async fn grace_over(self, grace: Duration) {
        match self {
            Attachment::Attached => std::future::pending().await,
            Attachment::Detached { since } => tokio::time::sleep_until(since + grace).await,
        }
    }
}

/// A runtime frame's effect on the hub: numbered into the ring, ignored
/// (control frames tungstenite answers itself), or the end.
fn from_runtime(hub: &Hub, m: Option<Result<Message, WsError>>) -> Option<Stop> {
    match m {
        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
            let seq = {
                let mut ring = hub.ring();
                ring.push(m);
                ring.next_seq()
            };
            hub.wake.send_replace(seq);
            None
        }
        Some(Ok(Message::Close(f))) => Some(Stop::Runtime(match f {
            Some(f) => HubClose {
                code: u16::from(f.code),
                reason: Cow::Owned(f.reason.to_string()),
            },
            None => close::NORMAL.into(),
        })),
        Some(Ok(_)) => None,
        Some(Err(WsError::Capacity(_))) => Some(Stop::Gateway(close::TOO_BIG.into())),
        None | Some(Err(_)) => Some(Stop::Runtime(close::UPSTREAM_GONE.into())),
    }
}

/// The hub's own task: reads the runtime into the ring, writes owner frames
/// to it, and ends the hub on runtime close, revocation, shutdown or when the
/// detach grace runs out.
async fn run(
    hub: Arc<Hub>,
    hubs: Hubs,
    ws: WebSocketStream<crate::proxy::dial::UpstreamIo>,
    rx: mpsc::Receiver<Message>,
    close_rx: CloseRx,
) {
    let (sink, mut stream) = ws.split();
    let (stop_tx, stop_rx) = oneshot::channel();
    let writer = tokio::spawn(write_upstream(sink, rx, stop_rx));
    let grace = Duration::from_secs(hub.route.detach_grace_secs);
    let mut interrupts = Interrupts::new(close_rx, hubs.0.sockets.shutdown().clone());
    let mut attachment = Attachment::Attached;
    let stop = loop {
        attachment = attachment.update(hub.ring().has_viewports());
        tokio::select! {
            m = stream.next() => if let Some(stop) = from_runtime(&hub, m) { break stop },
            c = interrupts.next() => break Stop::Gateway(c.into()),
            _ = hub.viewports_changed.notified() => {}
            _ = attachment.grace_over(grace) => {
                if hub.ring().close_if_unattended(close::GOING_AWAY.into()) {
                    break Stop::Unattended;
                }
            }
        }
    };
    // Never hand this hub out again, then let viewports drain and close.
    hub.ring().close(stop.close());
    hubs.remove(&hub);
    hub.wake.send_modify(|v| *v = v.wrapping_add(1));
    let _ = stop_tx.send(stop.runtime_frame());
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_WAIT * 2, &mut writer)
        .await
        .is_err()
    {
        // Never leave a task (and the runtime's socket) behind.
        writer.abort();
    }
    hubs.0
        .sockets
        .registry()
        .unregister_hub(&hub.session_id, hub.id);
    if matches!(stop, Stop::Unattended) {
        // No viewport and no runtime connection any more: not DETACHED.
        let _ = tokio::time::timeout(CLOSE_WAIT, hubs.0.store.mark_idle(&hub.session_id)).await;
    }
    tracing::info!(session = %hub.session_id, route = %hub.route.name, code = stop.close().code, "hub ended");
}

/// Sends owner frames to the runtime in order. `stop` ends it at once, even
/// mid-send to a runtime that stopped reading, with our close frame (or
/// none when the runtime closed first: then `close` flushes the reply
/// tungstenite queued).
async fn write_upstream(
    mut sink: futures_util::stream::SplitSink<
        WebSocketStream<crate::proxy::dial::UpstreamIo>,
        Message,
    >,
    mut rx: mpsc::Receiver<Message>,
    mut stop: oneshot::Receiver<Option<CloseFrame>>,
) {
    let frame = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    tokio::select! {
                        r = sink.send(m) => if r.is_err() { return; },
                        f = &mut stop => break f.ok().flatten(),
                    }
                }
                None => break None,
            },
            f = &mut stop => break f.ok().flatten(),
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(f) = frame {
            sink.send(Message::Close(Some(f))).await?;
        }
        sink.close().await
    })
    .await;
}
