#!/usr/bin/env bash
# bench/reload.sh: hot reload under load. A copy of apps/hello runs in development (reload on)
# while wrk loads it; its controller is rewritten 20 times. Prints the failed or non-2xx
# responses during that (target 0), the latency from each write to the first response with the
# new code (target: median under 100 ms), and /hello throughput with reload watching on vs off
# in one run (target ratio >= 0.95). Figures only, nothing asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
HARNESS=${HARNESS:-../shared/bench}
FIBRIL="$PWD/$BUILD/fibril"
PORT=${PORT:-18095} CHANGES=${CHANGES:-20} ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-3}

tmp=$(mktemp -d)
pids=()
cleanup() { [ ${#pids[@]} -eq 0 ] || "$HARNESS/peers/stop.sh" "${pids[@]}" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
cp -r apps/hello "$tmp/hello"
cat >> "$tmp/hello/routes.lua.new" <<'ROUTES'
return function(r)
  r:get("/hello", "bench#hello")
  r:get("/json", "bench#json")
  r:get("/version", "bench#version")
end
ROUTES
mv "$tmp/hello/routes.lua.new" "$tmp/hello/routes.lua"
printf 'local C = require("fibril.controller"):extend()\nfunction C:hello() self:render{ text = "Hello, World!" } end\nfunction C:json() self:render{ json = {} } end\nfunction C:version() self:render{ text = "v0" } end\nreturn C\n' > "$tmp/hello/controllers/bench.lua"
# development without the access log: the figures are about reloading, not logging
printf 'return { development = { log = { access = false } } }\n' > "$tmp/hello/config/app.lua"

start() { "$HARNESS/peers/start.sh" cmd "$PORT" -- "$FIBRIL" run "$tmp/hello" --port '{PORT}' --env development "$@" 2>/dev/null; }

echo "== reload under load: $CHANGES controller changes while wrk runs (1 thread, 16 connections)"
pid=$(start); pids+=("$pid")
wrk -t1 -c16 -d60s "http://127.0.0.1:$PORT/hello" > "$tmp/wrk.out" 2>&1 &
wrk_pid=$!
sleep 1
"$FIBRIL" bench/reload.lua "$tmp/hello" "$PORT" "$CHANGES"
kill -INT "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" 2>/dev/null || true
total=$(awk '/requests in/ {print $1}' "$tmp/wrk.out")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.out"); non2xx=${non2xx:-0}
sockerr=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$tmp/wrk.out"); sockerr=${sockerr:-0}
echo "responses during the changes: ${total:-?}; non-2xx: $non2xx; socket errors: $sockerr (target: 0 and 0)"
"$HARNESS/peers/stop.sh" "$pid" >/dev/null 2>&1 || true; pids=()

echo "== /hello throughput, reload watching on vs off (wrk 1 thread, 64 connections, ${DURATION}s x $ROUNDS)"
on=() off=()
for r in $(seq "$ROUNDS"); do
  for mode in on off; do
    if [ "$mode" = on ]; then pid=$(start --reload); else pid=$(start --no-reload); fi
    pids+=("$pid")
    rps=$(wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$PORT/hello" | awk '/Requests\/sec/ {print $2}')
    "$HARNESS/peers/stop.sh" "$pid" >/dev/null 2>&1 || true; pids=()
    echo "round $r reload $mode: $rps req/s"
    if [ "$mode" = on ]; then on+=("$rps"); else off+=("$rps"); fi
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m_on=$(median "${on[@]}"); m_off=$(median "${off[@]}")
awk -v a="$m_on" -v b="$m_off" 'BEGIN { printf "median: on %.0f, off %.0f req/s; ratio on/off: %.3f (target >= 0.95)\n", a, b, a / b }'
