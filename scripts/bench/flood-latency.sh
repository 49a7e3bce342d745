#!/usr/bin/env bash
# Delivery latency of 100 subscribers while one client floods the node with
# 50 000 commands/s (scripts/bench/flood.py, reconnecting whenever closed),
# next to the same load without the flood, and with the flood but the command
# limits off. Each case RUNS times (default 3) on a fresh release node; prints
# one line per run and the medians of p50/p99.
#
#   scripts/bench/flood-latency.sh OUT_DIR
#   RUNS=3 DURATION=10s RATE=200 scripts/bench/flood-latency.sh /tmp/flood
#
# Run `cargo build --release -p fanfare-server -p fanfare-loadtest` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$1
mkdir -p "$OUT"
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
RUNS=${RUNS:-3}; DURATION=${DURATION:-10s}; RATE=${RATE:-200}

# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh"   # wait_quiet, free_port, wait_port

SERVER=; FLOODER=
stop() {
  if [ -n "$FLOODER" ]; then kill -TERM "$FLOODER" 2>/dev/null || true; wait "$FLOODER" 2>/dev/null || true; fi
  if [ -n "$SERVER" ]; then kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  FLOODER=; SERVER=
}
trap stop EXIT

for run in $(seq "$RUNS"); do
  for case in unloaded flood flood-unlimited; do
    wait_quiet
    port=$(free_port)
    {
      printf '[http]\nlisten = "127.0.0.1:%s"\n[grpc]\nlisten = "127.0.0.1:%s"\n' "$port" "$(free_port)"
      printf '[log]\nlevel = "warn"\n[[namespaces]]\nname = ""\nallow_publish = true\n'
      # The default [limits], or the command limits off.
      if [ "$case" = flood-unlimited ]; then printf '[limits]\nclient_commands = 0\nuser_commands = 0\n'; fi
    } > "$OUT/$case.toml"
    "$FANFARE" --config "$OUT/$case.toml" >>"$OUT/$case.log" 2>&1 &
    SERVER=$!
    wait_port "$port" || { echo "fanfare did not start" >&2; exit 1; }
    if [ "$case" != unloaded ]; then
      python3 "$ROOT/scripts/bench/flood.py" "$port" 3600 500 127.0.0.2 >"$OUT/$case-$run.flood.json" &
      FLOODER=$!
      sleep 1
    fi
    "$LOADTEST" fanout --url "ws://127.0.0.1:$port/connection/websocket" -n 100 --channels 1 \
      --rate "$RATE" --duration "$DURATION" --server-pid "$SERVER" --json --quiet \
      >"$OUT/$case-$run.json" 2>/dev/null || true
    stop
    python3 - "$OUT/$case-$run.json" "$case" "$run" "$OUT/$case-$run.flood.json" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1])); m = r["messages"]; l = m["latency_us"]
flood = ""
if os.path.exists(sys.argv[4]) and os.path.getsize(sys.argv[4]):
    f = json.load(open(sys.argv[4])); flood = f"  flooder: {f['commands']} commands, closes {f['closes']}"
print(f"{sys.argv[2]:16} run {sys.argv[3]}  p50 {l['p50']/1000:7.2f} ms  p99 {l['p99']/1000:7.2f} ms  "
      f"lost {m['lost']}  delivered/s {m['deliveries_per_second']:.0f}{flood}")
PY
  done
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for case in ["unloaded", "flood", "flood-unlimited"]:
    ls = [json.load(open(f"{out}/{case}-{r}.json"))["messages"]["latency_us"] for r in range(1, runs + 1)]
    p50 = statistics.median(l["p50"] for l in ls) / 1000
    p99 = statistics.median(l["p99"] for l in ls) / 1000
    print(f"median {case:16} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
PY
