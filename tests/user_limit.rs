//! SPEC §8: `server.max_connections_per_user` counts one user's open
//! sockets (exclusive and shared routes alike) on every gateway instance
//! sharing the store. Real gateways on a real Redis, a real runtime.

mod support;

use std::time::{Duration, Instant};

use support::gateway::{Gateway, config, echo_route, route};
use support::http::{self as api, login};
use support::redis::RedisServer;
use support::upstream::Upstream;
use support::wait::eventually;
use support::ws::{self, Ws, connect_bearer, refusal};

/// How long a freed slot may take to show: the closing socket's release
/// is batched and sent after its task ends.
const FREED: Duration = Duration::from_secs(5);

/// An exclusive route `/ws/echo` and a shared route `/ws/agent`, both to
/// `up`.
fn routes(up: &Upstream) -> String {
    let shared = route(
        "agent",
        "/ws/agent",
        &[&up.url("/agent")],
        "mode = \"shared\"",
    );
    format!("{}\n{shared}", echo_route(&up.url("/echo"), ""))
}

fn two_gateways(redis: &RedisServer, up: &Upstream, server: &str) -> (Gateway, Gateway) {
    let toml = config(Some(&redis.url()), &routes(up));
    (Gateway::start(server, &toml), Gateway::start(server, &toml))
}

/// The upgrade is refused `503 too_many_connections` with a `Retry-After`.
#[track_caller]
fn assert_full(r: ws::Upgrade, what: &str) {
    let (status, body, headers) = refusal(r);
    assert_eq!(
        (status, body["error"].as_str().unwrap_or_default()),
        (503, "too_many_connections"),
        "{what}: {body}"
    );
    let retry: u64 = headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After"))
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "{what}: Retry-After {retry}");
}

/// Opens a socket once a slot is free (each try until then is refused and
/// leaves nothing behind).
async fn open_when_free(url: &str, token: &str, within: Duration) -> Ws {
    eventually("a slot freed for the user", within, || async {
        connect_bearer(url, token).await.map(|(s, _)| s)
    })
    .await
}

#[tokio::test]
async fn a_users_sockets_count_on_every_instance_and_a_close_frees_a_slot_anywhere() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, b) = two_gateways(&redis, &up, "max_connections_per_user = 3");
    let one = login(a.addr, "alice").await;
    let two = login(b.addr, "alice").await;

    // Three sockets of alice's, two sessions, two instances, both kinds of
    // route.
    let (_one_on_a, _) = ws::open(&a.url("/ws/echo"), &one.token).await;
    let (_two_shared_on_b, _) = ws::open(&b.url("/ws/agent"), &two.token).await;
    let (mut one_on_b, _) = ws::open(&b.url("/ws/echo"), &one.token).await;
    assert_eq!(up.connections(), 3, "two exclusive sockets and one hub");

    // The fourth, on either instance, either route, either session.
    assert_full(
        connect_bearer(&a.url("/ws/echo"), &two.token).await,
        "exclusive on A",
    );
    assert_full(
        connect_bearer(&a.url("/ws/agent"), &one.token).await,
        "shared on A (a new hub)",
    );
    assert_full(
        connect_bearer(&b.url("/ws/echo"), &two.token).await,
        "exclusive on B",
    );
    // Nothing was dialled for them (a dial happens before any answer).
    assert_eq!(up.connections(), 3, "the runtime saw a refused socket");
    // Nor is any session lease of theirs left (given back in a batch).
    for (l, open) in [(&one, 2), (&two, 1)] {
        eventually("the refused sockets' leases given back", FREED, || async {
            let seen =
                api::get_session(a.addr, &l.sid, &l.token).await.json()["connections"].as_u64();
            if seen == Some(open) {
                Ok(())
            } else {
                Err(seen)
            }
        })
        .await;
    }
    // Another user is not affected.
    let bob = login(a.addr, "bob").await;
    let (_bobs, _) = ws::open(&a.url("/ws/echo"), &bob.token).await;
    assert_eq!(up.connections(), 4);

    // Closing a socket on B frees a slot for a socket on A.
    one_on_b.close(None).await.expect("close");
    let _two_on_a = open_when_free(&a.url("/ws/echo"), &two.token, FREED).await;
    assert_eq!(up.connections(), 5);
    assert_full(
        connect_bearer(&b.url("/ws/echo"), &one.token).await,
        "full again",
    );
    assert_eq!(up.connections(), 5);
}

#[tokio::test]
async fn a_killed_instances_sockets_stop_counting_for_the_user_within_the_lease() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, mut b) = two_gateways(&redis, &up, "max_connections_per_user = 2");
    let l = login(a.addr, "alice").await;
    let url = a.url("/ws/echo");
    let (_on_a, _) = ws::open(&url, &l.token).await;
    let (_on_b, _) = ws::open(&b.url("/ws/echo"), &l.token).await;
    assert_full(connect_bearer(&url, &l.token).await, "before the kill");

    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    // README: within 25 s (heartbeat lease 20 s + one heartbeat of A's).
    let _second_on_a = open_when_free(&url, &l.token, Duration::from_secs(30)).await;
    assert!(
        killed.elapsed() <= Duration::from_secs(26),
        "took {:?}",
        killed.elapsed()
    );
    // The limit still holds: A's two sockets fill it.
    assert_full(connect_bearer(&url, &l.token).await, "A's two sockets");
}

#[tokio::test]
async fn by_default_a_users_sockets_are_not_limited_nor_counted() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let (a, b) = two_gateways(&redis, &up, "");
    let mut open = Vec::new();
    for _ in 0..2 {
        let s = login(a.addr, "alice").await;
        for gw in [&a, &b, &a, &b, &a, &b] {
            open.push(ws::open(&gw.url("/ws/echo"), &s.token).await.0);
        }
    }
    assert_eq!(up.connections(), 12);
    // The store holds the sockets' session leases, and no per-user count.
    let mut c = redis.client().await;
    assert_eq!(keys(&mut c, "pt:conns:*").await.len(), 2);
    assert_eq!(keys(&mut c, "pt:user-conns:*").await, Vec::<String>::new());
}

async fn keys(c: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(c)
        .await
        .expect("KEYS")
}

#[tokio::test]
async fn the_memory_store_applies_the_limit_too() {
    let up = Upstream::start().await;
    let gw = Gateway::start("max_connections_per_user = 2", &config(None, &routes(&up)));
    let one = login(gw.addr, "alice").await;
    let two = login(gw.addr, "alice").await;
    let (mut first, _) = ws::open(&gw.url("/ws/echo"), &one.token).await;
    let (_shared, _) = ws::open(&gw.url("/ws/agent"), &two.token).await;
    assert_full(
        connect_bearer(&gw.url("/ws/echo"), &two.token).await,
        "third",
    );
    assert_eq!(up.connections(), 2);
    first.close(None).await.expect("close");
    let _again = open_when_free(&gw.url("/ws/echo"), &two.token, FREED).await;
    assert_full(
        connect_bearer(&gw.url("/ws/agent"), &one.token).await,
        "full again",
    );
    assert_eq!(up.connections(), 3);
}
