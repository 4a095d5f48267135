//! Issue 16, items 9 and 10, against the real binary and a real Redis.
//!
//! 9. Logins sent while Redis is frozen (SIGSTOP) answer `503`; once Redis
//!    runs again none of them has left a session (their commands were
//!    already queued in Redis and ran late), and sessions of logins that
//!    answered `200` are untouched.
//! 10. `auth.max_sessions_per_user`: the session beyond it is refused `429
//!     too_many_sessions`, by login and by `POST /api/session/create`,
//!     counted across two gateways sharing one Redis and in the memory store;
//!     logout and `DELETE /api/session/{id}` free a slot.
//!
//! No sleep synchronises anything: each wait is for a response, or (for the
//! repairs Redis runs after it resumes, which have no event a client could
//! await) a bounded poll of the store itself.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use support::gateway::{Gateway, config_with, static_auth};
use support::http::{self as api, assert_error, call, login, logout, try_login};
use support::redis::RedisServer;
use support::wait::eventually;

const TEST_BUDGET: Duration = Duration::from_secs(120);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

/// A gateway on `store` (a Redis URL, or memory) with `auth_keys` in `[auth]`.
fn gateway(store: Option<&str>, auth_keys: &str) -> Gateway {
    Gateway::start("", &config_with(store, "", &static_auth(auth_keys), ""))
}

/// The ids of every `pt:<kind>:{id}` key in Redis.
async fn ids(redis: &RedisServer, kind: &str) -> BTreeSet<String> {
    let mut c = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("pt:{kind}:*"))
        .query_async(&mut c)
        .await
        .expect("KEYS");
    keys.iter()
        .map(|k| {
            k.strip_prefix(&format!("pt:{kind}:"))
                .unwrap()
                .trim_matches(|c| c == '{' || c == '}')
                .to_string()
        })
        .collect()
}

async fn create_session(gw: &Gateway, token: &str) -> api::Resp {
    call(gw.addr, "POST", "/api/session/create", token).await
}

/// The documented refusal of one session too many.
#[track_caller]
fn refused(r: &api::Resp) {
    assert_error(r, 429, "too_many_sessions");
}

fn field(r: &api::Resp, name: &str) -> String {
    r.json()[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {}", String::from_utf8_lossy(&r.body)))
        .to_string()
}

#[tokio::test]
async fn logins_answered_503_while_redis_is_frozen_leave_no_session() {
    bounded(async {
        let redis = RedisServer::start().await;
        // One gateway with the per-user limit (a login reserves a slot,
        // then creates), one without (a login only creates): both paths.
        let limited = gateway(Some(&redis.url()), "");
        let unlimited = gateway(Some(&redis.url()), "max_sessions_per_user = 0");
        let before = [
            login(limited.addr, "alice").await,
            login(unlimited.addr, "bob").await,
        ];

        redis.pause();
        let logins = (0..12).map(|i| {
            let addr = if i % 2 == 0 {
                limited.addr
            } else {
                unlimited.addr
            };
            let user = if i % 3 == 0 { "alice" } else { "bob" };
            tokio::spawn(async move { try_login(addr, user, support::gateway::PASSWORD).await })
        });
        let answers = futures_join(logins).await;
        redis.resume();
        for r in &answers {
            assert_error(r, 503, "session_store_unavailable");
        }

        // Each login that answered 503 is marked abandoned in the store by
        // its gateway's repair queue; once all are, no late create can make
        // a session any more.
        let refused = answers.len();
        eventually(
            "every 503 login marked abandoned",
            Duration::from_secs(20),
            || async {
                let marked = ids(&redis, "abandoned").await.len();
                if marked == refused {
                    Ok(())
                } else {
                    Err(marked)
                }
            },
        )
        .await;
        let sessions = ids(&redis, "session").await;
        let expected: BTreeSet<String> = before.iter().map(|l| l.sid.clone()).collect();
        assert_eq!(
            sessions, expected,
            "only the sessions of logins that answered 200"
        );

        // Those are unaffected: usable on either gateway.
        for l in &before {
            for gw in [&limited, &unlimited] {
                let r = api::get_session(gw.addr, &l.sid, &l.token).await;
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            }
        }
        // And the store works again.
        login(limited.addr, "alice").await;
    })
    .await;
}

#[tokio::test]
async fn the_session_limit_holds_across_two_gateways_and_ending_one_frees_a_slot() {
    bounded(async {
        let redis = RedisServer::start().await;
        let a = gateway(Some(&redis.url()), "max_sessions_per_user = 3");
        let b = gateway(Some(&redis.url()), "max_sessions_per_user = 3");

        let first = login(a.addr, "alice").await;
        let second = create_session(&b, &first.token).await;
        assert_eq!(second.status, 200);
        let third = login(b.addr, "alice").await;

        // The fourth, on either gateway, by either route.
        refused(&try_login(a.addr, "alice", support::gateway::PASSWORD).await);
        refused(&create_session(&a, &third.token).await);
        refused(&create_session(&b, &first.token).await);
        assert_eq!(ids(&redis, "session").await.len(), 3);
        // Another user is not affected.
        login(a.addr, "bob").await;

        // Logout on b frees a slot for a.
        assert_eq!(logout(b.addr, &third.token).await.status, 204);
        let again = create_session(&a, &first.token).await;
        assert_eq!(again.status, 200);
        refused(&create_session(&b, &first.token).await);

        // DELETE on a frees one for a login on b.
        let sid = field(&second, "session_id");
        let r = call(
            a.addr,
            "DELETE",
            &format!("/api/session/{sid}"),
            &first.token,
        )
        .await;
        assert_eq!(r.status, 204);
        login(b.addr, "alice").await;
        refused(&try_login(b.addr, "alice", support::gateway::PASSWORD).await);
    })
    .await;
}

#[tokio::test]
async fn the_memory_store_obeys_the_session_limit() {
    bounded(async {
        let gw = gateway(None, "max_sessions_per_user = 2");
        let first = login(gw.addr, "alice").await;
        let second = login(gw.addr, "alice").await;
        refused(&try_login(gw.addr, "alice", support::gateway::PASSWORD).await);
        refused(&create_session(&gw, &first.token).await);
        login(gw.addr, "bob").await;

        assert_eq!(logout(gw.addr, &second.token).await.status, 204);
        let third = create_session(&gw, &first.token).await;
        assert_eq!(third.status, 200);
        refused(&create_session(&gw, &first.token).await);
    })
    .await;
}

/// The default is 100 (README, config/portcullis.toml); 0 lifts it.
#[tokio::test]
async fn the_default_limit_is_100_and_0_is_unlimited() {
    bounded(async {
        let capped = gateway(None, "");
        let open = gateway(None, "max_sessions_per_user = 0");
        for gw in [&capped, &open] {
            let l = login(gw.addr, "alice").await;
            for n in 2..=100 {
                let r = create_session(gw, &l.token).await;
                assert_eq!(r.status, 200, "session {n}");
            }
            let r = create_session(gw, &l.token).await;
            if std::ptr::eq(gw, &capped) {
                refused(&r);
            } else {
                assert_eq!(r.status, 200, "session 101 with no limit");
            }
        }
    })
    .await;
}

/// Awaits every task, in order.
async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await.expect("task"));
    }
    out
}
