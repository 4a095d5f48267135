//! PEM certificates and keys for TLS (SPEC §12): the serving certificate
//! chain with its private key (`[server.tls]`), and the CA a `wss://` route
//! trusts (`routes[].ca_file`). Parsed and checked once by `config`, so a
//! certificate that does not match its key, or a file without a
//! certificate, is a config error naming the key path; the parsed values
//! are what the listener and the dialler use. PEM decoding is
//! `rustls-pki-types`', key loading rustls' own (ring provider).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The one crypto provider every TLS config of the gateway uses: rustls'
/// `ring` provider, as `ring` is already built for the JWT keys. rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange (its
/// aws-lc-rs provider has it, at the cost of a C/cmake build); classical
/// ECDHE (X25519, P-256, P-384) is what every client offers today.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The certificates in a PEM file, in order; an error when there are none.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM CERTIFICATE block".into());
    }
    Ok(certs)
}

/// A certificate chain (leaf first) and the private key that matches its
/// leaf, ready to serve.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsFileError> {
    let chain = certificates(cert_pem).map_err(TlsFileError::Cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsFileError::Key(format!("not a PEM private key: {e}")))?;
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            TlsFileError::Key("does not match the certificate's public key".into())
        }
        other => TlsFileError::Key(format!("unusable private key: {other}")),
    })?;
    Ok(Arc::new(ck))
}

/// Which of the two files is wrong, so config can name its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFileError {
    Cert(String),
    Key(String),
}

/// The trust anchors of a CA file.
pub fn root_store(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}
