#!/usr/bin/env bash
# bench/http_tail.sh: the latency tail of apps/hello (one process) under wrk's 64 keep-alive
# connections, as fibril runs by default and with each of its tail measures turned off, against
# nginx + Lua, all interleaved round by round (the machine's noise hits every target alike):
#   fibril                 defaults: edge-triggered reads, the collector paced by fibril.gc
#                          (gc.pause 200, gc.stepmul 25, gc.min_growth_bytes 8 MiB)
#   fibril-level           FIBRIL_HTTP_LEVEL=1: libuv's level-triggered registration
#   fibril-gc-luajit       LuaJIT's collector pace, 200/200 (apps/hello's bench_gc_luajit env)
#   fibril-gc-120-100      the fixed pace fibril had before fibril.gc (bench/hello_gc_fixed.lua)
#   nginx-lua              the peer (../shared/bench)
# Prints medians of req/s and latency percentiles, then paired ratios against `fibril`.
# Asserts nothing. ROUNDS (default 8), DURATION (5 s), URL_PATH (/hello) tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
HARNESS=${HARNESS:-../shared/bench}
ROUNDS=${ROUNDS:-8} DURATION=${DURATION:-5} URL_PATH=${URL_PATH:-/hello}
FIBRIL="$PWD/$BUILD/fibril"

bash "$HARNESS/install-peers.sh" >/dev/null
pids=()
stop_all() { [ ${#pids[@]} -eq 0 ] || "$HARNESS/peers/stop.sh" "${pids[@]}" >/dev/null 2>&1 || true; }
trap stop_all EXIT
start() { "$HARNESS/peers/start.sh" "$@" 2>/dev/null; }

names=(fibril fibril-level fibril-gc-luajit fibril-gc-120-100 nginx-lua)
ports=(18182 18183 18184 18185 18180)
pids+=("$(start cmd 18182 -- "$FIBRIL" run apps/hello --port '{PORT}' --env production)")
pids+=("$(FIBRIL_HTTP_LEVEL=1 start cmd 18183 -- "$FIBRIL" run apps/hello --port '{PORT}' --env production)")
pids+=("$(start cmd 18184 -- "$FIBRIL" run apps/hello --port '{PORT}' --env bench_gc_luajit)")
pids+=("$(start cmd 18185 -- "$FIBRIL" bench/hello_gc_fixed.lua '{PORT}' 120 100)")
pids+=("$(start nginx-lua 18180)")

rounds=$(mktemp)
echo "== HTTP latency tail: $URL_PATH, wrk 1 thread, 64 connections, ${DURATION}s, $ROUNDS rounds ($(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC'))"
for k in "${!ports[@]}"; do       # warm-up: the JIT and the peers' caches
  wrk -t1 -c64 -d1s "http://127.0.0.1:${ports[$k]}$URL_PATH" >/dev/null
done
n=${#ports[@]}
for r in $(seq "$ROUNDS"); do
  # Each round starts one target further on: where a run falls in the round biases it.
  for j in $(seq 0 $((n - 1))); do
    k=$(( (j + r) % n ))
    echo "${names[$k]} $(wrk -t1 -c64 -d"${DURATION}s" -s bench/wrk_percentiles.lua \
                          "http://127.0.0.1:${ports[$k]}$URL_PATH" | tail -1)" >>"$rounds"
  done
done
"$FIBRIL" bench/http_tail.lua "$rounds"
rm -f "$rounds"
