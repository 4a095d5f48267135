//! Failed-login limiter: per client IP and per username, sliding one minute.
//!
//! Once either key has `limit` failures inside the window, *every* attempt
//! for it gets `429` until the oldest failure leaves the window. State is per
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

    /// `Err(retry_after_secs)` when this attempt must be refused.
    pub fn check(&self, ip: IpAddr, username: &str) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let wait = [Key::Ip(ip), Key::User(username.to_string())]
            .iter()
            .filter_map(|k| map.get(k))
            .filter_map(|q| {
                let recent: Vec<_> = q
                    .iter()
                    .filter(|t| now.duration_since(**t) < WINDOW)
                    .collect();
                (recent.len() as u32 >= self.limit)
                    .then(|| WINDOW.saturating_sub(now.duration_since(*recent[0])))
            })
            .max();
        match wait {
            Some(d) => Err((d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)),
            None => Ok(()),
        }
    }

    pub fn record_failure(&self, ip: IpAddr, username: &str) {
        if self.limit == 0 {
            return;
        }
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS {
            map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
            if map.len() >= MAX_KEYS
                && let Some(k) = map.keys().next().cloned()
            {
                map.remove(&k);
            }
        }
        for key in [Key::Ip(ip), Key::User(username.to_string())] {
            let q = map.entry(key).or_default();
            while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
                q.pop_front();
            }
            q.push_back(now);
            // Only the newest `limit` failures matter.
            while q.len() > self.limit as usize {
                q.pop_front();
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
            assert!(l.check(ip, "bob").is_ok());
            l.record_failure(ip, "bob");
        }
        let retry = l.check(ip, "someone-else").unwrap_err();
        assert!((1..=60).contains(&retry), "{retry}");
        assert!(
            l.check(other, "bob").is_err(),
            "username is limited from any IP"
        );
        assert!(l.check(other, "carol").is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let l = LoginLimiter::new(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            l.record_failure(ip, "bob");
        }
        assert!(l.check(ip, "bob").is_ok());
    }
}
