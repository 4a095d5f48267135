//! A counting TCP hop: a listener on a free loopback port that forwards
//! every connection unchanged to a target and reports, when the connection
//! ends, its request and response lines and how many bytes went each way
//! after the HTTP heads (for a WebSocket: the frames on the wire, exactly
//! as sent). Optionally it answers `GET /` itself with a page, so a browser
//! sees the page and the gateway behind it as one origin.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// One finished connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// First line of the client's head, e.g. `GET /ws/echo HTTP/1.1`.
    pub request: String,
    /// First line of the target's head, e.g. `HTTP/1.1 101 Switching Protocols`.
    pub response: String,
    /// Bytes the client sent after its request head.
    pub up: u64,
    /// Bytes the target sent after its response head.
    pub down: u64,
}

impl Conn {
    pub fn upgraded(&self) -> bool {
        self.response.starts_with("HTTP/1.1 101")
    }
}

pub struct Tap {
    pub addr: SocketAddr,
    done: mpsc::UnboundedReceiver<Conn>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    /// Binds a free port; [`Tap::forward`] then starts forwarding. Two
    /// steps, so the address can go into the target's config first.
    pub async fn bind() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    /// Forwards connections on `listener` to `target`; `GET /` and
    /// `GET /?…` are answered with `page` (HTML) instead, when given.
    pub fn forward(listener: TcpListener, target: SocketAddr, page: Option<String>) -> Tap {
        let addr = listener.local_addr().unwrap();
        let (tx, done) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let tx = tx.clone();
                let page = page.clone();
                tokio::spawn(async move {
                    if let Some(conn) = relay(client, target, page).await {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        Tap { addr, done, task }
    }

    /// The next finished connection (in the order they end).
    pub async fn next(&mut self) -> Conn {
        self.done.recv().await.expect("the tap is running")
    }

    /// The next finished connection that was upgraded (`101`).
    pub async fn next_upgraded(&mut self) -> Conn {
        loop {
            let c = self.next().await;
            if c.upgraded() {
                return c;
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn first_line(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line).into_owned()
}

async fn relay(mut client: TcpStream, target: SocketAddr, page: Option<String>) -> Option<Conn> {
    // The client's head, to name the connection (and serve the page).
    let mut head = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    while head_end(&head).is_none() {
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let request = first_line(&head);
    if let Some(page) = page
        && (request.starts_with("GET / ") || request.starts_with("GET /?"))
    {
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
        client.write_all(resp.as_bytes()).await.ok()?;
        let _ = client.shutdown().await;
        return Some(Conn {
            request,
            response: "HTTP/1.1 200 OK (page)".into(),
            up: 0,
            down: 0,
        });
    }
    let upstream = TcpStream::connect(target).await.ok()?;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let ((_, up), (response, down)) = tokio::join!(pump(head, cr, uw), pump(Vec::new(), ur, cw));
    Some(Conn {
        request,
        response,
        up,
        down,
    })
}

/// Copies `r` to `w` (starting with `first`, already read) until EOF and
/// returns the first line of the stream's HTTP head and the number of bytes
/// after that head.
async fn pump(first: Vec<u8>, mut r: OwnedReadHalf, mut w: OwnedWriteHalf) -> (String, u64) {
    let mut head = Vec::new();
    let mut head_done = false;
    let mut after = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = first;
    loop {
        let chunk: &[u8] = if !pending.is_empty() {
            &pending
        } else {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => &buf[..n],
            }
        };
        if head_done {
            after += chunk.len() as u64;
        } else {
            head.extend_from_slice(chunk);
            if let Some(end) = head_end(&head) {
                head_done = true;
                after += (head.len() - end) as u64;
                head.truncate(end);
            }
        }
        if w.write_all(chunk).await.is_err() {
            break;
        }
        pending.clear();
    }
    let _ = w.shutdown().await;
    (first_line(&head), after)
}
