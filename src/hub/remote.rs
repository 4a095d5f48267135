//! Shared sessions across instances (SPEC §8), on the store's fabric.
//!
//! The instance that claims a (session, route) in the store holds its one
//! runtime connection (a *hub*); every other instance with viewports of it
//! keeps a *mirror*: a hub whose frames come from the store instead of a
//! runtime. Both keep the same local [`super::ring::Ring`], so viewports
//! are served the same way on either, and local viewports of the hub's own
//! instance never wait on the store.
//!
//! - Frames: the hub appends each runtime frame to the session's stream
//!   (the one replay buffer, numbered across hubs) and publishes it in
//!   batches; mirrors follow the channel and read the stream for anything
//!   they missed.
//! - The owner's frames: from a mirror they are published to the hub's
//!   input channel; the hub acknowledges each after passing it on, and a
//!   mirror never has more than [`CREDIT`] unacknowledged (backpressure,
//!   and nothing queues unbounded in Redis).
//! - Death: a mirror watches the hub's instance; when its liveness key
//!   lapses the mirror's viewports are closed `1012` and reconnect, and the
//!   next attach anywhere takes the hub over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::interrupts::Interrupts;
use super::{Hub, HubClose, Hubs};
use crate::session::redis::fabric::{Fabric, Frame, Inbound, Subscription, Usage};
use crate::sockets::CloseRx;
use crate::sockets::close;

/// Owner frames a mirror may have in flight to the hub.
pub const CREDIT: usize = 16;
/// Runtime frames waiting to be appended to the stream; past it they are
/// left out of the stream (the runtime is never slowed by the store).
const APPEND_QUEUE: usize = 4096;
/// Frames per append round trip at most.
const APPEND_BATCH: usize = 256;
/// The stream's and placement's expiry is pushed out this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// How long an attach waits for another instance's hub to finish dialling.
pub const LINK_POLL: Duration = Duration::from_millis(50);
const STORE_WAIT: Duration = Duration::from_secs(2);

/// A data message as the store keeps it; `None` for control messages.
pub fn to_frame(m: &Message) -> Option<Frame> {
    match m {
        Message::Text(t) => Some(Frame {
            binary: false,
            data: Bytes::from(t.clone()),
        }),
        Message::Binary(b) => Some(Frame {
            binary: true,
            data: b.clone(),
        }),
        _ => None,
    }
}

/// The message a stored frame stands for; `None` for a text frame that is
/// not UTF-8 (never written by a gateway).
pub fn to_message(f: Frame) -> Option<Message> {
    if f.binary {
        Some(Message::Binary(f.data))
    } else {
        Utf8Bytes::try_from(f.data).ok().map(Message::Text)
    }
}

/// What a hub on this instance keeps for the others.
pub struct HubSide {
    pub fabric: Fabric,
    /// Runtime frames, numbered, on their way to the stream.
    pub appends: mpsc::Sender<(u64, Frame)>,
    /// The task that passes remote owners' frames to the runtime.
    pub writes: tokio::task::JoinHandle<()>,
    /// The task appending to the stream; awaited at the end, so a
    /// successor hub continues after every frame this one numbered.
    pub appender: tokio::task::JoinHandle<()>,
    pub _usage: Usage,
}

impl HubSide {
    /// Starts appending and serving remote owners for `hub`, whose runtime
    /// writer takes messages on `to_runtime`. The receiver resolves when
    /// another instance took the hub over.
    pub fn start(
        hub: &Arc<Hub>,
        fabric: Fabric,
        usage: Usage,
        inbox: Subscription,
        to_runtime: mpsc::Sender<Message>,
    ) -> (HubSide, oneshot::Receiver<()>) {
        let (appends, rx) = mpsc::channel(APPEND_QUEUE);
        let (fence_tx, fenced) = oneshot::channel();
        let appender = tokio::spawn(append(hub.clone(), fabric.clone(), rx, fence_tx));
        let writes = tokio::spawn(serve_remote_owner(
            hub.clone(),
            fabric.clone(),
            inbox,
            to_runtime,
        ));
        let side = HubSide {
            fabric,
            appends,
            writes,
            appender,
            _usage: usage,
        };
        (side, fenced)
    }

    /// A runtime frame numbered `seq` goes to the stream; dropped (with a
    /// warning) if the store has fallen that far behind.
    pub fn push(&self, seq: u64, m: &Message) {
        if let Some(f) = to_frame(m) {
            if self.appends.try_send((seq, f)).is_err() {
                tracing::warn!(seq, "store behind: frame left out of the shared stream");
            }
        }
    }

    /// Tells the other instances the hub ended and frees its placement.
    pub async fn end(self, hub: &Hub, c: &HubClose) {
        self.writes.abort();
        let (sid, route) = (&hub.session_id, &hub.route.name);
        // Flush what is queued for the stream before giving the placement
        // up: the next hub numbers on from the stream's last frame.
        drop(self.appends);
        let mut appender = self.appender;
        if tokio::time::timeout(STORE_WAIT, &mut appender)
            .await
            .is_err()
        {
            appender.abort();
        }
        let _ = tokio::time::timeout(STORE_WAIT, async {
            let _ = self.fabric.publish_end(sid, route, c.code, &c.reason).await;
            let _ = self.fabric.release_hub(sid, route, hub.id.0).await;
        })
        .await;
    }
}

/// Splits a batch into runs of consecutive numbers (a dropped frame
/// leaves a hole the stream must keep).
fn runs(batch: &[(u64, Frame)]) -> Vec<(u64, Vec<Frame>)> {
    let mut out: Vec<(u64, Vec<Frame>)> = Vec::new();
    for (seq, f) in batch {
        match out.last_mut() {
            Some((first, frames)) if *first + frames.len() as u64 == *seq => {
                frames.push(f.clone());
            }
            _ => out.push((*seq, vec![f.clone()])),
        }
    }
    out
}

/// Appends runtime frames to the stream in batches: whatever queued while
/// the previous batch was in flight goes in the next round trip.
async fn append(
    hub: Arc<Hub>,
    fabric: Fabric,
    mut rx: mpsc::Receiver<(u64, Frame)>,
    fenced: oneshot::Sender<()>,
) {
    let (sid, route) = (hub.session_id.clone(), hub.route.name.clone());
    let cap = hub.route.replay_frames;
    let mut expired_at: Option<Instant> = None;
    let mut batch = Vec::with_capacity(APPEND_BATCH);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        while batch.len() < APPEND_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        for (first, frames) in runs(&batch) {
            let expire = expired_at.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY);
            match fabric
                .append(&sid, &route, first, &frames, cap, expire)
                .await
            {
                Ok(()) => {
                    if expire {
                        expired_at = Some(Instant::now());
                    }
                }
                Err(e) => {
                    // Numbers already taken: another instance holds the hub
                    // now (this one was thought dead). Stop serving it.
                    if let Ok(Some(holder)) = fabric.hub_holder(&sid, &route).await {
                        if holder != fabric.instance() {
                            tracing::warn!(session = %sid, route = %route, "hub taken over by another instance");
                            let _ = fenced.send(());
                            return;
                        }
                    }
                    tracing::warn!(session = %sid, route = %route, error = %e, "frames not appended to the shared stream");
                }
            }
        }
    }
}

/// Passes frames of an owner on another instance to the runtime, in
/// order, and acknowledges them once the runtime writer took them (one
/// acknowledgement per instance per burst).
async fn serve_remote_owner(
    hub: Arc<Hub>,
    fabric: Fabric,
    mut inbox: Subscription,
    to_runtime: mpsc::Sender<Message>,
) {
    let mut acks: HashMap<String, u32> = HashMap::new();
    while let Some(m) = inbox.rx.recv().await {
        match m {
            Inbound::Write { instance, frame } => {
                if let Some(msg) = to_message(frame) {
                    if to_runtime.send(msg).await.is_err() {
                        return;
                    }
                }
                *acks.entry(instance).or_default() += 1;
            }
            // A re-subscription may have missed an owner change.
            Inbound::Owner | Inbound::Resync => hub.refresh_owner_soon(),
            _ => {}
        }
        if inbox.rx.is_empty() {
            for (instance, n) in acks.drain() {
                let _ = fabric
                    .publish_ack(&hub.session_id, &hub.route.name, &instance, n)
                    .await;
            }
        }
    }
}

/// What a mirror follows its hub with.
pub struct Mirror {
    pub fabric: Fabric,
    /// The hub's channel.
    pub outbox: Subscription,
    /// Becomes `true` when the hub's instance is found dead.
    pub dead: watch::Receiver<bool>,
    /// The instance holding the hub.
    pub holder: String,
    pub usage: Usage,
}

/// Why a mirror stopped.
enum MirrorEnd {
    /// Tell its viewports this after they deliver what the ring holds.
    Close(HubClose),
    /// No viewport left here: nothing to tell anyone.
    Unattended,
}

/// A mirror's task: feeds the ring from the hub's channel (and the stream
/// where the channel missed something), passes acknowledgements to the
/// owner's credit, and ends with the hub, the hub's instance, revocation,
/// shutdown, or its last local viewport.
pub async fn mirror(hub: Arc<Hub>, hubs: Hubs, m: Mirror, close_rx: CloseRx) {
    let Mirror {
        fabric,
        mut outbox,
        mut dead,
        holder,
        usage: _usage,
    } = m;
    let mut interrupts = Interrupts::new(close_rx, hubs.0.sockets.shutdown().clone());
    let end = loop {
        tokio::select! {
            m = outbox.rx.recv() => match m {
                Some(Inbound::Frames { first, frames }) => on_frames(&hub, &fabric, first, frames).await,
                Some(Inbound::End { code, reason }) => break MirrorEnd::Close(HubClose { code, reason: reason.into() }),
                Some(Inbound::Ack { instance, n }) => {
                    if instance == fabric.instance() {
                        hub.credit(n as usize);
                    }
                }
                Some(Inbound::Write { .. }) => {}
                Some(Inbound::Owner) => hub.refresh_owner_soon(),
                Some(Inbound::Resync) => {
                    // An owner change may have been missed as well.
                    hub.refresh_owner_soon();
                    Box::pin(catch_up(&hub, &fabric, Vec::new())).await;
                    // Missed the hub's end while away: the placement says.
                    match Box::pin(fabric.hub_holder(&hub.session_id, &hub.route.name)).await {
                        Ok(Some(h)) if h == holder => {}
                        Ok(_) => break MirrorEnd::Close(close::SERVICE_RESTART.into()),
                        Err(_) => {}
                    }
                }
                None => break MirrorEnd::Close(close::SERVICE_RESTART.into()),
            },
            _ = async { let _ = dead.wait_for(|d| *d).await; } => {
                tracing::warn!(session = %hub.session_id, route = %hub.route.name, instance = %holder, "hub instance gone; viewports reconnect");
                break MirrorEnd::Close(close::SERVICE_RESTART.into());
            }
            c = interrupts.next() => break MirrorEnd::Close(c.into()),
            // Its first viewport attaches after the mirror starts; it ends
            // when the last one here leaves (the hub keeps the grace).
            _ = hub.viewports_changed.notified() => {
                if hub.ring().close_if_unattended(close::GOING_AWAY.into()) {
                    break MirrorEnd::Unattended;
                }
            }
        }
    };
    let c = match &end {
        MirrorEnd::Close(c) => c.clone(),
        MirrorEnd::Unattended => close::GOING_AWAY.into(),
    };
    hub.ring().close(c);
    hub.close_credit();
    hubs.remove(&hub);
    hub.wake.send_modify(|v| *v = v.wrapping_add(1));
    hubs.0
        .sockets
        .registry()
        .unregister_hub(&hub.session_id, hub.id);
    drop(outbox);
    tracing::debug!(session = %hub.session_id, route = %hub.route.name, "mirror ended");
}

/// Puts frames `first…` into the mirror's ring: what it already has is
/// skipped, a gap is read from the stream first, and what the stream no
/// longer holds is skipped over (viewports behind it lag out, `1013`).
/// Frames that continue the ring go straight in; the stream read is boxed,
/// so the rare path does not grow every mirror's task.
async fn on_frames(hub: &Hub, fabric: &Fabric, first: u64, frames: Vec<Frame>) {
    let numbered = frames
        .into_iter()
        .enumerate()
        .map(|(i, f)| (first + i as u64, f))
        .collect::<Vec<_>>();
    if first <= hub.ring().next_seq() && !numbered.is_empty() {
        apply(hub, numbered);
    } else {
        Box::pin(catch_up(hub, fabric, numbered)).await;
    }
}

/// Reads what the ring lacks from the stream, then applies it and `later`.
async fn catch_up(hub: &Hub, fabric: &Fabric, later: Vec<(u64, Frame)>) {
    let next = hub.ring().next_seq();
    let mut frames = later;
    if let Ok((kept, _)) = fabric
        .frames_from(&hub.session_id, &hub.route.name, next)
        .await
    {
        let last = kept.last().map_or(0, |(s, _)| s + 1);
        let mut merged = kept;
        merged.extend(frames.into_iter().filter(|(s, _)| *s >= last));
        frames = merged;
    }
    apply(hub, frames);
}

fn apply(hub: &Hub, frames: Vec<(u64, Frame)>) {
    let seq = {
        let mut ring = hub.ring();
        for (seq, f) in frames {
            let expected = ring.next_seq();
            if seq < expected {
                continue;
            }
            if seq > expected {
                ring.skip_to(seq);
            }
            match to_message(f) {
                Some(m) => ring.push(m),
                None => ring.skip_to(seq + 1),
            }
        }
        ring.next_seq()
    };
    hub.wake.send_replace(seq);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Frame {
        Frame {
            binary: false,
            data: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    #[test]
    fn batches_split_where_numbers_jump() {
        let batch = vec![(3, f("a")), (4, f("b")), (6, f("c")), (7, f("d"))];
        let r = runs(&batch);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[0].1.len()), (3, 2));
        assert_eq!((r[1].0, r[1].1.len()), (6, 2));
    }

    #[test]
    fn frames_and_messages_convert_both_ways() {
        for m in [Message::text("hé"), Message::binary(vec![0u8, 255])] {
            assert_eq!(to_message(to_frame(&m).unwrap()), Some(m));
        }
        assert_eq!(to_frame(&Message::Ping(Bytes::new())), None);
        let bad = Frame {
            binary: false,
            data: Bytes::from_static(&[0xff]),
        };
        assert_eq!(to_message(bad), None);
    }
}
