//! Session store shared by every gateway instance through Redis.
//!
//! Each operation that reads-then-writes is one Lua script, so two instances
//! racing on the same session (two sockets attaching at the per-session
//! limit, a delete during an attach) see a consistent answer, and a key is
//! never written without its expiry. Times come from the Redis clock (`TIME`)
//! so lease expiries written by different instances compare correctly even if
//! their clocks drift.
//!
//! # Keys
//!
//! The session id sits in a hash tag (`{sid}`) so one session's keys share a
//! Redis Cluster slot and a script may touch all of them:
//!
//! - `<prefix>:session:{sid}`: hash `user`, `created_at`, `expires_at` (Unix
//!   ms), `attached` (`0`/`1`); its TTL is the session's.
//! - `<prefix>:conns:{sid}`: sorted set, member = connection id, score =
//!   lease expiry (Unix ms); same TTL as the session.
//! - `<prefix>:revoked:{sid}`: tombstone kept [`TOMBSTONE`] after a delete,
//!   so the sweep can tell "revoked" from "expired".
//! - channel `<prefix>:revocations`: the id of every deleted session.
//!
//! # Failure
//!
//! Redis being down is an ordinary, retryable condition: [`RedisStore::connect`]
//! succeeds without it, every call fails within [`OP_DEADLINE`], and calls work
//! again once Redis is back, without rebuilding the store.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, FromRedisValue, RedisError, RedisResult, Script, ScriptInvocation, Value};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::{Instant, timeout};

use super::{
    Attach, EndReason, LeaseRequest, Liveness, REVOCATION_CHANNEL, Revocation, SessionRecord,
    SessionState, SessionStore, StoreError,
};
use crate::ids::{looks_like_id, random_id};

/// A dead or unreachable Redis must turn into a 503 quickly, not a hung
/// request; this bounds each TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds each command once connected (a stalled Redis, a half-open socket).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds a whole store call, reconnect and one retry included.
pub const OP_DEADLINE: Duration = Duration::from_secs(2);
/// How long a deleted session is remembered as revoked rather than expired;
/// comfortably longer than the sweep period of every instance.
pub const TOMBSTONE: Duration = Duration::from_secs(10 * 60);
/// A subscription on a silently dead socket would never notice; a periodic
/// PING does.
const HEARTBEAT: Duration = Duration::from_secs(5);
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(50);
/// Short, because revocations sent while unsubscribed are only caught by
/// the (slower) liveness sweep.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);

/// Helpers shared by every script. `KEYS[1]` is always the session hash and
/// `KEYS[2]` the lease set. Timestamps are formatted with `%d` because Lua
/// would otherwise print large numbers in exponent notation.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%d', x)
end
local function record(now)
  local f = redis.call('HMGET', KEYS[1], 'user', 'created_at', 'expires_at', 'attached')
  local live = redis.call('ZCOUNT', KEYS[2], '(' .. int(now), '+inf')
  return {f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), live}
end
"#;

/// ARGV: user, ttl ms. Re-running it for the same id (a retry after a lost
/// reply) returns the session the first run made instead of a second one.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 1 then
  return record(now)
end
local exp = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'created_at', int(now),
  'expires_at', int(exp), 'attached', '0')
redis.call('PEXPIREAT', KEYS[1], int(exp))
return {ARGV[1], now, exp, 0, 0}
"#,
    )
});

static GET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return record(now_ms())
"#,
    )
});

/// ARGV: ttl ms. The lease set's TTL slides too, or it would vanish before
/// the session it belongs to.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local now = now_ms()
local exp = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'expires_at', int(exp))
local rec = record(now)
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return rec
"#,
    )
});

/// KEYS[3]: tombstone. ARGV: channel, session id, nonce, tombstone ms. The
/// tombstone holds this call's nonce, so a retry after a lost reply still
/// learns that *it* ended the session.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 1
end
if redis.call('GET', KEYS[3]) == ARGV[3] then return 1 end
return 0
"#,
    )
});

/// ARGV: conn id, lease ms, max per session, ttl ms. Returns 0 (not found),
/// 1 (full) or the record. A connection that already holds a lease (a
/// retry) is not counted against the limit a second time.
///
/// Every upgrade runs it, so it makes as few calls as it can (8; the record
/// is assembled from what it already read): Redis's CPU per upgrade is part
/// of the gateway's cost (BENCHMARKS.md).
static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local f = redis.call('HMGET', KEYS[1], 'user', 'created_at')
if not f[1] then return 0 end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
local live = redis.call('ZCARD', KEYS[2])
if live >= tonumber(ARGV[3]) and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 1
end
local exp = now + tonumber(ARGV[4])
live = live + redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[2])), ARGV[1])
redis.call('HSET', KEYS[1], 'attached', '1', 'expires_at', int(exp))
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return {f[1], tonumber(f[2]), exp, 1, live}
"#,
    )
});

/// ARGV: lease ms, conn ids. `XX`: a lease that was already released stays
/// released.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local exp = int(now_ms() + tonumber(ARGV[1]))
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', exp, ARGV[i])
end
return 1
"#,
    )
});

/// Keeps `attached` if a socket attached meanwhile (possibly on another
/// instance): the lease check and the write are one step.
static MARK_IDLE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('ZCOUNT', KEYS[2], '(' .. int(now_ms()), '+inf') == 0 then
  redis.call('HSET', KEYS[1], 'attached', '0')
end
return 1
"#,
    )
});

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// What the record-returning scripts answer: user, created ms, expires ms,
/// attached flag, live leases.
type RawRecord = (String, i64, i64, i64, u32);

fn to_record(id: &str, (user, created_ms, expires_ms, attached, live): RawRecord) -> SessionRecord {
    SessionRecord {
        id: id.to_string(),
        user,
        created_at: created_ms / 1000,
        expires_at: expires_ms / 1000,
        state: match (live, attached) {
            (n, _) if n > 0 => SessionState::Active,
            (_, 1) => SessionState::Detached,
            _ => SessionState::Created,
        },
        connections: live,
    }
}

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
    fn channel(&self) -> String {
        format!("{}:revocations", self.prefix)
    }
}

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

/// The command connections, made lazily so the gateway can start (and answer
/// `/readyz` 503) while Redis is still down.
///
/// One per thread that calls the store: the gateway runs one
/// single-threaded runtime per core, and a connection's I/O is driven by a
/// task on the runtime that made it. A connection shared by all shards
/// would turn every store call into two cross-thread wake-ups (measured:
/// ~3.4 eventfd writes per upgrade, BENCHMARKS.md); one per shard keeps a
/// socket's upgrade, its Redis round trips and its relay on one thread.
///
/// `ConnectionManager` reconnects after a dropped connection by itself, but
/// it can only be built once Redis answers, and it never replaces a
/// connection that merely stops answering (a half-open socket): so a manager
/// whose command timed out is forgotten and the next call builds a new one.
struct Commands {
    client: Client,
    config: ConnectionManagerConfig,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Identifies each manager, so a caller forgets only the one that
    /// failed it, not a newer replacement.
    generation: u64,
    by_thread: Vec<(ThreadId, u64, ConnectionManager)>,
}

impl Commands {
    fn new(client: Client) -> Self {
        // One connection attempt per reconnect, no backoff sleeps: a caller
        // waiting on a reconnect would otherwise outlive `OP_DEADLINE`, and
        // every later call triggers a fresh attempt anyway.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        Commands {
            client,
            config,
            slots: Mutex::new(Slots::default()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, me: ThreadId) -> Option<(u64, ConnectionManager)> {
        let slots = self.slots();
        slots
            .by_thread
            .iter()
            .find(|(t, ..)| *t == me)
            .map(|(_, g, m)| (*g, m.clone()))
    }

    async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        let me = std::thread::current().id();
        if let Some(cached) = self.cached(me) {
            return Ok(cached);
        }
        let fresh =
            ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await?;
        let mut slots = self.slots();
        // A task on another thread of a multi-threaded runtime may finish
        // this await elsewhere: key by where the manager is stored from.
        let me = std::thread::current().id();
        if let Some((_, g, raced)) = slots.by_thread.iter().find(|(t, ..)| *t == me) {
            return Ok((*g, raced.clone()));
        }
        slots.generation += 1;
        let generation = slots.generation;
        slots.by_thread.push((me, generation, fresh.clone()));
        Ok((generation, fresh))
    }

    fn forget(&self, generation: u64) {
        self.slots().by_thread.retain(|(_, g, _)| *g != generation);
    }
}

/// Sessions in Redis, shared by every gateway instance using the same URL and
/// key prefix.
pub struct RedisStore {
    /// Behind a pointer so the `Store` enum stays small.
    inner: Arc<Inner>,
}

struct Inner {
    commands: Commands,
    keys: Keys,
    revocations: broadcast::Sender<Revocation>,
    subscribed: watch::Receiver<bool>,
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
        let keys = Keys {
            prefix: key_prefix.to_string(),
        };
        let (revocations, _) = broadcast::channel(REVOCATION_CHANNEL);
        let (subscribed_tx, subscribed) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(listen(
            client.clone(),
            keys.channel(),
            revocations.clone(),
            subscribed_tx,
            stop_rx,
        ));
        let store = RedisStore {
            inner: Arc::new(Inner {
                commands: Commands::new(client),
                keys,
                revocations,
                subscribed,
                _stop_listener: stop_tx,
            }),
        };
        let warm_up = async {
            if store.inner.commands.manager().await.is_ok() {
                let _ = store.subscription().wait_for(|s| *s).await;
            }
        };
        let _ = timeout(OP_DEADLINE, warm_up).await;
        Ok(store)
    }

    /// Whether revocations announced by other instances currently reach this
    /// one. While `false` (Redis away), they are caught only by the liveness
    /// sweep; readiness checks and tests can wait on it instead of guessing.
    pub fn subscription(&self) -> watch::Receiver<bool> {
        self.inner.subscribed.clone()
    }

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
                let (generation, conn) = self.inner.commands.manager().await?;
                used.store(generation, Ordering::Relaxed);
                match f(conn).await {
                    Err(e) if !retried && e.is_unrecoverable_error() => retried = true,
                    Err(e) => {
                        if e.is_timeout() {
                            self.inner.commands.forget(generation);
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
                self.inner.commands.forget(used.load(Ordering::Relaxed));
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

    fn invocation<'a>(&self, script: &'a Script, sid: &str) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(self.inner.keys.session(sid))
            .key(self.inner.keys.conns(sid));
        inv
    }
}

impl SessionStore for RedisStore {
    async fn create(&self, user: &str, ttl: Duration) -> Result<SessionRecord, StoreError> {
        let id = random_id();
        let mut inv = self.invocation(&CREATE, &id);
        inv.arg(user).arg(ms(ttl));
        let raw: RawRecord = self.eval("create", &inv).await?;
        Ok(to_record(&id, raw))
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
        Ok(raw.map(|r| to_record(session_id, r)))
    }

    async fn delete(&self, session_id: &str) -> Result<bool, StoreError> {
        let mut inv = self.invocation(&DELETE, session_id);
        inv.key(self.inner.keys.revoked(session_id))
            .arg(self.inner.keys.channel())
            .arg(session_id)
            .arg(random_id())
            .arg(ms(TOMBSTONE));
        let existed: bool = self.eval("delete", &inv).await?;
        // While unsubscribed our own PUBLISH would not come back to us, but
        // this instance's sockets for the session must still close now.
        if existed && !*self.inner.subscribed.borrow() {
            let _ = self.inner.revocations.send(Revocation {
                session_id: session_id.to_string(),
                reason: EndReason::Revoked,
            });
        }
        Ok(existed)
    }

    async fn attach(&self, req: LeaseRequest<'_>) -> Result<Attach, StoreError> {
        let mut inv = self.invocation(&ATTACH, req.session_id);
        inv.arg(req.conn_id)
            .arg(ms(req.lease))
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

    async fn renew(
        &self,
        session_id: &str,
        conn_ids: &[String],
        lease: Duration,
    ) -> Result<(), StoreError> {
        if conn_ids.is_empty() {
            return Ok(());
        }
        let mut inv = self.invocation(&RENEW, session_id);
        inv.arg(ms(lease)).arg(conn_ids);
        self.eval::<i64>("renew", &inv).await.map(drop)
    }

    /// One pipeline of plain `ZREM`s, not a script: removing a member never
    /// creates the key, so it needs no existence check and is safe to repeat
    /// on a retry, and it costs Redis a fraction of an `EVALSHA`; a pipeline
    /// because the leases may live in different Cluster slots.
    async fn detach_many(&self, leases: &[(String, String)]) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (session_id, conn_id) in leases {
            pipe.cmd("ZREM")
                .arg(self.inner.keys.conns(session_id))
                .arg(conn_id)
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
                    (Ok(Some(expires_ms)), _) => Ok(Liveness::Alive {
                        expires_at: expires_ms / 1000,
                    }),
                    (Ok(None), Ok(true)) => Ok(Liveness::Gone(EndReason::Revoked)),
                    (Ok(None), Ok(false)) => Ok(Liveness::Gone(EndReason::Expired)),
                    (Err(e), _) | (_, Err(e)) => Err(describe("liveness", &e)),
                }
            })
            .collect()
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
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

/// Feeds `tx` from the revocation channel for as long as the store lives,
/// resubscribing with backoff whenever Redis goes away. Uses its own
/// connection: a subscribed RESP2 connection cannot carry other commands.
async fn listen(
    client: Client,
    channel: String,
    tx: broadcast::Sender<Revocation>,
    subscribed: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = RESUBSCRIBE_MIN;
    loop {
        let ended = tokio::select! {
            _ = &mut stop => return,
            ended = follow(&client, &channel, &tx, &subscribed) => ended,
        };
        if subscribed.send_replace(false) {
            tracing::warn!(error = %ended, "revocation subscription lost; resubscribing");
            backoff = RESUBSCRIBE_MIN;
        } else {
            tracing::debug!(error = %ended, "revocation subscription not established");
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

/// One subscription, until its connection fails; always ends in an error.
async fn follow(
    client: &Client,
    channel: &str,
    tx: &broadcast::Sender<Revocation>,
    subscribed: &watch::Sender<bool>,
) -> StoreError {
    let pubsub = match timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return describe("subscribe", &e),
        Err(_) => return StoreError("redis subscribe: timed out".to_string()),
    };
    let (mut sink, mut stream) = pubsub.split();
    match timeout(RESPONSE_TIMEOUT, sink.subscribe(channel)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return describe("subscribe", &e),
        Err(_) => return StoreError("redis subscribe: timed out".to_string()),
    }
    subscribed.send_replace(true);
    tracing::info!("revocation subscription established");
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return StoreError("redis subscribe: connection lost".to_string());
                };
                match msg.get_payload::<String>() {
                    Ok(session_id) if looks_like_id(&session_id) => {
                        // No receivers is fine: no socket is open here.
                        let _ = tx.send(Revocation { session_id, reason: EndReason::Revoked });
                    }
                    _ => tracing::debug!("ignoring a malformed revocation message"),
                }
            }
            _ = heartbeat.tick() => {
                match timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return describe("heartbeat", &e),
                    Err(_) => return StoreError("redis heartbeat: timed out".to_string()),
                }
            }
        }
    }
}
