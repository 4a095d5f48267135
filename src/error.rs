//! The one error type every refusal goes through, and its one mapping to an
//! HTTP response (`{"error","message"}` plus `Retry-After` where retrying helps).
//!
//! Each error knows *whose fault* it is, so logs and metrics can tell a
//! misbehaving client from a sick store or runtime, and clients can tell
//! "log in again" (401/403) from "retry later" (429/502/503).

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::session::{CreateError, StoreError};
use crate::token::TokenError;

pub type Body = Full<Bytes>;

/// Seconds a client should wait before retrying after a store outage.
pub const STORE_RETRY_AFTER_SECS: u64 = 2;

/// Who caused a refusal; the metric label and log level follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The request itself is wrong or not allowed.
    Client,
    /// The session store is unreachable.
    Store,
    /// A runtime or the auth verifier did not answer properly.
    Upstream,
    /// The gateway is at a configured limit.
    Capacity,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    pub retry_after: Option<u64>,
    pub allow: Option<&'static str>,
    pub fault: Fault,
    /// Answer with `Connection: close`: the rest of the request (a body we
    /// will not read) must not be parsed as the next request.
    pub close: bool,
    /// What went wrong inside, for the one log line of this refusal; never
    /// sent to the client.
    pub cause: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
            fault: Fault::Client,
            close: false,
            cause: None,
        }
    }

    fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "No such endpoint")
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("Use {allow} on this path"),
        );
        e.allow = Some(allow);
        e
    }

    /// The body is over `limit`: refused (from `Content-Length`, before a
    /// byte of it is read) and the connection closed.
    pub fn payload_too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("Request body is larger than {limit} bytes"),
        );
        e.close = true;
        e
    }

    /// The body did not arrive in full within `server.body_timeout_ms`; the
    /// connection is closed.
    pub fn request_timeout() -> Self {
        let mut e = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "The request body did not arrive in time",
        );
        e.close = true;
        e
    }

    pub fn invalid_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "Wrong username or password",
        )
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many failed login attempts; retry later",
        )
        .retry_after(retry_after)
    }

    /// A token problem: the API answers 401, the WebSocket gate 403.
    pub fn token(e: TokenError, status: StatusCode) -> Self {
        let message = match e {
            TokenError::Missing => "No session token; log in first",
            TokenError::Invalid => "The session token is not valid; log in again",
            TokenError::Expired => "The session token has expired; refresh or log in again",
        };
        Self::new(status, e.code(), message)
    }

    /// The token's own session has ended: log in again.
    pub fn session_ended(status: StatusCode) -> Self {
        Self::new(
            status,
            "session_not_found",
            "The session has ended; log in again",
        )
    }

    /// A session the caller asked about does not exist (or is not theirs).
    pub fn session_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "No such session",
        )
    }

    /// The store is down: `503` + `Retry-After`. Built without logging:
    /// whoever answers the request logs it once, at the level its fault
    /// calls for (a probe polling `/readyz` must not flood the log).
    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_store_unavailable",
            "The session store is unavailable; retry later",
        )
        .retry_after(STORE_RETRY_AFTER_SECS)
        .fault(Fault::Store)
    }

    pub fn auth_upstream_unavailable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "auth_upstream_unavailable",
            "The login service is unavailable; retry later",
        )
        .retry_after(STORE_RETRY_AFTER_SECS)
        .fault(Fault::Upstream)
    }

    /// The runtime's `on_create` hook refused the session or did not
    /// answer in time (SPEC §11); nothing of the session is left.
    pub fn runtime_refused_session() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "runtime_refused_session",
            "The runtime did not accept the session; retry later",
        )
        .fault(Fault::Upstream)
    }

    pub fn upgrade_required() -> Self {
        Self::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "This path accepts WebSocket upgrades only",
        )
    }

    pub fn origin_not_allowed() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "This Origin may not open sockets here",
        )
    }

    pub fn too_many_connections(retry_after: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "Connection limit reached; retry later",
        )
        .retry_after(retry_after)
        .fault(Fault::Capacity)
    }

    /// The user already holds `auth.max_sessions_per_user` live sessions:
    /// no `Retry-After`, since waiting frees nothing; ending one does.
    pub fn too_many_sessions(max: u32) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            format!("This user already has {max} live sessions; log out of one first"),
        )
        .fault(Fault::Capacity)
    }

    pub fn upstream_unavailable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            "No runtime for this route answered; retry later",
        )
        .retry_after(1)
        .fault(Fault::Upstream)
    }

    /// How loudly this refusal is worth logging: a client's mistake or a
    /// limit doing its job is routine; a sick store or runtime is not.
    pub fn log_level(&self) -> tracing::Level {
        match self.fault {
            Fault::Client => tracing::Level::DEBUG,
            Fault::Capacity => tracing::Level::INFO,
            Fault::Store | Fault::Upstream => tracing::Level::WARN,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut resp = json_response(self.status, &body);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // RFC 9110 §15.5.22, §7.8: a 426 names the protocol to upgrade
            // to (and so `Connection: upgrade`); RFC 6455 §4.4: and the
            // WebSocket version this server speaks.
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        resp
    }
}

impl Fault {
    /// The `fault` label of `portcullis_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Store => "store",
            Fault::Upstream => "upstream",
            Fault::Capacity => "capacity",
        }
    }
}

/// Every store failure a request meets is a `503 session_store_unavailable`;
/// what went wrong travels as the (unshown) cause.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let mut err = ApiError::store_unavailable();
        err.cause = Some(e.to_string());
        err
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Store(e) => e.into(),
            CreateError::TooManySessions { max } => ApiError::too_many_sessions(max),
        }
    }
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub fn empty_response(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
