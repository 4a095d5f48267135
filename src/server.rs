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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::App;

/// Largest request head accepted; bigger heads get hyper's bare `431`.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// TCP connections allowed beyond `max_connections` WebSockets, so the API
/// and probes still answer while the gateway is full of sockets.
pub const HTTP_HEADROOM: usize = 1024;

/// Serves `listener` until `app.shutdown` begins, then stops accepting and
/// asks every HTTP connection to finish; socket tasks watch the same signal.
pub async fn run(listener: TcpListener, app: Arc<App>) {
    crate::gate::maintenance::spawn(app.clone());
    let limit = Arc::new(Semaphore::new(
        app.config.server.max_connections as usize + HTTP_HEADROOM,
    ));
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = app.shutdown.begun() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = app.shutdown.begun() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let app2 = app.clone();
                app.shutdown.spawn(async move {
                    serve_connection(app2, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = app.shutdown.begun() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    tracing::info!("stopped accepting connections");
}

async fn serve_connection(app: Arc<App>, stream: TcpStream, peer: SocketAddr) {
    // Small frames are the common case; Nagle would add up to 40 ms to each.
    let _ = stream.set_nodelay(true);
    let svc_app = app.clone();
    let service = tower::service_fn(move |req| {
        let app = svc_app.clone();
        async move { Ok::<_, Infallible>(crate::http::handle(app, req, peer).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.handshake_timeout_ms,
        ))
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        }
        _ = app.shutdown.begun() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Serves until SIGTERM/SIGINT, then stops accepting, lets open sockets close
/// (`1001 going_away`) within `shutdown_grace_ms`, and returns.
pub async fn run_until_signal(app: Arc<App>, listener: TcpListener) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // Stdout, not the log: scripts and tests read the address from here.
    println!("portcullis listening on http://{addr}");
    tracing::info!(%addr, routes = app.routes.iter().count(), "serving");
    let server = tokio::spawn(run(listener, app.clone()));
    crate::shutdown::signal().await;
    tracing::info!("shutdown signal received");
    app.shutdown.trigger();
    let _ = server.await;
    let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
    if app.shutdown.drain(grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            ?grace,
            "grace period over with connections still open; exiting"
        );
    }
    Ok(())
}
