//! Store leases given back in batches.
//!
//! Every socket that closes must release its lease in the store. One store
//! request per close (and one task to send it) was a measurable part of an
//! upgrade's cost (BENCHMARKS.md); sockets close in bursts (a client
//! reconnecting, a revocation, a deploy), so a close only queues its lease
//! and the first one queued starts a task that lets the rest of this turn
//! of the event loop join, then sends them all as one pipeline.

use std::sync::{Arc, Mutex};

use crate::app::App;
use crate::session::SessionStore;

/// Most leases sent in one store request.
const MAX_BATCH: usize = 512;

#[derive(Default)]
pub struct Releases {
    queue: Mutex<Vec<(String, String)>>,
}

impl Releases {
    /// Queues a lease; outside a runtime (process teardown) it lapses with
    /// its TTL instead.
    pub fn push(app: &Arc<App>, session_id: String, conn_id: String) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let first = {
            let mut queue = app.releases.lock();
            queue.push((session_id, conn_id));
            queue.len() == 1
        };
        // Whoever makes the queue non-empty starts its drain, so no lease
        // waits for a drain that already took its batch. Tracked: at
        // shutdown the shard runtime (and the Redis connection the drain
        // uses) must outlive the batch; the pushing socket task is still
        // tracked here, so the tracker cannot have emptied yet.
        if first {
            app.shutdown.spawn(drain(app.clone()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends batches until the queue is empty. A drain dropped with its runtime
/// (teardown after the shutdown grace) leaves its leases to lapse with their
/// TTL, as a crashed instance would.
async fn drain(app: Arc<App>) {
    loop {
        // Sockets closing in the same turn of the event loop join the batch.
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *app.releases.lock());
        if batch.is_empty() {
            return;
        }
        send(&app, &batch).await;
    }
}

async fn send(app: &App, batch: &[(String, String)]) {
    for chunk in batch.chunks(MAX_BATCH) {
        let released =
            tokio::time::timeout(super::DETACH_TIMEOUT, app.store.detach_many(chunk)).await;
        if !matches!(released, Ok(Ok(()))) {
            // The leases lapse with their TTL (`gate::maintenance::LEASE`).
            tracing::debug!(leases = chunk.len(), "releasing leases failed");
        }
    }
}
