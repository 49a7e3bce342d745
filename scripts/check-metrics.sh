#!/usr/bin/env bash
# Starts a node, drives one client through it, and lints /metrics with promtool.
set -euo pipefail
BIN=${1:?usage: check-metrics.sh <fanfare binary>}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/lib/node.sh"
log=/tmp/fanfare-metrics.$$.log
node_pid=
trap '[ -n "$node_pid" ] && kill $node_pid 2>/dev/null; rm -f $log' EXIT
start_node $log /health env FANFARE__SHUTDOWN__DRAIN_DELAY=0s FANFARE__SHUTDOWN__DRAIN_PERIOD=0s "$BIN" || exit 1
port=$node_port
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
