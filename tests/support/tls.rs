//! Real TLS for tests: a CA made per test with `rcgen`, leaf certificates
//! it signs, a client that trusts it (HTTPS requests, `wss://` sockets),
//! and a `wss://` echo runtime. Nothing is mocked: every handshake is
//! rustls on both ends of a real socket.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error, Message};

use super::http::Resp;

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files hold them.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER, to compare with what a peer presented.
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.issuer.der().clone())
            .expect("the test CA is a usable root");
        Arc::new(roots)
    }

    /// A client config that trusts this CA only.
    pub fn client(&self) -> Arc<ClientConfig> {
        portcullis::tls::client_config(self.roots())
    }

    /// [`TestCa::client`] that speaks TLS 1.2 only.
    pub fn client_tls12(&self) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(portcullis::formats::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

/// A TLS connection to `addr`, checked against `name`.
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<ClientConfig>,
) -> TlsStream<TcpStream> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
            .await
    })
    .await
    .expect("TLS connect timed out")
    .expect("TLS handshake")
}

/// The certificate the server presented on `tls`.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .as_ref()
        .to_vec()
}

/// One HTTPS request (HTTP/1.1 over TLS to `localhost`).
pub async fn request(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Resp {
    let tls = connect(addr, "localhost", cfg).await;
    let host = format!("localhost:{}", addr.port());
    let headers = [("content-type", "application/json")];
    tokio::time::timeout(
        Duration::from_secs(15),
        super::http::exchange(tls, &host, method, path, &headers, body),
    )
    .await
    .expect("HTTPS request timed out")
}

/// Logs `user` in over HTTPS; the session token.
pub async fn login(addr: SocketAddr, cfg: &Arc<ClientConfig>, user: &str) -> String {
    let body = serde_json::json!({"username": user, "password": super::gateway::PASSWORD});
    let r = request(
        addr,
        cfg,
        "POST",
        "/api/auth/login",
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["session_token"].as_str().unwrap().to_string()
}

pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A `wss://localhost:<port><path>` socket with a bearer token.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    token: &str,
    cfg: &Arc<ClientConfig>,
) -> Result<Wss, Error> {
    let tls = connect(addr, "localhost", cfg).await;
    let mut req = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tls),
    )
    .await
    .expect("wss handshake timed out")
    .map(|(ws, _)| ws)
}

/// Sends `text` and expects it back.
pub async fn echoes<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("no echo within 10 s");
    match back {
        Some(Ok(m)) => assert_eq!(m, Message::text(text)),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// A `wss://` echo runtime serving `leaf`; records the SNI each client sent.
pub struct TlsRuntime {
    pub addr: SocketAddr,
    pub sni: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRuntime {
    pub async fn start(leaf: &Leaf) -> TlsRuntime {
        let key = portcullis::formats::tls::certified_key(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        let certs = portcullis::tls::ServerCerts::new(key);
        let acceptor = tokio_rustls::TlsAcceptor::from(portcullis::tls::server_config(certs));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sni = Arc::new(Mutex::new(Vec::new()));
        let seen = sni.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let name = tls.get_ref().1.server_name().map(str::to_string);
                    seen.lock().unwrap().push(name);
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() || m.is_binary() {
                            if ws.send(m).await.is_err() {
                                return;
                            }
                        } else if m.is_close() {
                            return;
                        }
                    }
                });
            }
        });
        TlsRuntime { addr, sni, task }
    }

    /// Its URL with host `localhost` (the name its certificate carries).
    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }
}

impl Drop for TlsRuntime {
    fn drop(&mut self) {
        self.task.abort();
    }
}
