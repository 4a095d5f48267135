//! The `on_end` outbox: what the runtime must still be told about ended
//! sessions, kept in the store so that a gateway restart (or SIGKILL) does
//! not drop it, and the index that finds sessions which expired with no
//! socket open.
//!
//! Two due-time sets, both worked by every instance with no leader:
//!
//! - **tracked**: one entry per session the runtime was told of (member
//!   `<session id>:<user>`; ids never contain `:`), scored with when to look
//!   at it next: its expiry as known at the last look. Sessions slide
//!   (upgrades, refresh) without touching it; a look that finds the
//!   session alive re-scores it at its current expiry. So an expiry is
//!   found without polling every session, at one look per session per
//!   slide-that-mattered, and the hot upgrade path pays nothing.
//! - **jobs**: the `on_end` bodies still to deliver (member = the JSON body,
//!   so a second enqueue of the same end is one job), scored with when the
//!   next attempt is due.
//!
//! Claiming an entry re-scores it `visibility` into the future in the same
//! atomic step: no other instance takes it meanwhile, and if the claimer
//! dies the entry is due again once `visibility` has passed. That is the
//! whole of "at least once": an entry leaves only when its work is done
//! (a `2xx`, [`Outbox::ack`]) or handed on in one step ([`Outbox::end`]
//! moves a session from tracked to jobs).
//!
//! Redis keys share the hash tag `{hooks}` so each script's keys sit in one
//! Cluster slot: `<prefix>:{hooks}:tracked` and `<prefix>:{hooks}:jobs`
//! (sorted sets, scores Unix ms in Redis's clock, as session expiries are),
//! and `<prefix>:{hooks}:attempts` (hash job → attempts so far, for the
//! backoff). The memory store keeps the same sets in process.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::StoreError;
use crate::time::now_unix_ms;

/// Bounds each outbox call on Redis, connect included.
const OP_DEADLINE: Duration = Duration::from_secs(2);

/// The durable `on_end` queue and the expiry index; see the module docs.
pub enum Outbox {
    Memory(Mutex<MemorySets>),
    Redis(RedisOutbox),
}

/// A claimed job: its body and how many times it has been claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub body: String,
    pub attempt: u32,
}

fn tracked_member(session_id: &str, user: &str) -> String {
    format!("{session_id}:{user}")
}

/// Splits a tracked member back into (session id, user).
fn split_member(m: &str) -> Option<(String, String)> {
    m.split_once(':')
        .map(|(s, u)| (s.to_string(), u.to_string()))
}

impl Outbox {
    pub fn memory() -> Outbox {
        Outbox::Memory(Mutex::new(MemorySets::default()))
    }

    /// Never fails for an unreachable Redis: calls fail (bounded) until it
    /// answers.
    pub fn redis(redis_url: &str, key_prefix: &str) -> Result<Outbox, StoreError> {
        let client = Client::open(redis_url)
            .map_err(|e| StoreError(format!("invalid redis url: {:?}", e.kind())))?;
        Ok(Outbox::Redis(RedisOutbox {
            client,
            conn: Mutex::new(None),
            tracked: format!("{key_prefix}:{{hooks}}:tracked"),
            jobs: format!("{key_prefix}:{{hooks}}:jobs"),
            attempts: format!("{key_prefix}:{{hooks}}:attempts"),
        }))
    }

    /// Starts watching a session for its end; `due_ms` is its expiry
    /// (Unix ms, the store's clock).
    pub async fn track(&self, session_id: &str, user: &str, due_ms: i64) -> Result<(), StoreError> {
        let m = tracked_member(session_id, user);
        match self {
            Outbox::Memory(s) => {
                lock(s).tracked.put(m, due_ms);
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(&r.tracked).arg(due_ms).arg(m);
                r.query::<i64>("track", cmd).await.map(drop)
            }
        }
    }

    /// Re-scores a tracked session found alive, unless it stopped being
    /// tracked meanwhile (an end on another instance).
    pub async fn retrack(
        &self,
        session_id: &str,
        user: &str,
        due_ms: i64,
    ) -> Result<(), StoreError> {
        let m = tracked_member(session_id, user);
        match self {
            Outbox::Memory(s) => {
                lock(s).tracked.reschedule(&m, due_ms);
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(&r.tracked).arg("XX").arg(due_ms).arg(m);
                r.query::<i64>("retrack", cmd).await.map(drop)
            }
        }
    }

    /// Stops watching a session without reporting it: one the runtime
    /// refused, or one whose end is reported by whoever ended it.
    pub async fn untrack(&self, session_id: &str, user: &str) -> Result<(), StoreError> {
        let m = tracked_member(session_id, user);
        match self {
            Outbox::Memory(s) => {
                lock(s).tracked.remove(&m);
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&r.tracked).arg(m);
                r.query::<i64>("untrack", cmd).await.map(drop)
            }
        }
    }

    /// A session ends: in one step it stops being tracked and its `on_end`
    /// `body` is queued, due in `delay` (a job already queued keeps its
    /// schedule). Queued *before* the session is deleted, with a delay, so
    /// a crash between the two cannot lose the report; the deleter then
    /// makes it due at once with [`retry`](Self::retry)`(body, 0)`.
    pub async fn end(
        &self,
        session_id: &str,
        user: &str,
        body: &str,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let m = tracked_member(session_id, user);
        match self {
            Outbox::Memory(s) => {
                let mut s = lock(s);
                s.tracked.remove(&m);
                if !s.jobs.contains(body) {
                    s.jobs
                        .put(body.to_string(), now_unix_ms() + delay.as_millis() as i64);
                }
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut inv = END.prepare_invoke();
                inv.key(&r.tracked)
                    .key(&r.jobs)
                    .arg(m)
                    .arg(body)
                    .arg(delay.as_millis() as u64);
                r.invoke::<i64>("end", &inv).await.map(drop)
            }
        }
    }

    /// Up to `limit` tracked sessions whose look is due, each hidden from
    /// other claims for `visibility`: (session id, user).
    pub async fn claim_tracked(
        &self,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let members = match self {
            Outbox::Memory(s) => lock(s)
                .tracked
                .claim(now_unix_ms(), visibility, limit)
                .into_iter()
                .map(|(m, _)| m)
                .collect(),
            Outbox::Redis(r) => r
                .claim(&r.tracked, None, limit, visibility)
                .await?
                .into_iter()
                .map(|(m, _)| m)
                .collect::<Vec<_>>(),
        };
        Ok(members.iter().filter_map(|m| split_member(m)).collect())
    }

    /// Up to `limit` jobs due now, each hidden from other claims for
    /// `visibility` (longer than one delivery attempt can take).
    pub async fn claim_jobs(
        &self,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let claimed = match self {
            Outbox::Memory(s) => {
                let mut s = lock(s);
                let due = s.jobs.claim(now_unix_ms(), visibility, limit);
                due.into_iter()
                    .map(|(m, _)| {
                        let n = s.attempts.entry(m.clone()).or_insert(0);
                        *n += 1;
                        (m, *n)
                    })
                    .collect()
            }
            Outbox::Redis(r) => {
                r.claim(&r.jobs, Some(&r.attempts), limit, visibility)
                    .await?
            }
        };
        Ok(claimed
            .into_iter()
            .map(|(body, attempt)| Claimed { body, attempt })
            .collect())
    }

    /// The runtime took the job: it is gone for good.
    pub async fn ack(&self, body: &str) -> Result<(), StoreError> {
        match self {
            Outbox::Memory(s) => {
                let mut s = lock(s);
                s.jobs.remove(body);
                s.attempts.remove(body);
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("ZREM")
                    .arg(&r.jobs)
                    .arg(body)
                    .ignore()
                    .cmd("HDEL")
                    .arg(&r.attempts)
                    .arg(body)
                    .ignore();
                r.pipeline("ack", pipe).await
            }
        }
    }

    /// The runtime did not take the job: try again in `delay` (an entry
    /// acked meanwhile elsewhere stays gone).
    pub async fn retry(&self, body: &str, delay: Duration) -> Result<(), StoreError> {
        match self {
            Outbox::Memory(s) => {
                lock(s)
                    .jobs
                    .reschedule(body, now_unix_ms() + delay.as_millis() as i64);
                Ok(())
            }
            Outbox::Redis(r) => {
                let mut inv = RETRY.prepare_invoke();
                inv.key(&r.jobs).arg(delay.as_millis() as u64).arg(body);
                r.invoke::<i64>("retry", &inv).await.map(drop)
            }
        }
    }

    /// Jobs waiting (due or not), for tests and metrics.
    pub async fn pending_jobs(&self) -> Result<usize, StoreError> {
        match self {
            Outbox::Memory(s) => Ok(lock(s).jobs.by_member.len()),
            Outbox::Redis(r) => {
                let mut cmd = redis::cmd("ZCARD");
                cmd.arg(&r.jobs);
                r.query::<usize>("pending", cmd).await
            }
        }
    }
}

fn lock(s: &Mutex<MemorySets>) -> std::sync::MutexGuard<'_, MemorySets> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The memory store's outbox: the same two sets, in process.
#[derive(Default)]
pub struct MemorySets {
    tracked: DueSet,
    jobs: DueSet,
    attempts: HashMap<String, u32>,
}

/// A sorted set by due time, like a Redis ZSET.
#[derive(Default)]
struct DueSet {
    by_member: HashMap<String, i64>,
    by_due: BTreeSet<(i64, String)>,
}

impl DueSet {
    fn put(&mut self, m: String, due: i64) {
        if let Some(old) = self.by_member.insert(m.clone(), due) {
            self.by_due.remove(&(old, m.clone()));
        }
        self.by_due.insert((due, m));
    }
    fn reschedule(&mut self, m: &str, due: i64) {
        if self.by_member.contains_key(m) {
            self.put(m.to_string(), due);
        }
    }
    fn remove(&mut self, m: &str) {
        if let Some(old) = self.by_member.remove(m) {
            self.by_due.remove(&(old, m.to_string()));
        }
    }
    fn contains(&self, m: &str) -> bool {
        self.by_member.contains_key(m)
    }
    fn claim(&mut self, now: i64, visibility: Duration, limit: usize) -> Vec<(String, u32)> {
        let due: Vec<String> = self
            .by_due
            .iter()
            .take_while(|(t, _)| *t <= now)
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect();
        let hidden_until = now + visibility.as_millis() as i64;
        for m in &due {
            self.put(m.clone(), hidden_until);
        }
        due.into_iter().map(|m| (m, 0)).collect()
    }
}

/// The Redis outbox: its own connection (made on first use, forgotten after
/// a failure so the next call makes a fresh one), separate from the session
/// store's so that this queue's traffic never waits behind upgrades.
pub struct RedisOutbox {
    client: Client,
    conn: Mutex<Option<ConnectionManager>>,
    tracked: String,
    jobs: String,
    attempts: String,
}

/// Shared by the scripts: Redis's clock in ms.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// KEYS[1]: the set, KEYS[2] (optional): attempts hash. ARGV: limit,
/// visibility ms. Answers `{member, attempts, ...}` (attempts 0 without a
/// hash).
static CLAIM: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        r#"{NOW}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {{}}
local hidden = string.format('%d', now + tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], hidden, m)
  local n = 0
  if KEYS[2] then n = redis.call('HINCRBY', KEYS[2], m, 1) end
  out[#out + 1] = m
  out[#out + 1] = n
end
return out
"#
    ))
});

/// KEYS[1]: tracked, KEYS[2]: jobs. ARGV: tracked member, job body, delay ms.
static END: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        r#"{NOW}
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('ZADD', KEYS[2], 'NX', string.format('%d', now + tonumber(ARGV[3])), ARGV[2])
"#
    ))
});

/// KEYS[1]: jobs. ARGV: delay ms, job body. `XX`: an acked job stays gone.
static RETRY: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        r#"{NOW}
return redis.call('ZADD', KEYS[1], 'XX', string.format('%d', now + tonumber(ARGV[1])), ARGV[2])
"#
    ))
});

impl RedisOutbox {
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let kept = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = kept {
            return Ok(c);
        }
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1));
        let c = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|e| StoreError(format!("redis outbox connect: {:?}", e.kind())))?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on the connection within [`OP_DEADLINE`]; a failure forgets
    /// the connection (it may be half-open).
    async fn with<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let c = self.connection().await?;
            f(c).await
                .map_err(|e| StoreError(format!("redis outbox {op}: {:?}", e.kind())))
        };
        let r = match tokio::time::timeout(OP_DEADLINE, attempt).await {
            Ok(r) => r,
            Err(_) => Err(StoreError(format!("redis outbox {op}: timed out"))),
        };
        if r.is_err() {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        r
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        self.with(op, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    async fn pipeline(&self, op: &'static str, pipe: redis::Pipeline) -> Result<(), StoreError> {
        self.with(op, |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.with(op, |mut c| async move { inv.invoke_async(&mut c).await })
            .await
    }

    async fn claim(
        &self,
        set: &str,
        attempts: Option<&str>,
        limit: usize,
        visibility: Duration,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let mut inv = CLAIM.prepare_invoke();
        inv.key(set);
        if let Some(a) = attempts {
            inv.key(a);
        }
        inv.arg(limit).arg(visibility.as_millis() as u64);
        let flat: Vec<redis::Value> = self.invoke("claim", &inv).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            if let [m, n] = pair {
                let m: String = redis::from_redis_value(m)
                    .map_err(|_| StoreError("redis outbox claim: bad reply".into()))?;
                let n: u32 = redis::from_redis_value(n).unwrap_or(0);
                out.push((m, n));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_claims_hide_until_visibility_and_end_moves_to_jobs() {
        let o = Outbox::memory();
        let now = now_unix_ms();
        o.track("s1", "alice", now - 1).await.unwrap();
        o.track("s2", "bob", now + 60_000).await.unwrap();
        let due = o.claim_tracked(10, Duration::from_secs(30)).await.unwrap();
        assert_eq!(due, vec![("s1".to_string(), "alice".to_string())]);
        // Hidden now: a second claim finds nothing.
        assert!(
            o.claim_tracked(10, Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty()
        );
        o.end("s1", "alice", "{job}", Duration::ZERO).await.unwrap();
        o.end("s1", "alice", "{job}", Duration::ZERO).await.unwrap();
        assert_eq!(o.pending_jobs().await.unwrap(), 1);
        let jobs = o.claim_jobs(10, Duration::ZERO).await.unwrap();
        assert_eq!(jobs[0].attempt, 1);
        o.retry("{job}", Duration::ZERO).await.unwrap();
        assert_eq!(
            o.claim_jobs(10, Duration::ZERO).await.unwrap()[0].attempt,
            2
        );
        o.ack("{job}").await.unwrap();
        assert_eq!(o.pending_jobs().await.unwrap(), 0);
        // A retry after the ack does not bring it back.
        o.retry("{job}", Duration::ZERO).await.unwrap();
        assert_eq!(o.pending_jobs().await.unwrap(), 0);
    }
}
