//! Issue 16, item 8: at `PORTCULLIS_LOG=trace`, in text and in JSON, no
//! token, token signature, password, cookie value or signing key reaches any
//! log line, whichever spelling or transport carried the token.
//!
//! The scenario is everything a client does with a secret: log in, a wrong
//! password, sockets with the token in the query (every spelling, alone and
//! beside a valid credential, so both the refusal and the forwarded request
//! are logged), in the path of a prefix route, in `Authorization`, in the
//! cookie and in the `bearer, <token>` subprotocol; refresh; the cookie on
//! the API; logout. Each step is awaited; nothing sleeps.

mod support;

use std::future::Future;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use support::gateway::{Gateway, PASSWORD, SIGNING_KEY, config};
use support::http::{self as api, bearer, login};
use support::upstream::Upstream;
use support::ws::{self, connect, refusal};
use tokio_tungstenite::tungstenite::Message;

const TEST_BUDGET: Duration = Duration::from_secs(120);
const WRONG_PASSWORD: &str = "Wrong-Password-Qz7!secret";

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

/// Query spellings of the token's name a runtime might read; the gate reads
/// only the first.
const SPELLINGS: &[&str] = &[
    "session_token",
    "SESSION_TOKEN",
    "Session_Token",
    "session%5Ftoken",
    "session%5ftoken",
    "%73ession_token",
    "session-token",
    "session.token",
    "session_token[]",
];

/// Opens a socket, checks it echoes, closes it cleanly.
async fn echo_once(url: &str, headers: &[(&str, &str)]) {
    let (mut sock, _) = connect(url, headers)
        .await
        .unwrap_or_else(|e| panic!("{url}: upgrade refused: {}", ws::describe(&e)));
    sock.send(Message::text("ping-probe")).await.unwrap();
    assert_eq!(ws::next(&mut sock).await, Message::text("ping-probe"));
    sock.close(None).await.unwrap();
    let _ = ws::expect_close(&mut sock, Duration::from_secs(5)).await;
}

/// Runs the scenario against a gateway logging at trace in `format` and
/// returns its log and every secret it must not contain.
async fn scenario(format: &str) -> (String, Vec<String>) {
    let up = Upstream::start().await;
    let routes = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"{}\"]\n\
         [[routes]]\nname = \"pfx\"\npath = \"/ws/p/*\"\nupstreams = [\"{}\"]\n",
        up.url("/echo"),
        up.url("/pfx")
    );
    let gw = Gateway::start_with_env(
        "",
        &config(None, &routes),
        &[
            ("PORTCULLIS_LOG", "trace"),
            ("PORTCULLIS_LOG_FORMAT", format),
        ],
    );

    let r = api::post_json(
        gw.addr,
        "/api/auth/login",
        &json!({ "username": "alice", "password": PASSWORD }),
    )
    .await;
    assert_eq!(r.status, 200);
    let token = r.json()["session_token"].as_str().unwrap().to_string();
    let sid = r.json()["session_id"].as_str().unwrap().to_string();
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .and_then(|c| c.strip_prefix("portcullis_session="))
        .expect("a session cookie")
        .to_string();
    let r = api::post_json(
        gw.addr,
        "/api/auth/login",
        &json!({ "username": "alice", "password": WRONG_PASSWORD }),
    )
    .await;
    assert_eq!(r.error(), "invalid_credentials");
    let bob = login(gw.addr, "bob").await.token;

    let auth = bearer(&token);
    let url = gw.url("/ws/echo");
    // Every transport the gate reads.
    echo_once(&url, &[("authorization", &auth)]).await;
    echo_once(
        &url,
        &[("sec-websocket-protocol", &format!("bearer, {token}"))],
    )
    .await;
    echo_once(&format!("{url}?session_token={token}&probe=q0"), &[]).await;
    echo_once(&url, &[("cookie", &format!("portcullis_session={cookie}"))]).await;
    // Every spelling, beside a valid credential (forwarded to the runtime,
    // logged on the way) and alone (refused, logged as a refusal).
    for (i, name) in SPELLINGS.iter().enumerate() {
        let target = format!("{url}?probe=s{i}&{name}={bob}");
        echo_once(&target, &[("authorization", &auth)]).await;
        if i > 0 {
            let (status, body, _) = refusal(connect(&target, &[]).await);
            assert_eq!(
                (status, body["error"].as_str()),
                (403, Some("missing_token"))
            );
        }
    }
    // A token under another name, bare, percent-encoded, and in a path.
    let encoded = bob.replace('.', "%2E");
    for q in [
        format!("probe=o1&access={bob}"),
        format!("probe=o2&{bob}"),
        format!("probe=o3&t={encoded}"),
        format!("probe=o4&next=%2Fx%3Fsession_token%3D{bob}"),
    ] {
        echo_once(&format!("{url}?{q}"), &[("authorization", &auth)]).await;
    }
    echo_once(
        &gw.url(&format!("/ws/p/{bob}/probe-path")),
        &[("authorization", &auth)],
    )
    .await;

    // The API: refresh, the cookie, a query token it ignores, logout.
    let r = api::request(
        gw.addr,
        "POST",
        "/api/auth/refresh",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let refreshed = r.json()["session_token"].as_str().unwrap().to_string();
    let r = api::request(
        gw.addr,
        "GET",
        &format!("/api/session/{sid}?SESSION_TOKEN={refreshed}&probe=api"),
        &[("cookie", &format!("portcullis_session={cookie}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = api::request(
        gw.addr,
        "POST",
        "/api/auth/logout",
        &[("authorization", &bearer(&refreshed))],
        None,
    )
    .await;
    assert_eq!(r.status, 204);

    // Each request line is written to the log before its response is sent.
    let log = gw.log();
    assert!(log.contains("logout"), "logout was not logged:\n{log}");

    let mut secrets = vec![
        PASSWORD.to_string(),
        WRONG_PASSWORD.to_string(),
        SIGNING_KEY.to_string(),
        cookie.clone(),
    ];
    for t in [&token, &refreshed, &bob, &cookie] {
        secrets.push(t.to_string());
        secrets.push(t.rsplit('.').next().unwrap().to_string());
    }
    (log, secrets)
}

fn assert_clean(format: &str, log: &str, secrets: &[String]) {
    // The scenario was logged, at trace, request lines included.
    let trace_marker = if format == "json" {
        "\"level\":\"TRACE\""
    } else {
        " TRACE "
    };
    assert!(log.contains(trace_marker), "no trace line in:\n{log}");
    for probe in [
        "probe=q0",
        "probe=s8",
        "probe=o4",
        "probe-path",
        "probe=api",
    ] {
        assert!(log.contains(probe), "{probe} was not logged:\n{log}");
    }
    assert!(log.contains("REDACTED"), "nothing was redacted:\n{log}");
    for (n, line) in log.lines().enumerate() {
        if format == "json" {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("line {n} is not JSON ({e}): {line}"));
        }
        for secret in secrets {
            assert!(
                !line.contains(secret.as_str()),
                "{format} log line {n} contains a secret ({secret}): {line}"
            );
        }
        // Every JWT starts with base64 of `{"`.
        assert!(
            !line.contains("eyJ"),
            "{format} log line {n} has a JWT: {line}"
        );
    }
}

#[tokio::test]
async fn no_secret_reaches_a_trace_log_in_text() {
    bounded(async {
        let (log, secrets) = scenario("text").await;
        assert_clean("text", &log, &secrets);
    })
    .await;
}

#[tokio::test]
async fn no_secret_reaches_a_trace_log_in_json() {
    bounded(async {
        let (log, secrets) = scenario("json").await;
        assert_clean("json", &log, &secrets);
    })
    .await;
}
