//! The per-hub replay ring and viewport table: all the state viewports and
//! the hub share, behind one short-held std mutex (never across an await).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::Ending;

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
    pub closed: Option<Ending>,
    pub owner: Option<u64>,
    pub viewports: HashMap<u64, ViewportHandle>,
}

/// What a viewport should do next.
pub enum Next {
    Send(Vec<Message>),
    Lagged,
    Closed(Ending),
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
        }
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

    /// Registers a viewport and decides where it starts (SPEC §7 resume).
    pub fn attach(&mut self, id: u64, resume_from: Option<u64>) -> (Start, ViewportHandle) {
        let next = self.next_seq();
        let (seq, resume_ok) = match resume_from {
            None => (next, None),
            Some(n) if n >= self.first_seq && n <= next => (n, Some(true)),
            // Frame n left the ring (or never existed on this upstream):
            // replay from the oldest kept frame and say so.
            Some(_) => (self.first_seq, Some(false)),
        };
        // Owner only when nobody else is attached: with readers present and
        // the owner gone, the next viewport that *sends* claims ownership
        // (SPEC §7), not the next one to arrive.
        let owner = self.owner.is_none() && self.viewports.is_empty();
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
        (
            Start {
                seq,
                resume_ok,
                owner,
            },
            ViewportHandle { cursor, lagged },
        )
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
        let (s, _) = r.attach(1, Some(3));
        assert_eq!(
            s,
            Start {
                seq: 3,
                resume_ok: Some(true),
                owner: true
            }
        );
        let (s, _) = r.attach(2, Some(0));
        assert_eq!(
            s,
            Start {
                seq: 2,
                resume_ok: Some(false),
                owner: false
            }
        );
        let (s, _) = r.attach(3, None);
        assert_eq!((s.seq, s.resume_ok), (5, None));
        let (s, _) = r.attach(4, Some(99));
        assert_eq!((s.seq, s.resume_ok), (2, Some(false)));
    }

    #[test]
    fn a_new_viewport_does_not_take_ownership_from_attached_readers() {
        let mut r = Ring::new(3, 1000);
        r.attach(1, None);
        r.attach(2, None);
        r.detach(1);
        let (s, _) = r.attach(3, None);
        assert!(!s.owner, "reader 2 was there first");
        assert!(r.may_write(2));
        assert!(!r.may_write(3));
    }

    #[test]
    fn ownership_is_released_and_claimed_by_exactly_one() {
        let mut r = Ring::new(3, 1000);
        r.attach(1, None);
        r.attach(2, None);
        r.attach(3, None);
        assert!(r.may_write(1));
        assert!(!r.may_write(2));
        r.detach(1);
        assert!(r.may_write(3));
        assert!(!r.may_write(2));
    }

    #[test]
    fn lagging_viewport_is_woken_on_eviction() {
        let mut r = Ring::new(2, 1000);
        let (_, h) = r.attach(1, None);
        r.push(t("a"));
        r.push(t("b"));
        r.push(t("c"));
        // The cursor is still 0 and frame 0 is gone: the permit is stored.
        let woke = h.lagged.notified();
        futures_util::pin_mut!(woke);
        assert!(futures_util::FutureExt::now_or_never(woke).is_some());
    }
}
