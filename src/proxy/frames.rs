//! Frame-boundary tracking and RFC 6455 checks on a raw WebSocket byte
//! stream.
//!
//! The relay forwards bytes as they arrive, without decoding or re-encoding
//! messages (as NGINX and HAProxy do), but it still has to know where frames
//! begin: to enforce `max_message_bytes` before a single byte of an oversized
//! message's frame is forwarded, to see close frames go by, and to inject its
//! own close or ping frames only between frames.
//!
//! On the client's direction it also checks what RFC 6455 asks of an
//! endpoint (SPEC §6): masking, reserved bits, opcodes, control-frame
//! rules, the continuation state, close codes, and the UTF-8 of text
//! messages and close reasons. UTF-8 is validated incrementally, as the
//! bytes arrive: each chunk's payload is unmasked into a stack buffer and
//! validated before anything of it is forwarded, an incomplete code point
//! carried to the next chunk or fragment ([`Utf8`]). Nothing of a broken
//! frame that is in the read where the fault shows is forwarded: a header
//! fault stops the stream before the frame. An invalid byte in the payload
//! of a frame whose start (and valid first part) went out in an earlier
//! read leaves the runtime mid-frame ([`FrameTracker::at_boundary`] is
//! false): it then gets no close frame, only the end of the connection.

use simdutf8::compat::from_utf8;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};

/// Longest possible frame header (RFC 6455 §5.2).
pub const MAX_HEADER: usize = 14;

/// What scanning a chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A data message grew beyond the limit; nothing of the offending frame
    /// was forwarded.
    TooBig,
    /// The stream breaks RFC 6455 framing (bad opcode, reserved bits, an
    /// unmasked client frame, a close code that must not be sent, …): 1002.
    Protocol,
    /// Invalid UTF-8 in a text message or a close reason: 1007.
    InvalidPayload,
}

/// The result of scanning one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes from the start of the chunk that may be forwarded now. With
    /// `event` set, the stream stops here for good.
    pub forward: usize,
    /// Bytes from the start of the chunk the tracker has accounted for; the
    /// rest (at most a partial header) is carried into the next chunk.
    /// Beyond `forward` only after an event: the tracker keeps following
    /// the frames it no longer lets through, so a later close is still seen.
    pub consumed: usize,
    pub event: Option<Event>,
    /// A close frame's header was forwarded in this chunk (or, once the
    /// stream has stopped, went by in it).
    pub saw_close: bool,
}

/// Which checks a direction gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// The source is a client: every RFC 6455 endpoint check (SPEC §6).
    /// Otherwise (a runtime) only what protects the gateway itself: opcodes,
    /// reserved bits, control-frame sizes, the message limit.
    pub client: bool,
    /// permessage-deflate was negotiated on this connection (RFC 7692):
    /// RSV1 is then allowed on the first frame of a data message, and the
    /// UTF-8 of a compressed text message is not checked (it would have to
    /// be inflated first; documented in README). Set from the runtime's
    /// answer to the client's offer on exclusive routes.
    pub deflate: bool,
}

/// The data message in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Message {
    #[default]
    None,
    /// A text message whose UTF-8 is checked.
    Text,
    /// Binary, or text that is not checked (compressed).
    Opaque,
}

/// What the payload passing now is checked as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Payload {
    /// Passed without looking (binary, ping, pong, a runtime's frames).
    #[default]
    Opaque,
    /// A fragment of a checked text message.
    Text,
    /// A close frame's code, first byte still to come.
    CloseCode,
    /// A close frame's code, second byte still to come (the first kept).
    CloseCodeLow(u8),
    /// A close frame's reason.
    CloseReason,
}

/// Incremental UTF-8 validation: a text in pieces, an incomplete code
/// point at the end of one piece carried to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8 {
    partial: [u8; 4],
    len: u8,
}

impl Utf8 {
    /// Validates the next piece; false at the first byte that cannot be
    /// part of valid UTF-8, whatever follows (fail fast).
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        if self.len > 0 {
            let have = self.len as usize;
            let need = sequence_len(self.partial[0]) - have;
            let take = need.min(bytes.len());
            self.partial[have..have + take].copy_from_slice(&bytes[..take]);
            match from_utf8(&self.partial[..have + take]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {
                    self.len = (have + take) as u8;
                    return true;
                }
                Err(_) => return false,
            }
            bytes = &bytes[take..];
        }
        match from_utf8(bytes) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                true
            }
            Err(_) => false,
        }
    }

    /// True when no code point is left incomplete.
    pub fn complete(&self) -> bool {
        self.len == 0
    }
}

/// The length of the UTF-8 sequence a (valid) lead byte starts.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xf0.. => 4,
        0xe0.. => 3,
        _ => 2,
    }
}

/// RFC 6455 §7.4 and the IANA registry: the codes an endpoint may send.
/// 1004 is reserved, 1005/1006/1015 must never be on the wire, 1016-2999
/// are unassigned protocol codes, 3000-4999 belong to libraries and
/// applications; 1012-1014 (restart, try again later, bad gateway) are
/// registered and accepted.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    /// RSV1, RSV2, RSV3 as the high bits of the first byte (`0x70` mask).
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Header bytes, mask included.
    size: usize,
}

const RSV1: u8 = 0x40;
const OP_CONTINUE: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;

/// RFC 6455 §5.2; `None` while the header is incomplete.
fn parse_header(b: &[u8]) -> Option<Header> {
    let (&first, &second) = (b.first()?, b.get(1)?);
    let (len, mut size) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if second & 0x80 != 0 {
        let m: [u8; 4] = b.get(size..size + 4)?.try_into().ok()?;
        size += 4;
        Some(m)
    } else {
        None
    };
    Some(Header {
        fin: first & 0x80 != 0,
        rsv: first & 0x70,
        opcode: first & 0x0f,
        mask,
        len,
        size,
    })
}

/// Per-direction framing state: a few words, no buffers.
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Payload bytes of the current frame still to pass.
    remaining: u64,
    /// Payload bytes of the data message in progress (all its fragments).
    message_len: u64,
    rules: Rules,
    /// A header was read whose frame has not ended yet (its payload, even
    /// an empty one, still to be accounted for).
    open: bool,
    /// The current frame is the last of its message.
    fin: bool,
    message: Message,
    payload: Payload,
    /// The current frame's masking key, rotated so that `mask[0]` applies
    /// to its next payload byte (used only while its payload is checked).
    mask: [u8; 4],
    /// The text message in progress.
    text: Utf8,
    /// The reason of the close frame in progress.
    reason: Utf8,
    /// Set when the stream stopped at an event: whether what was forwarded
    /// ended between frames.
    stopped: Option<bool>,
}

impl FrameTracker {
    pub fn new(rules: Rules) -> FrameTracker {
        FrameTracker {
            rules,
            ..FrameTracker::default()
        }
    }

    /// True when the next byte forwarded would start a new frame: the only
    /// place a frame of our own may be injected into this direction.
    pub fn at_boundary(&self) -> bool {
        self.stopped.unwrap_or(self.remaining == 0)
    }

    /// Payload bytes of the current frame not yet passed (none once the
    /// stream stopped).
    pub fn remaining(&self) -> u64 {
        if self.stopped.is_some() {
            0
        } else {
            self.remaining
        }
    }

    /// Scans `chunk`, which starts where the previous scan's `consumed`
    /// ended.
    pub fn scan(&mut self, chunk: &[u8], max_message: u64) -> Scan {
        let mut scan = Scan {
            forward: 0,
            consumed: 0,
            event: None,
            saw_close: false,
        };
        let mut pos = 0usize;
        // Where the current frame starts in this chunk, if it does.
        let mut began_at = None;
        loop {
            if self.open {
                let take = self.remaining.min((chunk.len() - pos) as u64) as usize;
                if self.payload != Payload::Opaque
                    && self.stopped.is_none()
                    && let Err(ev) = self.check_payload(&chunk[pos..pos + take])
                {
                    self.stop(&mut scan, began_at, ev);
                }
                pos += take;
                self.remaining -= take as u64;
                if self.remaining > 0 {
                    break;
                }
                self.open = false;
                if self.stopped.is_none()
                    && let Err(ev) = self.end_frame()
                {
                    self.stop(&mut scan, began_at, ev);
                }
            }
            let Some(h) = parse_header(&chunk[pos..]) else {
                break;
            };
            began_at = Some(pos);
            if self.stopped.is_none()
                && let Err(ev) = self.start_frame(&h, max_message)
            {
                self.stop(&mut scan, began_at, ev);
            }
            // Once stopped, a close is one the peer sent after its fault
            // (not forwarded): reported from the next chunk on, after the
            // relay has acted on the event.
            if h.opcode == OP_CLOSE && scan.event.is_none() {
                scan.saw_close = true;
            }
            pos += h.size;
            self.remaining = h.len;
            self.open = true;
        }
        if self.stopped.is_none() {
            scan.forward = pos;
        }
        scan.consumed = pos;
        scan
    }

    /// Stops the stream at the current frame: from its start if that is in
    /// this chunk (`began_at`), else from the chunk's start, which leaves
    /// the destination mid-frame. What follows is only followed.
    fn stop(&mut self, scan: &mut Scan, began_at: Option<usize>, ev: Event) {
        scan.forward = began_at.unwrap_or(0);
        scan.event = Some(ev);
        if began_at.is_some() {
            // Its header, if a close, was not forwarded after all.
            scan.saw_close = false;
        }
        self.stopped = Some(began_at.is_some());
        self.payload = Payload::Opaque;
        self.message = Message::None;
    }

    /// The header checks, then the message bookkeeping for this frame.
    fn start_frame(&mut self, h: &Header, max_message: u64) -> Result<(), Event> {
        let control = h.opcode & 0x8 != 0;
        let starts_message = matches!(h.opcode, OP_TEXT | OP_BINARY);
        // Reserved bits mean a broken or hostile peer unless an extension
        // gave them a meaning: RSV1 marks a compressed message (RFC 7692).
        let rsv_ok = h.rsv == 0 || (self.rules.deflate && h.rsv == RSV1 && starts_message);
        if !rsv_ok || !matches!(h.opcode, 0x0..=0x2 | 0x8..=0xa) {
            return Err(Event::Protocol);
        }
        // RFC 6455 §5.5: control frames are short and never fragmented. A
        // runtime breaking that is broken too; stop it here rather than pass
        // megabytes of "ping" past the message limit.
        if control && (h.len > 125 || !h.fin) {
            return Err(Event::Protocol);
        }
        if self.rules.client {
            let in_message = self.message != Message::None;
            let out_of_order = match h.opcode {
                OP_CONTINUE => !in_message,
                OP_TEXT | OP_BINARY => in_message,
                _ => false,
            };
            // §5.3: a client masks every frame; §5.5.1: a close body is
            // empty or starts with a 2-byte code.
            if h.mask.is_none() || out_of_order || (h.opcode == OP_CLOSE && h.len == 1) {
                return Err(Event::Protocol);
            }
        }
        if starts_message {
            self.message_len = h.len;
            let checked = self.rules.client && h.opcode == OP_TEXT && h.rsv & RSV1 == 0;
            self.message = if checked {
                Message::Text
            } else {
                Message::Opaque
            };
            self.text = Utf8::default();
        } else if h.opcode == OP_CONTINUE {
            self.message_len = self.message_len.saturating_add(h.len);
        }
        if !control && self.message_len > max_message {
            return Err(Event::TooBig);
        }
        self.payload = match h.opcode {
            OP_CONTINUE | OP_TEXT if self.message == Message::Text => Payload::Text,
            OP_CLOSE if self.rules.client && h.len >= 2 => {
                self.reason = Utf8::default();
                Payload::CloseCode
            }
            _ => Payload::Opaque,
        };
        self.mask = h.mask.unwrap_or_default();
        self.fin = h.fin;
        if !control && h.fin {
            self.message = Message::None;
        }
        Ok(())
    }

    /// Checks `masked`, the next payload bytes of the current frame.
    fn check_payload(&mut self, masked: &[u8]) -> Result<(), Event> {
        let mut buf = [0u8; 512];
        for block in masked.chunks(buf.len()) {
            let plain = &mut buf[..block.len()];
            unmask(plain, block, &mut self.mask);
            let mut rest: &[u8] = plain;
            loop {
                match self.payload {
                    Payload::Opaque => break,
                    Payload::Text | Payload::CloseReason => {
                        let utf8 = if self.payload == Payload::Text {
                            &mut self.text
                        } else {
                            &mut self.reason
                        };
                        if !utf8.feed(rest) {
                            return Err(Event::InvalidPayload);
                        }
                        break;
                    }
                    Payload::CloseCode => {
                        let Some((&high, tail)) = rest.split_first() else {
                            break;
                        };
                        self.payload = Payload::CloseCodeLow(high);
                        rest = tail;
                    }
                    Payload::CloseCodeLow(high) => {
                        let Some((&low, tail)) = rest.split_first() else {
                            break;
                        };
                        if !close_code_allowed(u16::from_be_bytes([high, low])) {
                            return Err(Event::Protocol);
                        }
                        self.payload = Payload::CloseReason;
                        rest = tail;
                    }
                }
            }
        }
        Ok(())
    }

    /// The checks due when the current frame's last payload byte went by.
    fn end_frame(&mut self) -> Result<(), Event> {
        let incomplete = match self.payload {
            Payload::Text => self.fin && !self.text.complete(),
            Payload::CloseReason => !self.reason.complete(),
            _ => false,
        };
        self.payload = Payload::Opaque;
        if incomplete {
            return Err(Event::InvalidPayload);
        }
        Ok(())
    }
}

/// XORs `src` with `mask` into `out` (same length) and rotates `mask` so
/// that it continues where `src` ended.
fn unmask(out: &mut [u8], src: &[u8], mask: &mut [u8; 4]) {
    // Eight bytes at a time (a byte loop indexing the mask ran at a tenth
    // of the speed); the tail starts at a multiple of 4, so at mask[0].
    let [a, b, c, d] = *mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut outs = out.chunks_exact_mut(8);
    let mut srcs = src.chunks_exact(8);
    for (o, s) in (&mut outs).zip(&mut srcs) {
        let v = u64::from_ne_bytes(s.try_into().expect("8 bytes")) ^ wide;
        o.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, (o, s)) in outs
        .into_remainder()
        .iter_mut()
        .zip(srcs.remainder())
        .enumerate()
    {
        *o = s ^ mask[i & 3];
    }
    mask.rotate_left(src.len() % 4);
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
/// Never compressed (RSV bits clear), as RFC 7692 §6.1 has control frames
/// on a permessage-deflate connection.
pub fn close_frame(code: u16, reason: &str, masked: bool) -> Vec<u8> {
    encode(
        Frame::close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })),
        masked,
    )
}

/// A text frame of the gateway's own (SPEC §9: `portcullis.hello`),
/// unmasked, towards a client. Never compressed: RSV1 clear is a valid
/// uncompressed message on a permessage-deflate connection (RFC 7692 §6).
pub fn text_frame(text: &str) -> Vec<u8> {
    encode(
        Frame::message(text.to_string(), OpCode::Data(Data::Text), true),
        false,
    )
}

/// A keep-alive ping.
pub fn ping_frame(masked: bool) -> Vec<u8> {
    encode(Frame::ping(&b"portcullis"[..]), masked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};

    const CLIENT: Rules = Rules {
        client: true,
        deflate: false,
    };
    const TEXT: u8 = OP_TEXT;
    const BINARY: u8 = OP_BINARY;
    const CONT: u8 = OP_CONTINUE;
    const CLOSE: u8 = OP_CLOSE;
    const PING: u8 = 0x9;

    /// Encodes a frame with tungstenite's encoder (not ours).
    fn raw(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            rsv1: rsv & 0x4 != 0,
            rsv2: rsv & 0x2 != 0,
            rsv3: rsv & 0x1 != 0,
            opcode: OpCode::from(opcode),
            mask,
        };
        let mut out = Vec::new();
        Frame::from_payload(header, payload.to_vec().into())
            .format(&mut out)
            .unwrap();
        out
    }

    /// A masked client frame.
    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        raw(fin, 0, opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
    }

    fn unmasked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        raw(fin, 0, opcode, None, payload)
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    /// What the relay would do with `stream` read in pieces ending at `cuts`:
    /// the bytes forwarded, the first event, whether a close went by after
    /// it, and whether the forwarded stream ended between frames.
    struct Run {
        forwarded: Vec<u8>,
        event: Option<Event>,
        close_after: bool,
        at_boundary: bool,
    }

    fn run(rules: Rules, stream: &[u8], cuts: &[usize], max: u64) -> Run {
        let mut t = FrameTracker::new(rules);
        let mut r = Run {
            forwarded: Vec::new(),
            event: None,
            close_after: false,
            at_boundary: true,
        };
        let mut buf: Vec<u8> = Vec::with_capacity(stream.len() + MAX_HEADER);
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        ends.push(stream.len());
        ends.sort_unstable();
        let mut start = 0;
        for end in ends {
            buf.extend_from_slice(&stream[start..end]);
            start = end;
            let s = t.scan(&buf, max);
            assert!(s.forward <= s.consumed && s.consumed <= buf.len());
            assert!(
                buf.len() - s.consumed < MAX_HEADER,
                "only a partial header is carried"
            );
            if r.event.is_none() {
                r.forwarded.extend_from_slice(&buf[..s.forward]);
                r.event = s.event;
            } else {
                assert_eq!(s.forward, 0, "nothing passes once stopped");
                r.close_after |= s.saw_close;
            }
            buf.drain(..s.consumed);
        }
        r.at_boundary = t.at_boundary();
        r
    }

    fn whole(rules: Rules, stream: &[u8]) -> Run {
        run(rules, stream, &[], 1 << 20)
    }

    #[test]
    fn forwards_whole_frames_and_carries_partial_headers() {
        let mut stream = masked(TEXT, true, b"hello");
        stream.extend(masked(BINARY, true, &[7u8; 300]));
        let mut t = FrameTracker::new(CLIENT);
        // Split inside the second header: only the first frame may pass.
        let first_len = 2 + 4 + 5;
        let s = t.scan(&stream[..first_len + 1], 1000);
        assert_eq!(
            s,
            Scan {
                forward: first_len,
                consumed: first_len,
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
        let stream = unmasked(BINARY, true, &[0u8; 100]);
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
        let mut stream = masked(TEXT, false, &[b'a'; 60]);
        stream.extend(masked(PING, true, b"p"));
        let ok_len = stream.len();
        stream.extend(masked(CONT, true, &[b'a'; 41]));
        let r = run(CLIENT, &stream, &[], 100);
        assert_eq!(r.event, Some(Event::TooBig));
        assert_eq!(r.forwarded, stream[..ok_len]);
        // Exactly at the limit is fine.
        let mut exact = masked(TEXT, false, &[b'a'; 60]);
        exact.extend(masked(CONT, true, &[b'a'; 40]));
        assert_eq!(run(CLIENT, &exact, &[], 100).event, None);
    }

    #[test]
    fn sees_close_and_rejects_reserved_bits() {
        let close = close_frame(1000, "bye", true);
        let mut t = FrameTracker::new(CLIENT);
        let s = t.scan(&close, 10);
        assert!(s.saw_close);
        assert_eq!(s.forward, close.len());
        for rsv in [0x4, 0x2, 0x1] {
            let bad = raw(true, rsv, TEXT, None, b"x");
            assert_eq!(whole(Rules::default(), &bad).event, Some(Event::Protocol));
            let bad = raw(true, rsv, TEXT, Some([1, 2, 3, 4]), b"x");
            assert_eq!(whole(CLIENT, &bad).event, Some(Event::Protocol));
        }
    }

    #[test]
    fn injected_frames_are_never_compressed() {
        for masked in [false, true] {
            assert_eq!(close_frame(1001, "going_away", masked)[0], 0x88);
            assert_eq!(ping_frame(masked)[0], 0x89);
        }
    }

    #[test]
    fn deflate_allows_rsv1_on_the_first_frame_of_a_message_only() {
        let deflate = Rules {
            client: true,
            deflate: true,
        };
        let m = Some([1, 2, 3, 4]);
        // Compressed bytes are not UTF-8: not checked.
        let mut ok = raw(false, 0x4, TEXT, m, &[0xff, 0xfe]);
        ok.extend(raw(true, 0, CONT, m, &[0xc0]));
        ok.extend(raw(true, 0x4, BINARY, m, &[1]));
        let r = whole(deflate, &ok);
        assert_eq!((r.event, r.forwarded.len()), (None, ok.len()));
        let mut cont = raw(false, 0x4, TEXT, m, b"a");
        cont.extend(raw(true, 0x4, CONT, m, b"b"));
        assert_eq!(whole(deflate, &cont).event, Some(Event::Protocol));
        let ping = raw(true, 0x4, PING, m, b"");
        assert_eq!(whole(deflate, &ping).event, Some(Event::Protocol));
        let rsv2 = raw(true, 0x2, TEXT, m, b"a");
        assert_eq!(whole(deflate, &rsv2).event, Some(Event::Protocol));
        // An uncompressed text message is still checked.
        let bad = raw(true, 0, TEXT, m, &[0xff]);
        assert_eq!(whole(deflate, &bad).event, Some(Event::InvalidPayload));
    }

    #[test]
    fn oversized_or_fragmented_control_frames_are_protocol_errors() {
        for rules in [Rules::default(), CLIENT] {
            let big = masked(PING, true, &[0u8; 126]);
            assert_eq!(whole(rules, &big).event, Some(Event::Protocol));
            let ok = masked(PING, true, &[0u8; 125]);
            assert_eq!(run(rules, &ok, &[], 1).event, None);
            let frag = masked(PING, false, b"p");
            assert_eq!(whole(rules, &frag).event, Some(Event::Protocol));
        }
    }

    #[test]
    fn reserved_opcodes_stop_the_stream_before_the_frame() {
        let good = masked(TEXT, true, b"ok");
        for op in (3..=7).chain(11..=15) {
            let mut stream = good.clone();
            stream.extend(masked(op, true, b"zz"));
            let r = whole(CLIENT, &stream);
            assert_eq!(r.event, Some(Event::Protocol), "opcode {op}");
            assert_eq!(r.forwarded, good);
            assert!(r.at_boundary);
        }
    }

    #[test]
    fn client_frames_must_be_masked_runtime_frames_must_not_be_checked() {
        let frame = unmasked(TEXT, true, b"hi");
        assert_eq!(whole(CLIENT, &frame).event, Some(Event::Protocol));
        assert_eq!(whole(Rules::default(), &frame).event, None);
    }

    #[test]
    fn continuation_state_is_enforced_for_clients() {
        let stray = masked(CONT, true, b"x");
        assert_eq!(whole(CLIENT, &stray).event, Some(Event::Protocol));
        let mut nested = masked(TEXT, false, b"a");
        nested.extend(masked(PING, true, b"between fragments is fine"));
        let ok = nested.len();
        nested.extend(masked(BINARY, true, b"b"));
        let r = whole(CLIENT, &nested);
        assert_eq!(r.event, Some(Event::Protocol));
        assert_eq!(r.forwarded.len(), ok);
        // A runtime's frames are only counted.
        assert_eq!(
            whole(Rules::default(), &unmasked(CONT, true, b"x")).event,
            None
        );
    }

    #[test]
    fn close_codes_and_payloads() {
        let ok_codes = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
        ];
        for code in ok_codes.into_iter().chain([3000, 3999, 4000, 4999]) {
            let f = masked(CLOSE, true, &close_payload(code, b"why"));
            let r = whole(CLIENT, &f);
            assert_eq!((r.event, r.forwarded.len()), (None, f.len()), "code {code}");
        }
        // Autobahn 7.9.x and 7.13.x, plus the rest of the never-sent codes.
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let f = masked(CLOSE, true, &close_payload(code, b""));
            let r = whole(CLIENT, &f);
            assert_eq!(r.event, Some(Event::Protocol), "code {code}");
            assert!(r.forwarded.is_empty() && r.at_boundary);
        }
        assert_eq!(whole(CLIENT, &masked(CLOSE, true, &[])).event, None);
        assert_eq!(
            whole(CLIENT, &masked(CLOSE, true, &[0x03])).event,
            Some(Event::Protocol),
            "a 1-byte close payload"
        );
        let bad_reason = masked(CLOSE, true, &close_payload(1000, b"ok\xce\xba\xe1\xbd"));
        let r = whole(CLIENT, &bad_reason);
        assert_eq!(r.event, Some(Event::InvalidPayload));
        assert!(r.forwarded.is_empty());
        let bad_reason = masked(CLOSE, true, &close_payload(1000, b"\xff"));
        assert_eq!(
            whole(CLIENT, &bad_reason).event,
            Some(Event::InvalidPayload)
        );
        // The code split from its frame's header, and from itself.
        let f = masked(CLOSE, true, &close_payload(1005, b""));
        let r = run(CLIENT, &f, &[6, 7], 1000);
        assert_eq!(r.event, Some(Event::Protocol));
        assert_eq!(
            r.forwarded.len(),
            7,
            "the header and half the code went first"
        );
        assert!(!r.at_boundary, "the runtime is left mid-frame");
    }

    #[test]
    fn text_utf8_is_checked_across_fragments_and_reads() {
        let text = "κόσμε ✓ 𝄞".as_bytes();
        // Split every way: inside code points, across fragments.
        for split in 0..=text.len() {
            let mut stream = masked(TEXT, false, &text[..split]);
            stream.extend(masked(CONT, true, &text[split..]));
            for cut in 0..=stream.len() {
                let r = run(CLIENT, &stream, &[cut], 1000);
                assert_eq!(r.event, None, "split {split} cut {cut}");
                assert_eq!(r.forwarded, stream);
            }
        }
        // Incomplete at the end of the message.
        let mut stream = masked(TEXT, false, b"a");
        stream.extend(masked(CONT, true, &text[..1]));
        assert_eq!(whole(CLIENT, &stream).event, Some(Event::InvalidPayload));
        // An empty final fragment cannot finish a code point either.
        let mut stream = masked(TEXT, false, &text[..1]);
        stream.extend(masked(CONT, true, b""));
        assert_eq!(whole(CLIENT, &stream).event, Some(Event::InvalidPayload));
        // A binary message is never checked.
        assert_eq!(whole(CLIENT, &masked(BINARY, true, &[0xff])).event, None);
    }

    #[test]
    fn invalid_utf8_fails_fast_and_its_frame_is_not_forwarded() {
        let good = masked(TEXT, true, b"fine");
        // 0xf4 0x90 can never start a valid code point: caught before the
        // rest of the frame arrives.
        let mut payload = b"hello ".to_vec();
        payload.extend([0xf4, 0x90, 0x80, 0x80]);
        payload.extend([b'x'; 200]);
        let bad = masked(TEXT, true, &payload);
        let mut stream = good.clone();
        stream.extend(&bad);
        let bad_at = good.len() + 8 + 6 + 2;
        let r = run(CLIENT, &stream, &[bad_at], 1000);
        assert_eq!(r.event, Some(Event::InvalidPayload));
        assert_eq!(r.forwarded, good, "nothing of the bad frame");
        assert!(r.at_boundary);
        // The frame's start went out in an earlier read: the valid part
        // passed, the rest does not, and the runtime is mid-frame.
        let r = run(CLIENT, &stream, &[good.len() + 8 + 3, bad_at], 1000);
        assert_eq!(r.event, Some(Event::InvalidPayload));
        assert_eq!(r.forwarded.len(), good.len() + 8 + 3);
        assert!(!r.at_boundary);
    }

    #[test]
    fn after_a_fault_the_peer_close_is_still_seen() {
        let mut stream = masked(CONT, true, b"stray");
        stream.extend(masked(TEXT, true, b"dropped"));
        let closing_at = stream.len();
        stream.extend(masked(CLOSE, true, &close_payload(1000, b"")));
        let r = run(CLIENT, &stream, &[closing_at], 1000);
        assert_eq!(r.event, Some(Event::Protocol));
        assert!(r.forwarded.is_empty());
        assert!(r.close_after, "the client's close is seen after the fault");
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

    #[test]
    fn utf8_pieces_agree_with_std() {
        let samples: [&[u8]; 6] = [
            "a€𝄞é".as_bytes(),
            b"\xed\xa0\x80", // a surrogate
            b"\xc0\xaf",     // overlong
            b"ok\xf5",
            b"\xe2\x82",
            b"\xf0\x9f\x98\x80\x80",
        ];
        for s in samples {
            let expect = std::str::from_utf8(s).is_ok();
            for cut in 0..=s.len() {
                for cut2 in cut..=s.len() {
                    let mut v = Utf8::default();
                    let ok = v.feed(&s[..cut]) && v.feed(&s[cut..cut2]) && v.feed(&s[cut2..]);
                    assert_eq!(ok && v.complete(), expect, "{s:?} at {cut},{cut2}");
                }
            }
        }
    }

    /// What the checks cost, in a release build:
    /// `cargo test --release --lib -- --ignored scan_throughput --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn scan_throughput() {
        let text = "chat message κόσμε ✓ ".repeat(4096);
        for (size, op) in [(256, TEXT), (256, BINARY), (16384, TEXT), (16384, BINARY)] {
            let frame = masked(op, true, &text.as_bytes()[..size]);
            let stream = frame.repeat((64 << 20) / frame.len());
            for rules in [Rules::default(), CLIENT] {
                let mut t = FrameTracker::new(rules);
                let started = std::time::Instant::now();
                // The relay's reads: 16 KiB at a time, after the carry.
                let mut buf = Vec::with_capacity(16384 + MAX_HEADER);
                for chunk in stream.chunks(16384) {
                    buf.extend_from_slice(chunk);
                    let s = t.scan(&buf, 1 << 20);
                    assert_eq!(s.event, None);
                    buf.drain(..s.consumed);
                }
                let secs = started.elapsed().as_secs_f64();
                let n = stream.len() / frame.len();
                println!(
                    "{size:>5} B {}: {:>7.0} MB/s, {:>5.1} ns per frame ({})",
                    if op == TEXT { "text  " } else { "binary" },
                    stream.len() as f64 / secs / 1e6,
                    secs * 1e9 / n as f64,
                    if rules.client {
                        "client checks"
                    } else {
                        "framing only"
                    },
                );
            }
        }
    }

    /// Property tests: valid client streams pass byte for byte however they
    /// are split; one corruption anywhere stops the stream with the right
    /// event, before the bad frame (or, for a payload fault, before the
    /// byte that makes it one).
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// `cases` cases, drawn with XorShift: ChaCha, unoptimised in a test
        /// build, took half the run's time.
        fn config(cases: u32) -> ProptestConfig {
            ProptestConfig {
                cases,
                rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
                ..ProptestConfig::default()
            }
        }

        /// One frame to encode.
        #[derive(Debug, Clone)]
        struct F {
            fin: bool,
            rsv: u8,
            op: u8,
            mask: Option<[u8; 4]>,
            payload: Vec<u8>,
        }

        impl F {
            fn new(op: u8, fin: bool, payload: Vec<u8>, mask: [u8; 4]) -> F {
                F {
                    fin,
                    rsv: 0,
                    op,
                    mask: Some(mask),
                    payload,
                }
            }
        }

        /// Encoded frames and where each starts (and its payload starts).
        struct Encoded {
            bytes: Vec<u8>,
            starts: Vec<usize>,
            payload_at: Vec<usize>,
        }

        fn encode_all(frames: &[F]) -> Encoded {
            let mut e = Encoded {
                bytes: Vec::new(),
                starts: Vec::new(),
                payload_at: Vec::new(),
            };
            for f in frames {
                e.starts.push(e.bytes.len());
                let b = raw(f.fin, f.rsv >> 4, f.op, f.mask, &f.payload);
                e.payload_at.push(e.bytes.len() + b.len() - f.payload.len());
                e.bytes.extend(b);
            }
            e
        }

        /// A data message as fragments, maybe with a ping between them.
        #[derive(Debug, Clone)]
        struct Msg {
            text: bool,
            payload: Vec<u8>,
            cuts: Vec<usize>,
            ping_between: bool,
            mask: [u8; 4],
        }

        impl Msg {
            /// Frames, and for each payload byte the (frame, offset) it lands in.
            fn frames(&self, out: &mut Vec<F>, at: &mut Vec<(usize, usize)>) {
                let mut cuts: Vec<usize> = self
                    .cuts
                    .iter()
                    .map(|c| c % (self.payload.len() + 1))
                    .collect();
                cuts.sort_unstable();
                cuts.dedup();
                cuts.retain(|&c| c != 0 && c != self.payload.len());
                let mut bounds = vec![0];
                bounds.extend(cuts);
                bounds.push(self.payload.len());
                let n = bounds.len() - 1;
                for i in 0..n {
                    let op = match (i, self.text) {
                        (0, true) => TEXT,
                        (0, false) => BINARY,
                        _ => CONT,
                    };
                    let piece = self.payload[bounds[i]..bounds[i + 1]].to_vec();
                    for j in 0..piece.len() {
                        at.push((out.len(), j));
                    }
                    out.push(F::new(op, i + 1 == n, piece, self.mask));
                    if self.ping_between && i + 1 < n {
                        out.push(F::new(PING, true, b"p".to_vec(), self.mask));
                    }
                }
            }
        }

        fn mask() -> impl Strategy<Value = [u8; 4]> {
            any::<[u8; 4]>()
        }

        fn text() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<char>(), 0..24),
                prop::collection::vec(prop::char::range('a', 'z'), 0..24),
                prop::collection::vec(
                    prop::sample::select(vec!['é', '€', '𝄞', '✓', 'κ', 'a']),
                    0..24
                ),
            ]
            .prop_map(|cs| cs.into_iter().collect::<String>().into_bytes())
        }

        fn msg() -> impl Strategy<Value = Msg> {
            (
                any::<bool>(),
                text(),
                prop::collection::vec(any::<u8>(), 0..40),
                prop::collection::vec(any::<usize>(), 0..4),
                any::<bool>(),
                mask(),
            )
                .prop_map(|(is_text, t, bin, cuts, ping_between, mask)| Msg {
                    text: is_text,
                    payload: if is_text { t } else { bin },
                    cuts,
                    ping_between,
                    mask,
                })
        }

        /// A top-level item of a valid stream.
        #[derive(Debug, Clone)]
        enum Item {
            Msg(Msg),
            Ping(Vec<u8>, bool, [u8; 4]),
        }

        fn item() -> impl Strategy<Value = Item> {
            prop_oneof![
                4 => msg().prop_map(Item::Msg),
                1 => (prop::collection::vec(any::<u8>(), 0..126), any::<bool>(), mask())
                    .prop_map(|(p, pong, m)| Item::Ping(p, pong, m)),
            ]
        }

        const GOOD_CODES: [u16; 16] = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];

        /// A valid stream: its frames, the payload positions of each message,
        /// and the frame indices between messages (where a new one may start).
        #[derive(Debug, Clone)]
        struct Valid {
            frames: Vec<F>,
            between: Vec<usize>,
            /// Inside a fragmented message: (index, that message's first frame).
            inside: Vec<usize>,
        }

        fn valid() -> impl Strategy<Value = Valid> {
            (
                prop::collection::vec(item(), 0..6),
                prop::option::of((prop::sample::select(GOOD_CODES.to_vec()), text(), mask())),
            )
                .prop_map(|(items, close)| {
                    let mut v = Valid {
                        frames: Vec::new(),
                        between: vec![0],
                        inside: Vec::new(),
                    };
                    for it in items {
                        match it {
                            Item::Msg(m) => {
                                let first = v.frames.len();
                                m.frames(&mut v.frames, &mut Vec::new());
                                v.inside.extend(first + 1..v.frames.len());
                            }
                            Item::Ping(p, pong, mask) => {
                                v.frames
                                    .push(F::new(if pong { 0xa } else { PING }, true, p, mask))
                            }
                        }
                        v.between.push(v.frames.len());
                    }
                    // A reason of at most 24 chars of at most 4 bytes fits in 123.
                    if let Some((code, reason, mask)) = close {
                        v.frames
                            .push(F::new(CLOSE, true, close_payload(code, &reason), mask));
                    }
                    v
                })
        }

        /// Cut points for reads: few, many, or one per byte.
        fn cuts() -> impl Strategy<Value = Vec<usize>> {
            prop_oneof![
                4 => prop::collection::vec(any::<usize>(), 0..4),
                4 => prop::collection::vec(any::<usize>(), 4..40),
                1 => Just((0..600).collect()),
            ]
        }

        /// One thing wrong with a valid stream.
        #[derive(Debug, Clone)]
        enum Fault {
            Unmask,
            Rsv(u8),
            Opcode(u8),
            FragmentedPing,
            BigPing(usize),
            CloseOneByte,
            CloseCode(u16),
            CloseReason(Vec<u8>, Vec<u8>, Vec<u8>),
            StrayContinuation,
            NestedData(bool),
            Text(Msg, Vec<u8>, Vec<u8>),
        }

        /// Sequences no valid UTF-8 contains (the last two only cut short).
        const BAD_UTF8: [&[u8]; 9] = [
            b"\xff",
            b"\xfe",
            b"\x80",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80",
            b"\xe2\x82",
            b"\xf0\x9f\x98",
        ];

        fn bad_utf8() -> impl Strategy<Value = Vec<u8>> {
            prop::sample::select(BAD_UTF8.to_vec()).prop_map(|b| b.to_vec())
        }

        fn fault() -> impl Strategy<Value = Fault> {
            let reserved = vec![3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15];
            let bad_codes = vec![
                0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
            ];
            prop_oneof![
                1 => Just(Fault::Unmask),
                1 => prop::sample::select(vec![0x40u8, 0x20, 0x10]).prop_map(Fault::Rsv),
                1 => prop::sample::select(reserved).prop_map(Fault::Opcode),
                1 => Just(Fault::FragmentedPing),
                1 => (126usize..300).prop_map(Fault::BigPing),
                1 => Just(Fault::CloseOneByte),
                1 => prop::sample::select(bad_codes).prop_map(Fault::CloseCode),
                1 => (text(), bad_utf8(), text()).prop_map(|(a, b, c)| Fault::CloseReason(a, b, c)),
                1 => Just(Fault::StrayContinuation),
                1 => any::<bool>().prop_map(Fault::NestedData),
                3 => (msg(), bad_utf8(), text()).prop_map(|(m, b, c)| Fault::Text(m, b, c)),
            ]
        }

        /// The first index of `p` at which it can no longer be the start of
        /// valid UTF-8 (brute force), if any.
        fn detect(p: &[u8]) -> Option<usize> {
            (0..p.len())
                .find(|&d| std::str::from_utf8(&p[..=d]).is_err_and(|e| e.error_len().is_some()))
        }

        /// The longest start of the text `s` of at most `n` bytes.
        fn prefix(s: &[u8], n: usize) -> &[u8] {
            let mut n = n.min(s.len());
            while std::str::from_utf8(&s[..n]).is_err() {
                n -= 1;
            }
            &s[..n]
        }

        /// Where the stream must stop: exactly at `lower` (a header fault),
        /// or between `lower` and the byte at `upper` (a payload fault).
        struct Expect {
            event: Event,
            frame: usize,
            upper: Option<(usize, usize)>,
        }

        /// Applies `fault` somewhere `at` picks (a frame, a gap between
        /// frames, between messages, inside a fragmented one).
        fn corrupt(v: &Valid, fault: &Fault, at: usize, m: [u8; 4]) -> (Vec<F>, Expect) {
            let mut frames = v.frames.clone();
            if frames.is_empty() {
                frames.push(F::new(TEXT, true, b"x".to_vec(), m));
            }
            let any_frame = at % frames.len();
            let any_gap = at % (frames.len() + 1);
            let between = v.between[at % v.between.len()];
            let header = |event, frame| Expect {
                event,
                frame,
                upper: None,
            };
            let insert = |frames: &mut Vec<F>, i: usize, f: F| {
                frames.insert(i, f);
                i
            };
            let expect = match fault {
                Fault::Unmask => {
                    frames[any_frame].mask = None;
                    header(Event::Protocol, any_frame)
                }
                Fault::Rsv(bit) => {
                    frames[any_frame].rsv |= bit;
                    header(Event::Protocol, any_frame)
                }
                Fault::Opcode(op) => {
                    frames[any_frame].op = *op;
                    header(Event::Protocol, any_frame)
                }
                Fault::FragmentedPing => {
                    let i = insert(&mut frames, any_gap, F::new(PING, false, vec![], m));
                    header(Event::Protocol, i)
                }
                Fault::BigPing(n) => {
                    let i = insert(&mut frames, any_gap, F::new(PING, true, vec![0; *n], m));
                    header(Event::Protocol, i)
                }
                Fault::CloseOneByte => {
                    let i = insert(&mut frames, any_gap, F::new(CLOSE, true, vec![3], m));
                    header(Event::Protocol, i)
                }
                Fault::CloseCode(code) => {
                    let f = F::new(CLOSE, true, close_payload(*code, b"r"), m);
                    let i = insert(&mut frames, any_gap, f);
                    Expect {
                        event: Event::Protocol,
                        frame: i,
                        upper: Some((i, 1)),
                    }
                }
                Fault::CloseReason(a, bad, c) => {
                    // At most 2 + 56 + 5 + 56 bytes: a close body fits in 125.
                    let reason = [prefix(a, 56), bad, prefix(c, 56)].concat();
                    let d = detect(&reason).unwrap_or(reason.len() - 1);
                    let f = F::new(CLOSE, true, close_payload(1000, &reason), m);
                    let i = insert(&mut frames, any_gap, f);
                    Expect {
                        event: Event::InvalidPayload,
                        frame: i,
                        upper: Some((i, 2 + d)),
                    }
                }
                Fault::StrayContinuation => {
                    let i = insert(&mut frames, between, F::new(CONT, true, b"c".to_vec(), m));
                    header(Event::Protocol, i)
                }
                Fault::NestedData(text) => {
                    let op = if *text { TEXT } else { BINARY };
                    let i = if v.inside.is_empty() {
                        insert(&mut frames, between, F::new(TEXT, false, b"a".to_vec(), m)) + 1
                    } else {
                        v.inside[at % v.inside.len()]
                    };
                    insert(&mut frames, i, F::new(op, true, b"b".to_vec(), m));
                    header(Event::Protocol, i)
                }
                Fault::Text(msg, bad, tail) => {
                    let mut msg = msg.clone();
                    if !msg.text {
                        msg.text = true;
                        msg.payload = String::from_utf8_lossy(&msg.payload).into_owned().into();
                    }
                    let k = msg.payload.len();
                    msg.payload.extend(bad);
                    msg.payload.extend(tail);
                    let mut new = Vec::new();
                    let mut pos = Vec::new();
                    msg.frames(&mut new, &mut pos);
                    let d = detect(&msg.payload);
                    let (last, last_len) = (new.len() - 1, new[new.len() - 1].payload.len());
                    let (first_bad, _) = pos[k];
                    let upper = match d {
                        Some(d) => pos[d],
                        // Cut short at the end: caught at the last byte of
                        // the message (or its empty last frame's header).
                        None => (last, last_len),
                    };
                    frames.splice(between..between, new);
                    Expect {
                        event: Event::InvalidPayload,
                        frame: between + first_bad,
                        upper: Some((between + upper.0, upper.1)),
                    }
                }
            };
            (frames, expect)
        }

        proptest! {
            #![proptest_config(config(60_000))]

            #[test]
            fn one_fault_stops_the_stream_before_it(
                v in valid(),
                fault in fault(),
                at in any::<usize>(),
                m in mask(),
                cuts in cuts(),
            ) {
                let (frames, expect) = corrupt(&v, &fault, at, m);
                let e = encode_all(&frames);
                let r = run(CLIENT, &e.bytes, &cuts, 1 << 20);
                prop_assert_eq!(r.event, Some(expect.event));
                prop_assert!(r.forwarded[..] == e.bytes[..r.forwarded.len()]);
                let lower = e.starts[expect.frame];
                match expect.upper {
                    None => {
                        prop_assert_eq!(r.forwarded.len(), lower);
                        prop_assert!(r.at_boundary);
                    }
                    Some((frame, offset)) => {
                        // An empty last frame's "byte" is its header's end.
                        let upper = (e.payload_at[frame] + offset)
                            .min(e.starts.get(frame + 1).copied().unwrap_or(e.bytes.len()) - 1);
                        prop_assert!(
                            lower <= r.forwarded.len() && r.forwarded.len() <= upper,
                            "forwarded {} outside {lower}..={upper}", r.forwarded.len()
                        );
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(config(40_000))]

            #[test]
            fn valid_client_streams_pass_unchanged(v in valid(), cuts in cuts()) {
                let e = encode_all(&v.frames);
                let r = run(CLIENT, &e.bytes, &cuts, 1 << 20);
                prop_assert_eq!(r.event, None);
                prop_assert!(r.forwarded == e.bytes);
                prop_assert!(r.at_boundary);
            }
        }
    }
}
