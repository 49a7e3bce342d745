#!/usr/bin/env bash
# centrifuge-js in headless Chromium (Debian `chromium`, driven by npm
# playwright-core) against real fanfare nodes on a real Redis: the client limited
# to websocket, http_stream or sse, publishing, receiving, reading presence and
# history, recovering across a node restart; and a refused origin (browser.mjs).
# Then the chat example as users see it: started by examples/chat/run.sh, two
# and three users in a room, a node restart, a tab offline for a while (chat.mjs;
# CHAT_SCREENSHOT=docs/images/chat.png refreshes the README's screenshot).
# Last, the admin console on three nodes on a Redis Cluster of three masters
# (admin.mjs: sign-in, nodes, channels, publish, disconnect;
# ADMIN_SCREENSHOTS=docs/images refreshes the README's screenshots, by default
# they go to target/admin-screenshots/).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/browser/run.sh
# Needs redis-server, redis-cli and /usr/bin/chromium (or CHROMIUM_BIN). Exit code is the
# result. FANFARE_E2E_VERBOSE=1 prints the page and process logs of passing tests too.
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
if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  echo "run.sh: no Chromium at ${CHROMIUM_BIN:-/usr/bin/chromium}: apt-get install chromium (scripts/test.sh does)" >&2
  exit 2
fi
for tool in redis-server redis-cli; do
  if ! command -v "$tool" >/dev/null; then
    echo "run.sh: $tool is not installed (scripts/test.sh installs it)" >&2
    exit 2
  fi
done

# npm ci only when node_modules is missing or older than the lock file.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

exec node --test --test-concurrency=1 browser.mjs chat.mjs admin.mjs
