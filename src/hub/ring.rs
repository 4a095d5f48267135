//! The per-hub replay ring and viewport table: all the state viewports and
//! the hub share, behind one short-held std mutex (never across an await).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::HubClose;

/// What the hub knows about one attached viewport.
pub struct ViewportHandle {
    /// The next sequence number this viewport will send to its client.
    pub cursor: Arc<AtomicU64>,
    /// Woken when the ring evicted frames this viewport has not sent yet.
    pub lagged: Arc<Notify>,
}

/// Where a new viewport starts and what its `101` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub seq: u64,
    /// `Some(true)` = resume ok, `Some(false)` = gap, `None` = no resume asked.
    pub resume_ok: Option<bool>,
    pub owner: bool,
}

pub struct Ring {
    frames: VecDeque<Message>,
    /// Sequence number of `frames[0]`.
    first_seq: u64,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Set once, when the hub ended: viewports deliver what is left, then
    /// close with this code and reason. An ended hub is never handed out.
    closed: Option<HubClose>,
    owner: Option<u64>,
    viewports: HashMap<u64, ViewportHandle>,
    /// Numbers continue those of earlier runtime connections (set by
    /// [`Ring::preload`], on the Redis store).
    continuing: bool,
}

/// What a viewport should do next.
pub enum Next {
    Send(Vec<Message>),
    Lagged,
    Closed(HubClose),
    Wait,
}

fn size(m: &Message) -> usize {
    m.len()
}

impl Ring {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Ring {
            frames: VecDeque::new(),
            first_seq: 0,
            bytes: 0,
            max_frames,
            max_bytes,
            closed: None,
            owner: None,
            viewports: HashMap::new(),
            continuing: false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    pub fn has_viewports(&self) -> bool {
        !self.viewports.is_empty()
    }

    /// Ends the ring: viewports deliver what it holds, then close with
    /// `close`. The first close wins.
    pub fn close(&mut self, close: HubClose) {
        self.closed.get_or_insert(close);
    }

    /// Ends the ring only if no viewport is attached, deciding under the
    /// lock a viewport attaches under: an attach racing the detach grace
    /// either keeps the hub or finds it closed. `true` when it closed.
    pub fn close_if_unattended(&mut self, close: HubClose) -> bool {
        if self.has_viewports() {
            return false;
        }
        self.close(close);
        true
    }

    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.frames.len() as u64
    }

    /// Appends an upstream frame, evicting the oldest past either cap, and
    /// wakes viewports that fell behind the new oldest frame.
    pub fn push(&mut self, m: Message) {
        self.bytes += size(&m);
        self.frames.push_back(m);
        let mut evicted = false;
        while self.frames.len() > self.max_frames
            || (self.bytes > self.max_bytes && self.frames.len() > 1)
        {
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= size(&old);
                self.first_seq += 1;
                evicted = true;
            }
        }
        if evicted {
            for v in self.viewports.values() {
                if v.cursor.load(Ordering::Acquire) < self.first_seq {
                    v.lagged.notify_one();
                }
            }
        }
    }

    /// Fills a new ring with what the shared stream still holds (SPEC §8):
    /// the run of consecutive frames that ends just before `next`, so the
    /// ring continues the deployment's numbering. Only for an empty ring.
    pub fn preload(&mut self, frames: impl IntoIterator<Item = (u64, Message)>, next: u64) {
        self.continuing = true;
        let mut kept: Vec<Message> = Vec::new();
        let mut start = next;
        let mut expected = None;
        for (seq, m) in frames {
            if expected != Some(seq) {
                kept.clear();
                start = seq;
            }
            kept.push(m);
            expected = Some(seq + 1);
        }
        if expected != Some(next) {
            kept.clear();
            start = next;
        }
        self.frames.clear();
        self.bytes = 0;
        self.first_seq = start;
        for m in kept {
            self.push(m);
        }
    }

    /// Continues the numbering at `seq`, dropping what the ring holds: the
    /// frames in between are lost to this ring (a mirror that missed them
    /// and found them gone from the stream). Viewports behind it lag out.
    pub fn skip_to(&mut self, seq: u64) {
        if seq <= self.next_seq() {
            return;
        }
        self.frames.clear();
        self.bytes = 0;
        self.first_seq = seq;
        for v in self.viewports.values() {
            if v.cursor.load(Ordering::Acquire) < self.first_seq {
                v.lagged.notify_one();
            }
        }
    }

    /// Registers a viewport and decides where it starts (SPEC §7 resume);
    /// `None` once the ring is closed. `owner` is the store's decision on
    /// the Redis store; `None` decides here.
    pub fn attach(
        &mut self,
        id: u64,
        resume_from: Option<u64>,
        owner: Option<bool>,
    ) -> Option<(Start, ViewportHandle)> {
        if self.is_closed() {
            return None;
        }
        let next = self.next_seq();
        let (seq, resume_ok) = match resume_from {
            None => (next, None),
            Some(n) if n >= self.first_seq && n <= next => (n, Some(true)),
            // Past the live edge while the numbering continues across
            // runtime connections (Redis store): the client saw frames a
            // dead hub numbered but never stored. Replaying the oldest kept
            // frames would double what it has; it starts live, told `gap`.
            Some(n) if n > next && self.continuing => (next, Some(false)),
            // Frame n left the ring (or never existed on this upstream):
            // replay from the oldest kept frame and say so.
            Some(_) => (self.first_seq, Some(false)),
        };
        // Owner only when nobody else is attached: with readers present and
        // the owner gone, the next viewport that *sends* claims ownership
        // (SPEC §7), not the next one to arrive.
        let owner = owner.unwrap_or(self.owner.is_none() && self.viewports.is_empty());
        if owner {
            self.owner = Some(id);
        }
        let cursor = Arc::new(AtomicU64::new(seq));
        let lagged = Arc::new(Notify::new());
        self.viewports.insert(
            id,
            ViewportHandle {
                cursor: cursor.clone(),
                lagged: lagged.clone(),
            },
        );
        Some((
            Start {
                seq,
                resume_ok,
                owner,
            },
            ViewportHandle { cursor, lagged },
        ))
    }

    /// Removes a viewport; frees ownership if it held it. Returns how many
    /// viewports remain.
    pub fn detach(&mut self, id: u64) -> usize {
        self.viewports.remove(&id);
        if self.owner == Some(id) {
            self.owner = None;
        }
        self.viewports.len()
    }

    /// The owning viewport, if any.
    pub fn owner(&self) -> Option<u64> {
        self.owner
    }

    /// A data frame from viewport `id`: may it go upstream? Claims free
    /// ownership atomically, so two racing readers cannot both win.
    pub fn may_write(&mut self, id: u64) -> bool {
        match self.owner {
            Some(o) => o == id,
            None => {
                self.owner = Some(id);
                true
            }
        }
    }

    /// Frames from `cursor` on (at most `batch`), or why there are none.
    pub fn next_for(&self, cursor: u64, batch: usize) -> Next {
        if cursor < self.first_seq {
            return Next::Lagged;
        }
        let start = (cursor - self.first_seq) as usize;
        if start < self.frames.len() {
            return Next::Send(
                self.frames
                    .iter()
                    .skip(start)
                    .take(batch)
                    .cloned()
                    .collect(),
            );
        }
        match &self.closed {
            Some(ending) => Next::Closed(ending.clone()),
            None => Next::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Message {
        Message::text(s)
    }

    impl Ring {
        fn attach_open(&mut self, id: u64, resume: Option<u64>) -> (Start, ViewportHandle) {
            self.attach(id, resume, None).expect("ring is open")
        }
    }

    #[test]
    fn a_closed_ring_takes_no_viewport_and_the_first_close_wins() {
        use crate::sockets::close::{GOING_AWAY, SESSION_REVOKED};
        let mut unattended = Ring::new(3, 1000);
        assert!(unattended.close_if_unattended(GOING_AWAY.into()));
        assert!(unattended.is_closed());

        let mut r = Ring::new(3, 1000);
        r.attach_open(1, None);
        assert!(
            !r.close_if_unattended(GOING_AWAY.into()),
            "a viewport is attached"
        );
        assert!(!r.is_closed());
        r.close(SESSION_REVOKED.into());
        r.close(GOING_AWAY.into());
        assert!(
            r.attach(2, None, None).is_none(),
            "an ended hub takes no viewport"
        );
        match r.next_for(0, 10) {
            Next::Closed(c) => assert_eq!((c.code, &*c.reason), (1008, "session_revoked")),
            _ => panic!("the ring is closed"),
        }
    }

    #[test]
    fn numbers_frames_and_evicts_by_count_and_bytes() {
        let mut r = Ring::new(3, 1000);
        for i in 0..5 {
            r.push(t(&format!("{i}")));
        }
        assert_eq!(r.next_seq(), 5);
        assert!(matches!(r.next_for(1, 10), Next::Lagged));
        match r.next_for(2, 10) {
            Next::Send(v) => assert_eq!(v, vec![t("2"), t("3"), t("4")]),
            _ => panic!(),
        }
        let mut r = Ring::new(100, 10);
        r.push(t("aaaaaa"));
        r.push(t("bbbbbb"));
        assert_eq!(r.frames.len(), 1, "byte cap keeps memory bounded");
    }

    #[test]
    fn resume_ok_gap_and_live() {
        let mut r = Ring::new(3, 1000);
        for i in 0..5 {
            r.push(t(&format!("{i}")));
        }
        let (s, _) = r.attach_open(1, Some(3));
        assert_eq!(
            s,
            Start {
                seq: 3,
                resume_ok: Some(true),
                owner: true
            }
        );
        let (s, _) = r.attach_open(2, Some(0));
        assert_eq!(
            s,
            Start {
                seq: 2,
                resume_ok: Some(false),
                owner: false
            }
        );
        let (s, _) = r.attach_open(3, None);
        assert_eq!((s.seq, s.resume_ok), (5, None));
        let (s, _) = r.attach_open(4, Some(99));
        assert_eq!((s.seq, s.resume_ok), (2, Some(false)));
    }

    #[test]
    fn past_the_live_edge_of_a_continued_numbering_starts_live_with_a_gap() {
        let mut r = Ring::new(8, 1000);
        r.preload((3..6).map(|i| (i, t(&i.to_string()))), 6);
        let (s, _) = r.attach_open(1, Some(9));
        assert_eq!(
            (s.seq, s.resume_ok),
            (6, Some(false)),
            "nothing old replayed"
        );
        let (s, _) = r.attach_open(2, Some(4));
        assert_eq!((s.seq, s.resume_ok), (4, Some(true)));
        let (s, _) = r.attach_open(3, Some(1));
        assert_eq!((s.seq, s.resume_ok), (3, Some(false)), "left the ring");
    }

    #[test]
    fn a_new_viewport_does_not_take_ownership_from_attached_readers() {
        let mut r = Ring::new(3, 1000);
        r.attach_open(1, None);
        r.attach_open(2, None);
        r.detach(1);
        let (s, _) = r.attach_open(3, None);
        assert!(!s.owner, "reader 2 was there first");
        assert!(r.may_write(2));
        assert!(!r.may_write(3));
    }

    #[test]
    fn ownership_is_released_and_claimed_by_exactly_one() {
        let mut r = Ring::new(3, 1000);
        r.attach_open(1, None);
        r.attach_open(2, None);
        r.attach_open(3, None);
        assert!(r.may_write(1));
        assert!(!r.may_write(2));
        r.detach(1);
        assert!(r.may_write(3));
        assert!(!r.may_write(2));
    }

    #[test]
    fn lagging_viewport_is_woken_on_eviction() {
        let mut r = Ring::new(2, 1000);
        let (_, h) = r.attach_open(1, None);
        r.push(t("a"));
        r.push(t("b"));
        r.push(t("c"));
        // The cursor is still 0 and frame 0 is gone: the permit is stored.
        let woke = h.lagged.notified();
        futures_util::pin_mut!(woke);
        assert!(futures_util::FutureExt::now_or_never(woke).is_some());
    }
}
