//! Prometheus metrics and log redaction.
//!
//! Label values are always from a fixed set (result codes, route names from
//! config, endpoint names), never from client input, so cardinality stays
//! bounded. Nothing secret (tokens, passwords, cookies) is ever a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResultLabel {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabel {
    pub fault: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// How long session-store calls take, by operation. One per process,
/// shared by every [`Metrics`] registry (there is one per app; tests make
/// several), so the store can record into it without holding a handle.
pub fn store_latency() -> &'static Family<OpLabel, Histogram> {
    static LATENCY: std::sync::OnceLock<Family<OpLabel, Histogram>> = std::sync::OnceLock::new();
    LATENCY.get_or_init(|| {
        Family::new_with_constructor(|| {
            // 50 µs .. ~1.6 s: an in-memory call to a Redis timeout.
            Histogram::new(exponential_buckets(0.00005, 2.0, 16))
        })
    })
}

/// The loaded config's SHA-256: one series at a time, replaced on reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    pub hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    pub code: u16,
}

pub struct Metrics {
    registry: Registry,
    pub logins: Family<ResultLabel, Counter>,
    /// Passwords actually checked (static hash or upstream verifier); a
    /// rate-limited or malformed login costs none.
    pub password_checks: Counter,
    pub sessions_created: Counter,
    pub sessions_revoked: Family<ReasonLabel, Counter>,
    pub store_errors: Counter,
    /// Full re-checks of the local sessions after the revocation
    /// subscription came back.
    pub resubscribe_rechecks: Counter,
    /// Refused requests (API and upgrades) by whose fault.
    pub refusals: Family<FaultLabel, Counter>,
    pub request_duration: Family<EndpointLabel, Histogram>,
    pub upgrades: Family<RouteResultLabel, Counter>,
    pub open_sockets: Gauge,
    pub closes: Family<CloseLabel, Counter>,
    /// SIGHUP reloads by result: `ok`, `invalid` (refused, nothing changed).
    pub config_reloads: Family<ResultLabel, Counter>,
    /// `portcullis_config_info{hash="<sha256>"} 1` for the config in force.
    config_info: Family<HashLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let logins = Family::<ResultLabel, Counter>::default();
        registry.register("logins", "Login attempts by result", logins.clone());
        let password_checks = Counter::default();
        registry.register(
            "password_checks",
            "Passwords checked by the login backend",
            password_checks.clone(),
        );
        let sessions_created = Counter::default();
        registry.register(
            "sessions_created",
            "Sessions created",
            sessions_created.clone(),
        );
        let sessions_revoked = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sessions_revoked",
            "Sessions ended by logout, delete or expiry",
            sessions_revoked.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Session store calls that failed",
            store_errors.clone(),
        );
        let resubscribe_rechecks = Counter::default();
        registry.register(
            "resubscribe_rechecks",
            "Re-checks of every local session after the revocation subscription came back",
            resubscribe_rechecks.clone(),
        );
        let refusals = Family::<FaultLabel, Counter>::default();
        registry.register(
            "refusals",
            "Refused requests and upgrades by whose fault (client, store, upstream, capacity)",
            refusals.clone(),
        );
        let request_duration = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~3.3 s
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by endpoint",
            request_duration.clone(),
        );
        let upgrades = Family::<RouteResultLabel, Counter>::default();
        registry.register(
            "upgrades",
            "WebSocket upgrade attempts by route and result",
            upgrades.clone(),
        );
        let open_sockets = Gauge::default();
        registry.register(
            "open_sockets",
            "Client WebSockets open on this instance",
            open_sockets.clone(),
        );
        let closes = Family::<CloseLabel, Counter>::default();
        registry.register(
            "socket_closes",
            "Client WebSockets closed, by close code",
            closes.clone(),
        );
        registry.register(
            "store_request_duration_seconds",
            "Session store call latency by operation (create, get, touch, delete, attach, heartbeat, ping)",
            store_latency().clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP) by result: ok, invalid",
            config_reloads.clone(),
        );
        let config_info = Family::<HashLabel, Gauge>::default();
        registry.register(
            "config_info",
            "The loaded config file's SHA-256 (label hash), value 1",
            config_info.clone(),
        );
        Metrics {
            config_reloads,
            config_info,
            registry,
            logins,
            password_checks,
            sessions_created,
            sessions_revoked,
            store_errors,
            resubscribe_rechecks,
            refusals,
            request_duration,
            upgrades,
            open_sockets,
            closes,
        }
    }

    /// Shows `hash` as the config in force, and no other.
    pub fn set_config_hash(&self, hash: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&HashLabel {
                hash: hash.to_string(),
            })
            .set(1);
    }

    /// The registry as OpenMetrics text (what `prometheus_client` writes).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The registry in `format`.
    pub fn render_as(&self, format: Exposition) -> String {
        match format {
            Exposition::OpenMetrics => self.render(),
            Exposition::Prometheus => openmetrics_to_prometheus(&self.render()),
        }
    }
}

/// The two text formats `/metrics` speaks (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4: the default, which every scraper reads.
    Prometheus,
    /// OpenMetrics 1.0.0, for a scraper whose `Accept` asks for it.
    OpenMetrics,
}

impl Exposition {
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Picks the format an `Accept` header asks for: OpenMetrics when it
    /// names `application/openmetrics-text` with a weight above zero and
    /// at least that of any `text/plain` it names (Prometheus itself sends
    /// OpenMetrics at q=1 and text/plain at q=0.5); otherwise 0.0.4, also
    /// for no `Accept`, `*/*` or anything unreadable.
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        let (mut om, mut plain) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" => plain = plain.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= plain {
            Exposition::OpenMetrics
        } else {
            Exposition::Prometheus
        }
    }
}

/// Rewrites `prometheus_client`'s OpenMetrics text as Prometheus 0.0.4,
/// which that crate does not write. The differences in what it emits: a
/// counter family is named without `_total` in OpenMetrics' `# HELP` and
/// `# TYPE` lines but with it in 0.0.4 (the samples already carry it);
/// `# UNIT` and `# EOF` do not exist in 0.0.4; OpenMetrics' `info` and
/// `unknown` types are 0.0.4's `gauge` (named `_info`) and `untyped`.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // A family's `# HELP` comes before its `# TYPE`: held until the type
    // says what the family is called in 0.0.4.
    let mut help: Option<(&str, &str)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, doc));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" | "stateset" | "gaugehistogram" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((help_name, doc)) = help.take().filter(|(n, _)| *n == name) {
                out.push_str(&format!("# HELP {help_name}{suffix} {doc}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A request target safe to log. Redacted, value and all:
/// - every query parameter whose name, percent-decoded (`+` as space),
///   compared case-insensitively with `-`, `.` and spaces read as `_` and a
///   trailing `[...]` dropped, is `session_token` (`SESSION_TOKEN`,
///   `session%5Ftoken`, `Session-Token`, `session_token[]`: the gate reads
///   only the exact name, but a runtime behind it may read any of them);
/// - every query parameter (name or value) and path segment that contains
///   something shaped like a JWT (see [`looks_like_jwt`]), whatever it is
///   called, so a token under another name is not logged either.
pub fn redact_target(path: &str, query: Option<&str>) -> String {
    let path = if path.split('/').any(contains_jwt) {
        path.split('/')
            .map(|seg| if contains_jwt(seg) { REDACTED } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    } else {
        path.to_string()
    };
    match query {
        None => path,
        Some(q) => {
            let redacted: Vec<String> = q.split('&').map(redact_pair).collect();
            format!("{path}?{}", redacted.join("&"))
        }
    }
}

const REDACTED: &str = "REDACTED";

fn redact_pair(pair: &str) -> String {
    let (raw_name, decoded) = match pair.split_once('=') {
        Some((name, _)) => (Some(name), decode(pair)),
        None => (None, decode(pair)),
    };
    let (name, value) = decoded;
    let secret = is_token_name(&name) || contains_jwt(&name) || contains_jwt(&value);
    match (secret, raw_name) {
        (false, _) => pair.to_string(),
        (true, Some(raw)) if !contains_jwt(&name) => format!("{raw}={REDACTED}"),
        (true, _) => REDACTED.to_string(),
    }
}

/// One `name=value` pair, percent-decoded as a form would be.
fn decode(pair: &str) -> (String, String) {
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .unwrap_or_default()
}

fn is_token_name(name: &str) -> bool {
    let name = match name.find('[') {
        Some(i) if name.ends_with(']') => &name[..i],
        _ => name,
    };
    let mut normal = name.trim().chars().map(|c| match c {
        '-' | '.' | ' ' => '_',
        c => c.to_ascii_lowercase(),
    });
    "session_token".chars().all(|c| normal.next() == Some(c)) && normal.next().is_none()
}

/// Whether any run of base64url characters and dots in `s` looks like a JWT.
fn contains_jwt(s: &str) -> bool {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .any(looks_like_jwt)
}

/// Three base64url parts joined by dots whose first decodes to a JSON
/// object (the JOSE header) and whose second is non-empty; the signature may
/// be empty (`alg: none`). Version strings and host names (`1.2.3`,
/// `a.example.com`) are left alone.
pub fn looks_like_jwt(s: &str) -> bool {
    use base64::Engine;
    let mut parts = s.split('.');
    let (Some(header), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if payload.is_empty() || !b64url(payload) || !b64url(sig) {
        return false;
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .is_ok_and(|h| h.trim_ascii_start().first() == Some(&b'{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_only_the_token() {
        assert_eq!(
            redact_target("/ws", Some("a=1&session_token=eyJ.x.y&b=2")),
            "/ws?a=1&session_token=REDACTED&b=2"
        );
        assert_eq!(redact_target("/ws", None), "/ws");
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl";

    #[test]
    fn redacts_every_spelling_of_the_token_name() {
        for name in [
            "SESSION_TOKEN",
            "Session_Token",
            "session%5Ftoken",
            "session%5ftoken",
            "%73ession_token",
            "session-token",
            "session.token",
            "session+token",
            "session%20token",
            "session_token[]",
            "session_token%5B0%5D",
        ] {
            assert_eq!(
                redact_target("/ws", Some(&format!("a=1&{name}=secret-value&b=2"))),
                format!("/ws?a=1&{name}=REDACTED&b=2"),
                "{name}"
            );
        }
        assert_eq!(
            redact_target("/ws", Some("session_tokens=x&my_session_token=y")),
            "/ws?session_tokens=x&my_session_token=y"
        );
    }

    #[test]
    fn redacts_anything_shaped_like_a_jwt() {
        let encoded = JWT.replace('.', "%2E");
        for (query, expect) in [
            (format!("t={JWT}"), "t=REDACTED".to_string()),
            (format!("t={encoded}"), "t=REDACTED".to_string()),
            (format!("auth=Bearer%20{JWT}"), "auth=REDACTED".to_string()),
            (
                format!("next=%2Fx%3Fsession_token%3D{JWT}"),
                "next=REDACTED".to_string(),
            ),
            (JWT.to_string(), "REDACTED".to_string()),
            (format!("{JWT}=1"), "REDACTED".to_string()),
            (
                "t=eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.".to_string(),
                "t=REDACTED".to_string(),
            ),
        ] {
            assert_eq!(
                redact_target("/ws", Some(&query)),
                format!("/ws?{expect}"),
                "{query}"
            );
        }
        assert_eq!(
            redact_target(&format!("/ws/prefix/{JWT}/x"), None),
            "/ws/prefix/REDACTED/x"
        );
        for harmless in [
            "v=1.2.3",
            "host=averyveryverylongname.example.com",
            "f=report.final.pdf",
            "x",
        ] {
            assert_eq!(
                redact_target("/ws/a.b.c", Some(harmless)),
                format!("/ws/a.b.c?{harmless}")
            );
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        m.logins.get_or_create(&ResultLabel { result: "ok" }).inc();
        let text = m.render_as(Exposition::Prometheus);
        assert!(
            text.contains("# TYPE portcullis_logins_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP portcullis_logins_total Login attempts by result"),
            "{text}"
        );
        assert!(text.contains("portcullis_logins_total{result=\"ok\"} 1\n"));
        assert!(text.contains("# TYPE portcullis_open_sockets gauge\n"));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(m.render().ends_with("# EOF\n"));
    }

    #[test]
    fn negotiation_prefers_0_0_4_unless_openmetrics_is_asked_for() {
        use Exposition::*;
        for (accept, want) in [
            (None, Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain"), Prometheus),
            (Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"), Prometheus),
            (Some("application/openmetrics-text;q=0"), Prometheus),
            (
                Some("application/openmetrics-text; version=1.0.0"),
                OpenMetrics,
            ),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;q=0.9,application/openmetrics-text;q=0.5"),
                Prometheus,
            ),
        ] {
            assert_eq!(Exposition::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new();
        m.logins.get_or_create(&ResultLabel { result: "ok" }).inc();
        let text = m.render();
        assert!(
            text.contains("portcullis_logins_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_http_request_duration_seconds"),
            "{text}"
        );
    }
}
