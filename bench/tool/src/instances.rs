//! `instances`: shared sessions across gateways (SPEC §8, issue 11). Each
//! workload talks to two or more gateways on one Redis with the same shared
//! route, and reports what a viewport on another instance than the hub's
//! costs:
//!
//! - `latency`: one session, the owner and a reader on the hub's instance
//!   (A), a reader on B; the owner sends a 64-byte message, the runtime
//!   echoes it, and the time until each reader has it is recorded.
//! - `fanout`: one session, N viewports spread round-robin over every
//!   gateway; the runtime streams frames; delivered frames/s, Redis
//!   commands and Redis CPU per runtime frame, gateways' CPU per delivered
//!   frame.
//! - `memory`: K sessions, each with its hub and a viewport on A and one
//!   viewport on B: RSS per remote viewport on B (its share of the mirror
//!   included), beside RSS per hub + local viewport on A.
//! - `failover`: the hub's instance is SIGKILLed; time until a viewport on
//!   B has the first frame of the new hub, and the close code B's reader got.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::idle_store::{commands_processed, sessions};
use crate::{
    CONNECT_TIMEOUT, REPLY_TIMEOUT, Ws, cpu_ms, emit, login_once, percentile, round1, settled_rss,
    ws_close, ws_connect_seq,
};
use crate::{Delivery, receive_binaries};

#[derive(Subcommand)]
pub enum InstancesCmd {
    Latency(LatencyArgs),
    Fanout(FanoutArgs),
    Memory(MemoryArgs),
    Failover(FailoverArgs),
}

/// Gateways and the login every workload uses.
#[derive(Args, Clone)]
pub struct Gateways {
    /// Gateway base URLs (http://127.0.0.1:PORT), comma-separated; the
    /// first is where each session's first viewport lands (its hub).
    #[arg(long, value_delimiter = ',', required = true)]
    bases: Vec<String>,
    /// WebSocket path of a `mode = "shared"` route on every gateway.
    #[arg(long, default_value = "/ws/agent")]
    path: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
}

impl Gateways {
    fn ws_url(&self, i: usize, query: &str) -> String {
        let base = &self.bases[i % self.bases.len()];
        format!(
            "{}{}{query}",
            base.replacen("http://", "ws://", 1),
            self.path
        )
    }
}

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    gw: Gateways,
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
}

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    gw: Gateways,
    #[arg(long, default_value_t = 100)]
    viewports: usize,
    #[arg(long, default_value_t = 20_000)]
    frames: usize,
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// The gateways' Redis, host:port, for `INFO stats`.
    #[arg(long)]
    redis: String,
    #[arg(long = "gateway-pid")]
    gateway_pids: Vec<u32>,
    #[arg(long = "redis-pid")]
    redis_pids: Vec<u32>,
}

#[derive(Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    gw: Gateways,
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Process of the hub's gateway (the first base).
    #[arg(long)]
    hub_pid: u32,
    /// Process of the remote gateway (the second base).
    #[arg(long)]
    remote_pid: u32,
}

#[derive(Args)]
pub struct FailoverArgs {
    #[command(flatten)]
    gw: Gateways,
    /// Process of the first base's gateway, SIGKILLed by this workload.
    #[arg(long)]
    kill_pid: i32,
}

pub async fn run(cmd: InstancesCmd) -> Result<()> {
    match cmd {
        InstancesCmd::Latency(a) => latency(a).await,
        InstancesCmd::Fanout(a) => fanout(a).await,
        InstancesCmd::Memory(a) => memory(a).await,
        InstancesCmd::Failover(a) => failover(a).await,
    }
}

/// The next binary message on `ws`, skipping anything else.
async fn next_binary(ws: &mut Ws) -> Result<()> {
    loop {
        match timeout(REPLY_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(_)))) => return Ok(()),
            Ok(Some(Ok(Message::Close(f)))) => bail!("closed: {f:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("socket error: {e}"),
            Ok(None) => bail!("socket ended"),
            Err(_) => bail!("no frame within {REPLY_TIMEOUT:?}"),
        }
    }
}

async fn latency(a: LatencyArgs) -> Result<()> {
    let gw = &a.gw;
    anyhow::ensure!(gw.bases.len() >= 2, "latency needs two --bases");
    let (token, _) = login_once(&gw.bases[0], &gw.user, &gw.password).await?;
    let (mut owner, _) = ws_connect_seq(&gw.ws_url(0, ""), &token).await?;
    let (mut local, _) = ws_connect_seq(&gw.ws_url(0, ""), &token).await?;
    let (mut remote, _) = ws_connect_seq(&gw.ws_url(1, ""), &token).await?;
    let payload = vec![0x42u8; 64];
    let (mut t_local, mut t_remote) = (Vec::new(), Vec::new());
    for i in 0..a.iterations + 20 {
        let t0 = Instant::now();
        owner.send(Message::binary(payload.clone())).await?;
        let (l, r, o) = tokio::join!(
            async {
                next_binary(&mut local).await?;
                anyhow::Ok(t0.elapsed())
            },
            async {
                next_binary(&mut remote).await?;
                anyhow::Ok(t0.elapsed())
            },
            next_binary(&mut owner),
        );
        o?;
        // The first 20 warm the connections up.
        if i >= 20 {
            t_local.push(l?.as_micros() as u32);
            t_remote.push(r?.as_micros() as u32);
        }
    }
    for ws in [owner, local, remote] {
        ws_close(ws).await;
    }
    t_local.sort_unstable();
    t_remote.sort_unstable();
    let (l50, l99) = (percentile(&t_local, 0.5), percentile(&t_local, 0.99));
    let (r50, r99) = (percentile(&t_remote, 0.5), percentile(&t_remote, 0.99));
    emit(
        json!({"bench": "instances_latency", "iterations": a.iterations,
               "local_p50_us": l50, "local_p99_us": l99,
               "remote_p50_us": r50, "remote_p99_us": r99,
               "added_p50_us": r50 as i64 - l50 as i64, "added_p99_us": r99 as i64 - l99 as i64}),
        format!(
            "instances latency: owner send -> runtime echo -> reader, local p50 {l50} µs p99 {l99} µs, remote p50 {r50} µs p99 {r99} µs (added p50 {} µs, p99 {} µs) over {} messages",
            r50 as i64 - l50 as i64,
            r99 as i64 - l99 as i64,
            a.iterations
        ),
    );
    Ok(())
}

async fn fanout(a: FanoutArgs) -> Result<()> {
    let gw = &a.gw;
    let (token, _) = login_once(&gw.bases[0], &gw.user, &gw.password).await?;
    let mut socks = Vec::with_capacity(a.viewports);
    for i in 0..a.viewports.max(1) {
        socks.push(ws_connect_seq(&gw.ws_url(i, ""), &token).await?.0);
    }
    let before = commands_processed(&a.redis).await?;
    let (gw0, redis0) = (cpu_ms(&a.gateway_pids), cpu_ms(&a.redis_pids));
    let started = Instant::now();
    socks[0]
        .send(Message::text(format!("stream:{}:{}", a.frames, a.size)))
        .await?;
    let deadline = started + Duration::from_secs(120);
    let Delivery {
        delivered,
        short,
        open,
    } = receive_binaries(socks, a.frames, deadline).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = commands_processed(&a.redis).await?;
    let (gw1, redis1) = (cpu_ms(&a.gateway_pids), cpu_ms(&a.redis_pids));
    for ws in open {
        ws_close(ws).await;
    }
    // Commands while the viewports were attached include the first INFO
    // only; attaches happened before it.
    let commands = after.saturating_sub(before).saturating_sub(1);
    let per_frame = commands as f64 / a.frames as f64;
    let redis_us = (redis1.saturating_sub(redis0)) as f64 * 1000.0 / a.frames as f64;
    let gw_us = (gw1.saturating_sub(gw0)) as f64 * 1000.0 / delivered.max(1) as f64;
    let rate = delivered as f64 / secs;
    emit(
        json!({"bench": "instances_fanout", "gateways": gw.bases.len(), "viewports": a.viewports,
               "frames": a.frames, "size": a.size, "delivered": delivered, "short_viewports": short,
               "secs": round1(secs), "frames_per_sec": round1(rate),
               "redis_commands": commands, "redis_commands_per_runtime_frame": per_frame,
               "redis_cpu_us_per_runtime_frame": round1(redis_us),
               "gateways_cpu_us_per_delivered_frame": round1(gw_us)}),
        format!(
            "instances fanout: {} viewports over {} gateways x {} frames of {} B: {:.0} frames/s delivered ({} short); Redis {:.3} commands and {:.1} µs CPU per runtime frame; gateways {:.2} µs CPU per delivered frame",
            a.viewports,
            gw.bases.len(),
            a.frames,
            a.size,
            rate,
            short,
            per_frame,
            redis_us,
            gw_us
        ),
    );
    Ok(())
}

async fn memory(a: MemoryArgs) -> Result<()> {
    let gw = &a.gw;
    anyhow::ensure!(gw.bases.len() >= 2, "memory needs two --bases");
    let (token, _) = login_once(&gw.bases[0], &gw.user, &gw.password).await?;
    let tokens = sessions(&gw.bases[0], &token, a.sessions).await?;
    let settle = Duration::from_secs(5);
    let (hub0, remote0) = (
        settled_rss(&[a.hub_pid], settle).await?,
        settled_rss(&[a.remote_pid], settle).await?,
    );
    let mut held = Vec::with_capacity(2 * tokens.len());
    let (url_a, url_b) = (gw.ws_url(0, ""), gw.ws_url(1, ""));
    let opened: Vec<Result<(Ws, Ws)>> = futures_util::stream::iter(&tokens)
        .map(|t| {
            let (url_a, url_b) = (url_a.clone(), url_b.clone());
            async move {
                let (on_a, _) = timeout(CONNECT_TIMEOUT * 2, ws_connect_seq(&url_a, t))
                    .await
                    .map_err(|_| anyhow!("upgrade timed out"))??;
                let (on_b, _) = timeout(CONNECT_TIMEOUT * 2, ws_connect_seq(&url_b, t))
                    .await
                    .map_err(|_| anyhow!("upgrade timed out"))??;
                anyhow::Ok((on_a, on_b))
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    for pair in opened {
        let (x, y) = pair?;
        held.push(x);
        held.push(y);
    }
    let (hub1, remote1) = (
        settled_rss(&[a.hub_pid], settle).await?,
        settled_rss(&[a.remote_pid], settle).await?,
    );
    let n = tokens.len() as f64;
    let per_remote = (remote1 as f64 - remote0 as f64) / n;
    let per_hub = (hub1 as f64 - hub0 as f64) / n;
    // Readers keep answering pings while the RSS settles.
    drop(held);
    emit(
        json!({"bench": "instances_memory", "sessions": a.sessions,
               "remote_kib_per_viewport": round1(per_remote), "hub_kib_per_session": round1(per_hub)}),
        format!(
            "instances memory: {} sessions, each a hub + viewport on A and a viewport on B: B (remote viewport and its mirror) {per_remote:.1} KiB each; A (hub, runtime socket, local viewport) {per_hub:.1} KiB each",
            a.sessions
        ),
    );
    Ok(())
}

async fn failover(a: FailoverArgs) -> Result<()> {
    let gw = &a.gw;
    anyhow::ensure!(gw.bases.len() >= 2, "failover needs two --bases");
    // Log in on B: the session must outlive A.
    let (token, _) = login_once(&gw.bases[1], &gw.user, &gw.password).await?;
    let (mut owner, _) = ws_connect_seq(&gw.ws_url(0, ""), &token).await?;
    let (mut reader, _) = ws_connect_seq(&gw.ws_url(1, ""), &token).await?;
    owner.send(Message::binary(vec![1u8; 64])).await?;
    next_binary(&mut owner).await?;
    next_binary(&mut reader).await?;
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(a.kill_pid.to_string())
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -KILL {} failed", a.kill_pid);
    let code = loop {
        match timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => break None,
        }
    };
    let closed_after = killed.elapsed();
    // Reconnect (as a client with backoff would, here every 50 ms) until a
    // frame from the new hub arrives.
    let recovered = loop {
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(30),
            "no working viewport on B within 30 s"
        );
        if let Ok((mut ws, _)) = ws_connect_seq(&gw.ws_url(1, ""), &token).await {
            if ws.send(Message::binary(vec![2u8; 64])).await.is_ok()
                && next_binary(&mut ws).await.is_ok()
            {
                let t = killed.elapsed();
                ws_close(ws).await;
                break t;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    emit(
        json!({"bench": "instances_failover", "close_code": code,
               "closed_ms": closed_after.as_millis() as u64, "recovered_ms": recovered.as_millis() as u64}),
        format!(
            "instances failover: hub instance SIGKILLed; B's reader closed {code:?} after {} ms; first frame through a new hub on B after {} ms",
            closed_after.as_millis(),
            recovered.as_millis()
        ),
    );
    Ok(())
}
