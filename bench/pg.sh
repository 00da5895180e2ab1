#!/usr/bin/env bash
# bench/pg.sh: fibril.pg against pgbench on the same PostgreSQL in the same run (started by
# scripts/with-services unless DATABASE_URL is set). Baseline: `pgbench -S -c 20 -j 2 -T D`
# (simple and prepared query modes); then bench/pg.lua: the same primary-key select from 20
# fibers through a pool of 20, with and without automatic prepared statements. Prints the
# figures and the ratios to pgbench (target >= 0.8x). Last, the fiber proof: 100 requests to
# apps/hello's GET /sleep (pg_sleep(0.1), pool of 20), 20 at a time (bench/pg_sleep.lua).
# Asserts nothing. DURATION, SCALE, CLIENTS tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
if [ -z "${DATABASE_URL:-}" ]; then exec scripts/with-services "$0" "$@"; fi
DURATION=${DURATION:-10} SCALE=${SCALE:-1} CLIENTS=${CLIENTS:-20}
FIBRIL="$PWD/$BUILD/fibril"
PGBENCH=${PGBENCH:-$(command -v pgbench || echo /usr/lib/postgresql/15/bin/pgbench)}

echo "== pgbench -i -s $SCALE ($(nproc) cores, $(date -u +%Y-%m-%d), $("$PGBENCH" --version))"
"$PGBENCH" -q -i -s "$SCALE" "$DATABASE_URL" >/dev/null 2>&1

tps_of() { sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\)/\1/p'; }
echo "== pgbench -S -c $CLIENTS -j 2 -T $DURATION"
simple=$("$PGBENCH" -n -S -c "$CLIENTS" -j 2 -T "$DURATION" "$DATABASE_URL" 2>/dev/null | tps_of)
echo "pgbench -M simple:   $simple tps"
prepared=$("$PGBENCH" -n -S -M prepared -c "$CLIENTS" -j 2 -T "$DURATION" "$DATABASE_URL" 2>/dev/null | tps_of)
echo "pgbench -M prepared: $prepared tps"

echo "== fibril bench/pg.lua: $CLIENTS fibers, pool of $CLIENTS"
out_p=$("$FIBRIL" bench/pg.lua "$DATABASE_URL" "$DURATION" "$CLIENTS" "$SCALE" 1)
echo "$out_p"
out_u=$("$FIBRIL" bench/pg.lua "$DATABASE_URL" "$DURATION" "$CLIENTS" "$SCALE" 0 | head -1)
echo "$out_u"
# Pipeline mode: the same selects sent 10 per round trip (pool:batch), on 20 and on 4 connections.
out_b=$("$FIBRIL" bench/pg.lua "$DATABASE_URL" "$DURATION" "$CLIENTS" "$SCALE" 1 10)
echo "$out_b"
out_b4=$("$FIBRIL" bench/pg.lua "$DATABASE_URL" "$DURATION" 4 "$SCALE" 1 10)
echo "$out_b4"
fp=$(echo "$out_p" | sed -nE '1s/.* = ([0-9]+) tps/\1/p')
fu=$(echo "$out_u" | sed -nE '1s/.* = ([0-9]+) tps/\1/p')
fb=$(echo "$out_b" | sed -nE '1s/.* = ([0-9]+) tps/\1/p')
fb4=$(echo "$out_b4" | sed -nE '1s/.* = ([0-9]+) tps/\1/p')
awk -v fp="$fp" -v fu="$fu" -v fb="$fb" -v fb4="$fb4" -v s="$simple" -v p="$prepared" 'BEGIN {
  printf "ratio fibril (prepared) / pgbench -S (simple):     %.2fx (target >= 0.8x)\n", fp / s
  printf "ratio fibril (prepared) / pgbench -S -M prepared:  %.2fx\n", fp / p
  printf "ratio fibril (unprepared) / pgbench -S (simple):   %.2fx\n", fu / s
  printf "prepared-statement gain, fibril at %s fibers:      %.2fx\n", 20, fp / fu
  printf "pipeline mode (batches of 10), 20 connections:    %.2fx pgbench -S, %.2fx fibril one at a time\n", fb / s, fb / fp
  printf "pipeline mode (batches of 10), 4 connections:     %.2fx pgbench -S, %.2fx fibril one at a time\n", fb4 / s, fb4 / fp
}'

echo "== apps/hello GET /sleep (pg_sleep(0.1) through a pool of 20), 100 requests, 20 at a time"
PORT=${PORT:-18097}
"$FIBRIL" run apps/hello --port "$PORT" --env production >/dev/null 2>&1 &
app=$!
trap 'kill $app 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/hello" && break; sleep 0.05; done
"$FIBRIL" bench/pg_sleep.lua "$PORT" 100 20
if command -v wrk >/dev/null; then   # the same with wrk: 20 connections for 3 s (ideal 200 req/s)
  wrk -t 2 -c 20 -d 3s "http://127.0.0.1:$PORT/sleep" | grep -E "Requests/sec|requests in|Non-2xx" || true
fi
kill $app; wait $app 2>/dev/null || true
