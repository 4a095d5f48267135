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
    // The parser's error can quote a line of the file, which here is key
    // material: say what was expected, never what was found.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| TlsFileError::Key("not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into()))?;
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            TlsFileError::Key("does not match the certificate's public key".into())
        }
        // rustls' key errors name the problem, not the key's bytes.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    #[test]
    fn a_matching_pair_loads_and_a_foreign_key_does_not() {
        let (cert, key) = self_signed();
        assert!(certified_key(cert.as_bytes(), key.as_bytes()).is_ok());
        let (_, other_key) = self_signed();
        assert_eq!(
            certified_key(cert.as_bytes(), other_key.as_bytes()).unwrap_err(),
            TlsFileError::Key("does not match the certificate's public key".into())
        );
        assert!(matches!(
            certified_key(key.as_bytes(), key.as_bytes()),
            Err(TlsFileError::Cert(_))
        ));
    }

    #[test]
    fn a_key_error_never_quotes_the_key_file() {
        let (cert, _) = self_signed();
        let bad = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----BEGIN PRIVATE KEY-----\n";
        match certified_key(cert.as_bytes(), bad.as_bytes()) {
            Err(TlsFileError::Key(m)) => assert!(!m.contains("c2VjcmV0"), "{m}"),
            other => panic!("expected a key error, got {other:?}"),
        }
    }
}
