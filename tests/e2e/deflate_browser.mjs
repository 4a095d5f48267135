// Drives headless Chromium through tests/e2e/deflate_page.html for
// tests/deflate_browser.rs, which serves the page, runs the gateway and the
// runtimes, and judges the outcome (this script only reports it).
//
// Environment (set by the Rust test):
//   PAGE_URL         the page, with ?paths=/ws/a,/ws/b
//   LOGIN_USER, LOGIN_PASS
//   PLAYWRIGHT_DIR   directory whose node_modules holds playwright-core
//   CHROMIUM         browser binary; browsers are never downloaded
//   OUT_DIR          where the screenshot goes
//   WAIT_MS          bound on every wait (default 20000)
//
// Prints one line `RESULT <json>`: the page's per-socket results and, from
// the DevTools protocol, each socket's handshake (Chromium's
// Sec-WebSocket-Extensions offer and the 101's answer). Exit 0 when the page
// finished, 2 when a step failed or timed out (after a screenshot).

import { createRequire } from "node:module";
import path from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const WAIT_MS = Number(process.env.WAIT_MS || 20000);
const OUT_DIR = env("OUT_DIR");
const require = createRequire(path.join(env("PLAYWRIGHT_DIR"), "package.json"));
const { chromium } = require("playwright-core");

const header = (headers, name) => {
  const e = Object.entries(headers || {}).find(([k]) => k.toLowerCase() === name);
  return e ? e[1] : null;
};

async function main() {
  const url = new URL(env("PAGE_URL"));
  if (url.hostname !== "127.0.0.1") throw new Error(`refusing to open ${url.hostname}: loopback only`);
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM"),
    headless: true,
    timeout: WAIT_MS * 3,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const shot = path.join(OUT_DIR, "deflate-browser.png");
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
    page.setDefaultTimeout(WAIT_MS);
    const consoleLines = [];
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

    const cdp = await page.context().newCDPSession(page);
    await cdp.send("Network.enable");
    const sockets = new Map();
    const sock = (id) => sockets.get(id) || sockets.set(id, {}).get(id);
    cdp.on("Network.webSocketCreated", (e) => { sock(e.requestId).url = e.url; });
    cdp.on("Network.webSocketWillSendHandshakeRequest", (e) => {
      sock(e.requestId).offer = header(e.request.headers, "sec-websocket-extensions");
    });
    cdp.on("Network.webSocketHandshakeResponseReceived", (e) => {
      const s = sock(e.requestId);
      s.status = e.response.status;
      s.answer = header(e.response.headers, "sec-websocket-extensions");
    });

    try {
      const resp = await page.goto(url.href);
      if (!resp || resp.status() !== 200) throw new Error(`page answered ${resp && resp.status()}`);
      await page.fill("#username", env("LOGIN_USER"));
      await page.fill("#password", env("LOGIN_PASS"));
      await page.click("#login-btn");
      await page.waitForFunction(() => window.__done === true, null, { timeout: WAIT_MS });
    } finally {
      await page.screenshot({ path: shot, fullPage: true }).catch((e) => consoleLines.push(`screenshot: ${e.message}`));
      const results = await page.evaluate(() => window.__results).catch(() => null);
      console.log(`RESULT ${JSON.stringify({
        results, handshakes: [...sockets.values()], console: consoleLines, screenshot: shot,
      })}`);
    }
  } finally {
    await browser.close().catch(() => {});
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(`ERROR: ${e.stack || e}`);
  process.exit(2);
});
