//! Headless Chromium for the browser tests: Debian's `/usr/bin/chromium`
//! (or `CHROMIUM`), driven by scripts in `tests/e2e/` through the npm
//! package `playwright-core` under `PLAYWRIGHT_DIR` (default `target/e2e`;
//! `bash tests/e2e/setup.sh all` installs all of it). No browser is ever
//! downloaded.
//!
//! A test whose tools are missing prints `SKIPPED` and passes, unless
//! `PORTCULLIS_REQUIRE_BROWSER` is set (as `.ci/run` does): then it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

pub struct Browser {
    pub chromium: PathBuf,
    pub playwright_dir: PathBuf,
}

impl Browser {
    /// Chromium, node and playwright-core, or why not.
    pub async fn find() -> Result<Browser, String> {
        let chromium =
            PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
        if !chromium.is_file() {
            return Err(format!("no Chromium at {} (CHROMIUM)", chromium.display()));
        }
        let playwright_dir = std::env::var_os("PLAYWRIGHT_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e"),
            PathBuf::from,
        );
        if !playwright_dir
            .join("node_modules/playwright-core/package.json")
            .is_file()
        {
            return Err(format!(
                "no playwright-core in {} (PLAYWRIGHT_DIR; `bash tests/e2e/setup.sh all`)",
                playwright_dir.display()
            ));
        }
        let node = Command::new("node")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !node.is_ok_and(|s| s.success()) {
            return Err("no node on PATH".into());
        }
        Ok(Browser {
            chromium,
            playwright_dir,
        })
    }

    /// `node tests/e2e/<script>` with `PLAYWRIGHT_DIR` and `CHROMIUM` set,
    /// killed if dropped.
    pub fn script(&self, script: &str) -> Command {
        let mut cmd = Command::new("node");
        cmd.arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/e2e")
                .join(script),
        )
        .env("PLAYWRIGHT_DIR", &self.playwright_dir)
        .env("CHROMIUM", &self.chromium)
        .kill_on_drop(true);
        cmd
    }
}

/// Fails when `PORTCULLIS_REQUIRE_BROWSER` is set, else prints `SKIPPED:
/// <why>` (the caller then returns).
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("PORTCULLIS_REQUIRE_BROWSER").is_none(),
        "PORTCULLIS_REQUIRE_BROWSER is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A directory for a test's screenshots: `target/tmp/<name>`.
pub fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
