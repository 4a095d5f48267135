//! Background work that keeps open sockets honest:
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

use crate::app::App;
use crate::session::{EndReason, Liveness, SessionStore};
use crate::telemetry::ReasonLabel;
use crate::time::now_unix;

/// A socket's store lease; a dead instance's sockets stop counting after it.
pub const LEASE: Duration = Duration::from_secs(30);
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

pub fn spawn(app: Arc<App>) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(revocations(app.clone(), wake.clone()));
    tokio::spawn(sweep(app.clone(), wake));
    tokio::spawn(renew(app));
}

fn count_end(app: &App, reason: EndReason) {
    let reason = match reason {
        EndReason::Revoked => "revoked",
        EndReason::Expired => "expired",
    };
    app.metrics
        .sessions_revoked
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

async fn revocations(app: Arc<App>, wake: Arc<Notify>) {
    let mut rx = app.store.revocations();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = app.shutdown.begun() => return,
        };
        match msg {
            Ok(rev) => {
                let n = app.registry.close_session(&rev.session_id, rev.reason);
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

async fn sweep(app: Arc<App>, wake: Arc<Notify>) {
    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        let full = tokio::select! {
            _ = tick.tick() => { n = n.wrapping_add(1); n % FULL_SWEEP_TICKS == 0 }
            _ = wake.notified() => true,
            _ = app.shutdown.begun() => return,
        };
        if full {
            app.hubs.prune_unlinked(UNLINKED_HUB_TTL);
        }
        let due_by = (!full).then(now_unix);
        let rows = app.registry.snapshot(due_by);
        for chunk in rows.chunks(SWEEP_BATCH) {
            let ids: Vec<String> = chunk.iter().map(|r| r.session_id.clone()).collect();
            let Ok(states) = app.store.liveness(&ids).await else {
                // Store down: existing sockets stay open (we cannot tell a
                // revoked session from a healthy one); the next tick retries.
                app.metrics.store_errors.inc();
                break;
            };
            for (id, state) in ids.iter().zip(states) {
                match state {
                    Liveness::Alive { expires_at } => app.registry.set_expiry(id, expires_at),
                    Liveness::Gone(reason) => {
                        if app.registry.close_session(id, reason) > 0 {
                            if reason == EndReason::Expired {
                                count_end(&app, reason);
                            }
                            tracing::info!(session = %id, ?reason, "sweep closed sockets of ended session");
                        }
                    }
                }
            }
        }
    }
}

async fn renew(app: Arc<App>) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.shutdown.begun() => return,
        }
        let rows = app.registry.snapshot(None);
        futures_util::stream::iter(rows)
            .for_each_concurrent(RENEW_CONCURRENCY, |row| {
                let app = app.clone();
                async move {
                    if app
                        .store
                        .renew(&row.session_id, &row.conn_ids, LEASE)
                        .await
                        .is_err()
                    {
                        app.metrics.store_errors.inc();
                    }
                }
            })
            .await;
    }
}
