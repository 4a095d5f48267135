#!/usr/bin/env bash
# The latency `[sessions.hooks] on_create` adds to a login (issue 14,
# BENCHMARKS.md "Runtime hooks at login").
#
# One private redis-server, one runtime double (Python's http.server,
# answering every hook 204 and the upstream verifier 200), and the release
# gateway started twice on the Redis store: without hooks, and with
# on_create + on_end. `[auth] kind = "upstream"` (the same double) keeps
# argon2 out of the login, so what differs between the two is the hook:
# the pending create, the ZADD that tracks the session, the signed POST and
# the TOUCH that gives the session its full TTL. Runs alternate between
# the two gateways; `portcullis-bench login` prints one JSON line per run.
#
# Usage: bench/hooks_login.sh [runs] [secs] [concurrency]
# Needs: cargo build --release -p portcullis -p portcullis-bench; redis-server; python3.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECS=${2:-10}
CONC=${3:-1}
BIN=target/release/portcullis
BENCH=target/release/portcullis-bench
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t PORTS < <("$BENCH" free-port --count 3)
REDIS_PORT=${PORTS[0]} G1=${PORTS[1]} G2=${PORTS[2]}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
PIDS+=($!)

python3 - >"$WORK/rt.port" <<'EOF' &
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"user":"bench"}' if self.path == "/verify" else b""
        self.send_response(200 if body else 204)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
EOF
PIDS+=($!)
for _ in $(seq 50); do [ -s "$WORK/rt.port" ] && break; sleep 0.1; done
RT=$(cat "$WORK/rt.port")

export PORTCULLIS_SIGNING_KEY=bench-signing-key-0123456789abcdef-0123456789
export PORTCULLIS_HOOK_SECRET=bench-hook-secret-0123456789abcdef-012345678
config() { # port, prefix, hooks table
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
key_prefix = "$2"
$3
[auth]
kind = "upstream"
url = "http://127.0.0.1:$RT/verify"
max_sessions_per_user = 0
[[routes]]
name = "echo"
path = "/ws/echo"
upstreams = ["ws://127.0.0.1:9/ws/echo"]
EOF
}
config "$G1" plain "" >"$WORK/plain.toml"
config "$G2" hooks "[sessions.hooks]
on_create = \"http://127.0.0.1:$RT/portcullis/sessions\"
on_end = \"http://127.0.0.1:$RT/portcullis/sessions/end\"" >"$WORK/hooks.toml"
PORTCULLIS_LOG=warn "$BIN" --config "$WORK/plain.toml" >/dev/null 2>"$WORK/plain.log" &
PIDS+=($!)
PORTCULLIS_LOG=warn "$BIN" --config "$WORK/hooks.toml" >/dev/null 2>"$WORK/hooks.log" &
PIDS+=($!)
for port in "$G1" "$G2"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done

for run in $(seq "$RUNS"); do
  "$BENCH" login --base "http://127.0.0.1:$G1" --user bench --password x \
    --secs "$SECS" --concurrency "$CONC" --label no-hooks --run "$run"
  "$BENCH" login --base "http://127.0.0.1:$G2" --user bench --password x \
    --secs "$SECS" --concurrency "$CONC" --label on_create --run "$run"
done
