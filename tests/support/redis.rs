//! A real `redis-server` per test, on a free port, killed when dropped.
//!
//! Tests that stop and restart Redis need a server of their own; a shared
//! one (or the usual 6379) would make them interfere with each other.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BINARY: &str = "redis-server";
const READY_WITHIN: Duration = Duration::from_secs(5);
const POLL_EVERY: Duration = Duration::from_millis(20);

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        // The port is free when we look, but another process may take it
        // before redis-server binds it: then redis-server exits and we try
        // another.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                child: Some(spawn(port)),
            };
            if server.wait_ready().await {
                return server;
            }
            server.kill();
        }
        panic!("redis-server did not come up on a free port within {READY_WITHIN:?} (5 tries)");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and waits until its port refuses connections.
    pub async fn stop(&mut self) {
        self.kill();
        let addr = self.addr();
        let what = format!(
            "port {} refusing connections after killing redis-server",
            self.port
        );
        super::wait::eventually(&what, READY_WITHIN, || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }

    /// Restarts on the same port (empty: nothing is persisted).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again() while the server runs");
        self.child = Some(spawn(self.port));
        assert!(
            self.wait_ready().await,
            "redis-server did not come back on port {} within {READY_WITHIN:?}",
            self.port
        );
    }

    /// Freezes the process (SIGSTOP): the port still accepts connections but
    /// nothing answers, like a wedged server or a half-open network path.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// A plain connection for assertions on raw keys.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `false` if the process exited (port taken) or never answered.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if pong(self.addr()).await {
                return true;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a stopped (paused) process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn spawn(port: u16) -> Child {
    let result = Command::new(BINARY)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match result {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{BINARY}` is not installed (or not on PATH); these tests need a real Redis: \
             install it, e.g. `apt-get install redis-server` or `brew install redis`"
        ),
        Err(e) => panic!("could not start `{BINARY}`: {e}"),
    }
}

/// One raw `PING`; bounded so a wedged process cannot stall the caller.
async fn pong(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}
