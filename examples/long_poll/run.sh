#!/usr/bin/env bash
# examples/long_poll/run.sh FIBRIL: serves this app, long-polls it with curl the way the page
# does, and checks the answers; exits 0 when they are right (scripts/run-examples runs it).
set -euo pipefail
FIBRIL=${1:-fibril}
case $FIBRIL in */*) FIBRIL=$(realpath "$FIBRIL") ;; esac
cd "$(dirname "$0")"
log=$(mktemp)
"$FIBRIL" run . --port 0 --env test >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q 'url="http' "$log" && break; sleep 0.05; done
port=$(sed -n 's/.*url="http:\/\/[^:]*:\([0-9]*\)".*/\1/p' "$log" | head -1)
[ -n "$port" ] || { cat "$log"; exit 1; }
base="http://127.0.0.1:$port"

# A poll in flight gets the next message as soon as it is said.
curl -s --max-time 10 "$base/poll?timeout=5" >"$log.poll" &
poller=$!
sleep 0.3
first=$(curl -s --max-time 5 --data-binary 'hello' "$base/say")
wait $poller
grep -q '"message":"hello"' "$log.poll" || { echo "waiting poll got: $(cat "$log.poll")"; exit 1; }
id=$(echo "$first" | sed 's/.*"id":"\([^"]*\)".*/\1/')

# Messages said while no one polled are handed over at once, after the id seen last.
curl -s --max-time 5 --data-binary 'two' "$base/say" >/dev/null
curl -s --max-time 5 --data-binary 'three' "$base/say" >/dev/null
got=$(curl -s --max-time 5 "$base/poll?after=$id")
echo "$got" | grep -q '"message":"two".*"message":"three"' || { echo "catch-up got: $got"; exit 1; }

# Nothing new: 204 after the timeout.
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$base/poll?after=$(echo "$got" | sed 's/.*"id":"\([^"]*\)".*/\1/')&timeout=0.3")
[ "$code" = 204 ] || { echo "idle poll answered $code"; exit 1; }
rm -f "$log.poll"
echo "long_poll: waiting poll, catch-up and timeout all answered as expected"
