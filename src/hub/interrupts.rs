//! What ends a hub or a viewport from outside: its session ending (the
//! registry's close) or the gateway shutting down. One watch, awaited from
//! every place a hub or viewport waits on a peer.

use crate::shutdown::Shutdown;
use crate::sockets::CloseRx;
use crate::sockets::close::{self, Close};

pub struct Interrupts {
    /// `None` once it resolved or its sender was dropped (the registry
    /// going away at teardown): then only shutdown is left to wait for.
    close_rx: Option<CloseRx>,
    shutdown: Shutdown,
}

impl Interrupts {
    pub fn new(close_rx: CloseRx, shutdown: Shutdown) -> Self {
        Interrupts {
            close_rx: Some(close_rx),
            shutdown,
        }
    }

    /// Resolves with the close to send: the registry's (revocation, expiry,
    /// `close_all`) or `1001` on shutdown. Cancel-safe: a `select!` that
    /// drops it loses nothing.
    pub async fn next(&mut self) -> Close {
        if let Some(rx) = self.close_rx.as_mut() {
            let told = tokio::select! {
                r = rx => Some(r.ok()),
                _ = self.shutdown.begun() => None,
            };
            match told {
                None => return close::GOING_AWAY,
                Some(Some(c)) => {
                    self.close_rx = None;
                    return c;
                }
                Some(None) => self.close_rx = None,
            }
        }
        self.shutdown.begun().await;
        close::GOING_AWAY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn a_revocation_wins_and_shutdown_follows_a_dropped_sender() {
        let (tx, rx) = oneshot::channel();
        let shutdown = Shutdown::new();
        let mut i = Interrupts::new(rx, shutdown.clone());
        tx.send(close::SESSION_REVOKED).unwrap();
        assert_eq!(i.next().await, close::SESSION_REVOKED);

        let (tx, rx) = oneshot::channel::<Close>();
        let mut i = Interrupts::new(rx, shutdown.clone());
        drop(tx);
        let polled = futures_util::FutureExt::now_or_never(i.next());
        assert!(polled.is_none(), "a dropped sender is no close");
        shutdown.trigger();
        assert_eq!(i.next().await, close::GOING_AWAY);
    }
}
