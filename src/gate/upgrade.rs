//! The HTTP side of an upgrade: is it one, may this origin make it, which
//! headers travel upstream, and the `101` we answer with.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, COOKIE, HOST, ORIGIN, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    TRANSFER_ENCODING, UPGRADE,
};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::error::{ApiError, Body};
use crate::token::Claims;
use crate::token::credentials::COOKIE_NAME;

const X_SESSION_ID: HeaderName = HeaderName::from_static("x-portcullis-session-id");
const X_USER: HeaderName = HeaderName::from_static("x-portcullis-user");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Check 1: a valid RFC 6455 upgrade request. Returns the accept key.
///
/// A request that parsers could read in more than one way is refused first,
/// with `400 bad_request` (see [`ambiguity`]); a well-formed request that is
/// not a WebSocket upgrade gets `426 upgrade_required`.
pub fn check(req: &Request<Incoming>) -> Result<String, ApiError> {
    if let Some(why) = ambiguity(req) {
        return Err(ApiError::bad_request(why));
    }
    let h = req.headers();
    let version_ok = h.get(SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    // RFC 6455 §4.2.1: the key is base64 of 16 bytes (24 characters).
    let key = h
        .get(SEC_WEBSOCKET_KEY)
        .filter(|k| k.len() == 24 && BASE64.decode(k.as_bytes()).is_ok_and(|b| b.len() == 16))
        .map(|k| derive_accept_key(k.as_bytes()));
    match key {
        Some(accept)
            if req.method() == Method::GET
                && req.version() == http::Version::HTTP_11
                && has_token(h, CONNECTION, "upgrade")
                && has_token(h, UPGRADE, "websocket")
                && version_ok =>
        {
            Ok(accept)
        }
        _ => Err(ApiError::upgrade_required()),
    }
}

/// Headers the gate reads one value of, where a second line would let two
/// readers (this gate, a proxy in front, the runtime) disagree on which one
/// counts: which origin was checked, which key was answered, which version
/// spoken, which credential presented. `Host` is checked on its own (RFC
/// 9112 §3.2). List-valued headers (`Connection`, `Upgrade`,
/// `Sec-WebSocket-Protocol`) may repeat: their lines join into one list.
const SINGLE: [HeaderName; 4] = [
    ORIGIN,
    SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION,
    AUTHORIZATION,
];

/// Why a request is ambiguous (RFC 9112 §3.2, §6.1; RFC 6455 §4.1), if it
/// is: no `Host` on HTTP/1.1, several or a malformed one; a body on the
/// upgrade `GET` (`Transfer-Encoding` at all, `Content-Length` other than a
/// single `0`), whose bytes a runtime could read as frames or as the next
/// request; or a second line of a [`SINGLE`] header.
pub fn ambiguity(req: &Request<Incoming>) -> Option<&'static str> {
    let h = req.headers();
    let mut hosts = h.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == http::Version::HTTP_11 => {
            return Some("An HTTP/1.1 request needs a Host header");
        }
        (Some(_), Some(_)) => return Some("More than one Host header"),
        (Some(host), None) if Authority::try_from(host.as_bytes()).is_err() => {
            return Some("The Host header is not a valid host");
        }
        _ => {}
    }
    if h.contains_key(TRANSFER_ENCODING) {
        return Some("An upgrade request must not have a body (Transfer-Encoding)");
    }
    let mut lengths = h.get_all(CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => {}
        (Some(v), None) if v == "0" => {}
        _ => return Some("An upgrade request must not have a body (Content-Length)"),
    }
    for name in &SINGLE {
        let mut values = h.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Some(match *name {
                ORIGIN => "More than one Origin header",
                SEC_WEBSOCKET_KEY => "More than one Sec-WebSocket-Key header",
                SEC_WEBSOCKET_VERSION => "More than one Sec-WebSocket-Version header",
                _ => "More than one Authorization header",
            });
        }
    }
    None
}

/// Check 2: `[]` admits no browser origin, `["*"]` any, otherwise an exact
/// (case-insensitive) match.
pub fn origin_allowed(allowed: &[String], origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// What the client offered in `Sec-WebSocket-Protocol`.
pub struct Offered {
    /// The `bearer, <token>` pair was used: answer `bearer` when the runtime
    /// picks nothing, as browsers require a chosen protocol they offered.
    pub bearer: bool,
    /// The other protocols, passed to the runtime to choose from.
    pub others: Option<String>,
}

pub fn offered_protocols(headers: &HeaderMap) -> Offered {
    let mut bearer = false;
    let mut others = Vec::new();
    let mut items = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    while let Some(p) = items.next() {
        if p == "bearer" {
            bearer = true;
            items.next(); // the token itself never travels upstream
        } else {
            others.push(p);
        }
    }
    Offered {
        bearer,
        others: (!others.is_empty()).then(|| others.join(", ")),
    }
}

/// Client headers for the upstream request: everything end-to-end except
/// the client's credentials and any `X-Portcullis-*` it tried to send, plus
/// the identity the gate established.
///
/// Dropped besides:
/// - every header whose name contains `_`, as NGINX does by default
///   (`underscores_in_headers off`; Envoy's `headers_with_underscores_action`).
///   CGI, WSGI, Rack and PHP map `_` and `-` to the same variable, so
///   `X_Portcullis_User` would reach a runtime as `HTTP_X_PORTCULLIS_USER`,
///   the gateway's own identity. Dropping them all, rather than only those
///   that normalise to a name we drop, needs no list kept in step with every
///   framework's folding rules, and no real client sends such names;
/// - the hop-by-hop headers of RFC 9110 §7.6.1: the fixed set, and every
///   header the client named in `Connection`;
/// - `Content-Length`: the upstream request has no body ([`ambiguity`]
///   refused one).
pub fn forwarded_headers(client: &HeaderMap, claims: &Claims, peer: SocketAddr) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 3);
    for (name, value) in client {
        let n = name.as_str();
        let hop_or_handshake = name == CONNECTION
            || name == UPGRADE
            || name == HOST
            || name == CONTENT_LENGTH
            || name == SEC_WEBSOCKET_KEY
            || name == SEC_WEBSOCKET_VERSION
            || name == SEC_WEBSOCKET_PROTOCOL
            || name == SEC_WEBSOCKET_EXTENSIONS
            || name == SEC_WEBSOCKET_ACCEPT
            || matches!(
                n,
                "keep-alive"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "proxy-connection"
                    | "proxy-authorization"
            )
            || has_token(client, CONNECTION, n);
        if hop_or_handshake
            || n.contains('_')
            || n.starts_with("x-portcullis-")
            || name == X_FORWARDED_FOR
        {
            continue;
        }
        if name == AUTHORIZATION {
            let is_bearer = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .is_some_and(|(s, _)| s.eq_ignore_ascii_case("bearer"));
            if is_bearer {
                continue;
            }
        }
        if name == COOKIE {
            if let Some(kept) = strip_session_cookie(value) {
                out.append(COOKIE, kept);
            }
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    // A client that names X-Forwarded-For in Connection asks for its own
    // chain to be dropped (RFC 9110 §7.6.1); the chain then starts here.
    let client_chain = !has_token(client, CONNECTION, X_FORWARDED_FOR.as_str());
    let forwarded_for = client
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter(|_| client_chain)
        .filter_map(|v| v.to_str().ok())
        .chain(std::iter::once(peer.ip().to_string().as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        out.insert(X_FORWARDED_FOR, v);
    }
    if let Ok(v) = HeaderValue::from_str(&claims.sid) {
        out.insert(X_SESSION_ID, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(claims.sub.as_bytes()) {
        out.insert(X_USER, v);
    }
    out
}

/// The client's permessage-deflate offers (RFC 7692), in its order, for the
/// upstream request of an exclusive route; `None` when it offered none.
///
/// Only permessage-deflate is passed on: the relay knows what RSV1 means
/// under it and nothing else, so any other extension (e.g.
/// `x-webkit-deflate-frame`) is still stripped and never negotiated. Shared
/// routes never call this: hubs decode messages with tungstenite, which has
/// no deflate.
pub fn deflate_offer(client: &HeaderMap) -> Option<HeaderValue> {
    let offers: Vec<&str> = client
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|o| {
            o.split(';')
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case("permessage-deflate"))
        })
        .collect();
    if offers.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offers.join(", ")).ok()
}

/// The cookie header without `portcullis_session`; `None` when nothing is left.
fn strip_session_cookie(value: &HeaderValue) -> Option<HeaderValue> {
    let v = value.to_str().ok()?;
    let kept: Vec<&str> = v
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split('=').next() != Some(COOKIE_NAME))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

/// SPEC §9: the client asked for the browser contract with the query
/// parameter `portcullis=v1` (never forwarded upstream).
pub fn browser_contract(query: Option<&str>) -> bool {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .any(|p| p == "portcullis=v1")
}

/// SPEC §9: the refusals a browser client is told in band, after a `101`:
/// checks 3-6 (403, 502, 503); asked only of their errors. A malformed
/// `resume_from` (400) stays plain HTTP, as checks 1-2 do.
pub fn told_in_band(e: &ApiError) -> bool {
    matches!(e.status.as_u16(), 403 | 502 | 503)
}

/// The `101`, for exclusive and shared sockets alike. It carries the
/// subprotocol the runtime chose if this client offered it (a shared hub's
/// runtime chose once, for the viewport that dialled it); when the client
/// authenticated with the `bearer, <token>` pair and no other protocol is
/// chosen, it says `bearer`, since browsers fail a handshake whose `101`
/// picks none of the protocols they offered.
pub fn switching_protocols(
    accept: String,
    runtime_choice: Option<HeaderValue>,
    offered: &Offered,
    extensions: Option<HeaderValue>,
) -> Response<Body> {
    let protocol = runtime_choice
        .filter(|p| {
            let p = p.to_str().unwrap_or("");
            offered
                .others
                .as_deref()
                .unwrap_or("")
                .split(',')
                .any(|o| o.trim() == p)
        })
        .or_else(|| offered.bearer.then(|| HeaderValue::from_static("bearer")));
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if let Some(p) = protocol {
        h.insert(SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(e) = extensions {
        h.insert(SEC_WEBSOCKET_EXTENSIONS, e);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            sid: "sid123".into(),
            iat: 0,
            exp: 0,
            iss: "i".into(),
            aud: "a".into(),
            jti: "j".into(),
        }
    }

    #[test]
    fn strips_credentials_and_spoofed_identity() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        h.insert(
            COOKIE,
            HeaderValue::from_static("a=1; portcullis_session=secret; b=2"),
        );
        h.insert("x-portcullis-user", HeaderValue::from_static("mallory"));
        h.insert("x-portcullis-anything", HeaderValue::from_static("x"));
        h.insert("user-agent", HeaderValue::from_static("test"));
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("bearer, secret"),
        );
        let out = forwarded_headers(&h, &claims(), "10.1.2.3:5".parse().unwrap());
        assert!(out.get(AUTHORIZATION).is_none());
        assert_eq!(out.get(COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(out.get("x-portcullis-user").unwrap(), "alice");
        assert_eq!(out.get("x-portcullis-session-id").unwrap(), "sid123");
        assert!(out.get("x-portcullis-anything").is_none());
        assert!(out.get(SEC_WEBSOCKET_PROTOCOL).is_none());
        assert_eq!(out.get("user-agent").unwrap(), "test");
        assert_eq!(out.get("x-forwarded-for").unwrap(), "10.1.2.3");
        let all = format!("{out:?}");
        assert!(!all.contains("secret"), "{all}");
    }

    #[test]
    fn bearer_pair_is_removed_from_offered_protocols() {
        let mut h = HeaderMap::new();
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat.v1, bearer, tok, chat.v2"),
        );
        let o = offered_protocols(&h);
        assert!(o.bearer);
        assert_eq!(o.others.as_deref(), Some("chat.v1, chat.v2"));
        let o = offered_protocols(&HeaderMap::new());
        assert!(!o.bearer && o.others.is_none());
    }

    #[test]
    fn the_101_names_an_offered_runtime_choice_or_bearer() {
        let offered = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(v));
            offered_protocols(&h)
        };
        let chosen = |resp: Response<Body>| {
            resp.headers()
                .get(SEC_WEBSOCKET_PROTOCOL)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let chat = Some(HeaderValue::from_static("chat.v2"));
        let r = switching_protocols("a".into(), chat.clone(), &offered("chat.v1, chat.v2"), None);
        assert_eq!(r.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(chosen(r).as_deref(), Some("chat.v2"));
        let r = switching_protocols(
            "a".into(),
            chat.clone(),
            &offered("bearer, tok, chat.v1"),
            None,
        );
        assert_eq!(
            chosen(r).as_deref(),
            Some("bearer"),
            "chat.v2 was not offered"
        );
        let r = switching_protocols("a".into(), None, &offered("bearer, tok"), None);
        assert_eq!(chosen(r).as_deref(), Some("bearer"));
        let r = switching_protocols("a".into(), chat, &offered("chat.v1"), None);
        assert_eq!(chosen(r), None);
    }

    #[test]
    fn only_permessage_deflate_offers_go_upstream() {
        let mut h = HeaderMap::new();
        h.append(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(
                "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
            ),
        );
        h.append(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("foo; bar=1, Permessage-Deflate"),
        );
        assert_eq!(
            deflate_offer(&h).unwrap(),
            "permessage-deflate; client_max_window_bits, Permessage-Deflate"
        );
        let mut other = HeaderMap::new();
        other.insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("x-webkit-deflate-frame"),
        );
        assert_eq!(deflate_offer(&other), None);
        assert_eq!(deflate_offer(&HeaderMap::new()), None);
        // The offer never travels as an ordinary header.
        let out = forwarded_headers(&h, &claims(), "10.1.2.3:5".parse().unwrap());
        assert!(out.get(SEC_WEBSOCKET_EXTENSIONS).is_none());
    }

    #[test]
    fn origins() {
        let v = HeaderValue::from_static("http://localhost:3000");
        assert!(origin_allowed(&["http://localhost:3000".into()], &v));
        assert!(origin_allowed(&["*".into()], &v));
        assert!(!origin_allowed(&[], &v));
        assert!(!origin_allowed(&["http://localhost:3001".into()], &v));
    }

    /// Property (issue 16): whatever a client sends, the upstream request
    /// carries no `X-Portcullis-*` but the gateway's own, no header with `_`,
    /// no hop-by-hop header (fixed or named in `Connection`), no credential,
    /// and nothing the client did not send.
    mod forwarded_property {
        use super::*;
        use proptest::prelude::*;

        /// Hop-by-hop and handshake names: never forwarded.
        const HOP: &[&str] = &[
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "proxy-authorization",
            "host",
            "content-length",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
            "sec-websocket-accept",
        ];

        /// The other names a hostile request mixes in: identity look-alikes,
        /// underscores, credentials, and ordinary names.
        const OTHERS: &[&str] = &[
            "x-portcullis-user",
            "x-portcullis-session-id",
            "x-portcullis-role",
            "x_portcullis_user",
            "x-portcullis_session-id",
            "custom_header",
            "_",
            "authorization",
            "cookie",
            "x-forwarded-for",
            "x-hop",
            "x-trace",
            "user-agent",
            "origin",
            "accept-language",
        ];

        fn names() -> Vec<&'static str> {
            [HOP, OTHERS].concat()
        }

        /// One header: a name, and a value built for it from `seed` and
        /// `named` (the names a `Connection` value lists, in either case).
        /// Plain tuples of cheap strategies: a per-name strategy would cost
        /// more than `forwarded_headers` itself.
        fn header(
            (name, seed, named): (&'static str, u32, Vec<(&'static str, bool)>),
        ) -> (&'static str, String) {
            let value = match name {
                "connection" => {
                    let list: Vec<String> = named
                        .iter()
                        .map(|&(n, up)| {
                            if up {
                                n.to_ascii_uppercase()
                            } else {
                                n.to_string()
                            }
                        })
                        .collect();
                    format!(" {} ,", list.join(" ,  "))
                }
                "authorization" => match seed % 3 {
                    0 => format!("Bearer SECRET{seed}"),
                    1 => format!("bearer SECRET{seed}"),
                    _ => format!("Basic dXNlcjp{seed}"),
                },
                "cookie" => format!("c{}={seed}; portcullis_session=SECRETc; z=1", seed % 7),
                "sec-websocket-protocol" => "chat, bearer, SECRETp".to_string(),
                _ => ["v", "a b", "10.0.0.9", "x,y", "q=1; r", "~!@#$%^&*()"][seed as usize % 6]
                    .to_string(),
            };
            (name, value)
        }

        fn headers() -> impl Strategy<Value = Vec<(&'static str, String)>> {
            let named = prop::collection::vec((prop::sample::select(names()), any::<bool>()), 0..4);
            prop::collection::vec(
                (prop::sample::select(names()), any::<u32>(), named).prop_map(header),
                0..12,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100_000))]

            #[test]
            fn nothing_spoofed_hop_by_hop_or_secret_goes_upstream(pairs in headers()) {
                let mut client = HeaderMap::new();
                for (n, v) in &pairs {
                    client.append(HeaderName::from_static(n), HeaderValue::from_str(v).unwrap());
                }
                let peer: SocketAddr = "10.1.2.3:5".parse().unwrap();
                let out = forwarded_headers(&client, &claims(), peer);
                let named: Vec<String> = client
                    .get_all(CONNECTION)
                    .iter()
                    .flat_map(|v| v.to_str().unwrap().split(','))
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect();
                let own = ["x-portcullis-user", "x-portcullis-session-id", "x-forwarded-for"];
                for (name, value) in &out {
                    let n = name.as_str();
                    let v = value.to_str().unwrap();
                    prop_assert!(!n.contains('_'), "{n}");
                    prop_assert!(!v.contains("SECRET"), "{n}: {v}");
                    if own.contains(&n) {
                        continue;
                    }
                    prop_assert!(!n.starts_with("x-portcullis-"), "{n}");
                    prop_assert!(!HOP.contains(&n), "{n}");
                    prop_assert!(!named.iter().any(|t| t == n), "{n} named in Connection");
                    if n == "authorization" {
                        prop_assert!(!v.to_ascii_lowercase().starts_with("bearer "));
                    }
                    // Nothing invented: the value is the client's (a cookie
                    // header minus the session cookie).
                    let sent: Vec<&str> = client.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
                    if n == "cookie" {
                        let items: Vec<&str> = sent.iter().flat_map(|s| s.split(';')).map(str::trim).collect();
                        prop_assert!(v.split(';').map(str::trim).all(|c| items.contains(&c)), "{v}");
                    } else {
                        prop_assert!(sent.contains(&v), "{n}: {v}");
                    }
                }
                prop_assert_eq!(out.get_all("x-portcullis-user").iter().collect::<Vec<_>>(), vec!["alice"]);
                prop_assert_eq!(out.get_all("x-portcullis-session-id").iter().collect::<Vec<_>>(), vec!["sid123"]);
                let xff: Vec<_> = out.get_all("x-forwarded-for").iter().collect();
                prop_assert_eq!(xff.len(), 1);
                prop_assert!(xff[0].to_str().unwrap().ends_with("10.1.2.3"));
            }
        }
    }
}
