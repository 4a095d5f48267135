//! The sockets open on this instance, by session, so a revocation or expiry
//! can close them; when each session is next due a look in the store; and
//! the gateway-wide socket limit.
//!
//! Two kinds of watcher register here, told apart by type: a client
//! [socket](Registry::register_socket) holds a store lease (renewed, counted
//! in `connections`), a shared-session [hub](Registry::register_hub) holds
//! none and ends through its own shutdown watch.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

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
    /// When the store should next be asked about it (Unix ms): its known
    /// expiry, or sooner after an answer that it is about to expire.
    check_at_ms: i64,
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

/// How long an ended session is remembered: longer than any upgrade takes
/// from its store check to its registration (the handshake timeout plus
/// the store's deadline), so a revocation that lands in between still
/// closes the socket as it registers.
const REMEMBER_ENDED: Duration = Duration::from_secs(60);
/// Most ended sessions remembered (the oldest are forgotten first).
const MAX_REMEMBERED: usize = 65_536;

/// Sessions ended lately, whether or not they had sockets here.
#[derive(Default)]
struct RecentlyEnded {
    order: VecDeque<(Instant, String)>,
    reasons: HashMap<String, EndReason>,
}

impl RecentlyEnded {
    fn note(&mut self, session_id: &str, reason: EndReason) {
        let now = Instant::now();
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < REMEMBER_ENDED && self.order.len() < MAX_REMEMBERED {
                break;
            }
            if let Some((_, sid)) = self.order.pop_front() {
                self.reasons.remove(&sid);
            }
        }
        if self
            .reasons
            .insert(session_id.to_string(), reason)
            .is_none()
        {
            self.order.push_back((now, session_id.to_string()));
        }
    }
}

/// Under one lock, so a socket registering while shutdown begins is either
/// told by [`Registry::close_all`] or told at once by `register_socket`.
#[derive(Default)]
struct Sessions {
    map: HashMap<String, SessionConns>,
    /// `(check_at_ms, session id)` of every session in `map`: the expiry
    /// timer of this instance is one sleep until the first of these.
    due: BTreeSet<(i64, String)>,
    /// Set by `close_all`: every later socket is closed as it registers.
    going_away: Option<Close>,
    /// A socket of one of these is closed as it registers: its upgrade
    /// passed the store check before the session ended.
    ended: RecentlyEnded,
}

impl Sessions {
    /// Moves a session's next check, keeping `due` in step with `map`.
    fn set_check(&mut self, session_id: &str, at_ms: i64) -> bool {
        let Some(entry) = self.map.get_mut(session_id) else {
            return false;
        };
        let old = std::mem::replace(&mut entry.check_at_ms, at_ms);
        self.due.remove(&(old, session_id.to_string()));
        let earliest = self.due.first().is_none_or(|(t, _)| at_ms < *t);
        self.due.insert((at_ms, session_id.to_string()));
        earliest
    }

    fn remove(&mut self, session_id: &str) -> Option<SessionConns> {
        let entry = self.map.remove(session_id)?;
        self.due
            .remove(&(entry.check_at_ms, session_id.to_string()));
        Some(entry)
    }
}

pub struct Registry {
    sessions: Mutex<Sessions>,
    /// Woken when a session becomes due before the one the expiry timer
    /// sleeps for.
    earlier_due: Notify,
    open: Arc<AtomicU32>,
    /// `server.max_connections`; a reload may change it. Lowering it below
    /// what is open closes nothing: new sockets wait until enough have gone.
    max: AtomicU32,
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
            earlier_due: Notify::new(),
            open: Arc::new(AtomicU32::new(0)),
            max: AtomicU32::new(max),
        }
    }

    /// Applies a reloaded `server.max_connections` to later reservations.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Release);
    }

    /// Takes one of `max_connections` slots, or `None` when the gateway is full.
    pub fn try_reserve(&self) -> Option<Slot> {
        let max = self.max.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
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

    /// The session's entry, created if new; its known expiry only moves
    /// forward (a socket attaching later learnt a later one).
    fn entry<'a>(
        &self,
        sessions: &'a mut Sessions,
        session_id: &str,
        expires_at: i64,
    ) -> &'a mut SessionConns {
        let known = sessions.map.get(session_id).map(|e| e.expires_at);
        if known.is_none_or(|k| expires_at > k) {
            sessions
                .map
                .entry(session_id.to_string())
                .or_default()
                .expires_at = expires_at;
            if sessions.set_check(session_id, expires_at.saturating_mul(1000)) {
                self.earlier_due.notify_one();
            }
        }
        sessions.map.get_mut(session_id).expect("inserted above")
    }

    /// Registers a client socket under its lease id.
    pub fn register_socket(&self, session_id: &str, conn_id: &str, expires_at: i64) -> CloseRx {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions();
        if let Some(cmd) = sessions.going_away {
            let _ = tx.send(cmd);
            return rx;
        }
        if let Some(&reason) = sessions.ended.reasons.get(session_id) {
            let _ = tx.send(close::session_ended(reason));
            return rx;
        }
        self.entry(&mut sessions, session_id, expires_at)
            .sockets
            .insert(conn_id.to_string(), tx);
        rx
    }

    /// Registers a shared-session hub: revocation and the sweep reach it,
    /// lease renewal and [`Registry::close_all`] skip it.
    pub fn register_hub(&self, session_id: &str, hub: HubId, expires_at: i64) -> CloseRx {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions();
        if let Some(&reason) = sessions.ended.reasons.get(session_id) {
            let _ = tx.send(close::session_ended(reason));
            return rx;
        }
        self.entry(&mut sessions, session_id, expires_at)
            .hubs
            .insert(hub, tx);
        rx
    }

    fn remove_where(&self, session_id: &str, remove: impl FnOnce(&mut SessionConns)) {
        let mut sessions = self.sessions();
        if let Some(entry) = sessions.map.get_mut(session_id) {
            remove(entry);
            if entry.is_empty() {
                sessions.remove(session_id);
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
            let mut emptied = Vec::new();
            for (sid, entry) in sessions.map.iter_mut() {
                told.extend(entry.sockets.drain().map(|(_, tx)| tx));
                if entry.is_empty() {
                    emptied.push(sid.clone());
                }
            }
            for sid in emptied {
                sessions.remove(&sid);
            }
        }
        let n = told.len();
        for tx in told {
            let _ = tx.send(cmd);
        }
        n
    }

    /// Closes every local socket and hub of a session with the close for
    /// `reason`, and any that registers later (see [`REMEMBER_ENDED`]);
    /// returns how many were told now.
    pub fn close_session(&self, session_id: &str, reason: EndReason) -> usize {
        let removed = {
            let mut sessions = self.sessions();
            sessions.ended.note(session_id, reason);
            sessions.remove(session_id)
        };
        let Some(entry) = removed else { return 0 };
        let cmd = close::session_ended(reason);
        let n = entry.sockets.len() + entry.hubs.len();
        for tx in entry.sockets.into_values().chain(entry.hubs.into_values()) {
            let _ = tx.send(cmd);
        }
        n
    }

    /// The store says the session lives until `expires_at` (Unix seconds):
    /// next look then.
    pub fn set_expiry(&self, session_id: &str, expires_at: i64) {
        let mut sessions = self.sessions();
        if let Some(e) = sessions.map.get_mut(session_id) {
            e.expires_at = expires_at;
        }
        if sessions.set_check(session_id, expires_at.saturating_mul(1000)) {
            self.earlier_due.notify_one();
        }
    }

    /// Look again at `at_ms` (Unix ms), without changing the known expiry:
    /// the session is about to expire, or the store could not be asked.
    pub fn recheck_at(&self, session_id: &str, at_ms: i64) {
        if self.sessions().set_check(session_id, at_ms) {
            self.earlier_due.notify_one();
        }
    }

    /// Sessions due a look at `now_ms`, earliest first, at most `max`.
    pub fn due(&self, now_ms: i64, max: usize) -> Vec<String> {
        self.sessions()
            .due
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .take(max)
            .map(|(_, sid)| sid.clone())
            .collect()
    }

    /// When the next session is due (Unix ms), if any.
    pub fn next_due(&self) -> Option<i64> {
        self.sessions().due.first().map(|(t, _)| *t)
    }

    /// Resolves when a session became due earlier than [`Registry::next_due`]
    /// said.
    pub async fn earlier_due(&self) {
        self.earlier_due.notified().await;
    }

    /// Every session with sockets or hubs here.
    pub fn session_ids(&self) -> Vec<String> {
        self.sessions().map.keys().cloned().collect()
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
        assert_eq!(r.session_ids(), vec!["s2".to_string()]);
        assert_eq!(r.due(99_999, 10), Vec::<String>::new());
        assert_eq!(r.due(100_000, 10), vec!["s2".to_string()]);
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
    fn hubs_are_closed_with_their_session() {
        let r = Registry::new(10);
        let _a = r.register_socket("s1", "c1", 100);
        let mut hub = r.register_hub("s1", HubId(7), 100);
        assert_eq!(r.close_session("s1", EndReason::Expired), 2);
        assert_eq!(hub.try_recv().unwrap(), close::SESSION_EXPIRED);
    }

    #[test]
    fn a_socket_of_a_session_that_ended_while_it_was_dialling_is_closed_as_it_registers() {
        let r = Registry::new(10);
        // The revocation arrives before the upgrade registers its socket.
        assert_eq!(r.close_session("s1", EndReason::Revoked), 0);
        let mut late = r.register_socket("s1", "c1", 100);
        assert_eq!(late.try_recv().unwrap(), close::SESSION_REVOKED);
        let mut hub = r.register_hub("s1", HubId(9), 100);
        assert_eq!(hub.try_recv().unwrap(), close::SESSION_REVOKED);
        assert_eq!(r.session_count(), 0, "nothing registered for it");
        let mut other = r.register_socket("s2", "c2", 100);
        assert!(other.try_recv().is_err());
    }

    #[test]
    fn the_memory_of_ended_sessions_is_bounded() {
        let mut ended = RecentlyEnded::default();
        for i in 0..MAX_REMEMBERED + 10 {
            ended.note(&format!("s{i}"), EndReason::Expired);
        }
        assert_eq!(ended.reasons.len(), MAX_REMEMBERED);
        assert_eq!(ended.order.len(), MAX_REMEMBERED);
        assert!(!ended.reasons.contains_key("s0"), "the oldest is forgotten");
    }

    #[test]
    fn sessions_fall_due_at_their_known_expiry_which_only_moves_forward() {
        let r = Registry::new(10);
        let _a = r.register_socket("s1", "c1", 100);
        let _b = r.register_socket("s2", "c2", 50);
        assert_eq!(r.next_due(), Some(50_000));
        // A later socket learnt a later expiry; an earlier one does not win.
        let _c = r.register_socket("s2", "c3", 200);
        let _d = r.register_socket("s1", "c4", 10);
        assert_eq!(r.due(150_000, 10), vec!["s1".to_string()]);
        r.recheck_at("s1", 150_250);
        assert_eq!(r.due(150_000, 10), Vec::<String>::new());
        r.set_expiry("s1", 300);
        assert_eq!(r.due(250_000, 10), vec!["s2".to_string()]);
        r.close_session("s2", EndReason::Expired);
        assert_eq!(r.next_due(), Some(300_000), "a closed session is not due");
    }

    #[tokio::test]
    async fn an_earlier_due_session_wakes_the_timer() {
        let r = Registry::new(10);
        let _a = r.register_socket("s1", "c1", 100);
        let woke = r.earlier_due();
        futures_util::pin_mut!(woke);
        // The first registration already stored a wake-up.
        assert!(futures_util::FutureExt::now_or_never(&mut woke).is_some());
        let _b = r.register_socket("s2", "c2", 200);
        let later = r.earlier_due();
        futures_util::pin_mut!(later);
        assert!(
            futures_util::FutureExt::now_or_never(&mut later).is_none(),
            "a later session needs no wake-up"
        );
        let _c = r.register_socket("s3", "c3", 50);
        assert!(futures_util::FutureExt::now_or_never(&mut later).is_some());
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
