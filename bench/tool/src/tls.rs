//! TLS for the generator and the echo (BENCHMARKS.md's TLS rows): `wss://`
//! and `https://` targets trusted through `--ca-file`, a `wss://` echo, and
//! `make-cert` for a throwaway CA and a `localhost` certificate. rustls with
//! its `ring` provider, as the gateway uses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A connection to a target: plain for `ws://`/`http://`, TLS otherwise.
pub type Conn = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

static CLIENT: OnceLock<Arc<ClientConfig>> = OnceLock::new();

#[allow(deprecated)] // rustls 0.23.48 deprecates ring's provider (no post-quantum kx)
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))
}

/// Trust `ca_file` for every `wss://`/`https://` target of this process.
pub fn trust(ca_file: &Path) -> Result<()> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_file)? {
        roots.add(c)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    CLIENT
        .set(Arc::new(cfg))
        .map_err(|_| anyhow!("trust() called twice"))
}

/// TCP (no Nagle), then TLS when `tls`, with SNI `host`.
pub async fn connect(host: &str, port: u16, tls: bool) -> Result<Conn> {
    let tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Either::Left(tcp));
    }
    let cfg = CLIENT
        .get()
        .context("a wss:// or https:// target needs --ca-file")?
        .clone();
    let name = ServerName::try_from(host.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    Ok(Either::Right(stream))
}

/// The echo's TLS acceptor for `cert` and `key` (PEM).
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs(cert)?, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Writes `ca.pem`, and `cert.pem`/`key.pem` for `localhost` and 127.0.0.1
/// signed by it, into `dir`.
pub fn make_cert(dir: &PathBuf) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
        .signed_by(&key, &ca)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    println!("wrote ca.pem, cert.pem, key.pem to {}", dir.display());
    Ok(())
}
