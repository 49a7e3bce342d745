#!/usr/bin/env bash
# Cross-node fan-out through one Redis: two fanfare nodes (release build) on one
# redis-server, subscribers spread over both nodes, publishers on both nodes
# (client-side publish), so every publication crosses Redis to the other node.
# usage: loadtest/bench/redis-two-nodes.sh RATE [DURATION] [RUNS]
# Prints one JSON report per run into target/bench/redis-two-nodes-RATE-N.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${1:?rate (publications/s)}; DUR=${2:-15s}; RUNS=${3:-3}
SUBS=${SUBS:-2000}; CHANNELS=${CHANNELS:-10}; PUBLISHERS=${PUBLISHERS:-40}
BIN=target/release/fanfare; LT=target/release/fanfare-loadtest
mkdir -p target/bench
. loadtest/bench/lib.sh   # free_port
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
rport=$(free_port)
redis-server --save '' --appendonly no --port "$rport" >/dev/null 2>&1 & pids+=($!)
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
urls=(); spids=()
for n in a b; do
  hp=$(free_port); gp=$(free_port)
  cfg=target/bench/node-$n.toml
  cat >"$cfg" <<TOML
[node]
name = "bench-$n"
[http]
listen = "127.0.0.1:$hp"
[grpc]
listen = "127.0.0.1:$gp"
[broker]
kind = "redis"
[redis]
urls = ["redis://127.0.0.1:$rport"]
[log]
level = "warn"
[[namespaces]]
name = ""
allow_publish = true
TOML
  "$BIN" --config "$cfg" >"target/bench/node-$n.log" 2>&1 & pids+=($!); spids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$hp/ready" >/dev/null && break; sleep 0.1; done
  urls+=(--url "ws://127.0.0.1:$hp/connection/websocket")
done
for i in $(seq "$RUNS"); do
  out=target/bench/redis-two-nodes-$RATE-$i.json
  "$LT" fanout "${urls[@]}" -n "$SUBS" --channels "$CHANNELS" --rate "$RATE" --publishers "$PUBLISHERS" \
    -d "$DUR" --workers 2 --server-pid "${spids[0]}" --server-pid "${spids[1]}" --json -q >"$out" || true
  python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
def find(o, *keys):
    for k in keys:
        if isinstance(o, dict) and k in o: return o[k]
    return None
print(json.dumps({k: r.get(k) for k in list(r)[:0]}) if False else "", end="")
res = r.get("results", r)
print(sys.argv[1], json.dumps(res)[:1500])
PY
done
