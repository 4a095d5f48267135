//! Property tests for the request parsers of the gate (issue 16): route
//! matching with path normalisation, and where a token comes from; 100,000
//! generated inputs each. `forwarded_headers` has its own property in
//! `src/gate/upgrade.rs` (it is private to the gate).

use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis::config::RouteConfig;
use portcullis::routing::{PathPattern, Route, RouteTable, unsafe_path};
use portcullis::token::credentials;
use proptest::prelude::*;
use url::Url;

/// 100,000 cases per property, locally and under CI: with proptest built
/// optimised (Cargo.toml) the whole file runs in a few seconds.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 100_000,
        // Shrinking a failure is worth it; a passing run never shrinks.
        max_shrink_iters: 10_000,
        ..ProptestConfig::default()
    }
}

// ---- routes and paths ----------------------------------------------------

const UPSTREAM_BASE: &str = "/pfx";

fn route(name: &str, path: &str, upstream: &str) -> Route {
    let rc: RouteConfig = toml::from_str(&format!(
        "name = \"{name}\"\npath = \"{path}\"\nupstreams = [\"{upstream}\"]\n"
    ))
    .unwrap();
    let pattern = PathPattern::parse(&rc.path).unwrap();
    Route::from_config(&rc, pattern, vec![Url::parse(upstream).unwrap()])
}

fn table() -> &'static RouteTable {
    static TABLE: std::sync::LazyLock<RouteTable> = std::sync::LazyLock::new(build_table);
    &TABLE
}

fn build_table() -> RouteTable {
    RouteTable::new(vec![
        route("echo", "/ws/echo", "ws://rt/echo"),
        route("prefix", "/ws/prefix/*", &format!("ws://rt{UPSTREAM_BASE}")),
    ])
}

/// Pieces a hostile path is made of: separators, dots and every
/// percent-encoding of them (single, double, either case), `;` parameters,
/// NUL, lone `%`, and ordinary names.
const PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    ".",
    "..",
    "...",
    "\\",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%25",
    "%252e",
    "%252E",
    "%252f",
    "%255c",
    "%25252e",
    "%00",
    "%09",
    ";",
    ";x=1",
    "a",
    "b",
    "admin",
    "%41",
    "%",
    "%zz",
    "~",
    "-",
    "_",
    "%e2%82%ac",
    "x.y",
    ":",
    "@",
    "!",
    "$",
    "&",
    "'",
    "(",
    "*",
    "+",
    ",",
    "=",
];

/// Paths as a client could send them: a route's base (or not) and then a
/// run of [`PIECES`], or any printable ASCII at all.
fn paths() -> impl Strategy<Value = String> {
    let suffix =
        prop::collection::vec(prop::sample::select(PIECES), 0..14).prop_map(|p| p.concat());
    let base = prop::sample::select(
        &[
            "/ws/prefix",
            "/ws/prefix/",
            "/ws/prefix/",
            "/ws/prefixx",
            "/ws/echo",
        ][..],
    );
    let ascii = |from: u8| {
        prop::collection::vec(from..=b'~', 0..40).prop_map(|b| String::from_utf8(b).expect("ASCII"))
    };
    prop_oneof![
        4 => (base, suffix).prop_map(|(b, s)| format!("{b}{s}")),
        1 => ascii(b'!').prop_map(|p| format!("/ws/prefix/{p}")),
        1 => ascii(b' '),
    ]
}

/// How a runtime that normalises hard would read a path: percent-decode
/// until nothing changes, `\` as `/`, a NUL ends it, `;params` dropped from
/// each segment, then `.` and `..` resolved (RFC 3986 §5.2.4). Written
/// apart from the gateway's check so the property does not test a function
/// against itself.
fn runtime_view(path: &str) -> String {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..16 {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
            match (bytes[i], hex(i + 1), hex(i + 2)) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        if out == bytes {
            break;
        }
        bytes = out;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let text = text.split('\0').next().unwrap_or_default();
    let mut stack: Vec<&str> = Vec::new();
    for seg in text.split('/').skip(1) {
        match seg.split(';').next().unwrap_or_default() {
            "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    format!("/{}", stack.join("/"))
}

fn under(path: &str, base: &str) -> bool {
    path == base || path.starts_with(&format!("{base}/"))
}

proptest! {
    #![proptest_config(config())]

    /// Every path the HTTP layer can deliver is either refused (`400`) or
    /// forwarded to a URL whose path stays under the route's upstream base,
    /// as the URL library wrote it and as a normalising runtime reads it.
    #[test]
    fn a_path_is_refused_or_stays_under_its_routes_upstream(raw in paths()) {
        // What hyper would hand to dispatch; a target it cannot parse is
        // answered 400 by hyper itself and never routed.
        let Ok(uri) = raw.parse::<http::Uri>() else { return Ok(()) };
        let path = uri.path();
        let Some((route, rest)) = table().lookup(path) else { return Ok(()) };
        // Matching: the rest is what follows the base, at a segment boundary.
        let base = route.pattern.path();
        prop_assert_eq!(format!("{base}{rest}"), path);
        prop_assert!(rest.is_empty() || rest.starts_with('/'));
        if unsafe_path(path).is_some() {
            return Ok(());
        }
        let upstream = route.pool.get(0).url.clone();
        let url = route.upstream_url(&upstream, rest, uri.query());
        let expected_base = upstream.path().to_string();
        prop_assert!(under(url.path(), &expected_base), "{} -> {}", path, url);
        prop_assert!(
            under(&runtime_view(url.path()), &expected_base),
            "{} -> {} read by a runtime as {}", path, url, runtime_view(url.path())
        );
        // The URL library re-encodes at most; it never restructures.
        prop_assert_eq!(
            runtime_view(url.path()),
            runtime_view(&format!("{expected_base}{rest}"))
        );
    }

    /// The refusal itself never panics, on any string (not only URI-valid).
    #[test]
    fn the_path_check_is_total(raw in prop::collection::vec(any::<u8>(), 0..48)) {
        let _ = unsafe_path(&String::from_utf8_lossy(&raw));
    }
}

/// The reported escapes, and their decoded-once and double-encoded forms,
/// are refused; the property above would also find them.
#[test]
fn the_reported_escapes_are_refused() {
    for p in [
        "/ws/prefix/..\\admin",
        "/ws/prefix/x\\..\\..\\secret",
        "/ws/prefix/%2e%2e/x",
        "/ws/prefix/%252e%252e/x",
    ] {
        assert!(unsafe_path(p).is_some(), "{p}");
        assert!(!under(&runtime_view(&format!("/pfx{}", &p[10..])), "/pfx"));
    }
}

// ---- token transports ------------------------------------------------------

/// Token-shaped strings: the JWT alphabet (and its `.`, `-`, `_`), never
/// empty. Built from stems rather than a regex: a regex strategy costs more
/// than the parser under test.
fn token() -> impl Strategy<Value = String> {
    let stem = prop::sample::select(&["eyJ", "a.b.c", "x-y", "_t", "Z9", "q.", "-"][..]);
    (stem, any::<u32>()).prop_map(|(s, n)| format!("{s}{n:x}"))
}

/// `[a-z]{1,6}=<word>`-shaped pairs that are no transport's name.
fn pair(sep: &'static str) -> impl Strategy<Value = String> {
    let key = prop::sample::select(&["a", "room", "k", "theme", "x", "lang"][..]);
    let value = prop::sample::select(&["", "1", "%20x", "v=w", "dark", "en"][..]);
    (key, value).prop_map(move |(k, v)| format!("{k}{sep}{v}"))
}

/// One generated request: maybe a token in each transport, and noise that
/// looks like a transport but is not one.
#[derive(Debug, Clone)]
struct Transports {
    bearer: Option<String>,
    subprotocol: Option<String>,
    query: Option<String>,
    cookie: Option<String>,
    /// Noise: an `Authorization` of another scheme (used when no bearer).
    other_auth: Option<String>,
    protocols_before: Vec<&'static str>,
    query_noise: Vec<String>,
    cookie_noise: Vec<String>,
    query_first: bool,
}

fn transports() -> impl Strategy<Value = Transports> {
    let noise_proto = prop::sample::select(&["chat.v1", "graphql-ws", "bearerx", "v2.json"][..]);
    let query_noise = prop_oneof![
        pair("="),
        token().prop_map(|t| format!("session_tokenx={t}")),
        token().prop_map(|t| format!("xsession_token={t}")),
        token().prop_map(|t| format!("a=session_token={t}")),
        token().prop_map(|t| format!("SESSION_TOKEN={t}")),
        Just(String::new()),
    ];
    let cookie_noise = prop_oneof![
        pair("="),
        token().prop_map(|t| format!("portcullis_session2={t}")),
        token().prop_map(|t| format!("xportcullis_session={t}")),
        token().prop_map(|t| format!("theme=portcullis_session={t}")),
    ];
    (
        (
            prop::option::of(token()),
            prop::option::of(token()),
            prop::option::of(token()),
            prop::option::of(token()),
            prop::option::of(prop_oneof![
                token().prop_map(|t| format!("Basic {t}")),
                token().prop_map(|t| format!("Bearer{t}")),
                Just("Digest".to_string()),
            ]),
        ),
        prop::collection::vec(noise_proto, 0..3),
        prop::collection::vec(query_noise, 0..4),
        prop::collection::vec(cookie_noise, 0..4),
        any::<bool>(),
    )
        .prop_map(
            |((bearer, subprotocol, query, cookie, other_auth), protos, qn, cn, query_first)| {
                Transports {
                    bearer,
                    subprotocol,
                    query,
                    cookie,
                    other_auth,
                    protocols_before: protos,
                    query_noise: qn,
                    cookie_noise: cn,
                    query_first,
                }
            },
        )
}

impl Transports {
    fn request(&self) -> (HeaderMap, Option<String>) {
        let mut h = HeaderMap::new();
        let mut add = |name: &'static str, value: String| {
            h.append(name, HeaderValue::from_str(&value).unwrap());
        };
        match (&self.bearer, &self.other_auth) {
            (Some(t), _) => add("authorization", format!("Bearer {t}")),
            (None, Some(other)) => add("authorization", other.clone()),
            (None, None) => {}
        }
        let mut protocols: Vec<String> = self
            .protocols_before
            .iter()
            .map(|p| p.to_string())
            .collect();
        if let Some(t) = &self.subprotocol {
            protocols.push(format!("bearer, {t}"));
        }
        if !protocols.is_empty() {
            add("sec-websocket-protocol", protocols.join(", "));
        }
        let mut cookies = self.cookie_noise.clone();
        if let Some(t) = &self.cookie {
            cookies.push(format!("portcullis_session={t}"));
        }
        if !cookies.is_empty() {
            add("cookie", cookies.join("; "));
        }
        let mut pairs = self.query_noise.clone();
        if let Some(t) = &self.query {
            let own = format!("session_token={t}");
            if self.query_first {
                pairs.insert(0, own);
            } else {
                pairs.push(own);
            }
        }
        let query = (!pairs.is_empty()).then(|| pairs.join("&"));
        (h, query)
    }
}

/// Headers from a pool of names (the transports' own among them, in any
/// count) with arbitrary bytes as values, and an arbitrary query.
fn garbage() -> impl Strategy<Value = (Vec<(&'static str, Vec<u8>)>, Option<String>)> {
    let name = prop::sample::select(
        &[
            "authorization",
            "cookie",
            "sec-websocket-protocol",
            "x-other",
            "host",
        ][..],
    );
    // Arbitrary bytes, and the words the parsers split on among them.
    let word = prop::sample::select(
        &[
            "Bearer ",
            "bearer",
            "BEARER  ",
            " ",
            ",",
            ";",
            "=",
            "&",
            "bearer, ",
            "portcullis_session=",
            "session_token=",
            "\t",
            "\u{e9}",
        ][..],
    );
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..8),
        word.clone().prop_map(|w| w.as_bytes().to_vec()),
    ];
    let value = prop::collection::vec(piece, 0..6).prop_map(|p| p.concat());
    let query = prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..6)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            word.prop_map(str::to_string),
        ],
        0..6,
    )
    .prop_map(|p| p.concat());
    (
        prop::collection::vec((name, value), 0..6),
        prop::option::of(query),
    )
}

proptest! {
    #![proptest_config(config())]

    /// SPEC §6 order: `Authorization: Bearer`, the `bearer, <token>`
    /// subprotocol pair, `?session_token=`, the `portcullis_session` cookie;
    /// the first present wins, and look-alikes never count. The API takes
    /// the bearer header, then the cookie.
    #[test]
    fn the_first_transport_in_spec_order_wins(t in transports()) {
        let (headers, query) = t.request();
        let expected = t.bearer.as_deref()
            .or(t.subprotocol.as_deref())
            .or(t.query.as_deref())
            .or(t.cookie.as_deref());
        prop_assert_eq!(credentials::for_upgrade(&headers, query.as_deref()), expected);
        let expected_api = t.bearer.as_deref().or(t.cookie.as_deref());
        prop_assert_eq!(credentials::for_api(&headers), expected_api);
    }

    /// On any headers and query: no panic, and a token found is text that
    /// the request carried (nothing invented, nothing from another header).
    #[test]
    fn extraction_never_panics_and_never_invents((pairs, query) in garbage()) {
        let mut h = HeaderMap::new();
        for (name, value) in &pairs {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.append(HeaderName::from_static(name), v);
            }
        }
        let carried = |t: &str, names: &[&str]| {
            names.iter().any(|n| {
                h.get_all(*n).iter().any(|v| v.to_str().is_ok_and(|v| v.contains(t)))
            })
        };
        if let Some(t) = credentials::for_upgrade(&h, query.as_deref()) {
            let in_query = query.as_deref().is_some_and(|q| q.contains(t));
            prop_assert!(
                in_query || carried(t, &["authorization", "cookie", "sec-websocket-protocol"]),
                "{:?} from nowhere", t
            );
        }
        if let Some(t) = credentials::for_api(&h) {
            prop_assert!(carried(t, &["authorization", "cookie"]), "{:?} from nowhere", t);
        }
    }
}
