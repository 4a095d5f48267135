//! Where the Redis store lives (SPEC §10): one Redis, a Cluster, or a
//! primary found through Sentinels; exactly one of them.
//!
//! Validated here once so the store gets a target it can use as is: every
//! URL parsed, the schemes agreeing (TLS is all or nothing: a Cluster or a
//! Sentinel set hands out addresses of the same kind as its seeds), and the
//! password, when it is not in the URL, read from the environment or a file.

use std::fmt;
use std::path::Path;

use url::Url;

use super::defaults::default_redis_url;
use super::{ConfigError, Secret, SessionsConfig};

/// The keys that name a topology, in the order errors mention them.
const TOPOLOGY_KEYS: [&str; 3] = [
    "sessions.redis_url",
    "sessions.redis_cluster_urls",
    "sessions.redis_sentinel_urls",
];

/// How the store reaches Redis.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis (`redis_url`).
    Standalone(Url),
    /// Redis Cluster seed nodes (`redis_cluster_urls`).
    Cluster(Vec<Url>),
    /// Sentinels (`redis_sentinel_urls`) and the name of the primary they
    /// watch (`redis_sentinel_master`).
    Sentinel { sentinels: Vec<Url>, master: String },
}

/// A validated store target: the topology, and the data nodes' password
/// when it comes from `redis_password_env` / `redis_password_file` rather
/// than the URLs.
#[derive(Clone)]
pub struct RedisTarget {
    pub topology: Topology,
    pub password: Option<Secret>,
}

/// A URL as it may be shown: with its password masked.
pub fn masked(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("MASKED"));
    }
    shown.to_string()
}

fn masked_all(urls: &[Url]) -> Vec<String> {
    urls.iter().map(masked).collect()
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topology::Standalone(url) => f.debug_tuple("Standalone").field(&masked(url)).finish(),
            Topology::Cluster(seeds) => f.debug_tuple("Cluster").field(&masked_all(seeds)).finish(),
            Topology::Sentinel { sentinels, master } => f
                .debug_struct("Sentinel")
                .field("sentinels", &masked_all(sentinels))
                .field("master", master)
                .finish(),
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("topology", &self.topology)
            .field("password", &self.password)
            .finish()
    }
}

impl RedisTarget {
    /// Whether the data nodes are reached over TLS.
    pub fn tls(&self) -> bool {
        let first = match &self.topology {
            Topology::Standalone(url) => Some(url),
            Topology::Cluster(urls)
            | Topology::Sentinel {
                sentinels: urls, ..
            } => urls.first(),
        };
        first.is_some_and(|u| u.scheme() == "rediss")
    }
}

/// Checks the topology keys; `Ok(None)` for a memory store that names none.
pub(super) fn validate(
    ss: &SessionsConfig,
    redis: bool,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: super::Secrets,
    unchecked: &mut Vec<ConfigError>,
) -> Result<Option<RedisTarget>, ConfigError> {
    let err = |key: &str, msg: String| ConfigError::new(file, key, msg);
    let named: Vec<&str> = [
        ss.redis_url.is_some(),
        ss.redis_cluster_urls.is_some(),
        ss.redis_sentinel_urls.is_some(),
    ]
    .iter()
    .zip(TOPOLOGY_KEYS)
    .filter_map(|(set, key)| set.then_some(key))
    .collect();
    if let [first, second, ..] = named[..] {
        return Err(err(
            second,
            format!(
                "set together with {first}: name exactly one of {}",
                TOPOLOGY_KEYS.join(", ")
            ),
        ));
    }
    match (&ss.redis_sentinel_urls, &ss.redis_sentinel_master) {
        (Some(_), None) => {
            return Err(err(
                "sessions.redis_sentinel_master",
                "required with sessions.redis_sentinel_urls: the name the Sentinels know the primary by"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(err(
                "sessions.redis_sentinel_master",
                "only meaningful with sessions.redis_sentinel_urls".into(),
            ));
        }
        (Some(_), Some(master)) if master.is_empty() => {
            return Err(err(
                "sessions.redis_sentinel_master",
                "must not be empty".into(),
            ));
        }
        _ => {}
    }
    if ss.redis_password_env.is_some() && ss.redis_password_file.is_some() {
        return Err(err(
            "sessions.redis_password_file",
            "set either redis_password_env or redis_password_file, not both".into(),
        ));
    }
    if !redis {
        return Ok(None);
    }
    let topology = if let Some(urls) = &ss.redis_cluster_urls {
        Topology::Cluster(parse_list(file, "sessions.redis_cluster_urls", urls)?)
    } else if let Some(urls) = &ss.redis_sentinel_urls {
        Topology::Sentinel {
            sentinels: parse_list(file, "sessions.redis_sentinel_urls", urls)?,
            master: ss.redis_sentinel_master.clone().unwrap_or_default(),
        }
    } else {
        let url = ss.redis_url.clone().unwrap_or_else(default_redis_url);
        let url =
            Url::parse(&url).map_err(|e| err("sessions.redis_url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
            return Err(err(
                "sessions.redis_url",
                format!("scheme {:?} is not redis:// or rediss://", url.scheme()),
            ));
        }
        Topology::Standalone(url)
    };
    // `check --skip-secrets` lists an unreadable password instead of failing.
    let password = match read_password(ss, file, env) {
        Ok(p) => p,
        Err(e) if secrets == super::Secrets::SkipUnreadable => {
            unchecked.push(e);
            None
        }
        Err(e) => return Err(e),
    };
    if password.is_some() {
        let in_url = match &topology {
            Topology::Standalone(url) => url.password().is_some(),
            Topology::Cluster(urls) => urls.iter().any(|u| u.password().is_some()),
            // A Sentinel's own password may differ from the primary's.
            Topology::Sentinel { .. } => false,
        };
        if in_url {
            return Err(err(
                "sessions.redis_password_env",
                "the URL carries a password already: keep it in one place".into(),
            ));
        }
    }
    Ok(Some(RedisTarget { topology, password }))
}

/// A list of node URLs: non-empty, all `redis://` or all `rediss://`, with
/// a host (a Cluster or Sentinel node is reached over TCP).
fn parse_list(file: &str, key: &str, urls: &[String]) -> Result<Vec<Url>, ConfigError> {
    if urls.is_empty() {
        return Err(ConfigError::new(file, key, "must list at least one node"));
    }
    let parsed = urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let at = format!("{key}[{i}]");
            let url = Url::parse(u)
                .map_err(|e| ConfigError::new(file, &at, format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
                return Err(ConfigError::new(
                    file,
                    &at,
                    format!(
                        "{:?} is not a redis://host:port or rediss://host:port URL",
                        masked(&url)
                    ),
                ));
            }
            Ok(url)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = parsed.iter().position(|u| u.scheme() != parsed[0].scheme()) {
        return Err(ConfigError::new(
            file,
            format!("{key}[{i}]"),
            "mixes redis:// and rediss://: TLS is all or nothing",
        ));
    }
    Ok(parsed)
}

fn read_password(
    ss: &SessionsConfig,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = &ss.redis_password_file {
        let base = Path::new(file).parent().unwrap_or(Path::new("."));
        let key = "sessions.redis_password_file";
        let bytes = super::validate::read_beside(file, base, key, path)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::new(file, key, "is not UTF-8 text"))?;
        // A file written by `echo` ends in a newline that is not part of it.
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(ConfigError::new(
                file,
                "sessions.redis_password_file",
                "is empty",
            ));
        }
        return Ok(Some(Secret::new(password.as_bytes())));
    }
    let Some(name) = &ss.redis_password_env else {
        return Ok(None);
    };
    match env(name) {
        Some(v) if !v.is_empty() => Ok(Some(Secret::new(v.into_bytes()))),
        _ => Err(ConfigError::new(
            file,
            "sessions.redis_password_env",
            format!("environment variable {name} is not set"),
        )),
    }
}
