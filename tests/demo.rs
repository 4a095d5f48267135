//! `portcullis demo` as a newcomer runs it: no config, no Redis; the printed
//! credentials log in, and a browser-style socket (token in the subprotocol,
//! the page's own Origin) chats with the built-in echo runtime.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::SinkExt;
use support::http as api;
use support::ws;
use tokio_tungstenite::tungstenite::Message;

struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn demo_serves_its_page_logs_in_and_echoes_through_the_gate() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Demo(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut user, mut pass, mut addr) = (None, None, None);
    while user.is_none() || pass.is_none() || addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("demo did not print its address and credentials");
        if let Some(u) = line.strip_prefix("username: ") {
            user = Some(u.to_string());
        } else if let Some(p) = line.strip_prefix("password: ") {
            pass = Some(p.to_string());
        } else if let Some(a) = line.strip_prefix("portcullis listening on http://") {
            addr = Some(a.parse::<std::net::SocketAddr>().unwrap());
        }
    }
    let (user, pass, addr) = (user.unwrap(), pass.unwrap(), addr.unwrap());

    let page = api::request(addr, "GET", "/", &[], None).await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(
        html.contains("/portcullis.js") && html.contains("/ws/chat"),
        "the page is built on the client and the shared route"
    );

    let wrong = api::try_login(addr, &user, "nope").await;
    assert_eq!(wrong.status, 401);
    let l = api::try_login(addr, &user, &pass).await;
    assert_eq!(l.status, 200);
    let token = l.json()["session_token"].as_str().unwrap().to_string();

    let origin = format!("http://{addr}");
    let (mut sock, resp) = ws::connect(
        &format!("ws://{addr}/ws/echo"),
        &[
            ("sec-websocket-protocol", &format!("bearer, {token}")),
            ("origin", &origin),
        ],
    )
    .await
    .expect("the page's own origin may open the socket");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "bearer");
    sock.send(Message::text("hi from the page")).await.unwrap();
    assert_eq!(ws::next(&mut sock).await, Message::text("hi from the page"));

    // A foreign page may not.
    let (status, body, _) = ws::refusal(
        ws::connect(
            &format!("ws://{addr}/ws/echo"),
            &[
                ("sec-websocket-protocol", &format!("bearer, {token}")),
                ("origin", "http://evil.example"),
            ],
        )
        .await,
    );
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (403, "origin_not_allowed")
    );
}
