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

# http-compare.sh runs A,B,A,B...: on this VM the first of each pair runs worse (about 10% of
# req/s and 30% of p99 in one test, either server), so each comparison runs both ways and the
# ratio printed last is the geometric mean of the two (docs/benchmarks.md, 2026-12-07).
compare() {   # NAME_A PORT_A NAME_B PORT_B PATH: prints the summary rows; sets RATIO
  local out
  out=$("$HARNESS/http-compare.sh" --a "http://127.0.0.1:$2" --b "http://127.0.0.1:$4" \
          --a-name "$1" --b-name "$3" --path "$5" --conns 64 --threads 1 \
          --duration "$DURATION" --rounds "$ROUNDS") || true
  echo "$out" | grep -E 'median|http://' | grep -v '^http-compare' || true
  RATIO=$(echo "$out" | awk '/^ratio A\/B:/ { print $3 }')
  P99_FIBRIL+=" $(echo "$out" | awk '$1 == "fibril" && / ms / { print $(NF - 2) }')"
  local peer=$1
  [ "$peer" = fibril ] && peer=$3
  P99_PEER+=" $(echo "$out" | awk -v p="$peer" '$1 == p && / ms / { print $(NF - 2) }')"
}
echo "== HTTP throughput: wrk, 1 thread, 64 connections, ${DURATION}s x ${ROUNDS} rounds per target, each order ($(nproc) cores)"
for path in /hello /json; do
  for peer in "nginx-lua $NG_PORT" "node $ND_PORT"; do
    set -- $peer
    echo "-- $path: fibril first, then $1 first"
    P99_FIBRIL="" P99_PEER=""
    compare fibril "$FB_PORT" "$1" "$2" "$path"; first=$RATIO
    compare "$1" "$2" fibril "$FB_PORT" "$path"; second=$RATIO
    awk -v a="$first" -v b="$second" -v peer="$1" -v pf="$P99_FIBRIL" -v pp="$P99_PEER" 'BEGIN {
      split(pf, f, " "); split(pp, q, " ")
      if (a > 0 && b > 0) printf "fibril/%s req/s: %.2f fibril first, %.2f %s first; ratio: %.2f\n", peer, a, 1 / b, peer, sqrt(a / b)
      else print "ratio: n/a (a comparison failed)"
      if (f[1] > 0 && f[2] > 0 && q[1] > 0 && q[2] > 0)
        printf "p99 (geometric mean of both orders): fibril %.3f ms, %s %.3f ms\n", sqrt(f[1] * f[2]), peer, sqrt(q[1] * q[2]) }'
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
