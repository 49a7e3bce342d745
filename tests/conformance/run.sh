#!/usr/bin/env bash
# WebSocket protocol conformance of fanfare's own framing (crates/fanfare-server/src/transport/frame.rs):
# the Autobahn TestSuite server cases, driven by kosoku (PyPI), against
# examples/ws_echo.rs, an echo server on the same codec, on a free loopback port.
# Compression cases (12.*, 13.*) are skipped: fanfare negotiates no extensions.
# Fails unless every case is OK or INFORMATIONAL (also the close behaviour).
# Usage: tests/conformance/run.sh [ECHO_BIN]   (default: builds the debug example)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(cd ../.. && pwd)

ECHO_BIN=${1:-}
if [ -z "$ECHO_BIN" ]; then
  cargo build -q -p fanfare-server --example ws_echo --manifest-path "$ROOT/Cargo.toml"
  ECHO_BIN="$ROOT/target/debug/examples/ws_echo"
fi

PY=${PYTHON:-python3}
VENV=.venv
. ../venv.sh                     # ensure_venv
. "$ROOT/loadtest/bench/lib.sh"  # free_port, wait_port
ensure_venv

PORT=$(free_port)
"$ECHO_BIN" "127.0.0.1:$PORT" >/dev/null &
ECHO_PID=$!
trap 'kill "$ECHO_PID" 2>/dev/null || true; wait "$ECHO_PID" 2>/dev/null || true' EXIT
wait_port "$PORT" || { echo "ws_echo did not start" >&2; exit 1; }

rm -rf reports
timeout 300 "$VENV/bin/kosoku" "127.0.0.1:$PORT" -x '12.*' -x '13.*' -p 2 -o reports >reports.log 2>&1 \
  || { cat reports.log; rm -f reports.log; exit 1; }
rm -f reports.log
"$VENV/bin/python" - reports/index.json <<'PY'
import collections, json, sys
index = json.load(open(sys.argv[1]))
counts, bad = collections.Counter(), []
for cases in index.values():
    for case, r in cases.items():
        verdict = (r["behavior"], r["behaviorClose"])
        counts[verdict] += 1
        if any(v not in ("OK", "INFORMATIONAL") for v in verdict):
            bad.append(f"{case}: {verdict}")
total = sum(counts.values())
print(f"autobahn server cases: {total} run, "
      + ", ".join(f"{n} {b}/{c}" for (b, c), n in sorted(counts.items())))
if total < 300 or bad:
    print("not conformant:" if bad else f"only {total} cases ran", *bad, sep="\n  ")
    sys.exit(1)
print(f"{total - len(bad)} passed, {len(bad)} failed")
PY
