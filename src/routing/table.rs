//! The validated route table: the route a request path selects, and the
//! upstream URL that route dials.

use std::sync::Arc;

use url::Url;

use super::PathPattern;
use super::balance::UpstreamPool;
use crate::config::{Mode, RouteConfig};

/// One `[[routes]]` entry, parsed once at start-up.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub pattern: PathPattern,
    pub pool: UpstreamPool,
    pub mode: Mode,
    pub max_message_bytes: u64,
    pub detach_grace_secs: u64,
    pub replay_frames: usize,
    pub replay_bytes: usize,
    /// How `wss://` upstreams are dialled (trust anchors, ALPN); `None`
    /// when every upstream is `ws://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Route {
    pub fn from_config(rc: &RouteConfig, pattern: PathPattern, upstreams: Vec<Url>) -> Self {
        Route {
            name: rc.name.clone(),
            pattern,
            pool: UpstreamPool::new(upstreams, rc.balance),
            mode: rc.mode,
            max_message_bytes: rc.max_message_bytes,
            detach_grace_secs: rc.detach_grace_secs,
            replay_frames: rc.replay_frames,
            replay_bytes: rc.replay_bytes,
            tls: None,
        }
    }

    /// The route with `tls` for its `wss://` upstreams.
    pub fn with_tls(self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Route { tls, ..self }
    }

    /// The URL to dial on `upstream`: its path plus the prefix remainder, and
    /// the client's query without the gateway's own parameters.
    pub fn upstream_url(&self, upstream: &Url, rest: &str, query: Option<&str>) -> Url {
        let mut url = upstream.clone();
        if !rest.is_empty() {
            let base = url.path().trim_end_matches('/').to_string();
            url.set_path(&format!("{base}{rest}"));
        }
        let strip: &[&str] = match self.mode {
            Mode::Shared => &["session_token", "resume_from", "portcullis"],
            Mode::Exclusive => &["session_token", "portcullis"],
        };
        let client_query = query.map(|q| strip_params(q, strip)).unwrap_or_default();
        let merged = match (
            url.query().filter(|q| !q.is_empty()),
            client_query.is_empty(),
        ) {
            (Some(own), false) => Some(format!("{own}&{client_query}")),
            (Some(own), true) => Some(own.to_string()),
            (None, false) => Some(client_query),
            (None, true) => None,
        };
        url.set_query(merged.as_deref());
        url
    }
}

/// Removes `names` from a raw query string without re-encoding what remains,
/// so the runtime sees the client's other parameters byte for byte.
pub fn strip_params(query: &str, names: &[&str]) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && !names.contains(&key)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Routes in config order; config validation guarantees no two overlap, so the
/// first match is the only match.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        Self::from_shared(routes.into_iter().map(Arc::new).collect())
    }

    /// A table of routes some of which an earlier table already holds (a
    /// reload keeps an unchanged route's health and connection counts).
    pub fn from_shared(routes: Vec<Arc<Route>>) -> Self {
        RouteTable { routes }
    }

    /// The route called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }

    pub fn lookup<'p>(&self, path: &'p str) -> Option<(&Arc<Route>, &'p str)> {
        self.routes
            .iter()
            .find_map(|r| r.pattern.matches(path).map(|rest| (r, rest)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn route(mode: Mode) -> Route {
        Route {
            name: "r".into(),
            pattern: PathPattern::parse("/a/*").unwrap(),
            pool: UpstreamPool::new(vec![], Balance::Session),
            mode,
            max_message_bytes: 1024,
            detach_grace_secs: 60,
            replay_frames: 16,
            replay_bytes: 1024,
            tls: None,
        }
    }

    #[test]
    fn strips_only_gateway_params_and_keeps_encoding() {
        assert_eq!(
            strip_params("a=%20x&session_token=t&b", &["session_token"]),
            "a=%20x&b"
        );
        assert_eq!(strip_params("session_token=t", &["session_token"]), "");
    }

    #[test]
    fn upstream_url_appends_rest_and_filtered_query() {
        let up = Url::parse("ws://h:1/agent").unwrap();
        let u = route(Mode::Shared).upstream_url(
            &up,
            "/x/y",
            Some("resume_from=3&k=v&session_token=s&portcullis=v1"),
        );
        assert_eq!(u.as_str(), "ws://h:1/agent/x/y?k=v");
        let u = route(Mode::Exclusive).upstream_url(&up, "", Some("resume_from=3"));
        assert_eq!(u.as_str(), "ws://h:1/agent?resume_from=3");
        let u = route(Mode::Exclusive).upstream_url(&up, "", None);
        assert_eq!(u.as_str(), "ws://h:1/agent");
    }
}
