//! `portcullis-bench`: the load generator and echo runtime behind
//! BENCHMARKS.md (driven by `bench/run.sh`).
//!
//! Every workload is bounded by a count or a duration, every network wait by
//! a timeout, and every run prints one JSON line (for `report`) followed by
//! one human-readable line. Only loopback targets are expected; nothing here
//! stops you pointing it elsewhere, so don't.
//!
//! # Subcommands
//!
//! - `echo`: the common upstream of every target (a lean tokio-tungstenite
//!   echo: text and binary echoed, small buffers, replies batched per read).
//! - `rtt`, `stream`, `churn`, `hold`: WebSocket workloads against one target.
//! - `login`, `verify`: the gateway's HTTP API under load.
//! - `idle-store`: Redis commands per idle socket per second (`idle_store`).
//! - `instances latency|fanout|memory|failover`: shared sessions across
//!   gateways (`instances`).
//! - `free-port`, `report`: helpers for the script (free ports; medians of the
//!   JSON lines as a markdown table).

mod idle_store;
mod instances;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Bounds a TCP connect plus the WebSocket (or HTTP) handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the wait for one echo or one HTTP response.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds a WebSocket close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Ws = WebSocketStream<tls::Conn>;

#[derive(Parser)]
#[command(
    name = "portcullis-bench",
    about = "Load generator and echo runtime for Portcullis benchmarks"
)]
struct Cli {
    /// Tokio worker threads for this process (generator or echo). One keeps
    /// the generator's CPU share small and equal for every target.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// CA (PEM) that wss:// and https:// targets' certificates chain to.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo runtime: every text and binary message is sent back.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Serve wss:// with this certificate (PEM; needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        tls_key: Option<PathBuf>,
    },
    /// Write a throwaway CA and a localhost certificate (ca.pem, cert.pem,
    /// key.pem) into --dir.
    MakeCert {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Request/response: each socket sends one message and awaits its echo.
    Rtt(RttArgs),
    /// Pipelined: each socket keeps up to `--window` messages in flight.
    Stream(StreamArgs),
    /// connect → upgrade → one echo → close, repeatedly.
    Churn(ChurnArgs),
    /// Open N idle sockets and report the proxy's RSS per connection.
    Hold(HoldArgs),
    /// POST /api/auth/login in a loop (argon2-bound).
    Login(LoginArgs),
    /// GET /api/session/{id} in a loop (token verify + store lookup).
    Verify(VerifyArgs),
    /// Shared route: one runtime streams to N viewports of one session.
    Fanout(FanoutArgs),
    /// N idle proxied sockets in N sessions: Redis commands per socket per
    /// second from `INFO stats`, for several N in one run.
    IdleStore(idle_store::IdleStoreArgs),
    /// Shared route: detach, then reattach with resume_from; time to the
    /// first replayed frame.
    Resume(ResumeArgs),
    /// Shared sessions across gateways on one Redis (SPEC §8).
    #[command(subcommand)]
    Instances(instances::InstancesCmd),
    /// Print N currently free loopback ports, one per line.
    FreePort {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Medians of JSON result lines as markdown tables.
    Report {
        /// Files of JSON lines written by the other subcommands.
        files: Vec<PathBuf>,
    },
}

/// Where to connect and how to authenticate.
#[derive(Args, Clone)]
struct Target {
    /// WebSocket URL of the target (ws://127.0.0.1:PORT/path).
    #[arg(long)]
    url: String,
    /// Name of the target in the JSON line (direct, nginx, haproxy, portcullis).
    #[arg(long, default_value = "target")]
    label: String,
    /// Run number, copied into the JSON line.
    #[arg(long, default_value_t = 1)]
    run: u32,
    /// Gateway base URL (http://127.0.0.1:PORT): log in once via
    /// POST /api/auth/login and send `Authorization: Bearer` on each upgrade.
    #[arg(long)]
    token_url: Option<String>,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "")]
    password: String,
    /// Process(es) whose CPU time (utime + stime from /proc/PID/stat) is
    /// charged to the target during the measured window (repeatable).
    #[arg(long = "cpu-pid")]
    cpu_pids: Vec<u32>,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 10)]
    viewports: usize,
    /// Frames the runtime streams (each viewport receives all of them).
    #[arg(long, default_value_t = 2000)]
    frames: usize,
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Gateway process(es) whose RSS per viewport is reported.
    #[arg(long)]
    pid: Vec<u32>,
}

#[derive(Args)]
struct ResumeArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 200)]
    iterations: usize,
}

#[derive(Args)]
struct RttArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 50)]
    sockets: usize,
    /// Round trips per socket.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Payload bytes (binary).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Round trips per socket excluded from the latency percentiles.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

#[derive(Args)]
struct StreamArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 50)]
    sockets: usize,
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Measured window, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Messages in flight per socket.
    #[arg(long, default_value_t = 64)]
    window: usize,
}

#[derive(Args)]
struct ChurnArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    workers: usize,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
}

#[derive(Args)]
struct HoldArgs {
    #[command(flatten)]
    target: Target,
    /// Idle sockets to open. The generator holds N descriptors, a proxy 2N,
    /// the echo N: keep 2N + a few hundred under the proxy's `ulimit -n`.
    #[arg(long, default_value_t = 9000)]
    count: usize,
    /// Sockets opened concurrently per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Process(es) whose VmRSS is the proxy's (repeat for nginx workers).
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Process(es) whose VmRSS is the upstream's (the echo).
    #[arg(long = "pid-upstream")]
    upstream_pids: Vec<u32>,
    /// Longest wait for RSS to settle after the last socket opened.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// With every socket open and idle: send this gateway SIGHUP, time until
    /// `--metrics-url` counts the reload, then check every socket still
    /// echoes (BENCHMARKS.md, "Reload under load").
    #[arg(long, requires = "metrics_url")]
    reload_pid: Option<u32>,
    /// The gateway's base URL for /metrics (http:// or https://).
    #[arg(long)]
    metrics_url: Option<String>,
}

#[derive(Args)]
struct LoginArgs {
    /// Gateway base URL (http://127.0.0.1:PORT).
    #[arg(long)]
    base: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "portcullis")]
    label: String,
    #[arg(long, default_value_t = 1)]
    run: u32,
    /// Gateway process(es) whose VmRSS is reported before and after.
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long)]
    base: String,
    /// A session token; without it (and --session) the bench logs in with
    /// --user/--password first.
    #[arg(long, requires = "session")]
    token: Option<String>,
    #[arg(long, requires = "token")]
    session: Option<String>,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "")]
    password: String,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value = "portcullis")]
    label: String,
    #[arg(long, default_value_t = 1)]
    run: u32,
    /// Gateway process(es) whose VmRSS is reported before and after.
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FreePort { count } => free_ports(count),
        Command::Report { files } => report(&files),
        Command::MakeCert { dir } => tls::make_cert(&dir),
        command => {
            if let Some(ca) = &cli.ca_file {
                if let Err(e) = tls::trust(ca) {
                    eprintln!("portcullis-bench: --ca-file: {e:#}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cli.threads.max(1))
                .enable_all()
                .build()
                .expect("building the Tokio runtime");
            rt.block_on(async move {
                match command {
                    Command::Echo {
                        listen,
                        tls_cert,
                        tls_key,
                    } => {
                        let acceptor = match (tls_cert, tls_key) {
                            (Some(c), Some(k)) => Some(tls::acceptor(&c, &k)?),
                            _ => None,
                        };
                        echo(listen, acceptor).await
                    }
                    Command::Rtt(a) => rtt(a).await,
                    Command::Stream(a) => stream(a).await,
                    Command::Churn(a) => churn(a).await,
                    Command::Hold(a) => hold(a).await,
                    Command::Login(a) => login_bench(a).await,
                    Command::Verify(a) => verify_bench(a).await,
                    Command::Fanout(a) => fanout(a).await,
                    Command::IdleStore(a) => idle_store::idle_store(a).await,
                    Command::Resume(a) => resume_bench(a).await,
                    Command::Instances(c) => instances::run(c).await,
                    Command::FreePort { .. }
                    | Command::Report { .. }
                    | Command::MakeCert { .. } => unreachable!(),
                }
            })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints the JSON line and the human line of one run.
fn emit(result: Value, human: String) {
    println!("{result}");
    println!("# {human}");
}

fn secs(d: f64) -> Duration {
    Duration::from_secs_f64(d.clamp(0.1, 3600.0))
}

// ---------------------------------------------------------------- echo

/// Small buffers: the echo is the same for every target, and its own cost
/// per connection is reported separately by `hold --pid-upstream`.
fn echo_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

async fn echo(listen: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors: back off rather than spin or exit.
                sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_echo(stream).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) = timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        serve_echo(s).await
                    }
                }
            }
        });
    }
}

async fn serve_echo<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(Ok(mut ws)) = timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(stream, Some(echo_config())),
    )
    .await
    else {
        return;
    };
    // Echo everything already read, then flush once: pipelined
    // input costs one write per batch, not one per message.
    while let Some(Ok(first)) = ws.next().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if msg.is_close() {
                // tungstenite queued the close reply; flush it.
                let _ = ws.flush().await;
                return;
            }
            // `stream:<n>:<size>` (text): send n binary frames of
            // `size` bytes, for the shared-session fan-out bench.
            if let Some((n, size)) = msg.to_text().ok().and_then(parse_stream_cmd) {
                let block = vec![0x5a_u8; size];
                for _ in 0..n {
                    if ws.feed(Message::binary(block.clone())).await.is_err() {
                        return;
                    }
                }
                next = None;
                continue;
            }
            let data = msg.is_text() || msg.is_binary();
            if data && ws.feed(msg).await.is_err() {
                return;
            }
            next = match ws.next().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                Some(_) => {
                    let _ = ws.flush().await;
                    return;
                }
                None => None,
            };
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

fn parse_stream_cmd(t: &str) -> Option<(usize, usize)> {
    let mut parts = t.strip_prefix("stream:")?.split(':');
    let n = parts.next()?.parse().ok()?;
    let size: usize = parts.next()?.parse().ok()?;
    Some((n, size.min(1 << 20)))
}

// ---------------------------------------------------------------- clients

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

async fn ws_connect(url: &str, token: Option<&str>) -> Result<Ws> {
    let mut req = url.into_client_request().context("bad --url")?;
    if let Some(t) = token {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse()?);
    }
    let (ws, _) = timeout(CONNECT_TIMEOUT, ws_handshake(req))
        .await
        .map_err(|_| anyhow!("upgrade timed out"))??;
    Ok(ws)
}

/// TCP (and TLS for wss://), then the WebSocket handshake.
async fn ws_handshake(
    req: http::Request<()>,
) -> Result<(
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)> {
    let host = req.uri().host().context("URL without host")?.to_string();
    let wss = req.uri().scheme_str() == Some("wss");
    let port = req.uri().port_u16().unwrap_or(if wss { 443 } else { 80 });
    let conn = tls::connect(&host, port, wss).await?;
    Ok(tokio_tungstenite::client_async_with_config(req, conn, Some(client_config())).await?)
}

/// Closes politely, bounded.
async fn ws_close(mut ws: Ws) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Logs in when the target asks for a token.
async fn target_token(t: &Target) -> Result<Option<String>> {
    match &t.token_url {
        Some(base) => Ok(Some(login_once(base, &t.user, &t.password).await?.0)),
        None => Ok(None),
    }
}

/// A keep-alive HTTP/1.1 connection to the gateway's API.
struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl Http {
    async fn connect(base: &str) -> Result<Http> {
        let url = url::Url::parse(base).context("bad base URL")?;
        let host = url.host_str().context("base URL has no host")?.to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let stream = timeout(
            CONNECT_TIMEOUT,
            tls::connect(&host, port, url.scheme() == "https"),
        )
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Http {
            sender,
            authority: format!("{host}:{port}"),
        })
    }

    async fn call(
        &mut self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(http::StatusCode, Bytes)> {
        let fut = async {
            self.sender.ready().await?;
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, &self.authority);
            if let Some(t) = token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            if body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        timeout(REPLY_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("HTTP request timed out"))?
    }
}

fn login_body(user: &str, password: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"username": user, "password": password})).expect("json")
}

/// Logs in once; returns (session_token, session_id).
async fn login_once(base: &str, user: &str, password: &str) -> Result<(String, String)> {
    let mut http = Http::connect(base).await?;
    let (status, body) = http
        .call(
            http::Method::POST,
            "/api/auth/login",
            None,
            Some(login_body(user, password)),
        )
        .await?;
    if status != http::StatusCode::OK {
        bail!(
            "login failed with {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body)?;
    let token = v["session_token"]
        .as_str()
        .context("no session_token")?
        .to_string();
    let sid = v["session_id"]
        .as_str()
        .context("no session_id")?
        .to_string();
    Ok((token, sid))
}

/// Opens `n` sockets, at most 100 handshakes at a time.
async fn connect_many(url: &str, token: Option<&str>, n: usize) -> Result<Vec<Ws>> {
    let results: Vec<Result<Ws>> = futures_util::stream::iter(0..n)
        .map(|_| ws_connect(url, token))
        .buffer_unordered(100)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Value at quantile `q` of sorted `v` (nearest rank).
fn percentile(v: &[u32], q: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// ---------------------------------------------------------------- rtt

async fn rtt(a: RttArgs) -> Result<()> {
    let token = target_token(&a.target).await?;
    let sockets = connect_many(&a.target.url, token.as_deref(), a.sockets).await?;
    let payload = Bytes::from(vec![0x5a; a.size]);
    let cpu = CpuMeter::start(&a.target.cpu_pids);
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            let (total, warmup) = (a.messages + a.warmup, a.warmup);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(total);
                let mut done = 0u64;
                let mut errors = 0u64;
                for i in 0..total {
                    let t0 = Instant::now();
                    if ws.send(Message::Binary(payload.clone())).await.is_err() {
                        errors += 1;
                        break;
                    }
                    match timeout(REPLY_TIMEOUT, ws.next()).await {
                        Ok(Some(Ok(Message::Binary(b)))) if b.len() == payload.len() => {
                            done += 1;
                            if i >= warmup {
                                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                        }
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                ws_close(ws).await;
                (lat, done, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let (mut done, mut errors) = (0u64, 0u64);
    let mut elapsed = Duration::ZERO;
    for t in tasks {
        let (l, d, e) = t.await?;
        // The window ends when the last socket finished its round trips.
        elapsed = elapsed.max(started.elapsed());
        lat.extend(l);
        done += d;
        errors += e;
    }
    let cpu = cpu.stop(elapsed);
    lat.sort_unstable();
    let rate = done as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    let mut v = json!({"bench": "rtt", "target": a.target.label, "run": a.target.run,
               "sockets": a.sockets, "messages": a.messages, "size": a.size,
               "msgs_per_sec": round1(rate), "p50_us": p50, "p99_us": p99,
               "round_trips": done, "errors": errors, "secs": round1(elapsed.as_secs_f64())});
    cpu_fields(&mut v, cpu, done, "cpu_us_per_msg");
    emit(
        v,
        format!(
            "rtt {}: {:.0} msgs/s, p50 {p50} µs, p99 {p99} µs ({done} round trips, {errors} errors, {:.2} s)",
            a.target.label,
            rate,
            elapsed.as_secs_f64()
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------- stream

async fn stream(a: StreamArgs) -> Result<()> {
    let token = target_token(&a.target).await?;
    let sockets = connect_many(&a.target.url, token.as_deref(), a.sockets).await?;
    let payload = Bytes::from(vec![0xa5; a.size]);
    let received = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(a.warmup_ms);
    let deadline = measure_from + secs(a.secs);
    let window = a.window.max(1);
    let mut tasks = Vec::new();
    for ws in sockets {
        let (mut sink, mut source) = ws.split();
        let credit = Arc::new(Semaphore::new(window));
        let (payload, credit_w, errors_w) = (payload.clone(), credit.clone(), errors.clone());
        // Writer: send while credit lasts; one flush per burst.
        tasks.push(tokio::spawn(async move {
            let work = async {
                loop {
                    let permit = tokio::select! {
                        p = credit_w.acquire() => p,
                        _ = sleep_until(deadline) => return Ok(()),
                    };
                    permit?.forget();
                    sink.feed(Message::Binary(payload.clone())).await?;
                    for _ in 1..window {
                        match credit_w.try_acquire() {
                            Ok(p) => p.forget(),
                            Err(_) => break,
                        }
                        sink.feed(Message::Binary(payload.clone())).await?;
                    }
                    sink.flush().await?;
                }
            };
            let r: Result<()> = match timeout_at_or(deadline + REPLY_TIMEOUT, work).await {
                Some(r) => r,
                None => Err(anyhow!("writer stalled")),
            };
            if r.is_err() {
                errors_w.fetch_add(1, Ordering::Relaxed);
            }
        }));
        let (received_r, errors_r) = (received.clone(), errors.clone());
        // Reader: count echoes inside the measured window, return credit.
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = source.next() => match m {
                        Some(Ok(Message::Binary(_) | Message::Text(_))) => {
                            let now = Instant::now();
                            if now >= measure_from && now < deadline {
                                received_r.fetch_add(1, Ordering::Relaxed);
                            }
                            credit.add_permits(1);
                        }
                        Some(Ok(_)) => {}
                        _ => {
                            errors_r.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                    _ = sleep_until(deadline) => return,
                }
            }
        }));
    }
    // CPU over the measured window only.
    let cpu_pids = a.target.cpu_pids.clone();
    let cpu_task = tokio::spawn(async move {
        sleep_until(measure_from).await;
        let meter = CpuMeter::start(&cpu_pids);
        sleep_until(deadline).await;
        meter.stop(deadline - measure_from)
    });
    for t in tasks {
        t.await?;
    }
    let cpu = cpu_task.await?;
    let n = received.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    let rate = n as f64 / secs(a.secs).as_secs_f64();
    // Each received echo crossed the proxy twice (request and reply).
    let mut v = json!({"bench": "stream", "target": a.target.label, "run": a.target.run,
               "sockets": a.sockets, "size": a.size, "window": window,
               "msgs_per_sec": round1(rate), "received": n, "errors": errors,
               "secs": a.secs});
    cpu_fields(&mut v, cpu, n, "cpu_us_per_msg");
    emit(
        v,
        format!(
            "stream {}: {:.0} msgs/s received ({n} in {} s, {} sockets x {window} in flight, {errors} errors)",
            a.target.label, rate, a.secs, a.sockets
        ),
    );
    Ok(())
}

async fn timeout_at_or<F: std::future::Future>(at: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(at, f).await.ok()
}

// ---------------------------------------------------------------- churn

async fn churn(a: ChurnArgs) -> Result<()> {
    let token = target_token(&a.target).await?;
    let payload = Bytes::from_static(b"churn");
    let cpu = CpuMeter::start(&a.target.cpu_pids);
    let start = Instant::now();
    let deadline = start + secs(a.secs);
    let tasks: Vec<_> = (0..a.workers.max(1))
        .map(|_| {
            let (url, token, payload) = (a.target.url.clone(), token.clone(), payload.clone());
            tokio::spawn(async move {
                let mut ok = 0u64;
                let mut errs: BTreeMap<String, u64> = BTreeMap::new();
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let mut ws = match ws_connect(&url, token.as_deref()).await {
                        Ok(ws) => ws,
                        Err(e) => {
                            *errs.entry(short_error(&e)).or_default() += 1;
                            // Do not spin on a refusing target.
                            sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let upgraded = t0.elapsed();
                    let echoed = ws.send(Message::Binary(payload.clone())).await.is_ok()
                        && matches!(
                            timeout(REPLY_TIMEOUT, ws.next()).await,
                            Ok(Some(Ok(Message::Binary(_))))
                        );
                    ws_close(ws).await;
                    if echoed {
                        ok += 1;
                        lat.push(upgraded.as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        *errs.entry("no echo".into()).or_default() += 1;
                    }
                }
                (ok, errs, lat)
            })
        })
        .collect();
    let mut ok = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut lat = Vec::new();
    for t in tasks {
        let (o, e, l) = t.await?;
        ok += o;
        lat.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let cpu = cpu.stop(start.elapsed());
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    let n_err: u64 = errors.values().sum();
    let rate = ok as f64 / elapsed;
    let mut v = json!({"bench": "churn", "target": a.target.label, "run": a.target.run,
               "workers": a.workers, "upgrades_per_sec": round1(rate), "upgrades": ok,
               "upgrade_p50_us": p50, "upgrade_p99_us": p99,
               "errors": n_err, "error_kinds": errors, "secs": round1(elapsed)});
    cpu_fields(&mut v, cpu, ok, "cpu_us_per_upgrade");
    emit(
        v,
        format!(
            "churn {}: {:.0} upgrades/s ({ok} in {elapsed:.2} s, upgrade p50 {p50} µs, p99 {p99} µs, {n_err} errors {errors:?})",
            a.target.label, rate
        ),
    );
    Ok(())
}

/// The gist of an error, for counting by kind.
fn short_error(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let s = s.split(':').take(2).collect::<Vec<_>>().join(":");
    s.chars().take(60).collect()
}

// ---------------------------------------------------------------- hold

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sum of VmRSS (KiB) over `pids`.
fn rss_kib(pids: &[u32]) -> Result<u64> {
    pids.iter()
        .map(|&p| status_field(p, "VmRSS:").with_context(|| format!("no VmRSS for pid {p}")))
        .sum()
}

fn fd_count(pids: &[u32]) -> usize {
    pids.iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

/// CPU time (ms) used so far by `pids`: utime + stime, which /proc reports
/// in USER_HZ ticks (100 per second on Linux).
fn cpu_ms(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the parenthesised command name, which may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) * 10)
        })
        .sum()
}

/// Busy CPU time (ms) of the whole machine so far, all cores together:
/// every process's share, the load generator's and the echo's included.
fn machine_busy_ms() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    // "cpu  user nice system idle iowait irq softirq steal ...", in ticks.
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let &[user, nice, system, _idle, _iowait, irq, softirq, steal] = f.as_slice() else {
        return None;
    };
    Some((user + nice + system + irq + softirq + steal) * 10)
}

/// CPU over a window: the target's processes, and the whole machine. The
/// machine's figure is the budget the targets compete for: on a saturated
/// machine a target's rate is proportional to the inverse of the machine's
/// CPU per operation, so it shows how much a proxy must save to move a
/// ratio.
struct CpuMeter {
    pids: Vec<u32>,
    start_ms: u64,
    machine_start_ms: Option<u64>,
}

/// What a `CpuMeter` measured: the target's (ms, percent of one core), if it
/// had pids, and the whole machine's busy ms.
struct CpuUse {
    target: Option<(u64, f64)>,
    machine_ms: Option<u64>,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start_ms: cpu_ms(pids),
            machine_start_ms: machine_busy_ms(),
        }
    }

    fn stop(&self, wall: Duration) -> CpuUse {
        let machine_ms = self
            .machine_start_ms
            .zip(machine_busy_ms())
            .map(|(a, b)| b.saturating_sub(a));
        let target = (!self.pids.is_empty()).then(|| {
            let used = cpu_ms(&self.pids).saturating_sub(self.start_ms);
            let pct = round1(used as f64 / wall.as_secs_f64().max(1e-3) / 10.0);
            (used, pct)
        });
        CpuUse { target, machine_ms }
    }
}

/// JSON fields for a CPU measurement: `cpu_ms`, `cpu_pct` and `per` µs of
/// the target's CPU per unit of `work`; `machine_<per>` the same for the
/// whole machine.
fn cpu_fields(v: &mut Value, cpu: CpuUse, work: u64, per: &str) {
    if let Some((ms, pct)) = cpu.target {
        v["cpu_ms"] = json!(ms);
        v["cpu_pct"] = json!(pct);
        if work > 0 {
            v[per] = json!(round1(ms as f64 * 1000.0 / work as f64));
        }
    }
    if let Some(ms) = cpu.machine_ms.filter(|_| work > 0) {
        v[format!("machine_{per}")] = json!(round1(ms as f64 * 1000.0 / work as f64));
    }
}

/// Samples RSS every 500 ms until two consecutive samples differ by less
/// than 64 KiB (after at least 1 s), or `max` passes.
async fn settled_rss(pids: &[u32], max: Duration) -> Result<u64> {
    let until = Instant::now() + max;
    sleep(Duration::from_millis(500)).await;
    let mut last = rss_kib(pids)?;
    loop {
        sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pids)?;
        if now.abs_diff(last) < 64 || Instant::now() >= until {
            return Ok(now);
        }
        last = now;
    }
}

async fn hold(a: HoldArgs) -> Result<()> {
    let token = target_token(&a.target).await?;
    let all: Vec<u32> = a.pids.iter().chain(&a.upstream_pids).copied().collect();
    let fds_before = fd_count(&all);
    let before = settled_rss(&a.pids, Duration::from_secs(3)).await?;
    let up_before = if a.upstream_pids.is_empty() {
        0
    } else {
        rss_kib(&a.upstream_pids)?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holders = Vec::with_capacity(a.count);
    let mut failed = 0u64;
    let mut first_error = None;
    let opening = Instant::now();
    let mut remaining = a.count;
    while remaining > 0 {
        let n = remaining.min(a.batch.max(1));
        remaining -= n;
        let batch: Vec<Result<Ws>> = futures_util::stream::iter(0..n)
            .map(|_| ws_connect(&a.target.url, token.as_deref()))
            .buffer_unordered(100)
            .collect()
            .await;
        for r in batch {
            match r {
                Ok(ws) => holders.push(tokio::spawn(idle(ws, stop_rx.clone()))),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    let open_secs = opening.elapsed().as_secs_f64();
    let opened = holders.len() as u64;
    let after = settled_rss(&a.pids, Duration::from_secs(a.settle_secs)).await?;
    // The proxy's CPU while every socket sits idle (timers, sweeps).
    let idle_meter = CpuMeter::start(&a.pids);
    sleep(Duration::from_secs(2)).await;
    let idle_cpu = idle_meter
        .stop(Duration::from_secs(2))
        .target
        .map_or(0.0, |c| c.1);
    let up_after = if a.upstream_pids.is_empty() {
        0
    } else {
        rss_kib(&a.upstream_pids)?
    };
    let fds_open = fd_count(&all);
    // Stop idling: each holder hands back its socket if it is still open.
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    let mut alive = Vec::with_capacity(holders.len());
    for h in holders {
        match h.await.ok().flatten() {
            Some(ws) => alive.push(ws),
            None => dropped += 1,
        }
    }
    let reload = match (a.reload_pid, &a.metrics_url) {
        (Some(pid), Some(url)) => Some(reload_under_load(pid, url, &mut alive).await?),
        _ => None,
    };
    // Close everything and wait (bounded) for the proxy to let go, so the
    // next workload starts from a quiet process.
    futures_util::stream::iter(alive)
        .for_each_concurrent(200, ws_close)
        .await;
    let released_by = Instant::now() + Duration::from_secs(20);
    while fd_count(&all) > fds_before + 64 && Instant::now() < released_by {
        sleep(Duration::from_millis(200)).await;
    }
    let per_conn = |b: u64, a: u64| {
        if opened == 0 {
            0.0
        } else {
            round1((a as f64 - b as f64) / opened as f64)
        }
    };
    let kib = per_conn(before, after);
    // No upstream pid (the direct target): no figure rather than a zero.
    let up_kib = (!a.upstream_pids.is_empty()).then(|| per_conn(up_before, up_after));
    emit(
        json!({"bench": "hold", "target": a.target.label, "run": a.target.run,
               "requested": a.count, "opened": opened, "failed": failed,
               "first_error": first_error, "dropped_while_idle": dropped,
               "rss_before_kib": before, "rss_after_kib": after,
               "kib_per_conn": kib, "upstream_kib_per_conn": up_kib,
               "fds_before": fds_before, "fds_open": fds_open,
               "open_secs": round1(open_secs), "idle_cpu_pct": idle_cpu, "pids": a.pids,
               "reload": reload.as_ref().map(|r| json!({
                   "applied_ms": r.applied_ms, "echoed_after": r.echoed,
                   "failed_after": r.failed})) }),
        format!(
            "hold {}: {kib} KiB/conn proxy RSS ({before} -> {after} KiB over {opened} sockets, {failed} failed, {dropped} dropped while idle; upstream {} KiB/conn; idle CPU {idle_cpu}%; opened in {open_secs:.1} s){}",
            a.target.label,
            up_kib.map_or("n/a".into(), |k| k.to_string()),
            reload.as_ref().map_or(String::new(), |r| format!(
                "; SIGHUP reload seen in /metrics after {} ms, then {} sockets echoed, {} failed",
                r.applied_ms, r.echoed, r.failed
            ))
        ),
    );
    Ok(())
}

/// Keeps a socket open (answering pings) until told to stop; the socket
/// if it was still open then.
async fn idle(mut ws: Ws, mut stop: watch::Receiver<bool>) -> Option<Ws> {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => return None,
            },
            _ = stop.changed() => return Some(ws),
        }
    }
}

struct ReloadUnderLoad {
    applied_ms: f64,
    echoed: u64,
    failed: u64,
}

/// `portcullis_config_reloads_total{result="ok"}` of the gateway at `base`.
async fn reloads_ok(base: &str) -> Result<f64> {
    let mut http = Http::connect(base).await?;
    let (_, body) = http.call(http::Method::GET, "/metrics", None, None).await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_config_reloads_total{result=\"ok\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// SIGHUP to `pid` with `sockets` open; the time until the reload shows in
/// the gateway's metrics (polled every 5 ms), then one echo on every socket.
async fn reload_under_load(pid: u32, base: &str, sockets: &mut [Ws]) -> Result<ReloadUnderLoad> {
    let before = reloads_ok(base).await?;
    let sent = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -HUP {pid} failed");
    let deadline = sent + Duration::from_secs(30);
    loop {
        if reloads_ok(base).await? > before {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no reload counted within 30 s");
        sleep(Duration::from_millis(5)).await;
    }
    let applied_ms = round1(sent.elapsed().as_secs_f64() * 1000.0);
    let results: Vec<bool> = futures_util::stream::iter(sockets.iter_mut())
        .map(|ws| async move {
            let msg = Message::text("after-reload");
            if ws.send(msg.clone()).await.is_err() {
                return false;
            }
            // The gateway pings sockets idle for `ping_interval_ms` (30 s):
            // a ping or pong before the echo is not a failure.
            let echo = timeout(REPLY_TIMEOUT, async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        other => return other,
                    }
                }
            });
            matches!(echo.await, Ok(Some(Ok(m))) if m == msg)
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let echoed = results.iter().filter(|ok| **ok).count() as u64;
    Ok(ReloadUnderLoad {
        applied_ms,
        echoed,
        failed: results.len() as u64 - echoed,
    })
}

// ---------------------------------------------------------------- HTTP API

struct ApiTally {
    ok: u64,
    statuses: BTreeMap<String, u64>,
    lat: Vec<u32>,
}

/// Runs `concurrency` keep-alive connections, each issuing `call` until the
/// deadline.
async fn api_loop<F, Fut>(base: &str, concurrency: usize, d: Duration, call: F) -> ApiTally
where
    F: Fn(Http) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Http, Result<http::StatusCode>)> + Send,
{
    let deadline = Instant::now() + d;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (base, call) = (base.to_string(), call.clone());
            tokio::spawn(async move {
                let mut t = ApiTally {
                    ok: 0,
                    statuses: BTreeMap::new(),
                    lat: Vec::new(),
                };
                let mut conn: Option<Http> = None;
                while Instant::now() < deadline {
                    let http = match conn.take() {
                        Some(h) => h,
                        None => match Http::connect(&base).await {
                            Ok(h) => h,
                            Err(e) => {
                                *t.statuses.entry(short_error(&e)).or_default() += 1;
                                sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let t0 = Instant::now();
                    let (http, r) = call(http).await;
                    match r {
                        Ok(s) if s == http::StatusCode::OK => {
                            t.ok += 1;
                            t.lat
                                .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            conn = Some(http);
                        }
                        Ok(s) => {
                            *t.statuses.entry(s.as_u16().to_string()).or_default() += 1;
                            conn = Some(http);
                        }
                        Err(e) => {
                            // Reconnect after a transport error.
                            *t.statuses.entry(short_error(&e)).or_default() += 1;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut all = ApiTally {
        ok: 0,
        statuses: BTreeMap::new(),
        lat: Vec::new(),
    };
    for task in tasks {
        if let Ok(t) = task.await {
            all.ok += t.ok;
            all.lat.extend(t.lat);
            for (k, v) in t.statuses {
                *all.statuses.entry(k).or_default() += v;
            }
        }
    }
    all.lat.sort_unstable();
    all
}

async fn login_bench(a: LoginArgs) -> Result<()> {
    // Fail fast on wrong credentials instead of tripping the rate limiter.
    login_once(&a.base, &a.user, &a.password).await?;
    let body = Bytes::from(login_body(&a.user, &a.password));
    let rss_before = rss_kib(&a.pids).ok();
    let started = Instant::now();
    let t = api_loop(&a.base, a.concurrency, secs(a.secs), move |mut http| {
        let body = body.clone();
        async move {
            let r = http
                .call(
                    http::Method::POST,
                    "/api/auth/login",
                    None,
                    Some(body.to_vec()),
                )
                .await
                .map(|(s, _)| s);
            (http, r)
        }
    })
    .await;
    let rss = rss_before.zip(rss_kib(&a.pids).ok());
    api_emit("login", &a.label, a.run, a.concurrency, started, t, rss);
    Ok(())
}

async fn verify_bench(a: VerifyArgs) -> Result<()> {
    let (token, sid) = match (a.token, a.session) {
        (Some(t), Some(s)) => (t, s),
        _ => login_once(&a.base, &a.user, &a.password).await?,
    };
    let path: Arc<str> = format!("/api/session/{sid}").into();
    let token: Arc<str> = token.into();
    let rss_before = rss_kib(&a.pids).ok();
    let started = Instant::now();
    let t = api_loop(&a.base, a.concurrency, secs(a.secs), move |mut http| {
        let (path, token) = (path.clone(), token.clone());
        async move {
            let r = http
                .call(http::Method::GET, &path, Some(&token), None)
                .await
                .map(|(s, _)| s);
            (http, r)
        }
    })
    .await;
    let rss = rss_before.zip(rss_kib(&a.pids).ok());
    api_emit("verify", &a.label, a.run, a.concurrency, started, t, rss);
    Ok(())
}

fn api_emit(
    bench: &str,
    label: &str,
    run: u32,
    concurrency: usize,
    started: Instant,
    t: ApiTally,
    rss: Option<(u64, u64)>,
) {
    let elapsed = started.elapsed().as_secs_f64();
    let rate = t.ok as f64 / elapsed;
    let (p50, p99) = (percentile(&t.lat, 0.5), percentile(&t.lat, 0.99));
    let n_err: u64 = t.statuses.values().sum();
    let mut v = json!({"bench": bench, "target": label, "run": run, "concurrency": concurrency,
               "per_sec": round1(rate), "ok": t.ok, "p50_us": p50, "p99_us": p99,
               "errors": n_err, "error_kinds": t.statuses, "secs": round1(elapsed)});
    let mut rss_note = String::new();
    if let Some((before, after)) = rss {
        v["rss_before_kib"] = json!(before);
        v["rss_after_kib"] = json!(after);
        rss_note = format!(", gateway RSS {before} -> {after} KiB");
    }
    emit(
        v,
        format!(
            "{bench} {label}: {rate:.0}/s ({} ok in {elapsed:.2} s, concurrency {concurrency}, p50 {p50} µs, p99 {p99} µs, {n_err} errors {:?}{rss_note})",
            t.ok, t.statuses
        ),
    );
}

// ---------------------------------------------------------------- helpers

fn free_ports(count: usize) -> Result<()> {
    // Hold every listener until all are chosen so the ports are distinct.
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    for l in &listeners {
        println!("{}", l.local_addr()?.port());
    }
    Ok(())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// One row of the comparison table: a figure read from a bench's JSON.
struct Figure {
    title: &'static str,
    bench: &'static str,
    field: &'static str,
}

const FIGURES: &[Figure] = &[
    Figure {
        title: "round-trip msgs/s (rtt)",
        bench: "rtt",
        field: "msgs_per_sec",
    },
    Figure {
        title: "round-trip p50 µs",
        bench: "rtt",
        field: "p50_us",
    },
    Figure {
        title: "round-trip p99 µs",
        bench: "rtt",
        field: "p99_us",
    },
    Figure {
        title: "streaming msgs/s (stream)",
        bench: "stream",
        field: "msgs_per_sec",
    },
    Figure {
        title: "proxy CPU µs per round trip (rtt)",
        bench: "rtt",
        field: "cpu_us_per_msg",
    },
    Figure {
        title: "proxy CPU µs per echoed message (stream)",
        bench: "stream",
        field: "cpu_us_per_msg",
    },
    Figure {
        title: "upgrades/s (churn)",
        bench: "churn",
        field: "upgrades_per_sec",
    },
    Figure {
        title: "upgrade p99 µs (churn)",
        bench: "churn",
        field: "upgrade_p99_us",
    },
    Figure {
        title: "proxy CPU µs per upgrade (churn)",
        bench: "churn",
        field: "cpu_us_per_upgrade",
    },
    Figure {
        title: "machine CPU µs per round trip (rtt)",
        bench: "rtt",
        field: "machine_cpu_us_per_msg",
    },
    Figure {
        title: "machine CPU µs per echoed message (stream)",
        bench: "stream",
        field: "machine_cpu_us_per_msg",
    },
    Figure {
        title: "machine CPU µs per upgrade (churn)",
        bench: "churn",
        field: "machine_cpu_us_per_upgrade",
    },
    Figure {
        title: "churn errors (sum over runs)",
        bench: "churn",
        field: "errors",
    },
    Figure {
        title: "RSS KiB per idle connection (hold)",
        bench: "hold",
        field: "kib_per_conn",
    },
    Figure {
        title: "echo RSS KiB per connection behind it (hold)",
        bench: "hold",
        field: "upstream_kib_per_conn",
    },
    Figure {
        title: "proxy CPU % with all sockets idle (hold)",
        bench: "hold",
        field: "idle_cpu_pct",
    },
];

const TARGETS: &[&str] = &["direct", "nginx", "haproxy", "portcullis"];

fn report(files: &[PathBuf]) -> Result<()> {
    // (bench, target, field) -> values over runs
    let mut values: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for line in text.lines().filter(|l| l.starts_with('{')) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let (Some(bench), Some(target), Some(obj)) =
                (v["bench"].as_str(), v["target"].as_str(), v.as_object())
            else {
                continue;
            };
            for (k, x) in obj {
                if let Some(x) = x.as_f64() {
                    values
                        .entry((bench.into(), target.into(), k.clone()))
                        .or_default()
                        .push(x);
                }
            }
        }
    }
    let cell = |bench: &str, target: &str, field: &str| -> Option<(f64, f64, f64, usize)> {
        let mut v = values
            .get(&(bench.into(), target.into(), field.into()))?
            .clone();
        let n = v.len();
        let sum = v.iter().sum::<f64>();
        let m = if field == "errors" {
            sum
        } else {
            median(&mut v)?
        };
        Some((m, v[0], v[n - 1], n))
    };
    let fmt = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    let mut main_rows = Vec::new();
    let mut spread = Vec::new();
    for f in FIGURES {
        let cells: Vec<Option<(f64, f64, f64, usize)>> =
            TARGETS.iter().map(|t| cell(f.bench, t, f.field)).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let show = |c: &Option<(f64, f64, f64, usize)>| c.map_or("–".into(), |c| fmt(c.0));
        let ratio =
            |a: &Option<(f64, f64, f64, usize)>, b: &Option<(f64, f64, f64, usize)>| match (a, b) {
                (Some(a), Some(b)) if b.0 != 0.0 => format!("{:.2}x", a.0 / b.0),
                _ => "–".into(),
            };
        main_rows.push(format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            f.title,
            show(&cells[0]),
            show(&cells[1]),
            show(&cells[2]),
            show(&cells[3]),
            ratio(&cells[3], &cells[1]),
            ratio(&cells[3], &cells[2]),
        ));
        if f.field != "errors" {
            let range = |c: &Option<(f64, f64, f64, usize)>| {
                c.map_or("–".into(), |c| {
                    format!("{}–{} (n={})", fmt(c.1), fmt(c.2), c.3)
                })
            };
            spread.push(format!(
                "| {} | {} | {} | {} | {} |",
                f.title,
                range(&cells[0]),
                range(&cells[1]),
                range(&cells[2]),
                range(&cells[3])
            ));
        }
    }
    if !main_rows.is_empty() {
        println!(
            "| figure | direct | nginx | haproxy | portcullis | portcullis/nginx | portcullis/haproxy |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for row in main_rows {
            println!("{row}");
        }
        println!();
        println!("Spread over runs (min–max):");
        println!();
        println!("| figure | direct | nginx | haproxy | portcullis |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for row in spread {
            println!("{row}");
        }
    }
    let api: Vec<(&str, &str)> = vec![
        ("login", "logins/s (POST /api/auth/login)"),
        ("verify", "session checks/s (GET /api/session/{id})"),
    ];
    let mut rows = Vec::new();
    for (bench, title) in api {
        let Some(rate) = cell(bench, "portcullis", "per_sec") else {
            continue;
        };
        let p50 = cell(bench, "portcullis", "p50_us").map_or(0.0, |c| c.0);
        let p99 = cell(bench, "portcullis", "p99_us").map_or(0.0, |c| c.0);
        let errs = cell(bench, "portcullis", "errors").map_or(0.0, |c| c.0);
        let conc = cell(bench, "portcullis", "concurrency").map_or(0.0, |c| c.0);
        // Lowest before and highest after over the runs: memory that a
        // burst makes the process keep shows up once, in the first run.
        let mib = |f: &str, highest: bool| {
            cell(bench, "portcullis", f).map_or("–".to_string(), |c| {
                format!("{:.0}", if highest { c.2 } else { c.1 } / 1024.0)
            })
        };
        rows.push(format!(
            "| {title} | {conc:.0} | {} | {} | {} | {errs:.0} | {} → {} |",
            fmt(rate.0),
            fmt(p50),
            fmt(p99),
            mib("rss_before_kib", false),
            mib("rss_after_kib", true)
        ));
    }
    if !rows.is_empty() {
        println!();
        println!(
            "| Portcullis on Redis | concurrency | per second | p50 µs | p99 µs | errors | gateway RSS MiB (lowest before → highest after) |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in rows {
            println!("{r}");
        }
    }
    Ok(())
}

// ------------------------------------------------------- shared sessions

/// Connects and returns the socket with its `Portcullis-Seq`.
async fn ws_connect_seq(url: &str, token: &str) -> Result<(Ws, u64)> {
    let mut req = url.into_client_request().context("bad --url")?;
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let (ws, resp) = timeout(CONNECT_TIMEOUT, ws_handshake(req))
        .await
        .map_err(|_| anyhow!("upgrade timed out"))??;
    let seq = resp
        .headers()
        .get("portcullis-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no Portcullis-Seq: is --url a shared route?"))?;
    Ok((ws, seq))
}

/// What every viewport of a fan-out received.
struct Delivery {
    /// Binary frames received, all viewports together.
    delivered: usize,
    /// Viewports that got fewer than asked for by the deadline.
    short: usize,
    /// The sockets, still open, for the caller to close after measuring.
    open: Vec<Ws>,
}

/// Reads up to `frames` binary messages on every socket at once (one task
/// each), until each has them all, closes, fails, or `deadline` passes.
async fn receive_binaries(socks: Vec<Ws>, frames: usize, deadline: Instant) -> Result<Delivery> {
    let tasks: Vec<_> = socks
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = 0usize;
                while got < frames {
                    match timeout_at_or(deadline, ws.next()).await {
                        Some(Some(Ok(Message::Binary(_)))) => got += 1,
                        Some(Some(Ok(Message::Close(_)))) => break,
                        Some(Some(Ok(_))) => {}
                        _ => break,
                    }
                }
                (got, ws)
            })
        })
        .collect();
    let mut d = Delivery {
        delivered: 0,
        short: 0,
        open: Vec::new(),
    };
    for t in tasks {
        let (got, ws) = t.await?;
        d.delivered += got;
        d.short += usize::from(got < frames);
        d.open.push(ws);
    }
    Ok(d)
}

async fn fanout(a: FanoutArgs) -> Result<()> {
    let token = target_token(&a.target)
        .await?
        .ok_or_else(|| anyhow!("fanout needs --token-url"))?;
    let rss0 = if a.pid.is_empty() {
        0
    } else {
        settled_rss(&a.pid, Duration::from_secs(3)).await?
    };
    let mut socks = Vec::with_capacity(a.viewports);
    for _ in 0..a.viewports.max(1) {
        socks.push(ws_connect_seq(&a.target.url, &token).await?.0);
    }
    let rss1 = if a.pid.is_empty() {
        0
    } else {
        settled_rss(&a.pid, Duration::from_secs(3)).await?
    };
    let started = Instant::now();
    socks[0]
        .send(Message::text(format!("stream:{}:{}", a.frames, a.size)))
        .await?;
    let deadline = started + Duration::from_secs(60);
    let Delivery {
        delivered,
        short,
        open,
    } = receive_binaries(socks, a.frames, deadline).await?;
    let secs = started.elapsed().as_secs_f64();
    for ws in open {
        ws_close(ws).await;
    }
    let per_viewport_kib = (rss1 as f64 - rss0 as f64) / a.viewports.max(1) as f64;
    let rate = delivered as f64 / secs;
    emit(
        json!({
            "bench": "fanout", "target": a.target.label, "run": a.target.run,
            "viewports": a.viewports, "frames": a.frames, "size": a.size,
            "delivered": delivered, "short_viewports": short, "secs": round1(secs),
            "frames_per_sec": round1(rate),
            "rss_kib_per_viewport": if a.pid.is_empty() { Value::Null } else { json!(round1(per_viewport_kib)) },
        }),
        format!(
            "# fanout {}: {} viewports x {} frames of {} B: {:.0} frames/s delivered ({} short), {} KiB RSS per idle viewport",
            a.target.label,
            a.viewports,
            a.frames,
            a.size,
            rate,
            short,
            if a.pid.is_empty() {
                "-".to_string()
            } else {
                format!("{per_viewport_kib:.1}")
            }
        ),
    );
    Ok(())
}

async fn resume_bench(a: ResumeArgs) -> Result<()> {
    let token = target_token(&a.target)
        .await?
        .ok_or_else(|| anyhow!("resume needs --token-url"))?;
    let (mut ws, seq) = ws_connect_seq(&a.target.url, &token).await?;
    let mut next = seq;
    let sep = if a.target.url.contains('?') { '&' } else { '?' };
    let mut lat = Vec::with_capacity(a.iterations);
    for _ in 0..a.iterations {
        // A frame is on its way (or already in the ring) as we detach.
        ws.send(Message::text("stream:1:64")).await?;
        ws_close(ws).await;
        let t0 = Instant::now();
        let url = format!("{}{sep}resume_from={next}", a.target.url);
        let (mut again, from) = ws_connect_seq(&url, &token).await?;
        anyhow::ensure!(from == next, "resumed at {from}, expected {next} (gap?)");
        loop {
            match timeout(CONNECT_TIMEOUT, again.next()).await {
                Ok(Some(Ok(Message::Binary(_)))) => break,
                Ok(Some(Ok(_))) => continue,
                other => return Err(anyhow!("no replayed frame: {other:?}")),
            }
        }
        lat.push(t0.elapsed().as_micros() as u32);
        next += 1;
        ws = again;
    }
    ws_close(ws).await;
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    emit(
        json!({"bench": "resume", "target": a.target.label, "run": a.target.run,
               "iterations": a.iterations, "p50_us": p50, "p99_us": p99}),
        format!(
            "# resume {}: reattach with resume_from to first replayed frame, p50 {p50} µs, p99 {p99} µs over {} reattaches",
            a.target.label, a.iterations
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
