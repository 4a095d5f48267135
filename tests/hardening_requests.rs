//! Issue 16, items 2, 4, 5 and 6: requests a normal client never sends,
//! written byte for byte on raw sockets to the real gateway binary in front
//! of a real runtime that records every handshake it completes. Each refusal
//! is a `400` (or `426`) with the JSON error body, and the runtime is never
//! dialled for it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::gateway::{Gateway, config};
use support::http::login;
use support::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ORIGINS: &str = "allowed_origins = [\"http://app.example\"]";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A response read off a raw socket.
struct Raw {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of {} is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Status and `error` code; panics unless the body is SPEC §4's shape.
    fn refusal(&self) -> (u16, String) {
        let j = self.json();
        assert!(j["message"].is_string(), "no message in {j}");
        (
            self.status,
            j["error"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// Writes `request` as-is and reads one response (head, then a
/// `Content-Length` body); for a `101`, the head only.
async fn send_raw(addr: SocketAddr, request: &[u8]) -> Raw {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await.expect("connect to gateway");
        s.write_all(request).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = resp.parse(&buf).unwrap() {
                let status = resp.code.unwrap();
                let mut map = http::HeaderMap::new();
                for h in resp.headers.iter() {
                    map.append(
                        http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                        http::HeaderValue::from_bytes(h.value).unwrap(),
                    );
                }
                let len: usize = map
                    .get("content-length")
                    .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
                let len = if status == 101 { 0 } else { len };
                while buf.len() < head_len + len {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed inside the body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Raw {
                    status,
                    headers: map,
                    body: buf[head_len..head_len + len].to_vec(),
                };
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed before a response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no response within 10 s")
}

/// A valid upgrade of `path` with a bearer token, then `extra` header lines
/// (each ending in CRLF), then `body`. `host` is the whole Host line or "".
fn upgrade(path: &str, host: &str, token: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\n{host}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\
         Authorization: Bearer {token}\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}

struct Setup {
    up: Upstream,
    gw: Gateway,
    token: String,
    sid: String,
}

impl Setup {
    /// A gateway with the exact route `/ws/echo` and the prefix route
    /// `/ws/prefix/*` → `/pfx` on one recording runtime, and alice logged in.
    async fn start() -> Setup {
        let up = Upstream::start().await;
        let routes = format!(
            "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"{}\"]\n\
             [[routes]]\nname = \"prefix\"\npath = \"/ws/prefix/*\"\nupstreams = [\"{}\"]\n",
            up.url("/echo"),
            up.url("/pfx"),
        );
        let gw = Gateway::start(ORIGINS, &config(None, &routes));
        let l = login(gw.addr, "alice").await;
        Setup {
            token: l.token.clone(),
            sid: l.sid.clone(),
            up,
            gw,
        }
    }

    fn host(&self) -> String {
        format!("Host: {}\r\n", self.gw.addr)
    }

    /// An upgrade of `path` with a good Host and token plus `extra` lines.
    fn request(&self, path: &str, extra: &str) -> Vec<u8> {
        upgrade(path, &self.host(), &self.token, extra, "")
    }

    /// Sends each request and expects `400 bad_request` with the JSON body
    /// and nothing dialled; reports every case that got something else.
    async fn expect_bad_requests(&self, cases: &[(&str, Vec<u8>)]) {
        let mut wrong = Vec::new();
        for (what, request) in cases {
            let before = self.up.connections();
            let r = send_raw(self.gw.addr, request).await;
            let error = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .filter(|j| j["message"].is_string())
                .and_then(|j| j["error"].as_str().map(str::to_string));
            let dialled = self.up.connections() != before;
            if (r.status, error.as_deref(), dialled) != (400, Some("bad_request"), false) {
                wrong.push(format!(
                    "{what}: {} {error:?}{}",
                    r.status,
                    if dialled { ", runtime dialled" } else { "" }
                ));
            }
        }
        assert!(wrong.is_empty(), "not refused 400:\n{}", wrong.join("\n"));
    }

    /// Sends `request`, expects `101`, returns what the runtime received.
    async fn expect_upgraded(&self, what: &str, request: &[u8]) -> support::upstream::Seen {
        let r = send_raw(self.gw.addr, request).await;
        assert_eq!(
            r.status,
            101,
            "{what}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        self.up.next_arrival().await
    }
}

#[tokio::test]
async fn backslashes_and_encoded_dot_segments_cannot_escape_a_prefix_route() {
    let s = Setup::start().await;
    let paths = [
        // The reported escapes: the URL library (and many runtimes) read `\`
        // as `/` and then resolve the dot segments.
        "/ws/prefix/..\\admin",
        "/ws/prefix/x\\..\\..\\secret",
        "/ws/prefix/room\\name",
        "/ws/prefix/..%5Cadmin",
        "/ws/prefix/..%5cadmin",
        // Every spelling of an encoded dot segment.
        "/ws/prefix/%2e%2e/admin",
        "/ws/prefix/%2E%2E/admin",
        "/ws/prefix/.%2e/admin",
        "/ws/prefix/%2e./admin",
        "/ws/prefix/%2E/admin",
        "/ws/prefix/x/%2e%2e",
        // A separator encoded once: `..%2f` decodes to `../`.
        "/ws/prefix/..%2fadmin",
        // Double encoding, for runtimes that decode twice.
        "/ws/prefix/%252e%252e/admin",
        "/ws/prefix/..%255cadmin",
        // Servlet path parameters: `..;x` is `..` to Tomcat and Jetty.
        "/ws/prefix/..;x=1/admin",
        // A NUL ends the path for C code.
        "/ws/prefix/..%00/admin",
    ]
    .map(|path| (path, s.request(path, "")));
    s.expect_bad_requests(&paths).await;
    // The route still maps a legitimate sub-path (and `..` inside a name)
    // under its base, and those are the only requests the runtime saw.
    let seen = s
        .expect_upgraded("sub-path", &s.request("/ws/prefix/room/7", ""))
        .await;
    assert_eq!(seen.path, "/pfx/room/7");
    let seen = s
        .expect_upgraded("dots in a name", &s.request("/ws/prefix/a..b/c.d", ""))
        .await;
    assert_eq!(seen.path, "/pfx/a..b/c.d");
    assert_eq!(s.up.connections(), 2);
}

#[tokio::test]
async fn underscore_headers_never_reach_the_runtime_and_identity_still_does() {
    let s = Setup::start().await;
    let extra = "X_Portcullis_User: mallory\r\nX_Portcullis_Session_Id: forged\r\n\
                 x_portcullis_user: mallory2\r\nX-Portcullis_User: mallory3\r\n\
                 Custom_Header: underscore\r\nX-Trace: t-1\r\n";
    let seen = s
        .expect_upgraded("underscores", &s.request("/ws/echo", extra))
        .await;
    assert_eq!(seen.headers["x-portcullis-user"], "alice");
    assert_eq!(seen.headers["x-portcullis-session-id"], s.sid.as_str());
    assert_eq!(seen.headers.get_all("x-portcullis-user").iter().count(), 1);
    assert_eq!(
        seen.headers["x-trace"], "t-1",
        "ordinary headers still travel"
    );
    let names: Vec<&str> = seen.headers.keys().map(|n| n.as_str()).collect();
    assert!(
        names.iter().all(|n| !n.contains('_')),
        "underscore header reached the runtime: {names:?}"
    );
    let all = format!("{:?}", seen.headers);
    assert!(
        !all.contains("mallory") && !all.contains("forged") && !all.contains("underscore"),
        "{all}"
    );
}

#[tokio::test]
async fn headers_named_in_connection_are_hop_by_hop_and_not_forwarded() {
    let s = Setup::start().await;
    let request = format!(
        "GET /ws/echo HTTP/1.1\r\n{}Connection: keep-alive, Upgrade, X-Hop\r\n\
         Connection: x-hop-two\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {KEY}\r\nAuthorization: Bearer {}\r\nX-Hop: hop-one\r\n\
         X-Hop-Two: hop-two\r\nKeep-Alive: timeout=5\r\nX-Kept: kept\r\n\r\n",
        s.host(),
        s.token
    );
    let seen = s
        .expect_upgraded("connection-named", request.as_bytes())
        .await;
    assert_eq!(seen.headers["x-kept"], "kept");
    for gone in ["x-hop", "x-hop-two", "keep-alive"] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the runtime"
        );
    }
    assert_eq!(seen.headers["x-portcullis-user"], "alice");

    // `Connection: X-Forwarded-For` asks for the client's chain to go: the
    // runtime sees only the gateway's peer address, not the forged hop.
    let extra = "Connection: X-Forwarded-For\r\nX-Forwarded-For: 6.6.6.6\r\n";
    let seen = s
        .expect_upgraded("xff named", &s.request("/ws/echo", extra))
        .await;
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    // Without it, the client's chain is kept and extended.
    let seen = s
        .expect_upgraded(
            "xff",
            &s.request("/ws/echo", "X-Forwarded-For: 6.6.6.6\r\n"),
        )
        .await;
    assert_eq!(seen.headers["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
}

#[tokio::test]
async fn ambiguous_requests_are_refused_400_with_nothing_dialled() {
    let s = Setup::start().await;
    let host = s.host();
    let t = s.token.as_str();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "two Host headers",
            upgrade(
                "/ws/echo",
                &format!("{host}Host: other.example\r\n"),
                t,
                "",
                "",
            ),
        ),
        ("no Host on HTTP/1.1", upgrade("/ws/echo", "", t, "", "")),
        (
            "a Host that is not a host",
            upgrade("/ws/echo", "Host: a b\r\n", t, "", ""),
        ),
        (
            "Content-Length on the upgrade GET",
            upgrade("/ws/echo", &host, t, "Content-Length: 5\r\n", "hello"),
        ),
        (
            "Transfer-Encoding on the upgrade GET",
            upgrade(
                "/ws/echo",
                &host,
                t,
                "Transfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "Content-Length and Transfer-Encoding",
            upgrade(
                "/ws/echo",
                &host,
                t,
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "two Origin headers, the first allowed",
            s.request(
                "/ws/echo",
                "Origin: http://app.example\r\nOrigin: http://evil.example\r\n",
            ),
        ),
        (
            "two Origin headers, the second allowed",
            s.request(
                "/ws/echo",
                "Origin: http://evil.example\r\nOrigin: http://app.example\r\n",
            ),
        ),
        (
            "two Sec-WebSocket-Key headers",
            s.request(
                "/ws/echo",
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
            ),
        ),
        (
            "two Sec-WebSocket-Version headers",
            s.request("/ws/echo", "Sec-WebSocket-Version: 8\r\n"),
        ),
        (
            "two Authorization headers",
            s.request("/ws/echo", "Authorization: Bearer other\r\n"),
        ),
    ];
    s.expect_bad_requests(&cases).await;
    // The same gateway still upgrades the unambiguous request.
    s.expect_upgraded("control", &s.request("/ws/echo", ""))
        .await;
}

#[tokio::test]
async fn repeated_list_headers_and_an_empty_content_length_are_not_ambiguous() {
    let s = Setup::start().await;
    // `Connection`, `Upgrade` and `Sec-WebSocket-Protocol` are lists: two
    // lines are one list (RFC 9110 §5.3). `Content-Length: 0` declares no body.
    let request = format!(
        "GET /ws/echo HTTP/1.1\r\n{}Connection: keep-alive\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nUpgrade: h2c\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: chat.v1\r\n\
         Sec-WebSocket-Protocol: chat.v2\r\nContent-Length: 0\r\n\
         Authorization: Bearer {}\r\nOrigin: http://app.example\r\n\r\n",
        s.host(),
        s.token
    );
    let seen = s.expect_upgraded("lists", request.as_bytes()).await;
    assert_eq!(seen.headers["sec-websocket-protocol"], "chat.v1, chat.v2");
    assert!(seen.headers.get("content-length").is_none());
}

#[tokio::test]
async fn an_unsupported_websocket_version_gets_426_naming_version_13() {
    let s = Setup::start().await;
    let request = format!(
        "GET /ws/echo HTTP/1.1\r\n{}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n\
         Authorization: Bearer {}\r\n\r\n",
        s.host(),
        s.token
    );
    let r = send_raw(s.gw.addr, request.as_bytes()).await;
    assert_eq!(r.refusal(), (426, "upgrade_required".to_string()));
    assert_eq!(r.headers["sec-websocket-version"], "13");
    assert_eq!(r.headers["upgrade"], "websocket");
    // A key that is not base64 of 16 bytes is not a valid upgrade either.
    let request = String::from_utf8(s.request("/ws/echo", ""))
        .unwrap()
        .replace(KEY, "************************");
    let r = send_raw(s.gw.addr, request.as_bytes()).await;
    assert_eq!(r.refusal(), (426, "upgrade_required".to_string()));
    assert_eq!(s.up.connections(), 0);
}
