#!/usr/bin/env bash
# Shared sessions across gateways (issue 11, SPEC §8; BENCHMARKS.md "Many
# instances"): three gateways on one Redis with one shared route in front of
# the bench echo, then `portcullis-bench instances`:
#   latency   remote vs local viewport, owner send -> reader (p50/p99)
#   fanout    100 viewports over three gateways: frames/s, Redis commands
#             and CPU per runtime frame, gateways' CPU per delivered frame
#   memory    RSS per remote viewport (1,000 sessions)
#   failover  SIGKILL of the hub's gateway -> first frame on a new hub
#             (five times; the killed gateway is started again each time)
#
#   bench/instances.sh               # everything
#   bench/instances.sh --no-build    # use target/release as is
#   bench/instances.sh --only latency,failover
#
# Everything runs on 127.0.0.1 on free ports under a temp dir and is stopped
# on exit; results go to bench/results/<time>-instances.jsonl.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=1
ONLY=latency,fanout,memory,failover
while [ $# -gt 0 ]; do
    case $1 in
        --no-build) BUILD=0; shift ;;
        --only) ONLY=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "instances.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-bench)
fi
BENCH="$ROOT/target/release/portcullis-bench"
GATEWAY="$ROOT/target/release/portcullis"
ulimit -n "$(ulimit -Hn | sed 's/unlimited/20000/')" 2>/dev/null || true
ulimit -n 20000 2>/dev/null || true

. "$ROOT/bench/lib.sh"

mapfile -t PORTS < <("$BENCH" free-port --count 5)
ECHO_PORT=${PORTS[0]} REDIS_PORT=${PORTS[1]}
GW_PORTS=("${PORTS[2]}" "${PORTS[3]}" "${PORTS[4]}")

"$BENCH" echo --listen "127.0.0.1:$ECHO_PORT" >"$TMP/echo.out" 2>"$TMP/echo.err" &
PIDS+=($!)
wait_for grep -q "listening on" "$TMP/echo.out"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --dir "$TMP" --logfile "$TMP/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_for redis-cli -p "$REDIS_PORT" ping

PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
HASH=$(printf '%s\n' "$PASSWORD" | "$GATEWAY" hash-password)
PORTCULLIS_SIGNING_KEY=$(head -c 48 /dev/urandom | base64 -w0)
export PORTCULLIS_SIGNING_KEY

config() {
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
max_connections = 19000
max_connections_per_session = 200
[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
key_prefix = "bench"
[tokens]
signing_key_env = "PORTCULLIS_SIGNING_KEY"
[auth]
kind = "static"
max_sessions_per_user = 0
[[auth.users]]
username = "bench"
password_hash = "$HASH"
[[routes]]
name = "agent"
path = "/ws/agent"
upstreams = ["ws://127.0.0.1:$ECHO_PORT/ws/echo"]
mode = "shared"
replay_frames = 4096
EOF
}

GW_PIDS=("" "" "")
start_gateway() {
    local i=$1
    config "${GW_PORTS[$i]}" >"$TMP/gw$i.toml"
    : >"$TMP/gw$i.out"
    PORTCULLIS_LOG=warn "$GATEWAY" --config "$TMP/gw$i.toml" \
        >"$TMP/gw$i.out" 2>>"$TMP/gw$i.err" &
    GW_PIDS[$i]=$!
    PIDS+=("${GW_PIDS[$i]}")
    wait_for grep -q "portcullis listening on http://" "$TMP/gw$i.out"
}
for i in 0 1 2; do start_gateway "$i"; done
BASES="http://127.0.0.1:${GW_PORTS[0]},http://127.0.0.1:${GW_PORTS[1]},http://127.0.0.1:${GW_PORTS[2]}"
COMMON=(--bases "$BASES" --user bench --password "$PASSWORD")

mkdir -p "$ROOT/bench/results"
OUT="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-instances.jsonl"
echo "== instances: $GATEWAY -> $OUT"
if wants latency; then
    timeout 300 "$BENCH" instances latency "${COMMON[@]}" --iterations 2000 | tee -a "$OUT"
fi
if wants fanout; then
    timeout 300 "$BENCH" instances fanout "${COMMON[@]}" --viewports 100 --frames 20000 \
        --size 256 --redis "127.0.0.1:$REDIS_PORT" --redis-pid "$REDIS_PID" \
        --gateway-pid "${GW_PIDS[0]}" --gateway-pid "${GW_PIDS[1]}" \
        --gateway-pid "${GW_PIDS[2]}" | tee -a "$OUT"
fi
if wants memory; then
    timeout 600 "$BENCH" instances memory "${COMMON[@]}" --sessions 1000 \
        --hub-pid "${GW_PIDS[0]}" --remote-pid "${GW_PIDS[1]}" | tee -a "$OUT"
fi
if wants failover; then
    for run in 1 2 3 4 5; do
        timeout 120 "$BENCH" instances failover "${COMMON[@]}" \
            --kill-pid "${GW_PIDS[0]}" | tee -a "$OUT"
        wait "${GW_PIDS[0]}" 2>/dev/null || true
        start_gateway 0
    done
fi
