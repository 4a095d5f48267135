//! Issue 17: an idle socket costs the store nothing, and every guarantee of
//! SPEC §5, §6 and §8 still holds across instances: two real gateways on
//! one real Redis.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use support::gateway::{Gateway, config, config_with, echo_route, static_auth};
use support::http::{self as api, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::wait::eventually;
use support::ws::{self, expect_close};

/// SPEC §5: an expired session's sockets close within a second.
const ONE_SECOND: Duration = Duration::from_secs(1);

fn two_gateways(redis: &RedisServer, up: &Upstream, session_keys: &str) -> (Gateway, Gateway) {
    let toml = config_with(
        Some(&redis.url()),
        session_keys,
        &static_auth(""),
        &echo_route(&up.url("/"), ""),
    );
    (Gateway::start("", &toml), Gateway::start("", &toml))
}

/// The socket still relays: it was not closed.
async fn still_open(s: &mut ws::Ws, what: &str) {
    s.send(Message::text(what)).await.expect("send");
    assert_eq!(ws::next(s).await, Message::text(what), "{what}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_session_refreshed_on_a_is_not_closed_on_b_at_its_old_expiry() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, b) = two_gateways(&redis, &up, "ttl_secs = 3");
    let l = login(a.addr, "alice").await;
    let (mut on_b, _) = ws::open(&b.url("/ws/echo"), &l.token).await;
    let old_expiry = Instant::now() + Duration::from_secs(3);
    // Refresh on A only: B never hears of it, yet must not close at the old
    // expiry (it looks the session up then and finds it slid).
    let r = api::refresh(a.addr, &l.token).await;
    assert_eq!(r.status, 200);
    let r2 = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        api::refresh(a.addr, &l.token).await
    })
    .await
    .expect("second refresh");
    assert_eq!(r2.status, 200);
    // Past the first expiry by a second: still open.
    tokio::time::sleep_until((old_expiry + ONE_SECOND).into()).await;
    still_open(&mut on_b, "after the old expiry").await;
    // With no more refreshes it does expire, on B, within a second.
    let (code, reason) = expect_close(&mut on_b, Duration::from_secs(3) + ONE_SECOND).await;
    assert_eq!((code, reason.as_str()), (1008, "session_expired"));
}

#[tokio::test]
async fn an_expiring_session_closes_its_sockets_on_both_instances_within_a_second() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, b) = two_gateways(&redis, &up, "ttl_secs = 2");
    let l = login(a.addr, "alice").await;
    let (mut on_a, _) = ws::open(&a.url("/ws/echo"), &l.token).await;
    let (mut on_b, _) = ws::open(&b.url("/ws/echo"), &l.token).await;
    // The upgrade on B slid the TTL last: that is the session's expiry.
    let expiry = api::get_session(a.addr, &l.sid, &l.token).await.json()["expires_at"]
        .as_str()
        .expect("expires_at")
        .to_string();
    let expires_at =
        time::OffsetDateTime::parse(&expiry, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339")
            .unix_timestamp();
    for (name, s) in [("A", &mut on_a), ("B", &mut on_b)] {
        let (code, reason) = expect_close(s, Duration::from_secs(4)).await;
        assert_eq!((code, reason.as_str()), (1008, "session_expired"), "{name}");
        let now = portcullis::time::now_unix_ms();
        // The store's expiry is in ms; the API shows it in whole seconds.
        assert!(
            now <= (expires_at + 1) * 1000 + 1000,
            "{name} closed at {now}, session expired at {expires_at}.xxx s"
        );
    }
}

/// Redis's client id of every pub/sub connection.
async fn pubsub_clients(redis: &RedisServer) -> Vec<u64> {
    let mut c = redis.client().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_revocation_missed_while_unsubscribed_closes_within_a_second_of_resubscribing() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let toml = config(Some(&redis.url()), &echo_route(&up.url("/"), ""));
    let a = Gateway::start("", &toml);
    let a_subs = eventually("A's subscription", Duration::from_secs(5), || async {
        let ids = pubsub_clients(&redis).await;
        if ids.len() == 1 { Ok(ids) } else { Err(ids) }
    })
    .await;
    let b = Gateway::start("", &toml);
    let b_sub = eventually("B's subscription", Duration::from_secs(5), || async {
        let ids = pubsub_clients(&redis).await;
        match ids.iter().find(|id| !a_subs.contains(id)) {
            Some(id) => Ok(*id),
            None => Err(ids),
        }
    })
    .await;
    let l = login(a.addr, "alice").await;
    let (mut on_b, _) = ws::open(&b.url("/ws/echo"), &l.token).await;

    // Freeze B, cut its subscription, and revoke while it cannot hear:
    // the message is published to nobody on B's side.
    b.signal("STOP");
    let mut c = redis.client().await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(b_sub)
        .query_async(&mut c)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    assert_eq!(api::logout(a.addr, &l.token).await.status, 204);
    b.signal("CONT");
    let resumed = Instant::now();

    let (code, reason) = expect_close(&mut on_b, Duration::from_secs(3)).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    // Resubscribing takes a reconnect and a backoff of at most 50 ms.
    assert!(
        resumed.elapsed() < ONE_SECOND + Duration::from_millis(500),
        "closed {:?} after B resumed",
        resumed.elapsed()
    );
    // It was the re-check after resubscribing, not some other path.
    let body = api::request(b.addr, "GET", "/metrics", &[], None)
        .await
        .body;
    let text = String::from_utf8_lossy(&body);
    let rechecks = metric(&text, "portcullis_resubscribe_rechecks_total");
    assert!(rechecks >= 1.0, "no re-check counted:\n{text}");
}

#[tokio::test]
async fn a_killed_instance_stops_counting_within_the_lease() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, mut b) = two_gateways(&redis, &up, "");
    let l = login(a.addr, "alice").await;
    let (mut on_a, _) = ws::open(&a.url("/ws/echo"), &l.token).await;
    let (_on_b, _) = ws::open(&b.url("/ws/echo"), &l.token).await;
    let connections = || async {
        api::get_session(a.addr, &l.sid, &l.token).await.json()["connections"]
            .as_u64()
            .expect("connections")
    };
    assert_eq!(connections().await, 2);
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    // README: within 25 s (heartbeat lease 20 s + one heartbeat of A's).
    eventually(
        "B's socket stops counting",
        Duration::from_secs(30),
        || async { connections().await == 1 },
    )
    .await;
    assert!(
        killed.elapsed() <= Duration::from_secs(26),
        "took {:?}",
        killed.elapsed()
    );
    still_open(&mut on_a, "A's socket is untouched").await;
}

#[tokio::test]
async fn a_revocation_that_lands_while_the_upgrade_dials_still_closes_the_socket() {
    // A runtime whose handshake waits until the test lets it go.
    let runtime = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime.local_addr().unwrap();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (stream, _) = runtime.accept().await.unwrap();
        let _ = release_rx.await;
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
    });
    let redis = RedisServer::start().await;
    let toml = config(
        Some(&redis.url()),
        &support::gateway::route(
            "gated",
            "/ws/gated",
            &[&format!("ws://{runtime_addr}/")],
            "",
        ),
    );
    let gw = Gateway::start("handshake_timeout_ms = 4000", &toml);
    let l = login(gw.addr, "alice").await;
    let url = gw.url("/ws/gated");
    let token = l.token.clone();
    let client = tokio::spawn(async move { ws::open(&url, &token).await.0 });
    // The store said yes and the gateway is dialling: the lease is taken.
    eventually(
        "the lease taken while dialling",
        Duration::from_secs(3),
        || async { api::get_session(gw.addr, &l.sid, &l.token).await.json()["connections"] == 1 },
    )
    .await;
    // The session ends now, before the socket is registered anywhere.
    assert_eq!(api::logout(gw.addr, &l.token).await.status, 204);
    release_tx.send(()).unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("upgrade within the handshake timeout")
        .expect("client task");
    let (code, reason) = expect_close(&mut s, ONE_SECOND).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
}
