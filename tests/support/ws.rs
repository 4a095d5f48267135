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
