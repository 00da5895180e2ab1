#!/usr/bin/env bash
# examples/events/run.sh FIBRIL: serves this app, places orders, waits for the deferred ledger
# task of each (the first one fails once and is retried), prints the event tree, then kills
# the server with SIGKILL while a task is pending and shows the restart running it.
set -euo pipefail
FIBRIL=${1:-fibril}
case $FIBRIL in */*) FIBRIL=$(realpath "$FIBRIL") ;; esac
cd "$(dirname "$0")"
export LEDGER_DIR; LEDGER_DIR=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$LEDGER_DIR"
}
trap cleanup EXIT

start() {
  rm -f "$LEDGER_DIR/log"         # else the wait below may read the previous server's line
  "$FIBRIL" run . --port 0 --env test >"$LEDGER_DIR/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -qs 'url="http' "$LEDGER_DIR/log" && break; sleep 0.05; done
  port=$(sed -n 's/.*url="http:\/\/[^:]*:\([0-9]*\)".*/\1/p' "$LEDGER_DIR/log" | head -1)
  [ -n "$port" ] || { cat "$LEDGER_DIR/log"; exit 1; }
}
lines() { [ -f "$LEDGER_DIR/ledger" ] && wc -l <"$LEDGER_DIR/ledger" || echo 0; }
wait_lines() {
  for _ in $(seq 100); do [ "$(lines)" -ge "$1" ] && return; sleep 0.05; done
  echo "the ledger has $(lines) lines, expected $1"; cat "$LEDGER_DIR/log"; exit 1
}

"$FIBRIL" events .
start
for i in 1 2 3; do curl -s --max-time 5 -X POST "http://127.0.0.1:$port/orders/$i"; echo; done
wait_lines 3
grep -q 'msg="deferred task failed: retrying"' "$LEDGER_DIR/log" || { echo "no retry logged"; exit 1; }
kill "$pid"; wait "$pid" || true

# The crash: the task for order 4 is durable when the response comes, then SIGKILL.
LEDGER_HOLD=1 start
curl -s --max-time 5 -X POST "http://127.0.0.1:$port/orders/4"; echo
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
start
wait_lines 4
kill "$pid"; wait "$pid" || true
pid=""
echo "ledger:"; cat "$LEDGER_DIR/ledger"
echo "events: 4 orders, 4 ledger lines (one retried, one replayed after SIGKILL)"
