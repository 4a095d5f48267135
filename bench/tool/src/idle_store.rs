//! `idle-store`: what idle sockets cost the session store. Opens N idle
//! proxied sockets, each in its own session, and reads Redis's own command
//! counter (`INFO stats`, `total_commands_processed`) over a window, for
//! several N in one run: the store's load per idle socket, and whether it
//! grows with the number of sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::{CONNECT_TIMEOUT, Http, REPLY_TIMEOUT, cpu_ms, emit, login_once, round1, ws_connect};

#[derive(Args)]
pub struct IdleStoreArgs {
    /// Gateway base URL (http://127.0.0.1:PORT).
    #[arg(long)]
    base: String,
    /// WebSocket path of an exclusive route on the gateway.
    #[arg(long, default_value = "/ws/echo")]
    path: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// The gateway's Redis, host:port (plain RESP, no auth).
    #[arg(long)]
    redis: String,
    /// Socket counts to measure, ascending; sockets are kept open from one
    /// level to the next.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,9000")]
    counts: Vec<usize>,
    /// Measured window per level.
    #[arg(long, default_value_t = 20.0)]
    window_secs: f64,
    /// Wait after the last socket of a level opened, before measuring (the
    /// upgrades' own store calls must not count as idle load).
    #[arg(long, default_value_t = 5.0)]
    settle_secs: f64,
    /// The gateway process, for its CPU over the window.
    #[arg(long = "gateway-pid")]
    gateway_pids: Vec<u32>,
    /// The Redis process, for its CPU over the window.
    #[arg(long = "redis-pid")]
    redis_pids: Vec<u32>,
}

/// Redis's `total_commands_processed`, read over a fresh connection with
/// one inline `INFO stats` (which itself counts as one command).
pub(crate) async fn commands_processed(addr: &str) -> Result<u64> {
    let read = async {
        let stream = TcpStream::connect(addr).await?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(b"INFO stats\r\n").await?;
        let mut header = String::new();
        stream.read_line(&mut header).await?;
        let len: usize = header
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("unexpected INFO reply {header:?}"))?;
        let mut body = vec![0; len + 2];
        stream.read_exact(&mut body).await?;
        let text = String::from_utf8_lossy(&body);
        text.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no total_commands_processed in INFO stats"))
    };
    timeout(REPLY_TIMEOUT, read)
        .await
        .map_err(|_| anyhow!("INFO timed out"))?
}

/// `n` session tokens of one user, from `POST /api/session/create` over a
/// few keep-alive connections (no password hashing per session).
pub(crate) async fn sessions(base: &str, token: &str, n: usize) -> Result<Vec<String>> {
    const CONNECTIONS: usize = 4;
    let per = n.div_ceil(CONNECTIONS);
    let batches = futures_util::future::try_join_all((0..CONNECTIONS).map(|c| async move {
        let mut http = Http::connect(base).await?;
        let mut out = Vec::new();
        for _ in (c * per)..((c + 1) * per).min(n) {
            let (status, body) = http
                .call(http::Method::POST, "/api/session/create", Some(token), None)
                .await?;
            if status != http::StatusCode::OK {
                bail!(
                    "session/create answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            let v: Value = serde_json::from_slice(&body)?;
            out.push(
                v["session_token"]
                    .as_str()
                    .context("no session_token")?
                    .to_string(),
            );
        }
        anyhow::Ok(out)
    }))
    .await?;
    Ok(batches.into_iter().flatten().collect())
}

pub async fn idle_store(a: IdleStoreArgs) -> Result<()> {
    let mut counts = a.counts.clone();
    counts.sort_unstable();
    let max = *counts.last().context("--counts is empty")?;
    let (token, _) = login_once(&a.base, &a.user, &a.password).await?;
    let tokens = sessions(&a.base, &token, max).await?;
    let url = format!("{}{}", a.base.replacen("http://", "ws://", 1), a.path);
    // Each socket gets a reader task: it answers the gateway's keep-alive
    // pings (an unread socket would be dropped as dead) and counts a close.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut open = 0;
    for &count in &counts {
        let opened: Vec<Result<()>> = futures_util::stream::iter(&tokens[open..count])
            .map(|t| {
                let url = url.clone();
                let closed = closed.clone();
                async move {
                    let mut ws = timeout(CONNECT_TIMEOUT * 2, ws_connect(&url, Some(t)))
                        .await
                        .map_err(|_| anyhow!("upgrade timed out"))??;
                    tokio::spawn(async move {
                        while let Some(Ok(_)) = ws.next().await {}
                        closed.fetch_add(1, Ordering::Relaxed);
                    });
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(100)
            .collect()
            .await;
        opened.into_iter().collect::<Result<Vec<()>>>()?;
        open = count;
        sleep(Duration::from_secs_f64(a.settle_secs.clamp(0.0, 600.0))).await;

        let window = Duration::from_secs_f64(a.window_secs.clamp(1.0, 3600.0));
        let before = commands_processed(&a.redis).await?;
        let (gw0, redis0) = (cpu_ms(&a.gateway_pids), cpu_ms(&a.redis_pids));
        let started = Instant::now();
        sleep(window).await;
        let wall = started.elapsed().as_secs_f64();
        let after = commands_processed(&a.redis).await?;
        let (gw1, redis1) = (cpu_ms(&a.gateway_pids), cpu_ms(&a.redis_pids));
        let lost = closed.load(Ordering::Relaxed);
        if lost > 0 {
            bail!("{lost} idle sockets were closed during the run");
        }
        // The first INFO is inside the window; the second is not yet counted.
        let commands = after.saturating_sub(before).saturating_sub(1);
        let per_sec = commands as f64 / wall;
        let per_socket = per_sec / count as f64;
        let redis_cpu = (redis1.saturating_sub(redis0)) as f64 / wall;
        let gw_cpu = (gw1.saturating_sub(gw0)) as f64 / wall;
        emit(
            json!({
                "bench": "idle_store",
                "sockets": count,
                "window_secs": round1(wall),
                "redis_commands": commands,
                "redis_commands_per_sec": round1(per_sec),
                "commands_per_socket_per_sec": per_socket,
                "redis_cpu_ms_per_sec": round1(redis_cpu),
                "gateway_cpu_ms_per_sec": round1(gw_cpu),
            }),
            format!(
                "idle-store: {count} idle sockets in {count} sessions: {commands} Redis commands in {wall:.1} s = {per_sec:.2}/s, {per_socket:.5} per socket per second; Redis CPU {redis_cpu:.1} ms/s, gateway CPU {gw_cpu:.1} ms/s"
            ),
        );
    }
    Ok(())
}
