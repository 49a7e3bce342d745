#!/usr/bin/env bash
# Single-node benchmarks behind docs/BENCHMARKS.md ("Single node, memory broker").
# Each run starts a fresh release `fanfare` (memory broker, client publish allowed,
# default 25 s pings), runs fanfare-loadtest against it with --json, and stops it.
#
#   loadtest/bench/single-node.sh OUT_DIR idle N HOLD [extra loadtest flags]
#   loadtest/bench/single-node.sh OUT_DIR fanout RATE [extra loadtest flags]
#   loadtest/bench/summarize.py OUT_DIR        # medians per configuration
#
# WRITE_DELAY (env) sets the node's client.write_delay (default 0s).
# Run `cargo build --release -p fanfare-server -p fanfare-loadtest` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$1; KIND=$2; shift 2
mkdir -p "$OUT"
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
PORT=${PORT:-18400}

# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh"   # wait_quiet, wait_port, node_config

start_server() {
  { node_config "$PORT"; cat <<EOF
[client]
write_delay = "${WRITE_DELAY:-0s}"
[[namespaces]]
name = ""
allow_publish = true
EOF
  } > "$OUT/fanfare.toml"
  "$FANFARE" --config "$OUT/fanfare.toml" >>"$OUT/fanfare.log" 2>&1 &
  SERVER=$!
  wait_port "$PORT" && return 0
  echo "fanfare did not start" >&2; exit 1
}

stop_server() {
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

URL=ws://127.0.0.1:$PORT/connection/websocket
# A run during which other processes used CPU is moved to OUT/noisy/ and
# repeated (at most ATTEMPTS times).
for attempt in $(seq "${ATTEMPTS:-4}"); do
  wait_quiet
  case $KIND in
    idle)
      N=$1; HOLD=$2
      NAME="idle-n$N-$(date +%s)"
      start_server
      "$LOADTEST" idle --url "$URL" -n "$N" --subs 1 --ramp 0 --hold "$HOLD" --settle 3s \
        --server-pid "$SERVER" --json --quiet "${@:3}" >"$OUT/$NAME.json" 2>"$OUT/$NAME.txt" || true
      ;;
    fanout)
      RATE=$1
      NAME="fanout-r$RATE-$(date +%s)"
      start_server
      "$LOADTEST" fanout --url "$URL" --rate "$RATE" --server-pid "$SERVER" --json --quiet "${@:2}" \
        >"$OUT/$NAME.json" 2>"$OUT/$NAME.txt" || true
      ;;
    *) echo "unknown kind $KIND" >&2; exit 2 ;;
  esac
  stop_server
  cat "$OUT/$NAME.txt"
  grep -q "other processes used" "$OUT/$NAME.json" || break
  mkdir -p "$OUT/noisy"
  mv "$OUT/$NAME.json" "$OUT/$NAME.txt" "$OUT/noisy/"
done
trap - EXIT
