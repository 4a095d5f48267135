//! The Redis store's command connections: one per thread that calls it,
//! made on first use and replaced when one stops answering.

use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};

/// A dead or unreachable Redis must turn into a 503 quickly, not a hung
/// request; this bounds each TCP connect.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds each command once connected (a stalled Redis, a half-open socket).
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

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
pub(super) struct Commands {
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
    pub(super) fn new(client: Client) -> Self {
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

    pub(super) async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
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

    pub(super) fn forget(&self, generation: u64) {
        self.slots().by_thread.retain(|(_, g, _)| *g != generation);
    }
}
