//! SPEC §12 and the surprises a newcomer meets first, against the real
//! binary: `/metrics` speaks Prometheus text 0.0.4 unless OpenMetrics is
//! asked for; a config that sets only `server.max_connections = 2` starts;
//! `portcullis check --skip-secrets` validates a config without its secrets
//! and says which it did not check.

mod support;

use std::future::Future;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::gateway::{Gateway, TempDir, config};
use support::http::{self as api, sample};

const TEST_BUDGET: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

#[tokio::test]
async fn metrics_answer_prometheus_text_unless_openmetrics_is_asked_for() {
    bounded(async {
        let gw = Gateway::start("", &config(None, ""));
        // No Accept (curl, most scrapers' defaults) and text/plain: 0.0.4.
        for headers in [vec![], vec![("accept", "text/plain;version=0.0.4")]] {
            let r = api::request(gw.addr, "GET", "/metrics", &headers, None).await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.header("content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8"),
                "{headers:?}"
            );
            let text = String::from_utf8(r.body).unwrap();
            assert!(
                text.contains("# TYPE portcullis_logins_total counter"),
                "{text}"
            );
            assert!(!text.contains("# EOF"), "{text}");
            assert_eq!(sample(&text, "portcullis_open_sockets"), Some(0.0));
        }
        // What Prometheus sends when it can read OpenMetrics.
        let accept =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let r = api::request(gw.addr, "GET", "/metrics", &[("accept", accept)], None).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.contains("# TYPE portcullis_logins counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn only_max_connections_2_starts_with_a_warning_at_most() {
    bounded(async {
        // The default max_connections_per_session (8) is above 2: it never
        // binds, which is no reason to refuse to start.
        let gw = Gateway::start("max_connections = 2", &config(None, ""));
        let r = api::request(gw.addr, "GET", "/healthz", &[], None).await;
        assert_eq!(r.status, 200);
        let log = gw.log();
        assert!(
            log.contains(
                "server.max_connections_per_session (8) is above server.max_connections (2)"
            ),
            "{log}"
        );
    })
    .await;
}

fn write_config(dir: &TempDir, name: &str, toml: &str) -> std::path::PathBuf {
    let path = dir.0.join(name);
    std::fs::write(&path, toml).unwrap();
    path
}

fn check(path: &Path, args: &[&str], signing_key: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("check").arg("--config").arg(path).args(args);
    cmd.env_remove("PORTCULLIS_SIGNING_KEY")
        .env_remove("PORTCULLIS_PREVIOUS_KEY");
    if let Some(key) = signing_key {
        cmd.env("PORTCULLIS_SIGNING_KEY", key);
    }
    cmd.output().expect("running portcullis check")
}

#[test]
fn check_skip_secrets_validates_the_rest_and_names_what_it_did_not_check() {
    let dir = TempDir::new();
    let rotation = "[tokens]\nkid = \"k2\"\n\
        [[tokens.previous_keys]]\nkid = \"k1\"\nkey_env = \"PORTCULLIS_PREVIOUS_KEY\"\n\
        [[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nupstreams = [\"ws://127.0.0.1:9/echo\"]\n";
    let path = write_config(&dir, "rotation.toml", &config(None, rotation));

    // Without the flag: the missing secret is an error, as for `serve`.
    let out = check(&path, &[], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens.signing_key_env"), "{stderr}");

    // With it: exit 0, and both unread secrets named with their keys.
    let out = check(&path, &["--skip-secrets"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok except 2 secret(s) not checked"),
        "{stdout}"
    );
    assert!(stdout.contains("route echo /ws/echo"), "{stdout}");
    let not_checked: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("secret not checked"))
        .collect();
    assert_eq!(not_checked.len(), 2, "{stdout}");
    assert!(
        not_checked[0].contains("tokens.signing_key_env")
            && not_checked[0].contains("PORTCULLIS_SIGNING_KEY")
    );
    assert!(not_checked[1].contains("tokens.previous_keys[0].key_env"));

    // A secret that is there is still checked: a short key fails.
    let out = check(&path, &["--skip-secrets"], Some("too short"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"));

    // Anything else wrong still fails under the flag.
    let broken = write_config(
        &dir,
        "broken.toml",
        &config(
            None,
            "[[routes]]\nname = \"x\"\npath = \"/ws\"\nupstreams = []\n",
        ),
    );
    let out = check(&broken, &["--skip-secrets"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].upstreams"));

    // A TLS key file it cannot read is a secret it did not check, named by
    // its key; the certificate beside it is still read and parsed.
    let leaf = support::tls::TestCa::new("edge test CA").leaf(&["localhost"]);
    std::fs::write(dir.0.join("cert.pem"), &leaf.cert_pem).unwrap();
    let tls = format!(
        "[server]\n[server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n{}",
        config(None, "")
    );
    let with_tls = write_config(&dir, "tls.toml", &tls);
    let out = check(
        &with_tls,
        &["--skip-secrets"],
        Some(support::gateway::SIGNING_KEY),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("secret not checked (--skip-secrets):")
            && stdout.contains("server.tls.key_file"),
        "{stdout}"
    );
    std::fs::write(dir.0.join("cert.pem"), "not a certificate").unwrap();
    let out = check(
        &with_tls,
        &["--skip-secrets"],
        Some(support::gateway::SIGNING_KEY),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.tls.cert_file"));

    // `serve` has no such flag: without the key it refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&path)
        .env_remove("PORTCULLIS_SIGNING_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens.signing_key_env"));
}

#[test]
fn check_skip_secrets_names_an_unreadable_store_password_and_hook_secret() {
    let dir = TempDir::new();
    // A store password from a variable that is not set, and session hooks
    // whose secret variable is not set either: both are secrets `check`
    // without them can only list.
    let toml = format!(
        "{}\n[sessions.hooks]\non_end = \"http://127.0.0.1:9/end\"\nsecret_env = \"PORTCULLIS_TEST_UNSET_HOOK_SECRET\"\n",
        support::gateway::config_with(
            Some("redis://127.0.0.1:6379/0"),
            "redis_password_env = \"PORTCULLIS_TEST_UNSET_REDIS_PASSWORD\"",
            &support::gateway::static_auth(""),
            ""
        )
    );
    let path = write_config(&dir, "store.toml", &toml);
    let out = check(&path, &[], Some(support::gateway::SIGNING_KEY));
    assert_eq!(out.status.code(), Some(1), "without the flag it fails");
    let out = check(
        &path,
        &["--skip-secrets"],
        Some(support::gateway::SIGNING_KEY),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let not_checked: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("secret not checked"))
        .collect();
    assert!(
        not_checked
            .iter()
            .any(|l| l.contains("sessions.redis_password_env")),
        "{stdout}"
    );
    assert!(
        not_checked
            .iter()
            .any(|l| l.contains("sessions.hooks.secret_env")),
        "{stdout}"
    );
}
