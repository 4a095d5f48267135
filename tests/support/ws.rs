//! WebSocket client helpers with bounded waits.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Upgrade = Result<(Ws, Response<Option<Vec<u8>>>), Error>;

pub async fn connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response<Option<Vec<u8>>>), Error> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("WebSocket connect timed out")
}

/// Connects with `Authorization: Bearer <token>`.
pub async fn connect_bearer(url: &str, token: &str) -> Upgrade {
    connect(url, &[("authorization", &format!("Bearer {token}"))]).await
}

/// [`connect_bearer`], panicking on refusal.
pub async fn open(url: &str, token: &str) -> (Ws, Response<Option<Vec<u8>>>) {
    match connect_bearer(url, token).await {
        Ok(x) => x,
        Err(e) => panic!("upgrade refused: {}", describe(&e)),
    }
}

pub fn describe(e: &Error) -> String {
    match e {
        Error::Http(r) => format!(
            "{} {}",
            r.status(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
        ),
        other => other.to_string(),
    }
}

/// Status, JSON body and headers of a refused upgrade.
pub fn refusal(r: Upgrade) -> (u16, serde_json::Value, http::HeaderMap) {
    match r {
        Ok(_) => panic!("upgrade was accepted but should have been refused"),
        Err(Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            (resp.status().as_u16(), json, resp.headers().clone())
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// The next data or close message, skipping pings and pongs.
pub async fn next(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message within 10 s")
            .expect("stream ended")
            .expect("socket error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

/// Reads until the close frame, returning its code and reason, within `within`.
pub async fn expect_close(ws: &mut Ws, within: Duration) -> (u16, String) {
    let r = tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before a close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("no close frame within {within:?}"))
}

/// A raw client: the upgrade to `path` by hand (bearer `token`), returning
/// the socket right after the `101` head, for tests that write frames
/// byte by byte.
pub async fn raw_upgrade(addr: std::net::SocketAddr, path: &str, token: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .expect("no 101")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept key per RFC 6455: {head}"
    );
    s
}

/// One frame as written by hand: `rsv` is RSV1-3 as bits 4, 2, 1; `mask`
/// masks it as a client must.
pub fn raw_frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let header = FrameHeader {
        is_final: fin,
        rsv1: rsv & 4 != 0,
        rsv2: rsv & 2 != 0,
        rsv3: rsv & 1 != 0,
        opcode: opcode.into(),
        mask,
    };
    let mut out = Vec::new();
    Frame::from_payload(header, payload.to_vec().into())
        .format(&mut out)
        .unwrap();
    out
}

/// A masked client frame.
pub fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    raw_frame(fin, 0, opcode, Some([9, 8, 7, 6]), payload)
}

/// Reads one unmasked frame from a raw socket: (opcode, payload), within 5 s.
pub async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[1] & 0x80, 0, "frames to a client are never masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => panic!("unexpectedly large frame"),
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    })
    .await
    .expect("no frame within 5 s")
}
