#!/usr/bin/env bash
# centrifuge-js in headless Chromium (Debian `chromium`, driven by npm
# playwright-core) against the real fanfare binary: one scenario each for the
# websocket, http_stream and sse transports (browser.mjs).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/browser/run.sh
# Needs redis-server and /usr/bin/chromium (or CHROMIUM_BIN). Exit code is the result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

case "${FANFARE_BIN:-}" in
  /*) ;;
  *) echo "run.sh: FANFARE_BIN must be the absolute path of the fanfare binary, got: '${FANFARE_BIN:-}'" >&2; exit 2 ;;
esac
if [ ! -x "$FANFARE_BIN" ]; then
  echo "run.sh: FANFARE_BIN is not an executable file: $FANFARE_BIN" >&2
  exit 2
fi

# npm ci only when node_modules is missing or older than the lock file.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

exec node --test --test-concurrency=1 browser.mjs
