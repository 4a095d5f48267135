//! SPEC §6: every refusal of the gate, in order, with nothing reaching the
//! runtime; every token transport; identity headers upstream.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::gateway::{Gateway, config, echo_route, route};
use support::http::{self as api, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::wait::eventually;
use support::ws::{self, connect, refusal};
use tokio_tungstenite::tungstenite::Message;

const ORIGINS: &str = "allowed_origins = [\"http://app.example\"]";

#[tokio::test]
async fn accepted_upgrade_echoes_and_reaches_upstream_with_identity() {
    let up = Upstream::start().await;
    let gw = Gateway::start(ORIGINS, &config(None, &echo_route(&up.url("/echo"), "")));
    let login = login(gw.addr, "alice").await;
    let token = login.token.as_str();
    let sid = login.sid.as_str();
    let auth = api::bearer(token);
    let (mut sock, resp) = connect(
        &gw.url("/ws/echo?room=7"),
        &[
            ("authorization", &auth),
            ("origin", "http://app.example"),
            ("x-portcullis-user", "mallory"),
            ("x-portcullis-session-id", "forged"),
            ("cookie", "theme=dark; portcullis_session=should-not-travel"),
        ],
    )
    .await
    .expect("upgrade");
    assert_eq!(resp.status(), 101);
    let seen = up.next_arrival().await;
    assert_eq!(seen.path, "/echo?room=7");
    assert_eq!(seen.headers["x-portcullis-user"], "alice");
    assert_eq!(seen.headers["x-portcullis-session-id"], sid);
    assert_eq!(seen.headers.get_all("x-portcullis-user").iter().count(), 1);
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["cookie"], "theme=dark");
    let all = format!("{:?}", seen.headers);
    assert!(!all.contains(token) && !all.contains("should-not-travel") && !all.contains("mallory"));

    sock.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws::next(&mut sock).await, Message::text("hello"));
}

#[tokio::test]
async fn every_refusal_in_order_and_the_runtime_sees_nothing() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        ORIGINS,
        &config(Some(&redis.url()), &echo_route(&up.url("/echo"), "")),
    );
    let url = gw.url("/ws/echo");
    let token = login(gw.addr, "alice").await.token;
    let auth = api::bearer(&token);

    // 1. Not an upgrade: a plain GET on a route path.
    let r = api::call(gw.addr, "GET", "/ws/echo", &token).await;
    assert_eq!((r.status, r.error().as_str()), (426, "upgrade_required"));

    // 2. A foreign Origin is refused even with a good token.
    let (s, body, _) = refusal(
        connect(
            &url,
            &[("authorization", &auth), ("origin", "http://evil.example")],
        )
        .await,
    );
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (403, "origin_not_allowed")
    );

    // 3. Tokens.
    let (s, body, _) = refusal(connect(&url, &[]).await);
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "missing_token"));
    let (s, body, _) = refusal(ws::connect_bearer(&url, "not.a.jwt").await);
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "invalid_token"));
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (s, body, _) = refusal(ws::connect_bearer(&url, &tampered).await);
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "invalid_token"));

    // 4. A well-signed token whose session has ended.
    let other = login(gw.addr, "alice").await.token;
    let r = api::logout(gw.addr, &other).await;
    assert_eq!(r.status, 204);
    let (s, body, _) = refusal(ws::connect_bearer(&url, &other).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (403, "session_not_found")
    );

    // 4'. Store unreachable: retry later, not "log in again".
    let mut redis = redis;
    redis.stop().await;
    let (s, body, headers) = refusal(ws::connect_bearer(&url, &token).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "session_store_unavailable")
    );
    assert!(headers.get("retry-after").is_some());
    redis.start_again().await;

    assert_eq!(
        up.connections(),
        0,
        "no refused request may reach the runtime"
    );

    // 6. Every upstream down: 502, not 403. (The restarted Redis kept
    // nothing, so log in again first: same gateway process, no restart.)
    let fresh = login(gw.addr, "alice").await.token;
    up.kill();
    let (s, body, headers) = refusal(ws::connect_bearer(&url, &fresh).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (502, "upstream_unavailable")
    );
    assert!(headers.get("retry-after").is_some());
}

#[tokio::test]
async fn per_session_limit_gives_503_with_retry_after() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "max_connections_per_session = 2",
        &config(None, &echo_route(&up.url("/echo"), "")),
    );
    let token = login(gw.addr, "alice").await.token;
    let url = gw.url("/ws/echo");
    let (_a, _) = ws::open(&url, &token).await;
    let (_b, _) = ws::open(&url, &token).await;
    let (s, body, headers) = refusal(ws::connect_bearer(&url, &token).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "too_many_connections")
    );
    assert!(headers.get("retry-after").is_some());
    assert_eq!(up.connections(), 2);
    // Another session of the same user is not affected.
    let token2 = login(gw.addr, "alice").await.token;
    let (_c, _) = ws::open(&url, &token2).await;
}

#[tokio::test]
async fn gateway_wide_limit_gives_503() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "max_connections = 1\nmax_connections_per_session = 1",
        &config(None, &echo_route(&up.url("/echo"), "")),
    );
    let a = login(gw.addr, "alice").await.token;
    let b = login(gw.addr, "bob").await.token;
    let url = gw.url("/ws/echo");
    let (_a, _) = ws::open(&url, &a).await;
    let (s, body, _) = refusal(ws::connect_bearer(&url, &b).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "too_many_connections")
    );
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn each_token_transport_works_and_bearer_subprotocol_is_answered() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &echo_route(&up.url("/echo"), "")));
    let token = login(gw.addr, "alice").await.token;
    let url = gw.url("/ws/echo");

    let (_s, _) = ws::connect_bearer(&url, &token).await.unwrap();
    let (_s, resp) = connect(
        &url,
        &[("sec-websocket-protocol", &format!("bearer, {token}"))],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "bearer");
    let (_s, _) = connect(&format!("{url}?session_token={token}&x=1"), &[])
        .await
        .unwrap();
    let (_s, _) = connect(&url, &[("cookie", &format!("portcullis_session={token}"))])
        .await
        .unwrap();

    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let all = format!("{:?} {}", s.headers, s.path);
        assert!(!all.contains(&token), "token leaked upstream: {all}");
        assert!(s.headers.get("sec-websocket-protocol").is_none());
    }
    assert_eq!(
        seen[2].path, "/echo?x=1",
        "session_token is stripped from the query"
    );
}

#[tokio::test]
async fn runtime_chosen_subprotocol_is_relayed() {
    let up = Upstream::start_with_protocol(Some("chat.v2")).await;
    let gw = Gateway::start("", &config(None, &echo_route(&up.url("/echo"), "")));
    let token = login(gw.addr, "alice").await.token;
    let (_s, resp) = connect(
        &gw.url("/ws/echo"),
        &[(
            "sec-websocket-protocol",
            &format!("chat.v1, chat.v2, bearer, {token}"),
        )],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v2");
    let seen = up.next_arrival().await;
    assert_eq!(seen.headers["sec-websocket-protocol"], "chat.v1, chat.v2");
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_within_the_same_handshake() {
    let live = Upstream::start().await;
    let dead = Upstream::start().await;
    dead.kill();
    let toml = route(
        "echo",
        "/ws/echo",
        &[&dead.url("/"), &live.url("/")],
        "balance = \"round_robin\"",
    );
    let gw = Gateway::start("", &config(None, &toml));
    let token = login(gw.addr, "alice").await.token;
    for _ in 0..4 {
        let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
        s.send(Message::text("x")).await.unwrap();
        assert_eq!(ws::next(&mut s).await, Message::text("x"));
    }
    assert_eq!(live.connections(), 4);
}

#[tokio::test]
async fn slowloris_head_is_cut_at_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "handshake_timeout_ms = 300",
        &config(None, &echo_route(&up.url("/echo"), "")),
    );
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head; the gateway must hang up on its own.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("gateway kept a never-finished request head open");
    assert!(n.is_ok());
    assert_eq!(up.connections(), 0);
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &echo_route(&up.url("/echo"), "")));
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let big = "a".repeat(20 * 1024);
    let req = format!("GET /ws/echo HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let head = String::from_utf8_lossy(&buf);
    assert!(
        head.starts_with("HTTP/1.1 431") || head.starts_with("HTTP/1.1 400"),
        "{head}"
    );
    assert_eq!(up.connections(), 0);
}

#[tokio::test]
async fn dot_segments_cannot_escape_a_prefix_route() {
    let up = Upstream::start().await;
    let toml = route("a", "/a/*", &[&up.url("/agent")], "");
    let gw = Gateway::start("", &config(None, &toml));
    let token = login(gw.addr, "alice").await.token;
    for path in ["/a/../../admin", "/a/%2e%2e/admin", "/a/.%2E/admin"] {
        let (s, body, _) = refusal(ws::connect_bearer(&gw.url(path), &token).await);
        assert_eq!(
            (s, body["error"].as_str().unwrap()),
            (400, "bad_request"),
            "{path}"
        );
    }
    // A legitimate sub-path still maps under the base.
    let (_s, _) = ws::open(&gw.url("/a/room/7"), &token).await;
    assert_eq!(up.next_arrival().await.path, "/agent/room/7");
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn a_client_hanging_up_mid_dial_leaves_no_lease_behind() {
    use tokio::io::AsyncWriteExt;
    // A runtime that accepts TCP but never answers the handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let toml = route("slow", "/ws/slow", &[&format!("ws://{silent_addr}/")], "");
    let gw = Gateway::start(
        "handshake_timeout_ms = 4000\nmax_connections_per_session = 1",
        &config(None, &toml),
    );
    let l = login(gw.addr, "alice").await;
    let (token, sid) = (l.token.as_str(), &l.sid);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /ws/slow HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The lease is taken while the gateway dials; then the client gives up.
    let connections =
        || async { api::get_session(gw.addr, sid, token).await.json()["connections"].clone() };
    eventually(
        "the lease taken while dialling",
        Duration::from_secs(3),
        || async { connections().await == 1 },
    )
    .await;
    drop(s);
    // Released well before the 30 s lease would lapse on its own.
    eventually(
        "the hung-up client's lease released",
        Duration::from_secs(3),
        || async { connections().await == 0 },
    )
    .await;
}
