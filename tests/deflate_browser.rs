//! permessage-deflate negotiated by a real browser: headless Chromium
//! (Debian's `/usr/bin/chromium`, driven by `playwright-core` through
//! `tests/e2e/deflate_browser.mjs`) logs in on a page served on the
//! gateway's allowed origin and opens WebSockets through the real gateway to
//! real Python `websockets` runtimes.
//!
//! The bytes on the wire are counted at the TCP level on both legs: a
//! counting hop between Chromium and the gateway (it also serves the page,
//! so page and gateway are one origin) and one between the gateway and each
//! runtime. A route whose runtime declines the offer is the control: the
//! same messages cross it uncompressed, so a gateway that dropped the
//! offer, or a measure that could not tell, fails the test.
//!
//! Needs `node`, Chromium (`CHROMIUM`, default `/usr/bin/chromium`),
//! `playwright-core` under `PLAYWRIGHT_DIR` (default `target/e2e`; install
//! with `bash tests/e2e/setup.sh all`) and Python `websockets`
//! (`PORTCULLIS_PY_PATH`, as for `tests/deflate.rs`). When one is missing the
//! test prints SKIPPED and passes, unless `PORTCULLIS_REQUIRE_BROWSER` is set
//! (as `.ci/run` does): then it fails.

mod support;

use std::path::Path;
use std::time::Duration;

use support::browser::{self, Browser};
use support::gateway::{Gateway, PASSWORD, config, echo_route, route};
use support::pyws;
use support::tap::{Conn, Tap};

/// Bound on every browser step (the script's own waits) ...
const STEP_MS: u64 = 20_000;
/// ... and on the whole script, Chromium's start included.
const SCRIPT: Duration = Duration::from_secs(120);
/// Bound on each connection report after the script ended.
const WITHIN: Duration = Duration::from_secs(20);

/// What the page sends on each socket (tests/e2e/deflate_page.html).
const TEXT_BYTES: u64 = 256 * 1024;
const BINARY_BYTES: u64 = 64 * 1024;
const PAYLOAD: u64 = TEXT_BYTES + BINARY_BYTES;

/// Runs the page in Chromium and returns the script's `RESULT` object.
async fn run_page(b: &Browser, page_url: &str, out_dir: &Path) -> serde_json::Value {
    let out = tokio::time::timeout(
        SCRIPT,
        b.script("deflate_browser.mjs")
            .env("PAGE_URL", page_url)
            .env("LOGIN_USER", "alice")
            .env("LOGIN_PASS", PASSWORD)
            .env("OUT_DIR", out_dir)
            .env("WAIT_MS", STEP_MS.to_string())
            .output(),
    )
    .await
    .expect("the browser script ends in time")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    let result: serde_json::Value = serde_json::from_str(result).unwrap();
    assert!(
        out.status.success(),
        "the browser script failed ({}): {stderr}\n{result:#}",
        out.status
    );
    result
}

/// The upgraded connection the `tap` saw next, within [`WITHIN`].
async fn upgraded(tap: &mut Tap, what: &str) -> Conn {
    tokio::time::timeout(WITHIN, tap.next_upgraded())
        .await
        .unwrap_or_else(|_| panic!("{what}: no upgraded connection reported in time"))
}

#[tokio::test]
async fn chromium_negotiates_deflate_through_the_gateway_and_the_wire_shrinks() {
    let b = match Browser::find().await {
        Ok(b) => b,
        Err(why) => return browser::skip(&why),
    };
    if !pyws::available().await {
        return browser::skip(&format!(
            "python3 cannot import websockets from {} (PORTCULLIS_PY_PATH)",
            pyws::py_path()
        ));
    }

    // Runtimes: one negotiates deflate, the control declines every offer.
    let (_deflate_rt, deflate_port, mut deflate_lines) = pyws::runtime(true).await;
    let (_plain_rt, plain_port, mut plain_lines) = pyws::runtime(false).await;
    let mut deflate_leg = Tap::forward(
        Tap::bind().await,
        ([127, 0, 0, 1], deflate_port).into(),
        None,
    );
    let mut plain_leg = Tap::forward(Tap::bind().await, ([127, 0, 0, 1], plain_port).into(), None);

    // The browser's origin is the front hop, which serves the page and
    // forwards everything else to the gateway.
    let front = Tap::bind().await;
    let origin = format!("http://{}", front.local_addr().unwrap());
    let limit = "max_message_bytes = 1048576";
    let routes = format!(
        "{}\n{}",
        echo_route(&format!("ws://{}/", deflate_leg.addr), limit),
        route(
            "plain",
            "/ws/plain",
            &[&format!("ws://{}/", plain_leg.addr)],
            limit
        ),
    );
    let gw = Gateway::start(
        &format!("allowed_origins = [\"{origin}\"]"),
        &config(None, &routes),
    );
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/deflate_page.html"),
    )
    .unwrap();
    let mut front = Tap::forward(front, gw.addr, Some(page));

    let out_dir = browser::out_dir("deflate-browser");
    let r = run_page(&b, &format!("{origin}/?paths=/ws/echo,/ws/plain"), &out_dir).await;
    eprintln!("screenshot: {}", r["screenshot"]);

    let results = r["results"].as_array().expect("the page's results");
    assert_eq!(results.len(), 2, "the page ran both sockets: {r:#}");

    // Everything measured, printed before any of it is judged.
    // Bytes on the wire after the handshakes, both legs, both directions.
    // The front saw two sockets, in the order they ended: name them by
    // their request line.
    let mut front_socks = [
        upgraded(&mut front, "front").await,
        upgraded(&mut front, "front").await,
    ];
    front_socks.sort_by_key(|c| c.request.contains("/ws/plain"));
    let [front_deflate, front_plain] = front_socks;
    let legs = [
        ("deflate browser-gateway", front_deflate),
        ("plain   browser-gateway", front_plain),
        (
            "deflate gateway-runtime",
            upgraded(&mut deflate_leg, "deflate").await,
        ),
        (
            "plain   gateway-runtime",
            upgraded(&mut plain_leg, "plain").await,
        ),
    ];
    for (name, c) in &legs {
        eprintln!(
            "{name}: {} up, {} down after the handshake for {PAYLOAD} bytes of messages each way ({})",
            c.up, c.down, c.request
        );
    }
    let (deflate, plain) = (&results[0], &results[1]);
    let ext = deflate["extensions"].as_str().unwrap_or_default();
    eprintln!(
        "ws.extensions on /ws/echo: {ext:?}; on /ws/plain: {}",
        plain["extensions"]
    );
    let handshakes = r["handshakes"].as_array().unwrap();
    for h in handshakes {
        eprintln!(
            "Chromium offered {} on {}; the 101 answered {}",
            h["offer"], h["url"], h["answer"]
        );
    }
    let offers = [
        pyws::next_offer(&mut deflate_lines).await,
        pyws::next_offer(&mut plain_lines).await,
    ];
    eprintln!("the runtimes received {} and {}", offers[0], offers[1]);

    // What the page saw: deflate on /ws/echo only, every echo unchanged.
    for s in results {
        assert_eq!(s["protocol"], "bearer", "{s}");
        assert_eq!(s["text_echoed"], true, "the text comes back unchanged: {s}");
        assert_eq!(
            s["binary_echoed"], true,
            "the binary comes back unchanged: {s}"
        );
        assert_eq!(s["close"]["code"], 1000, "{s}");
        assert_eq!(s["close"]["wasClean"], true, "{s}");
        assert!(s["error"].is_null(), "{s}");
    }
    assert!(
        ext.starts_with("permessage-deflate"),
        "ws.extensions on /ws/echo: {ext:?} ({r:#})"
    );
    assert_eq!(plain["extensions"], "", "the control negotiates nothing");
    // Chromium offered deflate on both sockets (seen through CDP), and the
    // offer reached both runtimes.
    assert_eq!(handshakes.len(), 2, "{r:#}");
    for h in handshakes {
        assert_eq!(h["status"], 101, "{h}");
        assert!(
            h["offer"]
                .as_str()
                .is_some_and(|o| o.starts_with("permessage-deflate")),
            "{h}"
        );
    }
    for seen in &offers {
        assert!(
            seen["offer"]
                .as_str()
                .is_some_and(|o| o.starts_with("permessage-deflate")),
            "{seen}"
        );
    }

    // The wire: under a quarter of the messages with deflate, at least all
    // of them on the control.
    assert!(legs[0].1.request.starts_with("GET /ws/echo"), "{legs:?}");
    assert!(legs[1].1.request.starts_with("GET /ws/plain"), "{legs:?}");
    for (name, c) in &legs {
        if name.starts_with("deflate") {
            assert!(
                c.up * 4 < PAYLOAD && c.down * 4 < PAYLOAD,
                "{name}: {c:?} is not compressed ({PAYLOAD} bytes of messages)"
            );
        } else {
            assert!(
                c.up >= PAYLOAD && c.down >= PAYLOAD,
                "{name}: {c:?} carries less than the messages uncompressed"
            );
        }
    }
}
