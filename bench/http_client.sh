#!/usr/bin/env bash
# bench/http_client.sh: fibril.http (64 fibers, keep-alive) against wrk (1 thread, 64
# connections: the practical limit) on the nginx peer's /hello, alternating, in the same run;
# then the fan-out latency of 100 concurrent 50 ms calls. Prints figures and the ratio,
# asserts nothing. Targets (issue 9): >= 0.5x wrk; fan-out within 1.3 x 50 ms + one round trip.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
HARNESS=${HARNESS:-../shared/bench}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5} CONNS=${CONNS:-64}
FIBRIL="$PWD/$BUILD/fibril"

bash "$HARNESS/install-peers.sh" >/dev/null
NG_PORT=${NG_PORT:-18090}
NG=$("$HARNESS/peers/start.sh" nginx-lua "$NG_PORT" 2>/dev/null)
trap '"$HARNESS/peers/stop.sh" "$NG" >/dev/null 2>&1 || true' EXIT
url="http://127.0.0.1:$NG_PORT/hello"
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "== HTTP client: $CONNS concurrent, nginx-lua /hello, ${DURATION}s x $ROUNDS rounds ($(nproc) cores)"
wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null 2>&1 || true          # warm-up
w=() f=()
for r in $(seq "$ROUNDS"); do
  w+=("$(wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" | awk '/^Requests\/sec/ { print $2 }')")
  f+=("$("$FIBRIL" bench/http_client.lua rps "$url" "$CONNS" "$DURATION" \
        | sed -E 's/^fibril client: ([0-9.]+) requests.*/\1/')")
  echo "round $r: wrk ${w[-1]} req/s, fibril ${f[-1]} req/s"
done
wm=$(printf '%s\n' "${w[@]}" | median); fm=$(printf '%s\n' "${f[@]}" | median)
printf 'median: wrk %.0f req/s, fibril client %.0f req/s, ratio %.2f (target >= 0.5)\n' \
  "$wm" "$fm" "$(echo "$fm / $wm" | bc -l)"

echo "== fan-out latency"
"$FIBRIL" bench/http_client.lua fanout 100 50 "${ROUNDS}"
