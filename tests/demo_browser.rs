//! `portcullis demo` in a real headless Chromium: `tests/e2e/demo_browser.mjs`
//! (what it checks: tests/e2e/README.md) against this build's binary. It
//! starts the demo itself on a free port and stops it at the end.
//!
//! Needs what `tests/support/browser.rs` says; without it the test prints
//! SKIPPED and passes, unless `PORTCULLIS_REQUIRE_BROWSER` is set.

mod support;

use std::time::Duration;

use support::browser::{self, Browser};

/// The script bounds each step by `WAIT_MS`; this bounds the whole run.
const SCRIPT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn the_demo_page_works_in_chromium() {
    let b = match Browser::find().await {
        Ok(b) => b,
        Err(why) => return browser::skip(&why),
    };
    let out_dir = browser::out_dir("demo-browser");
    let out = tokio::time::timeout(
        SCRIPT,
        b.script("demo_browser.mjs")
            .env("PORTCULLIS_BIN", env!("CARGO_BIN_EXE_portcullis"))
            .env("OUT_DIR", &out_dir)
            .env("WAIT_MS", "20000")
            .output(),
    )
    .await
    .expect("the demo browser script ends in time")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "demo_browser.mjs failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(" checks passed"),
        "no summary line:\n{stdout}"
    );
}
