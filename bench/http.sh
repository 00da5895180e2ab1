#!/usr/bin/env bash
# bench/http.sh: apps/hello (one process) against nginx + lua-nginx-module (one worker) and
# Node.js http, on /hello and /json, 64 keep-alive connections, with ../shared/bench's harness;
# then the RSS of each server holding 10,000 idle keep-alive connections.
# Prints figures and ratios, asserts nothing. ROUNDS, DURATION and CONNS tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
HARNESS=${HARNESS:-../shared/bench}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5} IDLE=${IDLE:-10000}
FIBRIL="$PWD/$BUILD/fibril"

bash "$HARNESS/install-peers.sh" >/dev/null
pids=()
stop_all() { [ ${#pids[@]} -eq 0 ] || "$HARNESS/peers/stop.sh" "${pids[@]}" >/dev/null 2>&1 || true; }
trap stop_all EXIT

start() {   # NAME PORT [-- CMD]: prints the pid
  "$HARNESS/peers/start.sh" "$@" 2>/dev/null
}
FB_PORT=18082 NG_PORT=18080 ND_PORT=18081
FB=$(start cmd $FB_PORT -- "$FIBRIL" run apps/hello --port '{PORT}' --env production); pids+=("$FB")
NG=$(start nginx-lua $NG_PORT); pids+=("$NG")
ND=$(start node $ND_PORT); pids+=("$ND")

echo "== HTTP throughput: wrk, 1 thread, 64 connections, ${DURATION}s x ${ROUNDS} rounds per target ($(nproc) cores)"
for path in /hello /json; do
  for peer in "nginx-lua $NG_PORT" "node $ND_PORT"; do
    set -- $peer
    echo "-- $path: fibril vs $1"
    "$HARNESS/http-compare.sh" --a "http://127.0.0.1:$FB_PORT" --b "http://127.0.0.1:$2" \
      --a-name fibril --b-name "$1" --path "$path" --conns 64 --threads 1 \
      --duration "$DURATION" --rounds "$ROUNDS" | grep -E 'median|ratio|http://' || true
  done
done

echo "== RSS with $IDLE idle keep-alive connections (each server freshly started)"
stop_all; pids=()
for spec in "fibril $FB_PORT" "nginx-lua $NG_PORT" "node $ND_PORT"; do
  set -- $spec
  if [ "$1" = fibril ]; then
    pid=$(start cmd "$2" -- "$FIBRIL" run apps/hello --port '{PORT}' --env production)
  else
    pid=$(start "$1" "$2")
  fi
  pids+=("$pid")
  sleep 0.5
  echo "-- $1"
  "$FIBRIL" bench/idle_conns.lua "$2" "$pid" "$IDLE"
  "$HARNESS/peers/stop.sh" "$pid" >/dev/null 2>&1 || true
  pids=()
done
