#!/usr/bin/env bash
# TLS against plain in one run (BENCHMARKS.md, "TLS"): one Redis, a plain
# and a TLS echo runtime, and two gateways from bench/portcullis.toml, one
# serving plain HTTP and one TLS ([server.tls]), each with a route to each
# runtime, so every pairing of client side and runtime side is measured by
# the same generator in the same run:
#
#   plain   client ws://  -> gateway -> ws://  runtime
#   client  client wss:// -> gateway -> ws://  runtime
#   runtime client ws://  -> gateway -> wss:// runtime
#   both    client wss:// -> gateway -> wss:// runtime
#
# Then, with RELOAD_SOCKETS (default 5000) idle sockets open on the plain
# and on the both-TLS pairing, SIGHUP to the gateway (config changed: one
# more allowed origin): the time until /metrics counts the reload, the
# gateway's own log of how long the reload took, and an echo on every
# socket afterwards (none may fail).
#
#   bench/tls.sh                      # HOLD=3000 sockets per RSS row, 3 rounds of rtt/stream
#   HOLD=1000 RELOAD_SOCKETS=2000 bench/tls.sh
#
# Needs redis-server; builds the release gateway and generator if missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOLD=${HOLD:-3000}
ROUNDS=${ROUNDS:-3}
RELOAD_SOCKETS=${RELOAD_SOCKETS:-5000}
BIN="$ROOT/target/release/portcullis"
BENCH="$ROOT/target/release/portcullis-bench"
[ -x "$BIN" ] && [ -x "$BENCH" ] || (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-bench)
# TMP, PIDS, cleanup on exit, wait_for.
. "$ROOT/bench/lib.sh"
# Private copies: a concurrent `cargo build` cannot swap them mid-run.
cp "$BIN" "$BENCH" "$TMP/"
BIN="$TMP/portcullis" BENCH="$TMP/portcullis-bench"
ulimit -n 20000 2>/dev/null || true
MAXCONN=$((RELOAD_SOCKETS > HOLD ? RELOAD_SOCKETS + 200 : HOLD + 200))

"$BENCH" make-cert --dir "$TMP/certs" >/dev/null
mapfile -t P < <("$BENCH" free-port --count 5)
ECHO=${P[0]} ECHO_TLS=${P[1]} REDIS=${P[2]} PLAIN=${P[3]} TLS=${P[4]}
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP" --logfile "$TMP/redis.log" &
PIDS+=($!)
wait_for redis-cli -p "$REDIS" ping

PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
HASH=$(printf '%s\n' "$PASSWORD" | "$BIN" hash-password)
PORTCULLIS_SIGNING_KEY=$(head -c 48 /dev/urandom | base64 -w0)
export PORTCULLIS_SIGNING_KEY
# The gateway's info lines for reloads only; everything else at warn.
export PORTCULLIS_LOG="warn,portcullis::server=info"
for side in PLAIN TLS; do
    port=${!side}
    sed -e "s|@PORT@|$port|; s|@REDIS_PORT@|$REDIS|; s|@ECHO_PORT@|$ECHO|g" \
        -e "s|@MAXCONN@|$MAXCONN|g; s|@PASSWORD_HASH@|$HASH|; s|key_prefix = \"bench\"|key_prefix = \"bench$side\"|" \
        "$ROOT/bench/portcullis.toml" >"$TMP/$side.toml"
    cat >>"$TMP/$side.toml" <<TOML

[[routes]]
name = "secure"
path = "/ws/secure"
upstreams = ["wss://127.0.0.1:$ECHO_TLS/ws/echo"]
balance = "round_robin"
ca_file = "$TMP/certs/ca.pem"
TOML
    if [ "$side" = TLS ]; then
        sed -i "s|^shutdown_grace_ms = 2000|shutdown_grace_ms = 2000\n[server.tls]\ncert_file = \"$TMP/certs/cert.pem\"\nkey_file = \"$TMP/certs/key.pem\"|" "$TMP/$side.toml"
    fi
    "$BIN" check --config "$TMP/$side.toml" >/dev/null
done

# Both echoes and both gateways, new processes: RSS per connection is
# measured on processes that never held sockets before (memory freed by an
# earlier row would be reused and hide the cost).
declare -A GW
fresh() {
    for p in "${GW[PLAIN]:-}" "${GW[TLS]:-}" "${ECHO_PID:-}" "${ECHO_TLS_PID:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null && while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    done
    rm -f "$TMP"/*.out
    "$BENCH" echo --listen "127.0.0.1:$ECHO" >"$TMP/echo.out" 2>&1 &
    ECHO_PID=$!
    "$BENCH" echo --listen "127.0.0.1:$ECHO_TLS" --tls-cert "$TMP/certs/cert.pem" \
        --tls-key "$TMP/certs/key.pem" >"$TMP/echo-tls.out" 2>&1 &
    ECHO_TLS_PID=$!
    PIDS+=($ECHO_PID $ECHO_TLS_PID)
    wait_for grep -q "listening on" "$TMP/echo.out"
    wait_for grep -q "listening on" "$TMP/echo-tls.out"
    for side in PLAIN TLS; do
        "$BIN" --config "$TMP/$side.toml" >"$TMP/$side.out" 2>>"$TMP/$side.log" &
        GW[$side]=$!
        PIDS+=($!)
        wait_for grep -q "listening on" "$TMP/$side.out"
    done
}

B="$BENCH --ca-file $TMP/certs/ca.pem"
run() { timeout 300 $B "$@"; }
# label, gateway side, ws scheme, http scheme, path, which echo
PAIRS=(
    "plain PLAIN ws http /ws/echo ECHO_PID"
    "client-tls TLS wss https /ws/echo ECHO_PID"
    "runtime-tls PLAIN ws http /ws/secure ECHO_TLS_PID"
    "both-tls TLS wss https /ws/secure ECHO_TLS_PID"
)
target() { # label side ws http path [run]
    local port=${!2}
    echo "--label $1 --run ${6:-1} --url $3://127.0.0.1:$port$5 --token-url $4://127.0.0.1:$port --user bench --password $PASSWORD --cpu-pid ${GW[$2]}"
}

echo "## machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## round trips (64 B, 50 sockets x 2000) and streaming (256 B, window 64, 5 s), $ROUNDS rounds, order rotated"
fresh
for round in $(seq "$ROUNDS"); do
    for i in 0 1 2 3; do
        set -- ${PAIRS[$(((i + round - 1) % 4))]}
        run rtt $(target "$1" "$2" "$3" "$4" "$5" "$round")
        run stream $(target "$1" "$2" "$3" "$4" "$5" "$round")
    done
done
echo "## RSS per idle proxied connection ($HOLD sockets, fresh processes per row)"
for p in "${PAIRS[@]}"; do
    set -- $p
    fresh
    run hold $(target "$1" "$2" "$3" "$4" "$5") --count "$HOLD" --pid "${GW[$2]}" --pid-upstream "${!6}"
done
echo "## reload with $RELOAD_SOCKETS open sockets (fresh processes)"
for p in "${PAIRS[0]}" "${PAIRS[3]}"; do
    set -- $p
    fresh
    # A real change for the reload to apply: one more allowed origin.
    sed -i "s|^allowed_origins = .*|allowed_origins = [\"https://reload-$1.example\"]|" "$TMP/$2.toml"
    "$BIN" check --config "$TMP/$2.toml" >/dev/null
    run hold $(target "$1" "$2" "$3" "$4" "$5") --count "$RELOAD_SOCKETS" --pid "${GW[$2]}" \
        --reload-pid "${GW[$2]}" --metrics-url "$4://127.0.0.1:${!2}"
    grep "config reloaded" "$TMP/$2.log" | tail -1 | sed 's/^/# gateway log: /'
done
echo "## done $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)"
