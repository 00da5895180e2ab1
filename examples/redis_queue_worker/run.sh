#!/usr/bin/env bash
# examples/redis_queue_worker/run.sh FIBRIL: pushes a backlog of 45 jobs while no consumer
# runs, serves this app at 20 jobs/s (burst 5), and checks through GET /stats that the backlog
# drains in about (45 - 5) / 20 = 2 s, not at once. Needs Redis: REDIS_URL, else 127.0.0.1:6379
# (scripts/run-examples runs it inside scripts/with-services).
set -euo pipefail
FIBRIL=${1:-fibril}
case $FIBRIL in */*) FIBRIL=$(realpath "$FIBRIL") ;; esac
cd "$(dirname "$0")"
export QUEUE_KEY="example:jobs:$$" QUEUE_RATE=20 QUEUE_BURST=5
tmp=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; fi
  cat >"$tmp/clean.lua" <<'LUA'
local redis = require "fibril.redis"
local key = os.getenv("QUEUE_KEY")
local conn = redis.connect(os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0")
conn:del(key, key .. ":delivered", key .. ":dead", "fibril:ratelimit:" .. key .. ":deliveries")
conn:close()
LUA
  "$FIBRIL" "$tmp/clean.lua" || true
  rm -rf "$tmp"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

"$FIBRIL" produce.lua 45 >/dev/null
"$FIBRIL" run . --port 0 --env test >"$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q 'url="http' "$tmp/log" && break; sleep 0.05; done
port=$(sed -n 's/.*url="http:\/\/[^:]*:\([0-9]*\)".*/\1/p' "$tmp/log" | head -1)
[ -n "$port" ] || { cat "$tmp/log"; exit 1; }
start=$(now)
delivered() { curl -s --max-time 5 "http://127.0.0.1:$port/stats" | sed -n 's/.*"delivered":\([0-9]*\).*/\1/p'; }

sleep 1
early=$(delivered)
t=$(since "$start")
# By t seconds the limit allows the burst of 5 plus 20 a second (0.2 s of slack for the boot
# before $start); the backlog must not have gone at once.
awk -v n="$early" -v t="$t" 'BEGIN { exit !(n >= 10 && n <= 5 + 20 * (t + 0.2) + 1) }' \
  || { echo "after $t s: $early delivered, more than the limit allows (or stuck)"; exit 1; }
for _ in $(seq 100); do [ "$(delivered)" = 45 ] && break; sleep 0.05; done
took=$(since "$start")
[ "$(delivered)" = 45 ] || { echo "only $(delivered) of 45 delivered"; cat "$tmp/log"; exit 1; }
awk -v t="$took" 'BEGIN { exit !(t >= 1.8 && t <= 5) }' \
  || { echo "45 jobs took $took s (expected about 2)"; exit 1; }
echo "redis_queue_worker: 45 queued jobs drained in $took s at 20/s ($early after $t s)"
