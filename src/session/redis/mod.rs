//! Session store shared by every gateway instance through Redis.
//!
//! Each operation that reads-then-writes is one Lua script, so two instances
//! racing on the same session (two sockets attaching at the per-session
//! limit, a delete during an attach) see a consistent answer, and a key is
//! never written without its expiry. Times come from the Redis clock (`TIME`)
//! so lease expiries written by different instances compare correctly even if
//! their clocks drift.
//!
//! The scripts live in `scripts`, the command connections in `conns` and the
//! revocation subscription in `pubsub`; this file is the store itself.
//!
//! # Keys
//!
//! The session id sits in a hash tag (`{sid}`) so one session's keys share a
//! Redis Cluster slot and a script may touch all of them:
//!
//! - `<prefix>:session:{sid}`: hash `user`, `created_at`, `expires_at` (Unix
//!   ms), `attached` (`0`/`1`); its TTL is the session's.
//! - `<prefix>:conns:{sid}`: sorted set, member = `<instance>:<conn id>`,
//!   score = attach time (Unix ms); same TTL as the session. An entry counts
//!   while its instance's heartbeat lives (see `scripts`).
//! - `<prefix>:instances`: sorted set, member = instance id, score =
//!   heartbeat expiry (Unix ms): the one key an idle instance writes, every
//!   few seconds, whatever the number of its sockets.
//! - `<prefix>:revoked:{sid}`: tombstone kept [`TOMBSTONE`] after a delete,
//!   so the sweep can tell "revoked" from "expired".
//! - `<prefix>:abandoned:{sid}`: written by the repair queue for a create
//!   that answered `503`; `CREATE` refuses to run past it (see `repair`).
//! - `<prefix>:user:{<user>}` (only with `auth.max_sessions_per_user` set):
//!   sorted set, member = session id, score = until when it counts (Unix
//!   ms: the session's expiry at its create or last refresh plus the token
//!   lifetime, the furthest upgrades can slide it meanwhile); expired
//!   members are dropped when it is written; its TTL is its latest score.
//! - `<prefix>:user-conns:{<user>}` (only with
//!   `server.max_connections_per_user` set): sorted set of the user's open
//!   sockets on every instance, entries exactly like `conns:{sid}`'s
//!   (member = `<instance>:<conn id>`, score = attach time, counted while
//!   the instance's heartbeat lives); its TTL is at least the furthest
//!   expiry of a session that attached or was refreshed since, so it
//!   never lapses under a live socket.
//! - `<prefix>:user-abandoned:{<user>}`: sorted set of the user's abandoned
//!   ids (score = when, informational), so a reservation that Redis runs
//!   late is refused too; it expires a marker's lifetime after its last write.
//! - channel `<prefix>:revocations`: the id of every deleted session.
//!
//! # The per-user limit
//!
//! The user's index lives in the user's slot, not the session's, so a
//! create cannot be one script: it first reserves the id in the index
//! (`RESERVE`: prune, count, add, one step, so two instances racing for the
//! last slot cannot both win), then creates the session; if the create
//! fails the reservation is released by the repair queue. The window: a
//! gateway that dies between the two steps (or whose repair is given up)
//! leaves a reservation that holds a slot until its score passes, one
//! session TTL plus the token lifetime. A delete removes the id from the
//! index after ending the session; if that fails the removal is queued.
//!
//! # The per-user socket limit
//!
//! A socket takes its session's lease (`ATTACH`, the session's slot), then,
//! only when the limit is set, a slot in its user's count (`USER_ATTACH`,
//! the user's slot: prune dead entries at the limit, count, add, one step,
//! so two instances racing for the last slot cannot both win). Like a
//! session lease the slot is held by the instance's heartbeat, with no
//! store traffic while the socket idles, and given back in the same
//! pipeline that releases the session lease when the socket closes. A
//! SIGKILLed instance's entries stop counting once its heartbeat lapses
//! (and are removed by the next `USER_ATTACH` that finds the user at the
//! limit); one whose release failed counts until then too.
//!
//! # Failure
//!
//! Redis being down is an ordinary, retryable condition: [`RedisStore::connect`]
//! succeeds without it, every call fails within [`OP_DEADLINE`], and calls work
//! again once Redis is back, without rebuilding the store.

mod conns;
pub mod fabric;
mod pubsub;
mod repair;
mod scripts;

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

use redis::aio::ConnectionManager;
use redis::{
    Client, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult, Script, ScriptInvocation,
    Value,
};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::timeout;

use super::{
    Attach, CreateError, LeaseRequest, Liveness, REVOCATION_CHANNEL, Release, Revocation,
    SessionRecord, SessionStore, StoreError, TOMBSTONE, UserAttach, UserLease, UserLimit,
    announce_revoked,
};
use crate::config::{RedisTarget, Topology};
use crate::ids::random_id;
use crate::time::now_unix_ms;
use conns::Commands;
use pubsub::listen;
use repair::Repair;
use scripts::{
    ATTACH, CREATE, DELETE, GET, HEARTBEAT, KEEP_USER_CONNS, MARK_IDLE, RECOUNT, RESERVE,
    RawRecord, TOUCH, USER_ATTACH, to_record,
};

/// Bounds a whole store call, reconnect and one retry included.
pub const OP_DEADLINE: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Key names; the braces make the session id the Cluster hash tag.
struct Keys {
    prefix: String,
}

impl Keys {
    fn session(&self, sid: &str) -> String {
        format!("{}:session:{{{sid}}}", self.prefix)
    }
    fn conns(&self, sid: &str) -> String {
        format!("{}:conns:{{{sid}}}", self.prefix)
    }
    fn revoked(&self, sid: &str) -> String {
        format!("{}:revoked:{{{sid}}}", self.prefix)
    }
    fn abandoned(&self, sid: &str) -> String {
        format!("{}:abandoned:{{{sid}}}", self.prefix)
    }
    /// The braces make the user name the hash tag: the index and the
    /// user's abandoned ids share a slot (another than any session's).
    fn user(&self, user: &str) -> String {
        format!("{}:user:{{{user}}}", self.prefix)
    }
    /// The user's open sockets: in the user's slot, like the index.
    fn user_conns(&self, user: &str) -> String {
        format!("{}:user-conns:{{{user}}}", self.prefix)
    }
    fn user_abandoned(&self, user: &str) -> String {
        format!("{}:user-abandoned:{{{user}}}", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:revocations", self.prefix)
    }
    fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }
}

/// Until the first heartbeat says otherwise: how long an entry of an
/// instance this one has not seen alive still counts.
const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// The window used while this instance's own view of who is alive cannot
/// be trusted (no recent heartbeat, or the instance set had lapsed): so
/// long that no entry looks dead, so none is cleaned or left uncounted.
const UNTRUSTED_WINDOW_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A short description for logs and `StoreError`: the kind of failure, never
/// the server's text (which may echo keys) or the URL (which may hold a
/// password).
fn describe(op: &str, e: &RedisError) -> StoreError {
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connection_refusal() {
        "connection refused".to_string()
    } else if e.is_connection_dropped() {
        "connection lost".to_string()
    } else if e.is_io_error() {
        "I/O error".to_string()
    } else {
        format!("{:?}", e.kind())
    };
    StoreError(format!("redis {op}: {what}"))
}

/// Sessions in Redis, shared by every gateway instance using the same URL and
/// key prefix.
pub struct RedisStore {
    /// Behind a pointer so the `Store` enum stays small.
    inner: Arc<Inner>,
    limit: UserLimit,
    /// Shared sessions across instances (see `fabric`).
    fabric: fabric::Fabric,
}

struct Inner {
    commands: Commands,
    keys: Keys,
    /// This process's id among the instances sharing the store.
    instance: String,
    /// The instances alive at the last heartbeat (this one always among
    /// them): passed to every script that counts socket entries.
    live: Mutex<Arc<[String]>>,
    /// The heartbeat lease, in ms: also how long an entry of an instance
    /// not (yet) seen alive counts.
    window_ms: AtomicU64,
    /// Local time (Unix ms) of the last successful heartbeat; 0 = none yet.
    last_beat_ms: AtomicI64,
    /// Until then (local Unix ms) the live list is incomplete: the instance
    /// set had lapsed and the others have not beaten into it again.
    untrusted_until_ms: AtomicI64,
    /// Redis's clock minus this host's, from the last heartbeat.
    clock_offset_ms: AtomicI64,
    /// Successful subscriptions so far.
    subscriptions: watch::Receiver<u64>,
    revocations: broadcast::Sender<Revocation>,
    subscribed: watch::Receiver<bool>,
    /// Creates to undo and index entries to remove (see `repair`).
    repairs: mpsc::Sender<Repair>,
    /// Dropped with the store, which ends the subscription task.
    _stop_listener: oneshot::Sender<()>,
}

impl RedisStore {
    /// Never fails because Redis is unreachable, only for a malformed URL:
    /// the gateway must start and report unready until Redis comes up. Waits
    /// briefly (bounded) for the revocation subscription so that an instance
    /// that has just started does not miss the first revocations.
    ///
    /// Must be called inside a Tokio runtime (it starts the subscription
    /// task).
    pub async fn connect(redis_url: &str, key_prefix: &str) -> Result<RedisStore, StoreError> {
        let client = Client::open(redis_url)
            .map_err(|e| StoreError(format!("invalid redis url: {:?}", e.kind())))?;
        Self::connect_client(client, key_prefix).await
    }

    /// The store at a validated config target (SPEC §10). Only one Redis
    /// is served so far: a Cluster or Sentinel target is refused here, at
    /// startup, rather than served as if it were one Redis (which would
    /// answer `MOVED` or `READONLY` at the first failover).
    pub async fn connect_to(
        target: &RedisTarget,
        key_prefix: &str,
    ) -> Result<RedisStore, StoreError> {
        let url = match &target.topology {
            Topology::Standalone(url) => url,
            Topology::Cluster(_) => {
                return Err(StoreError(
                    "sessions.redis_cluster_urls: Redis Cluster is not supported by this build yet"
                        .to_string(),
                ));
            }
            Topology::Sentinel { .. } => {
                return Err(StoreError(
                    "sessions.redis_sentinel_urls: Redis Sentinel is not supported by this build yet"
                        .to_string(),
                ));
            }
        };
        if target.tls() {
            // The redis crate's rustls has no crypto provider of its own;
            // an error only means one is installed already. ring is what the
            // token keys use already (no second crypto library to build).
            #[allow(deprecated)]
            let provider = rustls::crypto::ring::default_provider();
            let _ = provider.install_default();
        }
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError(format!("invalid redis url: {:?}", e.kind())))?;
        if let Some(password) = &target.password {
            let password = String::from_utf8(password.expose().to_vec())
                .map_err(|_| StoreError("redis password: not UTF-8".to_string()))?;
            info.redis.password = Some(password);
        }
        let client = Client::open(info)
            .map_err(|e| StoreError(format!("invalid redis url: {:?}", e.kind())))?;
        Self::connect_client(client, key_prefix).await
    }

    async fn connect_client(client: Client, key_prefix: &str) -> Result<RedisStore, StoreError> {
        let keys = Keys {
            prefix: key_prefix.to_string(),
        };
        let (revocations, _) = broadcast::channel(REVOCATION_CHANNEL);
        let (subscribed_tx, subscribed) = watch::channel(false);
        let (subscriptions_tx, subscriptions) = watch::channel(0u64);
        let (stop_tx, stop_rx) = oneshot::channel();
        let fabric_client = client.clone();
        tokio::spawn(listen(
            client.clone(),
            keys.channel(),
            revocations.clone(),
            subscribed_tx,
            subscriptions_tx,
            stop_rx,
        ));
        let instance = random_id();
        let (repairs, repair_queue) = mpsc::channel(repair::QUEUE);
        let inner = Arc::new(Inner {
            commands: Commands::new(client),
            keys,
            live: Mutex::new(Arc::from(vec![instance.clone()])),
            instance,
            window_ms: AtomicU64::new(ms(DEFAULT_WINDOW)),
            last_beat_ms: AtomicI64::new(0),
            untrusted_until_ms: AtomicI64::new(0),
            clock_offset_ms: AtomicI64::new(0),
            subscriptions,
            revocations,
            subscribed,
            repairs,
            _stop_listener: stop_tx,
        });
        let store = RedisStore {
            fabric: fabric::Fabric::start(inner.clone(), fabric_client),
            inner,
            limit: UserLimit::NONE,
        };
        tokio::spawn(repair::run(Arc::downgrade(&store.inner), repair_queue));
        let warm_up = async {
            if store.inner.commands.manager().await.is_ok() {
                let _ = store.subscription().wait_for(|s| *s).await;
            }
        };
        let _ = timeout(OP_DEADLINE, warm_up).await;
        Ok(store)
    }

    /// Applies `auth.max_sessions_per_user` to every later `create` and
    /// `server.max_connections_per_user` to every later `attach_user`.
    pub fn with_user_limit(self, limit: UserLimit) -> Self {
        RedisStore { limit, ..self }
    }

    /// Where shared sessions coordinate across instances.
    pub fn fabric(&self) -> &fabric::Fabric {
        &self.fabric
    }

    pub fn user_limit(&self) -> UserLimit {
        self.limit
    }

    /// This instance's id in the store (the prefix of its socket entries).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.inner.run(op, f).await
    }

    async fn eval<T>(&self, op: &'static str, inv: &ScriptInvocation<'_>) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
    {
        self.inner.eval(op, inv).await
    }

    /// A session script's invocation: its two keys and the live-instance
    /// arguments every one of them takes first (see `scripts`).
    fn invocation<'a>(&self, script: &'a Script, sid: &str) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(self.inner.keys.session(sid))
            .key(self.inner.keys.conns(sid));
        self.live_args(&mut inv);
        inv
    }

    /// The live-instance arguments every script that counts socket entries
    /// takes first.
    fn live_args(&self, inv: &mut ScriptInvocation<'_>) {
        let live = self.live();
        inv.arg(self.window_ms()).arg(live.len()).arg(&*live);
    }

    /// The freshness window to pass to the scripts: the lease while this
    /// instance's view of the live instances is current, else one so long
    /// that nothing counts as dead. A stale view (this instance's own
    /// heartbeats failing, or the instance set just recreated after an
    /// outage) must never make live instances' entries look dead.
    fn window_ms(&self) -> u64 {
        let window = self.inner.window_ms.load(Ordering::Relaxed);
        let now = now_unix_ms();
        let last = self.inner.last_beat_ms.load(Ordering::Relaxed);
        let fresh = last != 0 && now - last < (window / 2) as i64;
        let complete = now >= self.inner.untrusted_until_ms.load(Ordering::Relaxed);
        if fresh && complete {
            window
        } else {
            UNTRUSTED_WINDOW_MS
        }
    }

    fn live(&self) -> Arc<[String]> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A socket's entry: it names the instance whose heartbeat holds it.
    fn entry(&self, conn_id: &str) -> String {
        format!("{}:{conn_id}", self.inner.instance)
    }

    /// How long an indexed session counts past its expiry at the write.
    fn counted_ms(&self, ttl: Duration) -> u64 {
        ms(ttl).saturating_add(ms(self.limit.slack))
    }

    /// Takes a slot in `user`'s index for `sid` (see "The per-user limit").
    async fn reserve(&self, user: &str, sid: &str, ttl: Duration) -> Result<(), CreateError> {
        let keys = &self.inner.keys;
        let mut inv = RESERVE.prepare_invoke();
        inv.key(keys.user(user))
            .key(keys.user_abandoned(user))
            .arg(sid)
            .arg(self.counted_ms(ttl))
            .arg(self.limit.max_sessions);
        match self.eval::<i64>("reserve", &inv).await? {
            1 => Ok(()),
            0 => Err(CreateError::TooManySessions {
                max: self.limit.max_sessions,
            }),
            _ => Err(StoreError("redis reserve: id abandoned".to_string()).into()),
        }
    }

    /// Reserve (when limited), then create; `Err(Store)` means unknown.
    async fn try_create(
        &self,
        id: &str,
        user: &str,
        ttl: Duration,
    ) -> Result<SessionRecord, CreateError> {
        if self.limit.enabled() {
            self.reserve(user, id, ttl).await?;
        }
        let mut inv = self.invocation(&CREATE, id);
        inv.key(self.inner.keys.abandoned(id))
            .arg(user)
            .arg(ms(ttl));
        let raw: Option<RawRecord> = self.eval("create", &inv).await?;
        let raw = raw.ok_or_else(|| StoreError("redis create: id abandoned".to_string()))?;
        Ok(to_record(id, raw))
    }

    fn indexed_user(&self, user: &str) -> Option<String> {
        self.limit.enabled().then(|| user.to_string())
    }

    /// Frees an ended session's slot. The session is already gone, so a
    /// failure does not fail the delete: the removal is queued instead.
    async fn unindex(&self, session_id: &str, user: String) {
        let zrem = redis::cmd("ZREM")
            .arg(self.inner.keys.user(&user))
            .arg(session_id)
            .clone();
        let zrem = &zrem;
        let removed = self
            .run("unindex", |mut conn| async move {
                zrem.query_async::<i64>(&mut conn).await
            })
            .await;
        if let Err(e) = removed {
            tracing::warn!(%e, session = %session_id, "index removal queued");
            let repair = Repair::new(session_id.to_string(), Some(user), false);
            repair::submit(&self.inner.repairs, repair);
        }
    }
}

impl Inner {
    /// Runs `f` on the shared connection within `OP_DEADLINE`, retrying once
    /// if the connection turned out to be dead: every script is written to
    /// be safe to run twice, because after a dropped connection we cannot
    /// know whether Redis ran it.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let used = AtomicU64::new(0);
        let attempts = async {
            let mut retried = false;
            loop {
                let (generation, conn) = self.commands.manager().await?;
                used.store(generation, Ordering::Relaxed);
                match f(conn).await {
                    Err(e) if !retried && e.is_unrecoverable_error() => retried = true,
                    Err(e) => {
                        if e.is_timeout() {
                            self.commands.forget(generation);
                        }
                        return Err(e);
                    }
                    ok => return ok,
                }
            }
        };
        match timeout(OP_DEADLINE, attempts).await {
            Ok(result) => result.map_err(|e| describe(op, &e)),
            Err(_) => {
                self.commands.forget(used.load(Ordering::Relaxed));
                Err(StoreError(format!("redis {op}: timed out")))
            }
        }
    }

    async fn eval<T>(&self, op: &'static str, inv: &ScriptInvocation<'_>) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
    {
        self.run(
            op,
            |mut conn| async move { inv.invoke_async(&mut conn).await },
        )
        .await
    }

    /// One pipeline of plain commands for the whole batch: for an abandoned
    /// create the marker first, then the deletes, so a create (or a
    /// reservation) Redis runs at any point in between is refused, and
    /// nothing needs to be atomic (the keys live in different slots).
    async fn apply_repairs(&self, repairs: &[Repair]) -> Result<(), StoreError> {
        let keys = &self.keys;
        let marker = ms(repair::MARKER);
        let mut pipe = redis::pipe();
        for r in repairs {
            let sid = &r.session_id;
            if r.abandon {
                pipe.cmd("SET")
                    .arg(keys.abandoned(sid))
                    .arg(1)
                    .arg("PX")
                    .arg(marker)
                    .ignore();
                pipe.cmd("DEL")
                    .arg(keys.session(sid))
                    .arg(keys.conns(sid))
                    .ignore();
            }
            if let Some(user) = &r.user {
                if r.abandon {
                    let abandoned = keys.user_abandoned(user);
                    pipe.cmd("ZADD")
                        .arg(&abandoned)
                        .arg(crate::time::now_unix_ms())
                        .arg(sid)
                        .ignore();
                    pipe.cmd("PEXPIRE").arg(&abandoned).arg(marker).ignore();
                }
                pipe.cmd("ZREM").arg(keys.user(user)).arg(sid).ignore();
            }
        }
        let pipe = &pipe;
        self.run("repair", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }
}

impl SessionStore for RedisStore {
    /// A create whose outcome is unknown (any store error: the command may
    /// have been sent and may yet run) is queued for repair before the
    /// caller answers `503`, so it leaves nothing once Redis is back.
    async fn create(&self, user: &str, ttl: Duration) -> Result<SessionRecord, CreateError> {
        let id = random_id();
        let outcome = self.try_create(&id, user, ttl).await;
        if let Err(CreateError::Store(e)) = &outcome {
            tracing::warn!(%e, session = %id, "create failed; undoing whatever it made");
            let repair = Repair::new(id, self.indexed_user(user), true);
            repair::submit(&self.inner.repairs, repair);
        }
        outcome
    }

    async fn get(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let inv = self.invocation(&GET, session_id);
        let raw: Option<RawRecord> = self.eval("get", &inv).await?;
        Ok(raw.map(|r| to_record(session_id, r)))
    }

    async fn touch(
        &self,
        session_id: &str,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let mut inv = self.invocation(&TOUCH, session_id);
        inv.arg(ms(ttl));
        let raw: Option<RawRecord> = self.eval("touch", &inv).await?;
        let Some(raw) = raw else { return Ok(None) };
        if self.limit.enabled() {
            // Keeps the session counted as long as it may now live; a
            // failure fails the refresh, so no token outlives the index.
            let mut inv = RECOUNT.prepare_invoke();
            inv.key(self.inner.keys.user(&raw.0))
                .arg(session_id)
                .arg(raw.2.saturating_add(ms(self.limit.slack) as i64));
            self.eval::<i64>("recount", &inv).await?;
        }
        if self.limit.limits_connections() {
            // The session's sockets count as long as it may now live; a
            // failure fails the refresh, as for the index.
            let mut inv = KEEP_USER_CONNS.prepare_invoke();
            inv.key(self.inner.keys.user_conns(&raw.0)).arg(raw.2);
            self.eval::<i64>("keep_user_conns", &inv).await?;
        }
        Ok(Some(to_record(session_id, raw)))
    }

    async fn delete(&self, session_id: &str) -> Result<bool, StoreError> {
        let mut inv = self.invocation(&DELETE, session_id);
        inv.key(self.inner.keys.revoked(session_id))
            .arg(self.inner.keys.channel())
            .arg(session_id)
            .arg(random_id())
            .arg(ms(TOMBSTONE));
        let user: Option<String> = self.eval("delete", &inv).await?;
        let existed = user.is_some();
        if let Some(user) = user.filter(|_| self.limit.enabled()) {
            self.unindex(session_id, user).await;
        }
        // While unsubscribed our own PUBLISH would not come back to us, but
        // this instance's sockets for the session must still close now.
        if existed && !*self.inner.subscribed.borrow() {
            announce_revoked(&self.inner.revocations, session_id.to_string());
        }
        Ok(existed)
    }

    async fn attach(&self, req: LeaseRequest<'_>) -> Result<Attach, StoreError> {
        let mut inv = self.invocation(&ATTACH, req.session_id);
        inv.arg(self.entry(req.conn_id))
            .arg(req.max_per_session)
            .arg(ms(req.session_ttl));
        let answer: Value = self.eval("attach", &inv).await?;
        match answer {
            Value::Int(0) => Ok(Attach::NotFound),
            Value::Int(1) => Ok(Attach::Full),
            other => {
                let raw =
                    RawRecord::from_redis_value(&other).map_err(|e| describe("attach", &e))?;
                Ok(Attach::Attached(to_record(req.session_id, raw)))
            }
        }
    }

    async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError> {
        let mut inv = HEARTBEAT.prepare_invoke();
        inv.key(self.inner.keys.instances())
            .arg(&self.inner.instance)
            .arg(ms(lease));
        let (redis_now, existed, mut live): (i64, i64, Vec<String>) = self
            .run("heartbeat", |mut conn| {
                let inv = &inv;
                async move { inv.invoke_async(&mut conn).await }
            })
            .await?;
        if !live.contains(&self.inner.instance) {
            live.push(self.inner.instance.clone());
        }
        let local = now_unix_ms();
        let inner = &self.inner;
        inner.window_ms.store(ms(lease), Ordering::Relaxed);
        inner
            .clock_offset_ms
            .store(redis_now - local, Ordering::Relaxed);
        if existed == 0 {
            // Every other live instance beats into the set within half a
            // lease; until then the list lacks them.
            inner
                .untrusted_until_ms
                .store(local + (ms(lease) / 2) as i64, Ordering::Relaxed);
        }
        inner.last_beat_ms.store(local, Ordering::Relaxed);
        *self.inner.live.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(live);
        Ok(())
    }

    async fn attach_user(&self, req: UserLease<'_>) -> Result<UserAttach, StoreError> {
        if !self.limit.limits_connections() {
            return Ok(UserAttach::Attached);
        }
        let mut inv = USER_ATTACH.prepare_invoke();
        inv.key(self.inner.keys.user_conns(req.user));
        self.live_args(&mut inv);
        inv.arg(self.entry(req.conn_id))
            .arg(self.limit.max_connections)
            .arg(ms(req.session_ttl));
        match self.eval::<i64>("attach_user", &inv).await? {
            1 => Ok(UserAttach::Attached),
            0 => Ok(UserAttach::Full),
            _ => Err(StoreError(
                "redis attach_user: unexpected answer".to_string(),
            )),
        }
    }

    /// One pipeline of plain `ZREM`s, not a script: removing a member never
    /// creates the key, so it needs no existence check and is safe to repeat
    /// on a retry, and it costs Redis a fraction of an `EVALSHA`; a pipeline
    /// because the leases may live in different Cluster slots. A socket
    /// that held a slot in its user's count adds one `ZREM` to the same
    /// pipeline, not a round trip.
    async fn release(&self, batch: &[Release]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for r in batch {
            let entry = self.entry(&r.conn_id);
            if let Some(user) = &r.user {
                pipe.cmd("ZREM")
                    .arg(self.inner.keys.user_conns(user))
                    .arg(&entry)
                    .ignore();
            }
            pipe.cmd("ZREM")
                .arg(self.inner.keys.conns(&r.session_id))
                .arg(entry)
                .ignore();
        }
        let pipe = &pipe;
        self.run("detach", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    async fn mark_idle(&self, session_id: &str) -> Result<(), StoreError> {
        let inv = self.invocation(&MARK_IDLE, session_id);
        self.eval::<i64>("mark_idle", &inv).await.map(drop)
    }

    /// A pipeline rather than one script: the ids live in different Cluster
    /// slots, and nothing here needs the two reads per id to be atomic (the
    /// tombstone is written in the same step that removes the session).
    async fn liveness(&self, session_ids: &[String]) -> Result<Vec<Liveness>, StoreError> {
        if session_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in session_ids {
            pipe.cmd("HGET")
                .arg(self.inner.keys.session(id))
                .arg("expires_at");
            pipe.cmd("EXISTS").arg(self.inner.keys.revoked(id));
        }
        let pipe = &pipe;
        let answers: Vec<Value> = self
            .run("liveness", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        if answers.len() != 2 * session_ids.len() {
            return Err(StoreError("redis liveness: short answer".to_string()));
        }
        answers
            .chunks_exact(2)
            .map(|pair| {
                let expires_ms = Option::<i64>::from_redis_value(&pair[0]);
                let revoked = bool::from_redis_value(&pair[1]);
                match (expires_ms, revoked) {
                    (Ok(expires_ms), Ok(revoked)) => Ok(Liveness::from_store(expires_ms, revoked)),
                    (Err(e), _) | (_, Err(e)) => Err(describe("liveness", &e)),
                }
            })
            .collect()
    }

    /// One multi-key `EXISTS` for the whole batch: the audit costs Redis one
    /// command per batch, not one per session. (On a Cluster the keys of a
    /// batch would have to be grouped by slot first.)
    async fn count_live(&self, session_ids: &[String]) -> Result<usize, StoreError> {
        if session_ids.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("EXISTS");
        for id in session_ids {
            cmd.arg(self.inner.keys.session(id));
        }
        let cmd = &cmd;
        self.run("count_live", |mut conn| async move {
            cmd.query_async::<usize>(&mut conn).await
        })
        .await
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    /// While `false` (Redis away), revocations from other instances are
    /// caught by the re-check that follows the next subscription; readiness
    /// checks and tests can wait on it instead of guessing.
    fn subscription(&self) -> watch::Receiver<bool> {
        self.inner.subscribed.clone()
    }

    fn subscriptions(&self) -> watch::Receiver<u64> {
        self.inner.subscriptions.clone()
    }

    fn clock_offset_ms(&self) -> i64 {
        self.inner.clock_offset_ms.load(Ordering::Relaxed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let ping = redis::cmd("PING");
        let ping = &ping;
        self.run("ping", |mut conn| async move {
            ping.query_async::<String>(&mut conn).await
        })
        .await
        .map(drop)
    }
}
