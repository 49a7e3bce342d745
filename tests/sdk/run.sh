#!/usr/bin/env bash
# End-to-end tests of fanfare with the real centrifuge-js SDK (Node >= 20):
# e2e.mjs (JSON build), protobuf.mjs (Protobuf build, mixed with JSON),
# emulation.mjs (HTTP streaming and SSE), uni-sse.mjs (EventSource, no SDK),
# delta.mjs (fossil delta compression, both builds), proxy.mjs (proxies to a
# Node HTTP backend: cookie connect, subscribe denied, publish rewritten, rpc).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run.sh
# Exit code is the test result. FANFARE_E2E_VERBOSE=1 prints all ws frames.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ -z "${FANFARE_BIN:-}" ]; then
  echo "run.sh: FANFARE_BIN must be set to the absolute path of the fanfare binary" >&2
  exit 2
fi
case "$FANFARE_BIN" in
  /*) ;;
  *) echo "run.sh: FANFARE_BIN must be an absolute path, got: $FANFARE_BIN" >&2; exit 2 ;;
esac
if [ ! -x "$FANFARE_BIN" ]; then
  echo "run.sh: FANFARE_BIN is not an executable file: $FANFARE_BIN" >&2
  exit 2
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

# One file at a time: run together they compete for the 2 cores and I4 (a 2 MB
# message closed with 1009) then sometimes sees the close lost to a TCP reset.
exec node --test --test-concurrency=1 e2e.mjs protobuf.mjs emulation.mjs uni-sse.mjs delta.mjs proxy.mjs
