//! SPEC §6: every refusal of the gate, in order, with nothing reaching the
//! runtime; every token transport; identity headers upstream.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::gateway::{Gateway, config};
use support::http::{self as api, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::ws::{self, connect, refusal};
use tokio_tungstenite::tungstenite::Message;

fn route(upstream: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"{}\"]\n",
        upstream.url("/echo")
    )
}

const ORIGINS: &str = "allowed_origins = [\"http://app.example\"]";

#[tokio::test]
async fn accepted_upgrade_echoes_and_reaches_upstream_with_identity() {
    let up = Upstream::start().await;
    let gw = Gateway::start(ORIGINS, &config(None, &route(&up)));
    let login = login(gw.addr, "alice").await;
    let token = login["session_token"].as_str().unwrap();
    let sid = login["session_id"].as_str().unwrap();
    let auth = format!("Bearer {token}");
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
    let gw = Gateway::start(ORIGINS, &config(Some(&redis.url()), &route(&up)));
    let url = gw.url("/ws/echo");
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let auth = format!("Bearer {token}");

    // 1. Not an upgrade: a plain GET on a route path.
    let r = api::request(
        gw.addr,
        "GET",
        "/ws/echo",
        &[("authorization", &auth)],
        None,
    )
    .await;
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
    let (s, body, _) = refusal(connect(&url, &[("authorization", "Bearer not.a.jwt")]).await);
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "invalid_token"));
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (s, body, _) =
        refusal(connect(&url, &[("authorization", &format!("Bearer {tampered}"))]).await);
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "invalid_token"));

    // 4. A well-signed token whose session has ended.
    let other = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let other_auth = format!("Bearer {other}");
    let r = api::request(
        gw.addr,
        "POST",
        "/api/auth/logout",
        &[("authorization", &other_auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let (s, body, _) = refusal(connect(&url, &[("authorization", &other_auth)]).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (403, "session_not_found")
    );

    // 4'. Store unreachable: retry later, not "log in again".
    let mut redis = redis;
    redis.stop().await;
    let (s, body, headers) = refusal(connect(&url, &[("authorization", &auth)]).await);
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
    let fresh = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    up.kill();
    let (s, body, headers) =
        refusal(connect(&url, &[("authorization", &format!("Bearer {fresh}"))]).await);
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
        &config(None, &route(&up)),
    );
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let url = gw.url("/ws/echo");
    let (_a, _) = ws::open(&url, &token).await;
    let (_b, _) = ws::open(&url, &token).await;
    let (s, body, headers) =
        refusal(connect(&url, &[("authorization", &format!("Bearer {token}"))]).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "too_many_connections")
    );
    assert!(headers.get("retry-after").is_some());
    assert_eq!(up.connections(), 2);
    // Another session of the same user is not affected.
    let token2 = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (_c, _) = ws::open(&url, &token2).await;
}

#[tokio::test]
async fn gateway_wide_limit_gives_503() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "max_connections = 1\nmax_connections_per_session = 1",
        &config(None, &route(&up)),
    );
    let a = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let b = login(gw.addr, "bob").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let url = gw.url("/ws/echo");
    let (_a, _) = ws::open(&url, &a).await;
    let (s, body, _) = refusal(connect(&url, &[("authorization", &format!("Bearer {b}"))]).await);
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "too_many_connections")
    );
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn each_token_transport_works_and_bearer_subprotocol_is_answered() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &route(&up)));
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let url = gw.url("/ws/echo");

    let (_s, _) = connect(&url, &[("authorization", &format!("Bearer {token}"))])
        .await
        .unwrap();
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
    let gw = Gateway::start("", &config(None, &route(&up)));
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
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
    let toml = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nbalance = \"round_robin\"\nupstreams = [\"{}\", \"{}\"]\n",
        dead.url("/"),
        live.url("/")
    );
    let gw = Gateway::start("", &config(None, &toml));
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
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
    let gw = Gateway::start("handshake_timeout_ms = 300", &config(None, &route(&up)));
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
    let gw = Gateway::start("", &config(None, &route(&up)));
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
    let toml = format!(
        "[[routes]]\nname = \"a\"\npath = \"/a/*\"\nupstreams = [\"{}\"]\n",
        up.url("/agent")
    );
    let gw = Gateway::start("", &config(None, &toml));
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let auth = format!("Bearer {token}");
    for path in ["/a/../../admin", "/a/%2e%2e/admin", "/a/.%2E/admin"] {
        let (s, body, _) = refusal(connect(&gw.url(path), &[("authorization", &auth)]).await);
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
    let toml = format!(
        "[[routes]]\nname = \"slow\"\npath = \"/ws/slow\"\nupstreams = [\"ws://{silent_addr}/\"]\n"
    );
    let gw = Gateway::start(
        "handshake_timeout_ms = 4000\nmax_connections_per_session = 1",
        &config(None, &toml),
    );
    let l = login(gw.addr, "alice").await;
    let (token, sid) = (
        l["session_token"].as_str().unwrap(),
        l["session_id"].as_str().unwrap(),
    );
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /ws/slow HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The lease is taken while the gateway dials; then the client gives up.
    let path = format!("/api/session/{sid}");
    let auth = api::bearer(token);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while api::request(gw.addr, "GET", &path, &[("authorization", &auth)], None)
        .await
        .json()["connections"]
        != 1
    {
        assert!(tokio::time::Instant::now() < deadline, "lease never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    // Released well before the 30 s lease would lapse on its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while api::request(gw.addr, "GET", &path, &[("authorization", &auth)], None)
        .await
        .json()["connections"]
        != 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hung-up client's lease was leaked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
