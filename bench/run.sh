#!/usr/bin/env bash
# Benchmarks Portcullis against NGINX, HAProxy and a direct connection, all in
# front of the same echo runtime, on 127.0.0.1 only. See bench/README.md.
#
#   bench/run.sh              # full run: 3 interleaved runs, medians (~5-7 min)
#   bench/run.sh --quick      # 1 short run (~1-2 min)
#   bench/run.sh --runs 5     # more runs
#
# Every process it starts is stopped on exit (trap), every load is bounded in
# count and time, and every bench call is wrapped in `timeout`.
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --runs N        interleaved repetitions (default 3; 1 with --quick)
  --quick         short workloads, small hold count
  --hold N        idle sockets for the RSS figure (default 9000; 2000 quick)
  --out PREFIX    write PREFIX.jsonl (raw results) and PREFIX.md (tables);
                  default bench/results/<UTC timestamp>
  --keep-tmp      keep the temp dir (configs, logs) after the run
  --no-install    never apt-get install missing nginx/haproxy/redis-server
  --only LIST     workloads to run, comma-separated: rtt,stream,churn,hold,api
  --targets LIST  targets, comma-separated: direct,nginx,haproxy,portcullis
  --portcullis-bin PATH   gateway binary to measure (A/B experiments);
                  default target/release/portcullis
  --no-build      skip cargo build (binaries must exist)
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=""
QUICK=0
HOLD_COUNT=""
OUT=""
KEEP_TMP=0
INSTALL=1
ONLY="rtt,stream,churn,hold,api"
TARGET_LIST="direct,nginx,haproxy,portcullis"
PORTCULLIS_BIN=""
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --hold) HOLD_COUNT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep-tmp) KEEP_TMP=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --targets) TARGET_LIST=$2; shift 2 ;;
        --portcullis-bin) PORTCULLIS_BIN=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$QUICK" = 1 ]; then
    RUNS=${RUNS:-1}
    RTT_MESSAGES=300      # per socket
    STREAM_SECS=1.5
    CHURN_SECS=1.5
    API_SECS=2
    HOLD_COUNT=${HOLD_COUNT:-2000}
else
    RUNS=${RUNS:-3}
    RTT_MESSAGES=2000
    STREAM_SECS=5
    CHURN_SECS=5
    API_SECS=5
    HOLD_COUNT=${HOLD_COUNT:-9000}
fi
SOCKETS=50
RTT_SIZE=64
STREAM_SIZE=256
CHURN_WORKERS=32
LOGIN_CONCURRENCY=8
VERIFY_CONCURRENCY=32

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# ---------------------------------------------------------------- limits

# Every process started below inherits this.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)
# The proxies hold 2 descriptors per proxied socket, the generator and the
# echo 1 each; leave headroom for listeners, Redis and logs.
MAX_HOLD=$(( (FD_LIMIT - 400) / 2 ))
if [ "$HOLD_COUNT" -gt "$MAX_HOLD" ]; then
    echo "run.sh: ulimit -n is $FD_LIMIT: holding $MAX_HOLD sockets instead of $HOLD_COUNT" >&2
    HOLD_COUNT=$MAX_HOLD
fi
MAXCONN=$(( HOLD_COUNT + 200 ))

# ---------------------------------------------------------------- install

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$INSTALL" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${missing[*]} from Debian's packages"
        # Debian may start a system nginx/haproxy on install; this script
        # never uses those (it runs its own, on free ports).
        DEBIAN_FRONTEND=noninteractive apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    else
        echo "run.sh: missing ${missing[*]}; run as root on Debian/Ubuntu, or install them" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- build

if [ "$BUILD" = 1 ]; then
    # Both crates of the workspace (gateway, bench/tool), in one build: plain
    # `--bins` at the root would build only the gateway. Built together, the
    # shared dependencies get one feature set, as before the tool had its own
    # crate; both binaries land in target/release.
    echo "== cargo build --release -p portcullis -p portcullis-bench"
    (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-bench)
fi
BIN="$ROOT/target/release"
BENCH="$BIN/portcullis-bench"
GATEWAY=${PORTCULLIS_BIN:-$BIN/portcullis}

# ---------------------------------------------------------------- processes

TMP=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 755 "$TMP"
PIDS=()
# Measure private copies: a concurrent `cargo build` must not swap the
# binaries under a run (and the hash in the report is of what ran).
cp -p "$GATEWAY" "$TMP/portcullis"
cp -p "$BENCH" "$TMP/portcullis-bench"
GATEWAY_SRC=$GATEWAY
GATEWAY="$TMP/portcullis"
BENCH="$TMP/portcullis-bench"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "$KEEP_TMP" = 1 ] || [ "$rc" != 0 ]; then
        echo "run.sh: configs and logs kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background, stdout/stderr to $TMP/NAME.*
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    PIDS+=($!)
    LAST_PID=$!
}

# wait_for DESCRIPTION CMD...: retries CMD for up to 10 s.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 100); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "run.sh: $what did not come up; see $TMP" >&2
    tail -n 20 "$TMP"/*.err >&2 || true
    exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# render TEMPLATE DEST KEY=VALUE...: replaces every @KEY@ with VALUE.
render() {
    local text
    text=$(<"$1")
    local dest=$2
    shift 2
    local kv
    for kv in "$@"; do
        local key=${kv%%=*} value=${kv#*=}
        text=${text//@"$key"@/"$value"}
    done
    printf '%s\n' "$text" >"$dest"
}

mapfile -t PORTS < <("$BENCH" free-port --count 5)
ECHO_PORT=${PORTS[0]} NGINX_PORT=${PORTS[1]} HAPROXY_PORT=${PORTS[2]}
PORTCULLIS_PORT=${PORTS[3]} REDIS_PORT=${PORTS[4]}

echo "== starting echo :$ECHO_PORT, redis :$REDIS_PORT, nginx :$NGINX_PORT, haproxy :$HAPROXY_PORT, portcullis :$PORTCULLIS_PORT (tmp $TMP)"

# Each start_* (re)starts one process and records its pid; stop_pid stops
# one we started. `hold` restarts its target first (see below).
stop_pid() {
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

start_echo() {
    start echo "$BENCH" echo --listen "127.0.0.1:$ECHO_PORT"
    ECHO_PID=$LAST_PID
    wait_for "echo runtime" grep -q "listening on" "$TMP/echo.out"
}

start_redis() {
    start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --daemonize no --dir "$TMP" --logfile "$TMP/redis.log"
    REDIS_PID=$LAST_PID
    wait_for "redis-server" redis-cli -p "$REDIS_PORT" ping
}

start_portcullis() {
    # warn: no per-request logging, as nginx (access_log off) and haproxy (no log).
    start portcullis env PORTCULLIS_LOG=warn "$GATEWAY" --config "$TMP/portcullis.toml"
    PORTCULLIS_PID=$LAST_PID
    wait_for "portcullis" grep -q "portcullis listening on http://" "$TMP/portcullis.out"
}

start_nginx() {
    start nginx nginx -p "$TMP/nginx/" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
    NGINX_PID=$LAST_PID
    wait_for "nginx" port_open "$NGINX_PORT"
    wait_for "nginx workers" pgrep -P "$NGINX_PID"
    # Both workers (worker_processes auto = nproc).
    for _ in $(seq 50); do
        [ "$(pgrep -c -P "$NGINX_PID")" -ge "$(nproc)" ] && break
        sleep 0.1
    done
    mapfile -t NGINX_WORKERS < <(pgrep -P "$NGINX_PID")
}

start_haproxy() {
    start haproxy haproxy -db -f "$TMP/haproxy.cfg"
    HAPROXY_PID=$LAST_PID
    wait_for "haproxy" port_open "$HAPROXY_PORT"
}

PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
HASH=$(printf '%s\n' "$PASSWORD" | "$GATEWAY" hash-password)
PORTCULLIS_SIGNING_KEY=$(head -c 48 /dev/urandom | base64 -w0)
export PORTCULLIS_SIGNING_KEY
render "$ROOT/bench/portcullis.toml" "$TMP/portcullis.toml" \
    PORT="$PORTCULLIS_PORT" REDIS_PORT="$REDIS_PORT" ECHO_PORT="$ECHO_PORT" \
    MAXCONN="$MAXCONN" PASSWORD_HASH="$HASH"
"$GATEWAY" check --config "$TMP/portcullis.toml" >/dev/null
mkdir -p "$TMP/nginx"
render "$ROOT/bench/nginx.conf" "$TMP/nginx/nginx.conf" \
    PREFIX="$TMP/nginx" PORT="$NGINX_PORT" ECHO_PORT="$ECHO_PORT"
nginx -t -q -p "$TMP/nginx/" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
render "$ROOT/bench/haproxy.cfg" "$TMP/haproxy.cfg" \
    PREFIX="$TMP" PORT="$HAPROXY_PORT" ECHO_PORT="$ECHO_PORT" MAXCONN="$MAXCONN"
haproxy -c -q -f "$TMP/haproxy.cfg"

start_echo
start_redis
start_portcullis
start_nginx
start_haproxy

# ---------------------------------------------------------------- targets

declare -A URL AUTH CPU RSS
URL[direct]="ws://127.0.0.1:$ECHO_PORT/ws/echo"
URL[nginx]="ws://127.0.0.1:$NGINX_PORT/ws/echo"
URL[haproxy]="ws://127.0.0.1:$HAPROXY_PORT/ws/echo"
URL[portcullis]="ws://127.0.0.1:$PORTCULLIS_PORT/ws/echo"
AUTH[direct]=""
AUTH[nginx]=""
AUTH[haproxy]=""
AUTH[portcullis]="--token-url http://127.0.0.1:$PORTCULLIS_PORT --user bench --password $PASSWORD"
# Process arguments, refreshed after every restart.
target_pids() {
    # CPU charged to each target: nginx's workers, haproxy's one process,
    # Portcullis plus its Redis (the session checks are part of its cost).
    CPU[direct]=""
    CPU[nginx]=$(printf -- '--cpu-pid %s ' "${NGINX_WORKERS[@]}")
    CPU[haproxy]="--cpu-pid $HAPROXY_PID"
    CPU[portcullis]="--cpu-pid $PORTCULLIS_PID --cpu-pid $REDIS_PID"
    # RSS per connection: nginx = sum of its workers; direct = the echo itself.
    RSS[direct]="--pid $ECHO_PID"
    RSS[nginx]="$(printf -- '--pid %s ' "${NGINX_WORKERS[@]}") --pid-upstream $ECHO_PID"
    RSS[haproxy]="--pid $HAPROXY_PID --pid-upstream $ECHO_PID"
    RSS[portcullis]="--pid $PORTCULLIS_PID --pid-upstream $ECHO_PID"
}
target_pids

# A process's RSS does not fall back when memory is freed (allocators and
# pools keep it), so an RSS delta measured after other workloads shows how
# much *new* memory the sockets needed, not what they cost. `hold` therefore
# starts from freshly started processes: the echo and the target are
# restarted, then warmed with a few round trips.
fresh() {
    local t=$1
    stop_pid "$ECHO_PID"
    start_echo
    case $t in
        nginx) stop_pid "$NGINX_PID"; start_nginx ;;
        haproxy) stop_pid "$HAPROXY_PID"; start_haproxy ;;
        portcullis) stop_pid "$PORTCULLIS_PID"; start_portcullis ;;
    esac
    target_pids
    # shellcheck disable=SC2086
    timeout 30 "$BENCH" rtt --url "${URL[$t]}" --label "$t" ${AUTH[$t]} \
        --sockets 2 --messages 10 --warmup 0 >/dev/null ||
        echo "   warm-up of $t after restart failed"
}
IFS=, read -r -a TARGETS <<<"$TARGET_LIST"
for t in "${TARGETS[@]}"; do
    [ -n "${URL[$t]:-}" ] || { echo "run.sh: unknown target $t" >&2; exit 2; }
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ -z "$OUT" ]; then
    mkdir -p "$ROOT/bench/results"
    OUT="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)"
fi
RESULTS="$OUT.jsonl"
: >"$RESULTS"
FAILURES=0

# bench LIMIT_SECS ARGS...: one bench call; JSON to $RESULTS, human line to stdout.
bench() {
    local limit=$1
    shift
    local out="$TMP/bench.out"
    if timeout -k 5 "$limit" "$BENCH" "$@" >"$out" 2>"$TMP/bench.err"; then
        grep '^{' "$out" >>"$RESULTS" || true
        sed -n 's/^# /   /p' "$out"
    else
        local rc=$?
        FAILURES=$((FAILURES + 1))
        echo "   FAILED (rc $rc): portcullis-bench $1 ... : $(tail -n 3 "$TMP/bench.err" | tr '\n' ' ')"
    fi
}

# Other work on the machine skews every figure: measure it while our own
# processes sit idle, and say so in the report.
cpu_busy_pct() {
    local a b
    read -r -a a < <(head -n1 /proc/stat)
    sleep 1
    read -r -a b < <(head -n1 /proc/stat)
    local total=0 idle i
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    idle=$(( b[4] - a[4] + b[5] - a[5] ))
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}
BUSY_BEFORE=$(cpu_busy_pct)
echo "== background CPU busy before the workloads: ${BUSY_BEFORE}% of $(nproc) CPUs"
if [ "$BUSY_BEFORE" -gt 10 ]; then
    echo "run.sh: WARNING: the machine is not idle; figures will be noisy" >&2
    top -bn1 | sed -n '7,12p' >&2 || true
fi

echo "== smoke test (2 sockets x 10 round trips per target)"
for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    timeout 30 "$BENCH" rtt --url "${URL[$t]}" --label "$t" ${AUTH[$t]} \
        --sockets 2 --messages 10 --warmup 0 >/dev/null ||
        { echo "run.sh: smoke test against $t failed" >&2; exit 1; }
done

echo "== $RUNS run(s): rtt ($SOCKETS sockets x $RTT_MESSAGES x ${RTT_SIZE} B), stream ($SOCKETS x ${STREAM_SIZE} B, ${STREAM_SECS} s), churn ($CHURN_WORKERS workers, ${CHURN_SECS} s), hold ($HOLD_COUNT idle sockets)"
STARTED=$(date +%s)
for run in $(seq "$RUNS"); do
    # Rotate the target order each run so no target always goes first.
    order=()
    n=${#TARGETS[@]}
    for i in $(seq 0 $((n - 1))); do order+=("${TARGETS[$(( (i + run - 1) % n ))]}"); done
    echo "-- run $run/$RUNS (order: ${order[*]})"
    wants rtt && for t in "${order[@]}"; do
        # shellcheck disable=SC2086
        bench 120 rtt --url "${URL[$t]}" --label "$t" --run "$run" ${AUTH[$t]} ${CPU[$t]} \
            --sockets "$SOCKETS" --messages "$RTT_MESSAGES" --size "$RTT_SIZE"
    done
    wants stream && for t in "${order[@]}"; do
        # shellcheck disable=SC2086
        bench 60 stream --url "${URL[$t]}" --label "$t" --run "$run" ${AUTH[$t]} ${CPU[$t]} \
            --sockets "$SOCKETS" --size "$STREAM_SIZE" --secs "$STREAM_SECS"
    done
    wants churn && for t in "${order[@]}"; do
        # shellcheck disable=SC2086
        bench 60 churn --url "${URL[$t]}" --label "$t" --run "$run" ${AUTH[$t]} ${CPU[$t]} \
            --workers "$CHURN_WORKERS" --secs "$CHURN_SECS"
        sleep 1
    done
    wants hold && for t in "${order[@]}"; do
        fresh "$t"
        # shellcheck disable=SC2086
        bench 120 hold --url "${URL[$t]}" --label "$t" --run "$run" ${AUTH[$t]} ${RSS[$t]} \
            --count "$HOLD_COUNT"
    done
    wants api || continue
    base="http://127.0.0.1:$PORTCULLIS_PORT"
    bench 60 login --base "$base" --user bench --password "$PASSWORD" --run "$run" \
        --secs "$API_SECS" --concurrency "$LOGIN_CONCURRENCY" --pid "$PORTCULLIS_PID"
    bench 60 verify --base "$base" --user bench --password "$PASSWORD" --run "$run" \
        --secs "$API_SECS" --concurrency "$VERIFY_CONCURRENCY" --pid "$PORTCULLIS_PID"
done
ELAPSED=$(( $(date +%s) - STARTED ))
BUSY_AFTER=$(cpu_busy_pct)

# ---------------------------------------------------------------- report

{
    echo "# Portcullis benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r), ulimit -n $FD_LIMIT"
    echo "- versions: $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -n1 | cut -d' ' -f1-3), $(redis-server --version | cut -d' ' -f1-3), $("$GATEWAY" --version)"
    echo "- gateway binary: $GATEWAY_SRC (sha256 $(sha256sum "$GATEWAY" | cut -c1-16), built $(date -u -r "$GATEWAY" +%Y-%m-%dT%H:%M:%SZ)), repository HEAD $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) plus any uncommitted changes"
    echo "- command: bench/run.sh $([ "$QUICK" = 1 ] && echo --quick) --runs $RUNS --hold $HOLD_COUNT --only $ONLY --targets $TARGET_LIST${PORTCULLIS_BIN:+ --portcullis-bin $PORTCULLIS_BIN} ($ELAPSED s of workloads, $FAILURES failed bench calls)"
    echo "- workloads: rtt $SOCKETS sockets x $RTT_MESSAGES round trips x $RTT_SIZE B; stream $SOCKETS sockets x $STREAM_SIZE B, window 64, ${STREAM_SECS} s; churn $CHURN_WORKERS workers x ${CHURN_SECS} s; hold $HOLD_COUNT idle sockets; login x$LOGIN_CONCURRENCY and verify x$VERIFY_CONCURRENCY for ${API_SECS} s"
    echo "- background CPU busy (all CPUs, our processes idle): ${BUSY_BEFORE}% before, ${BUSY_AFTER}% after the workloads"
    echo "- medians over $RUNS run(s); ratios are portcullis / other (higher is better for rates, lower for µs, KiB and CPU)"
    echo
    "$BENCH" report "$RESULTS"
} >"$OUT.md"
echo
cat "$OUT.md"
echo
echo "raw results: $RESULTS"
echo "tables:      $OUT.md"
