//! The repair queue: undoing creates whose outcome the gateway never
//! learnt, and index removals a delete could not finish.
//!
//! # Why a compensation and not a deadline
//!
//! A create that times out on our side may still run: its command sits in
//! a socket buffer (Redis frozen, packets delayed) and Redis executes it
//! whenever it gets to it, making a session nobody has a token for. A
//! deadline inside the script would have to be on the Redis clock, which
//! the gateway only knows through a sample that ages, and the answer can be
//! late even when the script ran in time: there would always be a window
//! in which a create runs, the gateway has already answered `503`, and the
//! session lives for its whole TTL. Instead the gateway mints the id, and
//! when it answers `503` it queues the id here. The repair first writes an
//! *abandoned* marker, which `CREATE` (and `RESERVE`, in the user's slot)
//! refuse to run past, and then deletes what the create may already have
//! made; in that order no interleaving leaves a session behind, with no
//! atomicity needed across slots and no clock involved.
//!
//! The queue is bounded ([`QUEUE`] waiting plus [`QUEUE`] being retried);
//! a failed batch is retried with backoff (doubling up to [`BACKOFF_MAX`])
//! for at most [`GIVE_UP`]; both overflow and giving up are logged at
//! `error`. The queue lives in the process: a gateway that dies with
//! repairs pending leaves those sessions to their TTL.

use std::sync::Weak;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Inner;

/// Repairs waiting to be tried; beyond it a repair is dropped (logged).
pub(super) const QUEUE: usize = 4096;
/// How long an abandoned marker is kept: longer than Linux keeps
/// retransmitting an unacknowledged segment (`tcp_retries2 = 15`, about 15.4
/// minutes), after which a create still in flight is dropped with its
/// connection. A create already in Redis's buffers runs within moments of
/// the repair (they are read in the same event-loop turns).
pub(super) const MARKER: Duration = Duration::from_secs(30 * 60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A repair still failing this long after it was queued is given up.
const GIVE_UP: Duration = Duration::from_secs(60 * 60);

/// One thing to undo.
#[derive(Debug, Clone)]
pub(super) struct Repair {
    pub(super) session_id: String,
    /// Whose index holds (or may yet hold) the id; `None` when the user
    /// limit is off and nothing was indexed.
    pub(super) user: Option<String>,
    /// A create that answered `503`: mark the id abandoned, then delete its
    /// session. Otherwise (a delete whose index removal failed) only the
    /// index entry is removed.
    pub(super) abandon: bool,
    queued: Instant,
}

impl Repair {
    pub(super) fn new(session_id: String, user: Option<String>, abandon: bool) -> Self {
        Repair {
            session_id,
            user,
            abandon,
            queued: Instant::now(),
        }
    }
}

/// Queues `repair` without waiting; a full queue drops it (logged).
pub(super) fn submit(queue: &mpsc::Sender<Repair>, repair: Repair) {
    if let Err(e) = queue.try_send(repair) {
        let repair = match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        };
        tracing::error!(
            session = %repair.session_id,
            "repair queue full: this session may be left until its TTL"
        );
    }
}

/// The repair task: holds only a `Weak`, so it ends with the store (whose
/// drop also closes the queue).
pub(super) async fn run(inner: Weak<Inner>, mut queue: mpsc::Receiver<Repair>) {
    let mut pending: Vec<Repair> = Vec::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        if pending.is_empty() {
            match queue.recv().await {
                Some(r) => pending.push(r),
                None => return,
            }
            backoff = BACKOFF_MIN;
        }
        while pending.len() < QUEUE {
            match queue.try_recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        let Some(store) = inner.upgrade() else { return };
        let outcome = store.apply_repairs(&pending).await;
        drop(store);
        match outcome {
            Ok(()) => {
                tracing::info!(repairs = pending.len(), "repairs applied");
                pending.clear();
            }
            Err(e) => {
                tracing::debug!(%e, repairs = pending.len(), "repair attempt failed; retrying");
                pending.retain(|r| {
                    let keep = r.queued.elapsed() < GIVE_UP;
                    if !keep {
                        tracing::error!(
                            session = %r.session_id,
                            "repair given up after {GIVE_UP:?}: this session may be left until its TTL"
                        );
                    }
                    keep
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
