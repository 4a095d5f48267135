//! The Autobahn|Testsuite fuzzing client (RFC 6455 conformance), cases 1-7,
//! 9, 12 and 13, against a tokio-tungstenite echo runtime directly and
//! through the real gateway in front of it. Fails on any FAILED case through
//! the gateway in 1-7 and 9 (12 and 13 are permessage-deflate, which the
//! gateway does not negotiate yet: reported, not judged).
//!
//! Needs `wstest` (PyPI `autobahntestsuite`, Python 2.7): `.ci/run`
//! installs it into `target/autobahn/py` (`tests/autobahn.sh install` does
//! the same by hand). Found through `AUTOBAHN_PY` (a `pip --target` dir) or
//! that default dir, run with `AUTOBAHN_PYTHON` (default: `python2.7`,
//! pyenv's 2.7.18). When it is missing the test says so and passes, except
//! where `.ci/run` sets `PORTCULLIS_REQUIRE_AUTOBAHN` (or `CI` is set):
//! there a missing tool fails it.
//!
//! Takes about a minute (debug build, 2 cores). Results through the
//! gateway: no FAILED; NON-STRICT 3.2-3.4, 4.1.3-4.1.5, 4.2.3-4.2.5 and
//! 5.15, where the bad frame follows a valid message in the same write: the
//! gateway fails the client at once, before the runtime's echo of that
//! message comes back. 12.x and 13.x are UNIMPLEMENTED (no deflate),
//! directly as well.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::gateway::{Gateway, TempDir, config};
use support::http::login;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Case groups judged through the gateway.
const JUDGED: [&str; 8] = ["1", "2", "3", "4", "5", "6", "7", "9"];
/// Every case group run.
const CASES: [&str; 10] = [
    "1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "12.*", "13.*",
];
/// The whole run (both agents) must end within this.
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn site_dir() -> PathBuf {
    std::env::var_os("AUTOBAHN_PY").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/autobahn/py"),
        PathBuf::from,
    )
}

/// The command that runs `wstest`, if it is installed.
fn wstest() -> Option<Command> {
    let site = site_dir();
    if !site.join("autobahntestsuite").is_dir() {
        return None;
    }
    let python = std::env::var("AUTOBAHN_PYTHON").unwrap_or_else(|_| "python2.7".into());
    let mut cmd = Command::new(python);
    // `site.addsitedir` (not PYTHONPATH) so the `.pth` files of namespace
    // packages (zope.interface) are read.
    cmd.arg("-c")
        .arg(
            "import site, sys; site.addsitedir(sys.argv.pop(1)); \
             from autobahntestsuite import wstest; sys.argv[0] = 'wstest'; wstest.run()",
        )
        .arg(&site)
        .env("PYENV_VERSION", "2.7.18");
    Some(cmd)
}

/// A plain tokio-tungstenite echo runtime, limits raised to what case 9
/// sends (16 MiB messages).
async fn echo_runtime() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let cfg = WebSocketConfig::default()
                    .max_message_size(Some(64 << 20))
                    .max_frame_size(Some(64 << 20));
                let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(s, Some(cfg)).await
                else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One case's result from Autobahn's `index.json`.
#[derive(Debug, serde::Deserialize)]
struct Outcome {
    behavior: String,
    #[serde(rename = "behaviorClose")]
    behavior_close: String,
}

/// Case id → outcome, per agent.
type Report = BTreeMap<String, BTreeMap<String, Outcome>>;

fn group(case: &str) -> &str {
    case.split('.').next().unwrap_or("")
}

/// Counts per case group and behaviour.
fn tally(cases: &BTreeMap<String, Outcome>) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut t: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (id, o) in cases {
        *t.entry(group(id).to_string())
            .or_default()
            .entry(o.behavior.clone())
            .or_default() += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_fuzzingclient_passes_through_the_gateway() {
    let Some(mut wstest) = wstest() else {
        let msg = format!(
            "Autobahn wstest is not installed in {} (tests/autobahn.sh install)",
            site_dir().display()
        );
        let required = ["PORTCULLIS_REQUIRE_AUTOBAHN", "CI"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        assert!(!required, "{msg}: CI must install it");
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let echo = echo_runtime().await;
    let route = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws/echo\"\nmax_message_bytes = 67108864\nupstreams = [\"ws://{echo}/\"]\n"
    );
    let gw = Gateway::start_with_env(
        "max_connections_per_session = 10000",
        &config(None, &route),
        &[("PORTCULLIS_LOG", "warn")],
    );
    let token = login(gw.addr, "alice").await.token;
    let dir = TempDir::new();
    let spec = serde_json::json!({
        "outdir": dir.0.join("reports"),
        "servers": [
            {"agent": "direct", "url": format!("ws://{echo}/")},
            {"agent": "gateway", "url": format!("ws://{}/ws/echo?session_token={token}", gw.addr)},
        ],
        "cases": CASES,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    });
    let spec_path = dir.0.join("fuzzingclient.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    wstest
        .args(["--mode", "fuzzingclient", "--spec"])
        .arg(&spec_path)
        .current_dir(&dir.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("wstest.log")).unwrap());
    let mut child = tokio::process::Command::from(wstest)
        .kill_on_drop(true)
        .spawn()
        .expect("starting wstest");
    let status = tokio::time::timeout(RUN_LIMIT, child.wait())
        .await
        .expect("Autobahn did not finish in time")
        .unwrap();
    let index = dir.0.join("reports/index.json");
    let report: Report = match std::fs::read(&index) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(e) => panic!(
            "no report ({e}); wstest exited {status}:\n{}",
            std::fs::read_to_string(dir.0.join("wstest.log")).unwrap_or_default()
        ),
    };
    for (agent, cases) in &report {
        eprintln!("autobahn {agent}: {:?}", tally(cases));
        for (id, o) in cases {
            if o.behavior != "OK" && o.behavior != "INFORMATIONAL" {
                eprintln!(
                    "  {agent} {id}: {} (close {})",
                    o.behavior, o.behavior_close
                );
            }
        }
    }
    let gateway = &report["gateway"];
    let failed: Vec<&String> = gateway
        .iter()
        .filter(|(id, o)| JUDGED.contains(&group(id)) && o.behavior == "FAILED")
        .map(|(id, _)| id)
        .collect();
    assert!(
        failed.is_empty(),
        "FAILED through the gateway: {failed:?}\n{}",
        gw.log()
    );
    let judged = gateway
        .keys()
        .filter(|id| JUDGED.contains(&group(id)))
        .count();
    assert!(judged > 250, "only {judged} cases of 1-7 and 9 ran");
}
