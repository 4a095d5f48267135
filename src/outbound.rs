//! One JSON POST to a plain `http://` URL on a fresh HTTP/1.1 connection:
//! how the gateway calls the services its config names (the upstream
//! credential verifier, the runtime's session hooks). Calls are rare (one
//! per login or session end), so no pool; the caller bounds the whole
//! exchange with its own timeout.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use url::Url;

/// Why a POST got no answer; the text names the kind of failure only
/// (never the body, which may carry a password).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PostError(String);

fn failed(e: impl std::fmt::Display) -> PostError {
    PostError(e.to_string())
}

/// POSTs `body` as `application/json` with the extra `headers`; the
/// answer's head, with its body still to be read (or dropped).
pub async fn post_json(
    url: &Url,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<http::Response<Incoming>, PostError> {
    let host = url.host_str().ok_or_else(|| failed("no host"))?;
    // `host_str` keeps an IPv6 literal's brackets, which no resolver takes.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(80);
    let stream = TcpStream::connect((host, port)).await.map_err(failed)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(failed)?;
    tokio::spawn(conn);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut req = http::Request::post(path)
        .header(http::header::HOST, url.authority())
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(failed)?;
    sender.send_request(req).await.map_err(failed)
}
