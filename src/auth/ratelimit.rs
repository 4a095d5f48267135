//! Failed-login limiter: per client IP and per username, sliding one minute.
//!
//! Once either key has `limit` failures inside the window, *every* attempt
//! for it gets `429` until the oldest failure leaves the window. An attempt
//! is counted when it is admitted, before its password is checked, so
//! concurrent attempts cannot all pass the check before any of them has
//! failed; a success gives its attempt back. State is per
//! instance (documented in README); the map is bounded so a spray of random
//! usernames cannot grow memory without end.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at most; past this, stale keys are purged and then the
/// oldest-touched arbitrary key is evicted.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    User(String),
}

pub struct LoginLimiter {
    limit: u32,
    failures: Mutex<HashMap<Key, VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// `limit == 0` disables limiting.
    pub fn new(limit: u32) -> Self {
        LoginLimiter {
            limit,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Checks and counts an attempt in one step: `Err(retry_after_secs)`
    /// when it must be refused, else a [`Reservation`] that already counts
    /// as a failure for the IP and the username. Concurrent attempts thus
    /// see each other: at most `limit` can be in flight or failed inside
    /// the window, however many arrive at once. Give the reservation back
    /// with [`Reservation::succeeded`] when the attempt turns out not to be
    /// a failure; dropped otherwise (wrong password, or the client gone
    /// mid-check), it stays counted.
    pub fn reserve(&self, ip: IpAddr, username: &str) -> Result<Reservation<'_>, u64> {
        let keys = [Key::Ip(ip), Key::User(username.to_string())];
        if self.limit == 0 {
            return Ok(Reservation {
                limiter: self,
                keys,
                at: None,
            });
        }
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let wait = keys
            .iter()
            .filter_map(|k| map.get(k))
            .filter_map(|q| {
                let mut recent = q.iter().filter(|t| now.duration_since(**t) < WINDOW);
                let oldest = *recent.next()?;
                (1 + recent.count() as u32 >= self.limit)
                    .then(|| WINDOW.saturating_sub(now.duration_since(oldest)))
            })
            .max();
        if let Some(d) = wait {
            return Err((d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1));
        }
        if map.len() >= MAX_KEYS {
            map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
            if map.len() >= MAX_KEYS
                && let Some(k) = map.keys().next().cloned()
            {
                map.remove(&k);
            }
        }
        for key in &keys {
            let q = map.entry(key.clone()).or_default();
            while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
                q.pop_front();
            }
            q.push_back(now);
            // Only the newest `limit` failures matter.
            while q.len() > self.limit as usize {
                q.pop_front();
            }
        }
        drop(map);
        Ok(Reservation {
            limiter: self,
            keys,
            at: Some(now),
        })
    }
}

/// One attempt, counted as a failure until [`Reservation::succeeded`].
#[must_use = "dropping a reservation counts the attempt as a failure"]
pub struct Reservation<'a> {
    limiter: &'a LoginLimiter,
    keys: [Key; 2],
    /// `None` when limiting is off.
    at: Option<Instant>,
}

impl Reservation<'_> {
    /// The attempt failed (wrong password): it stays counted, as it does
    /// when a reservation is dropped unsettled (the client left mid-check).
    pub fn failed(self) {}

    /// The attempt was not a failure (right password, or the verifier could
    /// not decide): it no longer counts.
    pub fn succeeded(self) {
        let Some(at) = self.at else { return };
        let mut map = self
            .limiter
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(q) = map.get_mut(key) {
                if let Some(i) = q.iter().rposition(|t| *t == at) {
                    q.remove(i);
                }
                if q.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_by_ip_and_by_user() {
        let l = LoginLimiter::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            l.reserve(ip, "bob").expect("under the limit").failed();
        }
        let retry = l.reserve(ip, "someone-else").err().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert!(
            l.reserve(other, "bob").is_err(),
            "username is limited from any IP"
        );
        assert!(l.reserve(other, "carol").is_ok());
    }

    #[test]
    fn attempts_in_flight_count_before_they_fail() {
        let l = LoginLimiter::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let in_flight: Vec<_> = (0..3).map(|_| l.reserve(ip, "bob").unwrap()).collect();
        assert!(l.reserve(ip, "bob").is_err(), "a fourth concurrent attempt");
        // Successes give their attempt back; the rest stay counted.
        let mut in_flight = in_flight.into_iter();
        in_flight.next().unwrap().succeeded();
        assert!(l.reserve(ip, "bob").is_ok());
        assert!(l.reserve(ip, "bob").is_err());
    }

    #[test]
    fn a_success_gives_back_only_its_own_attempt() {
        let l = LoginLimiter::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        l.reserve(ip, "bob").unwrap().failed();
        l.reserve(ip, "bob").unwrap().succeeded();
        l.reserve(ip, "bob").unwrap().failed();
        assert!(l.reserve(ip, "bob").is_err());
    }

    #[test]
    fn zero_means_unlimited() {
        let l = LoginLimiter::new(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            l.reserve(ip, "bob").unwrap().failed();
        }
        assert!(l.reserve(ip, "bob").is_ok());
    }
}
