//! `portcullis demo`: the gateway with a memory store, a built-in echo
//! runtime, one demo user and a page at `/`, all from embedded defaults.
//! The page is built on the JavaScript client (`/portcullis.js`) and talks
//! to the shared route `/ws/chat`: two tabs show one conversation.

pub mod echo;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use tokio::net::TcpListener;

use crate::app::{App, Running};
use crate::config::Config;

pub const DEMO_USER: &str = "demo";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const PAGE: &str = include_str!("page.html");

/// Printed so the person running the demo can log in.
pub struct Credentials {
    pub username: String,
    pub password: String,
}

fn random_b64(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Binds, starts the echo runtime and builds the app; the caller serves.
pub async fn prepare(
    listen: Option<SocketAddr>,
) -> anyhow::Result<(Arc<Running>, TcpListener, Credentials)> {
    let listener = match listen {
        Some(addr) => TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?,
        // The default port is a convenience, not a contract: fall back to a
        // free port rather than fail when something else holds 8080.
        None => match TcpListener::bind(DEFAULT_LISTEN).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding a free port")?,
        },
    };
    let addr = listener.local_addr()?;
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the echo runtime")?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(echo::serve(echo));

    let password = random_b64(12);
    let hash = {
        let p = password.clone();
        tokio::task::spawn_blocking(move || crate::auth::password::hash_password(p.as_bytes()))
            .await?
    };
    let signing_key = random_b64(32);
    let toml = format!(
        r#"
[server]
listen = "{addr}"
allowed_origins = ["http://{addr}", "http://localhost:{port}"]

[sessions]
store = "memory"

[tokens]
signing_key_env = "PORTCULLIS_DEMO_SIGNING_KEY"

[auth]
kind = "static"
[[auth.users]]
username = "{DEMO_USER}"
password_hash = "{hash}"

[[routes]]
name = "echo"
path = "/ws/echo"
upstreams = ["ws://{echo_addr}/"]

# The page's conversation: shared, so every tab of the session sees it,
# one writes, and a reload resumes it (SPEC §7, §9).
[[routes]]
name = "chat"
path = "/ws/chat"
upstreams = ["ws://{echo_addr}/"]
mode = "shared"
replay_frames = 10000
"#,
        port = addr.port()
    );
    let config = Config::parse("(demo)", &toml)?;
    let loaded = config.validate("(demo)", &|name| {
        (name == "PORTCULLIS_DEMO_SIGNING_KEY").then(|| signing_key.clone())
    })?;
    let mut app = App::build(loaded).await?;
    app.demo_page = Some(PAGE.to_string());
    Ok((
        Running::new(app, None),
        listener,
        Credentials {
            username: DEMO_USER.to_string(),
            password,
        },
    ))
}
