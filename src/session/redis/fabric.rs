//! The store's part in shared sessions across instances (SPEC §8): where a
//! (session, route)'s one runtime connection lives, who owns it, its frame
//! stream, and the channels instances talk to each other on. The hub layer
//! decides what to do with them; this file only knows keys, scripts and
//! bytes.
//!
//! # Keys (all in the session's slot, `{sid}`, so one script may touch them)
//!
//! - `<prefix>:hub:{sid}:<route>`: hash `inst` (instance holding the
//!   runtime connection), `linked` (`1` once its dial succeeded), `proto`
//!   (the subprotocol the runtime chose). Claimed atomically; taken over
//!   only from an instance whose liveness key is gone.
//! - `<prefix>:frames:{sid}:<route>`: the replay buffer, a stream capped at
//!   the route's `replay_frames`; entry id `<seq>-1`, fields `b` (`1` =
//!   binary) and `d` (payload). Numbering continues across hubs.
//! - `<prefix>:owner:{sid}:<route>`: the owning viewport, `<instance>/<n>`.
//! - `<prefix>:vps:{sid}:<route>`: hash instance → viewports attached
//!   there, for the first-comer rule and the detach grace.
//! - `<prefix>:alive:<instance>`: set every [`BEAT_EVERY`] with a
//!   [`ALIVE_FOR`] expiry by an instance holding hubs or remote viewports:
//!   short, so a dead hub is taken over within seconds (the session
//!   heartbeat of issue 17 is far longer).
//! - channels `<prefix>:hubout:{sid}:<route>` (hub → every instance with
//!   viewports: frames, ends, acks) and `<prefix>:hubin:{sid}:<route>`
//!   (a remote owner → the hub: frames for the runtime).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{Client, Script, Value};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use super::conns::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use super::{Inner, describe, ms};
use crate::session::StoreError;

/// How often an instance with hubs or remote viewports renews its
/// liveness key, and how often watched instances are checked.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a liveness key outlives its last renewal. A SIGKILLed hub is
/// noticed at most `ALIVE_FOR + BEAT_EVERY` after its last beat.
pub const ALIVE_FOR: Duration = Duration::from_secs(3);
/// Keys of a shared session's coordination outlive their last write this
/// long (they are deleted on use; this only bounds garbage after crashes).
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Messages for one local subscriber waiting to be handled; past it the
/// subscriber is told to re-sync from the stream instead.
const INBOX: usize = 1024;
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);
/// How long a new subscription may wait for the subscription task.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// (Un)subscriptions sent to Redis in one command at most.
const CTL_BATCH: usize = 256;
const PING_EVERY: Duration = Duration::from_secs(5);

/// A data frame as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub binary: bool,
    pub data: Bytes,
}

/// What arrives on a subscribed channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Frames numbered `first, first+1, …` (hub → instances).
    Frames { first: u64, frames: Vec<Frame> },
    /// The hub ended; its viewports close with this code and reason.
    End { code: u16, reason: String },
    /// The hub passed `n` frames of the owner on this instance to its
    /// runtime: that many may be sent again.
    Ack { instance: String, n: u32 },
    /// A frame of the owner for the runtime (remote owner → hub).
    Write { instance: String, frame: Frame },
    /// The session's owner changed (SPEC §9 `portcullis.role`); read the
    /// owner key again. Carries no owner: messages from different
    /// instances may arrive out of order, a read of the key cannot.
    Owner,
    /// The subscription was (re)established: what was published meanwhile
    /// may be lost, read the stream.
    Resync,
}

/// Who holds a shared session's hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// This instance now holds it; the stream's kept frames follow.
    Mine {
        frames: Vec<(u64, Frame)>,
        next: u64,
    },
    /// Another instance holds it; `linked` once its runtime answered.
    Elsewhere {
        instance: String,
        linked: bool,
        protocol: Option<String>,
    },
}

/// Claims the hub unless a live other instance holds it. `ARGV[3]` names
/// an instance the caller found dead: its hold may be taken over, and its
/// viewport count and ownership (`KEYS[2]`, `KEYS[3]`) go with it, so the
/// first viewport after the takeover owns the session again.
static CLAIM_HUB: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], 'inst')
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] then
  local h = redis.call('HMGET', KEYS[1], 'linked', 'proto')
  return {0, cur, h[1] or '0', h[2] or ''}
end
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
  local owner = redis.call('GET', KEYS[3])
  if owner and string.sub(owner, 1, string.len(ARGV[3]) + 1) == ARGV[3] .. '/' then
    redis.call('DEL', KEYS[3])
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'inst', ARGV[1], 'hub', ARGV[4], 'linked', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1}
"#,
    )
});

/// Releases the hub if this hub (instance and hub id: a newer hub of the
/// same instance may have claimed it meanwhile) still holds it.
static RELEASE_HUB: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local h = redis.call('HMGET', KEYS[1], 'inst', 'hub')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// Marks the hub linked (its runtime answered) with the chosen protocol.
static LINK_HUB: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local h = redis.call('HMGET', KEYS[1], 'inst', 'hub')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'linked', '1', 'proto', ARGV[2])
return 1
"#,
    )
});

/// Counts a viewport in (`KEYS[1]` the viewport hash, `KEYS[2]` the
/// owner): the first viewport anywhere becomes the owner (SPEC §7); with
/// viewports already attached, a newcomer is a reader even if nobody owns.
static ATTACH_VIEWPORT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if total == 1 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#,
    )
});

/// Counts a viewport out and frees ownership if it held it.
static DETACH_VIEWPORT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if tonumber(redis.call('HINCRBY', KEYS[1], ARGV[1], -1)) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"#,
    )
});

/// Takes ownership if free, already ours, or held by `ARGV[3]` (a
/// viewport of an instance the caller found dead). `{1}` or `{0, holder}`.
static CLAIM_OWNER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1}
"#,
    )
});

/// The instance part of a viewport's global id `<instance>/<n>`.
pub fn instance_of(viewport: &str) -> &str {
    viewport.split_once('/').map_or(viewport, |(i, _)| i)
}

fn stream_id(seq: u64) -> String {
    format!("{seq}-1")
}

fn seq_of(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(s, _)| s.parse().ok())
}

/// Binary message encodings. Frames: `F`, first seq (u64 BE), then per
/// frame a kind byte (`1` binary) and a u32 BE length before its bytes.
mod wire {
    use super::{Bytes, Frame, Inbound};

    fn put_frame(out: &mut Vec<u8>, f: &Frame) {
        out.push(u8::from(f.binary));
        out.extend_from_slice(&(f.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&f.data);
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.push(s.len().min(255) as u8);
        out.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
    }

    pub fn frames(first: u64, frames: &[Frame]) -> Vec<u8> {
        let len = frames.iter().map(|f| f.data.len() + 5).sum::<usize>();
        let mut out = Vec::with_capacity(9 + len);
        out.push(b'F');
        out.extend_from_slice(&first.to_be_bytes());
        for f in frames {
            put_frame(&mut out, f);
        }
        out
    }

    pub fn end(code: u16, reason: &str) -> Vec<u8> {
        let mut out = vec![b'E'];
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out
    }

    pub fn ack(instance: &str, n: u32) -> Vec<u8> {
        let mut out = vec![b'A'];
        out.extend_from_slice(&n.to_be_bytes());
        put_str(&mut out, instance);
        out
    }

    pub fn owner() -> Vec<u8> {
        vec![b'O']
    }

    pub fn write(instance: &str, f: &Frame) -> Vec<u8> {
        let mut out = vec![b'W'];
        put_str(&mut out, instance);
        put_frame(&mut out, f);
        out
    }

    /// A reader over a payload; every take is bounds-checked, so a
    /// malformed message decodes to `None`, never a panic.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
        }
        fn str(&mut self) -> Option<String> {
            let n = self.u8()? as usize;
            String::from_utf8(self.take(n)?.to_vec()).ok()
        }
        fn frame(&mut self, payload: &Bytes) -> Option<Frame> {
            let binary = self.u8()? == 1;
            let n = self.u32()? as usize;
            let start = payload.len() - self.0.len();
            self.take(n)?;
            Some(Frame {
                binary,
                data: payload.slice(start..start + n),
            })
        }
    }

    pub fn decode(payload: Bytes) -> Option<Inbound> {
        let mut r = Reader(&payload[..]);
        let kind = r.u8()?;
        match kind {
            b'F' => {
                let first = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
                let mut frames = Vec::new();
                while !r.0.is_empty() {
                    frames.push(r.frame(&payload)?);
                }
                Some(Inbound::Frames { first, frames })
            }
            b'E' => {
                let code = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
                let reason = String::from_utf8(r.0.to_vec()).ok()?;
                Some(Inbound::End { code, reason })
            }
            b'A' => {
                let n = r.u32()?;
                let instance = r.str()?;
                Some(Inbound::Ack { instance, n })
            }
            b'W' => {
                let instance = r.str()?;
                let frame = r.frame(&payload)?;
                Some(Inbound::Write { instance, frame })
            }
            b'O' if r.0.is_empty() => Some(Inbound::Owner),
            _ => None,
        }
    }
}

/// Which local subscriber gets a channel's messages.
type Inboxes = HashMap<String, (u64, mpsc::Sender<Inbound>)>;

/// Asks the subscription task to (un)subscribe a channel.
enum Ctl {
    /// Answered once Redis confirmed the subscription.
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// The cross-instance part of the Redis store. Cheap to clone.
#[derive(Clone)]
pub struct Fabric(Arc<FabricInner>);

struct FabricInner {
    store: Arc<Inner>,
    /// Local hubs, mirrors and remote viewports: while any exists, this
    /// instance beats its liveness key.
    users: AtomicUsize,
    /// Behind its own `Arc`, so the beat task can wait on it without
    /// keeping the fabric (and with it the store) alive.
    became_used: Arc<Notify>,
    inboxes: Mutex<Inboxes>,
    next_token: AtomicUsize,
    ctl: mpsc::Sender<Ctl>,
    /// Instances whose death someone here waits for.
    watched: Mutex<HashMap<String, watch::Sender<bool>>>,
}

/// A subscription; unsubscribes when dropped.
pub struct Subscription {
    fabric: Fabric,
    channel: String,
    /// Tells this subscription's inbox entry from a newer one's.
    token: u64,
    pub rx: mpsc::Receiver<Inbound>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inboxes = self.fabric.inboxes();
        // Only if it is still ours: a newer subscriber may have replaced it.
        if inboxes
            .get(&self.channel)
            .is_some_and(|(t, _)| *t == self.token)
        {
            inboxes.remove(&self.channel);
            let ctl = self.fabric.0.ctl.clone();
            if let Err(mpsc::error::TrySendError::Full(c)) =
                ctl.try_send(Ctl::Unsubscribe(self.channel.clone()))
            {
                // A burst of subscriptions: wait for room off this thread.
                tokio::spawn(async move {
                    let _ = ctl.send(c).await;
                });
            }
        }
    }
}

/// Counts a local user of the fabric while it lives.
pub struct Usage(Fabric);

impl Drop for Usage {
    fn drop(&mut self) {
        self.0.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Fabric {
    pub(super) fn start(store: Arc<Inner>, client: Client) -> Fabric {
        let (ctl, ctl_rx) = mpsc::channel(INBOX);
        let fabric = Fabric(Arc::new(FabricInner {
            store,
            users: AtomicUsize::new(0),
            became_used: Arc::new(Notify::new()),
            inboxes: Mutex::new(HashMap::new()),
            next_token: AtomicUsize::new(1),
            ctl,
            watched: Mutex::new(HashMap::new()),
        }));
        tokio::spawn(listen(Arc::downgrade(&fabric.0), client, ctl_rx));
        tokio::spawn(beat(Arc::downgrade(&fabric.0)));
        fabric
    }

    fn inboxes(&self) -> std::sync::MutexGuard<'_, Inboxes> {
        self.0.inboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn instance(&self) -> &str {
        &self.0.store.instance
    }

    fn key(&self, kind: &str, sid: &str, route: &str) -> String {
        format!("{}:{kind}:{{{sid}}}:{route}", self.0.store.keys.prefix)
    }

    fn alive_key(&self, instance: &str) -> String {
        format!("{}:alive:{instance}", self.0.store.keys.prefix)
    }

    /// Marks this instance as holding hubs or viewports until the returned
    /// guard drops: it beats its liveness key meanwhile.
    pub fn use_fabric(&self) -> Usage {
        if self.0.users.fetch_add(1, Ordering::AcqRel) == 0 {
            self.0.became_used.notify_one();
        }
        Usage(self.clone())
    }

    /// Beats now, so a hub claimed by an instance that was idle is never
    /// seen without a liveness key.
    pub async fn beat_now(&self) -> Result<(), StoreError> {
        beat_once(&self.0).await
    }

    async fn eval<T: redis::FromRedisValue + Send>(
        &self,
        op: &'static str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.0.store.eval(op, inv).await
    }

    /// Claims the hub of (session, route), taking it over from `dead`.
    /// With the claim comes what the stream still holds.
    pub async fn claim_hub(
        &self,
        sid: &str,
        route: &str,
        hub: u64,
        dead: Option<&str>,
    ) -> Result<Placement, StoreError> {
        let mut inv = CLAIM_HUB.prepare_invoke();
        inv.key(self.key("hub", sid, route))
            .key(self.key("vps", sid, route))
            .key(self.key("owner", sid, route))
            .arg(self.instance())
            .arg(ms(KEEP))
            .arg(dead.unwrap_or(""))
            .arg(hub);
        let answer: Vec<Value> = self.eval("claim hub", &inv).await?;
        let text = |v: Option<&Value>| -> String {
            v.and_then(|v| redis::from_redis_value::<String>(v).ok())
                .unwrap_or_default()
        };
        if matches!(answer.first(), Some(Value::Int(1))) {
            let (frames, next) = self.frames_from(sid, route, 0).await?;
            return Ok(Placement::Mine { frames, next });
        }
        let protocol = text(answer.get(3));
        Ok(Placement::Elsewhere {
            instance: text(answer.get(1)),
            linked: text(answer.get(2)) == "1",
            protocol: (!protocol.is_empty()).then_some(protocol),
        })
    }

    /// `false` when the hub is no longer this one's (taken over).
    pub async fn link_hub(
        &self,
        sid: &str,
        route: &str,
        hub: u64,
        protocol: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut inv = LINK_HUB.prepare_invoke();
        inv.key(self.key("hub", sid, route))
            .arg(self.instance())
            .arg(protocol.unwrap_or(""))
            .arg(hub);
        Ok(self.eval::<i64>("link hub", &inv).await? == 1)
    }

    /// The instance holding the hub of (session, route), if any.
    pub async fn hub_holder(&self, sid: &str, route: &str) -> Result<Option<String>, StoreError> {
        let key = self.key("hub", sid, route);
        let k = &key;
        self.0
            .store
            .run("hub holder", |mut conn| async move {
                redis::cmd("HGET")
                    .arg(k)
                    .arg("inst")
                    .query_async(&mut conn)
                    .await
            })
            .await
    }

    pub async fn release_hub(&self, sid: &str, route: &str, hub: u64) -> Result<(), StoreError> {
        let mut inv = RELEASE_HUB.prepare_invoke();
        inv.key(self.key("hub", sid, route))
            .arg(self.instance())
            .arg(hub);
        self.eval::<i64>("release hub", &inv).await.map(|_| ())
    }

    /// The stream's frames numbered `from` or later, and the number the
    /// next frame gets (the stream's last plus one; 0 for none).
    pub async fn frames_from(
        &self,
        sid: &str,
        route: &str,
        from: u64,
    ) -> Result<(Vec<(u64, Frame)>, u64), StoreError> {
        let key = self.key("frames", sid, route);
        let (start, last) = (stream_id(from), &key);
        let (entries, tail): (Value, Value) = self
            .0
            .store
            .run("read frames", |mut conn| {
                let mut pipe = redis::pipe();
                pipe.cmd("XRANGE").arg(last).arg(&start).arg("+");
                pipe.cmd("XREVRANGE")
                    .arg(last)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
                async move { pipe.query_async(&mut conn).await }
            })
            .await?;
        let frames = parse_entries(&entries);
        let next = parse_entries(&tail)
            .last()
            .map_or(0, |(seq, _)| seq + 1)
            .max(frames.last().map_or(0, |(s, _)| s + 1));
        Ok((frames, next))
    }

    /// Appends frames `first…` to the stream (capped at `cap`) and
    /// publishes them to every instance with viewports: one command per
    /// frame plus one per batch. Fails when another hub wrote those
    /// numbers (this hub was taken over) or the store is away.
    pub async fn append(
        &self,
        sid: &str,
        route: &str,
        first: u64,
        frames: &[Frame],
        cap: usize,
        expire: bool,
    ) -> Result<(), StoreError> {
        let key = self.key("frames", sid, route);
        let mut pipe = redis::pipe();
        for (i, f) in frames.iter().enumerate() {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg(cap.max(1))
                .arg(stream_id(first + i as u64))
                .arg("b")
                .arg(u8::from(f.binary))
                .arg("d")
                .arg(&f.data[..])
                .ignore();
        }
        if expire {
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(ms(KEEP))
                .ignore()
                .cmd("PEXPIRE")
                .arg(self.key("hub", sid, route))
                .arg(ms(KEEP))
                .ignore();
        }
        let pipe = &pipe;
        self.0
            .store
            .run("append frames", |mut conn| async move {
                pipe.query_async::<()>(&mut conn).await
            })
            .await?;
        self.publish(
            self.key("hubout", sid, route),
            wire::frames(first, frames),
            "publish frames",
        )
        .await
    }

    async fn publish(
        &self,
        channel: String,
        payload: Vec<u8>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let (channel, payload) = (&channel, &payload);
        self.0
            .store
            .run(op, |mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(&payload[..])
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    pub async fn publish_end(
        &self,
        sid: &str,
        route: &str,
        code: u16,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.publish(
            self.key("hubout", sid, route),
            wire::end(code, reason),
            "publish end",
        )
        .await
    }

    pub async fn publish_ack(
        &self,
        sid: &str,
        route: &str,
        instance: &str,
        n: u32,
    ) -> Result<(), StoreError> {
        self.publish(
            self.key("hubout", sid, route),
            wire::ack(instance, n),
            "publish ack",
        )
        .await
    }

    /// Tells the hub and every mirror that the owner changed (SPEC §9):
    /// on `hubout` for mirrors, on `hubin` for the hub, which does not
    /// listen to its own output.
    pub async fn publish_owner_changed(&self, sid: &str, route: &str) -> Result<(), StoreError> {
        for dir in ["hubout", "hubin"] {
            self.publish(self.key(dir, sid, route), wire::owner(), "publish owner")
                .await?;
        }
        Ok(())
    }

    /// The owning viewport, `<instance>/<n>`, if any.
    pub async fn owner(&self, sid: &str, route: &str) -> Result<Option<String>, StoreError> {
        let key = self.key("owner", sid, route);
        let k = &key;
        self.0
            .store
            .run("owner", |mut conn| async move {
                redis::cmd("GET").arg(k).query_async(&mut conn).await
            })
            .await
    }

    /// A frame of this instance's owner for the hub's runtime.
    pub async fn publish_write(
        &self,
        sid: &str,
        route: &str,
        frame: &Frame,
    ) -> Result<(), StoreError> {
        self.publish(
            self.key("hubin", sid, route),
            wire::write(self.instance(), frame),
            "publish write",
        )
        .await
    }

    /// Counts a viewport in; `true` when it is the owner.
    pub async fn attach_viewport(
        &self,
        sid: &str,
        route: &str,
        viewport: &str,
    ) -> Result<bool, StoreError> {
        let mut inv = ATTACH_VIEWPORT.prepare_invoke();
        inv.key(self.key("vps", sid, route))
            .key(self.key("owner", sid, route))
            .arg(self.instance())
            .arg(viewport)
            .arg(ms(KEEP));
        Ok(self.eval::<i64>("attach viewport", &inv).await? == 1)
    }

    pub async fn detach_viewport(
        &self,
        sid: &str,
        route: &str,
        viewport: &str,
    ) -> Result<(), StoreError> {
        let mut inv = DETACH_VIEWPORT.prepare_invoke();
        inv.key(self.key("vps", sid, route))
            .key(self.key("owner", sid, route))
            .arg(self.instance())
            .arg(viewport);
        self.eval::<i64>("detach viewport", &inv).await.map(|_| ())
    }

    /// Takes ownership for `viewport` if nobody (alive) holds it: one
    /// script, and a liveness check of the holder's instance only when a
    /// holder exists. Two racing claimers never both win.
    pub async fn claim_owner(
        &self,
        sid: &str,
        route: &str,
        viewport: &str,
    ) -> Result<bool, StoreError> {
        let mut dead = String::new();
        for _ in 0..2 {
            let mut inv = CLAIM_OWNER.prepare_invoke();
            inv.key(self.key("owner", sid, route))
                .arg(viewport)
                .arg(ms(KEEP))
                .arg(&dead);
            let answer: Vec<Value> = self.eval("claim owner", &inv).await?;
            if matches!(answer.first(), Some(Value::Int(1))) {
                return Ok(true);
            }
            let holder: String = answer
                .get(1)
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            if holder.is_empty() || self.is_alive(instance_of(&holder)).await? {
                return Ok(false);
            }
            dead = holder;
        }
        Ok(false)
    }

    /// Viewports attached on other instances that are alive. Counts of dead
    /// instances are removed on the way.
    pub async fn viewports_elsewhere(&self, sid: &str, route: &str) -> Result<u32, StoreError> {
        let key = self.key("vps", sid, route);
        let k = &key;
        let counts: HashMap<String, i64> = self
            .0
            .store
            .run("viewports", |mut conn| async move {
                redis::cmd("HGETALL").arg(k).query_async(&mut conn).await
            })
            .await?;
        let mut total = 0;
        for (instance, n) in counts {
            if instance == self.instance() || n <= 0 {
                continue;
            }
            if self.is_alive(&instance).await? {
                total += n as u32;
            } else {
                let (inst, k) = (&instance, &key);
                let _ = self
                    .0
                    .store
                    .run("viewports", |mut conn| async move {
                        redis::cmd("HDEL")
                            .arg(k)
                            .arg(inst)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await;
            }
        }
        Ok(total)
    }

    pub async fn is_alive(&self, instance: &str) -> Result<bool, StoreError> {
        if instance == self.instance() {
            return Ok(true);
        }
        let key = self.alive_key(instance);
        let k = &key;
        let n: i64 = self
            .0
            .store
            .run("alive", |mut conn| async move {
                redis::cmd("EXISTS").arg(k).query_async(&mut conn).await
            })
            .await?;
        Ok(n == 1)
    }

    /// Resolves to `true` once `instance` is found dead (its liveness key
    /// gone); one check per [`BEAT_EVERY`] for all watched instances.
    pub fn watch_instance(&self, instance: &str) -> watch::Receiver<bool> {
        let mut watched = self.0.watched.lock().unwrap_or_else(|p| p.into_inner());
        watched
            .entry(instance.to_string())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    /// Subscribes to the hub channel (`outbound = true`: what hubs send to
    /// viewports) or the hub's input channel of (session, route).
    /// A store that does not take the request in [`SUBSCRIBE_WAIT`] is
    /// away: the caller answers `503`.
    pub async fn subscribe(
        &self,
        sid: &str,
        route: &str,
        outbound: bool,
    ) -> Result<Subscription, StoreError> {
        let channel = self.key(if outbound { "hubout" } else { "hubin" }, sid, route);
        let (tx, rx) = mpsc::channel(INBOX);
        let token = self.0.next_token.fetch_add(1, Ordering::Relaxed) as u64;
        self.inboxes().insert(channel.clone(), (token, tx));
        let sub = Subscription {
            fabric: self.clone(),
            channel: channel.clone(),
            token,
            rx,
        };
        // Returns once Redis confirmed: a hub must hear a remote owner's
        // first frame, a mirror must not miss a frame between its stream
        // read and the channel.
        let (done, confirmed) = oneshot::channel();
        let subscribed = async {
            self.0.ctl.send(Ctl::Subscribe(channel, done)).await.ok()?;
            confirmed.await.ok()
        };
        match timeout(SUBSCRIBE_WAIT, subscribed).await {
            Ok(Some(())) => Ok(sub),
            _ => Err(StoreError("redis hub subscribe: not confirmed".into())),
        }
    }
}

fn parse_entries(v: &Value) -> Vec<(u64, Frame)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(parts) = e else { continue };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Some(seq) = redis::from_redis_value::<String>(id)
            .ok()
            .and_then(|s| seq_of(&s))
        else {
            continue;
        };
        let mut binary = false;
        let mut data = None;
        for pair in fields.chunks(2) {
            let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) =
                (pair.first(), pair.get(1))
            else {
                continue;
            };
            match &k[..] {
                b"b" => binary = &v[..] == b"1",
                b"d" => data = Some(Bytes::copy_from_slice(v)),
                _ => {}
            }
        }
        if let Some(data) = data {
            out.push((seq, Frame { binary, data }));
        }
    }
    out
}

async fn beat_once(f: &FabricInner) -> Result<(), StoreError> {
    let key = format!("{}:alive:{}", f.store.keys.prefix, f.store.instance);
    let k = &key;
    f.store
        .run("beat", |mut conn| async move {
            redis::cmd("SET")
                .arg(k)
                .arg(1)
                .arg("PX")
                .arg(ms(ALIVE_FOR))
                .query_async::<()>(&mut conn)
                .await
        })
        .await
}

/// While anything here uses the fabric: renew this instance's liveness
/// key, and check the instances someone here watches.
async fn beat(fabric: Weak<FabricInner>) {
    let mut tick = tokio::time::interval(BEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(f) = fabric.upgrade() else { return };
        let idle = f.users.load(Ordering::Acquire) == 0 && f.watched_is_empty();
        if idle {
            // Bounded, so a store that was dropped meanwhile ends this task.
            let became_used = f.became_used.clone();
            // Not holding `f` while idle: a dropped store must end at once
            // (its revocation subscription stops with it).
            drop(f);
            let _ = timeout(Duration::from_secs(5), became_used.notified()).await;
            continue;
        }
        if f.users.load(Ordering::Acquire) > 0 {
            let _ = beat_once(&f).await;
        }
        check_watched(&f).await;
        drop(f);
        tick.tick().await;
    }
}

impl FabricInner {
    fn watched_is_empty(&self) -> bool {
        let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|_, tx| tx.receiver_count() > 0);
        w.is_empty()
    }
}

/// One pipelined `EXISTS` per watched instance; a missing key is death.
/// A store that does not answer kills nobody.
async fn check_watched(f: &FabricInner) {
    let names: Vec<String> = {
        let mut w = f.watched.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody waits for these any more.
        w.retain(|_, tx| tx.receiver_count() > 0);
        w.keys().cloned().collect()
    };
    if names.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for n in &names {
        pipe.cmd("EXISTS")
            .arg(format!("{}:alive:{n}", f.store.keys.prefix));
    }
    let pipe = &pipe;
    let Ok(found) = f
        .store
        .run("watch", |mut conn| async move {
            pipe.query_async::<Vec<i64>>(&mut conn).await
        })
        .await
    else {
        return;
    };
    let mut w = f.watched.lock().unwrap_or_else(|p| p.into_inner());
    for (name, exists) in names.iter().zip(found) {
        if exists == 0 {
            if let Some(tx) = w.remove(name) {
                tx.send_replace(true);
            }
        }
    }
}

/// The subscription task: one connection for every hub channel of this
/// instance; each (re)subscription tells every inbox to re-sync.
async fn listen(fabric: Weak<FabricInner>, client: Client, mut ctl: mpsc::Receiver<Ctl>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let ended = follow(&fabric, &client, &mut ctl).await;
        let Some(reason) = ended else { return };
        tracing::warn!(error = %reason, "hub subscription lost; resubscribing");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

/// One connection's life; `None` when the fabric is gone.
async fn follow(
    fabric: &Weak<FabricInner>,
    client: &Client,
    ctl: &mut mpsc::Receiver<Ctl>,
) -> Option<StoreError> {
    let pubsub = match timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Some(describe("hub subscribe", &e)),
        Err(_) => return Some(StoreError("redis hub subscribe: timed out".into())),
    };
    let (mut sink, mut stream) = pubsub.split();
    let channels: Vec<String> = {
        let f = fabric.upgrade()?;
        let inboxes = f.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        inboxes.keys().cloned().collect()
    };
    if !channels.is_empty() {
        match timeout(RESPONSE_TIMEOUT, sink.subscribe(&channels)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Some(describe("hub subscribe", &e)),
            Err(_) => return Some(StoreError("redis hub subscribe: timed out".into())),
        }
        let f = fabric.upgrade()?;
        let inboxes = f.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        for c in &channels {
            if let Some((_, tx)) = inboxes.get(c) {
                let _ = tx.try_send(Inbound::Resync);
            }
        }
    }
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = msg?;
                let f = fabric.upgrade()?;
                let channel = msg.get_channel_name().to_string();
                let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                let Some(m) = wire::decode(Bytes::from(payload)) else { continue };
                let inboxes = f.inboxes.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((_, tx)) = inboxes.get(&channel) {
                    if tx.try_send(m).is_err() {
                        // A stalled subscriber: it re-reads the stream when it
                        // sees the numbers jump; ends and acks may be lost.
                        tracing::warn!(%channel, "hub inbox full; message dropped");
                    }
                }
            }
            c = ctl.recv() => {
                let mut batch = vec![c?];
                while batch.len() < CTL_BATCH {
                    match ctl.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                if let Err(e) = apply(fabric, &mut sink, batch).await {
                    return Some(e);
                }
            }
            _ = ping.tick() => {
                match timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(describe("hub heartbeat", &e)),
                    Err(_) => return Some(StoreError("redis hub heartbeat: timed out".into())),
                }
            }
        }
    }
}

/// Sends a burst of (un)subscriptions as few commands as their order
/// allows (runs of one kind), then tells new subscribers to re-sync:
/// anything published before their subscription took effect is in the
/// stream.
async fn apply(
    fabric: &Weak<FabricInner>,
    sink: &mut redis::aio::PubSubSink,
    batch: Vec<Ctl>,
) -> Result<(), StoreError> {
    type Run = (bool, Vec<String>, Vec<oneshot::Sender<()>>);
    let mut runs: Vec<Run> = Vec::new();
    for c in batch {
        let (sub, ch, done) = match c {
            Ctl::Subscribe(ch, done) => (true, ch, Some(done)),
            Ctl::Unsubscribe(ch) => (false, ch, None),
        };
        match runs.last_mut() {
            Some((kind, chs, dones)) if *kind == sub => {
                chs.push(ch);
                dones.extend(done);
            }
            _ => runs.push((sub, vec![ch], done.into_iter().collect())),
        }
    }
    for (sub, channels, dones) in runs {
        let r = if sub {
            timeout(RESPONSE_TIMEOUT, sink.subscribe(&channels)).await
        } else {
            timeout(RESPONSE_TIMEOUT, sink.unsubscribe(&channels)).await
        };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(describe("hub subscribe", &e)),
            Err(_) => return Err(StoreError("redis hub subscribe: timed out".into())),
        }
        if sub {
            let Some(f) = fabric.upgrade() else {
                return Ok(());
            };
            let inboxes = f.inboxes.lock().unwrap_or_else(|p| p.into_inner());
            for ch in &channels {
                if let Some((_, tx)) = inboxes.get(ch) {
                    let _ = tx.try_send(Inbound::Resync);
                }
            }
            for done in dones {
                let _ = done.send(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_decodes_to_none() {
        let frames = vec![
            Frame {
                binary: false,
                data: Bytes::from_static(b"hello"),
            },
            Frame {
                binary: true,
                data: Bytes::from_static(&[0, 1, 2]),
            },
        ];
        let cases = [
            (
                wire::frames(7, &frames),
                Inbound::Frames {
                    first: 7,
                    frames: frames.clone(),
                },
            ),
            (
                wire::end(1012, "service_restart"),
                Inbound::End {
                    code: 1012,
                    reason: "service_restart".into(),
                },
            ),
            (
                wire::ack("inst", 3),
                Inbound::Ack {
                    instance: "inst".into(),
                    n: 3,
                },
            ),
            (wire::owner(), Inbound::Owner),
            (
                wire::write("inst", &frames[1]),
                Inbound::Write {
                    instance: "inst".into(),
                    frame: frames[1].clone(),
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(wire::decode(Bytes::from(bytes.clone())), Some(want));
            // Every truncation is refused or decodes to something shorter,
            // never panics.
            for cut in 0..bytes.len() {
                let _ = wire::decode(Bytes::from(bytes[..cut].to_vec()));
            }
        }
        assert_eq!(wire::decode(Bytes::from_static(b"Zxx")), None);
        assert_eq!(wire::decode(Bytes::from_static(b"F\0\0")), None);
    }

    #[test]
    fn stream_ids_carry_the_frame_number() {
        assert_eq!(seq_of(&stream_id(0)), Some(0));
        assert_eq!(seq_of(&stream_id(123456789)), Some(123456789));
        assert_eq!(instance_of("abc/12"), "abc");
    }
}
