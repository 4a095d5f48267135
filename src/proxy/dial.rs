//! Dialling a runtime: TCP connect and the WebSocket client handshake.
//!
//! The response head is parsed by `httparse` (the parser hyper itself uses;
//! we never parse HTTP ourselves). A handshake is one request written and one
//! response read on a socket that is handed to the relay right after, so a
//! general HTTP client (hyper's: a spawned connection task, request and
//! response channels, header maps) cost more than the handshake itself:
//! BENCHMARKS.md has the per-upgrade figures. Bytes the runtime pipelined
//! behind its `101` are handed on with the socket.

use bytes::Bytes;
use http::header::{
    SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::either::Either;
use url::Url;

/// Largest response head accepted from a runtime (as for client requests).
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most response header lines accepted from a runtime (hyper's default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// First read buffer: a `101` is usually under 200 bytes.
const FIRST_READ: usize = 1024;

/// Why a dial failed; every variant means "try the next upstream".
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("handshake i/o: {0}")]
    Io(std::io::Error),
    /// The TLS handshake failed: most often a certificate the route does
    /// not trust or that names another host.
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("runtime closed the connection during the handshake")]
    Closed,
    #[error("runtime's response head is not valid HTTP: {0}")]
    Parse(httparse::Error),
    #[error("runtime's response head exceeds {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("runtime refused the upgrade with {0}")]
    Refused(StatusCode),
    #[error("runtime's handshake is not valid: {0}")]
    BadHandshake(&'static str),
}

/// A completed upstream handshake.
pub struct Dialled {
    pub stream: UpstreamIo,
    /// Frames the runtime sent right behind its `101`.
    pub early: Bytes,
    /// The subprotocol the runtime chose, if any.
    pub protocol: Option<HeaderValue>,
    /// The runtime's `Sec-WebSocket-Extensions` answer: only ever a
    /// permessage-deflate answer to one of the client's offers, checked by
    /// [`check_deflate`]; `Some` means RSV1 marks compressed messages on
    /// this connection.
    pub extensions: Option<HeaderValue>,
}

/// What the upstream request carries besides the handshake itself.
pub struct UpstreamRequest<'a> {
    pub url: &'a Url,
    /// Client headers to pass on (already stripped of credentials,
    /// `X-Portcullis-*` and hop-by-hop headers).
    pub headers: &'a HeaderMap,
    /// Subprotocols the client offered, minus the `bearer` pair.
    pub protocols: Option<String>,
    /// The client's permessage-deflate offers (exclusive routes only; see
    /// [`crate::gate::upgrade::deflate_offer`]).
    pub extensions: Option<HeaderValue>,
    /// The route's TLS client config, for `wss://` URLs.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A runtime connection: plain for `ws://`, TLS for `wss://`. The TLS side
/// is boxed: rustls' connection state is over a KiB inline, and the socket
/// task holds this value until the client's upgrade completes, so an
/// unboxed variant would make every plain socket's task that much larger.
pub type UpstreamIo = Either<TcpStream, Box<TlsStream<TcpStream>>>;

pub async fn dial(req: UpstreamRequest<'_>) -> Result<Dialled, DialError> {
    let host = req.url.host_str().unwrap_or_default();
    let port = req.url.port_or_known_default().unwrap_or(80);
    // An IP literal resolves without touching DNS; names go through
    // tokio's resolver (off the async workers).
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((bare, port))
        .await
        .map_err(DialError::Connect)?;
    let _ = stream.set_nodelay(true);
    if req.url.scheme() != "wss" {
        return handshake(req, Either::Left(stream)).await;
    }
    // SNI and the name the certificate must carry: the URL's host.
    let cfg = req.tls.clone().ok_or(DialError::BadHandshake(
        "a wss:// upstream on a route without a TLS client config",
    ))?;
    let name = rustls::pki_types::ServerName::try_from(bare.to_string())
        .map_err(|_| DialError::Tls(std::io::Error::other("not a valid TLS server name")))?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, stream)
        .await
        .map_err(DialError::Tls)?;
    handshake(req, Either::Right(Box::new(tls))).await
}

/// The WebSocket client handshake on a connected stream.
async fn handshake(req: UpstreamRequest<'_>, mut stream: UpstreamIo) -> Result<Dialled, DialError> {
    let key = generate_key();
    let head = request_head(&req, &key);
    stream.write_all(&head).await.map_err(DialError::Io)?;
    // TLS buffers what it writes; a plain socket's flush does nothing.
    stream.flush().await.map_err(DialError::Io)?;
    drop(head);

    let mut buf = vec![0u8; FIRST_READ];
    let mut filled = 0;
    // Where the current response head starts: interim `1xx` responses
    // before the `101` (e.g. `103 Early Hints`) are skipped, as hyper does.
    let mut start = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(DialError::HeadTooLarge);
            }
            buf.resize((buf.len() * 4).min(MAX_RESPONSE_HEAD), 0);
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(DialError::Io)?;
        if n == 0 {
            return Err(DialError::Closed);
        }
        filled += n;
        while start < filled {
            let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf[start..filled]) {
                Ok(httparse::Status::Complete(head_len)) => {
                    if resp
                        .code
                        .is_some_and(|c| (100..200).contains(&c) && c != 101)
                    {
                        start += head_len;
                        continue;
                    }
                    let protocol = check_response(&resp, &key, req.protocols.as_deref())?;
                    let extensions = check_extensions(&resp, req.extensions.as_ref())?;
                    return Ok(Dialled {
                        stream,
                        early: Bytes::copy_from_slice(&buf[start + head_len..filled]),
                        protocol,
                        extensions,
                    });
                }
                Ok(httparse::Status::Partial) => break,
                Err(e) => return Err(DialError::Parse(e)),
            }
        }
    }
}

/// The handshake request. Every piece is already valid on the wire: the
/// path and authority come from a parsed `Url` (percent-encoded), header
/// values are `HeaderValue`s (no CR/LF), the key is base64.
fn request_head(req: &UpstreamRequest<'_>, key: &str) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(req.url.path().as_bytes());
    if let Some(q) = req.url.query() {
        head.push(b'?');
        head.extend_from_slice(q.as_bytes());
    }
    head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    head.extend_from_slice(req.url.authority().as_bytes());
    head.extend_from_slice(
        b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    head.extend_from_slice(key.as_bytes());
    head.extend_from_slice(b"\r\n");
    if let Some(p) = &req.protocols {
        head.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        head.extend_from_slice(p.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(e) = &req.extensions {
        head.extend_from_slice(b"Sec-WebSocket-Extensions: ");
        head.extend_from_slice(e.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn header<'a>(resp: &'a httparse::Response<'_, '_>, name: &http::HeaderName) -> Option<&'a [u8]> {
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
        .map(|h| h.value)
}

/// Accepts only a `101` that completes *our* handshake: the right accept
/// key and an offered subprotocol if any (extensions: [`check_extensions`]).
fn check_response(
    resp: &httparse::Response<'_, '_>,
    key: &str,
    offered: Option<&str>,
) -> Result<Option<HeaderValue>, DialError> {
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(DialError::BadHandshake("no status code"))?;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(DialError::Refused(status));
    }
    if !header(resp, &UPGRADE).is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err(DialError::BadHandshake("Upgrade is not websocket"));
    }
    if header(resp, &SEC_WEBSOCKET_ACCEPT) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err(DialError::BadHandshake(
            "Sec-WebSocket-Accept does not match",
        ));
    }
    let Some(chosen) = header(resp, &SEC_WEBSOCKET_PROTOCOL) else {
        return Ok(None);
    };
    let chosen_str = std::str::from_utf8(chosen)
        .map_err(|_| DialError::BadHandshake("subprotocol is not text"))?
        .trim();
    if !offered
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .any(|p| !p.is_empty() && p == chosen_str)
    {
        return Err(DialError::BadHandshake("subprotocol was not offered"));
    }
    HeaderValue::from_str(chosen_str)
        .map(Some)
        .map_err(|_| DialError::BadHandshake("subprotocol is not a header value"))
}

/// The runtime's extension answer: none, or one permessage-deflate answer
/// that accepts one of the offers the client made (RFC 7692 §5, §7). An
/// extension nobody offered would change the framing the relay tracks, so
/// anything else fails the dial.
fn check_extensions(
    resp: &httparse::Response<'_, '_>,
    offered: Option<&HeaderValue>,
) -> Result<Option<HeaderValue>, DialError> {
    let mut answers = resp
        .headers
        .iter()
        .filter(|h| {
            h.name
                .eq_ignore_ascii_case(SEC_WEBSOCKET_EXTENSIONS.as_str())
        })
        .map(|h| h.value);
    let Some(answer) = answers.next() else {
        return Ok(None);
    };
    if answers.next().is_some() {
        return Err(DialError::BadHandshake("more than one extension answer"));
    }
    let Some(offered) = offered.and_then(|o| o.to_str().ok()) else {
        return Err(DialError::BadHandshake("extension was not offered"));
    };
    let answer = std::str::from_utf8(answer)
        .map_err(|_| DialError::BadHandshake("extension answer is not text"))?
        .trim();
    if !check_deflate(answer, offered) {
        return Err(DialError::BadHandshake(
            "extension answer does not accept an offer",
        ));
    }
    HeaderValue::from_str(answer)
        .map(Some)
        .map_err(|_| DialError::BadHandshake("extension answer is not a header value"))
}

/// permessage-deflate parameters (RFC 7692 §7.1), parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Deflate {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `Some(None)`: present without a value.
    server_max_window_bits: Option<Option<u8>>,
    client_max_window_bits: Option<Option<u8>>,
}

/// One extension element, `permessage-deflate; p; p=v`, or `None` if it is
/// another extension, repeats a parameter, or has one RFC 7692 does not
/// define or a value out of range.
fn parse_deflate(element: &str) -> Option<Deflate> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut d = Deflate::default();
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let bits = |v: Option<&str>| -> Option<Option<u8>> {
            match v {
                None => Some(None),
                Some(v)
                    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.len() <= 2 =>
                {
                    let n: u8 = v.parse().ok()?;
                    (8..=15).contains(&n).then_some(Some(n))
                }
                Some(_) => None,
            }
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() && !d.server_no_context_takeover => {
                d.server_no_context_takeover = true;
            }
            "client_no_context_takeover" if value.is_none() && !d.client_no_context_takeover => {
                d.client_no_context_takeover = true;
            }
            "server_max_window_bits" if d.server_max_window_bits.is_none() => {
                d.server_max_window_bits = Some(bits(value)?);
            }
            "client_max_window_bits" if d.client_max_window_bits.is_none() => {
                d.client_max_window_bits = Some(bits(value)?);
            }
            _ => return None,
        }
    }
    Some(d)
}

/// Whether `answer` (one element) accepts at least one of the
/// comma-separated `offers` under RFC 7692 §7.1:
/// - `server_no_context_takeover`, `client_no_context_takeover`: a server
///   may answer either whether or not it was offered;
/// - `server_max_window_bits`: with a value, at most the offered one if
///   offered (a server may limit its own window unasked, §7.1.2.1);
/// - `client_max_window_bits`: only if offered, with a value, at most the
///   offered one if the offer had a value (§7.1.2.2).
fn check_deflate(answer: &str, offers: &str) -> bool {
    if answer.contains(',') {
        return false;
    }
    let Some(a) = parse_deflate(answer) else {
        return false;
    };
    let within = |answer: Option<Option<u8>>, offer: Option<Option<u8>>| match (answer, offer) {
        (None, _) => true,
        (Some(None), _) | (Some(Some(_)), None) => false,
        (Some(Some(a)), Some(Some(o))) => a <= o,
        (Some(Some(_)), Some(None)) => true,
    };
    let server_within = |answer: Option<Option<u8>>, offer: Option<Option<u8>>| match answer {
        Some(Some(_)) if offer.is_none() => true,
        _ => within(answer, offer),
    };
    offers.split(',').filter_map(parse_deflate).any(|o| {
        server_within(a.server_max_window_bits, o.server_max_window_bits)
            && within(a.client_max_window_bits, o.client_max_window_bits)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_and_check(
        raw: &[u8],
        key: &str,
        offered: Option<&str>,
    ) -> Result<Option<HeaderValue>, DialError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(raw).expect("parses").is_complete());
        let protocol = check_response(&resp, key, offered)?;
        check_extensions(&resp, None)?;
        Ok(protocol)
    }

    #[test]
    fn deflate_answers_must_accept_an_offer() {
        let offers = "permessage-deflate; client_max_window_bits, permessage-deflate";
        for ok in [
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits=12",
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12",
            "Permessage-Deflate; Server_No_Context_Takeover; client_max_window_bits=\"15\"",
        ] {
            assert!(check_deflate(ok, offers), "{ok}");
        }
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
        ] {
            assert!(!check_deflate(bad, offers), "{bad}");
        }
        let capped = "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11";
        assert!(check_deflate(
            "permessage-deflate; server_max_window_bits=9; client_max_window_bits=11",
            capped
        ));
        assert!(!check_deflate(
            "permessage-deflate; server_max_window_bits=11",
            capped
        ));
        assert!(!check_deflate(
            "permessage-deflate; client_max_window_bits=12",
            capped
        ));
        assert!(!check_deflate(
            "permessage-deflate",
            "x-webkit-deflate-frame"
        ));
        assert!(!check_deflate(
            "permessage-deflate; client_max_window_bits=12",
            "permessage-deflate"
        ));
    }

    fn ok_101(key: &str, extra: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extra}\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes()
    }

    #[test]
    fn accepts_only_our_handshake() {
        let key = generate_key();
        assert!(matches!(
            parse_and_check(&ok_101(&key, ""), &key, None),
            Ok(None)
        ));
        let other = generate_key();
        assert!(matches!(
            parse_and_check(&ok_101(&other, ""), &key, None),
            Err(DialError::BadHandshake(
                "Sec-WebSocket-Accept does not match"
            ))
        ));
        assert!(matches!(
            parse_and_check(
                &ok_101(&key, "Sec-WebSocket-Extensions: permessage-deflate\r\n"),
                &key,
                None
            ),
            Err(DialError::BadHandshake("extension was not offered"))
        ));
        assert!(matches!(
            parse_and_check(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
                &key,
                None
            ),
            Err(DialError::Refused(StatusCode::FORBIDDEN))
        ));
    }

    /// Drives `dial` against a fake runtime that answers with `raw` (split
    /// in two writes) and returns what `dial` made of it.
    async fn dial_fake(
        raw: impl Fn(&str) -> Vec<u8> + Send + 'static,
    ) -> Result<Dialled, DialError> {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("ws://{}/ws", listener.local_addr().unwrap())).unwrap();
        let runtime = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let mut got = 0;
            while !req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                got += s.read(&mut req[got..]).await.unwrap();
            }
            let text = String::from_utf8_lossy(&req[..got]).to_string();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            let answer = raw(&key);
            let (a, b) = answer.split_at(answer.len() / 2);
            s.write_all(a).await.unwrap();
            s.flush().await.unwrap();
            s.write_all(b).await.unwrap();
            // Keep the socket open until the dial has finished reading.
            let _ = s.read(&mut req).await;
        });
        let headers = HeaderMap::new();
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            dial(UpstreamRequest {
                url: &url,
                headers: &headers,
                protocols: None,
                extensions: None,
                tls: None,
            }),
        )
        .await
        .expect("dial finishes");
        runtime.abort();
        out
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_early_bytes_kept() {
        let got = dial_fake(|key| {
            let mut r = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".to_vec();
            r.extend(ok_101(key, ""));
            r.extend_from_slice(b"\x81\x02hi");
            r
        })
        .await
        .expect("a 103 before the 101 is fine");
        assert_eq!(&got.early[..], b"\x81\x02hi");
    }

    #[tokio::test]
    async fn a_refusal_after_an_interim_response_is_a_refusal() {
        let got = dial_fake(|_| {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                .to_vec()
        })
        .await;
        assert!(
            matches!(got, Err(DialError::Refused(StatusCode::NOT_FOUND))),
            "{:?}",
            got.err()
        );
    }

    #[tokio::test]
    async fn an_endless_head_is_refused() {
        let got = dial_fake(|_| {
            let mut r = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
            while r.len() <= MAX_RESPONSE_HEAD {
                r.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            r
        })
        .await;
        assert!(
            matches!(
                got,
                Err(DialError::HeadTooLarge | DialError::Parse(httparse::Error::TooManyHeaders))
            ),
            "{:?}",
            got.err()
        );
    }

    #[test]
    fn subprotocol_must_have_been_offered() {
        let key = generate_key();
        let chat = ok_101(&key, "Sec-WebSocket-Protocol: chat\r\n");
        let got = parse_and_check(&chat, &key, Some("v2, chat")).expect("offered");
        assert_eq!(got, Some(HeaderValue::from_static("chat")));
        assert!(matches!(
            parse_and_check(&chat, &key, Some("v2")),
            Err(DialError::BadHandshake("subprotocol was not offered"))
        ));
        assert!(matches!(
            parse_and_check(&chat, &key, None),
            Err(DialError::BadHandshake("subprotocol was not offered"))
        ));
    }

    #[test]
    fn request_head_is_one_well_formed_request() {
        let url = Url::parse("ws://127.0.0.1:9000/ws/a%20b?x=1").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-portcullis-user", HeaderValue::from_static("alice"));
        let req = UpstreamRequest {
            url: &url,
            headers: &headers,
            protocols: Some("chat".into()),
            extensions: None,
            tls: None,
        };
        let head = request_head(&req, "dGhlIHNhbXBsZSBub25jZQ==");
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut parsed);
        assert_eq!(
            r.parse(&head).unwrap(),
            httparse::Status::Complete(head.len())
        );
        assert_eq!(r.method, Some("GET"));
        assert_eq!(r.path, Some("/ws/a%20b?x=1"));
        let get = |n: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(n))
                .map(|h| h.value)
        };
        assert_eq!(get("host"), Some(&b"127.0.0.1:9000"[..]));
        assert_eq!(get("sec-websocket-protocol"), Some(&b"chat"[..]));
        assert_eq!(get("x-portcullis-user"), Some(&b"alice"[..]));
        assert_eq!(get("upgrade"), Some(&b"websocket"[..]));
    }
}
