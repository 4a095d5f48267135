//! The exclusive-mode pump: one client socket, one upstream socket, frames
//! passed through unchanged in both directions.
//!
//! Design (measured in BENCHMARKS.md): bytes are forwarded as they arrive,
//! tracked by [`FrameTracker`] instead of decoded into messages, and read
//! on readiness, without blocking, into a per-thread scratch buffer. An idle
//! connection therefore owns no buffer at all (and its task, one poll loop
//! with one timer, stays under 1 KB): memory is only held while a
//! write is backpressured (the unsent rest, bounded by one read), and a
//! direction with unsent bytes stops reading its source, so a slow reader
//! slows its writer end to end.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep, sleep_until};

use super::frames::{self, Event, FrameTracker, MAX_HEADER, Rules};
use crate::sockets::close::{self, Close, GOING_AWAY, TOO_BIG, UPSTREAM_GONE};

/// How long a peer gets to answer our close frame before the TCP goes.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a close handshake the peers started may take.
const PEER_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How often a due but blocked ping (peer backpressured or mid-frame) is
/// retried; keeps the timer from firing in a tight loop.
const PING_RETRY: Duration = Duration::from_millis(100);

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
pub enum Outcome {
    /// The peers closed (the close code, if any, passed through unchanged).
    Peers,
    /// The gateway closed the client with this code.
    Gateway(u16),
    /// A socket failed or a peer stopped answering.
    Dropped,
}

impl Outcome {
    /// The close code the gateway sent the client, if it sent one.
    pub fn gateway_code(self) -> Option<u16> {
        match self {
            Outcome::Gateway(code) => Some(code),
            Outcome::Peers | Outcome::Dropped => None,
        }
    }
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
    /// A keep-alive ping reached this direction's source peer at this time.
    ping_sent: Option<Instant>,
    /// A ping was due but could not be injected since this time.
    ping_blocked: Option<Instant>,
}

/// What a read step did.
enum Step {
    Nothing,
    /// The source closed its side.
    Eof,
    /// The source broke a rule (too big, not WebSocket, not RFC 6455).
    Event(Event),
    /// Writing to the destination failed: the *other* peer is gone.
    DstGone,
}

/// How much of what is read may pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    All,
    /// Only the rest of the frame in flight (a close is owed after it).
    FinishFrame,
    Nothing,
}

impl Dir {
    /// Adds `bytes` to what the destination is owed, writing directly when
    /// nothing is queued ahead of them.
    fn send<D: Endpoint>(&mut self, dst: &mut D, bytes: &[u8]) -> io::Result<()> {
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

    fn flush<D: Endpoint>(&mut self, dst: &mut D) -> io::Result<()> {
        dst.flush_backlog()?;
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

    /// Runs `buf` (carry + new bytes) through the tracker and forwards what
    /// may pass.
    fn forward<D: Endpoint>(&mut self, buf: &[u8], dst: &mut D, max: u64, pass: Pass) -> Step {
        if pass == Pass::FinishFrame {
            let take = self.tracker.remaining().min(buf.len() as u64) as usize;
            let scan = self.tracker.scan(&buf[..take], max);
            self.carry_len = 0;
            return match self.send(dst, &buf[..scan.forward]) {
                Ok(()) => Step::Nothing,
                Err(_) => Step::DstGone,
            };
        }
        let scan = self.tracker.scan(buf, max);
        self.saw_close |= scan.saw_close;
        if pass == Pass::All && self.send(dst, &buf[..scan.forward]).is_err() {
            return Step::DstGone;
        }
        let rest = &buf[scan.consumed..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        match scan.event {
            Some(ev) => Step::Event(ev),
            None => Step::Nothing,
        }
    }

    /// One read-scan-write step from `src` to `dst`.
    fn pump<S: Endpoint, D: Endpoint>(
        &mut self,
        src: &mut S,
        dst: &mut D,
        cfg: &RelayConfig,
        pass: Pass,
    ) -> Step {
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            let want = cfg.io_buffer + MAX_HEADER;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            buf[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            let n = match src.read_some(&mut buf[self.carry_len..want]) {
                Ok(0) => return Step::Eof,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Nothing,
                Err(_) => return Step::Eof,
            };
            self.last_rx = Some(Instant::now());
            self.ping_sent = None;
            self.ping_blocked = None;
            let len = self.carry_len + n;
            self.forward(&buf[..len], dst, cfg.max_message, pass)
        })
    }

    /// Injects a frame of ours if this direction is between frames.
    fn inject<D: Endpoint>(&mut self, dst: &mut D, frame: &[u8]) -> bool {
        self.tracker.at_boundary() && self.send(dst, frame).is_ok()
    }
}

/// Reads what `src` has into `buf`. A read that does not fill `buf` drained
/// the socket, so it also clears the readiness (as tokio's own `poll_read`
/// does): the next step then waits for epoll instead of spending a `recv`
/// that can only return `EAGAIN` (measured: 2.0 `recv` per forwarded
/// message before, BENCHMARKS.md). Data arriving after the read raises a new
/// edge-triggered event, so nothing is missed.
fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = 0;
    let res = src.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match res {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        other => other,
    }
}

/// One side of a relayed connection as the pump drives it: readiness,
/// reads and writes that never block. A plain TCP socket is one directly,
/// with nothing buffered (the zero-buffer path); a TLS socket
/// ([`super::tls_io::TlsIo`]) keeps rustls' bounded record buffers between
/// the pump and the socket.
pub trait Endpoint: Send + Unpin {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// What is there, into `buf`; `WouldBlock` when nothing is, `Ok(0)` at
    /// the end of the stream.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// As much of `buf` as the endpoint takes now; `WouldBlock` for none.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Bytes accepted by [`Endpoint::try_write`] but not yet on the wire
    /// (TLS records): the pump waits for writability while there are any,
    /// and reads nothing more for this destination meanwhile.
    fn has_backlog(&self) -> bool {
        false
    }
    /// Moves the backlog to the wire as far as the socket takes it.
    fn flush_backlog(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Endpoint for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_some(self, buf)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

/// The two sockets of a proxied connection and what each already sent.
pub struct Pair<C, U> {
    pub client: C,
    pub client_early: bytes::Bytes,
    pub upstream: U,
    pub upstream_early: bytes::Bytes,
    /// permessage-deflate was negotiated (the runtime accepted the client's
    /// offer): RSV1 may mark the first frame of a data message both ways.
    pub deflate: bool,
    /// The gateway's own first text frame for the client (SPEC §9
    /// `portcullis.hello`), written before any runtime byte. Consumed by
    /// the set-up, so an idle connection keeps nothing of it.
    pub hello: Option<Box<str>>,
}

impl<C, U> Pair<C, U> {
    /// `early`: what the client and the runtime sent past their handshakes.
    pub fn new(client: C, upstream: U, early: (bytes::Bytes, bytes::Bytes), deflate: bool) -> Self {
        Pair {
            client,
            client_early: early.0,
            upstream,
            upstream_early: early.1,
            deflate,
            hello: None,
        }
    }

    /// With the gateway's `portcullis.hello` text frame first (SPEC §9).
    pub fn with_hello(self, hello: Option<Box<str>>) -> Self {
        Pair { hello, ..self }
    }
}

/// The relay's whole state, so the decisions below are plain methods.
struct Relay<C, U> {
    client: C,
    upstream: U,
    c2u: Dir,
    u2c: Dir,
    cfg: RelayConfig,
    /// Set once the connection is ending: until then, how it ended so far.
    closing: Option<(Instant, Outcome)>,
    /// A close frame owed to the client once the frame in flight ends.
    owe_client: Option<Close>,
    /// The peers started a close handshake; it must finish by then.
    peer_close_deadline: Option<Instant>,
    /// The gateway's close decision, until it arrives or closing begins.
    close_rx: Option<oneshot::Receiver<Close>>,
}

impl<C: Endpoint, U: Endpoint> Relay<C, U> {
    fn closing(&self) -> bool {
        self.closing.is_some()
    }

    /// Ends the connection on the gateway's initiative: a close frame to
    /// both peers (the client's waits for the frame in flight to end), the
    /// runtime hearing the same reason.
    fn begin_close(&mut self, cmd: Close) {
        self.begin_close_with(cmd, cmd);
    }

    /// [`Self::begin_close`] with what the runtime is told apart. Only the
    /// first decision counts; the deadline never moves later.
    fn begin_close_with(&mut self, cmd: Close, to_upstream: Close) {
        if self.closing() {
            return;
        }
        let mut ended = Outcome::Dropped;
        if !self.u2c.saw_close {
            let frame = frames::close_frame(cmd.code, cmd.reason, false);
            if self.u2c.inject(&mut self.client, &frame) {
                ended = Outcome::Gateway(cmd.code);
            } else {
                self.owe_client = Some(cmd);
            }
        }
        if !self.c2u.saw_close && !self.c2u.src_eof {
            // A vanished runtime hears nothing; one left mid-frame (its
            // frame cut short by the client's fault) cannot be told either.
            self.c2u.inject(
                &mut self.upstream,
                &frames::close_frame(to_upstream.code, to_upstream.reason, true),
            );
        }
        self.closing = Some((Instant::now() + CLOSE_WAIT, ended));
    }

    /// The client is gone: tell the runtime and end.
    fn client_gone(&mut self) {
        if !self.c2u.saw_close && !self.c2u.src_eof {
            self.c2u.inject(
                &mut self.upstream,
                &frames::close_frame(GOING_AWAY.code, GOING_AWAY.reason, true),
            );
        }
        if !self.closing() {
            self.closing = Some((Instant::now(), Outcome::Peers));
        }
    }

    /// After the frame in flight to the client ended, send the owed close.
    fn settle_owed_close(&mut self) {
        if let Some(cmd) = self.owe_client
            && self.u2c.tracker.at_boundary()
        {
            self.owe_client = None;
            let frame = frames::close_frame(cmd.code, cmd.reason, false);
            if self.u2c.inject(&mut self.client, &frame)
                && let Some((_, ended)) = self.closing.as_mut()
            {
                *ended = Outcome::Gateway(cmd.code);
            }
        }
    }

    /// A rule broken by the client (`from_client`) or the runtime. A
    /// client breaking RFC 6455 is told why; its runtime is only told that
    /// the client is gone (SPEC §6), having seen none of the bad frame.
    fn on_event(&mut self, ev: Event, from_client: bool) {
        let cmd = match ev {
            Event::TooBig => TOO_BIG,
            Event::Protocol => close::PROTOCOL_ERROR,
            Event::InvalidPayload => close::INVALID_PAYLOAD,
        };
        if from_client && ev != Event::TooBig {
            self.begin_close_with(cmd, GOING_AWAY);
        } else {
            self.begin_close(cmd);
        }
    }

    /// Pings a quiet peer; reports a peer that stopped answering.
    fn keepalive(&mut self, now: Instant) -> Option<Close> {
        if self.cfg.ping_interval.is_zero() {
            return None;
        }
        // The client is pinged through the upstream→client direction and vice
        // versa; an unsolicited pong forwarded to the other peer is allowed by
        // RFC 6455 §5.5.3, so replies need no filtering.
        if ping_one(
            &self.cfg,
            &mut self.c2u,
            &mut self.u2c,
            &mut self.client,
            false,
            now,
        ) {
            return Some(GOING_AWAY);
        }
        if ping_one(
            &self.cfg,
            &mut self.u2c,
            &mut self.c2u,
            &mut self.upstream,
            true,
            now,
        ) {
            return Some(UPSTREAM_GONE);
        }
        None
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        let mut d = self.closing.map_or(far, |c| c.0);
        d = d.min(self.peer_close_deadline.unwrap_or(far));
        if !self.cfg.ping_interval.is_zero() {
            for dir in [&self.c2u, &self.u2c] {
                let t = match (dir.ping_sent, dir.ping_blocked, dir.last_rx) {
                    (Some(sent), _, _) => sent + self.cfg.pong_timeout,
                    (None, Some(_), _) => now + PING_RETRY,
                    (None, None, Some(rx)) => rx + self.cfg.ping_interval,
                    (None, None, None) => far,
                };
                d = d.min(t);
            }
        }
        d
    }
}

/// Pings the peer `watched` reads from, through `via`, when it has been
/// quiet. True when it stopped answering: a ping unanswered, or one that
/// could not even be sent, for `pong_timeout`.
fn ping_one<D: Endpoint>(
    cfg: &RelayConfig,
    watched: &mut Dir,
    via: &mut Dir,
    dst: &mut D,
    masked: bool,
    now: Instant,
) -> bool {
    if let Some(sent) = watched.ping_sent {
        return now >= sent + cfg.pong_timeout;
    }
    if watched.last_rx.is_none_or(|t| now < t + cfg.ping_interval) {
        return false;
    }
    if via.pending.is_empty() && !dst.has_backlog() && via.inject(dst, &frames::ping_frame(masked))
    {
        watched.ping_sent = Some(now);
        watched.ping_blocked = None;
        return false;
    }
    let since = *watched.ping_blocked.get_or_insert(now);
    now >= since + cfg.pong_timeout
}

/// Relays until the connection ends. `close_rx` delivers a gateway decision
/// (revocation, expiry, and at shutdown `1001` through
/// [`crate::sockets::Registry::close_all`]).
///
/// Not an `async fn`: the set-up runs here, and the returned future holds
/// only the relay's state and its timer (its size is what an idle
/// connection costs; `the_idle_future_is_small` pins it).
pub fn relay<C: Endpoint, U: Endpoint>(
    pair: Pair<C, U>,
    cfg: RelayConfig,
    close_rx: oneshot::Receiver<Close>,
) -> impl Future<Output = Outcome> + Send {
    let Pair {
        client,
        client_early,
        upstream,
        upstream_early,
        deflate,
        hello,
    } = pair;
    let now = Instant::now();
    let mut r = Relay {
        client,
        upstream,
        c2u: Dir {
            tracker: FrameTracker::new(Rules {
                client: true,
                deflate,
            }),
            last_rx: Some(now),
            ..Dir::default()
        },
        u2c: Dir {
            tracker: FrameTracker::new(Rules {
                client: false,
                deflate,
            }),
            last_rx: Some(now),
            ..Dir::default()
        },
        cfg,
        closing: None,
        owe_client: None,
        peer_close_deadline: None,
        close_rx: Some(close_rx),
    };
    // The hello goes first, at a frame boundary (nothing has been sent to
    // the client yet), so the runtime's bytes follow it unchanged.
    if let Some(text) = hello
        && r.u2c
            .send(&mut r.client, &frames::text_frame(&text))
            .is_err()
    {
        r.client_gone();
    }
    // Bytes either peer pipelined behind its handshake.
    if !client_early.is_empty() && !r.closing() {
        match r
            .c2u
            .forward(&client_early, &mut r.upstream, cfg.max_message, Pass::All)
        {
            Step::Event(ev) => r.on_event(ev, true),
            Step::DstGone => r.begin_close(UPSTREAM_GONE),
            _ => {}
        }
    }
    if !upstream_early.is_empty() && !r.closing() {
        match r
            .u2c
            .forward(&upstream_early, &mut r.client, cfg.max_message, Pass::All)
        {
            Step::Event(ev) => r.on_event(ev, false),
            Step::DstGone => r.client_gone(),
            _ => {}
        }
    }
    // The early bytes may be slices of larger read buffers: keeping them
    // would keep those whole allocations alive for the life of the connection.
    drop(client_early);
    drop(upstream_early);
    // `r` is used in place inside the block: rebinding it there (or passing
    // it to an `async fn`) would store it twice in the future.
    async move {
        // One timer for the connection's life: re-arming a fresh one per step
        // would touch the timer wheel for every message. It is only moved
        // earlier in `poll_run`; a deadline that moved later is picked up when
        // the earlier one fires (every check compares against `now`).
        let timer = sleep_until(r.next_deadline(Instant::now()));
        tokio::pin!(timer);
        let ended = std::future::poll_fn(|cx| r.poll_run(cx, timer.as_mut())).await;
        // What we still owe each peer gets `CLOSE_WAIT`; the same timer bounds
        // it, so the task needs no second future for this phase. Dropping the
        // sockets then closes them (a `shutdown()` first would only add a system
        // call per socket: the FIN goes out either way).
        timer.as_mut().reset(Instant::now() + CLOSE_WAIT);
        std::future::poll_fn(|cx| r.poll_flush_owed(cx, timer.as_mut())).await;
        ended
    }
}

/// SPEC §9: a refusal told in band. After the `101`, the client gets one
/// close frame (`4000 + status`, the JSON reason) and, at most
/// [`CLOSE_WAIT`] later, the end of the TCP connection; nothing is read
/// but the client's answer. Costs what an HTTP refusal costs: no runtime,
/// no relay, one short task.
pub async fn refuse<S>(mut client: S, code: u16, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frame = frames::close_frame(code, reason, false);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        client.write_all(&frame).await?;
        client.flush().await?;
        // The client's close reply (or its hang-up) ends the handshake;
        // then the server closes the TCP first, as RFC 6455 §7.1.1 asks.
        let mut answer = [0u8; 64];
        let _ = client.read(&mut answer).await?;
        Ok::<_, io::Error>(())
    })
    .await;
}

impl<C: Endpoint, U: Endpoint> Relay<C, U> {
    /// The event loop, written against the sockets' `poll_*_ready` rather
    /// than `select!` over `readable()`/`writable()` futures: those futures
    /// live in the task while it is idle (hundreds of bytes per connection)
    /// and each one made per step takes and releases a waiter-list lock;
    /// `poll_*_ready` keeps one waker slot per direction in the socket's
    /// registration. Branches are taken one at a time in priority order,
    /// then every condition is re-evaluated, as a biased `select!` would.
    fn poll_run(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<Outcome> {
        loop {
            let closing = self.closing();
            let read_client =
                self.c2u.pending.is_empty() && !self.upstream.has_backlog() && !self.c2u.src_eof;
            // Once closing, the runtime is read only to finish a frame in
            // flight to the client, after which the owed close frame goes out.
            let upstream_pass = match (closing, self.owe_client.is_some()) {
                (false, _) => Pass::All,
                (true, true) => Pass::FinishFrame,
                (true, false) => Pass::Nothing,
            };
            let read_upstream = self.u2c.pending.is_empty()
                && !self.client.has_backlog()
                && !self.u2c.src_eof
                && upstream_pass != Pass::Nothing;
            let deadline = self.next_deadline(Instant::now());
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }

            if !closing
                && let Some(rx) = self.close_rx.as_mut()
                && let Poll::Ready(res) = Pin::new(rx).poll(cx)
            {
                self.close_rx = None;
                if let Ok(cmd) = res {
                    self.begin_close(cmd);
                }
                continue;
            }
            if (!self.c2u.pending.is_empty() || self.upstream.has_backlog())
                && let Poll::Ready(res) = self.upstream.poll_write_ready(cx)
            {
                if res
                    .and_then(|()| self.c2u.flush(&mut self.upstream))
                    .is_err()
                {
                    if closing {
                        return Poll::Ready(self.closing.map_or(Outcome::Dropped, |c| c.1));
                    }
                    self.begin_close(UPSTREAM_GONE);
                }
                continue;
            }
            if (!self.u2c.pending.is_empty() || self.client.has_backlog())
                && let Poll::Ready(res) = self.client.poll_write_ready(cx)
            {
                if res.and_then(|()| self.u2c.flush(&mut self.client)).is_err() {
                    self.client_gone();
                    return Poll::Ready(self.closing.map_or(Outcome::Dropped, |c| c.1));
                }
                self.settle_owed_close();
                continue;
            }
            if read_client && let Poll::Ready(res) = self.client.poll_read_ready(cx) {
                let pass = if closing { Pass::Nothing } else { Pass::All };
                let step = match res {
                    Ok(()) => self
                        .c2u
                        .pump(&mut self.client, &mut self.upstream, &self.cfg, pass),
                    Err(_) => Step::Eof,
                };
                match step {
                    Step::Nothing => {
                        if closing
                            && self.c2u.saw_close
                            && self.u2c.pending.is_empty()
                            && !self.client.has_backlog()
                            && self.owe_client.is_none()
                        {
                            return Poll::Ready(self.closing.map_or(Outcome::Peers, |c| c.1));
                        }
                        if self.c2u.saw_close && self.peer_close_deadline.is_none() {
                            self.peer_close_deadline = Some(Instant::now() + PEER_CLOSE_WAIT);
                        }
                    }
                    Step::Eof => {
                        self.c2u.src_eof = true;
                        if let Some((_, ended)) = self.closing {
                            return Poll::Ready(ended);
                        }
                        self.client_gone();
                    }
                    Step::Event(ev) => self.on_event(ev, true),
                    Step::DstGone => self.begin_close(UPSTREAM_GONE),
                }
                continue;
            }
            if read_upstream && let Poll::Ready(res) = self.upstream.poll_read_ready(cx) {
                let step = match res {
                    Ok(()) => self.u2c.pump(
                        &mut self.upstream,
                        &mut self.client,
                        &self.cfg,
                        upstream_pass,
                    ),
                    Err(_) => Step::Eof,
                };
                match step {
                    Step::Nothing => {
                        self.settle_owed_close();
                        if self.u2c.saw_close && self.peer_close_deadline.is_none() {
                            self.peer_close_deadline = Some(Instant::now() + PEER_CLOSE_WAIT);
                        }
                    }
                    Step::Eof if closing => self.u2c.src_eof = true,
                    Step::Eof => {
                        self.u2c.src_eof = true;
                        if self.u2c.saw_close {
                            // Normal end: the runtime closed after its close frame.
                            self.closing = Some((Instant::now() + CLOSE_WAIT, Outcome::Peers));
                            if self.u2c.pending.is_empty() && !self.client.has_backlog() {
                                return Poll::Ready(Outcome::Peers);
                            }
                        } else {
                            self.begin_close(UPSTREAM_GONE);
                        }
                    }
                    Step::Event(ev) => self.on_event(ev, false),
                    Step::DstGone => {
                        self.client_gone();
                        return Poll::Ready(self.closing.map_or(Outcome::Dropped, |c| c.1));
                    }
                }
                continue;
            }
            if timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if let Some((at, ended)) = self.closing
                    && now >= at
                {
                    return Poll::Ready(ended);
                }
                if self.peer_close_deadline.is_some_and(|d| now >= d) {
                    return Poll::Ready(Outcome::Peers);
                }
                if let Some(gone) = self.keepalive(now) {
                    if closing {
                        return Poll::Ready(Outcome::Dropped);
                    }
                    self.begin_close(gone);
                }
                timer.as_mut().reset(self.next_deadline(now));
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Writes what each peer is still owed until done, a peer fails, or
    /// `timer` fires.
    fn poll_flush_owed(&mut self, cx: &mut Context<'_>, timer: Pin<&mut Sleep>) -> Poll<()> {
        let client_done = flush_owed(&mut self.u2c, &mut self.client, cx);
        let upstream_done = flush_owed(&mut self.c2u, &mut self.upstream, cx);
        if client_done && upstream_done {
            return Poll::Ready(());
        }
        timer.poll(cx)
    }
}

/// Writes what `dst` is still owed; true when nothing is (or `dst` failed,
/// which leaves nothing to wait for).
fn flush_owed<D: Endpoint>(dir: &mut Dir, dst: &mut D, cx: &mut Context<'_>) -> bool {
    while !dir.pending.is_empty() || dst.has_backlog() {
        match dst.poll_write_ready(cx) {
            Poll::Ready(Ok(())) => {
                if dir.flush(dst).is_err() {
                    dir.pending = Vec::new();
                    return true;
                }
            }
            Poll::Ready(Err(_)) => {
                dir.pending = Vec::new();
                return true;
            }
            Poll::Pending => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_future<F>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle proxied socket costs its task, and the task is mostly this
    /// future: 2,296 bytes when the close-out phase and the set-up were
    /// stored beside the event loop, 576 since, 624 with the state of the
    /// client-frame checks (SPEC §6). Layout, not speed: it only
    /// changes with the code (and the compiler), so it is pinned here.
    #[tokio::test]
    async fn the_idle_future_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (upstream, _) = listener.accept().await.unwrap();
        let (_tx, rx) = oneshot::channel();
        let cfg = RelayConfig {
            max_message: 1 << 20,
            io_buffer: 16 * 1024,
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
        };
        let pair = Pair {
            client,
            client_early: bytes::Bytes::new(),
            upstream,
            upstream_early: bytes::Bytes::new(),
            deflate: true,
            hello: Some("{}".into()),
        };
        let fut = relay(pair, cfg, rx);
        let size = size_of_future(&fut);
        assert!(
            size <= 768,
            "the relay future grew to {size} bytes (Relay is {}, Sleep {})",
            std::mem::size_of::<Relay<TcpStream, TcpStream>>(),
            std::mem::size_of::<Sleep>()
        );
    }
}
