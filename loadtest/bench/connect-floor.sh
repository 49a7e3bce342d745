#!/usr/bin/env bash
# Connect rate of a fanfare node next to the machine's floor, side by side:
# the same generator run against a fresh release `fanfare` (memory broker) and
# against `fanfare-loadtest floor-server` (accept, upgrade, fixed `connect`
# reply, nothing else), alternating, RUNS times each, on a quiet machine.
#
#   loadtest/bench/connect-floor.sh OUT_DIR [extra loadtest flags]
#   N=10000 SUBS=0 RUNS=3 loadtest/bench/connect-floor.sh /tmp/floor
#
# Prints one summary line per run (rate, CPU per connect of each side and its
# kernel share) and keeps every JSON report in OUT_DIR.
# Run `cargo build --release -p fanfare-server -p fanfare-loadtest` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$1; shift
mkdir -p "$OUT"
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
N=${N:-10000}; SUBS=${SUBS:-0}; RUNS=${RUNS:-3}
PORT=${PORT:-18600}

# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh"   # wait_quiet, wait_port, node_config

SERVER=
stop_server() {
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=
}
trap stop_server EXIT

start() {
  case $1 in
    fanfare)
      node_config "$PORT" > "$OUT/fanfare.toml"
      "$FANFARE" --config "$OUT/fanfare.toml" >>"$OUT/fanfare.log" 2>&1 &
      ;;
    floor) "$LOADTEST" floor-server "127.0.0.1:$PORT" >>"$OUT/floor.log" 2>&1 & ;;
  esac
  SERVER=$!
  wait_port "$PORT" || { echo "$1 did not start" >&2; exit 1; }
}

for run in $(seq "$RUNS"); do
  for target in fanfare floor; do
    wait_quiet
    start "$target"
    NAME="$target-n$N-s$SUBS-$run"
    "$LOADTEST" idle --url "ws://127.0.0.1:$PORT/connection/websocket" -n "$N" --subs "$SUBS" \
      --ramp 0 --hold 1s --settle 1s --workers 2 --server-pid "$SERVER" --json --quiet "$@" \
      >"$OUT/$NAME.json" 2>"$OUT/$NAME.txt" || true
    stop_server
    python3 - "$OUT/$NAME.json" "$target" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); k = r["connect"]; m = r["machine_connect"]
pct = lambda v: "?" if v is None else f"{100 * v:.0f}%"
print(f"{sys.argv[2]:8} rate {k['rate_per_second']:8.0f}/s  server {k['server_cpu_us_per_connect']:6.1f} us"
      f" (kernel {pct(k['server_kernel_share'])})  loadgen {k['loadgen_cpu_us_per_connect']:6.1f} us"
      f" (kernel {pct(k['loadgen_kernel_share'])})  irq {m['irq_cpu_seconds_per_second']}"
      f"  other {m['other_cpu_seconds_per_second']}  ok {r['ok']}")
EOF
  done
done
trap - EXIT
