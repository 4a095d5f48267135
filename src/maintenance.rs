//! Background work that keeps this instance's open sockets honest:
//!
//! - **revocations**: a session ended on any instance → close its sockets
//!   here (the fast path, via the store's pub/sub);
//! - **sweep**: sessions near their known expiry are checked every tick and
//!   every session with sockets here every few seconds, in batched store
//!   calls, so an expiry — or a revocation whose message was lost while the
//!   store restarted — still closes the sockets;
//! - **leases**: renew the store leases of sockets still open, so a crashed
//!   instance's sockets stop counting once their leases lapse.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

use crate::hub::Hubs;
use crate::session::{EndReason, Liveness, SessionStore, Store};
use crate::sockets::Sockets;
use crate::telemetry::{Metrics, ReasonLabel};
use crate::time::now_unix;

/// Renewed well within `sockets::LEASE`, so two renewals can fail before a
/// live socket stops counting.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Expiry must close sockets within one second (SPEC §5).
const SWEEP_TICK: Duration = Duration::from_millis(250);
/// Every this many ticks, every session is checked, not just the due ones.
const FULL_SWEEP_TICKS: u32 = 4;
const SWEEP_BATCH: usize = 500;
/// A shared-route hub whose runtime dial failed is kept this long for a
/// retry, then forgotten.
const UNLINKED_HUB_TTL: Duration = Duration::from_secs(30);
const RENEW_CONCURRENCY: usize = 32;

/// What the maintenance tasks work on.
#[derive(Clone)]
pub struct Maintenance {
    pub store: Arc<Store>,
    pub sockets: Sockets,
    pub hubs: Hubs,
    pub metrics: Arc<Metrics>,
}

/// Starts the three tasks on the current runtime; each ends when shutdown
/// begins.
pub fn spawn(m: Maintenance) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(revocations(m.clone(), wake.clone()));
    tokio::spawn(sweep(m.clone(), wake));
    tokio::spawn(renew(m));
}

fn count_end(m: &Maintenance, reason: EndReason) {
    let reason = match reason {
        EndReason::Revoked => "revoked",
        EndReason::Expired => "expired",
    };
    m.metrics
        .sessions_revoked
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

async fn revocations(m: Maintenance, wake: Arc<Notify>) {
    let mut rx = m.store.revocations();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = m.sockets.shutdown().begun() => return,
        };
        match msg {
            Ok(rev) => {
                let n = m
                    .sockets
                    .registry()
                    .close_session(&rev.session_id, rev.reason);
                if n > 0 {
                    tracing::info!(session = %rev.session_id, sockets = n, "closing sockets of ended session");
                }
            }
            // Missed some: let the sweep find them now rather than later.
            Err(RecvError::Lagged(_)) => wake.notify_one(),
            Err(RecvError::Closed) => return,
        }
    }
}

async fn sweep(m: Maintenance, wake: Arc<Notify>) {
    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        let full = tokio::select! {
            _ = tick.tick() => { n = n.wrapping_add(1); n % FULL_SWEEP_TICKS == 0 }
            _ = wake.notified() => true,
            _ = m.sockets.shutdown().begun() => return,
        };
        if full {
            m.hubs.prune_unlinked(UNLINKED_HUB_TTL);
        }
        let due_by = (!full).then(now_unix);
        let rows = m.sockets.registry().snapshot(due_by);
        for chunk in rows.chunks(SWEEP_BATCH) {
            let ids: Vec<String> = chunk.iter().map(|r| r.session_id.clone()).collect();
            let Ok(states) = m.store.liveness(&ids).await else {
                // Store down: existing sockets stay open (we cannot tell a
                // revoked session from a healthy one); the next tick retries.
                m.metrics.store_errors.inc();
                break;
            };
            for (id, state) in ids.iter().zip(states) {
                match state {
                    Liveness::Alive { expires_at } => {
                        m.sockets.registry().set_expiry(id, expires_at)
                    }
                    Liveness::Gone(reason) => {
                        if m.sockets.registry().close_session(id, reason) > 0 {
                            if reason == EndReason::Expired {
                                count_end(&m, reason);
                            }
                            tracing::info!(session = %id, ?reason, "sweep closed sockets of ended session");
                        }
                    }
                }
            }
        }
    }
}

async fn renew(m: Maintenance) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = m.sockets.shutdown().begun() => return,
        }
        let rows = m.sockets.registry().snapshot(None);
        futures_util::stream::iter(rows)
            .for_each_concurrent(RENEW_CONCURRENCY, |row| {
                let m = m.clone();
                async move {
                    if m.store
                        .renew(&row.session_id, &row.conn_ids, crate::sockets::LEASE)
                        .await
                        .is_err()
                    {
                        m.metrics.store_errors.inc();
                    }
                }
            })
            .await;
    }
}
