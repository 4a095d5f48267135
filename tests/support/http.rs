//! A minimal HTTP/1.1 client over a real socket, for the API.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error` code of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One complete response (head and a `Content-Length` body) at the start
/// of `buf`, or `None` while more bytes are needed.
pub fn parse_response(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = http::HeaderMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':')?;
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let len: usize = headers.get("content-length")?.to_str().ok()?.parse().ok()?;
    (buf.len() >= end + len).then(|| Resp {
        status,
        headers,
        body: buf[end..end + len].to_vec(),
    })
}

/// One request and its whole response on `io` (plain or TLS), with `Host:
/// host`; panics on a transport failure. Callers bound it.
pub async fn exchange<I>(
    io: I,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_vec())))
        .unwrap();
    let resp = sender.send_request(req).await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// `method path` with `headers` and `body`, bounded; panics on a transport
/// failure (an HTTP error status is a [`Resp`], not a panic).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    request_from(None, addr, method, path, headers, body).await
}

/// [`request`] over a connection from the local address `from` (any address
/// in 127/8 is local on Linux), so the gateway sees that client IP.
pub async fn request_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    tokio::time::timeout(Duration::from_secs(15), async {
        let stream = match from {
            None => tokio::net::TcpStream::connect(addr).await,
            Some(from) => {
                let socket = match from {
                    IpAddr::V4(_) => TcpSocket::new_v4(),
                    IpAddr::V6(_) => TcpSocket::new_v6(),
                }
                .unwrap();
                socket.bind(SocketAddr::new(from, 0)).unwrap();
                socket.connect(addr).await
            }
        }
        .expect("connect to gateway");
        exchange(stream, &addr.to_string(), method, path, headers, body).await
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
    .await
}

/// `POST /api/auth/login` with `user` and `password`, whatever the answer.
pub async fn try_login(addr: SocketAddr, user: &str, password: &str) -> Resp {
    post_json(
        addr,
        "/api/auth/login",
        &serde_json::json!({ "username": user, "password": password }),
    )
    .await
}

/// A successful login: the session, its token, and the whole login body.
pub struct Login {
    pub sid: String,
    pub token: String,
    pub body: serde_json::Value,
}

/// Logs in with [`PASSWORD`](super::gateway::PASSWORD); panics unless 200.
pub async fn login(addr: SocketAddr, user: &str) -> Login {
    let r = try_login(addr, user, super::gateway::PASSWORD).await;
    assert_eq!(
        r.status,
        200,
        "login failed: {}",
        String::from_utf8_lossy(&r.body)
    );
    let body = r.json();
    let field = |name: &str| {
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("login body has no {name}: {body}"))
            .to_string()
    };
    let (sid, token) = (field("session_id"), field("session_token"));
    Login { sid, token, body }
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `method path` authenticated by `token` as a bearer, without a body.
pub async fn call(addr: SocketAddr, method: &str, path: &str, token: &str) -> Resp {
    request(
        addr,
        method,
        path,
        &[("authorization", &bearer(token))],
        None,
    )
    .await
}

/// `GET /api/session/{sid}` with `token`.
pub async fn get_session(addr: SocketAddr, sid: &str, token: &str) -> Resp {
    call(addr, "GET", &format!("/api/session/{sid}"), token).await
}

/// `POST /api/auth/refresh` with `token`.
pub async fn refresh(addr: SocketAddr, token: &str) -> Resp {
    call(addr, "POST", "/api/auth/refresh", token).await
}

/// `POST /api/auth/logout` with `token`.
pub async fn logout(addr: SocketAddr, token: &str) -> Resp {
    call(addr, "POST", "/api/auth/logout", token).await
}

/// `r` is a JSON error `{"error": code, "message": <non-empty>}` with `status`.
#[track_caller]
pub fn assert_error(r: &Resp, status: u16, code: &str) {
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, status, "status; body: {text}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type {:?}",
        r.header("content-type")
    );
    let body: serde_json::Value =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(body["error"].as_str(), Some(code), "body: {text}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no human message: {text}"
    );
}

/// The value of the sample `series` (name with labels) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The gateway's `/metrics` text.
pub async fn metrics(addr: SocketAddr) -> String {
    let r = request(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).expect("metrics are UTF-8")
}
