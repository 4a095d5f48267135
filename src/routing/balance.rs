//! Picking a route's upstream: the `balance` policies and passive health.
//!
//! A failed dial marks an upstream down for a cool-off; healthy upstreams are
//! tried first (in policy order), then the ones cooling off, so a route with
//! every upstream marked down still tries them rather than refusing blind.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use url::Url;

use crate::config::Balance;
use crate::time::now_unix_ms;

/// How long a failed upstream is skipped in favour of healthy ones.
pub const COOL_OFF_MS: i64 = 5_000;

#[derive(Debug)]
pub struct Upstream {
    pub url: Url,
    down_until_ms: AtomicI64,
    active: AtomicUsize,
}

#[derive(Debug)]
pub struct UpstreamPool {
    upstreams: Vec<Upstream>,
    balance: Balance,
    next: AtomicUsize,
}

/// Rendezvous (highest-random-weight) score: stable per (session, upstream),
/// so every socket of a session lands on the same runtime and removing an
/// upstream only moves the sessions that were on it. FNV-1a then a
/// splitmix64 finaliser; not cryptographic and not meant to be.
fn score(session_id: &str, url: &Url) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session_id.bytes().chain([0xff]).chain(url.as_str().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl UpstreamPool {
    pub fn new(urls: Vec<Url>, balance: Balance) -> Self {
        UpstreamPool {
            upstreams: urls
                .into_iter()
                .map(|url| Upstream {
                    url,
                    down_until_ms: AtomicI64::new(0),
                    active: AtomicUsize::new(0),
                })
                .collect(),
            balance,
            next: AtomicUsize::new(0),
        }
    }

    pub fn get(&self, i: usize) -> &Upstream {
        &self.upstreams[i]
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Indexes in the order to try them for `session_id`.
    pub fn order(&self, session_id: &str) -> Vec<usize> {
        let now = now_unix_ms();
        let n = self.upstreams.len();
        let mut idx: Vec<usize> = (0..n).collect();
        match self.balance {
            Balance::Session => {
                idx.sort_by_key(|&i| std::cmp::Reverse(score(session_id, &self.upstreams[i].url)));
            }
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
                idx.rotate_left(start);
            }
            Balance::LeastConnections => {
                idx.sort_by_key(|&i| self.upstreams[i].active.load(Ordering::Relaxed));
            }
        }
        // Stable: keeps policy order within healthy and within cooling.
        idx.sort_by_key(|&i| self.upstreams[i].down_until_ms.load(Ordering::Relaxed) > now);
        idx
    }

    pub fn mark_down(&self, i: usize) {
        self.upstreams[i]
            .down_until_ms
            .store(now_unix_ms() + COOL_OFF_MS, Ordering::Relaxed);
    }

    pub fn mark_up(&self, i: usize) {
        self.upstreams[i].down_until_ms.store(0, Ordering::Relaxed);
    }

    /// Counts one more socket on upstream `i` for `least_connections`,
    /// until a matching `leave` (the gate's `Active` guard pairs them).
    pub fn enter(&self, i: usize) {
        self.upstreams[i].active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn leave(&self, i: usize) {
        self.upstreams[i].active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(b: Balance) -> UpstreamPool {
        UpstreamPool::new(
            (0..4)
                .map(|i| Url::parse(&format!("ws://127.0.0.1:900{i}/")).unwrap())
                .collect(),
            b,
        )
    }

    #[test]
    fn session_affinity_is_stable_and_spreads() {
        let p = pool(Balance::Session);
        let first = p.order("session-a")[0];
        for _ in 0..10 {
            assert_eq!(p.order("session-a")[0], first);
        }
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            seen.insert(p.order(&format!("s{i}"))[0]);
        }
        assert_eq!(seen.len(), 4, "200 sessions should touch all 4 upstreams");
    }

    #[test]
    fn down_upstreams_go_last_and_affinity_moves_minimally() {
        let p = pool(Balance::Session);
        let order = p.order("sid");
        p.mark_down(order[0]);
        let after = p.order("sid");
        assert_eq!(after[0], order[1], "next-highest score takes over");
        assert_eq!(*after.last().unwrap(), order[0]);
        p.mark_up(order[0]);
        assert_eq!(p.order("sid")[0], order[0]);
    }

    #[test]
    fn round_robin_rotates_and_least_connections_prefers_idle() {
        let p = pool(Balance::RoundRobin);
        let firsts: Vec<usize> = (0..4).map(|_| p.order("x")[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 3]);
        let p = pool(Balance::LeastConnections);
        p.enter(0);
        p.enter(1);
        let o = p.order("x");
        assert!(o[0] == 2 || o[0] == 3);
        p.leave(0);
        assert_eq!(p.order("x")[0], 0);
    }
}
