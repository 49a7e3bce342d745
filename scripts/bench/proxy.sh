#!/usr/bin/env bash
# Proxies (issue 15): what a proxied call costs the node. A trivial Go HTTP
# backend (scripts/bench/proxy-backend, answers at once) and a release
# `fanfare`, driven by fanfare-loadtest; the two variants of each benchmark
# alternate within every run, RUNS times:
#
#  publish  fanout: PUBS publishers, one channel each, one subscriber each,
#           client-side `publish` into namespace `px`, (1) at a fixed RATE
#           both sustain: node CPU per publication; (2) at MAX_RATE: the most
#           publications/s; variants `plain` (no proxy) and `proxy`
#           (publish_proxy, the backend answers {"result":{}}: data unchanged).
#  connect  idle: N clients connect (no subscription) as fast as the
#           generator can: `jwt` (an HS256 token each) and `proxy` (no token,
#           connect_proxy names the user).
#
# The node's CPU comes from /proc/PID/stat (utime+stime) through the
# loadtest's --server-pid; the backend's CPU and call count are read around
# every run so that it can be seen not to be the limit.
#
#   scripts/bench/proxy.sh OUT_DIR
#   RUNS=3 N=5000 PUBS=20 RATE=2000 MAX_RATE=40000 DURATION=10s scripts/bench/proxy.sh /tmp/proxy-bench
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
RATE=${RATE:-2000}; MAX_RATE=${MAX_RATE:-40000}; DURATION=${DURATION:-10s}
export QUIET_WAIT=${QUIET_WAIT:-120}
SECRET=proxy-bench-secret

# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh"   # wait_quiet, free_port, wait_port, node_config

(cd scripts/bench/proxy-backend && go build -o "$OUT/proxy-backend" .)

NODE=; BACKEND=
stop_node() {
  [ -n "$NODE" ] || return 0
  kill -TERM "$NODE" 2>/dev/null || true
  wait "$NODE" 2>/dev/null || true
  NODE=
}
stop_all() {
  stop_node
  if [ -n "$BACKEND" ]; then
    kill -TERM "$BACKEND" 2>/dev/null || true
    wait "$BACKEND" 2>/dev/null || true
    BACKEND=
  fi
}
trap stop_all EXIT

BPORT=$(free_port)
"$OUT/proxy-backend" "127.0.0.1:$BPORT" >>"$OUT/backend.log" 2>&1 &
BACKEND=$!
wait_port "$BPORT" || { echo "backend did not start" >&2; exit 1; }

# backend_stat: "<cpu ticks> <calls>" of the backend now.
backend_stat() {
  local stat
  stat=$(cut -d' ' -f14,15 "/proc/$BACKEND/stat")
  echo "$(( ${stat% *} + ${stat#* } )) $(curl -s "http://127.0.0.1:$BPORT/count")"
}

# node_toml VARIANT PORT
node_toml() {
  node_config "$2"
  cat <<EOF
[auth]
hmac_secret = "$SECRET"
allow_anonymous = true

[[proxies]]
name = "pub"
endpoint = "http://127.0.0.1:$BPORT/centrifugo/publish"

[[proxies]]
name = "conn"
endpoint = "http://127.0.0.1:$BPORT/centrifugo/connect"

[[namespaces]]
name = ""
allow_publish = true

[[namespaces]]
name = "px"
allow_publish = true
EOF
  case $1 in
    pub-proxy) echo 'publish_proxy = "pub"' ;;
    conn-proxy) printf '\n[client]\nconnect_proxy = "conn"\n' ;;
  esac
}

start_node() {
  PORT=$(free_port)
  node_toml "$1" "$PORT" > "$OUT/$1.toml"
  "$FANFARE" --config "$OUT/$1.toml" >>"$OUT/$1.log" 2>&1 &
  NODE=$!
  wait_port "$PORT" || { echo "fanfare ($1) did not start" >&2; tail "$OUT/$1.log" >&2; exit 1; }
}

# measure NAME loadtest-args...: one loadtest run against the running node,
# its JSON report and the backend's CPU ticks and calls over it.
measure() {
  local name=$1; shift
  local before after
  before=$(backend_stat)
  "$LOADTEST" "$@" --url "ws://127.0.0.1:$PORT/connection/websocket" --server-pid "$NODE" \
    --max-time 90s --json --quiet >"$OUT/$name.json" 2>"$OUT/$name.txt" || true
  after=$(backend_stat)
  echo "$before $after" >"$OUT/$name.backend"
  python3 "$ROOT/scripts/bench/proxy_summary.py" line "$OUT/$name.json"
}

for run in $(seq "$RUNS"); do
  for v in plain proxy; do
    wait_quiet
    start_node "pub-$v"
    common=(fanout -n "$PUBS" --channels "$PUBS" --publishers "$PUBS" --channel-prefix "px:"
            -d "$DURATION" --settle 1s --payload-size 128)
    measure "pub-$v-fixed-$run" "${common[@]}" --rate "$RATE"
    measure "pub-$v-max-$run" "${common[@]}" --rate "$MAX_RATE"
    stop_node
  done
  for v in jwt proxy; do
    wait_quiet
    start_node "conn-$v"
    auth=(); [ "$v" = jwt ] && auth=(--hmac-secret "$SECRET")
    measure "conn-$v-$run" idle -n "$N" --subs 0 --ramp 0 --hold 1s --settle 1s --workers 2 "${auth[@]}"
    stop_node
  done
done
stop_all
trap - EXIT
python3 "$ROOT/scripts/bench/proxy_summary.py" table "$OUT"
