//! SPEC §6 frames: what passes through an accepted socket, unchanged, and
//! the close codes the gateway uses.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::gateway::{Gateway, config, echo_route};
use support::http::login;
use support::upstream::{Upstream, to_hex};
use support::ws::{self, expect_close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

const LIMIT: usize = 4096;

async fn setup() -> (Upstream, Gateway, String) {
    setup_with("", LIMIT).await
}

/// An echo runtime behind a gateway (`server_extra` in `[server]`, messages
/// up to `limit` bytes), and alice's token.
async fn setup_with(server_extra: &str, limit: usize) -> (Upstream, Gateway, String) {
    let up = Upstream::start().await;
    let route = echo_route(&up.url("/"), &format!("max_message_bytes = {limit}"));
    let gw = Gateway::start(server_extra, &config(None, &route));
    let token = login(gw.addr, "alice").await.token;
    (up, gw, token)
}

fn frame_bytes(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Frame::message(payload.to_vec(), opcode, fin)
        .format(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn text_binary_ping_and_limit_sized_messages_round_trip() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    s.send(Message::text("héllo ✓")).await.unwrap();
    assert_eq!(ws::next(&mut s).await, Message::text("héllo ✓"));
    let bin: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    s.send(Message::binary(bin.clone())).await.unwrap();
    assert_eq!(ws::next(&mut s).await, Message::binary(bin));
    let exact = vec![7u8; LIMIT];
    s.send(Message::binary(exact.clone())).await.unwrap();
    assert_eq!(
        ws::next(&mut s).await,
        Message::binary(exact),
        "a message exactly at the limit passes"
    );

    // A ping goes to the runtime, whose pong comes back with the same payload.
    s.send(Message::Ping("are-you-there".into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            use futures_util::StreamExt;
            match s.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(_)) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("no pong");
    assert_eq!(&pong[..], b"are-you-there");
}

#[tokio::test]
async fn fragmented_message_from_client_arrives_whole() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    s.send(Message::Frame(Frame::message(
        &b"frag"[..],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    s.send(Message::Frame(Frame::message(
        &b"men"[..],
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    s.send(Message::Frame(Frame::message(
        &b"ted"[..],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(ws::next(&mut s).await, Message::text("fragmented"));
}

async fn raw_upgrade(gw: &Gateway, token: &str) -> tokio::net::TcpStream {
    ws::raw_upgrade(gw.addr, "/ws/echo", token).await
}

fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    ws::masked(opcode.into(), fin, payload)
}

#[tokio::test]
async fn runtime_frames_reach_the_client_byte_for_byte() {
    let (_up, gw, token) = setup().await;
    let mut s = raw_upgrade(&gw, &token).await;
    // Fragments with a ping between them, exactly as the runtime wrote them.
    let mut expected = frame_bytes(OpCode::Data(Data::Text), false, b"ab");
    Frame::ping(&b"p"[..]).format(&mut expected).unwrap();
    expected.extend(frame_bytes(OpCode::Data(Data::Continue), true, b"cd"));
    let cmd = format!("raw:{}", to_hex(&expected));
    s.write_all(&masked(OpCode::Data(Data::Text), true, cmd.as_bytes()))
        .await
        .unwrap();
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("frames did not arrive")
        .unwrap();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn oversized_client_message_is_closed_1009() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    s.send(Message::binary(vec![1u8; LIMIT + 1])).await.unwrap();
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1009, "message_too_big"));
}

#[tokio::test]
async fn oversized_fragmented_message_is_caught_across_fragments() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    let half = vec![b'a'; LIMIT / 2 + 1];
    s.send(Message::Frame(Frame::message(
        half.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    s.send(Message::Frame(Frame::message(
        half,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    let (code, _) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn oversized_runtime_message_is_closed_1009() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    let big = frame_bytes(OpCode::Data(Data::Binary), true, &vec![0u8; LIMIT + 10]);
    s.send(Message::text(format!("raw:{}", to_hex(&big))))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1009, "message_too_big"));
}

#[tokio::test]
async fn runtime_close_code_and_reason_are_relayed() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    s.send(Message::text("close:4001:bye now")).await.unwrap();
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4001, "bye now"));
}

#[tokio::test]
async fn runtime_vanishing_without_close_is_1014() {
    // Read raw: tungstenite clients rewrite 1014 (IANA "Bad Gateway") to
    // 1002 because their code table predates it; browsers accept it.
    let (_up, gw, token) = setup().await;
    let mut s = raw_upgrade(&gw, &token).await;
    s.write_all(&masked(OpCode::Data(Data::Text), true, b"die"))
        .await
        .unwrap();
    let (opcode, payload) = ws::read_frame(&mut s).await;
    assert_eq!(opcode, 0x8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1014);
    assert_eq!(&payload[2..], b"upstream_unavailable");
}

#[tokio::test]
async fn client_close_handshake_completes_through_the_gateway() {
    let (_up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    s.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    // The runtime's close reply comes back through the gateway.
    let (code, _) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(code, 1000);
}

#[tokio::test]
async fn oversized_ping_is_a_protocol_error_not_a_runtime_failure() {
    let (up, gw, token) = setup().await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    let mut raw = Frame::ping(vec![0u8; 4096]);
    raw.header_mut().mask = Some([1, 2, 3, 4]);
    s.send(Message::Frame(raw)).await.unwrap();
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1002, "protocol_error"));
    // The runtime was told the client is gone (SPEC §6), and saw no
    // oversized frame.
    assert_eq!(
        up.next_event(Duration::from_secs(5)).await,
        support::upstream::Event::ClosedBy(1001)
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_and_sending_is_dropped_by_keepalive() {
    let (up, gw, token) = setup_with("ping_interval_ms = 300\npong_timeout_ms = 500", 65536).await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    // The runtime floods; the client neither reads nor sends again, so its
    // buffers fill and even the keep-alive ping cannot reach it.
    s.send(Message::text("stream16k:4000:0")).await.unwrap();
    up.next_arrival().await;
    // The runtime is busy writing, so it notices the end as a failed write
    // (or, if it gets to read, as our 1001).
    let ev = up.next_event(Duration::from_secs(10)).await;
    assert!(
        matches!(
            ev,
            support::upstream::Event::Dropped | support::upstream::Event::ClosedBy(1001)
        ),
        "the gateway gives up on the silent client: {ev:?}"
    );
    drop(s);
}

#[tokio::test]
async fn revocation_during_a_large_frame_still_sends_the_client_1008() {
    let (_up, gw, token) = setup_with("", 16 * 1024 * 1024).await;
    let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
    // A 4 MiB binary message is in flight when the session is revoked.
    let big = frame_bytes(
        OpCode::Data(Data::Binary),
        true,
        &vec![1u8; 4 * 1024 * 1024 - 16],
    );
    s.send(Message::text(format!("raw:{}", to_hex(&big))))
        .await
        .unwrap();
    let r = support::http::logout(gw.addr, &token).await;
    assert_eq!(r.status, 204);
    let (code, reason) = expect_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
}
