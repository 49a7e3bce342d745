#!/usr/bin/env bash
# fanfare's JSON and Protobuf client protocols side by side on the same node
# build: the same fanout shapes with `fanfare-loadtest --protocol json` and
# `--protocol protobuf`, alternating (json, protobuf, json, ...) so that
# noise from other work on the machine hits both, each run against a freshly
# started release node (memory broker, anonymous clients, client publishing
# allowed, 25 s pings, log level warn). Prints medians per protocol and the
# protobuf/json ratios (scripts/bench/compare_protocols.py).
#
#   scripts/bench/compare-protocols.sh [--out DIR] [--runs N] [--shapes busy,broadcast] [--no-build]
#
# Shapes (the ones docs/BENCHMARKS.md uses for the JSON figures):
#   busy       100 subscribers on 1 channel, 10 publishers, 2 000 publications/s
#              (200 000 deliveries/s, ~10 messages per socket write)
#   broadcast  2 000 subscribers over 10 channels, 200 publications/s
#              (40 000 deliveries/s, one message per write)
# Environment: RUNS=3, DURATION=10s, PAYLOAD=128, WORKERS=2,
#   QUIET_WAIT=300 (longest wait for a quiet machine before each run; the
#   `uptime` load averages before each run are kept next to its report).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh" # wait_quiet, free_port, wait_port, node_config

OUT=""; SHAPES=busy,broadcast; BUILD=1; RUNS_ARG=""
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift ;;
    --runs) RUNS_ARG=$2; shift ;;
    --shapes) SHAPES=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
: "${RUNS:=3}" "${DURATION:=10s}" "${PAYLOAD:=128}" "${WORKERS:=2}" "${QUIET_WAIT:=300}"
RUNS=${RUNS_ARG:-$RUNS}
export QUIET_WAIT
OUT=${OUT:-$ROOT/target/bench/protocols-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/runs"
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
[ $BUILD = 1 ] && cargo build --release -p fanfare-server -p fanfare-loadtest

COMMIT=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- crates loadtest Cargo.lock 2>/dev/null || COMMIT="$COMMIT+dirty"
cat >"$OUT/meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "fanfare_commit": "$COMMIT",
 "command": "RUNS=$RUNS DURATION=$DURATION PAYLOAD=$PAYLOAD WORKERS=$WORKERS scripts/bench/compare-protocols.sh --shapes $SHAPES",
 "machine": "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, Linux $(uname -r)"}
EOF

SERVER=""
stop_server() {
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

start_server() {
  PORT=$(free_port)
  { node_config "$PORT"; cat <<EOF
[client]
ping_interval = "25s"
pong_timeout = "8s"
[auth]
allow_anonymous = true
[[namespaces]]
name = ""
allow_publish = true
EOF
  } >"$OUT/fanfare.toml"
  "$FANFARE" --config "$OUT/fanfare.toml" >>"$OUT/fanfare.log" 2>&1 &
  SERVER=$!
  wait_port "$PORT" && return 0
  echo "fanfare did not start; see $OUT/fanfare.log" >&2; exit 1
}

shape_flags() {
  case $1 in
    busy) echo "-n 100 --channels 1 --publishers 10 --rate 2000" ;;
    broadcast) echo "-n 2000 --channels 10 --publishers 1 --rate 200" ;;
    *) echo "unknown shape $1" >&2; exit 2 ;;
  esac
}

for shape in ${SHAPES//,/ }; do
  flags=$(shape_flags "$shape")
  for run in $(seq "$RUNS"); do
    for protocol in json protobuf; do
      name=$shape-$protocol-$run
      wait_quiet
      uptime >"$OUT/runs/$name.uptime"
      start_server
      echo "== $name (pid $SERVER, port $PORT): $(cat "$OUT/runs/$name.uptime")"
      # shellcheck disable=SC2086 # flags is a list of words
      "$LOADTEST" fanout --url "ws://127.0.0.1:$PORT/connection/websocket" --protocol "$protocol" \
        $flags -d "$DURATION" --ramp 0 --settle 2s --drain 30s --payload-size "$PAYLOAD" \
        --workers "$WORKERS" --server-pid "$SERVER" --json --quiet \
        >"$OUT/runs/$name.json" 2>"$OUT/runs/$name.txt" || true
      stop_server
      python3 "$ROOT/scripts/bench/compare_protocols.py" --one "$OUT/runs/$name.json" || true
    done
  done
done

python3 "$ROOT/scripts/bench/compare_protocols.py" "$OUT" | tee "$OUT/summary.md"
echo "reports: $OUT/runs, summary: $OUT/summary.md"
