#!/usr/bin/env bash
# A/B comparison of two gateway binaries on one workload: one echo runtime,
# one Redis, both gateways up at once (bench/portcullis.toml), the workload
# run against A then B (the order swapped every round), each call under
# `timeout`. Needs redis-server, not nginx/haproxy.
#
#   bench/ab.sh OLD_BIN NEW_BIN [ROUNDS] [WORKLOAD]   # default 3 rounds of stream
#   HOLD=5000 bench/ab.sh OLD NEW 1 hold               # RSS per idle connection
#
# `hold` measures fresh processes best: run it with 1 round, several times.
# Keys a binary does not know yet (an older build) are dropped from its
# config, so older builds can be measured against the current template.
#
# Prints each run's JSON line (messages/s, the gateway's CPU µs per message:
# `--cpu-pid` is the gateway alone); `portcullis-bench` is
# target/release/portcullis-bench (built if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
A=$1 B=$2 ROUNDS=${3:-3} WORKLOAD=${4:-stream}
BENCH="$ROOT/target/release/portcullis-bench"
[ -x "$BENCH" ] || (cd "$ROOT" && cargo build --release --bin portcullis-bench)
# TMP, PIDS, cleanup on exit, wait_for.
. "$ROOT/bench/lib.sh"
ulimit -n 20000 2>/dev/null || true

mapfile -t P < <("$BENCH" free-port --count 4)
ECHO=${P[0]} REDIS=${P[1]} PORT_A=${P[2]} PORT_B=${P[3]}
"$BENCH" echo --listen "127.0.0.1:$ECHO" >"$TMP/echo.out" 2>&1 &
PIDS+=($!)
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP" --logfile "$TMP/redis.log" &
PIDS+=($!)
wait_for grep -q "listening on" "$TMP/echo.out"
wait_for redis-cli -p "$REDIS" ping

PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
HASH=$(printf '%s\n' "$PASSWORD" | "$A" hash-password)
PORTCULLIS_SIGNING_KEY=$(head -c 48 /dev/urandom | base64 -w0)
export PORTCULLIS_SIGNING_KEY
declare -A PID
for side in A B; do
    port_var="PORT_$side"
    sed -e "s|@PORT@|${!port_var}|; s|@REDIS_PORT@|$REDIS|; s|@ECHO_PORT@|$ECHO|g" \
        -e "s|@MAXCONN@|${MAXCONN:-12000}|g; s|@PASSWORD_HASH@|$HASH|" \
        "$ROOT/bench/portcullis.toml" >"$TMP/$side.toml"
    bin=${!side}
    if ! "$bin" check --config "$TMP/$side.toml" >/dev/null 2>&1; then
        sed -i '/^max_sessions_per_user/d' "$TMP/$side.toml"
        "$bin" check --config "$TMP/$side.toml" >/dev/null
    fi
    cp "$bin" "$TMP/portcullis-$side"  # a rebuild cannot swap it mid-run
    PORTCULLIS_LOG=warn "$TMP/portcullis-$side" --config "$TMP/$side.toml" \
        >"$TMP/$side.out" 2>&1 &
    PID[$side]=$!
    PIDS+=($!)
    wait_for grep -q "portcullis listening on http://" "$TMP/$side.out"
done

for round in $(seq "$ROUNDS"); do
    order=(A B)
    [ $((round % 2)) = 0 ] && order=(B A)
    for side in "${order[@]}"; do
        port_var="PORT_$side"
        if [ "$WORKLOAD" = hold ]; then
            measure=(--pid "${PID[$side]}" --count "${HOLD:-5000}")
        else
            measure=(--cpu-pid "${PID[$side]}")
        fi
        timeout 120 "$BENCH" "$WORKLOAD" --url "ws://127.0.0.1:${!port_var}/ws/echo" \
            --label "$side" --run "$round" \
            --token-url "http://127.0.0.1:${!port_var}" --user bench --password "$PASSWORD" \
            "${measure[@]}"
    done
done
