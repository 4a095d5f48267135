//! SPEC §11 runtime hooks, end to end: the real gateway binary, a real
//! `redis-server`, and a runtime double (a real HTTP server on port 0 in
//! this process) that records every hook, checks its signature the way
//! README documents, and refuses what the test tells it to.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::hmac;
use support::gateway::{Gateway, config_with, static_auth};
use support::http::{self as api, assert_error, login, try_login};
use support::redis::RedisServer;
use tokio::sync::watch;

const SECRET: &str = "hook-secret-0123456789abcdef-0123456789";
const WITHIN: Duration = Duration::from_secs(10);

/// One hook as the runtime received it.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    body: serde_json::Value,
    raw: Vec<u8>,
    signature: String,
    /// Whether the double answered `2xx`.
    accepted: bool,
}

/// The documented check (README, "Tell your runtime about sessions"): the
/// header is the lowercase hex HMAC-SHA256 of the raw body under the shared
/// secret, compared in constant time. Written here with `ring` directly,
/// as a runtime would, not with the gateway's own code.
fn signature_ok(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(tag) = (0..header.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(header.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, &tag).is_ok()
}

struct Runtime {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    changed: watch::Receiver<usize>,
    /// `on_create` for this user is refused with 403.
    refuse_user: Arc<Mutex<Option<String>>>,
    /// Every `on_end` is answered 500 while set.
    fail_end: Arc<AtomicBool>,
    /// `on_create` for this user is recorded, then never answered.
    hang_user: Arc<Mutex<Option<String>>>,
}

impl Runtime {
    async fn start() -> Runtime {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::<Hit>::new()));
        let (tx, changed) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let refuse_user = Arc::new(Mutex::new(None::<String>));
        let fail_end = Arc::new(AtomicBool::new(false));
        let hang_user = Arc::new(Mutex::new(None::<String>));
        let (h, r, f, g) = (
            hits.clone(),
            refuse_user.clone(),
            fail_end.clone(),
            hang_user.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, r, f, g, tx) = (h.clone(), r.clone(), f.clone(), g.clone(), tx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, r, f, g, tx) =
                            (h.clone(), r.clone(), f.clone(), g.clone(), tx.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let signature = req
                                .headers()
                                .get("portcullis-signature")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let raw = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let body: serde_json::Value =
                                serde_json::from_slice(&raw).unwrap_or_default();
                            let accepted = if path.ends_with("/end") {
                                !f.load(Ordering::SeqCst)
                            } else {
                                r.lock().unwrap().as_deref() != body["user"].as_str()
                            };
                            let hang = !path.ends_with("/end")
                                && g.lock().unwrap().as_deref() == body["user"].as_str();
                            h.lock().unwrap().push(Hit {
                                path,
                                body,
                                raw,
                                signature,
                                accepted,
                            });
                            tx.send_modify(|n| *n += 1);
                            if hang {
                                std::future::pending::<()>().await;
                            }
                            let status = if accepted { 204 } else { 403 };
                            let status = if !accepted && f.load(Ordering::SeqCst) {
                                500
                            } else {
                                status
                            };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Runtime {
            addr,
            hits,
            changed,
            refuse_user,
            fail_end,
            hang_user,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Awaits (bounded) a hit satisfying `pred`, woken by each new hit.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Hit) -> bool) -> Hit {
        let mut rx = self.changed.clone();
        let found = tokio::time::timeout(WITHIN, async {
            loop {
                if let Some(h) = self.hits().into_iter().find(|h| pred(h)) {
                    return h;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{what}: not within {WITHIN:?}; hits: {:?}", self.hits()))
    }

    /// Awaits the first `on_end` for `sid`.
    async fn wait_end(&self, what: &str, sid: &str) -> Hit {
        self.wait_for(what, |h| {
            h.path.ends_with("/end") && h.body["session_id"] == sid
        })
        .await
    }

    /// `on_end` hits for `sid` (whatever the answer).
    fn ends_of(&self, sid: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.path.ends_with("/end") && h.body["session_id"] == sid)
            .collect()
    }

    fn hooks_table(&self, timeout_ms: u64) -> String {
        format!(
            "[sessions.hooks]\non_create = \"http://{0}/portcullis/sessions\"\n\
             on_end = \"http://{0}/portcullis/sessions/end\"\ntimeout_ms = {timeout_ms}\n\
             secret_env = \"PT_HOOK_SECRET\"\n",
            self.addr
        )
    }
}

fn start_gateway(store: Option<&str>, session_keys: &str, rt: &Runtime) -> Gateway {
    start_gateway_timeout(store, session_keys, rt, 2000)
}

fn start_gateway_timeout(
    store: Option<&str>,
    session_keys: &str,
    rt: &Runtime,
    timeout_ms: u64,
) -> Gateway {
    let toml = config_with(
        store,
        &format!("{session_keys}\n{}", rt.hooks_table(timeout_ms)),
        &static_auth(""),
        "",
    );
    Gateway::start_with_env("", &toml, &[("PT_HOOK_SECRET", SECRET)])
}

async fn session_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.client().await;
    redis::cmd("KEYS")
        .arg("pt:session:*")
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn on_create_comes_before_the_token_and_a_refusal_leaves_no_session() {
    let redis = RedisServer::start().await;
    let rt = Runtime::start().await;
    let gw = start_gateway(Some(&redis.url()), "", &rt);

    let alice = login(gw.addr, "alice").await;
    // Recorded by the runtime before the login answered: the double pushes
    // a hit before it answers, and the gateway answers login after it.
    let created: Vec<Hit> = rt
        .hits()
        .into_iter()
        .filter(|h| h.path == "/portcullis/sessions")
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].body["session_id"], alice.sid.as_str());
    assert_eq!(created[0].body["user"], "alice");
    assert!(
        created[0].body["expires_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // session/create asks too.
    let r = api::call(gw.addr, "POST", "/api/session/create", &alice.token).await;
    assert_eq!(r.status, 200);
    let second = r.json()["session_id"].as_str().unwrap().to_string();
    assert!(
        rt.hits()
            .iter()
            .any(|h| h.path == "/portcullis/sessions" && h.body["session_id"] == second.as_str())
    );

    // The runtime refuses bob: 502, and no session of his is in the store.
    *rt.refuse_user.lock().unwrap() = Some("bob".into());
    let r = try_login(gw.addr, "bob", support::gateway::PASSWORD).await;
    assert_error(&r, 502, "runtime_refused_session");
    let refused = rt
        .wait_for("bob's on_create", |h| h.body["user"] == "bob")
        .await;
    let refused_sid = refused.body["session_id"].as_str().unwrap().to_string();
    let keys = session_keys(&redis).await;
    assert_eq!(keys.len(), 2, "only alice's two sessions: {keys:?}");
    assert!(!keys.iter().any(|k| k.contains(&refused_sid)));
    assert!(
        rt.ends_of(&refused_sid).is_empty(),
        "no on_end for a refused session"
    );

    // Every hook carries a signature the documented check accepts, and the
    // same check rejects a wrong secret or a changed body.
    for h in rt.hits() {
        assert!(
            signature_ok(SECRET.as_bytes(), &h.raw, &h.signature),
            "{h:?}"
        );
        assert!(!signature_ok(
            b"another-secret-0123456789abcdef-0123",
            &h.raw,
            &h.signature
        ));
        let mut tampered = h.raw.clone();
        tampered[0] = b' ';
        assert!(!signature_ok(SECRET.as_bytes(), &tampered, &h.signature));
        assert!(!signature_ok(SECRET.as_bytes(), &h.raw, ""));
    }
    // The secret never reaches the log.
    assert!(!gw.log().contains(SECRET));
}

/// `logout`, `deleted` and `expired` (a session with no socket ever) are
/// each reported once the session ends, with the right reason.
async fn each_end_reason(store: Option<&str>) {
    let rt = Runtime::start().await;
    let gw = start_gateway(store, "ttl_secs = 3", &rt);

    let alice = login(gw.addr, "alice").await;
    let r = api::call(gw.addr, "POST", "/api/session/create", &alice.token).await;
    let second = r.json()["session_id"].as_str().unwrap().to_string();
    let r = api::call(
        gw.addr,
        "DELETE",
        &format!("/api/session/{second}"),
        &alice.token,
    )
    .await;
    assert_eq!(r.status, 204);
    let bob = login(gw.addr, "bob").await; // left to expire
    assert_eq!(api::logout(gw.addr, &alice.token).await.status, 204);

    let deleted = rt.wait_end("on_end deleted", &second).await;
    assert_eq!(deleted.body["reason"], "deleted");
    assert_eq!(deleted.body["user"], "alice");
    let logout = rt.wait_end("on_end logout", &alice.sid).await;
    assert_eq!(logout.body["reason"], "logout");
    let expired = rt.wait_end("on_end expired", &bob.sid).await;
    assert_eq!(expired.body["reason"], "expired");
    assert_eq!(expired.body["user"], "bob");
    for h in rt.hits() {
        assert!(signature_ok(SECRET.as_bytes(), &h.raw, &h.signature));
    }
    // Ended sessions are not reported again as expired once their TTL
    // would have passed.
    for sid in [&alice.sid, &second] {
        assert!(
            rt.ends_of(sid)
                .iter()
                .all(|h| h.body["reason"] != "expired")
        );
    }
}

#[tokio::test]
async fn on_end_for_each_reason_redis() {
    let redis = RedisServer::start().await;
    each_end_reason(Some(&redis.url())).await;
}

#[tokio::test]
async fn on_end_for_each_reason_memory() {
    each_end_reason(None).await;
}

#[tokio::test]
async fn a_pending_on_end_survives_a_sigkill_and_arrives_after_restart() {
    let redis = RedisServer::start().await;
    let rt = Runtime::start().await;
    rt.fail_end.store(true, Ordering::SeqCst);
    let mut gw = start_gateway(Some(&redis.url()), "", &rt);

    let alice = login(gw.addr, "alice").await;
    assert_eq!(api::logout(gw.addr, &alice.token).await.status, 204);
    // The runtime has refused it at least once: it is pending in the queue.
    rt.wait_for("a refused on_end", |h| {
        h.path.ends_with("/end") && h.body["session_id"] == alice.sid.as_str() && !h.accepted
    })
    .await;
    gw.signal("KILL");
    gw.wait_exit(WITHIN).await;

    rt.fail_end.store(false, Ordering::SeqCst);
    let gw = start_gateway(Some(&redis.url()), "", &rt);
    let took = rt
        .wait_for("the on_end after restart", |h| {
            h.path.ends_with("/end") && h.body["session_id"] == alice.sid.as_str() && h.accepted
        })
        .await;
    assert_eq!(took.body["reason"], "logout");
    // Taken: the queue is empty.
    let mut c = redis.client().await;
    support::wait::eventually("the outbox emptied", WITHIN, || {
        let mut c = c.clone();
        async move {
            let n: usize = redis::cmd("ZCARD")
                .arg("pt:{hooks}:jobs")
                .query_async(&mut c)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    let _ = &mut c;
    drop(gw);
}

#[tokio::test]
async fn an_unanswered_on_create_refuses_the_login_within_the_timeout() {
    let redis = RedisServer::start().await;
    let rt = Runtime::start().await;
    *rt.hang_user.lock().unwrap() = Some("bob".into());
    let gw = start_gateway_timeout(Some(&redis.url()), "", &rt, 300);
    let started = std::time::Instant::now();
    let r = try_login(gw.addr, "bob", support::gateway::PASSWORD).await;
    assert_error(&r, 502, "runtime_refused_session");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(session_keys(&redis).await.is_empty());
}

/// The gateway dies while the runtime has not answered `on_create`: the
/// session it wrote is pending (no token exists for it) and leaves the
/// store on its own within the hook timeout plus a few seconds; the
/// runtime, which did hear of it, is then told it expired.
#[tokio::test]
async fn a_gateway_killed_during_on_create_leaves_no_usable_session() {
    let redis = RedisServer::start().await;
    let rt = Runtime::start().await;
    *rt.hang_user.lock().unwrap() = Some("bob".into());
    let mut gw = start_gateway_timeout(Some(&redis.url()), "", &rt, 1000);
    let addr = gw.addr;
    let pending_login =
        tokio::spawn(async move { try_login(addr, "bob", support::gateway::PASSWORD).await });
    let hit = rt
        .wait_for("bob's on_create", |h| h.body["user"] == "bob")
        .await;
    let sid = hit.body["session_id"].as_str().unwrap().to_string();
    gw.signal("KILL");
    gw.wait_exit(WITHIN).await;
    let _ = pending_login.await; // the connection died with the gateway

    // Pending: its TTL is the hook timeout plus the margin, not ttl_secs.
    let mut c = redis.client().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("pt:session:{{{sid}}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((0..=6_000).contains(&pttl), "pending session PTTL {pttl}");

    *rt.hang_user.lock().unwrap() = None;
    let _gw = start_gateway_timeout(Some(&redis.url()), "", &rt, 1000);
    let ended = rt.wait_end("on_end for the pending session", &sid).await;
    assert_eq!(ended.body["reason"], "expired");
    assert!(session_keys(&redis).await.is_empty());
}

/// Two instances on one Redis, no leader: each end is claimed by one of
/// them and reported once (at least once is the promise; a claim's
/// visibility outlasting the hook timeout makes it once in practice).
#[tokio::test]
async fn two_instances_report_each_end_once() {
    let redis = RedisServer::start().await;
    let rt = Runtime::start().await;
    let a = start_gateway(Some(&redis.url()), "ttl_secs = 2", &rt);
    let b = start_gateway(Some(&redis.url()), "ttl_secs = 2", &rt);
    let alice = login(a.addr, "alice").await;
    let bob = login(b.addr, "bob").await; // left to expire
    // Logged out on the other instance than the one it was made on.
    assert_eq!(api::logout(b.addr, &alice.token).await.status, 204);
    let logout = rt.wait_end("on_end logout", &alice.sid).await;
    assert_eq!(logout.body["reason"], "logout");
    let expired = rt.wait_end("on_end expired", &bob.sid).await;
    assert_eq!(expired.body["reason"], "expired");
    // Both instances keep polling for a while: still one report each.
    let mut rx = rt.changed.clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(
        rt.ends_of(&alice.sid).len(),
        1,
        "{:?}",
        rt.ends_of(&alice.sid)
    );
    assert_eq!(rt.ends_of(&bob.sid).len(), 1, "{:?}", rt.ends_of(&bob.sid));
}
