//! The accept loop and one hyper connection per accepted socket.
//!
//! A permit is taken *before* `accept()` so the process never holds more
//! sockets than it is configured for; accept errors (e.g. out of file
//! descriptors) back off instead of ending the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::app::{App, Running};
use crate::maintenance::Maintenance;
use crate::session::SessionStore;

/// Largest request head accepted; bigger heads get hyper's bare `431`.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// TCP connections allowed beyond `max_connections` WebSockets, so the API
/// and probes still answer while the gateway is full of sockets.
pub const HTTP_HEADROOM: usize = 1024;

/// Serves `listener` until shutdown begins, then stops accepting and
/// asks every HTTP connection to finish; socket tasks watch the same signal.
///
/// The TCP limit below is `max_connections` as it was when this loop began
/// (a reload changes the WebSocket limit, not this headroom).
pub async fn run(listener: TcpListener, running: Arc<Running>) {
    let app = running.current();
    let limit = Arc::new(Semaphore::new(
        app.config.server.max_connections as usize + HTTP_HEADROOM,
    ));
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = app.sockets.shutdown().begun() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = app.sockets.shutdown().begun() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let running = running.clone();
                app.sockets.shutdown().spawn(async move {
                    serve_connection(running, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = app.sockets.shutdown().begun() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    tracing::info!("stopped accepting connections");
}

async fn serve_connection(running: Arc<Running>, stream: TcpStream, peer: SocketAddr) {
    // Small frames are the common case; Nagle would add up to 40 ms to each.
    let _ = stream.set_nodelay(true);
    let app = running.current();
    let Some(tls) = app.tls.clone() else {
        return serve_http(running, app, TokioIo::new(stream), peer).await;
    };
    // The TLS handshake counts against the same slowloris deadline as the
    // request head; the gate finds the client's socket by this exact type
    // (`TokioIo<tokio_rustls::server::TlsStream<TcpStream>>`).
    let deadline = Duration::from_millis(app.config.server.handshake_timeout_ms);
    let accepted = tokio::select! {
        a = tokio::time::timeout(deadline, tls.acceptor.accept(stream)) => a,
        _ = app.sockets.shutdown().begun() => return,
    };
    match accepted {
        Ok(Ok(tls_stream)) => serve_http(running, app, TokioIo::new(tls_stream), peer).await,
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// One HTTP/1.1 connection (plain or TLS) until it ends or hands its
/// socket to the gate.
async fn serve_http<I>(running: Arc<Running>, app: Arc<App>, io: TokioIo<I>, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::service_fn(move |req| {
        // One snapshot per request: a reload in between applies to the next
        // request on this keep-alive connection, never to half of one.
        let app = running.current();
        async move { Ok::<_, Infallible>(crate::http::handle(app, req, peer).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.handshake_timeout_ms,
        ))
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        }
        _ = app.sockets.shutdown().begun() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Reloads the config on every SIGHUP until the process ends (never
/// returns). Each outcome is logged once and counted in
/// `portcullis_config_reloads_total{result}`.
async fn reload_on_hangup(running: &Arc<Running>) {
    #[cfg(unix)]
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install a SIGHUP handler; reload is off");
                return std::future::pending().await;
            }
        };
        while hup.recv().await.is_some() {
            reload_once(running).await;
        }
    }
    std::future::pending::<()>().await
}

async fn reload_once(running: &Arc<Running>) {
    let started = std::time::Instant::now();
    let result = running.reload().await;
    let app = running.current();
    let label = if result.is_ok() { "ok" } else { "invalid" };
    app.metrics
        .config_reloads
        .get_or_create(&crate::telemetry::ResultLabel { result: label })
        .inc();
    match result {
        Ok(r) => {
            for w in &r.warnings {
                tracing::warn!("{w}");
            }
            if !r.restart_only.is_empty() {
                tracing::warn!(
                    keys = ?r.restart_only,
                    "config reload: these settings changed but keep their running values until a restart"
                );
            }
            tracing::info!(
                hash = %r.hash,
                routes = r.routes,
                open_sockets = app.sockets.registry().open(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "config reloaded"
            );
        }
        // The message is what `portcullis check` prints for the same file.
        Err(e) => tracing::error!("config reload refused, running config kept: {e}"),
    }
}

/// Binds `addr` `shards` times with `SO_REUSEPORT`, so the kernel spreads
/// connections over one listener per shard. Port 0 is resolved by the first
/// bind and reused by the others.
pub fn bind_shards(addr: SocketAddr, shards: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(shards);
    let mut addr = addr;
    for _ in 0..shards.max(1) {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(shards > 1)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        // Deregistered from this runtime; each shard registers its own.
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// How many shards `server.worker_threads` asks for (0 = one per core).
pub fn shard_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Serves until SIGTERM/SIGINT, then stops accepting, lets open sockets close
/// (`1001 going_away`) within `shutdown_grace_ms`, and returns.
///
/// Each listener gets its own thread with a single-threaded runtime: a
/// connection and its runtime socket live and die on one thread, as in
/// NGINX's worker model, so relaying a frame never wakes another thread
/// (measured in BENCHMARKS.md: work-stealing wake-ups cost ~25% of the CPU
/// per streamed message). The calling runtime keeps the control work:
/// signals, the store's background tasks, revocation and expiry sweeps.
pub async fn run_until_signal(
    running: Arc<Running>,
    listeners: Vec<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let app = running.current();
    let addr = listeners
        .first()
        .ok_or_else(|| anyhow::anyhow!("no listener"))?
        .local_addr()?;
    let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
    crate::maintenance::spawn(Maintenance {
        store: app.store.clone(),
        sockets: app.sockets.clone(),
        hubs: app.hubs.clone(),
        metrics: app.metrics.clone(),
        audit_period: Duration::from_secs(app.config.sessions.audit_interval_secs),
        hooks: app.hooks.clone(),
        outbox: app.outbox.clone(),
    });
    let mut shards = Vec::new();
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let app = app.clone();
        let running = running.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("portcullis-shard-{i}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building a shard runtime");
                rt.block_on(async move {
                    // The store keeps one connection per shard (see
                    // `session::redis`); make it now, not on the first upgrade.
                    let warm = app.clone();
                    tokio::spawn(async move {
                        let _ = warm.store.ping().await;
                    });
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => run(listener, running).await,
                        Err(e) => tracing::error!(error = %e, "shard could not take its listener"),
                    }
                    // This runtime must outlive the sockets it drives: wait
                    // for every tracked task (all shards) to drain.
                    let _ = tokio::time::timeout(grace, app.sockets.shutdown().wait()).await;
                });
                let _ = done_tx.send(());
            })?;
        shards.push(done_rx);
    }
    // Stdout, not the log: scripts and tests read the address from here.
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    println!("portcullis listening on {scheme}://{addr}");
    tracing::info!(%addr, shards = shards.len(), routes = app.routes.iter().count(), "serving");
    tokio::select! {
        _ = crate::shutdown::signal() => {}
        _ = reload_on_hangup(&running) => {}
    }
    tracing::info!("shutdown signal received");
    let shutdown = app.sockets.shutdown();
    shutdown.trigger();
    app.sockets
        .registry()
        .close_all(crate::sockets::close::GOING_AWAY);
    if shutdown.drain(grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            ?grace,
            "grace period over with connections still open; exiting"
        );
    }
    for done in shards {
        let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
    }
    Ok(())
}
