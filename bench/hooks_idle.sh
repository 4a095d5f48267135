#!/usr/bin/env bash
# Store commands of one idle gateway instance with and without
# `[sessions.hooks] on_end` (the outbox claims, BENCHMARKS.md "Runtime hooks
# at login"): `total_commands_processed` over 20 s, then `INFO commandstats`.
# Needs the release build, redis-server, redis-cli, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t P < <(target/release/portcullis-bench free-port --count 2)
RP=${P[0]} GP=${P[1]}
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no >/dev/null & R=$!
for _ in $(seq 50); do redis-cli -p $RP ping >/dev/null 2>&1 && break; sleep 0.1; done
D=$(mktemp -d)
export PORTCULLIS_SIGNING_KEY=bench-signing-key-0123456789abcdef-0123456789
export PORTCULLIS_HOOK_SECRET=bench-hook-secret-0123456789abcdef-012345678
measure() { # label, hooks table
cat > $D/c.toml <<EOT
[server]
listen = "127.0.0.1:$GP"
[sessions]
store = "redis"
redis_url = "redis://127.0.0.1:$RP/0"
key_prefix = "$1"
$2
[auth]
kind = "upstream"
url = "http://127.0.0.1:9/verify"
[[routes]]
name = "echo"
path = "/ws/echo"
upstreams = ["ws://127.0.0.1:9/ws/echo"]
EOT
PORTCULLIS_LOG=warn target/release/portcullis --config $D/c.toml >/dev/null 2>&1 & G=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:$GP/readyz >/dev/null && break; sleep 0.1; done
sleep 2
a=$(redis-cli -p $RP info stats | grep total_commands_processed | tr -dc 0-9)
sleep 20
b=$(redis-cli -p $RP info stats | grep total_commands_processed | tr -dc 0-9)
echo "$1: $(( (b - a - 2) )) commands in 20 s (idle, one instance)"
redis-cli -p $RP info commandstats | grep -v "^#"; redis-cli -p $RP config resetstat >/dev/null
kill $G; wait $G 2>/dev/null || true
}
measure plain ""
measure hooks "[sessions.hooks]
on_end = \"http://127.0.0.1:9/end\""
kill $R
rm -rf $D
