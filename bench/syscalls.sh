#!/usr/bin/env bash
# Measures a proxy's CPU time (user and system apart), then counts its system
# calls (perf syscall tracepoints), each over a 2-second window in the middle
# of one workload, to explain a figure of BENCHMARKS.md. Needs `perf` with
# tracepoint access (root).
#
#   bench/syscalls.sh churn portcullis   # workload: stream|churn (rtt, see below)
#   bench/syscalls.sh churn nginx        # target: nginx|haproxy|portcullis
#
# The optional third argument is the window in seconds (default 2). Both
# windows and 0.7 s of warm-up must fit in the workload: `stream` and `churn`
# run 5 s; `rtt` runs a fixed number of round trips and may end in under a
# second on a fast machine, too soon for this script.
#
# The CPU figures are per window. The workload's own rate, printed too, is
# the average over the whole run, including the counting window that slows
# it (tracepoints make every system call dearer): divide the CPU by a rate
# measured without perf (`run.sh`) to get a cost per operation.
#
# It runs `bench/run.sh --no-build --only WORKLOAD --targets TARGET --runs 1`
# in the background (which starts and stops every process itself), finds the
# target's pids in that run's temp directory, and only reads them.
set -euo pipefail

W=${1:?workload: rtt|stream|churn}
T=${2:?target: nginx|haproxy|portcullis}
WINDOW=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp /tmp/portcullis-syscalls.XXXXXX)
trap 'rm -f "$OUT" "$OUT".*' EXIT

before=$(ls -d /tmp/portcullis-bench.* 2>/dev/null || true)
"$ROOT/bench/run.sh" --no-build --only "$W" --targets "$T" --runs 1 --out "$OUT.res" >"$OUT" 2>&1 &
RUN=$!
for _ in $(seq 600); do grep -q '^-- run 1' "$OUT" && break; sleep 0.1; done
TMPD=""
for d in $(ls -dt /tmp/portcullis-bench.* 2>/dev/null); do
    case " $before " in *" $d "*) ;; *) TMPD=$d; break ;; esac
done
[ -n "$TMPD" ] || { echo "syscalls.sh: run did not start" >&2; wait "$RUN"; exit 1; }

case $T in
    nginx) P=$(pgrep -P "$(pgrep -f "nginx -p $TMPD" | head -n1)" | paste -sd,) ;;
    haproxy) P=$(pgrep -f "haproxy -db -f $TMPD" | paste -sd,) ;;
    portcullis) P=$(pgrep -f "$TMPD/portcullis --config" | paste -sd,) ;;
    *) echo "syscalls.sh: unknown target $T" >&2; wait "$RUN"; exit 2 ;;
esac
REDIS=$(pgrep -f "redis-server 127.0.0.1:$(grep -o 'redis://127.0.0.1:[0-9]*' "$TMPD/portcullis.toml" | cut -d: -f3)" || true)

# User and system CPU ticks (10 ms) of the pids that still exist, as "U S".
ticks() {
    local u=0 k=0 p v
    for p in ${1//,/ }; do
        v=$(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null) || continue
        u=$((u + ${v% *})); k=$((k + ${v#* }))
    done
    echo "$u $k"
}
# "user X ms, system Y ms" between two `ticks` readings.
spent() {
    local a=($1) b=($2)
    echo "user $(( (b[0] - a[0]) * 10 )) ms, system $(( (b[1] - a[1]) * 10 )) ms"
}
sleep 0.7
EV=""
for s in recvfrom sendto read write readv writev epoll_wait futex epoll_ctl connect accept4 \
         close shutdown setsockopt getsockopt socket getrandom ioctl; do
    EV="$EV${EV:+,}syscalls:sys_enter_$s"
done
# CPU first, in a window of its own: counting tracepoints slows every
# system call, which would inflate the system time.
t0=$(ticks "$P"); r0=$( [ -n "$REDIS" ] && ticks "$REDIS" || echo "0 0")
sleep "$WINDOW"
t1=$(ticks "$P"); r1=$( [ -n "$REDIS" ] && ticks "$REDIS" || echo "0 0")
echo "   first $WINDOW s window (no perf): $T CPU $(spent "$t0" "$t1")"
if [ "$T" = portcullis ] && [ -n "$REDIS" ]; then
    echo "   its Redis CPU $(spent "$r0" "$r1")"
fi
# A failed count (no tracepoint access, a process gone) must not abort
# before the run in the background is waited for.
perf stat -e "$EV" -p "$P" -o "$OUT.perf" -- sleep "$WINDOW" ||
    echo "   perf stat failed; no system call counts" >&2
wait "$RUN" || true

grep -E "^   $W " "$OUT" || true
[ -s "$OUT.perf" ] && awk '/syscalls:/ && $1 != "<not" { gsub(/syscalls:sys_enter_/, "", $2); printf "   %-12s %s\n", $2, $1 }' "$OUT.perf"
