//! Shared-route helpers (SPEC §7, §8) for the tests that open viewports.

use tokio_tungstenite::tungstenite::Message;

use super::gateway::route;
use super::upstream::Upstream;
use super::ws::{self, Ws};

/// What a reader's data frame is answered with while another viewport owns
/// the session.
pub const NOT_OWNED: &str =
    r#"{"type":"error","code":"session_not_owned","message":"Session is owned by another client"}"#;

/// The shared route `agent` on `/ws/agent` to `up`, with `extra` keys.
pub fn shared_route(up: &Upstream, extra: &str) -> String {
    route(
        "agent",
        "/ws/agent",
        &[&up.url("/agent")],
        &format!("mode = \"shared\"\n{extra}"),
    )
}

/// The next message, which must be text.
pub async fn text(sock: &mut Ws) -> String {
    match ws::next(sock).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}
