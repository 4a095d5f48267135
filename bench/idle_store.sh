#!/usr/bin/env bash
# What idle sockets cost the session store (issue 17, BENCHMARKS.md "Store
# commands per idle socket"): one gateway on its own Redis, N idle proxied
# sockets in N sessions, Redis commands per second from INFO stats over a
# 20 s window, for several N in one run.
#
#   bench/idle_store.sh                         # N = 1000, 5000, 9000
#   bench/idle_store.sh --counts 500,1000       # other levels
#   bench/idle_store.sh --portcullis-bin PATH   # another gateway build (A/B)
#   bench/idle_store.sh --no-build              # use target/release as is
#
# Everything runs on 127.0.0.1 on free ports under a temp dir and is stopped
# on exit; results go to bench/results/<time>-idle-store.jsonl.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNTS=1000,5000,9000
WINDOW=20
BUILD=1
GATEWAY=""
while [ $# -gt 0 ]; do
    case $1 in
        --counts) COUNTS=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --portcullis-bin) GATEWAY=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "idle_store.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-bench)
fi
BENCH="$ROOT/target/release/portcullis-bench"
GATEWAY=${GATEWAY:-$ROOT/target/release/portcullis}
ulimit -n "$(ulimit -Hn | sed 's/unlimited/20000/')" 2>/dev/null || true
ulimit -n 20000 2>/dev/null || true

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_for() {
    local what=$1; shift
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "idle_store.sh: $what did not come up" >&2; tail -n 20 "$TMP"/*.err >&2 || true
    exit 1
}

mapfile -t PORTS < <("$BENCH" free-port --count 3)
ECHO_PORT=${PORTS[0]} REDIS_PORT=${PORTS[1]} PORT=${PORTS[2]}

"$BENCH" echo --listen "127.0.0.1:$ECHO_PORT" >"$TMP/echo.out" 2>"$TMP/echo.err" &
PIDS+=($!)
wait_for "echo" grep -q "listening on" "$TMP/echo.out"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --dir "$TMP" --logfile "$TMP/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_for "redis" redis-cli -p "$REDIS_PORT" ping

PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
HASH=$(printf '%s\n' "$PASSWORD" | "$GATEWAY" hash-password)
PORTCULLIS_SIGNING_KEY=$(head -c 48 /dev/urandom | base64 -w0)
export PORTCULLIS_SIGNING_KEY
# Ping interval 30 s as by default: the bench's readers answer the pings.
cat >"$TMP/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
max_connections = 19000
max_connections_per_session = 4
[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
key_prefix = "bench"
[tokens]
signing_key_env = "PORTCULLIS_SIGNING_KEY"
[auth]
kind = "static"
@SESSION_CAP@
[[auth.users]]
username = "bench"
password_hash = "$HASH"
[[routes]]
name = "echo"
path = "/ws/echo"
upstreams = ["ws://127.0.0.1:$ECHO_PORT/ws/echo"]
EOF
# One user holds every session: lift the per-user session cap where the
# gateway has one (older builds reject the key).
cp "$TMP/portcullis.toml" "$TMP/capped.toml"
sed -i 's/@SESSION_CAP@/max_sessions_per_user = 0/' "$TMP/portcullis.toml"
if ! "$GATEWAY" check --config "$TMP/portcullis.toml" >/dev/null 2>&1; then
    sed 's/@SESSION_CAP@//' "$TMP/capped.toml" >"$TMP/portcullis.toml"
    "$GATEWAY" check --config "$TMP/portcullis.toml" >/dev/null
fi
PORTCULLIS_LOG=warn "$GATEWAY" --config "$TMP/portcullis.toml" \
    >"$TMP/portcullis.out" 2>"$TMP/portcullis.err" &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_for "portcullis" grep -q "portcullis listening on http://" "$TMP/portcullis.out"

mkdir -p "$ROOT/bench/results"
OUT="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-idle-store.jsonl"
echo "== idle-store: $GATEWAY, counts $COUNTS, window ${WINDOW}s -> $OUT"
timeout 1800 "$BENCH" idle-store --base "http://127.0.0.1:$PORT" --path /ws/echo \
    --user bench --password "$PASSWORD" --redis "127.0.0.1:$REDIS_PORT" \
    --counts "$COUNTS" --window-secs "$WINDOW" \
    --gateway-pid "$GATEWAY_PID" --redis-pid "$REDIS_PID" | tee "$OUT"
