//! Server-side sessions: the one authority on who may open a socket.
//!
//! A session is created in the store *before* any token for it exists, and a
//! socket is accepted only while it still exists there. Open sockets hold
//! *leases* in the store (held by their instance's heartbeat, lapsing if a gateway dies)
//! so `connections` and `state` stay right across instances and crashes.

pub mod memory;
pub mod outbox;
pub mod redis;

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

pub use memory::MemoryStore;
pub use outbox::Outbox;
pub use redis::RedisStore;

/// SPEC §4 `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// No socket has been opened yet (or, on a shared route, the detached
    /// upstream was closed after its grace period).
    Created,
    /// At least one socket is open on some instance.
    Active,
    /// Sockets were open, none is now.
    Detached,
}

impl SessionState {
    /// The rule both stores apply to what they keep: any live lease makes a
    /// session ACTIVE; none, after a socket attached (and no `mark_idle`
    /// since), DETACHED; otherwise CREATED.
    pub fn from_counts(live_leases: u32, attached: bool) -> Self {
        if live_leases > 0 {
            SessionState::Active
        } else if attached {
            SessionState::Detached
        } else {
            SessionState::Created
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "CREATED",
            SessionState::Active => "ACTIVE",
            SessionState::Detached => "DETACHED",
        }
    }
}

/// A session as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub user: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; slides on login, refresh and each accepted upgrade.
    pub expires_at: i64,
    pub state: SessionState,
    /// Open sockets on every instance (live leases).
    pub connections: u32,
}

impl SessionRecord {
    /// The record from what both stores keep: Unix-ms times, whether a
    /// socket attached since the last `mark_idle`, and the live leases.
    fn from_store(
        id: &str,
        user: String,
        (created_at_ms, expires_at_ms): (i64, i64),
        attached: bool,
        live_leases: u32,
    ) -> Self {
        SessionRecord {
            id: id.to_string(),
            user,
            created_at: created_at_ms / 1000,
            expires_at: expires_at_ms / 1000,
            state: SessionState::from_counts(live_leases, attached),
            connections: live_leases,
        }
    }
}

/// Why a session's sockets must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Logged out or deleted (closed as `sockets::close::SESSION_REVOKED`).
    Revoked,
    /// Its TTL ran out (closed as `sockets::close::SESSION_EXPIRED`).
    Expired,
}

/// A session ended somewhere; every instance closes its sockets for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub session_id: String,
    pub reason: EndReason,
}

/// Tells this instance's sockets that `session_id` was revoked. No receivers
/// is fine: no socket for it is open here.
fn announce_revoked(revocations: &broadcast::Sender<Revocation>, session_id: String) {
    let _ = revocations.send(Revocation {
        session_id,
        reason: EndReason::Revoked,
    });
}

/// How long a deleted session is remembered as revoked rather than expired;
/// comfortably longer than the sweep period of every instance.
pub const TOMBSTONE: Duration = Duration::from_secs(10 * 60);

/// The outcome of asking for a socket lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// Lease granted; the record reflects the new lease and slid TTL.
    Attached(SessionRecord),
    /// The session does not exist (never did, ended, or expired).
    NotFound,
    /// `max_connections_per_session` live leases already exist.
    Full,
}

/// What a liveness check of a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Alive, with its expiry (Unix seconds).
    Alive {
        expires_at: i64,
    },
    Gone(EndReason),
}

impl Liveness {
    /// What both stores answer from a session's expiry (Unix ms, `None` when
    /// it is gone) and whether its tombstone is still kept.
    fn from_store(expires_at_ms: Option<i64>, tombstone: bool) -> Self {
        match expires_at_ms {
            Some(ms) => Liveness::Alive {
                expires_at: ms / 1000,
            },
            None if tombstone => Liveness::Gone(EndReason::Revoked),
            None => Liveness::Gone(EndReason::Expired),
        }
    }
}

/// The store could not be reached or answered nonsense. Always retryable:
/// clients get `503 session_store_unavailable` with `Retry-After`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct StoreError(pub String);

/// Why a session was not created.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateError {
    /// Retryable: `503 session_store_unavailable`. Nothing is left behind:
    /// a Redis create whose outcome is unknown is undone (see `redis`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The user already holds [`UserLimit::max_sessions`] live sessions.
    #[error("the user already has {max} live sessions")]
    TooManySessions { max: u32 },
}

/// `auth.max_sessions_per_user` and `server.max_connections_per_user`,
/// counted across every instance sharing the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimit {
    /// Live sessions one user may hold; 0 = unlimited (nothing is indexed).
    pub max_sessions: u32,
    /// Open sockets one user may hold on every instance ([`SessionStore::attach_user`]);
    /// 0 = unlimited (nothing is counted, the store is never asked).
    pub max_connections: u32,
    /// How far past its last create or refresh a session can still be slid
    /// by upgrades: the token lifetime (an upgrade needs a valid token, and
    /// every token is issued by a create or a refresh). The Redis index
    /// keeps a session counted this much past its expiry at that write.
    pub slack: Duration,
}

impl UserLimit {
    /// No limit.
    pub const NONE: UserLimit = UserLimit {
        max_sessions: 0,
        max_connections: 0,
        slack: Duration::ZERO,
    };

    /// Whether sessions are counted (`max_sessions`).
    pub fn enabled(&self) -> bool {
        self.max_sessions > 0
    }

    /// Whether open sockets are counted per user (`max_connections`).
    pub fn limits_connections(&self) -> bool {
        self.max_connections > 0
    }
}

/// The outcome of asking for a slot in a user's socket count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserAttach {
    /// Slot taken (or no limit is set); given back by [`SessionStore::release`].
    Attached,
    /// [`UserLimit::max_connections`] live sockets of the user already exist.
    Full,
}

/// Parameters for a per-user slot request.
#[derive(Debug, Clone, Copy)]
pub struct UserLease<'a> {
    /// The session's user, as the store has it.
    pub user: &'a str,
    pub conn_id: &'a str,
    /// The session TTL the socket's lease slid to: the user's count is kept
    /// at least this long.
    pub session_ttl: Duration,
}

/// What a closed socket gives back to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub session_id: String,
    pub conn_id: String,
    /// The user whose socket count the socket held a slot in, if any.
    pub user: Option<String>,
}

/// Parameters for a lease request.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    pub session_id: &'a str,
    pub conn_id: &'a str,
    pub max_per_session: u32,
    /// The session TTL to slide to.
    pub session_ttl: Duration,
}

/// The session store. Both implementations pass one conformance suite
/// (`tests/store_conformance.rs`).
pub trait SessionStore: Send + Sync + 'static {
    /// Creates a session with a fresh server-minted id. Atomic: the session
    /// exists with its TTL, or not at all, and an error leaves none behind
    /// once the store is back. Refused with `TooManySessions` when the
    /// store's [`UserLimit`] is reached.
    fn create(
        &self,
        user: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<SessionRecord, CreateError>> + Send;

    fn get(
        &self,
        session_id: &str,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Slides the TTL of a live session; `None` when it does not exist.
    fn touch(
        &self,
        session_id: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Ends a session, frees its slot in its user's count, and announces the
    /// revocation to every instance. `false` when it did not exist.
    fn delete(&self, session_id: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes a socket lease: checks existence, prunes dead leases, enforces
    /// the per-session limit, marks the session attached and slides its TTL,
    /// all in one atomic step.
    fn attach(
        &self,
        req: LeaseRequest<'_>,
    ) -> impl Future<Output = Result<Attach, StoreError>> + Send;

    /// This instance's heartbeat: its sockets' leases count for `lease`
    /// more. One write per instance, however many sockets it holds; an
    /// instance that stops (crash, partition) stops counting once it lapses.
    /// Also refreshes this instance's view of which others are alive.
    fn heartbeat(&self, lease: Duration) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes a slot in the user's socket count, which spans every instance
    /// sharing the store: prunes the entries of dead instances when at the
    /// limit, counts and adds in one atomic step, so two instances racing
    /// for the last slot cannot both win. Always `Attached` without a
    /// [`UserLimit::max_connections`] (and then the store is not asked).
    /// Held like a session lease: by this instance's heartbeat, until
    /// [`release`](Self::release) gives it back.
    fn attach_user(
        &self,
        req: UserLease<'_>,
    ) -> impl Future<Output = Result<UserAttach, StoreError>> + Send;

    /// Releases one socket lease (the gateway itself releases in batches).
    fn detach(
        &self,
        session_id: &str,
        conn_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let lease = [(session_id.to_string(), conn_id.to_string())];
        async move { self.detach_many(&lease).await }
    }

    /// Releases many socket leases, `(session id, conn id)` pairs, in one
    /// round trip (see [`release`](Self::release)).
    fn detach_many(
        &self,
        leases: &[(String, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let batch: Vec<Release> = leases
            .iter()
            .map(|(session_id, conn_id)| Release {
                session_id: session_id.clone(),
                conn_id: conn_id.clone(),
                user: None,
            })
            .collect();
        async move { self.release(&batch).await }
    }

    /// Gives back what closed sockets held (session leases and per-user
    /// slots) in one round trip: sockets closing together (a burst of
    /// reconnects, a revocation) cost the store one request, not one each.
    fn release(&self, batch: &[Release]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks a session as having no sockets and no kept upstream
    /// (`CREATED`), used when a shared route's grace period ends.
    fn mark_idle(&self, session_id: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks many sessions in one round trip: the periodic sweep that makes
    /// a revocation lost in transit (e.g. during a store restart) still count.
    fn liveness(
        &self,
        session_ids: &[String],
    ) -> impl Future<Output = Result<Vec<Liveness>, StoreError>> + Send;

    /// How many of these sessions still exist, in as few round trips as
    /// the store allows: the background audit's cheap first look (only a
    /// batch that comes up short is checked in detail with `liveness`).
    fn count_live(
        &self,
        session_ids: &[String],
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Revocations announced by any instance (this one included).
    fn revocations(&self) -> broadcast::Receiver<Revocation>;

    /// Whether revocations from other instances currently reach this one.
    /// Each change to `true` after a loss means some may have been missed:
    /// the maintenance task then re-checks every local session once.
    fn subscription(&self) -> watch::Receiver<bool>;

    /// How many times the revocation subscription has been established:
    /// each change means revocations published before it may have been
    /// missed (a count, so two changes in a row are never merged into none).
    fn subscriptions(&self) -> watch::Receiver<u64>;

    /// The store's clock minus this host's, in ms: session expiries are in
    /// the store's clock, so timers for them are set in it too.
    fn clock_offset_ms(&self) -> i64;

    /// Whether the store answers, for `/readyz`.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The configured store, chosen by `sessions.store`. An enum rather than a
/// trait object so calls on the hot path are static.
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Memory($s) => $e,
            Store::Redis($s) => $e,
        }
    };
}

/// Records how long a store call that began at `started` took in
/// `portcullis_store_request_duration_seconds{op}`, whatever its result.
/// Written out in each method rather than as a wrapper future: another
/// layer of generic futures around the upgrade path overflowed rustc's
/// layout query depth in release builds.
fn observe(op: &'static str, started: Instant) {
    crate::telemetry::store_latency()
        .get_or_create(&crate::telemetry::OpLabel { op })
        .observe(started.elapsed().as_secs_f64());
}

impl SessionStore for Store {
    async fn create(&self, user: &str, ttl: Duration) -> Result<SessionRecord, CreateError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.create(user, ttl).await);
        observe("create", started);
        out
    }
    async fn get(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.get(session_id).await);
        observe("get", started);
        out
    }
    async fn touch(
        &self,
        session_id: &str,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.touch(session_id, ttl).await);
        observe("touch", started);
        out
    }
    async fn delete(&self, session_id: &str) -> Result<bool, StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.delete(session_id).await);
        observe("delete", started);
        out
    }
    async fn attach(&self, req: LeaseRequest<'_>) -> Result<Attach, StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.attach(req).await);
        observe("attach", started);
        out
    }
    async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.heartbeat(lease).await);
        observe("heartbeat", started);
        out
    }
    async fn attach_user(&self, req: UserLease<'_>) -> Result<UserAttach, StoreError> {
        dispatch!(self, s => s.attach_user(req).await)
    }
    async fn release(&self, batch: &[Release]) -> Result<(), StoreError> {
        dispatch!(self, s => s.release(batch).await)
    }
    async fn mark_idle(&self, session_id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.mark_idle(session_id).await)
    }
    async fn liveness(&self, session_ids: &[String]) -> Result<Vec<Liveness>, StoreError> {
        dispatch!(self, s => s.liveness(session_ids).await)
    }
    async fn count_live(&self, session_ids: &[String]) -> Result<usize, StoreError> {
        dispatch!(self, s => s.count_live(session_ids).await)
    }
    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        dispatch!(self, s => s.revocations())
    }
    fn subscription(&self) -> watch::Receiver<bool> {
        dispatch!(self, s => s.subscription())
    }
    fn subscriptions(&self) -> watch::Receiver<u64> {
        dispatch!(self, s => s.subscriptions())
    }
    fn clock_offset_ms(&self) -> i64 {
        dispatch!(self, s => s.clock_offset_ms())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let out = dispatch!(self, s => s.ping().await);
        observe("ping", started);
        out
    }
}

impl Store {
    /// The cross-instance side of shared sessions; `None` for the memory
    /// store, which serves one instance only.
    pub fn fabric(&self) -> Option<&redis::fabric::Fabric> {
        match self {
            Store::Memory(_) => None,
            Store::Redis(s) => Some(s.fabric()),
        }
    }

    /// Applies `auth.max_sessions_per_user` to every later `create` and
    /// `server.max_connections_per_user` to every later `attach_user`.
    pub fn with_user_limit(self, limit: UserLimit) -> Self {
        match self {
            Store::Memory(s) => Store::Memory(s.with_user_limit(limit)),
            Store::Redis(s) => Store::Redis(s.with_user_limit(limit)),
        }
    }

    /// The limits `with_user_limit` set: the gate asks the store for a
    /// user's slot only when `max_connections` is set.
    pub fn user_limit(&self) -> UserLimit {
        match self {
            Store::Memory(s) => s.user_limit(),
            Store::Redis(s) => s.user_limit(),
        }
    }
}

/// Capacity of the revocation broadcast; a receiver that lags behind this
/// falls back to a full sweep, so nothing is lost, only delayed.
pub const REVOCATION_CHANNEL: usize = 1024;
