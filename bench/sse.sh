#!/usr/bin/env bash
# bench/sse.sh: SSE streams held by one fibril process (apps/hello GET /sse, the endpoint
# contract of ../shared/bench/README.md) against nginx + Lua and Node.js, with
# ../shared/bench/sse-hold.js: CONNS connections (default 10,000) for DURATION s, one event per
# connection every 100 ms and every 1000 ms. Prints connections held, RSS per connection,
# delivery lag p50/p99 and server CPU per 1,000 deliveries. Then the redis adapter: two fibril
# processes, each holding CONNS/2 streams of one channel, and a third process broadcasting on
# it every 100 ms through Redis. Figures only, nothing asserted. INTERVALS="1000" (default
# "100 1000"), CONNS, DURATION and ONLY=redis narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
HARNESS=${HARNESS:-../shared/bench}
FIBRIL="$PWD/$BUILD/fibril"
CONNS=${CONNS:-10000} DURATION=${DURATION:-10}
FB_PORT=18072 NG_PORT=18070 ND_PORT=18071 R1_PORT=18073 R2_PORT=18074

bash "$HARNESS/install-peers.sh" >/dev/null
tmp=$(mktemp -d)
pids=()
redis_pid=""
stop_all() {
  [ ${#pids[@]} -eq 0 ] || "$HARNESS/peers/stop.sh" "${pids[@]}" >/dev/null 2>&1 || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap stop_all EXIT
start() { "$HARNESS/peers/start.sh" "$@" 2>/dev/null; }

hold() {  # NAME URL PID -> one JSON line in $tmp/NAME.json
  node "$HARNESS/sse-hold.js" --url "$2" --conns "$CONNS" --duration "$DURATION" --pid "$3" \
    --json >"$tmp/$1.json" 2>"$tmp/$1.err" || true
}
field() { node -e 'let v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  for (const k of process.argv[2].split(".")) v = v == null ? v : v[k];
  console.log(v === null || v === undefined ? "-" : v)' "$1" "$2"; }
report() {  # NAME
  local f="$tmp/$1.json"
  if [ ! -s "$f" ]; then printf '%-22s (no result: %s)\n' "$1" "$(tail -1 "$tmp/$1.err")"; return; fi
  local eps cpu per1k
  eps=$(field "$f" events_per_s); cpu=$(field "$f" server_cpu_pct)
  per1k=$(node -e 'const [e, c] = process.argv.slice(1).map(Number);
    console.log(e > 0 ? (c / 100 * 1000 / e * 1000).toFixed(2) : "-")' "$eps" "$cpu")
  printf '%-22s %6s/%-6s %10s %8s %8s %9s %9s %8s %10s\n' "$1" "$(field "$f" open_at_end)" \
    "$(field "$f" conns)" "$eps" "$(field "$f" lag_ms.p50)" "$(field "$f" lag_ms.p99)" \
    "$(field "$f" rss_per_conn_kb)" "$(field "$f" rss_slope_kb_per_conn)" "$cpu" "$per1k"
}

if [ "${ONLY:-}" != redis ]; then
FB=$(start cmd $FB_PORT -- "$FIBRIL" run apps/hello --port '{PORT}' --env production); pids+=("$FB")
NG=$(start nginx-lua $NG_PORT); pids+=("$NG")
ND=$(start node $ND_PORT); pids+=("$ND")

echo "== SSE: $CONNS connections held ${DURATION}s, one event per connection per interval ($(nproc) cores)"
for interval in ${INTERVALS:-100 1000}; do
  hold "fibril-$interval" "http://127.0.0.1:$FB_PORT/sse?interval=$interval" "$FB"
  hold "nginx-lua-$interval" "http://127.0.0.1:$NG_PORT/sse?interval=$interval" "$NG"
  hold "node-$interval" "http://127.0.0.1:$ND_PORT/sse?interval=$interval" "$ND"
done
printf '%-22s %13s %10s %8s %8s %9s %9s %8s %10s\n' target open/conns events/s "p50 ms" "p99 ms" \
  "KiB/conn" "slope" "cpu %" "cpu ms/1k"
for interval in ${INTERVALS:-100 1000}; do
  for n in fibril nginx-lua node; do report "$n-$interval"; done
done
fi

echo "== SSE through the redis adapter: 2 fibril processes x $((CONNS / 2)) streams, 1 broadcaster"
port=$((20000 + RANDOM % 12000))   # below the ephemeral range
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --daemonize no >"$tmp/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
export PUBSUB_URL="redis://127.0.0.1:$port/0"
R1=$(start cmd $R1_PORT -- "$FIBRIL" run apps/hello --port '{PORT}' --env bench_redis); pids+=("$R1")
R2=$(start cmd $R2_PORT -- "$FIBRIL" run apps/hello --port '{PORT}' --env bench_redis); pids+=("$R2")
saved=$CONNS; CONNS=$((saved / 2))
hold redis-a "http://127.0.0.1:$R1_PORT/channel/bench" "$R1" &
ha=$!
hold redis-b "http://127.0.0.1:$R2_PORT/channel/bench" "$R2" &
hb=$!
sleep 3   # the streams open before the broadcasts start
"$FIBRIL" bench/sse_broadcast.lua bench 100 $((DURATION + 6)) >"$tmp/broadcast.out" 2>&1 || true
wait $ha $hb
CONNS=$saved
printf '%-22s %13s %10s %8s %8s %9s %9s %8s %10s\n' target open/conns events/s "p50 ms" "p99 ms" \
  "KiB/conn" "slope" "cpu %" "cpu ms/1k"
report redis-a
report redis-b
