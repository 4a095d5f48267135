//! SPEC §9: the browser contract (`portcullis=v1`). Refusals at checks 3-6
//! arrive as a `101` and an immediate close `4000 + status` with a JSON
//! reason, nothing dialled; every accepted socket opens with the gateway's
//! `portcullis.hello`; shared viewports hear `portcullis.role` when the
//! owner changes, on one instance and across two on one Redis.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::gateway::{Gateway, SIGNING_KEY, config, echo_route, route};
use support::http::{self as api, Login, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::ws::{self, Ws, connect, expect_close, refusal};
use tokio_tungstenite::tungstenite::Message;

const ORIGINS: &str = "allowed_origins = [\"http://app.example\"]\nmax_connections_per_session = 1";

/// Opens `url` (which carries `portcullis=v1`) and expects a refusal told
/// in band: the close code and the parsed JSON reason.
async fn refused_in_band(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (mut sock, resp) = match connect(url, headers).await {
        Ok(x) => x,
        Err(e) => panic!("expected a 101, got {}", ws::describe(&e)),
    };
    assert_eq!(resp.status(), 101);
    let (code, reason) = expect_close(&mut sock, Duration::from_secs(5)).await;
    let reason: Value = serde_json::from_str(&reason)
        .unwrap_or_else(|e| panic!("close reason {reason:?} is not JSON: {e}"));
    (code, reason)
}

fn bearer(token: &str) -> String {
    api::bearer(token)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token signed with the gateway's key whose `exp` has passed.
fn expired_token(sid: &str) -> String {
    let now = now_unix();
    let claims = json!({
        "sub": "alice", "sid": sid, "iat": now - 1000, "exp": now - 120,
        "iss": "portcullis", "aud": "runtimes", "jti": "expired",
    });
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SIGNING_KEY.as_bytes()),
    )
    .unwrap()
}

async fn next_json(sock: &mut Ws) -> Value {
    match ws::next(sock).await {
        Message::Text(t) => serde_json::from_str(&t).unwrap_or_else(|_| json!(t.to_string())),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test]
async fn every_refusal_at_checks_3_to_6_is_a_close_with_its_code_and_nothing_is_dialled() {
    let mut redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        ORIGINS,
        &config(Some(&redis.url()), &echo_route(&up.url("/echo"), "")),
    );
    let url = gw.url("/ws/echo?portcullis=v1");
    let s = login(gw.addr, "alice").await;

    // Checks 1 and 2 stay plain HTTP, parameter or not.
    let r = api::call(gw.addr, "GET", "/ws/echo?portcullis=v1", &s.token).await;
    assert_eq!((r.status, r.error().as_str()), (426, "upgrade_required"));
    let (status, body, _) = refusal(
        connect(
            &url,
            &[
                ("authorization", &bearer(&s.token)),
                ("origin", "http://evil.example"),
            ],
        )
        .await,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );

    // 3. Tokens.
    let cases = [
        ("missing_token", None),
        ("invalid_token", Some("not.a.jwt".to_string())),
        ("token_expired", Some(expired_token(&s.sid))),
    ];
    for (code, token) in cases {
        let auth = token.map(|t| bearer(&t));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let got = refused_in_band(&url, &headers).await;
        assert_eq!(got, (4403, json!({ "error": code })), "{code}");
    }
    // The token in the `bearer` subprotocol, as a browser sends it: the 101
    // names `bearer`, which browsers require before they report the close.
    let (mut sock, resp) = connect(&url, &[("sec-websocket-protocol", "bearer, not.a.jwt")])
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "bearer");
    let (code, _) = expect_close(&mut sock, Duration::from_secs(5)).await;
    assert_eq!(code, 4403);

    // 4. A session that ended.
    let ended = login(gw.addr, "alice").await;
    assert_eq!(api::logout(gw.addr, &ended.token).await.status, 204);
    let got = refused_in_band(&url, &[("authorization", &bearer(&ended.token))]).await;
    assert_eq!(got, (4403, json!({ "error": "session_not_found" })));

    // 5. The session's socket limit: the first socket is accepted (and
    // opens with the hello), the second told to retry.
    let (mut first, _) = connect(&url, &[("authorization", &bearer(&s.token))])
        .await
        .unwrap();
    assert_eq!(next_json(&mut first).await["type"], "portcullis.hello");
    let got = refused_in_band(&url, &[("authorization", &bearer(&s.token))]).await;
    assert_eq!(
        got,
        (
            4503,
            json!({ "error": "too_many_connections", "retry_after": 1 })
        )
    );
    first.close(None).await.unwrap();
    let _ = expect_close(&mut first, Duration::from_secs(5)).await;

    // 4'. The store unreachable.
    redis.stop().await;
    let got = refused_in_band(&url, &[("authorization", &bearer(&s.token))]).await;
    assert_eq!(
        got,
        (
            4503,
            json!({ "error": "session_store_unavailable", "retry_after": 2 })
        )
    );
    redis.start_again().await;
    assert_eq!(
        up.connections(),
        1,
        "only the accepted socket reached the runtime: nothing dialled for checks 3-5"
    );

    // 6. Every runtime down: every dial failed, then the close.
    let fresh = login(gw.addr, "alice").await;
    up.kill();
    let got = refused_in_band(&url, &[("authorization", &bearer(&fresh.token))]).await;
    assert_eq!(
        got,
        (
            4502,
            json!({ "error": "upstream_unavailable", "retry_after": 1 })
        )
    );

    // Still refusals: counted as such, by fault.
    let m = api::metrics(gw.addr).await;
    for fault in ["store", "upstream", "capacity"] {
        let series = format!("portcullis_refusals_total{{fault=\"{fault}\"}}");
        assert_eq!(api::sample(&m, &series), Some(1.0), "{fault}: {m}");
    }
}

#[tokio::test]
async fn an_exclusive_socket_opens_with_the_hello_and_the_parameter_stays_here() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &echo_route(&up.url("/echo"), "")));
    let s = login(gw.addr, "alice").await;

    let url = gw.url("/ws/echo?room=7&portcullis=v1");
    let (mut sock, _) = ws::open(&url, &s.token).await;
    let hello = next_json(&mut sock).await;
    assert_eq!(
        hello,
        json!({ "type": "portcullis.hello", "mode": "exclusive", "session_id": s.sid })
    );
    assert_eq!(up.next_arrival().await.path, "/echo?room=7");
    sock.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws::next(&mut sock).await, Message::text("hi"));
    assert_eq!(up.received(), vec!["hi"], "the hello never goes upstream");

    // Without the parameter nothing changes: the first frame is the runtime's.
    let (mut plain, _) = ws::open(&gw.url("/ws/echo"), &s.token).await;
    plain.send(Message::text("plain")).await.unwrap();
    assert_eq!(ws::next(&mut plain).await, Message::text("plain"));
}

fn shared_route(up: &Upstream) -> String {
    route(
        "agent",
        "/ws/agent",
        &[&up.url("/agent")],
        "mode = \"shared\"",
    )
}

/// A browser-contract viewport and its hello.
async fn viewport(gw: &Gateway, s: &Login, query: &str) -> (Ws, Value) {
    let url = gw.url(&format!("/ws/agent?portcullis=v1{query}"));
    let (mut sock, resp) = match ws::connect_bearer(&url, &s.token).await {
        Ok(x) => x,
        Err(e) => panic!("refused: {}; log:\n{}", ws::describe(&e), gw.log()),
    };
    assert_eq!(resp.status(), 101);
    let hello = next_json(&mut sock).await;
    (sock, hello)
}

/// The next two frames, a role frame and a runtime frame, in either order:
/// the role change and the frame that caused it race to the viewport.
async fn role_and_frame(sock: &mut Ws) -> (Value, Value) {
    let (a, b) = (next_json(sock).await, next_json(sock).await);
    if a.is_string() { (b, a) } else { (a, b) }
}

/// The owner `leaving` closes; `taking` is told nobody owns the session,
/// writes `text`, and is told it owns it (the echo of `text` races that).
async fn hand_over(leaving: &mut Ws, taking: &mut Ws, text: &str) {
    leaving.close(None).await.unwrap();
    let _ = expect_close(leaving, Duration::from_secs(5)).await;
    assert_eq!(next_json(taking).await, role("reader", false));
    taking.send(Message::text(text)).await.unwrap();
    assert_eq!(
        role_and_frame(taking).await,
        (role("owner", true), json!(text))
    );
}

fn role(role: &str, present: bool) -> Value {
    json!({ "type": "portcullis.role", "role": role, "owner_present": present })
}

fn shared_hello(sid: &str, role: &str, seq: u64, resume: Value) -> Value {
    json!({
        "type": "portcullis.hello", "mode": "shared", "session_id": sid,
        "role": role, "seq": seq, "resume": resume,
    })
}

#[tokio::test]
async fn shared_viewports_get_the_hello_and_a_role_frame_when_the_owner_changes() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up)));
    let s = login(gw.addr, "alice").await;

    let (mut owner, hello) = viewport(&gw, &s, "").await;
    assert_eq!(hello, shared_hello(&s.sid, "owner", 0, Value::Null));
    owner.send(Message::text("one")).await.unwrap();
    assert_eq!(next_json(&mut owner).await, json!("one"));

    let (mut reader, hello) = viewport(&gw, &s, "&resume_from=0").await;
    assert_eq!(hello, shared_hello(&s.sid, "reader", 0, json!("ok")));
    // A reader's hello cannot say whether anyone writes: the role frame
    // right behind it does.
    assert_eq!(next_json(&mut reader).await, role("reader", true));
    assert_eq!(
        next_json(&mut reader).await,
        json!("one"),
        "frame 0 replayed"
    );

    // The owner leaves: the reader is told nobody owns the session; it
    // writes, and so becomes the owner.
    hand_over(&mut owner, &mut reader, "two").await;
    // A later viewport is a reader, told so in its hello, and frames are
    // numbered without the gateway's own.
    let (mut late, hello) = viewport(&gw, &s, "").await;
    assert_eq!(hello, shared_hello(&s.sid, "reader", 2, Value::Null));
    assert_eq!(next_json(&mut late).await, role("reader", true));
    assert_eq!(up.received(), vec!["one", "two"]);
    assert_eq!(up.connections(), 1);
    assert!(!up.seen()[0].path.contains("portcullis"));
}

#[tokio::test]
async fn role_frames_cross_instances_on_one_redis() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let a = Gateway::start("", &config(Some(&redis.url()), &shared_route(&up)));
    let b = Gateway::start("", &config(Some(&redis.url()), &shared_route(&up)));
    let s = login(a.addr, "alice").await;

    let (mut on_a, hello) = viewport(&a, &s, "").await;
    assert_eq!(hello["role"], "owner");
    let (mut on_b, hello) = viewport(&b, &s, "").await;
    assert_eq!(hello["role"], "reader");
    assert_eq!(hello["mode"], "shared");
    assert_eq!(next_json(&mut on_b).await, role("reader", true));

    // The owner on A (the hub's instance) leaves: B's mirror hears it.
    on_a.close(None).await.unwrap();
    let _ = expect_close(&mut on_a, Duration::from_secs(5)).await;
    assert_eq!(next_json(&mut on_b).await, role("reader", false));

    // B claims by writing; a new viewport on A (the hub) hears the change.
    let (mut again_a, hello) = viewport(&a, &s, "").await;
    assert_eq!(hello["role"], "reader");
    assert_eq!(next_json(&mut again_a).await, role("reader", false));
    on_b.send(Message::text("from-b")).await.unwrap();
    assert_eq!(
        role_and_frame(&mut on_b).await,
        (role("owner", true), json!("from-b"))
    );
    assert_eq!(
        role_and_frame(&mut again_a).await,
        (role("reader", true), json!("from-b"))
    );

    // B leaves: A is told, claims, and is told it owns the session.
    hand_over(&mut on_b, &mut again_a, "from-a").await;
    assert_eq!(up.received(), vec!["from-b", "from-a"]);
}
