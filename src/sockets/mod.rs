//! The life of an open socket on this instance: where it is registered so
//! a revocation reaches it, what it holds (lease, slot), how its task ends,
//! and every close code the gateway sends.
//!
//! [`Sockets`] is the handle the gate and the hubs receive: the registry,
//! the lease-release queue, the shutdown tracker and the metrics a socket
//! task touches, and nothing else of the app.

pub mod close;
pub mod contract;
mod lease;
pub mod registry;
mod release;

use std::sync::Arc;

use crate::session::Store;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

pub use close::Close;
pub use lease::{Active, Held, Lease};
pub use registry::{CloseRx, HubId, Registry, Slot};
pub use release::Releases;

/// Cheap to clone: one pointer to what every socket task shares.
#[derive(Clone)]
pub struct Sockets(Arc<Inner>);

struct Inner {
    registry: Registry,
    releases: Releases,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

impl Sockets {
    pub fn new(
        max_connections: u32,
        store: Arc<Store>,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Self {
        Sockets(Arc::new(Inner {
            registry: Registry::new(max_connections),
            releases: Releases::new(store, shutdown.clone()),
            shutdown,
            metrics,
        }))
    }

    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.0.shutdown
    }

    /// A socket's lease, taken in the store by the caller, handed over so it
    /// is given back (registry and store) when dropped.
    pub fn lease(&self, session_id: String, conn_id: String) -> Lease {
        Lease::new(self.clone(), session_id, conn_id)
    }

    /// Takes a gateway slot unless the gateway is full or shutting down.
    pub fn try_reserve(&self) -> Option<Slot> {
        if self.0.shutdown.is_begun() {
            return None;
        }
        self.0.registry.try_reserve()
    }
}
