//! Shutdown signalling and drain tracking.
//!
//! hyper stops tracking a connection once it hands over the upgraded IO, so
//! hyper-util's graceful shutdown alone would let WebSockets escape: every
//! socket task is spawned on the [`Shutdown`]'s tracker and watches its token.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cloned into every connection task.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves once shutdown has begun.
    pub fn begun(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_begun(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins shutdown for everything watching [`Shutdown::begun`]. Proxied
    /// sockets do not watch it (it would cost each a waiter on this shared
    /// token per relay step): they are told by
    /// `gate::registry::Registry::close_all`, which the server calls right
    /// after this.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Waits until shutdown has begun and every tracked task has ended.
    pub async fn wait(&self) {
        self.token.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Waits until every tracked task has ended, at most `grace`; `true` when
    /// everything drained in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
