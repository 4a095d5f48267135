//! Shared sessions (SPEC §7): one runtime connection per (session, route),
//! and the viewports that watch it.
//!
//! One [`Hub`] per (session, route) owns the only upstream connection. Its
//! frames are numbered into a bounded replay [`ring::Ring`]; each viewport
//! task sends them to its client from its own cursor, so a slow viewport
//! never slows the upstream or the others — it falls behind the ring and is
//! closed `1013`. The owner's frames go upstream through a small bounded
//! channel (backpressure, as in exclusive mode).
//!
//! On the Redis store a hub is one per (session, route) in the whole
//! deployment and other instances follow it through the store (see
//! [`remote`]); on the memory store everything stays in this process.

mod interrupts;
mod remote;
pub mod ring;
mod viewport;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::sync::{Notify, OnceCell, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::proxy::dial::Dialled;
use crate::routing::Route;
use crate::session::redis::fabric::{Fabric, Placement};
use crate::session::{SessionStore, Store, StoreError};
use crate::sockets::close::{self, Close};
use crate::sockets::{CloseRx, HubId, Sockets};
use interrupts::Interrupts;
use ring::Ring;

pub use viewport::{ClientWs, Viewport};

/// Owner frames queued towards the runtime before the owner is slowed.
const UPSTREAM_QUEUE: usize = 16;
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a resume on a mirror waits for frames still on their way.
const MIRROR_CATCH_UP: Duration = Duration::from_secs(2);

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

/// The hub's link to its runtime, set once the dial succeeded (or, for a
/// mirror, once the hub elsewhere was found).
enum Link {
    /// This instance holds the runtime connection.
    Runtime {
        tx: mpsc::Sender<Message>,
        protocol: Option<HeaderValue>,
    },
    /// Another instance does (SPEC §8): frames arrive through the store;
    /// the owner's go back through it, at most `credit` in flight.
    Remote {
        protocol: Option<HeaderValue>,
        credit: Semaphore,
    },
}

impl Link {
    fn protocol(&self) -> Option<HeaderValue> {
        match self {
            Link::Runtime { protocol, .. } | Link::Remote { protocol, .. } => protocol.clone(),
        }
    }
}

/// Why a viewport could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No runtime completed its handshake (`502 upstream_unavailable`).
    #[error("upstream unavailable")]
    Upstream,
    /// The store could not place the hub (`503`).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Hub ids are unique per process (see [`HubId`]).
static NEXT_HUB: AtomicU64 = AtomicU64::new(1);
/// Viewport ids are unique per process, so `<instance>/<id>` names one
/// viewport in the whole deployment (the store's owner).
static NEXT_VIEWPORT: AtomicU64 = AtomicU64::new(1);

pub struct Hub {
    session_id: String,
    route: Arc<Route>,
    /// This hub's registry entry.
    id: HubId,
    ring: Mutex<Ring>,
    /// Bumped on every new frame and on the end, to wake viewports.
    wake: watch::Sender<u64>,
    link: OnceCell<Link>,
    viewports_changed: Notify,
    created: std::time::Instant,
    /// Where viewports and ownership are counted across instances; `None`
    /// on the memory store.
    fabric: Option<Fabric>,
    /// The owning viewport's name ([`Hub::viewport_name`]), for the
    /// `portcullis.role` frames of SPEC §9. Follows the ring on the memory
    /// store, the store's owner key (read again on every owner-change
    /// message) on Redis.
    owner: watch::Sender<Option<String>>,
    /// Reads of the owner key issued, and the newest one applied: reads run
    /// concurrently (so a mirror never waits on one before its next
    /// frames), and an older answer never overwrites a newer one.
    owner_reads: AtomicU64,
    owner_applied: AtomicU64,
}

impl Hub {
    fn new(session_id: &str, route: Arc<Route>, fabric: Option<Fabric>) -> Hub {
        let ring = Ring::new(route.replay_frames, route.replay_bytes);
        Hub {
            session_id: session_id.to_string(),
            route,
            id: HubId(NEXT_HUB.fetch_add(1, Ordering::Relaxed)),
            ring: Mutex::new(ring),
            wake: watch::channel(0).0,
            link: OnceCell::new(),
            viewports_changed: Notify::new(),
            created: std::time::Instant::now(),
            fabric,
            owner: watch::channel(None).0,
            owner_reads: AtomicU64::new(0),
            owner_applied: AtomicU64::new(0),
        }
    }

    /// A viewport's name in [`Hub::owner`]: its name in the store on
    /// Redis, its local id otherwise.
    fn viewport_name(&self, viewport: u64) -> String {
        self.global_id(viewport)
            .unwrap_or_else(|| viewport.to_string())
    }

    fn set_owner(&self, owner: Option<String>) {
        self.owner.send_if_modified(|cur| {
            let changed = *cur != owner;
            *cur = owner;
            changed
        });
    }

    /// Memory store: the ring decides ownership; pass on what it says.
    fn ring_owner_changed(&self) {
        if self.fabric.is_none() {
            let owner = self.ring().owner();
            self.set_owner(owner.map(|o| o.to_string()));
        }
    }

    /// Redis store: reads who owns the session now (after an owner-change
    /// message, and once when the hub or mirror links).
    async fn refresh_owner(&self) {
        let Some(f) = &self.fabric else {
            return;
        };
        let ticket = self.owner_reads.fetch_add(1, Ordering::Relaxed) + 1;
        match f.owner(&self.session_id, &self.route.name).await {
            Ok(owner) => {
                self.owner.send_if_modified(|cur| {
                    // Checked under the watch's lock: answers apply in the
                    // order their reads were issued, stale ones not at all.
                    let newer = self.owner_applied.fetch_max(ticket, Ordering::Relaxed) < ticket;
                    let changed = newer && *cur != owner;
                    if changed {
                        *cur = owner;
                    }
                    changed
                });
            }
            Err(e) => {
                tracing::debug!(session = %self.session_id, error = %e, "owner not read")
            }
        }
    }

    /// [`Hub::refresh_owner`] in the background: the caller (a mirror's
    /// loop, the hub's remote-owner loop) goes on with its frames.
    fn refresh_owner_soon(self: &Arc<Self>) {
        let hub = self.clone();
        tokio::spawn(async move { hub.refresh_owner().await });
    }

    /// Redis store: this instance changed the owner; every instance with
    /// viewports of the session (this one included) reads it again. In the
    /// background: a role frame is news, not a gate on anything.
    fn owner_changed_in_store(&self) {
        if let Some(f) = self.fabric.clone() {
            let (sid, route) = (self.session_id.clone(), self.route.name.clone());
            tokio::spawn(async move {
                if let Err(e) = f.publish_owner_changed(&sid, &route).await {
                    tracing::debug!(session = %sid, error = %e, "owner change not published");
                }
            });
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_ended(&self) -> bool {
        self.ring().is_closed()
    }

    /// Sends an owner frame upstream; waits while the runtime is slow (or,
    /// from a mirror, while the hub has not acknowledged earlier frames).
    async fn send_upstream(&self, m: Message) -> Result<(), ()> {
        match self.link.get().ok_or(())? {
            Link::Runtime { tx, .. } => tx.send(m).await.map_err(|_| ()),
            Link::Remote { credit, .. } => {
                let fabric = self.fabric.as_ref().ok_or(())?;
                let frame = remote::to_frame(&m).ok_or(())?;
                credit.acquire().await.map_err(|_| ())?.forget();
                fabric
                    .publish_write(&self.session_id, &self.route.name, &frame)
                    .await
                    .map_err(|_| ())
            }
        }
    }

    /// The hub acknowledged `n` of this mirror's owner frames.
    fn credit(&self, n: usize) {
        if let Some(Link::Remote { credit, .. }) = self.link.get() {
            credit.add_permits(n.min(remote::CREDIT));
        }
    }

    /// A mirror ended: an owner waiting for credit gives up.
    fn close_credit(&self) {
        if let Some(Link::Remote { credit, .. }) = self.link.get() {
            credit.close();
        }
    }

    /// The subprotocol the runtime chose when the hub dialled it.
    fn protocol(&self) -> Option<HeaderValue> {
        self.link.get().and_then(Link::protocol)
    }

    /// This viewport's name in the store.
    fn global_id(&self, viewport: u64) -> Option<String> {
        self.fabric
            .as_ref()
            .map(|f| format!("{}/{viewport}", f.instance()))
    }

    /// Links the hub once: dials the runtime, or (on the Redis store)
    /// finds the hub another instance holds and follows it. Concurrent
    /// first viewports share the one link.
    async fn connect<F, Fut>(
        self: &Arc<Self>,
        hubs: &Hubs,
        expires_at: i64,
        deadline: Instant,
        dial: F,
    ) -> Result<(), AttachError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        self.link
            .get_or_try_init(|| async {
                match &self.fabric {
                    None => {
                        let d = dial().await.ok_or(AttachError::Upstream)?;
                        Ok(self.start_runtime(hubs, expires_at, d, None).await)
                    }
                    Some(fabric) => self.place(hubs, fabric, expires_at, deadline, dial).await,
                }
            })
            .await
            .map(|_| ())
    }

    /// Starts the hub's task on a dialled runtime.
    async fn start_runtime(
        self: &Arc<Self>,
        hubs: &Hubs,
        expires_at: i64,
        d: Dialled,
        shared: Option<(
            Fabric,
            crate::session::redis::fabric::Usage,
            crate::session::redis::fabric::Subscription,
        )>,
    ) -> Link {
        let cfg =
            crate::proxy::ws_config(self.route.max_message_bytes as usize, hubs.0.read_buffer);
        let ws = WebSocketStream::from_partially_read(
            d.stream,
            d.early.to_vec(),
            Role::Client,
            Some(cfg),
        )
        .await;
        let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE);
        let side = shared.map(|(fabric, usage, inbox)| {
            remote::HubSide::start(self, fabric, usage, inbox, tx.clone())
        });
        // The hub watches its session like a socket does, so
        // revocation, expiry and the sweep end it too.
        let sockets = &hubs.0.sockets;
        let close_rx = sockets
            .registry()
            .register_hub(&self.session_id, self.id, expires_at);
        sockets
            .shutdown()
            .spawn(run(self.clone(), hubs.clone(), ws, rx, close_rx, side));
        Link::Runtime {
            tx,
            protocol: d.protocol,
        }
    }

    /// SPEC §8: claims the hub in the store and dials, or follows the live
    /// hub of another instance, taking it over when that instance is dead.
    async fn place<F, Fut>(
        self: &Arc<Self>,
        hubs: &Hubs,
        fabric: &Fabric,
        expires_at: i64,
        deadline: Instant,
        dial: F,
    ) -> Result<Link, AttachError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        let (sid, route) = (self.session_id.as_str(), self.route.name.as_str());
        let usage = fabric.use_fabric();
        // Alive before claiming: no other instance may see this one's hub
        // without its liveness key.
        fabric.beat_now().await?;
        let mut dead: Option<String> = None;
        loop {
            let placement = fabric
                .claim_hub(sid, route, self.id.0, dead.as_deref())
                .await?;
            // Where the hub lives, never the stream's frames (runtime
            // payloads do not belong in a log line).
            match &placement {
                Placement::Mine { frames, next } => {
                    tracing::debug!(session = %sid, route = %route, kept = frames.len(), next, "hub claimed here");
                }
                Placement::Elsewhere {
                    instance, linked, ..
                } => {
                    tracing::debug!(session = %sid, route = %route, %instance, linked, "hub held elsewhere");
                }
            }
            match placement {
                Placement::Mine { frames, next } => {
                    let frames = frames
                        .into_iter()
                        .filter_map(|(seq, f)| remote::to_message(f).map(|m| (seq, m)));
                    self.ring().preload(frames, next);
                    let Some(d) = dial().await else {
                        let _ = fabric.release_hub(sid, route, self.id.0).await;
                        return Err(AttachError::Upstream);
                    };
                    // Listen for remote owners before any instance can
                    // find the hub linked and follow it.
                    let inbox = match fabric.subscribe(sid, route, false).await {
                        Ok(inbox) => inbox,
                        Err(e) => {
                            let _ = fabric.release_hub(sid, route, self.id.0).await;
                            return Err(e.into());
                        }
                    };
                    // Subscribed: every later owner change reaches us.
                    self.refresh_owner().await;
                    let protocol = d.protocol.as_ref().and_then(|p| p.to_str().ok());
                    if !fabric.link_hub(sid, route, self.id.0, protocol).await? {
                        // Taken over while dialling (this instance was
                        // thought dead): the runtime socket just closes.
                        return Err(AttachError::Upstream);
                    }
                    let shared = (fabric.clone(), usage, inbox);
                    let link = self.start_runtime(hubs, expires_at, d, Some(shared)).await;
                    return Ok(link);
                }
                Placement::Elsewhere {
                    instance,
                    linked,
                    protocol,
                } => {
                    if !fabric.is_alive(&instance).await? {
                        dead = Some(instance);
                        continue;
                    }
                    if !linked {
                        // Its dial is under way; wait for it, within ours.
                        if Instant::now() + remote::LINK_POLL >= deadline {
                            return Err(AttachError::Upstream);
                        }
                        tokio::time::sleep(remote::LINK_POLL).await;
                        continue;
                    }
                    return self
                        .follow(hubs, fabric, expires_at, instance, protocol, usage)
                        .await;
                }
            }
        }
    }

    /// Becomes a mirror of the hub `holder` holds.
    async fn follow(
        self: &Arc<Self>,
        hubs: &Hubs,
        fabric: &Fabric,
        expires_at: i64,
        holder: String,
        protocol: Option<String>,
        usage: crate::session::redis::fabric::Usage,
    ) -> Result<Link, AttachError> {
        let (sid, route) = (self.session_id.as_str(), self.route.name.as_str());
        // Subscribe first, then read the stream: nothing falls between.
        let outbox = fabric.subscribe(sid, route, true).await?;
        self.refresh_owner().await;
        let (frames, next) = fabric.frames_from(sid, route, 0).await?;
        let frames = frames
            .into_iter()
            .filter_map(|(seq, f)| remote::to_message(f).map(|m| (seq, m)));
        self.ring().preload(frames, next);
        let dead = fabric.watch_instance(&holder);
        let sockets = &hubs.0.sockets;
        let close_rx = sockets
            .registry()
            .register_hub(&self.session_id, self.id, expires_at);
        let mirror = remote::Mirror {
            fabric: fabric.clone(),
            outbox,
            dead,
            holder,
            usage,
        };
        sockets
            .shutdown()
            .spawn(remote::mirror(self.clone(), hubs.clone(), mirror, close_rx));
        Ok(Link::Remote {
            protocol: protocol.and_then(|p| HeaderValue::from_str(&p).ok()),
            credit: Semaphore::new(remote::CREDIT),
        })
    }

    /// Attaches a viewport where `resume_from` asks (SPEC §7); `None` when
    /// the hub has ended meanwhile. On the Redis store the role is decided
    /// there, across instances.
    async fn attach(
        self: &Arc<Self>,
        resume_from: Option<u64>,
    ) -> Result<Option<Viewport>, StoreError> {
        if let (Some(n), Some(Link::Remote { .. })) = (resume_from, self.link.get()) {
            self.catch_up_to(n).await;
        }
        let id = NEXT_VIEWPORT.fetch_add(1, Ordering::Relaxed);
        let owner = match (&self.fabric, self.global_id(id)) {
            (Some(f), Some(gid)) => {
                match f
                    .attach_viewport(&self.session_id, &self.route.name, &gid)
                    .await
                {
                    Ok(owner) => Some(owner),
                    Err(e) => {
                        // A mirror that never gets its first viewport must
                        // still end: let it look.
                        self.viewports_changed.notify_one();
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        // Subscribed before the ring decides, so no later change is missed.
        let owner_rx = self.owner.subscribe();
        let Some((start, handle)) = self.ring().attach(id, resume_from, owner) else {
            self.forget_viewport(id, owner == Some(true));
            return Ok(None);
        };
        if start.owner {
            self.ring_owner_changed();
            if owner.is_some() {
                self.owner_changed_in_store();
            }
        }
        self.viewports_changed.notify_one();
        Ok(Some(Viewport::new(
            self.clone(),
            id,
            start,
            handle,
            owner_rx,
        )))
    }

    /// A mirror trails its hub by a store round trip: a client that read
    /// frame `n - 1` from the hub's own instance and resumes here may be
    /// ahead of this ring. Waits (bounded) until the ring has reached `n`.
    async fn catch_up_to(&self, n: u64) {
        let mut wake = self.wake.subscribe();
        let _ = tokio::time::timeout(MIRROR_CATCH_UP, async {
            while self.ring().next_seq() < n && !self.is_ended() {
                if wake.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// A viewport left; the hub's grace clock starts when it was the last.
    /// Counted out of the store in the background.
    fn detach(&self, viewport: u64, owned: bool) {
        self.detach_here(viewport);
        self.forget_viewport(viewport, owned);
    }

    fn detach_here(&self, viewport: u64) {
        if self.ring().detach(viewport) == 0 {
            self.viewports_changed.notify_one();
        }
        self.ring_owner_changed();
    }

    /// [`Hub::detach`], waiting (bounded) until the store counted it out.
    async fn leave(&self, viewport: u64, owned: bool) {
        self.detach_here(viewport);
        if let (Some(f), Some(gid)) = (&self.fabric, self.global_id(viewport)) {
            let done = tokio::time::timeout(
                CLOSE_WAIT * 2,
                f.detach_viewport(&self.session_id, &self.route.name, &gid),
            )
            .await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::warn!(session = %self.session_id, "viewport not counted out of the store");
            }
            if owned {
                // This instance's viewports learn it before the leaving
                // client sees its close; the others through the message.
                self.refresh_owner().await;
                self.owner_changed_in_store();
            }
        }
    }

    /// Counts a viewport out of the store (and frees its ownership there,
    /// telling the others when it held it).
    fn forget_viewport(&self, viewport: u64, owned: bool) {
        if let (Some(f), Some(gid)) = (self.fabric.clone(), self.global_id(viewport)) {
            let (sid, route) = (self.session_id.clone(), self.route.name.clone());
            tokio::spawn(async move {
                if let Err(e) = f.detach_viewport(&sid, &route, &gid).await {
                    tracing::warn!(session = %sid, error = %e, "viewport not counted out of the store");
                }
                if owned && let Err(e) = f.publish_owner_changed(&sid, &route).await {
                    tracing::debug!(session = %sid, error = %e, "owner change not published");
                }
            });
        }
    }

    /// May viewport `id` write? On the Redis store ownership is claimed
    /// there, so one owner holds across instances.
    async fn may_write(&self, id: u64, owns: bool) -> Result<bool, StoreError> {
        match (&self.fabric, self.global_id(id)) {
            (Some(_), _) if owns => Ok(true),
            (Some(f), Some(gid)) => {
                let won = f
                    .claim_owner(&self.session_id, &self.route.name, &gid)
                    .await?;
                if won {
                    self.owner_changed_in_store();
                }
                Ok(won)
            }
            _ => {
                let may = self.ring().may_write(id);
                if may && !owns {
                    self.ring_owner_changed();
                }
                Ok(may)
            }
        }
    }
}

/// Live hubs by (session, route). Cheap to clone: one shared table.
#[derive(Clone)]
pub struct Hubs(Arc<HubsInner>);

struct HubsInner {
    map: Mutex<HashMap<(String, String), Arc<Hub>>>,
    sockets: Sockets,
    /// For `mark_idle` when a hub's grace runs out, and its fabric.
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
    /// hub and dialling its runtime with `dial` when no live one exists
    /// (on the Redis store: anywhere in the deployment).
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
        deadline: Instant,
        dial: F,
    ) -> Result<Viewport, AttachError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<Dialled>>,
    {
        // A hub can end between lookup and attach; then take the fresh one.
        for _ in 0..2 {
            let hub = self.get_or_create(session_id, route);
            hub.connect(self, expires_at, deadline, &dial).await?;
            if let Some(viewport) = hub.attach(resume_from).await? {
                return Ok(viewport);
            }
        }
        Err(AttachError::Upstream)
    }

    /// The live hub for this session and route, or a new one. An ended hub
    /// is never handed out again.
    fn get_or_create(&self, session_id: &str, route: &Arc<Route>) -> Arc<Hub> {
        let mut map = self.map();
        let key = (session_id.to_string(), route.name.clone());
        match map.get(&key) {
            Some(h) if !h.is_ended() => h.clone(),
            _ => {
                let fabric = self.0.store.fabric().cloned();
                let h = Arc::new(Hub::new(session_id, route.clone(), fabric));
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

/// Whether any viewport is attached here, and since when none is
/// (anywhere, as far as the last look at other instances went).
#[derive(Debug, Clone, Copy)]
enum Attachment {
    Attached,
    Detached { since: Instant, check_at: Instant },
}

/// While viewports of other instances exist, a hub without local ones
/// looks again this often.
const REMOTE_RECHECK: Duration = Duration::from_secs(1);

impl Attachment {
    fn update(self, has_viewports: bool, grace: Duration) -> Self {
        match (self, has_viewports) {
            (_, true) => Attachment::Attached,
            (Attachment::Attached, false) => {
                let since = Instant::now();
                Attachment::Detached {
                    since,
                    check_at: since + grace,
                }
            }
            (detached, false) => detached,
        }
    }

    /// Resolves when it is time to look whether the grace has run out;
    /// never while attached.
    async fn check_due(self) {
        match self {
            Attachment::Attached => std::future::pending().await,
            Attachment::Detached { check_at, .. } => tokio::time::sleep_until(check_at).await,
        }
    }

    /// After a look at other instances: `None` when the grace ran out with
    /// no viewport anywhere, else when to look again.
    fn after_check(self, remote: u32, grace: Duration) -> Option<Self> {
        let Attachment::Detached { since, .. } = self else {
            return Some(self);
        };
        let now = Instant::now();
        if remote > 0 {
            // Viewports elsewhere: the grace counts from when they leave.
            return Some(Attachment::Detached {
                since: now,
                check_at: now + REMOTE_RECHECK.min(grace),
            });
        }
        if now >= since + grace {
            None
        } else {
            Some(Attachment::Detached {
                since,
                check_at: since + grace,
            })
        }
    }
}

/// A runtime frame's effect on the hub: numbered into the ring (and the
/// shared stream), ignored (control frames tungstenite answers itself), or
/// the end.
fn from_runtime(
    hub: &Hub,
    side: Option<&remote::HubSide>,
    m: Option<Result<Message, WsError>>,
) -> Option<Stop> {
    match m {
        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
            let next = {
                let mut ring = hub.ring();
                let seq = ring.next_seq();
                if let Some(side) = side {
                    side.push(seq, &m);
                }
                ring.push(m);
                ring.next_seq()
            };
            hub.wake.send_replace(next);
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
    side: Option<(remote::HubSide, oneshot::Receiver<()>)>,
) {
    let (side, mut fenced) = side.unzip();
    let (sink, mut stream) = ws.split();
    let (stop_tx, stop_rx) = oneshot::channel();
    let writer = tokio::spawn(write_upstream(sink, rx, stop_rx));
    let grace = Duration::from_secs(hub.route.detach_grace_secs);
    let mut interrupts = Interrupts::new(close_rx, hubs.0.sockets.shutdown().clone());
    let mut attachment = Attachment::Attached;
    let stop = loop {
        attachment = attachment.update(hub.ring().has_viewports(), grace);
        let fenced = async {
            match fenced.as_mut() {
                Some(f) => {
                    let _ = f.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = stream.next() => if let Some(stop) = from_runtime(&hub, side.as_ref(), m) { break stop },
            c = interrupts.next() => break Stop::Gateway(c.into()),
            _ = hub.viewports_changed.notified() => {}
            _ = fenced => break Stop::Gateway(close::SERVICE_RESTART.into()),
            _ = attachment.check_due() => {
                // Boxed: a rare look that should not grow every hub's task.
                let remote = match &side {
                    Some(s) => Box::pin(
                        s.fabric
                            .viewports_elsewhere(&hub.session_id, &hub.route.name),
                    )
                    .await
                    .unwrap_or(1),
                    None => 0,
                };
                match attachment.after_check(remote, grace) {
                    Some(next) => attachment = next,
                    None => {
                        if hub.ring().close_if_unattended(close::GOING_AWAY.into()) {
                            break Stop::Unattended;
                        }
                    }
                }
            }
        }
    };
    // Never hand this hub out again, then let viewports drain and close.
    hub.ring().close(stop.close());
    if let Some(side) = side {
        // Other instances' viewports close with the same code, and the
        // next attach anywhere makes a new hub.
        side.end(&hub, &stop.close()).await;
    }
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
