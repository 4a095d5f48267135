//! The JavaScript client (`clients/js/`, SPEC §9) under `node --test`,
//! against the real gateway binary, a real Redis and real runtimes started
//! here. Without Node ≥ 20 the test prints `SKIPPED` and passes, unless
//! `PORTCULLIS_REQUIRE_NODE` is set (as `.ci/run` does): then it fails.
//!
//! The Node tests reach back through a small control server for what only
//! this process can do: freeze and thaw Redis (SIGSTOP/SIGCONT: "stopped",
//! with the sessions it holds kept, so a live session is not lost to the
//! outage).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::gateway::{Gateway, SIGNING_KEY, config, echo_route, route};
use support::redis::RedisServer;
use support::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;

/// The whole `node --test` run may take this long.
const NODE_WITHIN: Duration = Duration::from_secs(240);
const ORIGINS: &str = "allowed_origins = [\"*\"]";

/// Node's major version, if `node` runs.
async fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().await.ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn skip(why: &str) {
    assert!(
        std::env::var_os("PORTCULLIS_REQUIRE_NODE").is_none(),
        "PORTCULLIS_REQUIRE_NODE is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// Serves `GET /redis/pause` and `GET /redis/resume` for the Node tests.
async fn control(redis: Arc<RedisServer>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let redis = redis.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let status = if head.starts_with("GET /redis/pause ") {
                    redis.pause();
                    "200 OK"
                } else if head.starts_with("GET /redis/resume ") {
                    redis.resume();
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let resp =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_under_node_test() {
    let Some(major) = node_major().await else {
        return skip("no node on PATH");
    };
    if major < 20 {
        return skip(&format!("node {major} is older than 20"));
    }
    let redis = Arc::new(RedisServer::start().await);
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}{}",
        echo_route(&up.url("/echo"), ""),
        route(
            "agent",
            "/ws/agent",
            &[&up.url("/agent")],
            "mode = \"shared\"\nreplay_frames = 4096"
        ),
        // Nothing listens on port 9 (discard) here: every dial fails.
        route("dead", "/ws/dead", &["ws://127.0.0.1:9/"], ""),
    );
    let gw = Gateway::start(ORIGINS, &config(Some(&redis.url()), &routes));
    let limited = Gateway::start(
        &format!("{ORIGINS}\nmax_connections_per_session = 1"),
        &config(None, &echo_route(&up.url("/echo"), "")),
    );
    let control = control(redis.clone()).await;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    let mut cmd = Command::new("node");
    if major < 22 {
        // Node 20 has the WHATWG WebSocket behind a flag.
        cmd.arg("--experimental-websocket");
    }
    cmd.args(["--test", "--test-concurrency=1", "test/"])
        .current_dir(&dir)
        .env("PORTCULLIS_URL", format!("http://{}", gw.addr))
        .env("PORTCULLIS_LIMITED_URL", format!("http://{}", limited.addr))
        .env("PORTCULLIS_CONTROL", &control)
        .env("PORTCULLIS_SIGNING_KEY", SIGNING_KEY)
        .kill_on_drop(true);
    let out = tokio::time::timeout(NODE_WITHIN, cmd.output())
        .await
        .expect("node --test finished in time")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    // Never leave Redis frozen for the drop that kills it.
    redis.resume();
    assert!(
        out.status.success(),
        "node --test failed:\n{stdout}\n{stderr}\ngateway log:\n{}",
        gw.log()
    );
}
