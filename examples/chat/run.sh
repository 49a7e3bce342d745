#!/usr/bin/env bash
# The chat example: a Redis, a fanfare node and the chat backend; the page at
# http://127.0.0.1:${CHAT_PORT:-3000}/ (open it in two tabs: two users).
#
# Usage: examples/chat/run.sh
#   FANFARE_BIN=/path/to/fanfare   use this binary (else: cargo build --release)
#   CHAT_PORT=3000                 the page's port (the node and Redis take free ones)
# Needs node >= 20, npm and redis-server. Ctrl-C stops everything it started;
# `kill -USR2 <pid>` (printed at start) restarts the node. More: README.md here.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

if [ -n "${FANFARE_BIN:-}" ]; then
  case "$FANFARE_BIN" in
    /*) ;;
    *) FANFARE_BIN="$PWD/$FANFARE_BIN" ;;
  esac
else
  echo "run.sh: building fanfare (cargo build --release -p fanfare-server); set FANFARE_BIN to use a built binary" >&2
  (cd "$ROOT" && cargo build --release -p fanfare-server)
  FANFARE_BIN="$ROOT/target/release/fanfare"
fi
if [ ! -x "$FANFARE_BIN" ]; then
  echo "run.sh: FANFARE_BIN is not an executable file: $FANFARE_BIN" >&2
  exit 2
fi
if ! command -v redis-server >/dev/null; then
  echo "run.sh: redis-server is not installed (Debian: apt-get install redis-server)" >&2
  exit 2
fi
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
  echo "run.sh: needs node 20 or newer, found: $(node --version 2>/dev/null || echo none)" >&2
  exit 2
fi

cd "$HERE"
# centrifuge-js from the committed lock file; npm ci only when node_modules is
# missing or older than the lock file.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

export FANFARE_BIN
exec node run.mjs
