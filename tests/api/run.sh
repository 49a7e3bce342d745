#!/usr/bin/env bash
# Control API tests from Python: a grpcio client generated from
# proto/fanfare/v1/control.proto at test time (grpcio-tools), plain HTTP
# (urllib) and a WebSocket client (websockets), against the real binary and
# real redis-server processes on free loopback ports; and the centrifuge-python
# SDK over the JSON and the Protobuf protocol (test_sdk_python.py); lifecycle
# webhooks into a receiver in the test's process (test_webhooks.py).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/api/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ -z "${FANFARE_BIN:-}" ] || [ ! -x "${FANFARE_BIN}" ]; then
  echo "run.sh: FANFARE_BIN must name the fanfare binary (absolute path)" >&2
  exit 2
fi
case "$FANFARE_BIN" in
  /*) ;;
  *) echo "run.sh: FANFARE_BIN must be an absolute path, got: $FANFARE_BIN" >&2; exit 2 ;;
esac
command -v redis-server >/dev/null || { echo "run.sh: redis-server is needed" >&2; exit 2; }

PY=${PYTHON:-python3}
VENV=.venv
. ../venv.sh   # ensure_venv
ensure_venv

exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
