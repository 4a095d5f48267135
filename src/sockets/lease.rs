//! What an open socket holds while it lives, and the one way its task
//! ends: the store lease, the gateway slot, the upstream's count, and the
//! epilogue that every socket task (exclusive or shared) runs when it
//! closes.

use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;

use super::Sockets;
use super::registry::Slot;
use crate::routing::Route;
use crate::session::Release;
use crate::telemetry::CloseLabel;

/// A socket's store lease (and its slot in its user's count, if it took
/// one) and registry entry, released when dropped: on a refusal after the
/// store said yes, when hyper drops the gate's future because the client
/// hung up mid-dial, or when the socket task ends.
pub struct Lease {
    sockets: Sockets,
    sid: String,
    conn_id: String,
    /// Set while the socket may hold a slot in this user's count.
    user: Option<String>,
}

impl Lease {
    pub(super) fn new(sockets: Sockets, sid: String, conn_id: String) -> Self {
        Lease {
            sockets,
            sid,
            conn_id,
            user: None,
        }
    }

    /// From now on the release also gives back the socket's slot in
    /// `user`'s count. Called *before* asking the store for it: a slot
    /// taken by a store call whose answer was lost is still given back.
    pub fn hold_user_slot(&mut self, user: String) {
        self.user = Some(user);
    }

    /// The store refused the user's slot: there is nothing to give back.
    pub fn no_user_slot(&mut self) {
        self.user = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let inner = &self.sockets.0;
        inner.registry.unregister_socket(&self.sid, &self.conn_id);
        inner.releases.push(Release {
            session_id: std::mem::take(&mut self.sid),
            conn_id: std::mem::take(&mut self.conn_id),
            user: self.user.take(),
        });
    }
}

/// A socket counted on its upstream (least-connections balancing) while it
/// lives.
pub struct Active(Arc<Route>, usize);

impl Active {
    pub fn new(route: Arc<Route>, index: usize) -> Self {
        route.pool.enter(index);
        Active(route, index)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.pool.leave(self.1);
    }
}

/// Everything a socket task holds until it ends. Dropped in one place, the
/// task's epilogue, so no path can keep a slot or a lease by mistake.
pub struct Held {
    pub slot: Slot,
    pub lease: Lease,
    /// Exclusive sockets count on their upstream; shared viewports do not
    /// (their hub holds the one upstream connection).
    pub active: Option<Active>,
}

impl Sockets {
    /// Spawns a socket's task, tracked for shutdown. `socket` resolves to
    /// the close code the gateway sent the client, if it sent one; the
    /// epilogue counts it and releases everything `held`.
    pub fn spawn<F>(&self, socket: F, held: Held)
    where
        F: Future<Output = Option<u16>> + Send + 'static,
    {
        self.0.metrics.open_sockets.inc();
        // A combinator, not an `async` block: a block awaiting `socket` would
        // store it twice (the captured value and the awaited one), and an
        // idle socket's task size is what it costs (BENCHMARKS.md).
        self.0.shutdown.spawn(socket.map(move |code| {
            let metrics = &held.lease.sockets.0.metrics;
            if let Some(code) = code {
                metrics.closes.get_or_create(&CloseLabel { code }).inc();
            }
            metrics.open_sockets.dec();
            drop(held);
        }));
    }
}
