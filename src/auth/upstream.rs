//! `auth.kind = "upstream"`: delegate credential checks to the team's own
//! service with a JSON POST. 200 `{"user"}` = ok; 401/403 = bad credentials;
//! anything else, or no answer within the timeout, = unavailable (502).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use url::Url;

use super::AuthError;
use crate::config::Secret;

/// The verifier's answer is small; more than this is a broken verifier.
const MAX_REPLY_BYTES: usize = 16 * 1024;

pub struct UpstreamVerifier {
    url: Url,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Reply {
    user: String,
}

impl UpstreamVerifier {
    pub fn new(url: Url, timeout: Duration) -> Self {
        UpstreamVerifier { url, timeout }
    }

    pub async fn verify(&self, username: &str, password: &Secret) -> Result<String, AuthError> {
        match tokio::time::timeout(self.timeout, self.call(username, password)).await {
            Ok(r) => r,
            Err(_) => Err(AuthError::Unavailable("timed out".into())),
        }
    }

    async fn call(&self, username: &str, password: &Secret) -> Result<String, AuthError> {
        let unavailable = |e: &dyn std::fmt::Display| AuthError::Unavailable(e.to_string());
        let host = self.url.host_str().ok_or_else(|| unavailable(&"no host"))?;
        // `host_str` keeps an IPv6 literal's brackets, which no resolver takes.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.url.port_or_known_default().unwrap_or(80);
        let stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| unavailable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(&e))?;
        tokio::spawn(conn);
        let password =
            std::str::from_utf8(password.expose()).map_err(|_| AuthError::InvalidCredentials)?;
        let body =
            serde_json::to_vec(&serde_json::json!({ "username": username, "password": password }))
                .map_err(|e| unavailable(&e))?;
        let path = match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        };
        let req = http::Request::post(path)
            .header(http::header::HOST, self.url.authority())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(&e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unavailable(&e))?;
        let status = resp.status();
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return Err(AuthError::InvalidCredentials);
        }
        if status != http::StatusCode::OK {
            return Err(AuthError::Unavailable(format!(
                "verifier answered {status}"
            )));
        }
        let bytes = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|e| unavailable(&e))?
            .to_bytes();
        let reply: Reply = serde_json::from_slice(&bytes).map_err(|e| unavailable(&e))?;
        if reply.user.is_empty() {
            return Err(AuthError::Unavailable(
                "verifier returned an empty user".into(),
            ));
        }
        Ok(reply.user)
    }
}
