//! In-process session store for a single instance and `demo`.
//!
//! Expiry is enforced on every read and expired entries are purged in the
//! background; the purge task holds only a `Weak` and ends with the store.
//! Socket leases need no heartbeat here: the only instance is this process,
//! and its sockets release their leases as they close. The per-user limits
//! (sessions, sockets) are exact: the count and the insert happen under
//! one lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::{
    Attach, CreateError, LeaseRequest, Liveness, REVOCATION_CHANNEL, Release, Revocation,
    SessionRecord, SessionStore, StoreError, TOMBSTONE, UserAttach, UserLease, UserLimit,
    announce_revoked,
};
use crate::ids::random_id;
use crate::time::now_unix_ms;

const PURGE_EVERY: Duration = Duration::from_secs(1);

struct Entry {
    user: String,
    created_at_ms: i64,
    expires_at_ms: i64,
    attached: bool,
    /// Conn ids of the open sockets.
    leases: HashSet<String>,
}

impl Entry {
    fn record(&self, id: &str) -> SessionRecord {
        let live = self.leases.len() as u32;
        SessionRecord::from_store(
            id,
            self.user.clone(),
            (self.created_at_ms, self.expires_at_ms),
            self.attached,
            live,
        )
    }
}

#[derive(Default)]
struct Maps {
    sessions: HashMap<String, Entry>,
    /// Session id → when the tombstone may be forgotten (Unix ms).
    tombstones: HashMap<String, i64>,
    /// User → the ids of their sessions (expired ones pruned when counted
    /// and by the purge).
    by_user: HashMap<String, HashSet<String>>,
    /// User → the conn ids of their open sockets (only with
    /// `max_connections` set); emptied by the sockets' releases.
    user_conns: HashMap<String, HashSet<String>>,
}

impl Maps {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.sessions.remove(id)?;
        if let Some(ids) = self.by_user.get_mut(&entry.user) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_user.remove(&entry.user);
            }
        }
        Some(entry)
    }

    /// The user's live sessions, after dropping the ids of ended ones.
    fn live_of(&mut self, user: &str, now: i64) -> usize {
        let Some(ids) = self.by_user.get_mut(user) else {
            return 0;
        };
        let sessions = &self.sessions;
        ids.retain(|id| sessions.get(id).is_some_and(|e| e.expires_at_ms > now));
        ids.len()
    }
}

struct Inner {
    maps: Mutex<Maps>,
    revocations: broadcast::Sender<Revocation>,
    /// Always `true`: revocations never travel anywhere to be lost.
    subscribed: watch::Sender<bool>,
    /// Always 1: the one "subscription" is the process itself.
    subscriptions: watch::Sender<u64>,
}

pub struct MemoryStore {
    inner: Arc<Inner>,
    limit: UserLimit,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Must be called inside a Tokio runtime (it starts the purge task).
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(REVOCATION_CHANNEL);
        let inner = Arc::new(Inner {
            maps: Mutex::new(Maps::default()),
            revocations: tx,
            subscribed: watch::channel(true).0,
            subscriptions: watch::channel(1).0,
        });
        tokio::spawn(purge(Arc::downgrade(&inner)));
        MemoryStore {
            inner,
            limit: UserLimit::NONE,
        }
    }

    /// Applies `auth.max_sessions_per_user` to every later `create` and
    /// `server.max_connections_per_user` to every later `attach_user`.
    pub fn with_user_limit(self, limit: UserLimit) -> Self {
        MemoryStore { limit, ..self }
    }

    pub fn user_limit(&self) -> UserLimit {
        self.limit
    }

    /// Runs `f` on a live (unexpired) entry under the lock; the lock is never
    /// held across an await because no method here awaits while holding it.
    fn with_live<T>(&self, id: &str, f: impl FnOnce(&mut Entry, i64) -> T) -> Option<T> {
        let now = now_unix_ms();
        let mut maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        match maps.sessions.get_mut(id) {
            Some(e) if e.expires_at_ms > now => Some(f(e, now)),
            Some(_) => {
                maps.remove(id);
                None
            }
            None => None,
        }
    }
}

async fn purge(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = now_unix_ms();
        let mut maps = inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.sessions.retain(|_, e| e.expires_at_ms > now);
        maps.tombstones.retain(|_, &mut until| until > now);
        let Maps {
            sessions, by_user, ..
        } = &mut *maps;
        by_user.retain(|_, ids| {
            ids.retain(|id| sessions.contains_key(id));
            !ids.is_empty()
        });
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl SessionStore for MemoryStore {
    async fn create(&self, user: &str, ttl: Duration) -> Result<SessionRecord, CreateError> {
        let now = now_unix_ms();
        let id = random_id();
        let entry = Entry {
            user: user.to_string(),
            created_at_ms: now,
            expires_at_ms: now + ms(ttl),
            attached: false,
            leases: HashSet::new(),
        };
        let record = entry.record(&id);
        let mut maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.limit.max_sessions;
        if self.limit.enabled() && maps.live_of(user, now) >= max as usize {
            return Err(CreateError::TooManySessions { max });
        }
        maps.by_user
            .entry(user.to_string())
            .or_default()
            .insert(id.clone());
        maps.sessions.insert(id, entry);
        Ok(record)
    }

    async fn get(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.with_live(session_id, |e, _| e.record(session_id)))
    }

    async fn touch(
        &self,
        session_id: &str,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.with_live(session_id, |e, now| {
            e.expires_at_ms = now + ms(ttl);
            e.record(session_id)
        }))
    }

    async fn delete(&self, session_id: &str) -> Result<bool, StoreError> {
        let now = now_unix_ms();
        let existed = {
            let mut maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
            let existed = maps
                .remove(session_id)
                .is_some_and(|e| e.expires_at_ms > now);
            if existed {
                maps.tombstones
                    .insert(session_id.to_string(), now + ms(TOMBSTONE));
            }
            existed
        };
        if existed {
            announce_revoked(&self.inner.revocations, session_id.to_string());
        }
        Ok(existed)
    }

    async fn attach(&self, req: LeaseRequest<'_>) -> Result<Attach, StoreError> {
        let out = self.with_live(req.session_id, |e, now| {
            if e.leases.len() as u32 >= req.max_per_session && !e.leases.contains(req.conn_id) {
                return Attach::Full;
            }
            e.leases.insert(req.conn_id.to_string());
            e.attached = true;
            e.expires_at_ms = now + ms(req.session_ttl);
            Attach::Attached(e.record(req.session_id))
        });
        Ok(out.unwrap_or(Attach::NotFound))
    }

    async fn heartbeat(&self, _lease: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    async fn attach_user(&self, req: UserLease<'_>) -> Result<UserAttach, StoreError> {
        let max = self.limit.max_connections as usize;
        if max == 0 {
            return Ok(UserAttach::Attached);
        }
        let mut maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        let conns = maps.user_conns.entry(req.user.to_string()).or_default();
        if conns.len() >= max && !conns.contains(req.conn_id) {
            return Ok(UserAttach::Full);
        }
        conns.insert(req.conn_id.to_string());
        Ok(UserAttach::Attached)
    }

    async fn release(&self, batch: &[Release]) -> Result<(), StoreError> {
        let now = now_unix_ms();
        let mut maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        for r in batch {
            if let Some(e) = maps.sessions.get_mut(&r.session_id) {
                if e.expires_at_ms > now {
                    e.leases.remove(&r.conn_id);
                }
            }
            let Some(user) = &r.user else { continue };
            if let Some(conns) = maps.user_conns.get_mut(user) {
                conns.remove(&r.conn_id);
                if conns.is_empty() {
                    maps.user_conns.remove(user);
                }
            }
        }
        Ok(())
    }

    async fn mark_idle(&self, session_id: &str) -> Result<(), StoreError> {
        self.with_live(session_id, |e, _| {
            if e.leases.is_empty() {
                e.attached = false;
            }
        });
        Ok(())
    }

    async fn liveness(&self, session_ids: &[String]) -> Result<Vec<Liveness>, StoreError> {
        let now = now_unix_ms();
        let maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        Ok(session_ids
            .iter()
            .map(|id| {
                let expires_at_ms = maps
                    .sessions
                    .get(id)
                    .map(|e| e.expires_at_ms)
                    .filter(|&exp| exp > now);
                Liveness::from_store(expires_at_ms, maps.tombstones.contains_key(id))
            })
            .collect())
    }

    async fn count_live(&self, session_ids: &[String]) -> Result<usize, StoreError> {
        let now = now_unix_ms();
        let maps = self.inner.maps.lock().unwrap_or_else(|p| p.into_inner());
        Ok(session_ids
            .iter()
            .filter(|id| {
                maps.sessions
                    .get(*id)
                    .is_some_and(|e| e.expires_at_ms > now)
            })
            .count())
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    fn subscription(&self) -> watch::Receiver<bool> {
        self.inner.subscribed.subscribe()
    }

    fn subscriptions(&self) -> watch::Receiver<u64> {
        self.inner.subscriptions.subscribe()
    }

    fn clock_offset_ms(&self) -> i64 {
        0
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
