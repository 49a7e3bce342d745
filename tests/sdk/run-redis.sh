#!/usr/bin/env bash
# Chaos tests of fanfare nodes sharing Redis, with the real centrifuge-js SDK
# (Node >= 20; redis-server on PATH).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run-redis.sh
# Exit code is the test result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

case "${FANFARE_BIN:-}" in
  /*) ;;
  *) echo "run-redis.sh: FANFARE_BIN must be the absolute path of the fanfare binary, got: ${FANFARE_BIN:-}" >&2; exit 2 ;;
esac
if [ ! -x "$FANFARE_BIN" ]; then
  echo "run-redis.sh: FANFARE_BIN is not an executable file: $FANFARE_BIN" >&2
  exit 2
fi
if ! command -v redis-server >/dev/null; then
  echo "run-redis.sh: redis-server is not installed (scripts/test.sh installs it)" >&2
  exit 2
fi

if [ ! -d node_modules ]; then
  npm ci --no-audit --no-fund
fi

exec node --test --test-concurrency=1 redis-chaos.mjs
