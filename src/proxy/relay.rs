//! The exclusive-mode pump: one client socket, one upstream socket, frames
//! passed through unchanged in both directions.
//!
//! Design (measured in BENCHMARKS.md): bytes are forwarded as they arrive,
//! tracked by [`FrameTracker`] instead of decoded into messages, and read
//! with readiness + `try_read` into a per-thread scratch buffer. An idle
//! connection therefore owns no buffer at all: memory is only held while a
//! write is backpressured (the unsent rest, bounded by one read), and a
//! direction with unsent bytes stops reading its source, so a slow reader
//! slows its writer end to end.

use std::cell::RefCell;
use std::io;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use super::frames::{self, Event, FrameTracker, MAX_HEADER};
use crate::shutdown::Shutdown;

/// A close the gateway itself decided on (revocation, shutdown, limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCmd {
    pub code: u16,
    pub reason: &'static str,
}

pub const GOING_AWAY: CloseCmd = CloseCmd {
    code: 1001,
    reason: "going_away",
};
pub const UPSTREAM_GONE: CloseCmd = CloseCmd {
    code: 1014,
    reason: "upstream_unavailable",
};
pub const TOO_BIG: CloseCmd = CloseCmd {
    code: 1009,
    reason: "message_too_big",
};
pub const PROTOCOL: CloseCmd = CloseCmd {
    code: 1002,
    reason: "protocol_error",
};

/// How long a peer gets to answer our close frame before the TCP goes.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a close handshake the peers started may take.
const PEER_CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    pub max_message: u64,
    pub io_buffer: usize,
    /// Zero disables keep-alive pings.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

/// How a relayed connection ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The peers closed (the close code, if any, passed through unchanged).
    Peers,
    /// The gateway closed the client with this code.
    Gateway(u16),
    /// A socket failed or a peer stopped answering.
    Dropped,
}

thread_local! {
    /// One read buffer per worker thread, borrowed only for the duration of
    /// a synchronous read-scan-write step, never across an await.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One direction of the pump: framing state plus what the destination has
/// not accepted yet.
#[derive(Default)]
struct Dir {
    tracker: FrameTracker,
    carry: [u8; MAX_HEADER],
    carry_len: usize,
    /// Bytes waiting for the destination to become writable. Empty (and
    /// unallocated) except under backpressure.
    pending: Vec<u8>,
    src_eof: bool,
    saw_close: bool,
    last_rx: Option<Instant>,
    ping_sent: Option<Instant>,
}

enum Step {
    Nothing,
    Eof,
    Event(Event),
}

impl Dir {
    /// Adds `bytes` to what the destination is owed, writing directly when
    /// nothing is queued ahead of them.
    fn send(&mut self, dst: &TcpStream, bytes: &[u8]) -> io::Result<()> {
        let mut off = 0;
        if self.pending.is_empty() {
            while off < bytes.len() {
                match dst.try_write(&bytes[off..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        self.pending.extend_from_slice(&bytes[off..]);
        Ok(())
    }

    fn flush(&mut self, dst: &TcpStream) -> io::Result<()> {
        while !self.pending.is_empty() {
            match dst.try_write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Give the memory back: an idle connection holds no buffer.
        self.pending = Vec::new();
        Ok(())
    }

    /// Runs `data` (carry + new bytes, contiguous in `buf[..len]`) through
    /// the tracker and forwards what may pass.
    fn forward(
        &mut self,
        buf: &[u8],
        dst: &TcpStream,
        max: u64,
        discard: bool,
    ) -> io::Result<Step> {
        let scan = self.tracker.scan(buf, max);
        self.saw_close |= scan.saw_close;
        if !discard {
            self.send(dst, &buf[..scan.forward])?;
        }
        if let Some(ev) = scan.event {
            self.carry_len = 0;
            return Ok(Step::Event(ev));
        }
        let rest = &buf[scan.forward..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        Ok(Step::Nothing)
    }

    /// One read-scan-write step from `src` to `dst`.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        cfg: &RelayConfig,
        discard: bool,
    ) -> io::Result<Step> {
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            let want = cfg.io_buffer + MAX_HEADER;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            buf[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            let n = match src.try_read(&mut buf[self.carry_len..want]) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Nothing),
                Err(e) => return Err(e),
            };
            self.last_rx = Some(Instant::now());
            self.ping_sent = None;
            let len = self.carry_len + n;
            self.forward(&buf[..len], dst, cfg.max_message, discard)
        })
    }

    /// Injects a frame of ours if this direction is between frames.
    fn inject(&mut self, dst: &TcpStream, frame: &[u8]) -> bool {
        if !self.tracker.at_boundary() {
            return false;
        }
        self.send(dst, frame).is_ok()
    }
}

/// The two sockets of a proxied connection and what each already sent.
pub struct Pair {
    pub client: TcpStream,
    pub client_early: bytes::Bytes,
    pub upstream: TcpStream,
    pub upstream_early: bytes::Bytes,
}

/// Relays until the connection ends. `close_rx` delivers a gateway decision
/// (revocation); `shutdown` the process-wide going-away.
pub async fn relay(
    pair: Pair,
    cfg: RelayConfig,
    mut close_rx: oneshot::Receiver<CloseCmd>,
    shutdown: Shutdown,
) -> Ended {
    let Pair {
        client,
        client_early,
        upstream,
        upstream_early,
    } = pair;
    let mut c2u = Dir::default();
    let mut u2c = Dir::default();
    let now = Instant::now();
    c2u.last_rx = Some(now);
    u2c.last_rx = Some(now);

    // Bytes either peer pipelined behind its handshake.
    let early = |dir: &mut Dir, data: &[u8], dst: &TcpStream| -> Option<Event> {
        if data.is_empty() {
            return None;
        }
        match dir.forward(data, dst, cfg.max_message, false) {
            Ok(Step::Event(ev)) => Some(ev),
            _ => None,
        }
    };
    let mut closing: Option<(Instant, Ended)> = None;
    if let Some(ev) = early(&mut c2u, &client_early, &upstream) {
        closing = Some(begin_close(
            &mut c2u,
            &mut u2c,
            &client,
            &upstream,
            event_cmd(ev),
        ));
    } else if let Some(ev) = early(&mut u2c, &upstream_early, &client) {
        closing = Some(begin_close(
            &mut c2u,
            &mut u2c,
            &client,
            &upstream,
            event_cmd(ev),
        ));
    }
    // The early bytes are slices of hyper's read buffers: keeping them would
    // keep those whole allocations alive for the life of the connection.
    drop(client_early);
    drop(upstream_early);
    let mut peer_close_deadline: Option<Instant> = None;
    let mut close_rx_open = true;

    let ended = loop {
        // While closing on our own initiative we only drain the client (for
        // its close reply) and flush what we owe.
        let our_close = closing.is_some();
        let read_client = c2u.pending.is_empty() && !c2u.src_eof;
        let read_upstream = u2c.pending.is_empty() && !u2c.src_eof && !our_close;
        let deadline = next_deadline(&cfg, &c2u, &u2c, closing.map(|c| c.0), peer_close_deadline);
        tokio::select! {
            biased;
            cmd = &mut close_rx, if close_rx_open && !our_close => {
                close_rx_open = false;
                if let Ok(cmd) = cmd {
                    closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, cmd));
                }
            }
            _ = shutdown.begun(), if !our_close => {
                closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, GOING_AWAY));
            }
            r = upstream.writable(), if !c2u.pending.is_empty() => {
                if r.and_then(|()| c2u.flush(&upstream)).is_err() {
                    if our_close { break closing.map_or(Ended::Dropped, |c| c.1); }
                    closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, UPSTREAM_GONE));
                }
            }
            r = client.writable(), if !u2c.pending.is_empty() => {
                if r.and_then(|()| u2c.flush(&client)).is_err() {
                    break closing.map_or(Ended::Dropped, |c| c.1);
                }
            }
            r = client.readable(), if read_client => {
                match r.and_then(|()| c2u.pump(&client, &upstream, &cfg, our_close)) {
                    Ok(Step::Nothing) => {
                        if our_close && c2u.saw_close && u2c.pending.is_empty() {
                            break closing.map_or(Ended::Peers, |c| c.1);
                        }
                        if c2u.saw_close && peer_close_deadline.is_none() {
                            peer_close_deadline = Some(Instant::now() + PEER_CLOSE_WAIT);
                        }
                    }
                    Ok(Step::Eof) | Err(_) => {
                        c2u.src_eof = true;
                        if let Some((_, ended)) = closing { break ended; }
                        // The client vanished: tell the runtime, then go.
                        if !c2u.saw_close {
                            c2u.inject(&upstream, &frames::close_frame(GOING_AWAY.code, GOING_AWAY.reason, true));
                        }
                        closing = Some((Instant::now() + CLOSE_WAIT, Ended::Peers));
                    }
                    Ok(Step::Event(ev)) => {
                        closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, event_cmd(ev)));
                    }
                }
            }
            r = upstream.readable(), if read_upstream => {
                match r.and_then(|()| u2c.pump(&upstream, &client, &cfg, false)) {
                    Ok(Step::Nothing) => {
                        if u2c.saw_close && peer_close_deadline.is_none() {
                            peer_close_deadline = Some(Instant::now() + PEER_CLOSE_WAIT);
                        }
                    }
                    Ok(Step::Eof) | Err(_) => {
                        u2c.src_eof = true;
                        if u2c.saw_close {
                            // Normal end: the runtime closed after its close frame.
                            closing = Some((Instant::now() + CLOSE_WAIT, Ended::Peers));
                            if u2c.pending.is_empty() { break Ended::Peers; }
                        } else {
                            closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, UPSTREAM_GONE));
                        }
                    }
                    Ok(Step::Event(ev)) => {
                        closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, event_cmd(ev)));
                    }
                }
            }
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if closing.is_some_and(|c| now >= c.0) {
                    break closing.map_or(Ended::Dropped, |c| c.1);
                }
                if peer_close_deadline.is_some_and(|d| now >= d) {
                    break Ended::Peers;
                }
                if let Some(gone) = keepalive(&cfg, &mut c2u, &mut u2c, &client, &upstream, now) {
                    if our_close { break Ended::Dropped; }
                    closing = Some(begin_close(&mut c2u, &mut u2c, &client, &upstream, gone));
                }
            }
        }
    };
    finish(client, upstream, &mut u2c, &mut c2u).await;
    ended
}

fn event_cmd(ev: Event) -> CloseCmd {
    match ev {
        Event::TooBig => TOO_BIG,
        Event::Protocol => PROTOCOL,
    }
}

/// Sends our close frame to both peers (each only if between frames) and
/// starts the wait for the client's reply.
fn begin_close(
    c2u: &mut Dir,
    u2c: &mut Dir,
    client: &TcpStream,
    upstream: &TcpStream,
    cmd: CloseCmd,
) -> (Instant, Ended) {
    let to_client =
        !u2c.saw_close && u2c.inject(client, &frames::close_frame(cmd.code, cmd.reason, false));
    if !c2u.saw_close && !c2u.src_eof {
        // The runtime hears the same reason (a vanished runtime hears nothing).
        c2u.inject(upstream, &frames::close_frame(cmd.code, cmd.reason, true));
    }
    let ended = if to_client {
        Ended::Gateway(cmd.code)
    } else {
        Ended::Dropped
    };
    (Instant::now() + CLOSE_WAIT, ended)
}

/// Pings a quiet peer; reports a peer that stopped answering.
fn keepalive(
    cfg: &RelayConfig,
    c2u: &mut Dir,
    u2c: &mut Dir,
    client: &TcpStream,
    upstream: &TcpStream,
    now: Instant,
) -> Option<CloseCmd> {
    if cfg.ping_interval.is_zero() {
        return None;
    }
    // The client is pinged through the upstream→client direction and vice
    // versa; an unsolicited pong forwarded to the other peer is allowed by
    // RFC 6455 §5.5.3, so replies need no filtering.
    if ping_one(cfg, c2u, u2c, client, false, now).is_some() {
        return Some(GOING_AWAY);
    }
    if ping_one(cfg, u2c, c2u, upstream, true, now).is_some() {
        return Some(UPSTREAM_GONE);
    }
    None
}

/// Pings `dst` (the peer `watched` reads from) through `via` when it has
/// been quiet; `Some(())` when a ping went unanswered for too long.
fn ping_one(
    cfg: &RelayConfig,
    watched: &mut Dir,
    via: &mut Dir,
    dst: &TcpStream,
    masked: bool,
    now: Instant,
) -> Option<()> {
    if let Some(sent) = watched.ping_sent {
        return (now >= sent + cfg.pong_timeout).then_some(());
    }
    if watched
        .last_rx
        .is_some_and(|t| now >= t + cfg.ping_interval)
        && via.pending.is_empty()
        && via.inject(dst, &frames::ping_frame(masked))
    {
        watched.ping_sent = Some(now);
    }
    None
}

fn next_deadline(
    cfg: &RelayConfig,
    c2u: &Dir,
    u2c: &Dir,
    closing: Option<Instant>,
    peer_close: Option<Instant>,
) -> Instant {
    let far = Instant::now() + Duration::from_secs(3600);
    let mut d = closing.unwrap_or(far).min(peer_close.unwrap_or(far));
    if !cfg.ping_interval.is_zero() {
        for dir in [c2u, u2c] {
            let t = match (dir.ping_sent, dir.last_rx) {
                (Some(sent), _) => sent + cfg.pong_timeout,
                (None, Some(rx)) => rx + cfg.ping_interval,
                (None, None) => far,
            };
            d = d.min(t);
        }
    }
    d
}

/// Flushes what we still owe each peer (bounded) and closes both sockets.
async fn finish(mut client: TcpStream, mut upstream: TcpStream, u2c: &mut Dir, c2u: &mut Dir) {
    let flush = async {
        while !u2c.pending.is_empty() {
            if client.writable().await.is_err() || u2c.flush(&client).is_err() {
                break;
            }
        }
        while !c2u.pending.is_empty() {
            if upstream.writable().await.is_err() || c2u.flush(&upstream).is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, flush).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, client.shutdown()).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, upstream.shutdown()).await;
}
