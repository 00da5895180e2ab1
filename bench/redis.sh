#!/usr/bin/env bash
# bench/redis.sh: fibril's Redis client against redis-benchmark (C on hiredis: the practical
# limit), on one throw-away redis-server in the same run: 50 clients, SET and GET, without and
# with pipelines of 100. Prints requests per second and the ratios; asserts nothing.
# Targets (issue 6): non-pipelined >= 0.7x redis-benchmark, pipelined >= 0.5x its -P 100.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
N=${N:-200000} CLIENTS=${CLIENTS:-50} ROUNDS=${ROUNDS:-3}
tmp=$(mktemp -d)
port=$((20000 + RANDOM % 12000))   # below the ephemeral range
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --daemonize no >"$tmp/redis.log" 2>&1 &
rpid=$!
trap 'kill $rpid 2>/dev/null; wait $rpid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done

rb() {  # redis-benchmark's requests per second for test $1 with extra args
  redis-benchmark -p "$port" -t "$1" -c "$CLIENTS" -n "$N" -q "${@:2}" 2>/dev/null \
    | tr '\r' '\n' | grep -E "^${1^^}: [0-9.]+ requests per second" | tail -1 \
    | sed -E 's/^[A-Z]+: ([0-9.]+) requests.*/\1/'
}
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "== Redis: $CLIENTS clients, $N requests per test, median of $ROUNDS rounds ($(nproc) cores)"
declare -A base fib
for t in set get; do
  base[$t]=$(for _ in $(seq "$ROUNDS"); do rb $t; done | median)
  base[$t-P]=$(for _ in $(seq "$ROUNDS"); do rb $t -P 100; done | median)
done
for r in $(seq "$ROUNDS"); do
  "$BUILD/fibril" bench/redis.lua "redis://127.0.0.1:$port/0" "$N" "$CLIENTS" >"$tmp/fib.$r"
done
pick() { grep -h "^fibril $1:" "$tmp"/fib.* | sed -E 's/.*: ([0-9.]+) requests.*/\1/' | median; }
fib[set]=$(pick SET); fib[get]=$(pick GET)
fib[set-P]=$(pick "SET -P 100"); fib[get-P]=$(pick "GET -P 100")
printf '%-14s %14s %14s %8s %8s\n' test redis-benchmark fibril ratio target
for k in set get set-P get-P; do
  target=0.7; [[ $k == *-P ]] && target=0.5
  printf '%-14s %14.0f %14.0f %8.2f %8s\n' "$k" "${base[$k]}" "${fib[$k]}" \
    "$(echo "${fib[$k]} / ${base[$k]}" | bc -l)" ">= $target"
done
