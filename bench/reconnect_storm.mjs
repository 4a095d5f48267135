// Reconnect storm (issue 12, "Measure"): N clients of clients/js on one
// shared route, the gateway restarted under them; how long until all are
// back, the peak rate of accepted upgrades and of attempts, and every
// refusal by close code, for the client's backoff and for a fixed 1 s retry.
//
//   node --experimental-websocket bench/reconnect_storm.mjs \
//     [--bin target/release/portcullis] [--clients 5000] [--policy backoff|fixed]
//
// Starts (and stops) its own redis-server, a Python `websockets` echo
// runtime (PYTHONPATH target/deflate-py, as tests/deflate.rs) and the
// gateway, all on 127.0.0.1 free ports. Prints one JSON line.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PortcullisClient } from '../clients/js/portcullis.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const BIN = arg('bin', path.join(ROOT, 'target/release/portcullis'));
const N = Number(arg('clients', 5000));
const POLICY = arg('policy', 'backoff');
const WITHIN = Number(arg('within-ms', 120_000));

const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, ms, check) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return;
    await sleep(20);
  }
  throw new Error(`timed out: ${what}`);
}

const children = [];
process.on('exit', () => children.forEach((c) => c.kill('SIGKILL')));
const dir = mkdtempSync(path.join(tmpdir(), 'portcullis-storm-'));

const redisPort = await freePort();
children.push(spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], { stdio: 'ignore' }));

const runtime = spawn('python3', [path.join(ROOT, 'tests/support/deflate/runtime.py'), '--no-deflate'], {
  env: { ...process.env, PYTHONPATH: path.join(ROOT, 'target/deflate-py') },
  stdio: ['ignore', 'pipe', 'inherit'],
});
children.push(runtime);
const echoPort = await new Promise((resolve) => runtime.stdout.once('data', (d) => resolve(Number(String(d).split('\n')[0]))));

const PASSWORD = 'storm-password';
const hash = spawnSync(BIN, ['hash-password'], { input: `${PASSWORD}\n` }).stdout.toString().trim();
const port = await freePort();
const config = path.join(dir, 'portcullis.toml');
writeFileSync(
  config,
  `[server]
listen = "127.0.0.1:${port}"
allowed_origins = ["*"]
max_connections = 20000
max_connections_per_session = 20000
shutdown_grace_ms = 1000

[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:${redisPort}/0"
key_prefix = "storm"

[tokens]
algorithm = "HS256"
signing_key_env = "PORTCULLIS_SIGNING_KEY"

[auth]
kind = "static"
[[auth.users]]
username = "storm"
password_hash = "${hash}"

[[routes]]
name = "chat"
path = "/ws/chat"
upstreams = ["ws://127.0.0.1:${echoPort}/"]
mode = "shared"
`,
);
const base = `http://127.0.0.1:${port}`;
let gateway;
async function startGateway() {
  gateway = spawn(BIN, ['--config', config], {
    env: { ...process.env, PORTCULLIS_SIGNING_KEY: 'storm-signing-key-0123456789abcdef-0123456789', RUST_LOG: process.env.RUST_LOG ?? 'error' },
    stdio: ['ignore', 'ignore', process.env.STORM_LOG ? 'inherit' : 'ignore'],
  });
  children.push(gateway);
  await until('gateway up', 20000, () => fetch(`${base}/readyz`).then((r) => r.ok, () => false));
}
await until('redis up', 10000, () => new Promise((r) => {
  const s = createServer();
  s.once('error', () => r(true)); // the port is taken: redis listens
  s.listen(redisPort, '127.0.0.1', () => s.close(() => r(false)));
}));
await startGateway();

const login = await fetch(`${base}/api/auth/login`, {
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ username: 'storm', password: PASSWORD }),
});
const session = await login.json();

// Every client event after the restart, with its time.
const attempts = [];
const opens = [];
const refusals = {};
let measuring = false;
let openCount = 0;
const clients = [];
for (let i = 0; i < N; i++) {
  const c = new PortcullisClient({
    baseUrl: base,
    path: '/ws/chat',
    tokenStorage: null,
    sessionStorage: null,
    onState: (state, d) => {
      c.last = `${state} ${d?.code ?? ''} ${d?.error ?? d?.reason ?? ''}`;
      if (state === 'open') openCount += 1;
      if (!measuring) return;
      const t = Date.now();
      if (state === 'connecting') attempts.push(t);
      else if (state === 'open') opens.push(t);
      else if (state === 'waiting') {
        const key = `${d.code}${d.error ? ` ${d.error}` : ''}`;
        refusals[key] = (refusals[key] ?? 0) + 1;
      }
    },
  });
  if (POLICY === 'fixed') c.delay = () => 1000;
  c.adopt(session);
  clients.push(c);
}
// The first connection: in waves of 500, so the set-up is not the storm.
for (let i = 0; i < N; i += 500) {
  clients.slice(i, i + 500).forEach((c) => c.connect());
  await until('wave open', WITHIN, () => openCount >= Math.min(N, i + 500));
}
const open = () => clients.filter((c) => c.ws && c.hello).length;

// The restart: SIGTERM (sockets closed 1001), exit, start again.
measuring = true;
const killedAt = Date.now();
gateway.kill('SIGTERM');
await new Promise((r) => gateway.once('exit', r));
const downAt = Date.now();
// Restarted at once, as a supervisor would: clients that have not noticed
// yet reconnect into the new process.
await startGateway();
const readyAt = Date.now();
await until('all clients back', WITHIN, () => open() === N).catch((e) => {
  const last = {};
  for (const c of clients) last[c.last] = (last[c.last] ?? 0) + 1;
  console.error(JSON.stringify({ refusals, last }));
  throw e;
});
const backAt = Date.now();

const peak = (ts) => {
  const per = {};
  for (const t of ts) per[Math.floor(t / 1000)] = (per[Math.floor(t / 1000)] ?? 0) + 1;
  return Math.max(0, ...Object.values(per));
};
const peak100 = (ts) => {
  const per = {};
  for (const t of ts) per[Math.floor(t / 100)] = (per[Math.floor(t / 100)] ?? 0) + 1;
  return Math.max(0, ...Object.values(per)) * 10;
};
console.log(
  JSON.stringify({
    policy: POLICY,
    clients: N,
    gateway_down_ms: readyAt - downAt,
    all_back_after_ready_ms: backAt - readyAt,
    all_back_after_kill_ms: backAt - killedAt,
    attempts: attempts.length,
    peak_upgrades_per_s: peak(opens),
    peak_upgrades_per_s_100ms: peak100(opens),
    peak_attempts_per_s: peak(attempts),
    refusals_by_code: refusals,
  }),
);
clients.forEach((c) => c.close());
gateway.kill('SIGTERM');
await sleep(200);
rmSync(dir, { recursive: true, force: true });
process.exit(0);
