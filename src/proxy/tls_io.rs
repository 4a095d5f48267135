//! A TLS socket as the relay's [`Endpoint`]: rustls' connection state
//! (sans-I/O) over the raw TCP socket, driven by the same readiness events
//! as a plain socket, so a TLS connection is relayed by the same pump with
//! the same frame checks and close codes.
//!
//! Unlike the plain path, TLS needs buffers: a record must be whole before
//! it can be decrypted, and encrypted output may not fit the socket at
//! once. They are rustls' own, bounded: received plaintext is read out
//! before more ciphertext is read in (so at most one record's worth waits),
//! and outgoing data is capped at [`SEND_LIMIT`] bytes, past which
//! [`Endpoint::try_write`] answers `WouldBlock` and the relay holds the
//! rest (and stops reading its source) as it does for a full TCP socket.
//! BENCHMARKS.md has what an idle TLS connection costs.

use std::io::{self, Read, Write};
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::relay::Endpoint;

/// Most bytes rustls queues for sending (plaintext not yet encrypted plus
/// records not yet written) before writes wait: one TLS record's payload.
pub const SEND_LIMIT: usize = 16 * 1024;

pub struct TlsIo {
    tcp: TcpStream,
    /// Boxed: rustls' connection state is a few KiB, and the relay future
    /// that holds this stays small for plain sockets only if it is.
    conn: Box<rustls::Connection>,
    /// Plaintext may be waiting inside rustls, so the next read must not
    /// wait for the socket: set after a read that filled its buffer and at
    /// the start (hyper or the dialler may have left decrypted bytes there).
    maybe_buffered: bool,
}

impl TlsIo {
    pub fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsIo {
        let mut conn = Box::new(conn.into());
        conn.set_buffer_limit(Some(SEND_LIMIT));
        TlsIo {
            tcp,
            conn,
            maybe_buffered: true,
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Endpoint for TlsIo {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.maybe_buffered {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => {
                    // A read that left room drained the plaintext.
                    self.maybe_buffered = n == buf.len();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.maybe_buffered = false;
            // Records already read but not yet decrypted come first: the
            // socket may have nothing more to say about them.
            let state = self.conn.process_new_packets();
            // Alerts, key updates and session tickets go out as they come.
            let _ = self.flush_backlog();
            let state = state.map_err(tls_error)?;
            if state.plaintext_bytes_to_read() > 0 {
                continue;
            }
            if state.peer_has_closed() {
                return Ok(0);
            }
            let (tcp, conn) = (&self.tcp, &mut self.conn);
            // `try_io` clears the readiness when the socket has nothing, so
            // the relay then waits for the next event.
            let n = tcp.try_io(Interest::READABLE, || {
                let sock = SockRef::from(tcp);
                let mut reader: &socket2::Socket = &sock;
                conn.read_tls(&mut reader as &mut dyn Read)
            })?;
            if n == 0 {
                return Ok(0);
            }
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_write_ready(cx)
    }

    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.flush_backlog()?;
        if self.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(buf)?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.flush_backlog()?;
        Ok(n)
    }

    fn has_backlog(&self) -> bool {
        self.conn.wants_write()
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        let (tcp, conn) = (&self.tcp, &mut self.conn);
        while conn.wants_write() {
            let res = tcp.try_io(Interest::WRITABLE, || {
                let sock = SockRef::from(tcp);
                let mut writer: &socket2::Socket = &sock;
                conn.write_tls(&mut writer as &mut dyn Write)
            });
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
