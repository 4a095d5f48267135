//! Dialling a runtime: TCP connect and the WebSocket client handshake.
//!
//! HTTP is parsed by hyper's client (we never parse HTTP ourselves); after
//! the `101` we take the raw `TcpStream` back from hyper, with any bytes the
//! runtime pipelined behind its response, so the relay can use readiness I/O
//! and hold no buffers while idle.

use bytes::Bytes;
use http::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use url::Url;

/// Why a dial failed; every variant means "try the next upstream".
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("handshake: {0}")]
    Http(#[from] hyper::Error),
    #[error("runtime refused the upgrade with {0}")]
    Refused(StatusCode),
    #[error("runtime's handshake is not valid: {0}")]
    BadHandshake(&'static str),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("runtime connection is not plain TCP")]
    NotTcp,
}

/// A completed upstream handshake.
pub struct Dialled {
    pub stream: TcpStream,
    /// Frames the runtime sent right behind its `101`.
    pub early: Bytes,
    /// The subprotocol the runtime chose, if any.
    pub protocol: Option<HeaderValue>,
}

/// What the upstream request carries besides the handshake itself.
pub struct UpstreamRequest<'a> {
    pub url: &'a Url,
    /// Client headers to pass on (already stripped of credentials,
    /// `X-Portcullis-*` and hop-by-hop headers).
    pub headers: HeaderMap,
    /// Subprotocols the client offered, minus the `bearer` pair.
    pub protocols: Option<String>,
}

pub async fn dial(req: UpstreamRequest<'_>) -> Result<Dialled, DialError> {
    let host = req.url.host_str().unwrap_or_default();
    let port = req.url.port_or_known_default().unwrap_or(80);
    // An IP literal resolves without touching DNS; names go through
    // tokio's resolver (off the async workers).
    let stream = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(DialError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    let conn = tokio::spawn(conn.with_upgrades());

    let key = generate_key();
    let path = match req.url.query() {
        Some(q) => format!("{}?{q}", req.url.path()),
        None => req.url.path().to_string(),
    };
    let mut builder = Request::get(path)
        .header(HOST, req.url.authority())
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_VERSION, "13")
        .header(SEC_WEBSOCKET_KEY, &key);
    if let Some(p) = &req.protocols {
        builder = builder.header(SEC_WEBSOCKET_PROTOCOL, p);
    }
    let mut request = builder.body(Empty::new())?;
    for (name, value) in req.headers.iter() {
        request.headers_mut().append(name, value.clone());
    }
    let mut resp = sender.send_request(request).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        conn.abort();
        return Err(DialError::Refused(resp.status()));
    }
    let h = resp.headers();
    let upgrade_ok = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade_ok {
        return Err(DialError::BadHandshake("Upgrade is not websocket"));
    }
    if h.get(SEC_WEBSOCKET_ACCEPT).map(|v| v.as_bytes())
        != Some(derive_accept_key(key.as_bytes()).as_bytes())
    {
        return Err(DialError::BadHandshake(
            "Sec-WebSocket-Accept does not match",
        ));
    }
    let protocol = h.get(SEC_WEBSOCKET_PROTOCOL).cloned();
    if let Some(chosen) = &protocol {
        let offered = req.protocols.as_deref().unwrap_or("");
        let chosen = chosen.to_str().unwrap_or("");
        if !offered.split(',').map(str::trim).any(|p| p == chosen) {
            return Err(DialError::BadHandshake("subprotocol was not offered"));
        }
    }
    if h.contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS) {
        // We offered none; a runtime that turns one on would change framing.
        return Err(DialError::BadHandshake("extension was not offered"));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| DialError::NotTcp)?;
    Ok(Dialled {
        stream: parts.io.into_inner(),
        early: parts.read_buf,
        protocol,
    })
}
