// End-to-end check of the `portcullis demo` page in a real headless Chromium.
//
// Run by tests/demo_browser.rs in `cargo test`. See tests/e2e/README.md for
// setup. By hand:
//   PLAYWRIGHT_DIR=target/e2e node tests/e2e/demo_browser.mjs
//
// Environment:
//   PLAYWRIGHT_DIR   directory whose node_modules holds playwright-core (default /tmp/e2e)
//   CHROMIUM         browser binary (default /usr/bin/chromium); browsers are never downloaded
//   OUT_DIR          where screenshots go (default /tmp/e2e)
//   PORTCULLIS_BIN   demo binary to spawn (default target/release/portcullis of this repo)
//   DEMO_URL, DEMO_USER, DEMO_PASS
//                    use an already-running demo instead of spawning one (all three needed)
//   WAIT_MS          bound for every wait (default 10000)
//
// Exit code 0 only if every check passed.

import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import readline from "node:readline";
import http from "node:http";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const PLAYWRIGHT_DIR = process.env.PLAYWRIGHT_DIR || "/tmp/e2e";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const OUT_DIR = process.env.OUT_DIR || "/tmp/e2e";
const WAIT_MS = Number(process.env.WAIT_MS || 10000);
const MESSAGE = process.env.MESSAGE || "hello through the gate";

const require = createRequire(path.join(PLAYWRIGHT_DIR, "package.json"));
const { chromium } = require("playwright-core");

const results = [];
function check(name, ok, detail) {
  results.push({ name, ok, detail });
  console.log(`${ok ? "PASS" : "FAIL"}  ${name}${detail ? `  -- ${detail}` : ""}`);
}

function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise.finally(() => clearTimeout(t)),
    new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
  ]);
}

// Starts `portcullis demo --listen 127.0.0.1:0` and reads its credentials and address.
async function startDemo() {
  const bin = process.env.PORTCULLIS_BIN || path.join(REPO, "target", "release", "portcullis");
  const child = spawn(bin, ["demo", "--listen", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "pipe"] });
  const stderr = [];
  child.stderr.on("data", (d) => stderr.push(d.toString()));
  const info = {};
  const rl = readline.createInterface({ input: child.stdout });
  const ready = new Promise((resolve, reject) => {
    child.on("exit", (code, sig) => reject(new Error(`demo exited early (code ${code}, signal ${sig}): ${stderr.join("")}`)));
    child.on("error", reject);
    rl.on("line", (line) => {
      console.log(`demo stdout: ${line}`);
      let m;
      if ((m = line.match(/^username: (.+)$/))) info.user = m[1];
      else if ((m = line.match(/^password: (.+)$/))) info.pass = m[1];
      else if ((m = line.match(/^portcullis listening on (http:\/\/127\.0\.0\.1:\d+)\/?$/))) info.url = m[1];
      if (info.user && info.pass && info.url) resolve(info);
    });
  });
  try {
    const got = await withTimeout(ready, WAIT_MS, "demo to print credentials and address");
    return { ...got, child, stderr };
  } catch (e) {
    child.kill("SIGKILL");
    throw e;
  }
}

async function main() {
  let demo;
  if (process.env.DEMO_URL && process.env.DEMO_USER && process.env.DEMO_PASS) {
    demo = { url: process.env.DEMO_URL.replace(/\/$/, ""), user: process.env.DEMO_USER, pass: process.env.DEMO_PASS };
  } else {
    demo = await startDemo();
  }
  try {
    await runBrowser(demo);
  } finally {
    if (demo.child) {
      demo.child.kill("SIGTERM");
      await withTimeout(new Promise((r) => demo.child.once("exit", r)), WAIT_MS, "demo to exit")
        .catch(() => demo.child.kill("SIGKILL"));
    }
  }
}

async function runBrowser(demo) {
  const u = new URL(demo.url);
  if (u.hostname !== "127.0.0.1") throw new Error(`refusing to target ${u.hostname}: only 127.0.0.1`);
  check("demo started", true, `${demo.url} user=${demo.user}`);

  mkdirSync(OUT_DIR, { recursive: true });
  const profile = mkdtempSync(path.join(tmpdir(), "portcullis-e2e-profile-"));
  // Playwright refuses --user-data-dir in args; a persistent context on a
  // fresh temp dir is the same thing (it passes --user-data-dir itself).
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    timeout: WAIT_MS * 3,
    viewport: { width: 1000, height: 800 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    const page = browser.pages()[0] || await browser.newPage();
    page.setDefaultTimeout(WAIT_MS);
    const consoleLines = [];
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    page.on("response", (r) => { if (r.status() >= 400) consoleLines.push(`http ${r.status()} ${r.request().method()} ${r.url()}`); });

    // Watch the page's own socket at the protocol level (CDP), including the
    // negotiated Sec-WebSocket-Protocol of the handshake response.
    const cdp = await browser.newCDPSession(page);
    await cdp.send("Network.enable");
    const handshakes = [];
    cdp.on("Network.webSocketHandshakeResponseReceived", (e) => handshakes.push(e.response));
    const wsEvents = [];
    page.on("websocket", (ws) => {
      wsEvents.push(`open ${ws.url()}`);
      ws.on("framesent", (f) => wsEvents.push(`sent ${JSON.stringify(f.payload)}`));
      ws.on("framereceived", (f) => wsEvents.push(`received ${JSON.stringify(f.payload)}`));
      ws.on("close", () => wsEvents.push("close"));
    });

    const resp = await page.goto(demo.url + "/", { timeout: WAIT_MS });
    check("page loads", resp && resp.status() === 200, `status ${resp && resp.status()}, title ${JSON.stringify(await page.title())}`);

    const logOf = (p) => p.locator("#log").innerText();
    const logText = () => logOf(page);
    const waitFor = async (name, p, fn, arg) => {
      try {
        await p.waitForFunction(fn, arg, { timeout: WAIT_MS });
        check(name, true);
        return true;
      } catch (e) {
        check(name, false, `not within ${WAIT_MS} ms; log: ${JSON.stringify((await logOf(p)).slice(-600))}`);
        return false;
      }
    };
    const waitLog = (name, needle, p = page) =>
      waitFor(name, p, (n) => document.getElementById("log").innerText.includes(n), needle);
    const text = (p, id) => p.locator(`#${id}`).innerText();

    // A wrong password is refused and reported in the log.
    await page.fill("#username", demo.user);
    await page.fill("#password", "definitely-wrong");
    await page.click("#login button");
    await waitLog("wrong password refused", "login refused: 401");

    // Log in: tab 1 opens the conversation and writes.
    await page.fill("#password", demo.pass);
    await page.click("#login button");
    await waitFor("tab 1 open", page, () => document.getElementById("state").innerText.startsWith("open"));
    check("tab 1 is the writer", (await text(page, "role")).includes("You are the writer"), await text(page, "role"));
    const hs = handshakes[0];
    const hsProto = hs && Object.entries(hs.headers).find(([k]) => k.toLowerCase() === "sec-websocket-protocol");
    check("handshake: 101 with Sec-WebSocket-Protocol bearer, token not in the URL",
      !!hs && hs.status === 101 && hsProto && hsProto[1] === "bearer" && wsEvents[0].includes("portcullis=v1")
        && !wsEvents[0].includes("token"),
      `${hs && hs.status} ${JSON.stringify(hsProto && hsProto[1])} ${wsEvents[0]}`);

    // Tab 2 joins the same session (the client keeps it in localStorage)
    // and is a reader that is told why it cannot type.
    const page2 = await browser.newPage();
    page2.setDefaultTimeout(WAIT_MS);
    await page2.goto(demo.url + "/", { timeout: WAIT_MS });
    await waitFor("tab 2 open", page2, () => document.getElementById("state").innerText.startsWith("open"));
    check("tab 2 is a reader and says why", (await text(page2, "role")).includes("Read-only: another tab"),
      await text(page2, "role"));
    check("tab 2 cannot type", await page2.locator("#msg").isDisabled());
    await page.fill("#msg", MESSAGE);
    await page.click("#send");
    await waitLog("tab 1 sees the echo", `runtime: ${MESSAGE}`);
    await waitLog("tab 2 sees the same frame", `runtime: ${MESSAGE}`, page2);
    await page.screenshot({ path: path.join(OUT_DIR, "demo-tab1-writer.png"), fullPage: true });
    await page2.screenshot({ path: path.join(OUT_DIR, "demo-tab2-reader.png"), fullPage: true });

    // Reload tab 1 in the middle of a stream: it resumes, nothing lost or doubled.
    const N = 300;
    await page.fill("#msg", `/count ${N}`);
    await page.click("#send");
    await waitFor("stream under way", page, () => document.getElementById("log").innerText.includes("line 40 of"));
    await page.reload({ timeout: WAIT_MS });
    await waitLog("tab 1 reloaded and the stream finished", `line ${N} of ${N}`);
    await waitLog("tab 2 saw the stream finish", `line ${N} of ${N}`, page2);
    const lines = (t) => [...t.matchAll(/line (\d+) of \d+/g)].map((m) => Number(m[1]));
    const want = Array.from({ length: N }, (_, i) => i + 1);
    const got1 = lines(await logText());
    check("tab 1 after reload: every line once, in order", JSON.stringify(got1) === JSON.stringify(want),
      `${got1.length} lines, first ${got1.slice(0, 3)}, last ${got1.slice(-3)}`);
    const got2 = lines(await logOf(page2));
    check("tab 2: every line once, in order", JSON.stringify(got2) === JSON.stringify(want), `${got2.length} lines`);
    check("no gap reported", !(await logText()).includes("gap:"));
    await page.screenshot({ path: path.join(OUT_DIR, "demo-after-reload.png"), fullPage: true });

    // A foreign origin is refused at check 2, before the token counts: a
    // plain HTTP 403, which a browser reports as 1006, never opened.
    const { session_token: token } = await (await fetch(`${demo.url}/api/auth/login`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ username: demo.user, password: demo.pass }),
    })).json();
    const foreign = http.createServer((_, res) => { res.end("<!doctype html><title>elsewhere</title>"); });
    await new Promise((r) => foreign.listen(0, "127.0.0.1", r));
    const page3 = await browser.newPage();
    await page3.goto(`http://127.0.0.1:${foreign.address().port}/`, { timeout: WAIT_MS });
    const refused = await page3.evaluate(({ url, token, ms }) => new Promise((resolve) => {
      const ws = new WebSocket(url, ["bearer", token]);
      const t = setTimeout(() => resolve({ error: "timeout" }), ms);
      ws.onopen = () => { clearTimeout(t); resolve({ opened: true }); };
      ws.onclose = (ev) => { clearTimeout(t); resolve({ opened: false, code: ev.code }); };
    }), { url: `${demo.url.replace("http", "ws")}/ws/chat?portcullis=v1`, token, ms: WAIT_MS });
    check("a foreign origin is refused (never opened, 1006)", refused.opened === false && refused.code === 1006,
      JSON.stringify(refused));
    await page3.close();
    foreign.close();

    // Log out in tab 1: tab 2's socket is closed 1008 and it asks to log in.
    await page.click("#logout");
    await waitFor("tab 2 asks to log in again after 1008", page2,
      () => document.getElementById("signin").innerText.includes("Signed out (1008 session_revoked)"));
    await waitLog("tab 2 log shows the 1008", "socket signed_out (1008 session_revoked)", page2);
    check("tab 2 cannot type after logout", await page2.locator("#msg").isDisabled());
    await page2.screenshot({ path: path.join(OUT_DIR, "demo-tab2-after-logout.png"), fullPage: true });
    await page.screenshot({ path: path.join(OUT_DIR, "demo-tab1-after-logout.png"), fullPage: true });

    console.log("\n#log contents at the end:");
    for (const l of (await logText()).split("\n")) console.log(`  | ${l}`);
    console.log("\npage socket frames (CDP/playwright):");
    for (const e of wsEvents) console.log(`  ${e}`);
    if (consoleLines.length) {
      console.log("\nbrowser console:");
      for (const l of consoleLines) console.log(`  ${l}`);
    }
  } finally {
    await browser.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  const failed = results.filter((r) => !r.ok);
  console.log(`\n${results.length - failed.length}/${results.length} checks passed; screenshots in ${OUT_DIR}`);
  process.exit(failed.length ? 1 : 0);
}, (e) => {
  console.error(`ERROR: ${e.stack || e}`);
  process.exit(2);
});
