//! Where a session token may come from.
//!
//! The API accepts `Authorization: Bearer` and the `portcullis_session`
//! cookie; the WebSocket gate additionally accepts the `bearer, <token>`
//! subprotocol pair and the `session_token` query parameter (browsers cannot
//! set headers on a WebSocket). The first transport present wins.

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};

pub const COOKIE_NAME: &str = "portcullis_session";

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
}

/// The token of a `Sec-WebSocket-Protocol: bearer, <token>` offer.
pub fn subprotocol(headers: &HeaderMap) -> Option<&str> {
    let mut offered = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    while let Some(p) = offered.next() {
        if p == "bearer" {
            return offered.next();
        }
    }
    None
}

pub fn query(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "session_token")
        .map(|(_, v)| v)
}

/// Token for an API call: bearer header, then cookie.
pub fn for_api(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).or_else(|| cookie(headers))
}

/// Token for an upgrade, in SPEC §6 order.
pub fn for_upgrade<'a>(headers: &'a HeaderMap, q: Option<&'a str>) -> Option<&'a str> {
    bearer(headers)
        .or_else(|| subprotocol(headers))
        .or_else(|| query(q))
        .or_else(|| cookie(headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn order_is_bearer_subprotocol_query_cookie() {
        let all = headers(&[
            ("authorization", "Bearer A"),
            ("sec-websocket-protocol", "chat, bearer, B"),
            ("cookie", "x=1; portcullis_session=D"),
        ]);
        assert_eq!(for_upgrade(&all, Some("session_token=C")), Some("A"));
        let no_auth = headers(&[
            ("sec-websocket-protocol", "bearer, B"),
            ("cookie", "portcullis_session=D"),
        ]);
        assert_eq!(for_upgrade(&no_auth, Some("session_token=C")), Some("B"));
        let cookie_only = headers(&[("cookie", "portcullis_session=D")]);
        assert_eq!(
            for_upgrade(&cookie_only, Some("a=b&session_token=C")),
            Some("C")
        );
        assert_eq!(for_upgrade(&cookie_only, None), Some("D"));
        assert_eq!(for_upgrade(&HeaderMap::new(), None), None);
    }

    #[test]
    fn api_ignores_query_and_subprotocol() {
        let h = headers(&[("sec-websocket-protocol", "bearer, B")]);
        assert_eq!(for_api(&h), None);
        let h = headers(&[("authorization", "bearer  T ")]);
        assert_eq!(for_api(&h), Some("T"));
    }
}
