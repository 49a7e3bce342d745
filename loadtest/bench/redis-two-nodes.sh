#!/usr/bin/env bash
# Cross-node fan-out through one Redis: two fanfare nodes (release build) on one
# redis-server, subscribers spread over both nodes, publishers on both nodes
# (client-side publish), so every publication crosses Redis to the other node.
# usage: loadtest/bench/redis-two-nodes.sh RATE [DURATION] [RUNS]
# Shape: SUBS subscribers over CHANNELS channels, PUBLISHERS client publishers
# (env, defaults 2000 / 10 / 40); WRITE_DELAY sets the nodes' client.write_delay
# (default 0s). Writes one JSON report per run into
# target/bench/redis-two-nodes[-TAG]-RATE-N.json (TAG from env) and prints a
# summary line per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${1:?rate (publications/s)}; DUR=${2:-15s}; RUNS=${3:-3}
SUBS=${SUBS:-2000}; CHANNELS=${CHANNELS:-10}; PUBLISHERS=${PUBLISHERS:-40}
WRITE_DELAY=${WRITE_DELAY:-0s}; TAG=${TAG:+-$TAG}
BIN=target/release/fanfare; LT=target/release/fanfare-loadtest
mkdir -p target/bench
. loadtest/bench/lib.sh   # free_port, wait_quiet, limits_off
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
[client]
write_delay = "$WRITE_DELAY"
$(limits_off)
[[namespaces]]
name = ""
allow_publish = true
TOML
  "$BIN" --config "$cfg" >"target/bench/node-$n.log" 2>&1 & pids+=($!); spids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$hp/ready" >/dev/null && break; sleep 0.1; done
  urls+=(--url "ws://127.0.0.1:$hp/connection/websocket")
done
for i in $(seq "$RUNS"); do
  [ -n "${QUIET_WAIT:-}" ] && wait_quiet
  out=target/bench/redis-two-nodes$TAG-$RATE-$i.json
  "$LT" fanout "${urls[@]}" -n "$SUBS" --channels "$CHANNELS" --rate "$RATE" --publishers "$PUBLISHERS" \
    -d "$DUR" --workers 2 --server-pid "${spids[0]}" --server-pid "${spids[1]}" --json -q >"$out" || true
  python3 - "$out" "$SUBS" "$CHANNELS" "$WRITE_DELAY" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["messages"]; l = m["latency_us"]
print(f"{sys.argv[1]}: subs {sys.argv[2]} channels {sys.argv[3]} write_delay {sys.argv[4]}: "
      f"published {m['publish_rate_per_second']:.0f}/s delivered {m['deliveries_per_second']:.0f}/s "
      f"lost/dup/ooo {m['lost']}/{m['duplicated']}/{m['out_of_order']} "
      f"p50/p99/p99.9/max {l['p50']/1e3:.2f}/{l['p99']/1e3:.2f}/{l['p999']/1e3:.2f}/{l['max']/1e3:.2f} ms "
      f"cpu nodes {r['server']['cpu_seconds_per_second']:.2f} gen {r['loadgen']['cpu_seconds_per_second']:.2f} "
      f"busy {r['machine']['cpu_busy_seconds_per_second']:.2f} irq {r['machine']['irq_cpu_seconds_per_second']:.2f} "
      f"us/delivery node {m['server_cpu_us_per_delivery']:.2f} gen {m['loadgen_cpu_us_per_delivery']:.2f} ok {r['ok']}")
PY
done
