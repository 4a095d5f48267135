//! Store leases of closed sockets, given back in batches.
//!
//! Every socket that closes must release its lease in the store (and its
//! slot in its user's count, when `server.max_connections_per_user` is
//! set: part of the same batch, not a request of its own). One store
//! request per close (and one task to send it) was a measurable part of an
//! upgrade's cost (BENCHMARKS.md); sockets close in bursts (a client
//! reconnecting, a revocation, a deploy), so a close only queues its lease
//! and the first one queued starts a task that lets the rest of this turn
//! of the event loop join, then sends them all as one pipeline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::session::{Release, SessionStore, Store};
use crate::shutdown::Shutdown;

/// Most leases sent in one store request.
const MAX_BATCH: usize = 512;
/// How long releasing one batch may take; after it the entries stay until
/// this instance's heartbeat lapses (or the next attach of their session
/// after that cleans them).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The release queue; cheap to clone (one shared queue).
#[derive(Clone)]
pub struct Releases {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<Vec<Release>>,
    store: Arc<Store>,
    /// Drains are tracked: at shutdown the shard runtime (and the Redis
    /// connection the drain uses) must outlive the batch.
    shutdown: Shutdown,
}

impl Releases {
    pub fn new(store: Arc<Store>, shutdown: Shutdown) -> Self {
        Releases {
            inner: Arc::new(Inner {
                queue: Mutex::new(Vec::new()),
                store,
                shutdown,
            }),
        }
    }

    /// Queues a lease; outside a runtime (process teardown) it lapses with
    /// this instance's heartbeat instead.
    pub fn push(&self, release: Release) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let first = {
            let mut queue = self.inner.lock();
            queue.push(release);
            queue.len() == 1
        };
        // Whoever makes the queue non-empty starts its drain, so no lease
        // waits for a drain that already took its batch. The pushing socket
        // task is still tracked, so the tracker cannot have emptied yet.
        if first {
            self.inner.shutdown.spawn(drain(self.inner.clone()));
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Release>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends batches until the queue is empty. A drain dropped with its runtime
/// (teardown after the shutdown grace) leaves its leases to lapse with the
/// instance's heartbeat, as a crashed instance's would.
async fn drain(inner: Arc<Inner>) {
    loop {
        // Sockets closing in the same turn of the event loop join the batch.
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *inner.lock());
        if batch.is_empty() {
            return;
        }
        for chunk in batch.chunks(MAX_BATCH) {
            let released = tokio::time::timeout(RELEASE_TIMEOUT, inner.store.release(chunk)).await;
            if !matches!(released, Ok(Ok(()))) {
                // The entries stay until this instance's heartbeat lapses.
                tracing::debug!(leases = chunk.len(), "releasing leases failed");
            }
        }
    }
}
