//! permessage-deflate (RFC 7692) end to end on exclusive routes: a real
//! client and a real runtime (both the Python `websockets` library, which
//! negotiates it by default) through the real gateway.
//!
//! Needs `websockets` importable by `python3`: set `PORTCULLIS_PY_PATH` to a
//! `pip install --target` directory (default `/tmp/deflate-py`). Without it
//! the Python tests say so and pass vacuously (unless
//! `PORTCULLIS_REQUIRE_DEFLATE` is set, as `.ci/run` does after installing
//! it); the refused-answer test needs nothing.

mod support;

use std::time::Duration;

use support::gateway::{Gateway, config, echo_route, route};
use support::http::{login, request};
use support::pyws;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;

const WITHIN: Duration = Duration::from_secs(20);

async fn have_websockets() -> bool {
    let ok = pyws::available().await;
    if !ok {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_DEFLATE").is_none(),
            "PORTCULLIS_REQUIRE_DEFLATE is set but python3 cannot import websockets from {}",
            pyws::py_path()
        );
        eprintln!("skipped: python3 cannot import websockets (PORTCULLIS_PY_PATH)");
    }
    ok
}

async fn python_client(gw: &Gateway, token: &str, deflate: bool, n: usize) -> serde_json::Value {
    python_client_at(gw, "/ws/echo", token, deflate, n).await
}

async fn python_client_at(
    gw: &Gateway,
    path: &str,
    token: &str,
    deflate: bool,
    n: usize,
) -> serde_json::Value {
    let out = tokio::time::timeout(
        WITHIN,
        Command::new("python3")
            .arg(pyws::script("client.py"))
            .args([
                gw.addr.to_string(),
                path.into(),
                token.into(),
                if deflate { "1" } else { "0" }.into(),
                n.to_string(),
            ])
            .env("PYTHONPATH", pyws::py_path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("client finishes in time")
    .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

/// SPEC §9 on a permessage-deflate connection: the gateway's hello is a
/// plain text frame (RSV1 clear, which RFC 7692 allows), the runtime's
/// compressed messages follow it unchanged.
#[tokio::test]
async fn the_hello_is_an_uncompressed_frame_before_compressed_runtime_messages() {
    if !have_websockets().await {
        return;
    }
    let (_rt, port, _lines) = pyws::runtime(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = Gateway::start("", &config(None, &echo_route(&upstream, "")));
    let token = login(gw.addr, "alice").await.token;
    let r = python_client_at(&gw, "/ws/echo?portcullis=v1", &token, true, 20_000).await;
    assert_eq!(r["status"], 101, "{r}");
    assert!(
        r["extensions"]
            .as_str()
            .unwrap_or("")
            .contains("permessage-deflate"),
        "{r}"
    );
    assert_eq!(r["hello"]["rsv1"], false, "{r}");
    let hello: serde_json::Value =
        serde_json::from_str(r["hello"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(hello["mode"], "exclusive");
    assert_eq!(r["echoed"], true, "{r}");
    assert!(
        r["wire_bytes"].as_u64().unwrap() < 5_000,
        "the echo was compressed: {r}"
    );
}

#[tokio::test]
async fn deflate_is_negotiated_end_to_end_and_shrinks_the_wire() {
    if !have_websockets().await {
        return;
    }
    let (_rt, port, mut lines) = pyws::runtime(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = Gateway::start(
        "",
        &config(None, &echo_route(&upstream, "max_message_bytes = 1048576")),
    );
    let token = login(gw.addr, "alice").await.token;

    const N: usize = 200_000;
    let r = python_client(&gw, &token, true, N).await;
    assert_eq!(r["status"], 101, "{r}");
    let ext = r["extensions"]
        .as_str()
        .expect("the 101 names an extension");
    assert!(ext.starts_with("permessage-deflate"), "{ext}");
    assert_eq!(r["echoed"], true, "the message round-trips unchanged: {r}");
    let wire = r["wire_bytes"].as_u64().unwrap() as usize;
    eprintln!("{N}-byte message: {wire} bytes read after the 101 ({ext})");
    assert!(
        wire * 10 < N,
        "{wire} bytes on the wire for a {N}-byte repetitive message"
    );
    let offer = pyws::next_offer(&mut lines).await;
    assert!(
        offer["offer"]
            .as_str()
            .is_some_and(|o| o.starts_with("permessage-deflate")),
        "the client's offer reached the runtime: {offer}"
    );

    // Without the client's offer nothing is negotiated: no offer upstream,
    // none in the 101, and the message travels uncompressed.
    let r = python_client(&gw, &token, false, N).await;
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(r["extensions"], serde_json::Value::Null, "{r}");
    assert_eq!(r["echoed"], true, "{r}");
    assert!(r["wire_bytes"].as_u64().unwrap() as usize >= N, "{r}");
    let offer = pyws::next_offer(&mut lines).await;
    assert_eq!(offer["offer"], serde_json::Value::Null, "{offer}");
}

#[tokio::test]
async fn shared_routes_strip_the_offer() {
    if !have_websockets().await {
        return;
    }
    let (_rt, port, mut lines) = pyws::runtime(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = Gateway::start(
        "",
        &config(
            None,
            &route("echo", "/ws/echo", &[&upstream], "mode = \"shared\""),
        ),
    );
    let token = login(gw.addr, "alice").await.token;
    let r = python_client(&gw, &token, true, 1000).await;
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(r["extensions"], serde_json::Value::Null, "{r}");
    let offer = pyws::next_offer(&mut lines).await;
    assert_eq!(offer["offer"], serde_json::Value::Null, "{offer}");
}

/// A runtime that answers every handshake with the extension `answer`,
/// offered or not.
async fn eager_runtime(listener: TcpListener, answer: &'static str) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let key = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: {answer}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            // Hold the socket until the gateway drops it.
            let _ = s.read(&mut chunk).await;
        });
    }
}

#[tokio::test]
async fn an_unoffered_extension_in_the_answer_fails_the_dial() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}/", listener.local_addr().unwrap());
    let rt = tokio::spawn(eager_runtime(listener, "permessage-deflate"));
    let gw = Gateway::start("", &config(None, &echo_route(&upstream, "")));
    let token = login(gw.addr, "alice").await.token;
    let headers = [
        ("Authorization".to_string(), format!("Bearer {token}")),
        ("Connection".into(), "Upgrade".into()),
        ("Upgrade".into(), "websocket".into()),
        ("Sec-WebSocket-Version".into(), "13".into()),
        (
            "Sec-WebSocket-Key".into(),
            "dGhlIHNhbXBsZSBub25jZQ==".into(),
        ),
    ];
    let hdrs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = request(gw.addr, "GET", "/ws/echo", &hdrs, None).await;
    assert_eq!(r.status, 502, "the client offered nothing");
    // An offer of another extension is stripped, so the answer is still
    // unoffered.
    let mut with_other = hdrs.clone();
    with_other.push(("Sec-WebSocket-Extensions", "x-webkit-deflate-frame"));
    let r = request(gw.addr, "GET", "/ws/echo", &with_other, None).await;
    assert_eq!(r.status, 502, "x-webkit-deflate-frame is never passed on");
    rt.abort();

    // An answer whose parameters the offer did not allow (RFC 7692
    // §7.1.2.2: no `client_max_window_bits` unless offered).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}/", listener.local_addr().unwrap());
    let rt = tokio::spawn(eager_runtime(
        listener,
        "permessage-deflate; client_max_window_bits=10",
    ));
    let gw = Gateway::start("", &config(None, &echo_route(&upstream, "")));
    let token = login(gw.addr, "alice").await.token;
    let auth = format!("Bearer {token}");
    let mut offered = hdrs.clone();
    offered[0] = ("Authorization", &auth);
    offered.push(("Sec-WebSocket-Extensions", "permessage-deflate"));
    let r = request(gw.addr, "GET", "/ws/echo", &offered, None).await;
    assert_eq!(r.status, 502, "the answer is not a subset of the offer");
    assert!(
        gw.log()
            .contains("extension answer does not accept an offer"),
        "{}",
        gw.log()
    );
    rt.abort();
}

/// On a deflate connection the close the gateway injects (here `1009` for a
/// message over the limit) is uncompressed: RSV1 clear.
#[tokio::test]
async fn injected_closes_are_uncompressed_on_a_deflate_connection() {
    if !have_websockets().await {
        return;
    }
    let (_rt, port, mut lines) = pyws::runtime(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = Gateway::start(
        "",
        &config(None, &echo_route(&upstream, "max_message_bytes = 1024")),
    );
    let token = login(gw.addr, "alice").await.token;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "GET /ws/echo HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        gw.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = tokio::time::timeout(WITHIN, s.read(&mut chunk))
            .await
            .expect("the 101 in time")
            .unwrap();
        assert!(n > 0, "gateway closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let resp = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 101"), "{resp}");
    assert!(
        resp.contains("sec-websocket-extensions: permessage-deflate"),
        "{resp}"
    );
    pyws::next_offer(&mut lines).await;
    // A binary message of 2000 bytes (over the 1024 limit), masked with a
    // zero key so the payload is sent as is.
    let mut frame = vec![0x82, 0x80 | 126];
    frame.extend_from_slice(&2000u16.to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend(std::iter::repeat_n(b'a', 2000));
    s.write_all(&frame).await.unwrap();
    let mut rest = buf[end..].to_vec();
    while rest.len() < 4 {
        let n = tokio::time::timeout(WITHIN, s.read(&mut chunk))
            .await
            .expect("the close in time")
            .unwrap();
        assert!(n > 0, "the gateway dropped TCP without a close frame");
        rest.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(rest[0], 0x88, "a final close frame with RSV bits clear");
    assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), 1009);
}
