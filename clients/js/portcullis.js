// Portcullis browser client (SPEC §9). One dependency-free ES module for
// browsers and Node >= 20 (global fetch and WebSocket; on Node 20 run with
// --experimental-websocket or pass `WebSocket`). Served by the gateway at
// /portcullis.js.
//
// What it promises, and why:
// - no socket before a session exists: a socket without a token is a
//   refusal, and a page that retries refusals is a reconnect storm;
// - the token travels in the `bearer` subprotocol, never in a URL (URLs end
//   up in logs and history);
// - 4403/1008 mean "log in again": it stops and calls `onRelogin`, never
//   retrying blindly;
// - 4502/4503/1013/1012/1001/1006 (and 1014/1011) mean "later": full-jitter
//   exponential backoff, capped (no max-attempts cliff), a server's
//   `retry_after` respected, paused while the browser is offline;
// - shared routes: frames are counted from `hello.seq` and a reconnect asks
//   for `resume_from`, so the application sees every runtime frame once,
//   across reconnects, reloads (the count lives in sessionStorage) and
//   gateway instances, and is told when a gap happened.

const RELOGIN = new Set([4403, 1008]);
const RETRY = new Set([4502, 4503, 1013, 1012, 1001, 1006, 1014, 1011]);
const HELLO = '{"type":"portcullis.hello"';
const ROLE = '{"type":"portcullis.role"';

/**
 * @typedef {object} Session
 * @property {string} session_id
 * @property {string} session_token
 * @property {string} expires_at       the token's expiry (RFC 3339)
 * @property {string} session_expires_at
 * @property {string} user
 */

/**
 * @typedef {object} Options
 * @property {string} [baseUrl]   the gateway's origin; default: the page's
 * @property {string} path        the route path, e.g. "/ws/agent"
 * @property {(why: {code: number, reason: string}) => void} [onRelogin]
 *   the session is gone or refused: ask the user to log in again
 * @property {(data: string|ArrayBuffer|Blob, seq: number|null) => void} [onMessage]
 *   a runtime frame (seq: its number on shared routes)
 * @property {(role: {role: "owner"|"reader", ownerPresent: boolean}) => void} [onRole]
 * @property {(gap: {expected: number, got: number}) => void} [onGap]
 *   frames were lost (they left the replay buffer) before `got`
 * @property {(state: string, detail?: object) => void} [onState]
 *   "connecting" | "open" | "waiting" | "offline" | "signed_out" | "closed"
 * @property {(hello: object) => void} [onHello]
 * @property {number} [baseDelayMs]   backoff base (default 500)
 * @property {number} [maxDelayMs]    backoff ceiling (default 15000)
 * @property {number} [openTimeoutMs] a handshake not done by then is given up (default 15000)
 * @property {Storage|null} [sessionStorage]  where the frame count is kept
 * @property {Storage|null} [tokenStorage]    where the session is kept, so
 *   other tabs of the page share it (default: localStorage when present)
 * @property {typeof WebSocket} [WebSocket]
 * @property {typeof fetch} [fetch]
 * @property {() => number} [random]  for seeded tests
 */

export class PortcullisError extends Error {
  /** @param {number} status @param {string} code @param {number|null} retryAfter */
  constructor(status, code, retryAfter) {
    super(`${status} ${code}`);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function store(kind) {
  try {
    const s = globalThis[kind];
    return s && typeof s.getItem === 'function' ? s : null;
  } catch {
    return null; // sandboxed iframes throw on access
  }
}

export class PortcullisClient {
  /** @param {Options} opts */
  constructor(opts) {
    this.opts = opts;
    this.base = opts.baseUrl ?? globalThis.location?.origin ?? '';
    this.fetch = opts.fetch ?? globalThis.fetch.bind(globalThis);
    this.WS = opts.WebSocket ?? globalThis.WebSocket;
    this.random = opts.random ?? Math.random;
    this.baseDelay = opts.baseDelayMs ?? 500;
    this.maxDelay = opts.maxDelayMs ?? 15000;
    this.openTimeout = opts.openTimeoutMs ?? 15000;
    this.counts = opts.sessionStorage !== undefined ? opts.sessionStorage : store('sessionStorage');
    this.tokens = opts.tokenStorage !== undefined ? opts.tokenStorage : store('localStorage');
    /** @type {Session|null} */
    this.session = null;
    /** @type {WebSocket|null} */
    this.ws = null;
    this.wanted = false; // the application asked for a socket
    this.attempt = 0;
    this.timer = null;
    this.refreshTimer = null;
    this.role = null;
    this.ownerPresent = null;
    this.mode = null;
    this.handshakes = 0; // sockets opened, for tests and metrics
    this.next = null; // shared: number of the next runtime frame
    this.hello = null;
    const saved = this.tokens?.getItem('portcullis.session');
    if (saved) {
      try {
        this.adopt(JSON.parse(saved));
      } catch {
        this.tokens.removeItem('portcullis.session');
      }
    }
    this.onOnline = () => {
      if (this.wanted && !this.ws) this.schedule(0);
    };
    globalThis.addEventListener?.('online', this.onOnline);
  }

  get countKey() {
    return `portcullis.next:${this.session?.session_id}:${this.opts.path}`;
  }

  emit(name, ...args) {
    const f = this.opts[name];
    if (typeof f === 'function') f(...args);
  }

  state(s, detail) {
    this.emit('onState', s, detail);
  }

  /** Takes a session (from login, refresh, or another tab). */
  adopt(session) {
    // Another session is another conversation: its frames count afresh.
    if (this.session?.session_id !== session.session_id) this.next = null;
    this.session = session;
    this.tokens?.setItem('portcullis.session', JSON.stringify(session));
    clearTimeout(this.refreshTimer);
    // Refresh at 80% of the token's life: late enough to be cheap, early
    // enough that a slow or failed attempt can be retried before expiry.
    const left = Date.parse(session.expires_at) - Date.now();
    if (Number.isFinite(left)) {
      this.refreshTimer = setTimeout(() => this.refresh().catch(() => {}), Math.max(1000, left * 0.8));
      this.refreshTimer.unref?.();
    }
  }

  async api(path, body, token) {
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await this.fetch(this.base + path, {
      method: 'POST',
      headers,
      body: body ? JSON.stringify(body) : undefined,
      credentials: 'same-origin',
    });
    if (r.status === 204) return null;
    const json = await r.json().catch(() => ({}));
    if (!r.ok) {
      const ra = Number(r.headers.get('retry-after'));
      throw new PortcullisError(r.status, json.error ?? 'error', Number.isFinite(ra) && ra > 0 ? ra : null);
    }
    return json;
  }

  /** Logs in; the socket (if `connect` was called) opens once it succeeds. */
  async login(username, password) {
    this.adopt(await this.api('/api/auth/login', { username, password }));
    if (this.wanted && !this.ws) this.schedule(0);
    return this.session;
  }

  /** A new token for the same session; its TTL slides. */
  async refresh() {
    if (!this.session) throw new PortcullisError(401, 'missing_token', null);
    try {
      this.adopt(await this.api('/api/auth/refresh', null, this.session.session_token));
    } catch (e) {
      if (e.status === 401) this.signedOut({ code: 4403, reason: JSON.stringify({ error: e.code }) });
      throw e;
    }
    return this.session;
  }

  /** Ends the session everywhere: every socket of it closes 1008. */
  async logout() {
    const s = this.session;
    this.wanted = false;
    this.forget();
    if (s) await this.api('/api/auth/logout', null, s.session_token).catch(() => {});
    this.closeSocket(1000);
    this.state('signed_out', { code: 1000, reason: 'logout' });
  }

  forget() {
    clearTimeout(this.refreshTimer);
    clearTimeout(this.timer);
    if (this.session) this.counts?.removeItem(this.countKey);
    this.session = null;
    this.tokens?.removeItem('portcullis.session');
  }

  /** Keeps a socket open from now on (once a session exists). */
  connect() {
    this.wanted = true;
    if (this.session && !this.ws && !this.timer) this.schedule(0);
  }

  /** Closes the socket and stops reconnecting; the session stays. */
  disconnect() {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
    this.closeSocket(1000);
    this.state('closed');
  }

  /**
   * Drops the socket and opens a new one at once (the network changed, a
   * page came back from the background): shared routes resume where they
   * were, nothing lost or doubled.
   */
  reconnect() {
    this.closeSocket(1000);
    if (this.wanted) this.schedule(0);
  }

  /** Sends to the runtime; false when no socket is open. */
  send(data) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(data);
    return true;
  }

  close() {
    this.disconnect();
    clearTimeout(this.refreshTimer);
    globalThis.removeEventListener?.('online', this.onOnline);
  }

  closeSocket(code) {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = null;
      try {
        ws.close(code);
      } catch {
        /* already closing */
      }
    }
  }

  /** Waits `ms`, then opens (unless offline, signed out or unwanted). */
  schedule(ms) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.open();
    }, ms);
  }

  /**
   * The wait before attempt `n` (0-based): full jitter, uniform in
   * [0, min(ceiling, base * 2^n)] (AWS "Exponential Backoff And Jitter"),
   * so a restarted gateway sees its clients spread out instead of in
   * waves. A server's `retry_after` (seconds) replaces it with the last
   * quarter of that window, [0.75, 1] * retry_after: still spread, and
   * never later than the server said it would be ready.
   */
  delay(n, retryAfter) {
    if (retryAfter) return retryAfter * 1000 * (0.75 + 0.25 * this.random());
    return this.random() * Math.min(this.maxDelay, this.baseDelay * 2 ** Math.min(n, 30));
  }

  url() {
    const u = new URL(this.opts.path, this.base.replace(/^http/, 'ws'));
    u.searchParams.set('portcullis', 'v1');
    const saved = this.counts?.getItem(this.countKey);
    const next = this.next ?? (saved != null ? Number(saved) : null);
    if (next != null && Number.isFinite(next)) u.searchParams.set('resume_from', String(next));
    return u.toString();
  }

  open() {
    if (!this.wanted || this.ws || !this.session) return;
    if (globalThis.navigator?.onLine === false) {
      this.state('offline');
      return; // `online` reschedules
    }
    this.state('connecting', { attempt: this.attempt });
    this.handshakes += 1;
    // Browsers send the subprotocol list as `Sec-WebSocket-Protocol:
    // bearer, <token>`; the gateway answers `bearer` and never forwards it.
    const ws = new this.WS(this.url(), ['bearer', this.session.session_token]);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.hello = null;
    ws.onmessage = (ev) => this.message(ev.data);
    ws.onclose = (ev) => this.closed(ev.code, ev.reason);
    // A socket that fails before the hello is a 1006 whether or not a
    // close event follows (Node 20's WebSocket sometimes reports only the
    // error), and one that hangs in the handshake (a half-open path) is
    // given up after `openTimeoutMs`: either way the backoff goes on.
    const failed = () => {
      if (this.ws === ws && this.hello === null) {
        this.closeSocket(1000);
        this.closed(1006, '');
      }
    };
    ws.onerror = failed;
    const hung = setTimeout(failed, this.openTimeout);
    hung.unref?.();
    ws.addEventListener?.('message', () => clearTimeout(hung), { once: true });
  }

  message(data) {
    if (this.hello === null) {
      if (typeof data === 'string' && data.startsWith(HELLO)) return this.greet(JSON.parse(data));
      // A gateway without the contract: every frame is the runtime's.
      this.hello = { mode: 'exclusive' };
    }
    if (this.mode === 'shared' && typeof data === 'string' && data.startsWith(ROLE)) {
      const r = JSON.parse(data);
      this.setRole(r.role, r.owner_present);
      return;
    }
    let seq = null;
    if (this.mode === 'shared') {
      seq = this.next;
      this.next += 1;
      this.counts?.setItem(this.countKey, String(this.next));
    }
    this.emit('onMessage', data, seq);
  }

  greet(h) {
    this.hello = h;
    this.mode = h.mode;
    this.attempt = 0;
    if (h.mode === 'shared') {
      const saved = this.counts?.getItem(this.countKey);
      const expected = this.next ?? (saved != null ? Number(saved) : null);
      if (h.resume === 'gap' || (expected != null && h.seq > expected)) {
        this.emit('onGap', { expected, got: h.seq });
      }
      this.next = h.seq;
      this.counts?.setItem(this.countKey, String(this.next));
      // A reader learns whether anyone writes from the role frame the
      // gateway sends right behind the hello.
      this.setRole(h.role, h.role === 'owner' ? true : null);
    }
    this.state('open', h);
    this.emit('onHello', h);
  }

  setRole(role, ownerPresent) {
    this.role = role;
    this.ownerPresent = ownerPresent;
    this.emit('onRole', { role, ownerPresent });
  }

  closed(code, reason) {
    this.ws = null;
    let why = {};
    try {
      why = reason ? JSON.parse(reason) : {};
    } catch {
      why = { error: reason };
    }
    if (RELOGIN.has(code)) return this.signedOut({ code, reason, error: why.error });
    if (!this.wanted) return;
    if (!RETRY.has(code)) {
      this.wanted = false;
      this.state('closed', { code, reason });
      return;
    }
    const ms = this.delay(this.attempt, why.retry_after);
    this.attempt += 1;
    this.state('waiting', { code, reason, error: why.error, retryAfter: why.retry_after ?? null, delayMs: ms });
    this.schedule(ms);
  }

  /** No handshake until a session exists again; `connect()` stays wanted,
   * so a later `login` reopens the socket. */
  signedOut(why) {
    clearTimeout(this.timer);
    this.timer = null;
    this.closeSocket(1000);
    this.forget();
    this.next = null;
    this.state('signed_out', why);
    this.emit('onRelogin', why);
  }
}
