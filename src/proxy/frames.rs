//! Frame-boundary tracking on a raw WebSocket byte stream.
//!
//! The relay forwards bytes as they arrive, without decoding or re-encoding
//! messages (as NGINX and HAProxy do), but it still has to know where frames
//! begin: to enforce `max_message_bytes` before a single byte of an oversized
//! message's frame is forwarded, to see close frames go by, and to inject its
//! own close or ping frames only between frames. Header parsing is
//! tungstenite's (`FrameHeader::parse`); only the bookkeeping is ours.

use std::io::Cursor;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};

/// Longest possible frame header (RFC 6455 §5.2).
pub const MAX_HEADER: usize = 14;

/// What scanning a chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A data message grew beyond the limit; nothing of the offending frame
    /// was forwarded.
    TooBig,
    /// The stream is not WebSocket framing (bad opcode, reserved bits, …).
    Protocol,
}

/// The result of scanning one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes from the start of the chunk that may be forwarded now. The rest
    /// (at most a partial header) is carried into the next chunk, unless
    /// `event` is set, in which case the stream stops at `forward`.
    pub forward: usize,
    pub event: Option<Event>,
    /// A close frame's header was forwarded in this chunk.
    pub saw_close: bool,
}

/// Per-direction framing state: a few words, no buffers.
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Payload bytes of the current frame still to pass.
    remaining: u64,
    /// Payload bytes of the data message in progress (all its fragments).
    message_len: u64,
    /// Whether the frame whose payload is passing is a close frame.
    closing: bool,
}

impl FrameTracker {
    /// True when the next byte would start a new frame: the only place a
    /// frame of our own may be injected into this direction.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Payload bytes of the current frame not yet passed.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Scans `chunk`, which starts where the previous scan's `forward` ended.
    pub fn scan(&mut self, chunk: &[u8], max_message: u64) -> Scan {
        let mut pos = 0usize;
        let mut saw_close = false;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min((chunk.len() - pos) as u64);
                pos += take as usize;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Scan {
                        forward: pos,
                        event: None,
                        saw_close,
                    };
                }
            }
            if pos == chunk.len() {
                return Scan {
                    forward: pos,
                    event: None,
                    saw_close,
                };
            }
            let mut cursor = Cursor::new(&chunk[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return Scan {
                        forward: pos,
                        event: None,
                        saw_close,
                    };
                }
                Err(_) => {
                    return Scan {
                        forward: pos,
                        event: Some(Event::Protocol),
                        saw_close,
                    };
                }
            };
            // No extension is negotiated through the gateway, so reserved
            // bits mean a broken or hostile peer.
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Scan {
                    forward: pos,
                    event: Some(Event::Protocol),
                    saw_close,
                };
            }
            // RFC 6455 §5.5: control frames are short and never fragmented.
            // A runtime or client breaking that is broken; stop it here
            // rather than pass megabytes of "ping" past the message limit.
            if matches!(header.opcode, OpCode::Control(_)) && (len > 125 || !header.is_final) {
                return Scan {
                    forward: pos,
                    event: Some(Event::Protocol),
                    saw_close,
                };
            }
            match header.opcode {
                OpCode::Data(Data::Continue) => {
                    self.message_len = self.message_len.saturating_add(len)
                }
                OpCode::Data(_) => self.message_len = len,
                OpCode::Control(Control::Close) => {
                    saw_close = true;
                    self.closing = true;
                }
                OpCode::Control(_) => {}
            }
            if matches!(header.opcode, OpCode::Data(_)) && self.message_len > max_message {
                return Scan {
                    forward: pos,
                    event: Some(Event::TooBig),
                    saw_close,
                };
            }
            pos += cursor.position() as usize;
            self.remaining = len;
        }
    }
}

/// A masking key for a frame we send towards an upstream (we are its client).
fn mask() -> [u8; 4] {
    let mut m = [0u8; 4];
    getrandom::fill(&mut m).expect("the OS random source is unavailable");
    m
}

fn encode(mut frame: Frame, masked: bool) -> Vec<u8> {
    if masked {
        frame.header_mut().mask = Some(mask());
    }
    let mut out = Vec::with_capacity(frame.len() + 4);
    frame
        .format(&mut out)
        .expect("writing to a Vec cannot fail");
    out
}

/// A close frame with `code` and `reason`; `masked` towards an upstream.
pub fn close_frame(code: u16, reason: &str, masked: bool) -> Vec<u8> {
    encode(
        Frame::close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })),
        masked,
    )
}

/// A keep-alive ping.
pub fn ping_frame(masked: bool) -> Vec<u8> {
    encode(Frame::ping(&b"portcullis"[..]), masked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode;

    fn frame(opcode: OpCode, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = Frame::message(payload.to_vec(), opcode, fin);
        if masked {
            f.header_mut().mask = Some([1, 2, 3, 4]);
        }
        let mut out = Vec::new();
        f.format(&mut out).unwrap();
        out
    }

    #[test]
    fn forwards_whole_frames_and_carries_partial_headers() {
        let mut stream = frame(OpCode::Data(Data::Text), true, b"hello", true);
        stream.extend(frame(OpCode::Data(Data::Binary), true, &[7u8; 300], true));
        let mut t = FrameTracker::default();
        // Split inside the second header: only the first frame may pass.
        let first_len = 2 + 4 + 5;
        let s = t.scan(&stream[..first_len + 1], 1000);
        assert_eq!(
            s,
            Scan {
                forward: first_len,
                event: None,
                saw_close: false
            }
        );
        assert!(t.at_boundary());
        let s = t.scan(&stream[first_len..], 1000);
        assert_eq!(s.forward, stream.len() - first_len);
        assert!(t.at_boundary());
    }

    #[test]
    fn payload_split_across_chunks_is_not_a_boundary() {
        let stream = frame(OpCode::Data(Data::Binary), true, &[0u8; 100], false);
        let mut t = FrameTracker::default();
        let s = t.scan(&stream[..50], 1000);
        assert_eq!(s.forward, 50);
        assert!(!t.at_boundary());
        let s = t.scan(&stream[50..], 1000);
        assert_eq!(s.forward, stream.len() - 50);
        assert!(t.at_boundary());
    }

    #[test]
    fn limit_counts_all_fragments_and_stops_before_the_offending_frame() {
        let mut stream = frame(OpCode::Data(Data::Text), false, &[b'a'; 60], false);
        let mut ping = Vec::new();
        Frame::ping(&b"p"[..]).format(&mut ping).unwrap();
        stream.extend(&ping);
        let ok_len = stream.len();
        stream.extend(frame(
            OpCode::Data(Data::Continue),
            true,
            &[b'a'; 41],
            false,
        ));
        let mut t = FrameTracker::default();
        let s = t.scan(&stream, 100);
        assert_eq!(
            s,
            Scan {
                forward: ok_len,
                event: Some(Event::TooBig),
                saw_close: false
            }
        );
        // Exactly at the limit is fine.
        let mut t = FrameTracker::default();
        let mut exact = frame(OpCode::Data(Data::Text), false, &[b'a'; 60], false);
        exact.extend(frame(
            OpCode::Data(Data::Continue),
            true,
            &[b'a'; 40],
            false,
        ));
        assert_eq!(t.scan(&exact, 100).event, None);
    }

    #[test]
    fn sees_close_and_rejects_reserved_bits() {
        let close = close_frame(1000, "bye", true);
        let mut t = FrameTracker::default();
        let s = t.scan(&close, 10);
        assert!(s.saw_close);
        assert_eq!(s.forward, close.len());
        let mut bad = frame(OpCode::Data(Data::Text), true, b"x", false);
        bad[0] |= 0x40;
        assert_eq!(
            FrameTracker::default().scan(&bad, 10).event,
            Some(Event::Protocol)
        );
    }

    #[test]
    fn oversized_or_fragmented_control_frames_are_protocol_errors() {
        let mut big = Vec::new();
        Frame::ping(vec![0u8; 126]).format(&mut big).unwrap();
        assert_eq!(
            FrameTracker::default().scan(&big, 1 << 20).event,
            Some(Event::Protocol)
        );
        let mut ok = Vec::new();
        Frame::ping(vec![0u8; 125]).format(&mut ok).unwrap();
        assert_eq!(FrameTracker::default().scan(&ok, 1).event, None);
        let mut frag = Vec::new();
        Frame::ping(&b"p"[..]).format(&mut frag).unwrap();
        frag[0] &= 0x7f; // clear FIN
        assert_eq!(
            FrameTracker::default().scan(&frag, 10).event,
            Some(Event::Protocol)
        );
    }

    #[test]
    fn injected_frames_parse_back() {
        for masked in [false, true] {
            let bytes = close_frame(1008, "session_revoked", masked);
            let mut c = Cursor::new(&bytes[..]);
            let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
            assert_eq!(h.opcode, OpCode::Control(Control::Close));
            assert_eq!(h.mask.is_some(), masked);
            assert_eq!(len as usize, 2 + "session_revoked".len());
        }
    }
}
