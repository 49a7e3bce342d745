#!/usr/bin/env bash
# Control API publish throughput (docs/BENCHMARKS.md): a release node with the
# memory broker on loopback, then crates/fanfare-server/examples/api_bench.rs
# three times against its gRPC port. Extra arguments go to api_bench.
# Usage: scripts/bench-api.sh [--connections N] [--concurrency N] [--duration SECS] ...
#        scripts/bench-api.sh --h2load [CONNECTIONS [STREAMS [SECONDS]]]
# The second form uses nghttp2's h2load (Debian nghttp2-client, installed when
# missing) as an independent C generator: CONNECTIONS x STREAMS concurrent
# unary Publish calls of one 76-byte PublishRequest, 1 s warm-up, 3 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

cargo build -q --release -p fanfare-server --bin fanfare --example api_bench
# FANFARE_BIN runs another binary as the node (e.g. an older build to compare).
BIN="${FANFARE_BIN:-$ROOT/target/release/fanfare}"
BENCH="$ROOT/target/release/examples/api_bench"

. "$ROOT/loadtest/bench/lib.sh"   # free_port
HTTP_PORT=$(free_port)
GRPC_PORT=$(free_port)
DIR=$(mktemp -d)
cat > "$DIR/node.toml" <<TOML
[http]
listen = "127.0.0.1:$HTTP_PORT"
[grpc]
listen = "127.0.0.1:$GRPC_PORT"
[api]
key = "bench-key"
[log]
level = "warn"
[[namespaces]]
name = ""
allow_publish = true
TOML

"$BIN" --config "$DIR/node.toml" >"$DIR/node.log" 2>&1 &
NODE_PID=$!
cleanup() { kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done

if [ "${1:-}" = "--h2load" ]; then
  command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
  CONNS=${2:-4}; STREAMS=${3:-64}; SECS=${4:-8}
  # One gRPC message: 0 (not compressed), 4-byte big-endian length, then
  # PublishRequest{channel = 1: "bench", data = 2: 60 bytes of JSON}.
  python3 - "$DIR/publish.bin" <<'PY'
import struct, sys
data = b'{"text":"' + b"x" * 49 + b'"}'
msg = b"\x0a\x05bench" + b"\x12" + bytes([len(data)]) + data
open(sys.argv[1], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
PY
  echo "node $BIN pid $NODE_PID, grpc threads ${FANFARE__GRPC__THREADS:-default}, commit $(git rev-parse --short HEAD), $(nproc) cores, h2load $CONNS conns x $STREAMS streams"
  ok_calls() { curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^fanfare_api_requests_total\{/ && /protocol="grpc"/ && /code="OK"/ {s += $NF} END {print s + 0}'; }
  RESULTS=()
  for run in 1 2 3; do
    c0=$(ok_calls)
    t0=$(awk '{print $14+$15}' "/proc/$NODE_PID/stat")
    out=$(h2load -D "$SECS" --warm-up-time 1 -c "$CONNS" -m "$STREAMS" -t 1 -d "$DIR/publish.bin" \
      -H 'content-type: application/grpc' -H 'te: trailers' -H 'authorization: apikey bench-key' \
      "http://127.0.0.1:$GRPC_PORT/fanfare.v1.ControlService/Publish")
    t1=$(awk '{print $14+$15}' "/proc/$NODE_PID/stat")
    c1=$(ok_calls)
    rps=$(echo "$out" | awk '/^finished in/ {print int($4)}')
    ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
    fail=$(echo "$out" | sed -n 's/^requests:.* \([0-9]*\) failed.*/\1/p')
    # h2load does not read grpc-status (trailers): the node's own count of
    # calls answered OK (warm-up included) is printed next to h2load's total.
    cpu=$(python3 -c "print(f'{($t1 - $t0) / 100 / ($SECS + 1) * 100:.0f}')")
    us=$(python3 -c "print(f'{($t1 - $t0) / 100 / max($c1 - $c0, 1) * 1e6:.1f}')")
    echo "run $run: $rps calls/s (2xx $ok, failed $fail, node answered OK $((c1 - c0))), node CPU ${cpu}% (incl. warm-up), ${us} us/call"
    RESULTS+=("$rps")
  done
  printf '%s\n' "${RESULTS[@]}" | sort -n | sed -n 2p | xargs printf 'median calls/s: %s\n'
  exit 0
fi

echo "node $BIN pid $NODE_PID, grpc 127.0.0.1:$GRPC_PORT, grpc threads ${FANFARE__GRPC__THREADS:-default}, commit $(git rev-parse --short HEAD), $(nproc) cores"
RESULTS=()
for run in 1 2 3; do
  line=$("$BENCH" --addr "127.0.0.1:$GRPC_PORT" --key bench-key --node-pid "$NODE_PID" "$@")
  echo "run $run: $line"
  RESULTS+=("$(echo "$line" | awk '{print $2}')")
done
printf '%s\n' "${RESULTS[@]}" | sort -n | sed -n 2p | xargs printf 'median calls/s: %s\n'
