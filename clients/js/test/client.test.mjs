// node --test: the client against the real gateway binary and real
// runtimes, started by tests/js_client.rs, which passes:
//   PORTCULLIS_URL          gateway on Redis: /ws/echo (exclusive),
//                           /ws/agent (shared, replay 4096), /ws/dead (no runtime)
//   PORTCULLIS_LIMITED_URL  gateway on memory, one socket per session: /ws/echo
//   PORTCULLIS_CONTROL      http://.../redis/pause | /redis/resume
//   PORTCULLIS_SIGNING_KEY  the HS256 key (kid k1), for an expired token
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { PortcullisClient } from '../portcullis.js';

const URL_ = process.env.PORTCULLIS_URL;
const LIMITED = process.env.PORTCULLIS_LIMITED_URL;
const CONTROL = process.env.PORTCULLIS_CONTROL;
const KEY = process.env.PORTCULLIS_SIGNING_KEY;
const PASSWORD = 'correct horse battery staple';

/** Resolves with the first value `check` returns truthy, checked on every event; rejects after `ms`. */
function until(what, ms, subscribe) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    subscribe((v) => {
      clearTimeout(t);
      resolve(v);
    });
  });
}

/** A client whose events are recorded; `wait(kind)` awaits the next one. */
function client(base, path, extra = {}) {
  const events = [];
  const waiters = [];
  const push = (kind, v) => {
    events.push({ kind, v, at: Date.now() });
    for (const w of waiters.splice(0)) if (!w(kind, v)) waiters.push(w);
  };
  const c = new PortcullisClient({
    baseUrl: base,
    path,
    sessionStorage: null,
    tokenStorage: null,
    onState: (s, d) => push(s, d),
    onRelogin: (why) => push('relogin', why),
    onGap: (g) => push('gap', g),
    onRole: (r) => push('role', r),
    ...extra,
  });
  c.events = events;
  c.wait = (kind, ms = 10000, pred = () => true) =>
    until(`${path}: ${kind}`, ms, (done) =>
      waiters.push((k, v) => {
        if (k === kind && pred(v)) {
          done(v);
          return true;
        }
        return false;
      }),
    );
  return c;
}

function b64url(s) {
  return Buffer.from(s).toString('base64url');
}

function expiredToken(sid) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT', kid: 'k1' }));
  const body = b64url(
    JSON.stringify({ sub: 'alice', sid, iat: now - 1000, exp: now - 120, iss: 'portcullis', aud: 'runtimes', jti: 'x' }),
  );
  const sig = createHmac('sha256', KEY).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

const far = () => new Date(Date.now() + 3600e3).toISOString();

/** A raw socket with the contract: the close code and the JSON reason. */
function rawClose(url) {
  return until(`close of ${url}`, 10000, (done) => {
    const ws = new WebSocket(url);
    ws.onclose = (ev) => done({ code: ev.code, reason: ev.reason ? JSON.parse(ev.reason) : null });
  });
}

test('every refusal reason arrives as a code', async () => {
  // missing_token: the client itself never opens without a session, so a
  // raw socket asks.
  assert.deepEqual(await rawClose(`${URL_.replace('http', 'ws')}/ws/echo?portcullis=v1`), {
    code: 4403,
    reason: { error: 'missing_token' },
  });

  const asRelogin = async (session, error) => {
    const c = client(URL_, '/ws/echo');
    c.adopt(session);
    c.connect();
    const why = await c.wait('relogin');
    assert.equal(why.code, 4403);
    assert.equal(why.error, error);
    c.close();
  };
  await asRelogin({ session_id: 'x', session_token: 'not.a.jwt', expires_at: far() }, 'invalid_token');
  const live = client(URL_, '/ws/echo');
  const s = await live.login('alice', PASSWORD);
  await asRelogin({ ...s, session_token: expiredToken(s.session_id) }, 'token_expired');
  const ended = await new PortcullisClient({ baseUrl: URL_, path: '/', tokenStorage: null }).login('alice', PASSWORD);
  await fetch(`${URL_}/api/auth/logout`, { method: 'POST', headers: { authorization: `Bearer ${ended.session_token}` } });
  await asRelogin(ended, 'session_not_found');

  // Retry later: upstream_unavailable, too_many_connections.
  const dead = client(URL_, '/ws/dead');
  dead.adopt(s);
  dead.connect();
  const w = await dead.wait('waiting');
  assert.deepEqual([w.code, w.error, w.retryAfter], [4502, 'upstream_unavailable', 1]);
  dead.close();

  const first = client(LIMITED, '/ws/echo');
  const ls = await first.login('alice', PASSWORD);
  first.connect();
  await first.wait('open');
  const second = client(LIMITED, '/ws/echo');
  second.adopt(ls);
  second.connect();
  const full = await second.wait('waiting');
  assert.deepEqual([full.code, full.error, full.retryAfter], [4503, 'too_many_connections', 1]);
  second.close();
  first.close();
  live.close();
});

test('after a 4403 no handshake until the user logs in again', async () => {
  const c = client(URL_, '/ws/echo');
  const s = await c.login('alice', PASSWORD);
  await fetch(`${URL_}/api/auth/logout`, { method: 'POST', headers: { authorization: `Bearer ${s.session_token}` } });
  c.connect();
  await c.wait('relogin');
  assert.equal(c.handshakes, 1);
  // Absence can only be watched for a while: three seconds, six times the
  // first backoff step.
  await new Promise((r) => setTimeout(r, 3000));
  assert.equal(c.handshakes, 1, 'no handshake after 4403');
  await c.login('alice', PASSWORD);
  const hello = await c.wait('open');
  assert.equal(hello.type, 'portcullis.hello');
  assert.equal(c.handshakes, 2);
  c.close();
});

test('Redis stopped for 10 s: bounded attempts, back within 2 s of its return', async () => {
  const c = client(URL_, '/ws/echo');
  await c.login('alice', PASSWORD);
  c.connect();
  await c.wait('open');
  await fetch(`${CONTROL}/redis/pause`);
  const before = c.handshakes;
  c.reconnect();
  const w = await c.wait('waiting', 10000);
  assert.deepEqual([w.code, w.error], [4503, 'session_store_unavailable']);
  await new Promise((r) => setTimeout(r, 10000 - (Date.now() - c.events.at(-1).at)));
  const reopened = c.wait('open', 10000);
  await fetch(`${CONTROL}/redis/resume`);
  const back = Date.now();
  await reopened;
  const took = Date.now() - back;
  const attempts = c.handshakes - before;
  console.log(`redis outage: ${attempts} handshakes, open ${took} ms after Redis returned`);
  assert.ok(attempts <= 8, `${attempts} attempts`);
  assert.ok(took <= 2000, `reopened ${took} ms after Redis returned`);
  c.close();
});

test('10,000 runtime frames with seeded random disconnects arrive once, in order', async () => {
  let seed = 0x5eed1234n;
  const rand = (below) => {
    // xorshift64*, as tests/shared.rs
    seed ^= seed >> 12n;
    seed ^= (seed << 25n) & 0xffffffffffffffffn;
    seed ^= seed >> 27n;
    return Number(((seed * 0x2545f4914f6cdd1dn) & 0xffffffffffffffffn) % BigInt(below));
  };
  const got = [];
  let untilDrop = 1 + rand(800);
  let reconnects = 0;
  const c = client(URL_, '/ws/agent', {
    onMessage: (data) => {
      got.push(Number(data));
      untilDrop -= 1;
      if (untilDrop === 0 && got.length < 10000) {
        untilDrop = 1 + rand(800);
        reconnects += 1;
        c.reconnect();
      }
    },
  });
  await c.login('alice', PASSWORD);
  c.connect();
  await c.wait('open');
  assert.equal(c.role, 'owner');
  c.send('stream:10000:5');
  await until('10,000 frames', 60000, (done) => {
    const t = setInterval(() => {
      if (got.length >= 10000) {
        clearInterval(t);
        done();
      }
    }, 20);
  });
  assert.ok(reconnects >= 10, `only ${reconnects} reconnects`);
  assert.equal(got.length, 10000);
  got.forEach((n, i) => assert.equal(n, i, `frame ${i}`));
  assert.equal(c.events.filter((e) => e.kind === 'gap').length, 0);
  c.close();
});

test('backoff: full jitter under a ceiling, retry_after honoured', () => {
  const c = new PortcullisClient({ baseUrl: 'http://x', path: '/', random: () => 0.999, tokenStorage: null });
  assert.ok(c.delay(0) < 500);
  assert.ok(c.delay(40) <= 15000, 'no overflow, ceiling holds');
  assert.ok(c.delay(3, 2) <= 2000 && c.delay(3, 2) >= 1500);
  const zero = new PortcullisClient({ baseUrl: 'http://x', path: '/', random: () => 0, tokenStorage: null });
  assert.equal(zero.delay(5), 0);
  assert.equal(zero.delay(5, 2), 1500);
});

test('the gateway serves this module at /portcullis.js', async () => {
  const r = await fetch(`${URL_}/portcullis.js`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/javascript/);
  const here = await readFile(new URL('../portcullis.js', import.meta.url), 'utf8');
  assert.equal(await r.text(), here);
});
