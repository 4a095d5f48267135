//! The Python `websockets` library (permessage-deflate capable) as a real
//! runtime process: `tests/support/deflate/runtime.py`.
//!
//! Found through `PORTCULLIS_PY_PATH` (a `pip install --target` directory,
//! default `/tmp/deflate-py`); `.ci/run` installs it into `target/deflate-py`.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const WITHIN: Duration = Duration::from_secs(20);

pub fn py_path() -> String {
    std::env::var("PORTCULLIS_PY_PATH").unwrap_or_else(|_| "/tmp/deflate-py".into())
}

/// `tests/support/deflate/<name>`.
pub fn script(name: &str) -> String {
    format!(
        "{}/tests/support/deflate/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Whether `python3` can import `websockets` from [`py_path`].
pub async fn available() -> bool {
    Command::new("python3")
        .args(["-c", "import websockets.client"])
        .env("PYTHONPATH", py_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// The Python echo runtime on a free port: the process (killed on drop),
/// its port, and its stdout (one JSON line per connection with the
/// `Sec-WebSocket-Extensions` offer it received). `deflate = false` starts
/// it with compression off: it declines every offer.
pub async fn runtime(deflate: bool) -> (Child, u16, Lines<BufReader<ChildStdout>>) {
    let mut cmd = Command::new("python3");
    cmd.arg(script("runtime.py"));
    if !deflate {
        cmd.arg("--no-deflate");
    }
    let mut child = cmd
        .env("PYTHONPATH", py_path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(WITHIN, lines.next_line())
        .await
        .expect("runtime prints its port in time")
        .unwrap()
        .expect("a port line")
        .parse()
        .unwrap();
    (child, port, lines)
}

/// The runtime's next connection report.
pub async fn next_offer(lines: &mut Lines<BufReader<ChildStdout>>) -> serde_json::Value {
    let line = tokio::time::timeout(WITHIN, lines.next_line())
        .await
        .expect("runtime reports the connection in time")
        .unwrap()
        .expect("a line");
    serde_json::from_str(&line).unwrap()
}
