//! The sockets open on this instance, by session, so a revocation or expiry
//! can close them, and so their store leases can be renewed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::proxy::relay::CloseCmd;
use crate::session::EndReason;

/// Ids of registry entries that hold no store lease. Lease ids are
/// URL-safe base64 and never contain ':'.
pub const UNLEASED_PREFIX: &str = "hub:";

struct SessionConns {
    /// When the session expires as far as we last heard (Unix seconds).
    expires_at: i64,
    /// Lease id → how to tell that socket to close.
    conns: HashMap<String, oneshot::Sender<CloseCmd>>,
}

/// A snapshot row for the maintenance tasks.
pub struct SessionSnapshot {
    pub session_id: String,
    pub conn_ids: Vec<String>,
    pub expires_at: i64,
}

/// Under one lock, so a socket registering while shutdown begins is either
/// told by [`Registry::close_all`] or told at once by `register`.
#[derive(Default)]
struct Sessions {
    map: HashMap<String, SessionConns>,
    /// Set by `close_all`: every later socket is closed as it registers.
    going_away: Option<CloseCmd>,
}

pub struct Registry {
    sessions: Mutex<Sessions>,
    open: Arc<AtomicU32>,
    max: u32,
}

/// A gateway-wide socket slot; released on drop.
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    pub fn new(max: u32) -> Self {
        Registry {
            sessions: Mutex::new(Sessions::default()),
            open: Arc::new(AtomicU32::new(0)),
            max,
        }
    }

    /// Takes one of `max_connections` slots, or `None` when the gateway is full.
    pub fn try_reserve(&self) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.open.clone()))
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    pub fn register(
        &self,
        session_id: &str,
        conn_id: &str,
        expires_at: i64,
    ) -> oneshot::Receiver<CloseCmd> {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions();
        if let Some(cmd) = sessions.going_away
            && !conn_id.starts_with(UNLEASED_PREFIX)
        {
            let _ = tx.send(cmd);
            return rx;
        }
        let entry = sessions
            .map
            .entry(session_id.to_string())
            .or_insert_with(|| SessionConns {
                expires_at,
                conns: HashMap::new(),
            });
        entry.expires_at = entry.expires_at.max(expires_at);
        entry.conns.insert(conn_id.to_string(), tx);
        rx
    }

    /// Registers a watcher that holds no store lease (a shared-session hub):
    /// revocation and the sweep reach it, lease renewal skips it.
    pub fn register_unleased(
        &self,
        session_id: &str,
        watcher_id: &str,
        expires_at: i64,
    ) -> oneshot::Receiver<CloseCmd> {
        debug_assert!(watcher_id.starts_with(UNLEASED_PREFIX));
        self.register(session_id, watcher_id, expires_at)
    }

    pub fn unregister(&self, session_id: &str, conn_id: &str) {
        let mut sessions = self.sessions();
        if let Some(entry) = sessions.map.get_mut(session_id) {
            entry.conns.remove(conn_id);
            if entry.conns.is_empty() {
                sessions.map.remove(session_id);
            }
        }
    }

    /// Tells every socket (not hubs: they watch shutdown themselves) to
    /// close with `cmd`, now and as each later one registers. Used when
    /// shutdown begins: a socket then needs no shutdown future of its own,
    /// which would be one more waiter on a process-wide lock per relay step.
    pub fn close_all(&self, cmd: CloseCmd) -> usize {
        let mut told = Vec::new();
        {
            let mut sessions = self.sessions();
            sessions.going_away = Some(cmd);
            sessions.map.retain(|_, entry| {
                let ids: Vec<String> = entry
                    .conns
                    .keys()
                    .filter(|id| !id.starts_with(UNLEASED_PREFIX))
                    .cloned()
                    .collect();
                for id in ids {
                    if let Some(tx) = entry.conns.remove(&id) {
                        told.push(tx);
                    }
                }
                !entry.conns.is_empty()
            });
        }
        let n = told.len();
        for tx in told {
            let _ = tx.send(cmd);
        }
        n
    }

    /// Closes every local socket of a session with `1008` and the reason;
    /// returns how many were told.
    pub fn close_session(&self, session_id: &str, reason: EndReason) -> usize {
        let removed = self.sessions().map.remove(session_id);
        let Some(entry) = removed else { return 0 };
        let cmd = CloseCmd {
            code: 1008,
            reason: reason.close_reason(),
        };
        let n = entry.conns.len();
        for (_, tx) in entry.conns {
            let _ = tx.send(cmd);
        }
        n
    }

    pub fn set_expiry(&self, session_id: &str, expires_at: i64) {
        if let Some(e) = self.sessions().map.get_mut(session_id) {
            e.expires_at = expires_at;
        }
    }

    /// Sessions with sockets here; `due_by` keeps only those whose known
    /// expiry is at or before it (Unix seconds).
    pub fn snapshot(&self, due_by: Option<i64>) -> Vec<SessionSnapshot> {
        let sessions = self.sessions();
        sessions
            .map
            .iter()
            .filter(|(_, e)| due_by.is_none_or(|t| e.expires_at <= t))
            .map(|(sid, e)| SessionSnapshot {
                session_id: sid.clone(),
                conn_ids: e
                    .conns
                    .keys()
                    .filter(|id| !id.starts_with(UNLEASED_PREFIX))
                    .cloned()
                    .collect(),
                expires_at: e.expires_at,
            })
            .collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_released() {
        let r = Registry::new(2);
        let a = r.try_reserve().unwrap();
        let _b = r.try_reserve().unwrap();
        assert!(r.try_reserve().is_none());
        drop(a);
        assert!(r.try_reserve().is_some());
    }

    #[test]
    fn close_session_tells_every_socket_once() {
        let r = Registry::new(10);
        let mut a = r.register("s1", "c1", 100);
        let mut b = r.register("s1", "c2", 100);
        let mut other = r.register("s2", "c3", 100);
        assert_eq!(r.close_session("s1", EndReason::Revoked), 2);
        assert_eq!(a.try_recv().unwrap().reason, "session_revoked");
        assert_eq!(b.try_recv().unwrap().code, 1008);
        assert!(other.try_recv().is_err());
        assert_eq!(r.close_session("s1", EndReason::Revoked), 0);
        assert_eq!(r.snapshot(None).len(), 1);
        assert_eq!(r.snapshot(Some(99)).len(), 0);
    }

    #[test]
    fn close_all_tells_sockets_now_and_later_but_not_hubs() {
        let r = Registry::new(10);
        let mut a = r.register("s1", "c1", 100);
        let mut hub = r.register_unleased("s1", "hub:x:1", 100);
        let bye = crate::proxy::relay::GOING_AWAY;
        assert_eq!(r.close_all(bye), 1);
        assert_eq!(a.try_recv().unwrap(), bye);
        assert!(
            hub.try_recv().is_err(),
            "hubs end through their own shutdown watch"
        );
        let mut late = r.register("s2", "c2", 100);
        assert_eq!(late.try_recv().unwrap(), bye);
        assert_eq!(r.session_count(), 1, "only the hub is still registered");
    }
}
