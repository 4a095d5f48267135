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

    const logText = () => page.locator("#log").innerText();
    const waitLog = async (name, needle) => {
      try {
        await page.waitForFunction(
          (n) => document.getElementById("log").innerText.includes(n), needle, { timeout: WAIT_MS });
        const line = (await logText()).split("\n").find((l) => l.includes(needle));
        check(name, true, `log line: ${JSON.stringify(line)}`);
        return true;
      } catch (e) {
        check(name, false, `not seen within ${WAIT_MS} ms; log: ${JSON.stringify(await logText())}`);
        return false;
      }
    };

    // Extra: a wrong password is refused and reported in the log.
    await page.fill("#username", demo.user);
    await page.fill("#password", "definitely-wrong");
    await page.click("#login button");
    await waitLog("wrong password refused", "login refused: 401");

    // Log in.
    await page.fill("#password", demo.pass);
    const loginResp = page.waitForResponse((r) => r.url().endsWith("/api/auth/login"), { timeout: WAIT_MS });
    await page.click("#login button");
    const lr = await loginResp;
    const loginBody = await lr.json().catch(() => ({}));
    check("login accepted", lr.status() === 200 && !!loginBody.session_token, `status ${lr.status()}, session ${loginBody.session_id}`);
    const token = loginBody.session_token;
    await waitLog("socket open", "socket open");
    check("#who shows the session", /session .+ for /.test(await page.locator("#who").innerText()),
      JSON.stringify(await page.locator("#who").innerText()));
    check("chat enabled after open", !(await page.locator("#msg").isDisabled()) && !(await page.locator("#send").isDisabled()));

    // Negotiated protocol of the page's own socket, from the handshake response.
    const hs = handshakes[0];
    const hsProto = hs && Object.entries(hs.headers).find(([k]) => k.toLowerCase() === "sec-websocket-protocol");
    check("page socket handshake: 101 with Sec-WebSocket-Protocol bearer",
      !!hs && hs.status === 101 && hsProto && hsProto[1] === "bearer",
      hs ? `status ${hs.status}, Sec-WebSocket-Protocol ${JSON.stringify(hsProto && hsProto[1])}` : "no handshake seen");

    // Chat.
    await page.fill("#msg", MESSAGE);
    await page.click("#send");
    await waitLog("you: line", `you: ${MESSAGE}`);
    await waitLog("echo received", `runtime: ${MESSAGE}`);
    check("input cleared after send", (await page.locator("#msg").inputValue()) === "");
    await page.screenshot({ path: path.join(OUT_DIR, "demo.png"), fullPage: true });

    // A second socket from the browser with the same token: ws.protocol on open.
    const probe = await page.evaluate(({ token, ms }) => new Promise((resolve) => {
      const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/echo`;
      const ws = new WebSocket(url, ["bearer", token]);
      const t = setTimeout(() => resolve({ error: "timeout" }), ms);
      ws.onopen = () => {
        clearTimeout(t);
        // Keep it open: it should be closed by the logout too.
        window.__probe = { closed: null };
        ws.onclose = (ev) => { window.__probe.closed = { code: ev.code, reason: ev.reason }; };
        resolve({ protocol: ws.protocol });
      };
      ws.onerror = () => {};
      ws.onclose = (ev) => { clearTimeout(t); resolve({ closedBeforeOpen: { code: ev.code, reason: ev.reason } }); };
    }), { token, ms: WAIT_MS });
    check("ws.protocol of a browser WebSocket is \"bearer\"", probe.protocol === "bearer", JSON.stringify(probe));

    // Log out: the page's socket must be closed by the gate with 1008 session_revoked.
    await page.click("#logout");
    await waitLog("socket closed 1008 session_revoked", "socket closed 1008 session_revoked");
    check("#who says logged out", (await page.locator("#who").innerText()) === "logged out");
    check("chat disabled after close",
      (await page.locator("#msg").isDisabled()) && (await page.locator("#send").isDisabled()) && (await page.locator("#logout").isDisabled()));
    try {
      await page.waitForFunction(() => window.__probe && window.__probe.closed, null, { timeout: WAIT_MS });
      const pc = await page.evaluate(() => window.__probe.closed);
      check("probe socket also closed by logout", pc.code === 1008 && pc.reason === "session_revoked", JSON.stringify(pc));
    } catch {
      check("probe socket also closed by logout", false, "still open");
    }
    await page.screenshot({ path: path.join(OUT_DIR, "demo-after-logout.png"), fullPage: true });

    // Extra: the revoked token no longer opens a socket.
    const after = await page.evaluate(({ token, ms }) => new Promise((resolve) => {
      const ws = new WebSocket(`ws://${location.host}/ws/echo`, ["bearer", token]);
      const t = setTimeout(() => resolve({ error: "timeout" }), ms);
      ws.onopen = () => { clearTimeout(t); ws.close(); resolve({ opened: true, protocol: ws.protocol }); };
      ws.onclose = (ev) => { clearTimeout(t); resolve({ opened: false, code: ev.code }); };
    }), { token, ms: WAIT_MS });
    check("revoked token cannot open a socket", after.opened === false, JSON.stringify(after));

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
