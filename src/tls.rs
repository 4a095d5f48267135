//! TLS for both edges (SPEC §12), with rustls: the listener's server config,
//! whose certificate a reload swaps without touching open connections, and
//! the client configs that `wss://` runtimes are dialled with.
//!
//! Modern defaults: TLS 1.3 and 1.2 only, ALPN `http/1.1` both ways (the
//! gateway speaks HTTP/1.1; a WebSocket upgrade needs it).

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::formats::tls::provider;

const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The serving certificate, replaced whole by a reload: a handshake in
/// progress or a connection already open keeps the one it started with.
#[derive(Debug)]
pub struct ServerCerts {
    current: ArcSwap<CertifiedKey>,
}

impl ServerCerts {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ServerCerts> {
        Arc::new(ServerCerts {
            current: ArcSwap::new(key),
        })
    }

    /// New handshakes present `key` from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }

    /// The end-entity certificate now served (DER), for logs and tests.
    pub fn leaf(&self) -> Vec<u8> {
        self.current.load().cert[0].as_ref().to_vec()
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's config: TLS 1.2+, ALPN `http/1.1`, the certificate from
/// `certs` at each handshake.
pub fn server_config(certs: Arc<ServerCerts>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(cfg)
}

/// A client config for `wss://` runtimes trusting `roots`; the server name
/// (SNI and the name verified) comes from each URL at dial time.
pub fn client_config(roots: Arc<RootCertStore>) -> Arc<ClientConfig> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(cfg)
}

/// The operating system's trust store, read once (on the first `wss://`
/// route without a `ca_file`); certificates it cannot parse are skipped
/// and counted in the log.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, skipped) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, skipped, "system CA roots loaded");
            Arc::new(roots)
        })
        .clone()
}
