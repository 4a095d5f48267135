//! SIGTERM: stop accepting, close every proxied socket with 1001, exit 0
//! within `shutdown_grace_ms`.

mod support;

use std::time::Duration;

use support::gateway::{Gateway, config, echo_route};
use support::http::login;
use support::upstream::Upstream;
use support::ws::{self, expect_close};

#[tokio::test]
async fn sigterm_closes_sockets_going_away_and_exits_zero() {
    let up = Upstream::start().await;
    let route = echo_route(&up.url("/"), "");
    let mut gw = Gateway::start("shutdown_grace_ms = 3000", &config(None, &route));
    let token = login(gw.addr, "alice").await.token;
    let (mut a, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    let (mut b, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    gw.signal("TERM");
    for s in [&mut a, &mut b] {
        let (code, reason) = expect_close(s, Duration::from_secs(3)).await;
        assert_eq!((code, reason.as_str()), (1001, "going_away"));
    }
    let status = gw.wait_exit(Duration::from_secs(4)).await;
    assert!(status.success(), "exit status {status:?}");
    // And it no longer accepts connections.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

/// Leases of sockets closed by the shutdown reach the store before the
/// process exits (they are released in batches from the shard runtimes,
/// which must outlive them); none is left to hold the session's
/// `max_connections_per_session` for the 30 s lease.
#[tokio::test]
async fn sigterm_releases_every_lease_before_exiting() {
    use redis::AsyncCommands;

    let redis = support::redis::RedisServer::start().await;
    let up = Upstream::start().await;
    let route = echo_route(&up.url("/"), "");
    let mut gw = Gateway::start(
        "shutdown_grace_ms = 5000\nmax_connections_per_session = 1000",
        &config(Some(&redis.url()), &route),
    );
    let l = login(gw.addr, "alice").await;
    let (token, sid) = (l.token, l.sid);
    // Clients that never read: they do not answer the gateway's close, so
    // every relay ends on its close deadline, all within the same instant.
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(ws::open(&gw.url("/ws/echo"), &token).await.0);
    }
    let mut store = redis.client().await;
    let key = format!("pt:conns:{{{sid}}}");
    let leases: u64 = store.zcard(&key).await.unwrap();
    assert_eq!(leases, 300);
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "exit status {status:?}");
    let leases: u64 = store.zcard(&key).await.unwrap();
    assert_eq!(leases, 0, "leases left in the store after a graceful exit");
    drop(held);
}
