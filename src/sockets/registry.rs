//! The sockets open on this instance, by session, so a revocation or expiry
//! can close them and their store leases can be renewed; and the
//! gateway-wide socket limit.
//!
//! Two kinds of watcher register here, told apart by type: a client
//! [socket](Registry::register_socket) holds a store lease (renewed, counted
//! in `connections`), a shared-session [hub](Registry::register_hub) holds
//! none and ends through its own shutdown watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::close::{self, Close};
use crate::session::EndReason;

/// How a registered watcher is told to close.
pub type CloseRx = oneshot::Receiver<Close>;

/// Identifies a hub in the registry; unique per process, so an old hub's
/// teardown can never unregister its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HubId(pub u64);

#[derive(Default)]
struct SessionConns {
    /// When the session expires as far as we last heard (Unix seconds).
    expires_at: i64,
    /// Lease id → how to tell that client socket to close.
    sockets: HashMap<String, oneshot::Sender<Close>>,
    /// The session's hubs on this instance (no store lease).
    hubs: HashMap<HubId, oneshot::Sender<Close>>,
}

impl SessionConns {
    fn is_empty(&self) -> bool {
        self.sockets.is_empty() && self.hubs.is_empty()
    }
}

/// A snapshot row for the maintenance tasks.
pub struct SessionSnapshot {
    pub session_id: String,
    /// Lease ids of the client sockets (hubs hold no lease).
    pub conn_ids: Vec<String>,
    pub expires_at: i64,
}

/// Under one lock, so a socket registering while shutdown begins is either
/// told by [`Registry::close_all`] or told at once by `register_socket`.
#[derive(Default)]
struct Sessions {
    map: HashMap<String, SessionConns>,
    /// Set by `close_all`: every later socket is closed as it registers.
    going_away: Option<Close>,
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

    fn entry<'a>(
        sessions: &'a mut Sessions,
        session_id: &str,
        expires_at: i64,
    ) -> &'a mut SessionConns {
        let entry = sessions.map.entry(session_id.to_string()).or_default();
        entry.expires_at = entry.expires_at.max(expires_at);
        entry
    }

    /// Registers a client socket under its lease id.
    pub fn register_socket(&self, session_id: &str, conn_id: &str, expires_at: i64) -> CloseRx {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions();
        if let Some(cmd) = sessions.going_away {
            let _ = tx.send(cmd);
            return rx;
        }
        Self::entry(&mut sessions, session_id, expires_at)
            .sockets
            .insert(conn_id.to_string(), tx);
        rx
    }

    /// Registers a shared-session hub: revocation and the sweep reach it,
    /// lease renewal and [`Registry::close_all`] skip it.
    pub fn register_hub(&self, session_id: &str, hub: HubId, expires_at: i64) -> CloseRx {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions();
        Self::entry(&mut sessions, session_id, expires_at)
            .hubs
            .insert(hub, tx);
        rx
    }

    fn remove_where(&self, session_id: &str, remove: impl FnOnce(&mut SessionConns)) {
        let mut sessions = self.sessions();
        if let Some(entry) = sessions.map.get_mut(session_id) {
            remove(entry);
            if entry.is_empty() {
                sessions.map.remove(session_id);
            }
        }
    }

    pub fn unregister_socket(&self, session_id: &str, conn_id: &str) {
        self.remove_where(session_id, |e| {
            e.sockets.remove(conn_id);
        });
    }

    pub fn unregister_hub(&self, session_id: &str, hub: HubId) {
        self.remove_where(session_id, |e| {
            e.hubs.remove(&hub);
        });
    }

    /// Tells every client socket (not hubs: they watch shutdown themselves)
    /// to close with `cmd`, now and as each later one registers. Used when
    /// shutdown begins: a socket then needs no shutdown future of its own,
    /// which would be one more waiter on a process-wide lock per relay step.
    pub fn close_all(&self, cmd: Close) -> usize {
        let mut told = Vec::new();
        {
            let mut sessions = self.sessions();
            sessions.going_away = Some(cmd);
            sessions.map.retain(|_, entry| {
                told.extend(entry.sockets.drain().map(|(_, tx)| tx));
                !entry.is_empty()
            });
        }
        let n = told.len();
        for tx in told {
            let _ = tx.send(cmd);
        }
        n
    }

    /// Closes every local socket and hub of a session with the close for
    /// `reason`; returns how many were told.
    pub fn close_session(&self, session_id: &str, reason: EndReason) -> usize {
        let removed = self.sessions().map.remove(session_id);
        let Some(entry) = removed else { return 0 };
        let cmd = close::session_ended(reason);
        let n = entry.sockets.len() + entry.hubs.len();
        for tx in entry.sockets.into_values().chain(entry.hubs.into_values()) {
            let _ = tx.send(cmd);
        }
        n
    }

    pub fn set_expiry(&self, session_id: &str, expires_at: i64) {
        if let Some(e) = self.sessions().map.get_mut(session_id) {
            e.expires_at = expires_at;
        }
    }

    /// Sessions with sockets or hubs here; `due_by` keeps only those whose
    /// known expiry is at or before it (Unix seconds).
    pub fn snapshot(&self, due_by: Option<i64>) -> Vec<SessionSnapshot> {
        let sessions = self.sessions();
        sessions
            .map
            .iter()
            .filter(|(_, e)| due_by.is_none_or(|t| e.expires_at <= t))
            .map(|(sid, e)| SessionSnapshot {
                session_id: sid.clone(),
                conn_ids: e.sockets.keys().cloned().collect(),
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
        let mut a = r.register_socket("s1", "c1", 100);
        let mut b = r.register_socket("s1", "c2", 100);
        let mut other = r.register_socket("s2", "c3", 100);
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
        let mut a = r.register_socket("s1", "c1", 100);
        let mut hub = r.register_hub("s1", HubId(1), 100);
        let bye = close::GOING_AWAY;
        assert_eq!(r.close_all(bye), 1);
        assert_eq!(a.try_recv().unwrap(), bye);
        assert!(
            hub.try_recv().is_err(),
            "hubs end through their own shutdown watch"
        );
        let mut late = r.register_socket("s2", "c2", 100);
        assert_eq!(late.try_recv().unwrap(), bye);
        assert_eq!(r.session_count(), 1, "only the hub is still registered");
    }

    #[test]
    fn hubs_are_revoked_but_hold_no_lease() {
        let r = Registry::new(10);
        let _a = r.register_socket("s1", "c1", 100);
        let mut hub = r.register_hub("s1", HubId(7), 100);
        let rows = r.snapshot(None);
        assert_eq!(rows[0].conn_ids, vec!["c1".to_string()], "no hub lease");
        assert_eq!(r.close_session("s1", EndReason::Expired), 2);
        assert_eq!(hub.try_recv().unwrap(), close::SESSION_EXPIRED);
    }

    #[test]
    fn unregistering_the_last_watcher_forgets_the_session() {
        let r = Registry::new(10);
        let _a = r.register_socket("s1", "c1", 100);
        let _h = r.register_hub("s1", HubId(2), 100);
        r.unregister_hub("s1", HubId(3));
        r.unregister_socket("s1", "c1");
        assert_eq!(r.session_count(), 1, "hub 2 is still there");
        r.unregister_hub("s1", HubId(2));
        assert_eq!(r.session_count(), 0);
    }
}
