//! SPEC §2-§5: the HTTP API of the real binary over real sockets, with its
//! sessions in a real redis-server.
//!
//! Login and every "(token)" call, each refusal with its exact `error` code,
//! the login rate limit as a user meets it, tokens that must be refused
//! (forged, `alg: none`, algorithm confusion, expired, misaddressed), key
//! rotation across gateways, a Redis outage and recovery inside one gateway
//! process, an upstream credential verifier, and what must never reach the
//! log or the metrics.
//!
//! Nothing sleeps to synchronise: requests are awaited, and the two things
//! that have no event (Redis coming back, the clock passing a second) are
//! polled with a deadline.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::gateway::{Gateway, PASSWORD, SIGNING_KEY, config, config_with, static_auth};
use support::http::{
    self as api, Resp, assert_error, call, get_session, login, parse_response, refresh, sample,
    try_login,
};
use support::key_fixture;
use support::redis::RedisServer;
use support::wait::eventually;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Every test finishes within this, or fails instead of hanging the run.
const TEST_BUDGET: Duration = Duration::from_secs(120);
/// Reported times are whole seconds (truncated), so a time taken during a
/// request may fall up to this far outside the test's own bracket of it.
const CLOCK_SLACK: time::Duration = time::Duration::seconds(2);
const SESSION_TTL: i64 = 3600;
const TOKEN_TTL: i64 = 600;

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

// ---------------------------------------------------------------------------
// Redis, inspected directly (key layout: src/session/redis.rs)

fn session_key(sid: &str) -> String {
    format!("pt:session:{{{sid}}}")
}

/// Every key but the instances' heartbeat set, which each gateway writes
/// on its own schedule whatever its clients do.
async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.client().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.retain(|k| k != "pt:instances");
    keys.sort();
    keys
}

async fn session_keys(redis: &RedisServer) -> Vec<String> {
    redis_keys(redis)
        .await
        .into_iter()
        .filter(|k| k.starts_with("pt:session:"))
        .collect()
}

async fn key_exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.client().await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut c)
        .await
        .unwrap()
        == 1
}

/// Seconds left on `key`: -2 if it does not exist, -1 if it never expires.
async fn key_ttl(redis: &RedisServer, key: &str) -> i64 {
    let mut c = redis.client().await;
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

async fn stored_user(redis: &RedisServer, sid: &str) -> Option<String> {
    let mut c = redis.client().await;
    redis::cmd("HGET")
        .arg(session_key(sid))
        .arg("user")
        .query_async(&mut c)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------
// HTTP

/// A login attempt whose TCP connection comes from `from` (any address in
/// 127/8 is local on Linux), so the gateway sees a distinct client IP.
async fn login_from(addr: SocketAddr, from: IpAddr, user: &str, password: &str) -> Resp {
    let body = json!({ "username": user, "password": password }).to_string();
    api::request_from(
        Some(from),
        addr,
        "POST",
        "/api/auth/login",
        &[("content-type", "application/json")],
        Some(body.as_bytes()),
    )
    .await
}

fn local(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Sends `request` as raw bytes and parses the answer. The write runs on its
/// own task because the gateway may answer (and close) before reading all of
/// a body it refuses.
async fn send_raw(addr: SocketAddr, request: Vec<u8>) -> Resp {
    tokio::time::timeout(Duration::from_secs(15), async move {
        let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&request).await;
            wr
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let resp = loop {
            if let Some(resp) = parse_response(&buf) {
                break Some(resp);
            }
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break parse_response(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        writer.abort();
        resp.unwrap_or_else(|| {
            panic!(
                "no complete HTTP response: {:?}",
                String::from_utf8_lossy(&buf)
            )
        })
    })
    .await
    .expect("raw request timed out")
}

/// `Retry-After` as whole seconds.
#[track_caller]
fn retry_after(r: &Resp) -> u64 {
    let v = r.header("retry-after").expect("a Retry-After header");
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not whole seconds"))
}

// ---------------------------------------------------------------------------
// Times

#[track_caller]
fn utc_time(v: &Value) -> OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 string, got {v}"));
    let t =
        OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
    assert!(t.offset().is_utc(), "{s} is not UTC");
    t
}

/// `actual` was taken during a request sent at `before` and answered by
/// `after`, plus `offset` (a TTL).
#[track_caller]
fn assert_during(
    what: &str,
    actual: OffsetDateTime,
    (before, after): (OffsetDateTime, OffsetDateTime),
    offset_secs: i64,
) {
    let offset = time::Duration::seconds(offset_secs);
    let (lo, hi) = (before + offset - CLOCK_SLACK, after + offset + CLOCK_SLACK);
    assert!(
        lo <= actual && actual <= hi,
        "{what} is {actual}, expected within [{lo}, {hi}]"
    );
}

// ---------------------------------------------------------------------------
// Tokens built by hand

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// The claims the gateway itself writes, valid for five minutes.
fn claims(sid: &str, user: &str) -> Value {
    let now = now_unix();
    json!({
        "sub": user,
        "sid": sid,
        "iat": now,
        "exp": now + 300,
        "iss": "portcullis",
        "aud": "runtimes",
        "jti": "api-test-hand-built",
    })
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(secret: &[u8], kid: &str, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        kid,
        &EncodingKey::from_secret(secret),
        claims,
    )
}

/// A token with header `{"alg": alg, ...}` and an empty signature.
fn unsigned(alg: &str, claims: &Value) -> String {
    let header = json!({ "alg": alg, "typ": "JWT", "kid": "k1" });
    format!(
        "{}.{}.",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

fn token_kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).unwrap().kid
}

// ---------------------------------------------------------------------------
// 1. Login

#[tokio::test]
async fn login_stores_the_session_sets_the_cookie_and_the_cookie_alone_authenticates() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                &format!("ttl_secs = {SESSION_TTL}"),
                &static_auth(""),
                &format!("[tokens]\nttl_secs = {TOKEN_TTL}\n"),
            ),
        );
        let before = OffsetDateTime::now_utc();
        let r = try_login(gw.addr, "alice", PASSWORD).await;
        let during = (before, OffsetDateTime::now_utc());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json();
        let sid = body["session_id"].as_str().expect("session_id").to_string();
        let token = body["session_token"]
            .as_str()
            .expect("session_token")
            .to_string();
        assert!(!sid.is_empty());
        assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
        assert_eq!(body["user"], "alice");
        let token_expires = utc_time(&body["expires_at"]);
        let session_expires = utc_time(&body["session_expires_at"]);
        assert_during("expires_at (token)", token_expires, during, TOKEN_TTL);
        assert_during("session_expires_at", session_expires, during, SESSION_TTL);
        assert_eq!(
            r.header("set-cookie"),
            Some(format!("portcullis_session={token}; HttpOnly; SameSite=Strict; Path=/").as_str())
        );

        // The session exists in the store, with an expiry.
        assert_eq!(session_keys(&redis).await, vec![session_key(&sid)]);
        let ttl = key_ttl(&redis, &session_key(&sid)).await;
        assert!(
            ttl > 0 && ttl <= SESSION_TTL,
            "TTL of the session key: {ttl}"
        );
        assert_eq!(stored_user(&redis, &sid).await.as_deref(), Some("alice"));

        let r = get_session(gw.addr, &sid, &token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let s = r.json();
        assert_eq!(s["session_id"], sid.as_str());
        assert_eq!(s["user"], "alice");
        assert_eq!(s["state"], "CREATED");
        assert_eq!(s["connections"], 0);
        assert_during("created_at", utc_time(&s["created_at"]), during, 0);
        assert_eq!(utc_time(&s["expires_at"]), session_expires);

        // The cookie alone (among others) is a credential.
        let r = api::request(
            gw.addr,
            "GET",
            &format!("/api/session/{sid}"),
            &[(
                "cookie",
                &format!("theme=dark; portcullis_session={token}; lang=en"),
            )],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["session_id"], sid.as_str());
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. Refusals of login and routing

#[tokio::test]
async fn refused_and_malformed_logins_create_nothing_and_every_error_is_json() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let keys_before = redis_keys(&redis).await;

        let r = try_login(gw.addr, "alice", "not the password").await;
        assert_error(&r, 401, "invalid_credentials");
        assert!(r.header("set-cookie").is_none());
        let r = try_login(gw.addr, "nobody", PASSWORD).await;
        assert_error(&r, 401, "invalid_credentials");
        assert_eq!(
            redis_keys(&redis).await,
            keys_before,
            "a refused login wrote to Redis"
        );

        let json_headers = [("content-type", "application/json")];
        for (what, body) in [
            ("truncated JSON", r#"{"username": "alice", "pass"#),
            ("not JSON", "username=alice&password=x"),
            ("empty body", ""),
            ("missing password", r#"{"username": "alice"}"#),
            ("missing username", r#"{"password": "x"}"#),
            ("wrong type", r#"{"username": "alice", "password": 12345}"#),
        ] {
            let r = api::request(
                gw.addr,
                "POST",
                "/api/auth/login",
                &json_headers,
                Some(body.as_bytes()),
            )
            .await;
            assert_eq!(r.status, 400, "{what}: {}", String::from_utf8_lossy(&r.body));
            assert_error(&r, 400, "bad_request");
        }

        // Over 64 KiB: refused before it is parsed, let alone hashed.
        let big = json!({ "username": "alice", "password": "x".repeat(70 * 1024) }).to_string();
        let mut raw = format!(
            "POST /api/auth/login HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            gw.addr,
            big.len()
        )
        .into_bytes();
        raw.extend_from_slice(big.as_bytes());
        let r = send_raw(gw.addr, raw).await;
        assert_error(&r, 413, "payload_too_large");

        // Wrong method: 405 with Allow.
        let r = api::request(gw.addr, "GET", "/api/auth/login", &[], None).await;
        assert_error(&r, 405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some("POST"));
        let r = api::request(gw.addr, "PUT", "/api/session/whatever", &[], None).await;
        assert_error(&r, 405, "method_not_allowed");
        let allow = r.header("allow").expect("Allow on 405");
        assert!(allow.contains("GET") && allow.contains("DELETE"), "{allow}");

        // Unknown paths.
        for path in ["/api/nope", "/nothing/here", "/api/session/a/b", "/api/auth"] {
            let r = api::request(gw.addr, "GET", path, &[], None).await;
            assert_error(&r, 404, "not_found");
        }

        assert_eq!(
            redis_keys(&redis).await,
            keys_before,
            "a refused request wrote to Redis"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. The login rate limit, as a user meets it

#[tokio::test]
async fn ten_failures_lock_the_username_and_the_ip_even_for_the_right_password() {
    bounded(async {
        let redis = RedisServer::start().await;
        // The SPEC default (10 per minute): no override.
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let attacker = local(1);
        for i in 0..10 {
            let r = login_from(gw.addr, attacker, "alice", &format!("guess-{i}")).await;
            assert_error(&r, 401, "invalid_credentials");
        }
        // The 11th attempt is refused without being checked, right password or not.
        let r = login_from(gw.addr, attacker, "alice", PASSWORD).await;
        assert_error(&r, 429, "rate_limited");
        let wait = retry_after(&r);
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
        assert!(r.header("set-cookie").is_none());

        // The same IP cannot switch to another user.
        let r = login_from(gw.addr, attacker, "bob", PASSWORD).await;
        assert_error(&r, 429, "rate_limited");
        // alice is locked from every IP for now...
        let r = login_from(gw.addr, local(2), "alice", PASSWORD).await;
        assert_error(&r, 429, "rate_limited");
        // ...while another user on another IP is unaffected.
        let r = login_from(gw.addr, local(2), "bob", PASSWORD).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(session_keys(&redis).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn one_ip_spraying_many_usernames_is_limited_by_ip() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                "",
                &static_auth("login_attempts_per_minute = 3"),
                "",
            ),
        );
        let sprayer = local(3);
        for user in ["root", "admin", "carol"] {
            let r = login_from(gw.addr, sprayer, user, "hunter2").await;
            assert_error(&r, 401, "invalid_credentials");
        }
        // alice never failed, but the IP did, three times.
        let r = login_from(gw.addr, sprayer, "alice", PASSWORD).await;
        assert_error(&r, 429, "rate_limited");
        assert!((1..=60).contains(&retry_after(&r)));
        // alice herself is not locked out by somebody else's spray.
        let r = login_from(gw.addr, local(4), "alice", PASSWORD).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    })
    .await;
}

#[tokio::test]
async fn one_username_guessed_from_many_ips_is_limited_by_username() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                "",
                &static_auth("login_attempts_per_minute = 3"),
                "",
            ),
        );
        // A distributed guess: one failure per IP, three for alice.
        for last in 10..13 {
            let r = login_from(gw.addr, local(last), "alice", "letmein").await;
            assert_error(&r, 401, "invalid_credentials");
        }
        let r = login_from(gw.addr, local(13), "alice", PASSWORD).await;
        assert_error(&r, 429, "rate_limited");
        assert!((1..=60).contains(&retry_after(&r)));
        // None of those IPs is limited for another user.
        let r = login_from(gw.addr, local(10), "bob", PASSWORD).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    })
    .await;
}

#[tokio::test]
async fn zero_login_attempts_per_minute_never_limits() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                "",
                &static_auth("login_attempts_per_minute = 0"),
                "",
            ),
        );
        for i in 0..12 {
            let r = try_login(gw.addr, "alice", &format!("guess-{i}")).await;
            assert_error(&r, 401, "invalid_credentials");
        }
        let r = try_login(gw.addr, "alice", PASSWORD).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Tokens that must be refused

/// `token` gets 401 `code` from both GET /api/session/{sid} and refresh.
async fn assert_refused(gw: &Gateway, sid: &str, token: &str, code: &str, what: &str) {
    for r in [
        get_session(gw.addr, sid, token).await,
        refresh(gw.addr, token).await,
    ] {
        assert_eq!(
            (r.status, r.error().as_str()),
            (401, code),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_error(&r, 401, code);
    }
}

#[tokio::test]
async fn forged_unsigned_confused_expired_and_misaddressed_tokens_get_401_with_their_code() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let sid = login(gw.addr, "alice").await.sid;
        let good = claims(&sid, "alice");

        // Control: a token built here the way the gateway builds its own is
        // accepted, so each refusal below is due to the one thing changed.
        let control = hs256(SIGNING_KEY.as_bytes(), "k1", &good);
        assert_eq!(get_session(gw.addr, &sid, &control).await.status, 200);
        assert_eq!(refresh(gw.addr, &control).await.status, 200);

        let other_key = b"another-signing-key-0123456789abcdef-xyz";
        let rsa = EncodingKey::from_rsa_pem(&key_fixture("rsa_a.pem")).unwrap();
        let mut expired = good.clone();
        expired["iat"] = json!(now_unix() - 1000);
        expired["exp"] = json!(now_unix() - 120);
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = json!("someone-else");
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = json!("evil-issuer");
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");

        let cases: Vec<(&str, String, &str)> = vec![
            (
                "signed with another HS256 key",
                hs256(other_key, "k1", &good),
                "invalid_token",
            ),
            ("alg none", unsigned("none", &good), "invalid_token"),
            ("alg None", unsigned("None", &good), "invalid_token"),
            (
                "alg none with the control's signature",
                format!(
                    "{}{}",
                    unsigned("none", &good),
                    control.rsplit('.').next().unwrap()
                ),
                "invalid_token",
            ),
            (
                "RS256 header, real RSA signature",
                sign(Algorithm::RS256, "k1", &rsa, &good),
                "invalid_token",
            ),
            (
                "HS256 keyed with an RSA public key",
                hs256(&key_fixture("rsa_a_public.pem"), "k1", &good),
                "invalid_token",
            ),
            (
                "unknown kid",
                hs256(SIGNING_KEY.as_bytes(), "k9", &good),
                "invalid_token",
            ),
            (
                "expired",
                hs256(SIGNING_KEY.as_bytes(), "k1", &expired),
                "token_expired",
            ),
            (
                "expired and forged",
                hs256(other_key, "k1", &expired),
                "invalid_token",
            ),
            (
                "wrong aud",
                hs256(SIGNING_KEY.as_bytes(), "k1", &wrong_aud),
                "invalid_token",
            ),
            (
                "wrong iss",
                hs256(SIGNING_KEY.as_bytes(), "k1", &wrong_iss),
                "invalid_token",
            ),
            (
                "no exp",
                hs256(SIGNING_KEY.as_bytes(), "k1", &no_exp),
                "invalid_token",
            ),
            ("not a JWT", "not.a.jwt".to_string(), "invalid_token"),
        ];
        for (what, token, code) in &cases {
            assert_refused(&gw, &sid, token, code, what).await;
        }

        // No token at all.
        for (method, path) in [
            ("GET", format!("/api/session/{sid}")),
            ("POST", "/api/auth/refresh".to_string()),
        ] {
            let r = api::request(gw.addr, method, &path, &[], None).await;
            assert_error(&r, 401, "missing_token");
        }
        // The session itself was never harmed.
        assert_eq!(get_session(gw.addr, &sid, &control).await.status, 200);
    })
    .await;
}

#[tokio::test]
async fn an_rs256_gateway_refuses_hs256_tokens_keyed_with_its_public_key() {
    bounded(async {
        let redis = RedisServer::start().await;
        let key_file =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/rsa_a.pem");
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                "",
                &static_auth(""),
                &format!(
                    "[tokens]\nalgorithm = \"RS256\"\nsigning_key_file = \"{}\"\nkid = \"k1\"\n",
                    key_file.display()
                ),
            ),
        );
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.clone();
        let real = issued.token.as_str();
        assert_eq!(
            jsonwebtoken::decode_header(real).unwrap().alg,
            Algorithm::RS256
        );
        let good = claims(&sid, "alice");
        let control = sign(
            Algorithm::RS256,
            "k1",
            &EncodingKey::from_rsa_pem(&key_fixture("rsa_a.pem")).unwrap(),
            &good,
        );
        assert_eq!(get_session(gw.addr, &sid, &control).await.status, 200);

        for public in ["rsa_a_public.pem", "rsa_a_public_pkcs1.pem"] {
            let forged = hs256(&key_fixture(public), "k1", &good);
            assert_refused(&gw, &sid, &forged, "invalid_token", public).await;
        }
        let other_rsa = sign(
            Algorithm::RS256,
            "k1",
            &EncodingKey::from_rsa_pem(&key_fixture("rsa_b.pem")).unwrap(),
            &good,
        );
        assert_refused(&gw, &sid, &other_rsa, "invalid_token", "another RSA key").await;
        assert_refused(
            &gw,
            &sid,
            &unsigned("none", &good),
            "invalid_token",
            "alg none",
        )
        .await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. Another user's session

#[tokio::test]
async fn another_users_session_is_not_found_for_get_and_delete() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let alice = login(gw.addr, "alice").await;
        let bob = login(gw.addr, "bob").await;
        let alice_token = alice.token.as_str();
        let bob_token = bob.token.as_str();
        let bob_sid = bob.sid.as_str();

        let r = get_session(gw.addr, bob_sid, alice_token).await;
        assert_error(&r, 404, "session_not_found");
        let r = call(
            gw.addr,
            "DELETE",
            &format!("/api/session/{bob_sid}"),
            alice_token,
        )
        .await;
        assert_error(&r, 404, "session_not_found");
        // Indistinguishable from a session that does not exist.
        let missing = "0".repeat(bob_sid.len());
        let r = get_session(gw.addr, &missing, alice_token).await;
        assert_error(&r, 404, "session_not_found");

        assert!(key_exists(&redis, &session_key(bob_sid)).await);
        let r = get_session(gw.addr, bob_sid, bob_token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["user"], "bob");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. Ending, refreshing and adding sessions

#[tokio::test]
async fn logout_ends_the_session_and_its_token() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.as_str();
        let token = issued.token.as_str();
        assert!(key_exists(&redis, &session_key(sid)).await);

        let r = call(gw.addr, "POST", "/api/auth/logout", token).await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        assert!(!key_exists(&redis, &session_key(sid)).await);

        assert_refused(&gw, sid, token, "session_not_found", "after logout").await;
        for path in ["/api/auth/logout", "/api/session/create"] {
            let r = call(gw.addr, "POST", path, token).await;
            assert_error(&r, 401, "session_not_found");
        }

        // The cookie alone logs out too.
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.as_str();
        let token = issued.token.as_str();
        let cookie = format!("portcullis_session={token}");
        let r = api::request(
            gw.addr,
            "POST",
            "/api/auth/logout",
            &[("cookie", &cookie)],
            None,
        )
        .await;
        assert_eq!(r.status, 204);
        assert!(!key_exists(&redis, &session_key(sid)).await);
        assert_refused(&gw, sid, token, "session_not_found", "after cookie logout").await;
    })
    .await;
}

#[tokio::test]
async fn delete_ends_that_session_only() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let first = login(gw.addr, "alice").await;
        let second = login(gw.addr, "alice").await;
        let (sid1, token1) = (first.sid.as_str(), first.token.as_str());
        let (sid2, token2) = (second.sid.as_str(), second.token.as_str());
        assert_ne!(sid1, sid2);

        let r = call(gw.addr, "DELETE", &format!("/api/session/{sid2}"), token1).await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.body.is_empty());
        assert!(!key_exists(&redis, &session_key(sid2)).await);
        assert_refused(&gw, sid2, token2, "session_not_found", "deleted session").await;
        let r = get_session(gw.addr, sid2, token1).await;
        assert_error(&r, 404, "session_not_found");
        let r = call(gw.addr, "DELETE", &format!("/api/session/{sid2}"), token1).await;
        assert_error(&r, 404, "session_not_found");

        // The caller's own session is untouched, and can delete itself.
        assert_eq!(get_session(gw.addr, sid1, token1).await.status, 200);
        let r = call(gw.addr, "DELETE", &format!("/api/session/{sid1}"), token1).await;
        assert_eq!(r.status, 204);
        assert_refused(&gw, sid1, token1, "session_not_found", "self-deleted").await;
        assert!(session_keys(&redis).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn refresh_issues_a_new_token_for_the_same_session_and_slides_its_expiry() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                &format!("ttl_secs = {SESSION_TTL}"),
                &static_auth(""),
                "",
            ),
        );
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.as_str();
        let token = issued.token.as_str();
        let first_expiry = utc_time(&issued.body["session_expires_at"]);

        // In the store: age the session by hand, then refresh restores its TTL.
        let key = session_key(sid);
        let mut c = redis.client().await;
        let _: i64 = redis::cmd("EXPIRE")
            .arg(&key)
            .arg(5)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(key_ttl(&redis, &key).await <= 5);
        let r = refresh(gw.addr, token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let ttl = key_ttl(&redis, &key).await;
        assert!(ttl > SESSION_TTL - 60, "TTL after refresh: {ttl}");

        // Through the API: session_expires_at moves forward as time passes.
        // Times have one-second resolution, so poll until the clock ticks.
        let (body, during) = eventually(
            "session_expires_at sliding past the first expiry",
            Duration::from_secs(5),
            || async {
                let before = OffsetDateTime::now_utc();
                let r = refresh(gw.addr, token).await;
                let during = (before, OffsetDateTime::now_utc());
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let body = r.json();
                let expiry = utc_time(&body["session_expires_at"]);
                if expiry > first_expiry {
                    Ok((body, during))
                } else {
                    Err(format!("{expiry}, first {first_expiry}"))
                }
            },
        )
        .await;
        let new_token = body["session_token"].as_str().unwrap();
        assert_eq!(body["session_id"], sid);
        assert_eq!(body["user"], "alice");
        assert_ne!(new_token, token);
        let new_expiry = utc_time(&body["session_expires_at"]);
        assert_during("session_expires_at", new_expiry, during, SESSION_TTL);
        utc_time(&body["expires_at"]);

        // The new token works and the session reports the slid expiry.
        let r = get_session(gw.addr, sid, new_token).await;
        assert_eq!(r.status, 200);
        assert_eq!(utc_time(&r.json()["expires_at"]), new_expiry);
        assert_eq!(
            session_keys(&redis).await.len(),
            1,
            "refresh made a session"
        );
    })
    .await;
}

#[tokio::test]
async fn session_create_adds_another_session_for_the_same_user() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.as_str();
        let token = issued.token.as_str();

        let r = call(gw.addr, "POST", "/api/session/create", token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let created = r.json();
        let new_sid = created["session_id"].as_str().unwrap();
        let new_token = created["session_token"].as_str().unwrap();
        assert_ne!(new_sid, sid);
        assert_eq!(created["user"], "alice");
        utc_time(&created["expires_at"]);
        utc_time(&created["session_expires_at"]);

        assert!(key_exists(&redis, &session_key(new_sid)).await);
        assert_eq!(stored_user(&redis, new_sid).await.as_deref(), Some("alice"));
        let r = get_session(gw.addr, new_sid, new_token).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["state"], "CREATED");
        // Both sessions are alice's, and both live.
        assert_eq!(get_session(gw.addr, sid, new_token).await.status, 200);
        assert_eq!(get_session(gw.addr, sid, token).await.status, 200);
        assert_eq!(session_keys(&redis).await.len(), 2);
    })
    .await;
}

// ---------------------------------------------------------------------------
// 7. Redis outage

#[tokio::test]
async fn redis_outage_gives_503_and_the_same_process_recovers() {
    bounded(async {
        let mut redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let issued = login(gw.addr, "alice").await;
        let sid = issued.sid.clone();
        let token = issued.token.clone();
        let readyz = || api::request(gw.addr, "GET", "/readyz", &[], None);
        let healthz = || api::request(gw.addr, "GET", "/healthz", &[], None);
        assert_eq!(readyz().await.status, 200);

        redis.stop().await;

        let r = try_login(gw.addr, "alice", PASSWORD).await;
        assert_error(&r, 503, "session_store_unavailable");
        assert!(retry_after(&r) >= 1);
        let r = get_session(gw.addr, &sid, &token).await;
        assert_error(&r, 503, "session_store_unavailable");
        assert!(retry_after(&r) >= 1);
        let r = refresh(gw.addr, &token).await;
        assert_error(&r, 503, "session_store_unavailable");
        assert_eq!(readyz().await.status, 503);
        assert_eq!(healthz().await.status, 200);

        redis.start_again().await;
        eventually(
            "/readyz recovering after Redis came back",
            Duration::from_secs(20),
            || async { readyz().await.status == 200 },
        )
        .await;
        // Same gateway process: login works again. (The restarted Redis is
        // empty, so the old session is gone.)
        let again = login(gw.addr, "alice").await;
        let new_sid = again.sid.as_str();
        let new_token = again.token.as_str();
        assert_eq!(get_session(gw.addr, new_sid, new_token).await.status, 200);
        assert!(key_exists(&redis, &session_key(new_sid)).await);
        let r = get_session(gw.addr, &sid, &token).await;
        assert_error(&r, 401, "session_not_found");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 8. Key rotation across gateways

const KEY_0: &str = "rotation-key-zero-0123456789abcdefghijklmn";
const KEY_1: &str = "rotation-key-one-0123456789abcdefghijklmno";

#[tokio::test]
async fn a_previous_key_keeps_old_tokens_valid_on_a_rotated_gateway() {
    bounded(async {
        let redis = RedisServer::start().await;
        let old = Gateway::start_with_env(
            "",
            &config_with(Some(&redis.url()), "", &static_auth(""), "[tokens]\nkid = \"k0\"\n"),
            &[("PORTCULLIS_SIGNING_KEY", KEY_0)],
        );
        let rotated = Gateway::start_with_env(
            "",
            &config_with(Some(&redis.url()),
                "",
                &static_auth(""),
                "[tokens]\nkid = \"k1\"\n\n[[tokens.previous_keys]]\nkid = \"k0\"\nkey_env = \"PT_API_TEST_PREVIOUS_KEY\"\n",
            ),
            &[
                ("PORTCULLIS_SIGNING_KEY", KEY_1),
                ("PT_API_TEST_PREVIOUS_KEY", KEY_0),
            ],
        );
        let fresh = Gateway::start_with_env(
            "",
            &config_with(Some(&redis.url()), "", &static_auth(""), "[tokens]\nkid = \"k1\"\n"),
            &[("PORTCULLIS_SIGNING_KEY", KEY_1)],
        );

        let issued = login(old.addr, "alice").await;
        let sid = issued.sid.as_str();
        let k0_token = issued.token.as_str();
        assert_eq!(token_kid(k0_token).as_deref(), Some("k0"));

        let r = get_session(rotated.addr, sid, k0_token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["user"], "alice");
        let r = get_session(fresh.addr, sid, k0_token).await;
        assert_error(&r, 401, "invalid_token");

        // The kid picks the key: K0's signature under kid k1 is not accepted.
        let relabelled = hs256(KEY_0.as_bytes(), "k1", &claims(sid, "alice"));
        let r = get_session(rotated.addr, sid, &relabelled).await;
        assert_error(&r, 401, "invalid_token");

        // Refreshing on the rotated gateway moves the client to the new key.
        let r = refresh(rotated.addr, k0_token).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let k1_token = r.json()["session_token"].as_str().unwrap().to_string();
        assert_eq!(token_kid(&k1_token).as_deref(), Some("k1"));
        assert_eq!(get_session(fresh.addr, sid, &k1_token).await.status, 200);
        let r = get_session(old.addr, sid, &k1_token).await;
        assert_error(&r, 401, "invalid_token");
    })
    .await;
}

// ---------------------------------------------------------------------------
// 9. Upstream credential verifier

/// One request the verifier received.
#[derive(Debug, Clone)]
struct VerifierCall {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Value,
}

/// A real HTTP verifier on port 0. Answers by username: `carol` with
/// password `carol-password` → 200 `{"user":"carol"}`; `boom` → 500;
/// `silent` → never answers; anything else → 401.
struct Verifier {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<VerifierCall>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Verifier {
    async fn start() -> Verifier {
        Self::start_on("127.0.0.1:0").await
    }

    async fn start_on(bind: &str) -> Verifier {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let calls2 = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let calls = calls2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(req, calls.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Verifier { addr, calls, task }
    }

    /// `http://127.0.0.1:<port>/verify`, or `http://[::1]:<port>/verify`.
    fn url(&self) -> String {
        format!("http://{}/verify", self.addr)
    }

    fn calls(&self) -> Vec<VerifierCall> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: http::Request<Incoming>,
    calls: Arc<Mutex<Vec<VerifierCall>>>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    calls.lock().unwrap().push(VerifierCall {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.clone(),
    });
    let reply = |status: u16, text: &str| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text.to_string())))
            .unwrap()
    };
    Ok(match body["username"].as_str() {
        Some("carol") if body["password"] == "carol-password" => reply(200, r#"{"user":"carol"}"#),
        Some("boom") => reply(500, r#"{"oops":"verifier crashed"}"#),
        Some("silent") => std::future::pending().await,
        _ => reply(401, r#"{"denied":true}"#),
    })
}

fn upstream_auth(verifier: &Verifier, keys: &str) -> String {
    format!(
        "[auth]\nkind = \"upstream\"\nurl = \"{}\"\n{keys}\n",
        verifier.url()
    )
}

#[tokio::test]
async fn upstream_verifier_decides_logins_and_receives_the_credentials_as_json() {
    bounded(async {
        let redis = RedisServer::start().await;
        let verifier = Verifier::start().await;
        let gw = Gateway::start(
            "",
            &config_with(Some(&redis.url()), "", &upstream_auth(&verifier, ""), ""),
        );

        let r = try_login(gw.addr, "carol", "carol-password").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json();
        assert_eq!(body["user"], "carol");
        let sid = body["session_id"].as_str().unwrap();
        let token = body["session_token"].as_str().unwrap();
        assert_eq!(stored_user(&redis, sid).await.as_deref(), Some("carol"));
        let r = get_session(gw.addr, sid, token).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["user"], "carol");

        let calls = verifier.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let c = &calls[0];
        assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", "/verify"));
        assert!(
            c.content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json")),
            "{c:?}"
        );
        assert_eq!(
            c.body,
            json!({ "username": "carol", "password": "carol-password" })
        );

        let keys = session_keys(&redis).await;
        let r = try_login(gw.addr, "carol", "wrong").await;
        assert_error(&r, 401, "invalid_credentials");
        let r = try_login(gw.addr, "dave", "whatever").await;
        assert_error(&r, 401, "invalid_credentials");
        let r = try_login(gw.addr, "boom", "whatever").await;
        assert_error(&r, 502, "auth_upstream_unavailable");
        assert_eq!(
            session_keys(&redis).await,
            keys,
            "a refused login made a session"
        );
        assert_eq!(verifier.calls().len(), 4);
    })
    .await;
}

#[tokio::test]
async fn upstream_verifier_that_never_answers_gives_502_after_its_timeout() {
    bounded(async {
        let redis = RedisServer::start().await;
        let verifier = Verifier::start().await;
        let gw = Gateway::start(
            "",
            &config_with(
                Some(&redis.url()),
                "",
                &upstream_auth(&verifier, "upstream_timeout_ms = 300"),
                "",
            ),
        );
        let started = Instant::now();
        let r = try_login(gw.addr, "silent", "whatever").await;
        let took = started.elapsed();
        assert_error(&r, 502, "auth_upstream_unavailable");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "answered after {took:?}"
        );
        // The verifier was asked: the 502 comes from its silence.
        assert_eq!(verifier.calls().len(), 1);
        assert!(session_keys(&redis).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn upstream_verifier_on_an_ipv6_literal_url_is_reached() {
    bounded(async {
        let redis = RedisServer::start().await;
        let verifier = Verifier::start_on("[::1]:0").await;
        assert!(verifier.url().starts_with("http://[::1]:"));
        let gw = Gateway::start(
            "",
            &config_with(Some(&redis.url()), "", &upstream_auth(&verifier, ""), ""),
        );
        let r = try_login(gw.addr, "carol", "carol-password").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["user"], "carol");
        assert_eq!(verifier.calls().len(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------
// 10-11. Secrets stay out of logs and metrics

/// The parts of a JWT that would let someone reuse it.
fn secret_parts(token: &str) -> Vec<String> {
    let sig = token.rsplit('.').next().unwrap().to_string();
    vec![token.to_string(), sig]
}

#[tokio::test]
async fn tokens_passwords_keys_and_cookies_never_reach_the_debug_log() {
    bounded(async {
        let redis = RedisServer::start().await;
        let route = "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"ws://127.0.0.1:9/echo\"]\n";
        let gw = Gateway::start("", &config_with(Some(&redis.url()), "", &static_auth(""), route));
        let wrong_password = "Wrong-Password-Qz7!secret";

        let alice = login(gw.addr, "alice").await;
        let sid = alice.sid.clone();
        let token = alice.token.clone();
        let r = try_login(gw.addr, "alice", wrong_password).await;
        assert_eq!(r.status, 401);
        let r = try_login(gw.addr, "nobody", wrong_password).await;
        assert_eq!(r.status, 401);
        let r = try_login(gw.addr, "alice", PASSWORD).await;
        assert_eq!(r.status, 200);
        let cookie_value = r
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .and_then(|c| c.strip_prefix("portcullis_session="))
            .expect("a session cookie")
            .to_string();
        let bob_token = login(gw.addr, "bob").await.token;

        let r = refresh(gw.addr, &token).await;
        assert_eq!(r.status, 200);
        let refreshed = r.json()["session_token"].as_str().unwrap().to_string();
        assert_eq!(get_session(gw.addr, &sid, &token).await.status, 200);
        let r = api::request(
            gw.addr,
            "GET",
            &format!("/api/session/{sid}"),
            &[("cookie", &format!("portcullis_session={cookie_value}"))],
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        // A token in the query: the API ignores it, but the URL is logged.
        let r = api::request(
            gw.addr,
            "GET",
            &format!("/api/session/{sid}?session_token={refreshed}&probe=api-log-probe-1"),
            &[],
            None,
        )
        .await;
        assert_error(&r, 401, "missing_token");
        let r = api::request(
            gw.addr,
            "GET",
            &format!("/ws/echo?probe=api-log-probe-2&session_token={bob_token}"),
            &[],
            None,
        )
        .await;
        assert_eq!(r.status, 426);
        let r = call(gw.addr, "POST", "/api/auth/logout", &refreshed).await;
        assert_eq!(r.status, 204);

        let log = gw.log();
        assert!(log.contains("login"), "no login was logged:\n{log}");
        for probe in ["api-log-probe-1", "api-log-probe-2"] {
            assert!(
                log.contains(probe),
                "the request carrying {probe} was not logged:\n{log}"
            );
        }
        let mut secrets = vec![
            PASSWORD.to_string(),
            wrong_password.to_string(),
            SIGNING_KEY.to_string(),
            cookie_value.clone(),
        ];
        for t in [&token, &refreshed, &bob_token, &cookie_value] {
            secrets.extend(secret_parts(t));
        }
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "the log contains a secret ({secret}):\n{log}"
            );
        }
        // Every JWT starts with base64 of `{"`: none may appear at all.
        assert!(!log.contains("eyJ"), "the log contains a JWT:\n{log}");
    })
    .await;
}

#[tokio::test]
async fn metrics_count_logins_by_result_and_sessions_and_never_show_a_token() {
    bounded(async {
        let redis = RedisServer::start().await;
        let gw = Gateway::start("", &config(Some(&redis.url()), ""));
        let mut tokens = Vec::new();
        for user in ["alice", "bob"] {
            tokens.push(login(gw.addr, user).await.token);
        }
        assert_eq!(try_login(gw.addr, "alice", "wrong").await.status, 401);
        let r = call(gw.addr, "POST", "/api/session/create", &tokens[0]).await;
        assert_eq!(r.status, 200);
        tokens.push(r.json()["session_token"].as_str().unwrap().to_string());
        let r = refresh(gw.addr, &tokens[1]).await;
        assert_eq!(r.status, 200);
        tokens.push(r.json()["session_token"].as_str().unwrap().to_string());

        let r = api::request(gw.addr, "GET", "/metrics", &[], None).await;
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body.clone()).unwrap();
        assert_eq!(
            sample(&text, "portcullis_logins_total{result=\"ok\"}"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "portcullis_logins_total{result=\"invalid_credentials\"}"
            ),
            Some(1.0),
            "{text}"
        );
        // Two logins and one session/create.
        assert_eq!(
            sample(&text, "portcullis_sessions_created_total"),
            Some(3.0),
            "{text}"
        );
        let login_requests = sample(
            &text,
            "portcullis_http_request_duration_seconds_count{endpoint=\"login\"}",
        );
        assert_eq!(login_requests, Some(3.0), "{text}");
        assert!(
            text.contains("portcullis_http_request_duration_seconds_bucket{"),
            "{text}"
        );
        for t in &tokens {
            for part in secret_parts(t) {
                assert!(!text.contains(&part), "metrics contain a token:\n{text}");
            }
        }
        assert!(!text.contains("eyJ") && !text.contains(PASSWORD));
    })
    .await;
}
