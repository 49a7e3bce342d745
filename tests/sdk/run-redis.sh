#!/usr/bin/env bash
# Chaos tests of fanfare nodes sharing Redis, with the real centrifuge-js SDK
# (Node >= 20; redis-server and redis-cli on PATH): standalone Redis killed and
# restarted, a node killed (redis-chaos.mjs), and Redis Cluster master
# failovers, SIGKILL and manual (redis-cluster-failover.mjs).
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
for tool in redis-server redis-cli; do
  if ! command -v "$tool" >/dev/null; then
    echo "run-redis.sh: $tool is not installed (scripts/test.sh installs it)" >&2
    exit 2
  fi
done

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

exec node --test --test-concurrency=1 redis-chaos.mjs redis-cluster-failover.mjs
