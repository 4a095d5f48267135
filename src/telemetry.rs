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
    /// Refused requests (API and upgrades) by whose fault.
    pub refusals: Family<FaultLabel, Counter>,
    pub request_duration: Family<EndpointLabel, Histogram>,
    pub upgrades: Family<RouteResultLabel, Counter>,
    pub open_sockets: Gauge,
    pub closes: Family<CloseLabel, Counter>,
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
        Metrics {
            registry,
            logins,
            password_checks,
            sessions_created,
            sessions_revoked,
            store_errors,
            refusals,
            request_duration,
            upgrades,
            open_sockets,
            closes,
        }
    }

    /// OpenMetrics text, which Prometheus scrapes natively.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A request target safe to log: the `session_token` query value is replaced.
pub fn redact_target(path: &str, query: Option<&str>) -> String {
    match query {
        None => path.to_string(),
        Some(q) => {
            let redacted: Vec<String> = q
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("session_token", _)) => "session_token=REDACTED".to_string(),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", redacted.join("&"))
        }
    }
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
