//! SPEC §6: a client frame that breaks RFC 6455 is never forwarded. A raw
//! client writes it through the real gateway to a raw runtime that records
//! every byte it receives: the client is closed `1002`/`1007`, the runtime
//! gets the frames before the bad one and then the gateway's `1001`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::gateway::{Gateway, config};
use support::http::login;
use support::ws::{self, masked, raw_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);
const WAIT: Duration = Duration::from_secs(10);

/// A runtime that answers the handshake, then records the raw bytes the
/// gateway sends it. It answers a close frame with a close frame, as a
/// runtime would, and reports each read as it happens (an empty read is
/// the end of the connection).
struct RawRuntime {
    addr: SocketAddr,
    conns: mpsc::Receiver<mpsc::UnboundedReceiver<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawRuntime {
    async fn start() -> RawRuntime {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, conns) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (tx, rx) = mpsc::unbounded_channel();
                if conn_tx.send(rx).await.is_err() {
                    return;
                }
                tokio::spawn(serve(s, tx));
            }
        });
        RawRuntime { addr, conns, task }
    }

    /// The reads of the next connection.
    async fn next_conn(&mut self) -> Conn {
        let reads = tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("no runtime connection")
            .unwrap();
        Conn {
            reads,
            bytes: Vec::new(),
            ended: false,
        }
    }
}

impl Drop for RawRuntime {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, tx: mpsc::UnboundedSender<Vec<u8>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut byte).await.is_err() {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .expect("a key");
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.trim().as_bytes())
    );
    s.write_all(resp.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        let _ = tx.send(buf[..n].to_vec());
        if n == 0 {
            return;
        }
        all.extend_from_slice(&buf[..n]);
        if frames(&all).iter().any(|f| f.opcode == CLOSE) {
            // Answer the close once; the gateway then ends the connection.
            let _ = s
                .write_all(&raw_frame(true, 0, CLOSE, None, &[0x03, 0xe9]))
                .await;
            all.clear();
        }
    }
}

/// One connection's bytes at the runtime.
struct Conn {
    reads: mpsc::UnboundedReceiver<Vec<u8>>,
    bytes: Vec<u8>,
    ended: bool,
}

impl Conn {
    /// Waits until at least `n` bytes arrived (or the connection ended).
    async fn wait_for(&mut self, n: usize) {
        while self.bytes.len() < n && !self.ended {
            let read = tokio::time::timeout(WAIT, self.reads.recv())
                .await
                .expect("the runtime got nothing more")
                .unwrap_or_default();
            self.ended = read.is_empty();
            self.bytes.extend(read);
        }
    }

    /// Everything, once the gateway ended the connection.
    async fn until_end(&mut self) -> Vec<Frame> {
        self.wait_for(usize::MAX).await;
        frames(&self.bytes)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Parses whole frames (unmasking them); a trailing partial frame is left out.
fn frames(mut b: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let (mut len, mut at) = (u64::from(b[1] & 0x7f), 2usize);
        if len == 126 {
            if b.len() < 4 {
                break;
            }
            len = u64::from(u16::from_be_bytes([b[2], b[3]]));
            at = 4;
        } else if len == 127 {
            if b.len() < 10 {
                break;
            }
            len = u64::from_be_bytes(b[2..10].try_into().unwrap());
            at = 10;
        }
        let mask = if b[1] & 0x80 != 0 {
            at += 4;
            b.get(at - 4..at).map(|m| [m[0], m[1], m[2], m[3]])
        } else {
            Some([0; 4])
        };
        let end = at + len as usize;
        let (Some(mask), true) = (mask, b.len() >= end) else {
            break;
        };
        let payload = b[at..end]
            .iter()
            .enumerate()
            .map(|(i, x)| x ^ mask[i % 4])
            .collect();
        out.push(Frame {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            payload,
        });
        b = &b[end..];
    }
    out
}

fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

fn going_away() -> Frame {
    Frame {
        fin: true,
        opcode: CLOSE,
        payload: close_body(1001, b"going_away"),
    }
}

async fn setup() -> (RawRuntime, Gateway, String) {
    let rt = RawRuntime::start().await;
    let route = format!(
        "[[routes]]\nname = \"raw\"\npath = \"/ws/raw\"\nmax_message_bytes = 65536\nupstreams = [\"ws://{}/\"]\n",
        rt.addr
    );
    let gw = Gateway::start("", &config(None, &route));
    let token = login(gw.addr, "alice").await.token;
    (rt, gw, token)
}

/// The client's side after a fault: the gateway's close frame (code,
/// reason); the client answers it, and the gateway then ends the TCP
/// connection, within a bound.
async fn client_closed(s: &mut TcpStream) -> (u16, String) {
    let (opcode, payload) = ws::read_frame(s).await;
    assert_eq!(opcode, CLOSE, "a close frame, got {payload:?}");
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
    s.write_all(&masked(CLOSE, true, &payload[..2]))
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the gateway did not end the connection after the close")
        .unwrap();
    assert!(rest.is_empty(), "nothing after the close: {rest:?}");
    (code, reason)
}

/// (name, frames the runtime must get, the bad frame, close code, reason)
type Case = (&'static str, Vec<Vec<u8>>, Vec<u8>, u16);

fn cases() -> Vec<Case> {
    let hello = || masked(TEXT, true, b"hello");
    let protocol = 1002;
    let invalid = 1007;
    vec![
        (
            "unmasked",
            vec![hello()],
            raw_frame(true, 0, TEXT, None, b"hi"),
            protocol,
        ),
        (
            "rsv1 without an extension",
            vec![hello()],
            raw_frame(true, 4, TEXT, MASK, b"hi"),
            protocol,
        ),
        (
            "rsv3",
            vec![],
            raw_frame(true, 1, BINARY, MASK, b"hi"),
            protocol,
        ),
        (
            "reserved data opcode",
            vec![hello()],
            raw_frame(true, 0, 0x3, MASK, b""),
            protocol,
        ),
        (
            "reserved control opcode",
            vec![],
            raw_frame(true, 0, 0xb, MASK, b"x"),
            protocol,
        ),
        (
            "fragmented ping",
            vec![hello()],
            raw_frame(false, 0, PING, MASK, b"p"),
            protocol,
        ),
        (
            "ping over 125 bytes",
            vec![],
            masked(PING, true, &[b'p'; 126]),
            protocol,
        ),
        (
            "continuation first",
            vec![hello()],
            masked(CONT, true, b"x"),
            protocol,
        ),
        (
            "text inside a fragmented message",
            vec![masked(TEXT, false, b"frag"), masked(PING, true, b"p")],
            masked(TEXT, true, b"nested"),
            protocol,
        ),
        (
            "one-byte close",
            vec![hello()],
            masked(CLOSE, true, &[0x03]),
            protocol,
        ),
        (
            "close 1005",
            vec![],
            masked(CLOSE, true, &close_body(1005, b"")),
            protocol,
        ),
        (
            "close 1006",
            vec![hello()],
            masked(CLOSE, true, &close_body(1006, b"")),
            protocol,
        ),
        (
            "close 1015",
            vec![],
            masked(CLOSE, true, &close_body(1015, b"")),
            protocol,
        ),
        (
            "close 999",
            vec![],
            masked(CLOSE, true, &close_body(999, b"")),
            protocol,
        ),
        (
            "close 2999",
            vec![],
            masked(CLOSE, true, &close_body(2999, b"")),
            protocol,
        ),
        (
            "close 5000",
            vec![],
            masked(CLOSE, true, &close_body(5000, b"")),
            protocol,
        ),
        (
            "close reason not UTF-8",
            vec![hello()],
            masked(CLOSE, true, &close_body(1000, b"bye \xce\xba\xe1\xbd")),
            invalid,
        ),
        (
            "text not UTF-8",
            vec![hello()],
            masked(TEXT, true, b"caf\xe9"),
            invalid,
        ),
        (
            "a fragment not UTF-8",
            vec![masked(TEXT, false, "κό".as_bytes())],
            masked(CONT, true, b"\xed\xa0\x80"),
            invalid,
        ),
        (
            "a message cut inside a code point",
            vec![masked(TEXT, false, b"ok \xe2\x82")],
            masked(CONT, true, b""),
            invalid,
        ),
    ]
}

#[tokio::test]
async fn bad_client_frames_close_the_client_and_never_reach_the_runtime() {
    let (mut rt, gw, token) = setup().await;
    for (name, good, bad, code) in cases() {
        let mut s = ws::raw_upgrade(gw.addr, "/ws/raw", &token).await;
        let mut conn = rt.next_conn().await;
        let expected_reason = if code == 1002 {
            "protocol_error"
        } else {
            "invalid_payload"
        };
        // The good frames arrive first, in a write of their own; the bad
        // one follows.
        let good_bytes = good.concat();
        s.write_all(&good_bytes).await.unwrap();
        conn.wait_for(good_bytes.len()).await;
        s.write_all(&bad).await.unwrap();
        let (got_code, reason) = client_closed(&mut s).await;
        assert_eq!(
            (got_code, reason.as_str()),
            (code, expected_reason),
            "{name}"
        );
        let mut expected = frames(&good_bytes);
        expected.push(going_away());
        assert_eq!(
            conn.until_end().await,
            expected,
            "{name}: the runtime's bytes"
        );
    }
}

#[tokio::test]
async fn a_bad_frame_after_good_ones_in_the_same_write_stops_at_its_first_byte() {
    let (mut rt, gw, token) = setup().await;
    let mut s = ws::raw_upgrade(gw.addr, "/ws/raw", &token).await;
    let mut conn = rt.next_conn().await;
    let good = [masked(TEXT, true, b"one"), masked(BINARY, true, b"two")].concat();
    let mut write = good.clone();
    write.extend(masked(TEXT, true, b"\xff three"));
    write.extend(masked(TEXT, true, b"never"));
    s.write_all(&write).await.unwrap();
    assert_eq!(
        client_closed(&mut s).await,
        (1007, "invalid_payload".into())
    );
    let mut expected = frames(&good);
    expected.push(going_away());
    assert_eq!(conn.until_end().await, expected);
}

#[tokio::test]
async fn invalid_utf8_is_caught_across_reads_inside_one_frame() {
    let (mut rt, gw, token) = setup().await;
    let mut s = ws::raw_upgrade(gw.addr, "/ws/raw", &token).await;
    let mut conn = rt.next_conn().await;
    // One text frame, its payload written in two parts: the first ends
    // inside a code point ("κ" is ce ba), the second breaks it.
    let mut payload = b"valid then \xce".to_vec();
    let first_part = payload.len();
    payload.extend(b"\x41 and more");
    let frame = masked(TEXT, true, &payload);
    let header = frame.len() - payload.len();
    s.write_all(&frame[..header + first_part]).await.unwrap();
    conn.wait_for(header + first_part).await;
    s.write_all(&frame[header + first_part..]).await.unwrap();
    assert_eq!(
        client_closed(&mut s).await,
        (1007, "invalid_payload".into())
    );
    // The runtime, left inside the frame, cannot be sent a close frame: it
    // got the valid part and then the end of the connection, never the
    // byte that broke the text.
    conn.wait_for(usize::MAX).await;
    assert_eq!(conn.bytes, frame[..header + first_part]);
}

#[tokio::test]
async fn valid_fragments_split_inside_code_points_pass_byte_for_byte() {
    let (mut rt, gw, token) = setup().await;
    let mut s = ws::raw_upgrade(gw.addr, "/ws/raw", &token).await;
    let mut conn = rt.next_conn().await;
    let text = "κόσμε 𝄞 ✓".as_bytes();
    let stream = [
        masked(TEXT, false, &text[..1]),
        masked(PING, true, b"between"),
        masked(CONT, false, &text[1..9]),
        masked(CONT, true, &text[9..]),
        masked(CLOSE, true, &close_body(4000, "done ✓".as_bytes())),
    ]
    .concat();
    // Written in pieces that cut headers and code points.
    for piece in stream.chunks(5) {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
    }
    conn.wait_for(stream.len()).await;
    assert_eq!(conn.bytes, stream, "every byte unchanged");
    // The runtime's close answer reaches the client: a normal end.
    let (opcode, payload) = ws::read_frame(&mut s).await;
    assert_eq!((opcode, &payload[..]), (CLOSE, &[0x03, 0xe9][..]));
}
