//! The Lua scripts that make each read-then-write of the Redis store one
//! atomic step, and the record their answers decode to.

use std::sync::LazyLock;

use redis::Script;

use crate::session::SessionRecord;

/// Helpers shared by every session script. `KEYS[1]` is always the
/// session hash and `KEYS[2]` its socket entries (the default of
/// `entries`; [`USER_ATTACH`] names its own key). Timestamps are formatted
/// with `%d` because Lua would otherwise print large numbers in exponent
/// notation.
///
/// Socket entries are leased per *instance*, not per socket: an entry is
/// `<instance id>:<conn id>` scored with its attach time, and it counts
/// while its instance is alive. Which instances are alive the caller knows
/// from their heartbeats ([`HEARTBEAT`]) and passes in: `ARGV[1]` is the
/// freshness window (ms), `ARGV[2]` the number `k` of live instance ids in
/// `ARGV[3..2+k]`; a script's own arguments follow (`arg(1)`, ...). The
/// list travels as arguments because on a Cluster the heartbeats live in
/// another slot than the session. An entry of an instance not in the list
/// still counts while younger than the window (its instance may have
/// started after the caller last looked). Entries without `:` are
/// per-socket leases of an older gateway, scored with their expiry.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%d', x)
end
local BASE = 3 + tonumber(ARGV[2])
local function arg(i)
  return ARGV[BASE + i - 1]
end
local function entries(now, key)
  local live = {}
  for i = 3, BASE - 1 do live[ARGV[i]] = true end
  local fresh_after = now - tonumber(ARGV[1])
  local n, dead = 0, {}
  local all = redis.call('ZRANGE', key or KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    local m, score = all[i], tonumber(all[i + 1])
    local sep = string.find(m, ':', 1, true)
    local alive
    if sep then
      alive = live[string.sub(m, 1, sep - 1)] or score > fresh_after
    else
      alive = score > now
    end
    if alive then n = n + 1 else dead[#dead + 1] = m end
  end
  return n, dead
end
local function record(now)
  local f = redis.call('HMGET', KEYS[1], 'user', 'created_at', 'expires_at', 'attached')
  local live = entries(now)
  return {f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), live}
end
"#;

/// KEYS[3]: the abandoned marker. arg: user, ttl ms. Re-running it for
/// the same id (a retry after a lost reply) returns the session the first
/// run made instead of a second one.
///
/// Answers `false` once the id is marked abandoned: the gateway gave up on
/// this create (it answered `503`) and the repair queue wrote the marker
/// before deleting whatever the create made. A run that Redis only gets to
/// afterwards (it was queued on a connection while Redis was frozen, or its
/// packets were delayed) must not make a session nobody has a token for.
pub(super) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 1 then
  return record(now)
end
local exp = now + tonumber(arg(2))
redis.call('HSET', KEYS[1], 'user', arg(1), 'created_at', int(now),
  'expires_at', int(exp), 'attached', '0')
redis.call('PEXPIREAT', KEYS[1], int(exp))
return {arg(1), now, exp, 0, 0}
"#,
    )
});

pub(super) static GET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return record(now_ms())
"#,
    )
});

/// arg: ttl ms. The entry set's TTL slides too, or it would vanish before
/// the session it belongs to.
pub(super) static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local now = now_ms()
local exp = now + tonumber(arg(1))
redis.call('HSET', KEYS[1], 'expires_at', int(exp))
local rec = record(now)
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return rec
"#,
    )
});

/// KEYS[3]: tombstone. arg: channel, session id, nonce, tombstone ms.
/// Answers the session's user (for its user index) or `false` when it did
/// not exist. The tombstone holds `<nonce>:<user>`, so a retry after a lost
/// reply still learns that *it* ended the session, and whose it was.
pub(super) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local user = redis.call('HGET', KEYS[1], 'user')
if user then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], arg(3) .. ':' .. user, 'PX', arg(4))
  redis.call('PUBLISH', arg(1), arg(2))
  return user
end
local mine = arg(3) .. ':'
local kept = redis.call('GET', KEYS[3])
if kept and string.sub(kept, 1, #mine) == mine then
  return string.sub(kept, #mine + 1)
end
return false
"#,
    )
});

/// arg: entry (`<instance>:<conn>`), max per session, ttl ms. Returns 0
/// (not found), 1 (full) or the record. A connection that already holds an
/// entry (a retry) is not counted against the limit twice.
///
/// Every upgrade runs it, so its common path makes 7 calls and walks no
/// entries: below the limit it does not matter which entries are dead, so
/// only a session at its limit has its entries weighed (and the dead ones
/// removed: the next writer cleans them). The record's `connections` may
/// therefore count not yet cleaned entries of dead instances (the gate
/// reads only the expiry from it); `GET`'s never does. Redis's CPU per
/// upgrade is part of the gateway's cost (BENCHMARKS.md).
pub(super) static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local f = redis.call('HMGET', KEYS[1], 'user', 'created_at')
if not f[1] then return 0 end
local now = now_ms()
local max = tonumber(arg(2))
local live = redis.call('ZCARD', KEYS[2])
if live >= max then
  local dead
  live, dead = entries(now)
  -- In chunks: unpack is bounded by Lua's stack (about 8000 values).
  for i = 1, #dead, 1000 do
    redis.call('ZREM', KEYS[2], unpack(dead, i, math.min(i + 999, #dead)))
  end
  if live >= max and not redis.call('ZSCORE', KEYS[2], arg(1)) then
    return 1
  end
end
local exp = now + tonumber(arg(3))
live = live + redis.call('ZADD', KEYS[2], int(now), arg(1))
redis.call('HSET', KEYS[1], 'attached', '1', 'expires_at', int(exp))
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return {f[1], tonumber(f[2]), exp, 1, live}
"#,
    )
});

/// Takes a slot in a user's socket count (`server.max_connections_per_user`).
/// KEYS[1]: the user's socket entries, entries like a session's (member =
/// `<instance>:<conn>`, score = attach time, counted while the instance
/// lives; see [`PRELUDE`]), in the user's slot so this is one step on a
/// Cluster too. arg: entry, max per user, ttl ms. Returns 1 (taken; also
/// for an entry taken before: a retry) or 0 (full).
///
/// Like [`ATTACH`], below the limit it walks no entries: only a user at
/// the limit has them weighed and the dead ones removed. The key is kept
/// at least as long as the session the socket belongs to (a refresh of a
/// session prolongs it with [`KEEP_USER_CONNS`]), so it never expires
/// under a live socket and is never left without a TTL.
pub(super) static USER_ATTACH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
local max = tonumber(arg(2))
if redis.call('ZCARD', KEYS[1]) >= max and not redis.call('ZSCORE', KEYS[1], arg(1)) then
  local live, dead = entries(now, KEYS[1])
  for i = 1, #dead, 1000 do
    redis.call('ZREM', KEYS[1], unpack(dead, i, math.min(i + 999, #dead)))
  end
  if live >= max then return 0 end
end
redis.call('ZADD', KEYS[1], int(now), arg(1))
local until_ms = now + tonumber(arg(3))
if now + redis.call('PTTL', KEYS[1]) < until_ms then
  redis.call('PEXPIREAT', KEYS[1], int(until_ms))
end
return 1
"#,
    )
});

/// Keeps the user's socket entries (KEYS[1]) until at least `ARGV[1]`
/// (Unix ms): a refresh slid one of the user's sessions, whose sockets
/// must keep counting as long as it lives. A missing key stays missing.
pub(super) static KEEP_USER_CONNS: LazyLock<Script> = LazyLock::new(|| {
    user_script(
        r#"
keep_until(KEYS[1], tonumber(ARGV[1]))
return 1
"#,
    )
});

/// Keeps `attached` if a socket attached meanwhile (possibly on another
/// instance): the entry count and the write are one step.
pub(super) static MARK_IDLE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if entries(now_ms()) == 0 then
  redis.call('HSET', KEYS[1], 'attached', '0')
end
return 1
"#,
    )
});

/// An instance's heartbeat, the one store write an idle instance makes.
/// KEYS[1]: the instance set (one key, so one Cluster slot), member =
/// instance id, score = heartbeat expiry. ARGV: own id, lease ms. Drops
/// lapsed instances and answers `{now, existed, live ids}`: Redis's clock
/// (the gateway schedules expiry in it), whether the set existed before
/// this beat (if not, the others have not re-announced themselves yet and
/// the list is incomplete), and the live instances. The set expires with
/// the last heartbeat, so no key is ever left without a TTL.
pub(super) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local existed = redis.call('EXISTS', KEYS[1])
redis.call('ZADD', KEYS[1], string.format('%d', now + lease), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return {now, existed, redis.call('ZRANGE', KEYS[1], 0, -1)}
"#,
    )
});

/// Shared by the user-index scripts, which run in the user's slot (not a
/// session's): no session keys, no live-instance arguments.
const USER_PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function int(x)
  return string.format('%d', x)
end
local function keep_until(key, ms)
  if now + redis.call('PTTL', key) < ms then redis.call('PEXPIREAT', key, int(ms)) end
end
"#;

/// Reserves a slot in a user's index for a session about to be created.
/// KEYS[1]: the index (member = session id, score = until when it counts,
/// Unix ms), KEYS[2]: the user's abandoned ids (a set that expires a
/// marker's lifetime after its last write, so no clock is compared).
/// ARGV: session id, how long it counts (ms), the limit. Answers 1
/// (reserved; also for an id reserved before: a retry), 0 (the user is at
/// the limit) or -1 (the id was abandoned: this run came too late).
/// Expired members are dropped first, so the count is of live sessions.
pub(super) static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    user_script(
        r#"
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
  and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
local until_ms = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], int(until_ms), ARGV[1])
keep_until(KEYS[1], until_ms)
return 1
"#,
    )
});

/// A refresh slid a session: it counts until `ARGV[2]` (Unix ms) now.
/// KEYS[1]: the user index; ARGV: session id, until. Only an id already in
/// the index is moved (never re-added: a delete may have just removed it).
pub(super) static RECOUNT: LazyLock<Script> = LazyLock::new(|| {
    user_script(
        r#"
local was = redis.call('ZSCORE', KEYS[1], ARGV[1])
local until_ms = tonumber(ARGV[2])
if not was or tonumber(was) >= until_ms then return 0 end
redis.call('ZADD', KEYS[1], int(until_ms), ARGV[1])
keep_until(KEYS[1], until_ms)
return 1
"#,
    )
});

fn user_script(body: &str) -> Script {
    Script::new(&format!("{USER_PRELUDE}{body}"))
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// What the record-returning scripts answer: user, created ms, expires ms,
/// attached flag, live leases.
pub(super) type RawRecord = (String, i64, i64, i64, u32);

pub(super) fn to_record(
    id: &str,
    (user, created_ms, expires_ms, attached, live): RawRecord,
) -> SessionRecord {
    SessionRecord::from_store(id, user, (created_ms, expires_ms), attached == 1, live)
}
