#!/usr/bin/env bash
# Control API publish throughput (docs/BENCHMARKS.md): a release node with the
# memory broker on loopback, then crates/fanfare-server/examples/api_bench.rs
# three times against its gRPC port. Extra arguments go to api_bench.
# Usage: scripts/bench-api.sh [--connections N] [--concurrency N] [--duration SECS] ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

cargo build -q --release -p fanfare-server --bin fanfare --example api_bench
# FANFARE_BIN runs another binary as the node (e.g. an older build to compare).
BIN="${FANFARE_BIN:-$ROOT/target/release/fanfare}"
BENCH="$ROOT/target/release/examples/api_bench"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
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

echo "node $BIN pid $NODE_PID, grpc 127.0.0.1:$GRPC_PORT, grpc threads ${FANFARE__GRPC__THREADS:-default}, commit $(git rev-parse --short HEAD), $(nproc) cores"
RESULTS=()
for run in 1 2 3; do
  line=$("$BENCH" --addr "127.0.0.1:$GRPC_PORT" --key bench-key --node-pid "$NODE_PID" "$@")
  echo "run $run: $line"
  RESULTS+=("$(echo "$line" | awk '{print $2}')")
done
printf '%s\n' "${RESULTS[@]}" | sort -n | sed -n 2p | xargs printf 'median calls/s: %s\n'
