//! SPEC §12: `SIGHUP` reloads the whole config file, against the real
//! binary. Routes, origins, users, limits and keys take effect for new requests;
//! sockets open across the reload (also one whose route was removed) keep
//! echoing; a file that fails validation changes nothing and is logged with
//! the message `portcullis check` prints for it.
//!
//! A reload has no event a test can await from outside but its metric, so
//! that is polled (bounded) with `eventually`.

mod support;

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::SinkExt;
use support::gateway::{Gateway, SIGNING_KEY, config_with, password_hash, route, static_auth};
use support::http::{self as api, login, metrics, sample, try_login};
use support::upstream::Upstream;
use support::wait::eventually;
use support::ws::{self, Ws};
use tokio_tungstenite::tungstenite::Message;

const TEST_BUDGET: Duration = Duration::from_secs(90);
const RELOAD_WITHIN: Duration = Duration::from_secs(10);
/// The key the reloaded config signs with; the first one stays valid for
/// verification under `previous_keys`.
const NEXT_KEY: &str = "next-signing-key-0123456789abcdef-0123456789";

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `kid` in a JWT's header.
fn kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&B64.decode(header).unwrap()).unwrap();
    json["kid"].as_str().unwrap().to_string()
}

/// Waits until `/metrics` counts `n` reloads with `result`.
async fn reloads(gw: &Gateway, result: &str, n: f64) {
    let series = format!("portcullis_config_reloads_total{{result=\"{result}\"}}");
    eventually(
        &format!("{n} reload(s) {result}"),
        RELOAD_WITHIN,
        || async {
            let seen = sample(&metrics(gw.addr).await, &series);
            if seen == Some(n) { Ok(()) } else { Err(seen) }
        },
    )
    .await;
}

async fn config_hash(gw: &Gateway) -> String {
    let text = metrics(gw.addr).await;
    text.lines()
        .find_map(|l| l.strip_prefix("portcullis_config_info{hash=\""))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no portcullis_config_info in\n{text}"))
        .to_string()
}

async fn echoes(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(ws::next(ws).await, Message::text(text));
}

async fn open_with_origin(url: &str, token: &str, origin: &str) -> ws::Upgrade {
    ws::connect(
        url,
        &[
            ("authorization", &format!("Bearer {token}")),
            ("origin", origin),
        ],
    )
    .await
}

#[tokio::test]
async fn reload_applies_routes_origins_users_and_keys_while_sockets_keep_echoing() {
    bounded(async {
        let up = Upstream::start().await;
        let before = config_with(
            None,
            "",
            &static_auth(""),
            &format!(
                "[tokens]\nkid = \"k1\"\n{}{}",
                route("echo", "/ws/echo", &[&up.url("/")], ""),
                route("gone", "/ws/gone", &[&up.url("/")], "")
            ),
        );
        let gw = Gateway::start_with_env(
            "allowed_origins = [\"http://old.example\"]",
            &before,
            &[("PORTCULLIS_NEXT_KEY", NEXT_KEY)],
        );
        let hash_before = config_hash(&gw).await;
        assert_eq!(hash_before, sha256_hex(&std::fs::read_to_string(&gw.config_path).unwrap()));
        let old = login(gw.addr, "alice").await;
        assert_eq!(kid(&old.token), "k1");
        assert_eq!(try_login(gw.addr, "carol", support::gateway::PASSWORD).await.status, 401);
        let (mut kept, _) = open_with_origin(&gw.url("/ws/echo"), &old.token, "http://old.example")
            .await
            .expect("upgrade before the reload");
        let (mut orphan, _) = ws::open(&gw.url("/ws/gone"), &old.token).await;
        echoes(&mut kept, "before").await;
        echoes(&mut orphan, "before").await;

        // Origins changed, carol added, the key rotated (k1 kept for
        // verification), route `gone` removed and `added` added.
        let carol = format!(
            "[[auth.users]]\nusername = \"carol\"\npassword_hash = \"{}\"\n",
            password_hash()
        );
        let after = config_with(
            None,
            "",
            &format!("{}{carol}", static_auth("")),
            &format!(
                "[tokens]\nkid = \"k2\"\nsigning_key_env = \"PORTCULLIS_NEXT_KEY\"\n\
                 [[tokens.previous_keys]]\nkid = \"k1\"\nkey_env = \"PORTCULLIS_SIGNING_KEY\"\n{}{}",
                route("echo", "/ws/echo", &[&up.url("/")], ""),
                route("added", "/ws/added", &[&up.url("/")], "")
            ),
        );
        // Limits too: at most 4 sockets per session (8 before, the default).
        let written = gw.rewrite_config(
            "allowed_origins = [\"http://new.example\"]\nmax_connections_per_session = 4",
            &after,
        );
        gw.signal("HUP");
        reloads(&gw, "ok", 1.0).await;
        assert_eq!(config_hash(&gw).await, sha256_hex(&written));
        assert_ne!(config_hash(&gw).await, hash_before);

        // Open sockets never noticed, the one on the removed route included.
        echoes(&mut kept, "after").await;
        echoes(&mut orphan, "after").await;

        // Routes: removed is 404 for new upgrades, added is served.
        let (status, body, _) = ws::refusal(ws::connect_bearer(&gw.url("/ws/gone"), &old.token).await);
        assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
        // A token signed with k1 before the reload still opens sockets.
        let (mut added, _) = ws::open(&gw.url("/ws/added"), &old.token).await;
        echoes(&mut added, "added").await;

        // Origins: the old one is refused, the new one admitted.
        let (status, body, _) = ws::refusal(
            open_with_origin(&gw.url("/ws/echo"), &old.token, "http://old.example").await,
        );
        assert_eq!((status, body["error"].as_str()), (403, Some("origin_not_allowed")));
        let (mut fresh, _) =
            open_with_origin(&gw.url("/ws/echo"), &old.token, "http://new.example")
                .await
                .expect("the new origin is allowed");
        echoes(&mut fresh, "new origin").await;

        // Users: carol logs in, and new tokens are signed with k2.
        let carol = login(gw.addr, "carol").await;
        assert_eq!(kid(&carol.token), "k2");
        let (mut theirs, _) = ws::open(&gw.url("/ws/echo"), &carol.token).await;
        echoes(&mut theirs, "carol").await;
        // Limits: the session's fifth socket is refused under the new 4.
        let mut more = Vec::new();
        for _ in 0..3 {
            more.push(ws::open(&gw.url("/ws/echo"), &carol.token).await.0);
        }
        let (status, body, _) =
            ws::refusal(ws::connect_bearer(&gw.url("/ws/echo"), &carol.token).await);
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("too_many_connections"))
        );
        // The old session's API calls verify with k1 too.
        let r = api::get_session(gw.addr, &old.sid, &old.token).await;
        assert_eq!(r.status, 200);
        assert!(r.json()["connections"].as_u64().unwrap() >= 3);

        let log = gw.log();
        assert!(log.contains("config reloaded"), "{log}");
        assert!(!log.contains(NEXT_KEY) && !log.contains(SIGNING_KEY), "a key reached the log");
    })
    .await;
}

#[tokio::test]
async fn an_invalid_file_is_refused_with_the_check_message_and_the_old_config_keeps_serving() {
    bounded(async {
        let up = Upstream::start().await;
        let good = config_with(
            None,
            "",
            &static_auth(""),
            &route("echo", "/ws/echo", &[&up.url("/")], ""),
        );
        let gw = Gateway::start("", &good);
        let hash_before = config_hash(&gw).await;
        let alice = login(gw.addr, "alice").await;
        let (mut kept, _) = ws::open(&gw.url("/ws/echo"), &alice.token).await;
        echoes(&mut kept, "before").await;

        // Two routes on one path: valid TOML, invalid config.
        let bad = format!("{good}{}", route("twin", "/ws/echo", &[&up.url("/")], ""));
        gw.rewrite_config("", &bad);
        let check = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("check")
            .arg("--config")
            .arg(&gw.config_path)
            .env("PORTCULLIS_SIGNING_KEY", SIGNING_KEY)
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(1));
        let said = String::from_utf8(check.stderr).unwrap();
        let said = said
            .trim_end()
            .strip_prefix("portcullis: ")
            .unwrap_or_else(|| panic!("unexpected check output {said:?}"))
            .to_string();
        assert!(
            said.starts_with("config error: ") && said.contains("routes[1].path"),
            "{said}"
        );

        gw.signal("HUP");
        reloads(&gw, "invalid", 1.0).await;
        let log = gw.log();
        let line = log
            .lines()
            .find(|l| l.contains("config reload refused"))
            .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
        assert!(
            line.contains(&said),
            "log line {line:?} does not carry {said:?}"
        );

        // Nothing changed: same hash, no successful reload, still serving.
        assert_eq!(config_hash(&gw).await, hash_before);
        let text = metrics(gw.addr).await;
        assert_eq!(
            sample(&text, "portcullis_config_reloads_total{result=\"ok\"}"),
            None
        );
        echoes(&mut kept, "after").await;
        let (mut fresh, _) = ws::open(&gw.url("/ws/echo"), &alice.token).await;
        echoes(&mut fresh, "fresh").await;
    })
    .await;
}
