//! The Lua scripts that make each read-then-write of the Redis store one
//! atomic step, and the record their answers decode to.

use std::sync::LazyLock;

use redis::Script;

use crate::session::SessionRecord;

/// Helpers shared by every script. `KEYS[1]` is always the session hash and
/// `KEYS[2]` the lease set. Timestamps are formatted with `%d` because Lua
/// would otherwise print large numbers in exponent notation.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%d', x)
end
local function record(now)
  local f = redis.call('HMGET', KEYS[1], 'user', 'created_at', 'expires_at', 'attached')
  local live = redis.call('ZCOUNT', KEYS[2], '(' .. int(now), '+inf')
  return {f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), live}
end
"#;

/// ARGV: user, ttl ms. Re-running it for the same id (a retry after a lost
/// reply) returns the session the first run made instead of a second one.
pub(super) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 1 then
  return record(now)
end
local exp = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'created_at', int(now),
  'expires_at', int(exp), 'attached', '0')
redis.call('PEXPIREAT', KEYS[1], int(exp))
return {ARGV[1], now, exp, 0, 0}
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

/// ARGV: ttl ms. The lease set's TTL slides too, or it would vanish before
/// the session it belongs to.
pub(super) static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local now = now_ms()
local exp = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'expires_at', int(exp))
local rec = record(now)
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return rec
"#,
    )
});

/// KEYS[3]: tombstone. ARGV: channel, session id, nonce, tombstone ms. The
/// tombstone holds this call's nonce, so a retry after a lost reply still
/// learns that *it* ended the session.
pub(super) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 1
end
if redis.call('GET', KEYS[3]) == ARGV[3] then return 1 end
return 0
"#,
    )
});

/// ARGV: conn id, lease ms, max per session, ttl ms. Returns 0 (not found),
/// 1 (full) or the record. A connection that already holds a lease (a
/// retry) is not counted against the limit a second time.
///
/// Every upgrade runs it, so it makes as few calls as it can (8; the record
/// is assembled from what it already read): Redis's CPU per upgrade is part
/// of the gateway's cost (BENCHMARKS.md).
pub(super) static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local f = redis.call('HMGET', KEYS[1], 'user', 'created_at')
if not f[1] then return 0 end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
local live = redis.call('ZCARD', KEYS[2])
if live >= tonumber(ARGV[3]) and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 1
end
local exp = now + tonumber(ARGV[4])
live = live + redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[2])), ARGV[1])
redis.call('HSET', KEYS[1], 'attached', '1', 'expires_at', int(exp))
redis.call('PEXPIREAT', KEYS[1], int(exp))
redis.call('PEXPIREAT', KEYS[2], int(exp))
return {f[1], tonumber(f[2]), exp, 1, live}
"#,
    )
});

/// ARGV: lease ms, conn ids. `XX`: a lease that was already released stays
/// released.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local exp = int(now_ms() + tonumber(ARGV[1]))
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', exp, ARGV[i])
end
return 1
"#,
    )
});

/// Keeps `attached` if a socket attached meanwhile (possibly on another
/// instance): the lease check and the write are one step.
pub(super) static MARK_IDLE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('ZCOUNT', KEYS[2], '(' .. int(now_ms()), '+inf') == 0 then
  redis.call('HSET', KEYS[1], 'attached', '0')
end
return 1
"#,
    )
});

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
