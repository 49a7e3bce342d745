#!/usr/bin/env bash
# Starts a node, drives one client through it, and lints /metrics with promtool.
set -euo pipefail
BIN=${1:?usage: check-metrics.sh <fanfare binary>}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log=/tmp/fanfare-metrics.$$.log
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -f $log' EXIT
# Ready once the node logged that it holds both ports (a /health answer alone
# may come from another suite's node on the port); it exits when a port was
# taken between choosing and binding: retry on new ports.
for attempt in 1 2 3; do
  port=$(free_port); gport=$(free_port)
  FANFARE__SHUTDOWN__DRAIN_DELAY=0s FANFARE__SHUTDOWN__DRAIN_PERIOD=0s \
  FANFARE__HTTP__LISTEN=127.0.0.1:$port FANFARE__GRPC__LISTEN=127.0.0.1:$gport "$BIN" >$log 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    kill -0 $pid 2>/dev/null || break
    grep -q "control API listening" $log && curl -sf "http://127.0.0.1:$port/health" >/dev/null && break 2
    sleep 0.1
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null; pid=
  echo "check-metrics: the node did not start (attempt $attempt):"; cat $log
done
[ -n "$pid" ] || exit 1
# One client session so that connection, command and message metrics exist.
node -e '
const WebSocket = require(process.argv[1] + "/tests/sdk/node_modules/ws");
const ws = new WebSocket("ws://127.0.0.1:" + process.argv[2] + "/connection/websocket");
ws.on("open", () => ws.send("{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"m\"}}"));
ws.on("message", () => { ws.close(); });
ws.on("close", () => process.exit(0));
setTimeout(() => process.exit(1), 5000);
' "$ROOT" "$port"
# One control API call so that API metrics exist.
curl -sf -XPOST "http://127.0.0.1:$port/api/publish" -d '{"channel":"m","data":{"n":1}}' >/dev/null
# And one of the Centrifugo-compatible API (its own protocol label).
curl -sf -XPOST "http://127.0.0.1:$port/centrifugo/api/publish" -d '{"channel":"m","data":{"n":2}}' >/dev/null
sleep 0.2
body=$(curl -sf "http://127.0.0.1:$port/metrics")
for m in fanfare_connections fanfare_connects_total fanfare_disconnects_total fanfare_messages_sent_total fanfare_commands_total fanfare_api_requests_total fanfare_api_request_duration_seconds_bucket; do
  grep -q "^$m" <<<"$body" || { echo "metric $m missing from /metrics"; exit 1; }
done
out=$(promtool check metrics <<<"$body" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "promtool findings:"; echo "$out"; exit 1; fi
echo "metrics ok: $(grep -c '^fanfare_' <<<"$body") series, promtool clean"
