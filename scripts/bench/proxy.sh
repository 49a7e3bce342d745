#!/usr/bin/env bash
# Proxies (issue 15): what a proxied call costs the node. Trivial backends
# that answer at once -- Go net/http (scripts/bench/proxy-backend) for HTTP,
# Python grpc.aio (scripts/bench/proxy_grpc_backend.py, tests/api/.venv) for
# gRPC -- and a release `fanfare`, driven by fanfare-loadtest; the variants
# of each benchmark alternate within every run, RUNS times:
#
#  publish  fanout: PUBS publishers, one channel each, one subscriber each,
#           client-side `publish` into namespace `px`, (1) at a fixed RATE
#           all sustain: node CPU per publication; (2) at MAX_RATE: the most
#           publications/s (not for grpc: its Python backend is the limit); variants `plain` (no proxy), `http` and `grpc`
#           (publish_proxy; the backend answers an empty result: data unchanged).
#  connect  idle: N clients connect (no subscription) as fast as the
#           generator can: `jwt` (an HS256 token each), `http` and `grpc` (no
#           token, connect_proxy names the user).
#
# The node's CPU comes from /proc/PID/stat (utime+stime) through the
# loadtest's --server-pid; the backend's CPU and call count are read around
# every run so that it can be seen not to be the limit.
#
#   scripts/bench/proxy.sh OUT_DIR
#   ONLY=connect RUNS=5 N=10000 scripts/bench/proxy.sh /tmp/proxy-connect
#   RUNS=3 N=5000 PUBS=20 RATE=2000 MAX_RATE=100000 DURATION=10s scripts/bench/proxy.sh /tmp/proxy-bench
#
# Needs `cargo build --release -p fanfare-server -p fanfare-loadtest` and Go.
# Every process it starts is stopped by PID; every loop is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:?usage: scripts/bench/proxy.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
RUNS=${RUNS:-3}; N=${N:-5000}; PUBS=${PUBS:-20}
ONLY=${ONLY:-}   # publish | connect: just that benchmark
RATE=${RATE:-2000}; MAX_RATE=${MAX_RATE:-100000}; DURATION=${DURATION:-10s}
PY=${PY:-$ROOT/tests/api/.venv/bin/python}   # has grpcio
export QUIET_WAIT=${QUIET_WAIT:-120}
SECRET=proxy-bench-secret

# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh"   # wait_quiet, free_port, wait_port, node_config

(cd scripts/bench/proxy-backend && go build -o "$OUT/proxy-backend" .)
# The gRPC backend runs on the Python tests' venv (grpcio, grpcio-tools).
[ -x "$PY" ] || (cd tests/api && . ../venv.sh && PY=python3 ensure_venv)

NODE=; BACKEND=; GBACKEND=
stop_node() {
  [ -n "$NODE" ] || return 0
  kill -TERM "$NODE" 2>/dev/null || true
  wait "$NODE" 2>/dev/null || true
  NODE=
}
stop_all() {
  stop_node
  local pid
  for pid in "$BACKEND" "$GBACKEND"; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  BACKEND=; GBACKEND=
}
trap stop_all EXIT

BPORT=$(free_port)
"$OUT/proxy-backend" "127.0.0.1:$BPORT" >>"$OUT/backend.log" 2>&1 &
BACKEND=$!
wait_port "$BPORT" || { echo "HTTP backend did not start" >&2; exit 1; }
GPORT=$(free_port)
"$PY" scripts/bench/proxy_grpc_backend.py "$GPORT" "$OUT/grpc-gen" >>"$OUT/grpc-backend.log" 2>&1 &
GBACKEND=$!
wait_port "$GPORT" 150 || { echo "gRPC backend did not start" >&2; exit 1; }

# backend_stat KIND: "<cpu ticks> <calls>" of that backend now (none: "0 0").
backend_stat() {
  local stat pid calls
  case $1 in
    http) pid=$BACKEND; calls=$(curl -s "http://127.0.0.1:$BPORT/count") ;;
    grpc) pid=$GBACKEND; sleep 0.5; calls=$(cat "$OUT/grpc-gen/count") ;;
    *) echo "0 0"; return ;;
  esac
  stat=$(cut -d' ' -f14,15 "/proc/$pid/stat")
  echo "$(( ${stat% *} + ${stat#* } )) $calls"
}

# node_toml VARIANT PORT
node_toml() {
  node_config "$2"
  cat <<EOF
[auth]
hmac_secret = "$SECRET"
allow_anonymous = true

[[proxies]]
name = "pub-http"
endpoint = "http://127.0.0.1:$BPORT/centrifugo/publish"

[[proxies]]
name = "conn-http"
endpoint = "http://127.0.0.1:$BPORT/centrifugo/connect"

[[proxies]]
name = "grpc"
endpoint = "grpc://127.0.0.1:$GPORT"

[[namespaces]]
name = ""
allow_publish = true

[[namespaces]]
name = "px"
allow_publish = true
EOF
  case $1 in
    pub-http) echo 'publish_proxy = "pub-http"' ;;
    pub-grpc) echo 'publish_proxy = "grpc"' ;;
    conn-http) printf '\n[client]\nconnect_proxy = "conn-http"\n' ;;
    conn-grpc) printf '\n[client]\nconnect_proxy = "grpc"\n' ;;
  esac
}

start_node() {
  PORT=$(free_port)
  node_toml "$1" "$PORT" > "$OUT/$1.toml"
  "$FANFARE" --config "$OUT/$1.toml" >>"$OUT/$1.log" 2>&1 &
  NODE=$!
  wait_port "$PORT" || { echo "fanfare ($1) did not start" >&2; tail "$OUT/$1.log" >&2; exit 1; }
}

# measure NAME BACKEND loadtest-args...: one loadtest run against the running
# node, its JSON report and the backend's CPU ticks and calls over it.
measure() {
  local name=$1 backend=$2; shift 2
  local before after
  before=$(backend_stat "$backend")
  "$LOADTEST" "$@" --url "ws://127.0.0.1:$PORT/connection/websocket" --server-pid "$NODE" \
    --max-time 90s --json --quiet >"$OUT/$name.json" 2>"$OUT/$name.txt" || true
  after=$(backend_stat "$backend")
  echo "$before $after" >"$OUT/$name.backend"
  python3 "$ROOT/scripts/bench/proxy_summary.py" line "$OUT/$name.json"
}

for run in $(seq "$RUNS"); do
  [ "$ONLY" = connect ] || for v in plain http grpc; do
    wait_quiet
    start_node "pub-$v"
    common=(fanout -n "$PUBS" --channels "$PUBS" --publishers "$PUBS" --channel-prefix "px:"
            -d "$DURATION" --settle 1s --payload-size 128)
    measure "pub-$v-fixed-$run" "$v" "${common[@]}" --rate "$RATE"
    # The Python gRPC backend is the limit long before the node: no max run.
    [ "$v" = grpc ] || measure "pub-$v-max-$run" "$v" "${common[@]}" --rate "$MAX_RATE"
    stop_node
  done
  [ "$ONLY" = publish ] || for v in jwt http grpc; do
    wait_quiet
    start_node "conn-$v"
    auth=(); [ "$v" = jwt ] && auth=(--hmac-secret "$SECRET")
    measure "conn-$v-$run" "$v" idle -n "$N" --subs 0 --ramp 0 --hold 1s --settle 1s --workers 2 "${auth[@]}"
    stop_node
  done
done
stop_all
trap - EXIT
python3 "$ROOT/scripts/bench/proxy_summary.py" table "$OUT"
