//! SPEC §5-§6: ending a session closes its open sockets with 1008 within a
//! second, on every gateway instance sharing the store.

mod support;

use std::time::{Duration, Instant};

use support::gateway::{Gateway, config, config_with, echo_route, static_auth};
use support::http::{self as api, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::ws::{self, expect_close};

const ONE_SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn logout_closes_open_sockets_within_a_second() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(Some(&redis.url()), &echo_route(&up.url("/"), "")),
    );
    let l = login(gw.addr, "alice").await;
    let token = l.token.as_str();
    let (mut a, _) = ws::open(&gw.url("/ws/echo"), token).await;
    let (mut b, _) = ws::open(&gw.url("/ws/echo"), token).await;
    let r = api::logout(gw.addr, token).await;
    assert_eq!(r.status, 204);
    for s in [&mut a, &mut b] {
        let (code, reason) = expect_close(s, ONE_SECOND).await;
        assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    }
}

#[tokio::test]
async fn delete_closes_the_session_sockets_but_not_others() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(Some(&redis.url()), &echo_route(&up.url("/"), "")),
    );
    let first = login(gw.addr, "alice").await;
    let second = login(gw.addr, "alice").await;
    let (mut doomed, _) = ws::open(&gw.url("/ws/echo"), &first.token).await;
    let (mut kept, _) = ws::open(&gw.url("/ws/echo"), &second.token).await;
    let path = format!("/api/session/{}", first.sid);
    let r = api::call(gw.addr, "DELETE", &path, &second.token).await;
    assert_eq!(r.status, 204);
    let (code, reason) = expect_close(&mut doomed, ONE_SECOND).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    use futures_util::SinkExt;
    kept.send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .unwrap();
    assert_eq!(
        ws::next(&mut kept).await,
        tokio_tungstenite::tungstenite::Message::text("still here")
    );
}

#[tokio::test]
async fn logout_on_one_gateway_closes_a_socket_held_on_another() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let cfg = config(Some(&redis.url()), &echo_route(&up.url("/"), ""));
    let a = Gateway::start("", &cfg);
    let b = Gateway::start("", &cfg);
    let l = login(a.addr, "alice").await;
    let token = l.token.as_str();
    let (mut on_b, _) = ws::open(&b.url("/ws/echo"), token).await;
    // Both instances see the socket in the store's count.
    let r = api::get_session(a.addr, &l.sid, token).await;
    assert_eq!(r.json()["connections"], 1);
    assert_eq!(r.json()["state"], "ACTIVE");
    let started = Instant::now();
    let r = api::logout(a.addr, token).await;
    assert_eq!(r.status, 204);
    let (code, reason) = expect_close(&mut on_b, ONE_SECOND).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    assert!(started.elapsed() < ONE_SECOND);
}

#[tokio::test]
async fn a_revocation_whose_message_is_lost_is_still_enforced_by_the_audit() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    // The audit interval is the worst case for a message lost without any
    // disconnect (README, "Revocation and expiry"); shortened here.
    let gw = Gateway::start(
        "",
        &config_with(
            Some(&redis.url()),
            "audit_interval_secs = 2",
            &static_auth(""),
            &echo_route(&up.url("/"), ""),
        ),
    );
    let l = login(gw.addr, "alice").await;
    let sid = l.sid.as_str();
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &l.token).await;
    // End the session in the store without publishing anything, as if the
    // pub/sub message had been lost in transit.
    let mut c = redis.client().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("pt:session:{{{sid}}}"))
        .query_async(&mut c)
        .await
        .unwrap();
    // A session can just miss one pass's snapshot: twice the interval.
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
    assert!(
        reason == "session_expired" || reason == "session_revoked",
        "{reason}"
    );
}

#[tokio::test]
async fn sockets_close_when_the_store_comes_back_without_their_session() {
    let mut redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(Some(&redis.url()), &echo_route(&up.url("/"), "")),
    );
    let l = login(gw.addr, "alice").await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &l.token).await;
    // A logout published while Redis restarts reaches nobody; the restarted
    // (empty) store is the truth, and the sweep enforces it.
    redis.stop().await;
    redis.start_again().await;
    let (code, _) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
}

#[tokio::test]
async fn expiry_closes_sockets_with_session_expired() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config_with(
            None,
            "ttl_secs = 2",
            &static_auth(""),
            &echo_route(&up.url("/"), ""),
        ),
    );
    let l = login(gw.addr, "alice").await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &l.token).await;
    let opened = Instant::now();
    let (code, reason) = expect_close(&mut s, Duration::from_secs(4)).await;
    assert_eq!((code, reason.as_str()), (1008, "session_expired"));
    // The upgrade slid the TTL to 2 s; expiry is enforced within a second of it.
    let at = opened.elapsed();
    assert!(
        at >= Duration::from_millis(1500) && at < Duration::from_secs(3) + ONE_SECOND,
        "{at:?}"
    );
}

#[tokio::test]
async fn redis_expiry_closes_sockets_with_session_expired() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let cfg = config_with(
        Some(&redis.url()),
        "ttl_secs = 2",
        &static_auth(""),
        &echo_route(&up.url("/"), ""),
    );
    let gw = Gateway::start("", &cfg);
    let l = login(gw.addr, "alice").await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &l.token).await;
    let (code, reason) = expect_close(&mut s, Duration::from_secs(4)).await;
    assert_eq!((code, reason.as_str()), (1008, "session_expired"));
}
