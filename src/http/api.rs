//! The session API of SPEC §4.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use serde::Deserialize;

use crate::app::App;
use crate::config::Secret;
use crate::error::{ApiError, Body, empty_response, json_response};
use crate::session::{SessionRecord, SessionStore, Store};
use crate::telemetry::{Exposition, Metrics, ReasonLabel, ResultLabel};
use crate::time::rfc3339;
use crate::token::credentials::{self, COOKIE_NAME};
use crate::token::{Claims, Issued, TokenService};

/// Largest API request body; a login is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Usernames and passwords longer than this are refused as malformed rather
/// than hashed: argon2 over megabytes is a cheap way to burn our CPU.
const MAX_CREDENTIAL_BYTES: usize = 1024;

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`] within
/// `server.body_timeout_ms` (the whole body, however it trickles). A
/// declared `Content-Length` over the limit is refused before any of the
/// body is read; both refusals close the connection.
async fn read_json<T: serde::de::DeserializeOwned>(app: &App, req: Request<Incoming>) -> Result<T> {
    // For a `Content-Length` body the hint is exactly the declared length.
    if req.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
    }
    let within = Duration::from_millis(app.config.server.body_timeout_ms);
    let collected = tokio::time::timeout(
        within,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    .map_err(|_| ApiError::request_timeout())?;
    let bytes: Bytes = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::payload_too_large(MAX_BODY_BYTES)
            } else {
                ApiError::bad_request("Could not read the request body")
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's message names the missing field or the syntax problem and
        // never echoes values, so it is safe to return.
        ApiError::bad_request(format!("Malformed JSON body: {e}"))
    })
}

fn session_cookie(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/"
    ))
    .expect("a JWT is a valid header value")
}

/// The login-shaped answer shared by login, refresh and session/create.
fn issued_response(record: &SessionRecord, issued: &Issued, set_cookie: bool) -> Response<Body> {
    let body = serde_json::json!({
        "session_id": record.id,
        "session_token": issued.token,
        "expires_at": rfc3339(issued.expires_at),
        "session_expires_at": rfc3339(record.expires_at),
        "user": record.user,
    });
    let mut resp = json_response(StatusCode::OK, &body);
    if set_cookie {
        resp.headers_mut()
            .insert(header::SET_COOKIE, session_cookie(&issued.token));
    }
    resp
}

fn session_ttl(app: &App) -> Duration {
    Duration::from_secs(app.config.sessions.ttl_secs)
}

pub async fn login(app: &App, req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>> {
    let outcome = login_inner(app, req, peer).await;
    let result = match &outcome {
        Ok(_) => "ok",
        Err(e) => e.code,
    };
    app.metrics
        .logins
        .get_or_create(&ResultLabel { result })
        .inc();
    outcome
}

async fn login_inner(
    app: &App,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>> {
    let body: LoginRequest = read_json(app, req).await?;
    if body.username.is_empty()
        || body.username.len() > MAX_CREDENTIAL_BYTES
        || body.password.len() > MAX_CREDENTIAL_BYTES
    {
        return Err(ApiError::bad_request(
            "username must be 1 to 1024 bytes and password at most 1024 bytes",
        ));
    }
    let attempt = app
        .limiter
        .reserve(peer.ip(), &body.username)
        .map_err(ApiError::rate_limited)?;
    let password = Secret::new(body.password.into_bytes());
    app.metrics.password_checks.inc();
    let user = match app.auth.authenticate(&body.username, password).await {
        Ok(user) => {
            attempt.succeeded();
            user
        }
        Err(crate::auth::AuthError::InvalidCredentials) => {
            attempt.failed();
            tracing::info!(peer = %peer.ip(), "login refused: invalid credentials");
            return Err(ApiError::invalid_credentials());
        }
        Err(crate::auth::AuthError::Unavailable(why)) => {
            attempt.succeeded();
            tracing::warn!(%why, "login verifier unavailable");
            return Err(ApiError::auth_upstream_unavailable());
        }
    };
    // The session exists in the store before any token for it does.
    let record = create_accepted(app, &user).await?;
    app.metrics.sessions_created.inc();
    let issued = app.tokens.issue(&record.user, &record.id);
    tracing::info!(user = %record.user, session = %record.id, "login");
    Ok(issued_response(&record, &issued, true))
}

/// A "(token)" call: a valid token whose own session is live.
async fn authenticate(app: &App, req: &Request<Incoming>) -> Result<(Claims, SessionRecord)> {
    let token = credentials::for_api(req.headers()).ok_or_else(|| {
        ApiError::token(crate::token::TokenError::Missing, StatusCode::UNAUTHORIZED)
    })?;
    let claims = app
        .tokens
        .verify(token)
        .map_err(|e| ApiError::token(e, StatusCode::UNAUTHORIZED))?;
    let record = app
        .store
        .get(&claims.sid)
        .await?
        .ok_or_else(|| ApiError::session_ended(StatusCode::UNAUTHORIZED))?;
    Ok((claims, record))
}

/// How long a session lives before the runtime has accepted it, beyond
/// the hook's own timeout: long enough for the store writes around the
/// hook, short enough that a gateway dying mid-login leaves nothing usable
/// for long (and no token for it ever existed).
const PENDING_MARGIN: Duration = Duration::from_secs(5);
/// How long a queued `on_end` waits for the delete it reports: if the
/// gateway dies in between, the delivery finds the session alive and goes
/// back to watching it instead of reporting an end that did not happen.
const END_GRACE: Duration = Duration::from_secs(5);

/// Creates a session the runtime accepted (SPEC §11). Without hooks, the
/// plain create. With them, the session is made *pending*: its TTL is only
/// the hook's timeout plus [`PENDING_MARGIN`] and no token for it exists,
/// so nothing can use it; only after `on_create`'s `2xx` does it get its
/// full TTL (and a token, from the caller). A refusal deletes it; a crash
/// anywhere in between leaves a pending session that expires on its own
/// (and, being tracked, is reported to `on_end` as `expired`).
async fn create_accepted(app: &App, user: &str) -> Result<SessionRecord> {
    let Some(hooks) = &app.hooks else {
        return Ok(app.store.create(user, session_ttl(app)).await?);
    };
    let record = app
        .store
        .create(user, hooks.timeout() + PENDING_MARGIN)
        .await?;
    if let Some(outbox) = &app.outbox {
        // Tracked before the runtime hears of it, so its end is reported
        // whatever happens next.
        if let Err(e) = outbox
            .track(&record.id, &record.user, (record.expires_at + 1) * 1000)
            .await
        {
            undo_pending(app, &record).await;
            return Err(e.into());
        }
    }
    let expires_at = rfc3339(crate::time::now_unix() + app.config.sessions.ttl_secs as i64);
    let created = crate::hooks::Created {
        session_id: &record.id,
        user: &record.user,
        expires_at: &expires_at,
    };
    if let Err(e) = hooks.on_create(&created).await {
        tracing::warn!(session = %record.id, user = %record.user, error = %e,
            "runtime refused the session");
        undo_pending(app, &record).await;
        return Err(ApiError::runtime_refused_session());
    }
    // A store failure here leaves the pending session to expire by itself.
    app.store
        .touch(&record.id, session_ttl(app))
        .await?
        .ok_or_else(ApiError::store_unavailable)
}

/// Removes a session the runtime never accepted; no `on_end` for it. If
/// the store is away, the pending session expires within seconds anyway.
async fn undo_pending(app: &App, record: &SessionRecord) {
    if let Err(e) = app.store.delete(&record.id).await {
        tracing::warn!(session = %record.id, error = %e, "refused session left to expire");
        return;
    }
    if let Some(outbox) = &app.outbox {
        let _ = outbox.untrack(&record.id, &record.user).await;
    }
}

pub async fn logout(app: &App, req: Request<Incoming>) -> Result<Response<Body>> {
    let (_, record) = authenticate(app, &req).await?;
    end_session(app, &record, "logout").await?;
    let mut resp = empty_response(StatusCode::NO_CONTENT);
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "portcullis_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    Ok(resp)
}

/// Ends a session and reports it to `on_end` with `reason` (SPEC §11:
/// `logout`, `deleted`, ...). The report is queued first, due after
/// [`END_GRACE`], then made due at once when the delete succeeded: a crash
/// between the two never loses it (see `session::outbox`).
async fn end_session(app: &App, record: &SessionRecord, reason: &str) -> Result<bool> {
    let sid = record.id.as_str();
    let job = match &app.outbox {
        Some(outbox) => {
            let body = serde_json::to_string(&crate::hooks::Ended {
                session_id: record.id.clone(),
                user: record.user.clone(),
                reason: reason.to_string(),
            })
            .expect("strings serialise");
            outbox.end(sid, &record.user, &body, END_GRACE).await?;
            Some((outbox, body))
        }
        None => None,
    };
    let existed = app.store.delete(sid).await?;
    if let Some((outbox, body)) = job {
        // Best effort: failing, the job is still due after the grace.
        let _ = outbox.retry(&body, Duration::ZERO).await;
    }
    if existed {
        app.metrics
            .sessions_revoked
            .get_or_create(&ReasonLabel { reason: "revoked" })
            .inc();
        tracing::info!(session = %sid, "session revoked");
    }
    Ok(existed)
}

pub async fn refresh(app: &App, req: Request<Incoming>) -> Result<Response<Body>> {
    let (claims, _) = authenticate(app, &req).await?;
    let record = app
        .store
        .touch(&claims.sid, session_ttl(app))
        .await?
        .ok_or_else(|| ApiError::session_ended(StatusCode::UNAUTHORIZED))?;
    let issued = app.tokens.issue(&record.user, &record.id);
    Ok(issued_response(&record, &issued, true))
}

/// One more session for the same user. The cookie is left alone: it keeps
/// pointing at the caller's current session, and the new token is in the body.
pub async fn create_session(app: &App, req: Request<Incoming>) -> Result<Response<Body>> {
    let (claims, _) = authenticate(app, &req).await?;
    let record = create_accepted(app, &claims.sub).await?;
    app.metrics.sessions_created.inc();
    let issued = app.tokens.issue(&record.user, &record.id);
    Ok(issued_response(&record, &issued, false))
}

/// The caller's view of a session they own; another user's session is
/// indistinguishable from a missing one.
async fn owned_session(app: &App, claims: &Claims, id: &str) -> Result<SessionRecord> {
    if !crate::ids::looks_like_id(id) {
        return Err(ApiError::session_not_found());
    }
    app.store
        .get(id)
        .await?
        .filter(|r| r.user == claims.sub)
        .ok_or_else(ApiError::session_not_found)
}

pub async fn get_session(app: &App, req: Request<Incoming>, id: &str) -> Result<Response<Body>> {
    let (claims, _) = authenticate(app, &req).await?;
    let r = owned_session(app, &claims, id).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "session_id": r.id,
            "user": r.user,
            "state": r.state.as_str(),
            "created_at": rfc3339(r.created_at),
            "expires_at": rfc3339(r.expires_at),
            "connections": r.connections,
        }),
    ))
}

pub async fn delete_session(app: &App, req: Request<Incoming>, id: &str) -> Result<Response<Body>> {
    let (claims, _) = authenticate(app, &req).await?;
    let r = owned_session(app, &claims, id).await?;
    if !end_session(app, &r, "deleted").await? {
        return Err(ApiError::session_not_found());
    }
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn readyz(store: &Store, metrics: &Metrics) -> Response<Body> {
    match store.ping().await {
        Ok(()) => json_response(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        // A probe, not a refusal: counted, never logged (a load balancer
        // polls this every few seconds while the store is down).
        Err(_) => {
            metrics.store_errors.inc();
            ApiError::store_unavailable().into_response()
        }
    }
}

/// Prometheus text 0.0.4 unless the scraper's `Accept` asks for
/// OpenMetrics (SPEC §12).
pub fn metrics(metrics: &Metrics, accept: Option<&HeaderValue>) -> Response<Body> {
    let format = Exposition::negotiate(accept.and_then(|v| v.to_str().ok()));
    let mut resp = Response::new(http_body_util::Full::new(Bytes::from(
        metrics.render_as(format),
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    resp
}

pub fn jwks(tokens: &TokenService) -> Result<Response<Body>> {
    let doc = tokens.jwks().ok_or_else(ApiError::not_found)?;
    Ok(json_response(StatusCode::OK, doc))
}
