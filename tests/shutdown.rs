//! SIGTERM: stop accepting, close every proxied socket with 1001, exit 0
//! within `shutdown_grace_ms`.

mod support;

use std::time::Duration;

use support::gateway::{Gateway, config};
use support::http::login;
use support::upstream::Upstream;
use support::ws::{self, expect_close};

#[tokio::test]
async fn sigterm_closes_sockets_going_away_and_exits_zero() {
    let up = Upstream::start().await;
    let route = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"{}\"]\n",
        up.url("/")
    );
    let mut gw = Gateway::start("shutdown_grace_ms = 3000", &config(None, &route));
    let token = login(gw.addr, "alice").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut a, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    let (mut b, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    gw.signal("TERM");
    for s in [&mut a, &mut b] {
        let (code, reason) = expect_close(s, Duration::from_secs(3)).await;
        assert_eq!((code, reason.as_str()), (1001, "going_away"));
    }
    let status = gw
        .wait_exit(Duration::from_secs(4))
        .expect("gateway did not exit within the grace");
    assert!(status.success(), "exit status {status:?}");
    // And it no longer accepts connections.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}
