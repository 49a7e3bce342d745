#!/usr/bin/env bash
# Runs every fanfare test on a fresh machine: installs what the tests need
# (Debian packages, Node modules, Go modules for tests/go, a Python venv for
# tests/api), then formatting, lints, unit and integration tests against real
# processes, the WebSocket conformance cases (tests/conformance), the SDK
# end-to-end tests (centrifuge-js, centrifuge-go, centrifuge-python; JSON and
# Protobuf; centrifuge-js in headless Chromium), the Python control-API test,
# the metrics lint and the deployment checks (scripts/test-deploy.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

step() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests use: redis-server (broker tests), openssl (test CA
# of the Redis TLS tests), promtool (metrics
# lint), chromium (tests/browser; Playwright drives it, never downloads one),
# docker.io and debootstrap (test-deploy.sh builds and runs the container image
# on a Debian base it makes itself: no image registry needed).
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools) # redis-cli --cluster create
command -v openssl >/dev/null || need_apt+=(openssl) # the Redis TLS tests' test CA
command -v promtool >/dev/null || need_apt+=(prometheus)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit + integration against the real binary)"
cargo test --workspace

# Fuzzing shares no port or target directory with the suites below, which
# mostly wait on sockets: it runs beside them and is waited for at the end.
step "fuzzing started in the background (cargo-fuzz: frames, JSON/Protobuf commands, HTTP bodies, JWT, Redis wire, config; FUZZ_SECONDS each; log in target/fuzz.log)"
mkdir -p target
scripts/fuzz.sh >target/fuzz.log 2>&1 &
FUZZ_PID=$!
# A failing suite ends the script early: the fuzzing goes with it.
trap 'pkill -TERM -P "$FUZZ_PID" 2>/dev/null; kill "$FUZZ_PID" 2>/dev/null || true' EXIT

step "WebSocket conformance (Autobahn server cases via kosoku against examples/ws_echo.rs)"
tests/conformance/run.sh

step "SDK end-to-end (npm centrifuge, JSON and Protobuf builds, + ws against the real binary)"
cargo build -q -p fanfare-server
FANFARE_BIN="$ROOT/target/debug/fanfare" tests/sdk/run.sh

step "browser end-to-end (centrifuge-js in headless Chromium via playwright-core: websocket, http_stream, sse; the chat example through its page; the admin console on a Redis Cluster)"
FANFARE_BIN="$ROOT/target/debug/fanfare" tests/browser/run.sh

step "Go SDK end-to-end (centrifuge-go NewProtobufClient and NewJsonClient)"
FANFARE_BIN="$ROOT/target/debug/fanfare" tests/go/run.sh

step "Redis chaos (npm centrifuge: Redis killed and restarted, a node SIGKILLed, Redis Cluster master failovers)"
FANFARE_BIN="$ROOT/target/debug/fanfare" tests/sdk/run-redis.sh

step "Python: control API and the Centrifugo-compatible API (grpcio stubs generated from proto/ at test time, HTTP, cent), proxies to aiohttp and grpcio backends, webhooks into a verifying receiver, centrifuge-python SDK (JSON and Protobuf); nodes on Redis"
FANFARE_BIN="$ROOT/target/debug/fanfare" tests/api/run.sh

step "fuzzing (waiting for the background run)"
if ! wait "$FUZZ_PID"; then
  cat target/fuzz.log
  echo "fuzzing failed (log above)" >&2
  exit 1
fi
trap - EXIT
grep -E '^==> |stat::number_of_executed_units' target/fuzz.log

step "metrics lint (promtool check metrics on a live node)"
scripts/check-metrics.sh "$ROOT/target/debug/fanfare"

step "deployment: Helm chart, manifests, rehearsal, Prometheus, Grafana, compose"
FANFARE_BIN="$ROOT/target/debug/fanfare" scripts/test-deploy.sh

step "all tests passed"
