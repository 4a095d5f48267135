//! `auth.kind = "upstream"`: delegate credential checks to the team's own
//! service with a JSON POST. 200 `{"user"}` = ok; 401/403 = bad credentials;
//! anything else, or no answer within the timeout, = unavailable (502).

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
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
        let password =
            std::str::from_utf8(password.expose()).map_err(|_| AuthError::InvalidCredentials)?;
        let body =
            serde_json::to_vec(&serde_json::json!({ "username": username, "password": password }))
                .map_err(|e| unavailable(&e))?;
        let resp = crate::outbound::post_json(&self.url, &[], body)
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
