# Sourced by the bench scripts: a private temp directory, processes stopped
# and the directory removed on exit, and a bounded wait.
#
#   . "$ROOT/bench/lib.sh"
#   some_server & PIDS+=($!)
#   wait_for grep -q "listening on" "$TMP/out"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# Runs the command every 100 ms until it succeeds, at most 10 s; else exits.
wait_for() {
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "${0##*/}: timed out waiting for: $*" >&2
    exit 1
}
