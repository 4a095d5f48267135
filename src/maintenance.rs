//! Background work that keeps this instance's open sockets honest, at a
//! store cost that does not grow with idle sockets:
//!
//! - **revocations**: a session ended on any instance → close its sockets
//!   here (pushed through the store's pub/sub);
//! - **expiry**: each session is looked up in the store once, when its
//!   known expiry comes (one timer for the whole instance, over a due-time
//!   index in the registry); a session refreshed elsewhere is then found
//!   alive with a later expiry and looked at again then;
//! - **re-check after resubscribing**: a revocation published while this
//!   instance's subscription was down is caught by checking every local
//!   session once, right after the subscription is back (or when the local
//!   broadcast lagged);
//! - **audit**: one slow pass over every local session per
//!   `sessions.audit_interval_secs`, spread evenly, one store command per
//!   batch: the net under the net;
//! - **heartbeat**: one store write per [`HEARTBEAT_EVERY`] keeps every
//!   socket lease of this instance alive; a crashed instance's sockets stop
//!   counting once its heartbeat lapses;
//! - **session hooks** (only with `[sessions.hooks] on_end`): every
//!   [`HOOK_POLL`], claim the tracked sessions whose expiry has come and the
//!   `on_end` jobs that are due from the store's outbox
//!   (`session::outbox`), report what ended, retry what the runtime did
//!   not take with backoff. Every instance does this, with no leader: a
//!   claim hides an entry from the others until it is done or its
//!   visibility lapses (the claimer died).
//!
//! Worst cases (README, "Revocation and expiry"): a revocation reaches a
//! subscribed instance within a second; one published while its
//! subscription was down, within a second of it resubscribing; an expiry
//! closes within [`ABOUT_TO_EXPIRE_RECHECK`] plus a store round trip of the
//! moment it happens.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

use crate::hooks::{Ended, Hooks};
use crate::hub::Hubs;
use crate::session::{EndReason, Liveness, Outbox, SessionStore, Store};
use crate::sockets::Sockets;
use crate::telemetry::{Metrics, ReasonLabel};
use crate::time::now_unix_ms;

/// How often this instance renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long one heartbeat keeps this instance's leases alive. With the
/// other instances' view refreshed at their own heartbeats, a crashed
/// instance's sockets stop counting at most `HEARTBEAT_LEASE +
/// HEARTBEAT_EVERY` (25 s) after its last heartbeat.
pub const HEARTBEAT_LEASE: Duration = Duration::from_secs(20);
/// A session the store calls alive but whose expiry has come (clocks, or
/// the second boundary) is looked at again this soon.
pub const ABOUT_TO_EXPIRE_RECHECK: Duration = Duration::from_millis(250);
/// After a failed store call, the sessions it was about are retried this
/// soon; meanwhile their sockets stay open (a revoked session cannot be
/// told from a healthy one while the store is away).
const STORE_DOWN_RECHECK: Duration = Duration::from_secs(1);
/// Longest sleep of the expiry timer with nothing due: a bound, not a poll
/// (it wakes early for any session that falls due sooner).
const IDLE_WAIT: Duration = Duration::from_secs(60);
const BATCH: usize = 500;
/// A shared-route hub whose runtime dial failed is kept this long for a
/// retry, then forgotten.
const UNLINKED_HUB_TTL: Duration = Duration::from_secs(30);

/// What the maintenance tasks work on.
#[derive(Clone)]
pub struct Maintenance {
    pub store: Arc<Store>,
    pub sockets: Sockets,
    pub hubs: Hubs,
    pub metrics: Arc<Metrics>,
    /// One audit pass over every local session per this period.
    pub audit_period: Duration,
    /// `[sessions.hooks]` and the `on_end` outbox (both or neither drive
    /// the session-hooks task).
    pub hooks: Option<Arc<Hooks>>,
    pub outbox: Option<Arc<Outbox>>,
}

/// Starts the tasks on the current runtime; each ends when shutdown begins.
pub fn spawn(m: Maintenance) {
    let recheck = Arc::new(Notify::new());
    tokio::spawn(revocations(m.clone(), recheck.clone()));
    tokio::spawn(resubscriptions(m.clone(), recheck.clone()));
    tokio::spawn(rechecks(m.clone(), recheck));
    tokio::spawn(expiry(m.clone()));
    tokio::spawn(audit(m.clone()));
    if let (Some(hooks), Some(outbox)) = (m.hooks.clone(), m.outbox.clone()) {
        tokio::spawn(session_hooks(m.clone(), hooks, outbox));
    }
    tokio::spawn(heartbeat(m));
}

/// How often each instance looks for due expiries and `on_end` jobs: the
/// latency of an `on_end` after an end, and two store calls per period
/// per instance when there is nothing to do.
pub const HOOK_POLL: Duration = Duration::from_millis(250);
/// Tracked sessions looked at per store call.
const TRACKED_BATCH: usize = 200;
/// `on_end` jobs delivered at once per instance.
const JOB_BATCH: usize = 16;
/// Retries of an `on_end` wait this long, doubling per attempt ...
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// ... up to this.
const RETRY_MAX: Duration = Duration::from_secs(60);

fn retry_delay(attempt: u32) -> Duration {
    let doubled = RETRY_FIRST.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    doubled.min(RETRY_MAX)
}

async fn session_hooks(m: Maintenance, hooks: Arc<Hooks>, outbox: Arc<Outbox>) {
    // A claim must outlast the work done under it (one hook call), or a
    // second instance would take the same entry while the first still
    // works on it: harmless (at least once), but noisy.
    let visibility = hooks.timeout() + Duration::from_secs(5);
    let mut tick = tokio::time::interval(HOOK_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = m.sockets.shutdown().begun() => return,
        }
        // Failures (store away) leave the claimed entries hidden until
        // their visibility lapses; then any instance takes them again.
        if let Err(e) = expire_tracked(&m, &outbox, visibility).await {
            tracing::debug!(error = %e, "session hooks: expiry look failed");
        }
        if let Err(e) = deliver_jobs(&m, &hooks, &outbox, visibility).await {
            tracing::debug!(error = %e, "session hooks: delivery failed");
        }
    }
}

fn ended_body(session_id: &str, user: &str, reason: &str) -> String {
    serde_json::to_string(&Ended {
        session_id: session_id.to_string(),
        user: user.to_string(),
        reason: reason.to_string(),
    })
    .expect("strings serialise")
}

/// The tracked sessions whose known expiry has come: an expired one is
/// reported, a slid one is looked at again at its new expiry.
async fn expire_tracked(
    m: &Maintenance,
    outbox: &Outbox,
    visibility: Duration,
) -> Result<(), crate::session::StoreError> {
    loop {
        let due = outbox.claim_tracked(TRACKED_BATCH, visibility).await?;
        if due.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = due.iter().map(|(sid, _)| sid.clone()).collect();
        let live = m.store.liveness(&ids).await?;
        for ((sid, user), l) in due.iter().zip(live) {
            match l {
                Liveness::Alive { expires_at } => {
                    outbox.retrack(sid, user, (expires_at + 1) * 1000).await?
                }
                Liveness::Gone(EndReason::Expired) => {
                    let body = ended_body(sid, user, "expired");
                    outbox.end(sid, user, &body, Duration::ZERO).await?;
                }
                // Whoever deleted it queued its report (or it was a
                // session the runtime refused): nothing more to say.
                Liveness::Gone(EndReason::Revoked) => outbox.untrack(sid, user).await?,
            }
        }
        if due.len() < TRACKED_BATCH {
            return Ok(());
        }
    }
}

/// Delivers the due `on_end` jobs; each leaves the queue only on a `2xx`.
async fn deliver_jobs(
    m: &Maintenance,
    hooks: &Hooks,
    outbox: &Outbox,
    visibility: Duration,
) -> Result<(), crate::session::StoreError> {
    let jobs = outbox.claim_jobs(JOB_BATCH, visibility).await?;
    if jobs.is_empty() {
        return Ok(());
    }
    let mut parsed = Vec::with_capacity(jobs.len());
    for job in jobs {
        match serde_json::from_str::<Ended>(&job.body) {
            Ok(ended) => parsed.push((job, ended)),
            // Only this gateway writes the queue; an entry it cannot read
            // would be retried forever.
            Err(_) => outbox.ack(&job.body).await?,
        }
    }
    // A job queued by an end whose delete never happened (the gateway died
    // in between, or the store failed it) finds its session alive: the
    // session goes back to being watched and the job is dropped.
    let ids: Vec<String> = parsed.iter().map(|(_, e)| e.session_id.clone()).collect();
    let live = m.store.liveness(&ids).await?;
    let sends = parsed.iter().zip(live).map(|((job, ended), l)| async move {
        if let Liveness::Alive { expires_at } = l {
            outbox
                .track(&ended.session_id, &ended.user, (expires_at + 1) * 1000)
                .await?;
            return outbox.ack(&job.body).await;
        }
        match hooks.on_end(ended).await {
            Ok(()) => {
                tracing::info!(session = %ended.session_id, reason = %ended.reason, "on_end delivered");
                outbox.ack(&job.body).await
            }
            Err(e) => {
                let delay = retry_delay(job.attempt);
                tracing::warn!(session = %ended.session_id, reason = %ended.reason,
                    attempt = job.attempt, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "on_end not taken; will retry");
                outbox.retry(&job.body, delay).await
            }
        }
    });
    for r in futures_util::future::join_all(sends).await {
        r?;
    }
    Ok(())
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

/// Now in the store's clock (Unix ms): session expiries come from it, so a
/// host clock running behind the store's cannot make an expiry close late.
fn store_now(m: &Maintenance) -> i64 {
    now_unix_ms() + m.store.clock_offset_ms()
}

async fn revocations(m: Maintenance, recheck: Arc<Notify>) {
    let mut rx = m.store.revocations();
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
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
            // Missed some: look at every local session now.
            Err(RecvError::Lagged(_)) => recheck.notify_one(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Asks for a full re-check each time the subscription is (re)established:
/// what was published while it was down never reached this instance. Keyed
/// on the store's count of subscriptions, so a loss and a recovery that
/// fall between two polls of this task still trigger one.
async fn resubscriptions(m: Maintenance, recheck: Arc<Notify>) {
    let mut subscriptions = m.store.subscriptions();
    subscriptions.borrow_and_update();
    loop {
        tokio::select! {
            changed = subscriptions.changed() => if changed.is_err() { return },
            _ = m.sockets.shutdown().begun() => return,
        }
        subscriptions.borrow_and_update();
        if m.sockets.registry().session_count() > 0 {
            m.metrics.resubscribe_rechecks.inc();
        }
        recheck.notify_one();
    }
}

async fn rechecks(m: Maintenance, recheck: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = recheck.notified() => {}
            _ = m.sockets.shutdown().begun() => return,
        }
        let ids = m.sockets.registry().session_ids();
        tracing::info!(sessions = ids.len(), "re-checking every local session");
        for chunk in ids.chunks(BATCH) {
            check(&m, chunk).await;
        }
    }
}

/// The instance's one expiry timer: sleeps until the first session is due
/// (or an earlier one registers), then looks the due ones up.
async fn expiry(m: Maintenance) {
    let registry = m.sockets.registry();
    loop {
        let now = store_now(&m);
        let wait = registry.next_due().map_or(IDLE_WAIT, |t| {
            Duration::from_millis(t.saturating_sub(now).max(0) as u64)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait.min(IDLE_WAIT)) => {}
            _ = registry.earlier_due() => continue,
            _ = m.sockets.shutdown().begun() => return,
        }
        loop {
            let due = registry.due(store_now(&m), BATCH);
            if due.is_empty() {
                break;
            }
            check(&m, &due).await;
        }
    }
}

/// Looks sessions up and acts on the answer: closes the ended ones, moves
/// the live ones' next look to their (possibly slid) expiry.
async fn check(m: &Maintenance, ids: &[String]) {
    let registry = m.sockets.registry();
    let Ok(states) = m.store.liveness(ids).await else {
        // Store down: existing sockets stay open; look again soon.
        m.metrics.store_errors.inc();
        let retry = store_now(m) + ms(STORE_DOWN_RECHECK);
        for id in ids {
            registry.recheck_at(id, retry);
        }
        return;
    };
    let now = store_now(m);
    for (id, state) in ids.iter().zip(states) {
        match state {
            Liveness::Alive { expires_at } if expires_at * 1000 > now => {
                registry.set_expiry(id, expires_at)
            }
            Liveness::Alive { .. } => registry.recheck_at(id, now + ms(ABOUT_TO_EXPIRE_RECHECK)),
            Liveness::Gone(reason) => {
                if registry.close_session(id, reason) > 0 {
                    if reason == EndReason::Expired {
                        m.metrics
                            .sessions_revoked
                            .get_or_create(&ReasonLabel { reason: "expired" })
                            .inc();
                    }
                    tracing::info!(session = %id, ?reason, "closed sockets of ended session");
                }
            }
        }
    }
}

/// One pass per `audit_period`: a batch at a time, evenly spaced, each
/// first counted with one store command and looked at in detail only when
/// some of it is gone.
async fn audit(m: Maintenance) {
    loop {
        let ids = m.sockets.registry().session_ids();
        let batches = ids.len().div_ceil(BATCH).max(1);
        let gap = m.audit_period / batches as u32;
        let mut chunks = ids.chunks(BATCH);
        for _ in 0..batches {
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = m.sockets.shutdown().begun() => return,
            }
            let Some(chunk) = chunks.next() else { continue };
            match m.store.count_live(chunk).await {
                Ok(n) if n == chunk.len() => {}
                Ok(_) => check(&m, chunk).await,
                Err(_) => {
                    m.metrics.store_errors.inc();
                }
            }
        }
    }
}

async fn heartbeat(m: Maintenance) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = m.sockets.shutdown().begun() => return,
        }
        if m.store.heartbeat(HEARTBEAT_LEASE).await.is_err() {
            m.metrics.store_errors.inc();
        }
        // Rides on this tick: a hub whose dial failed is forgotten within
        // its TTL plus one heartbeat.
        m.hubs.prune_unlinked(UNLINKED_HUB_TTL);
    }
}
