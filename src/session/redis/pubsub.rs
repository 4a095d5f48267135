//! The revocation subscription: feeds the store's broadcast from the Redis
//! channel for as long as the store lives, resubscribing whenever Redis goes
//! away.

use std::time::Duration;

use futures_util::StreamExt;
use redis::{Client, Value};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::{Instant, timeout};

use super::conns::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use super::describe;
use crate::ids::looks_like_id;
use crate::session::{Revocation, StoreError, announce_revoked};

/// A subscription on a silently dead socket would never notice; a periodic
/// PING does.
const HEARTBEAT: Duration = Duration::from_secs(5);
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(50);
/// Short, because revocations sent while unsubscribed are only caught by
/// the (slower) liveness sweep.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);

/// Feeds `tx` from the revocation channel for as long as the store lives,
/// resubscribing with backoff whenever Redis goes away. Uses its own
/// connection: a subscribed RESP2 connection cannot carry other commands.
pub(super) async fn listen(
    client: Client,
    channel: String,
    tx: broadcast::Sender<Revocation>,
    subscribed: watch::Sender<bool>,
    subscriptions: watch::Sender<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = RESUBSCRIBE_MIN;
    loop {
        let ended = tokio::select! {
            _ = &mut stop => return,
            ended = follow(&client, &channel, &tx, &subscribed, &subscriptions) => ended,
        };
        if subscribed.send_replace(false) {
            tracing::warn!(error = %ended, "revocation subscription lost; resubscribing");
            backoff = RESUBSCRIBE_MIN;
        } else {
            tracing::debug!(error = %ended, "revocation subscription not established");
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

/// One subscription, until its connection fails; always ends in an error.
async fn follow(
    client: &Client,
    channel: &str,
    tx: &broadcast::Sender<Revocation>,
    subscribed: &watch::Sender<bool>,
    subscriptions: &watch::Sender<u64>,
) -> StoreError {
    let pubsub = match timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return describe("subscribe", &e),
        Err(_) => return StoreError("redis subscribe: timed out".to_string()),
    };
    let (mut sink, mut stream) = pubsub.split();
    match timeout(RESPONSE_TIMEOUT, sink.subscribe(channel)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return describe("subscribe", &e),
        Err(_) => return StoreError("redis subscribe: timed out".to_string()),
    }
    subscribed.send_replace(true);
    // A count, not only the flag: a watcher that was not polled between a
    // loss and the next subscription still sees that one happened.
    subscriptions.send_modify(|n| *n += 1);
    tracing::info!("revocation subscription established");
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return StoreError("redis subscribe: connection lost".to_string());
                };
                match msg.get_payload::<String>() {
                    Ok(session_id) if looks_like_id(&session_id) => announce_revoked(tx, session_id),
                    _ => tracing::debug!("ignoring a malformed revocation message"),
                }
            }
            _ = heartbeat.tick() => {
                match timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return describe("heartbeat", &e),
                    Err(_) => return StoreError("redis heartbeat: timed out".to_string()),
                }
            }
        }
    }
}
