#!/usr/bin/env bash
# fanfare side by side with Centrifugo: the same fanfare-loadtest scenarios
# against both servers, alternating (fanfare, Centrifugo, fanfare, ...), each
# run against a freshly started server with equivalent settings, first with
# the in-memory broker, then with Redis. Writes one JSON report per run and
# a summary table (medians per server, fanfare/Centrifugo ratios).
#
#   scripts/bench/compare-centrifugo.sh [--quick] [--write-docs] [--out DIR]
#       [--brokers memory,redis] [--runs N] [--no-build]
#
#   --quick       1 run each, 1 000 idle clients, fanout 1 000 subscribers
#                 at 100 publications/s for 3 s (about 2-3 minutes in all)
#   --write-docs  replace "## Side by side with Centrifugo" in docs/BENCHMARKS.md
#   --out DIR     reports go to DIR/runs/*.json (default target/bench/compare-<time>)
#
# Sizes (environment; full-run defaults, --quick defaults in brackets):
#   RUNS=3 [1]  IDLE_N=19000 [1000]  IDLE_HOLD=60s [3s]  SETTLE=3s [2s]
#   FANOUT_N=10000 [1000]  FANOUT_CHANNELS=10  FANOUT_RATE=200 [100]
#   FANOUT_PUBLISHERS=1  FANOUT_DUR=10s [3s]  PAYLOAD=128  WORKERS=2  PUBLISH_MODE=client (or http)
#   AUTH=jwt (HS256 token per client) or anon
#   PROTOCOL=json or protobuf: the clients' protocol (`fanfare-loadtest
#     --protocol`); protobuf offers the WebSocket subprotocol
#     `centrifuge-protobuf`, which both servers (and the floor) answer
#   QUIET_WAIT=900 [60]: longest wait for a quiet machine before each run
#   CENTRIFUGO_VERSION=v6.9.1
#   FLOOR=1: with the memory broker, also run every scenario against
#     `fanfare-loadtest floor-server` (accept, upgrade, fixed replies, each
#     read's publications written once per subscriber, nothing else): the
#     most this machine allows with this generator, as a third column.
#   FANFARE_WRITE_DELAY=0s: fanfare's client.write_delay. Centrifugo OSS has no
#     equivalent (its client.write_delay is a PRO option), so anything but 0s
#     is NOT an equivalent setting; the summary names it when set.
#
# Equivalent settings (fanfare TOML key <-> Centrifugo v6 JSON key):
#   http.listen                          <-> http_server.address + http_server.port
#   auth.hmac_secret (AUTH=jwt)          <-> client.token.hmac_secret_key
#     every authenticated fanfare connection joins its personal channel "#<user>"
#                                        <-> client.subscribe_to_user_personal_channel.enabled
#   auth.allow_anonymous (AUTH=anon)     <-> client.allow_anonymous_connect_without_token
#                                            + channel.without_namespace.allow_{subscribe,publish}_for_anonymous
#   [[namespaces]] name="" (subscribe allowed by default)
#                                        <-> channel.without_namespace.allow_subscribe_for_client
#   [[namespaces]] name="" allow_publish <-> channel.without_namespace.allow_publish_for_client
#   history_size/history_ttl unset (off) <-> history_size/history_ttl unset (off)
#   client.ping_interval = "25s"         <-> client.ping_interval "25s" (both defaults)
#   client.pong_timeout = "8s"           <-> client.pong_timeout "8s" (both defaults)
#   api.key                              <-> http_api.key (POST /api/publish, X-API-Key)
#   log.level = "warn"                   <-> log.level "warn"
#   broker.kind = "memory" | "redis"     <-> engine.type "memory" | "redis"
#   redis.urls                           <-> engine.redis.address
#   (Centrifugo only) usage_stats.disabled true: no reporting over the network;
#   health.enabled true: /health to wait for start-up, like fanfare's /ready.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# shellcheck source=loadtest/bench/lib.sh
. "$ROOT/loadtest/bench/lib.sh" # wait_quiet, free_port, wait_port, limits_off

# The size variables the caller set, for the command line in the summary.
SIZE_VARS="PROTOCOL FLOOR FANFARE_WRITE_DELAY RUNS IDLE_N IDLE_HOLD SETTLE FANOUT_N FANOUT_CHANNELS FANOUT_RATE FANOUT_PUBLISHERS FANOUT_DUR PAYLOAD WORKERS PUBLISH_MODE AUTH QUIET_WAIT CENTRIFUGO_VERSION"
ENV_PREFIX=""
for v in $SIZE_VARS; do [ -n "${!v+x}" ] && ENV_PREFIX+="$v=${!v} "; done

QUICK=0; WRITE_DOCS=0; BUILD=1; OUT=""; BROKERS=memory,redis; RUNS_ARG=""
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --write-docs) WRITE_DOCS=1 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    --brokers) BROKERS=$2; shift ;;
    --runs) RUNS_ARG=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ $QUICK = 1 ]; then
  : "${RUNS:=1}" "${IDLE_N:=1000}" "${IDLE_HOLD:=3s}" "${SETTLE:=2s}" "${FANOUT_N:=1000}"
  : "${FANOUT_RATE:=100}" "${FANOUT_DUR:=3s}" "${QUIET_WAIT:=60}"
else
  : "${RUNS:=3}" "${IDLE_N:=19000}" "${IDLE_HOLD:=60s}" "${SETTLE:=3s}" "${FANOUT_N:=10000}"
  : "${FANOUT_RATE:=200}" "${FANOUT_DUR:=10s}" "${QUIET_WAIT:=900}"
fi
RUNS=${RUNS_ARG:-$RUNS}
: "${FANOUT_CHANNELS:=10}" "${FANOUT_PUBLISHERS:=1}" "${PAYLOAD:=128}" "${WORKERS:=2}" "${PUBLISH_MODE:=client}"
: "${AUTH:=jwt}" "${PROTOCOL:=json}" "${CENTRIFUGO_VERSION:=v6.9.1}" "${FANFARE_WRITE_DELAY:=0s}" "${FLOOR:=0}"
export QUIET_WAIT
case $AUTH in jwt|anon) ;; *) echo "AUTH must be jwt or anon" >&2; exit 2 ;; esac
case $PROTOCOL in json|protobuf) ;; *) echo "PROTOCOL must be json or protobuf" >&2; exit 2 ;; esac
OUT=${OUT:-$ROOT/target/bench/compare-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/runs" "$OUT/cfg" "$OUT/logs"

BIN_DIR=$ROOT/target/bench/bin
CENTRIFUGO=$BIN_DIR/centrifugo
FANFARE=${FANFARE_BIN:-$ROOT/target/release/fanfare}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/fanfare-loadtest}
SECRET=compare-bench-hmac-secret-0123456789abcdef
API_KEY=compare-bench-api-key

# --- binaries --------------------------------------------------------------
# `go install` leaves `centrifugo version` at v0.0.0: the module version is read
# from the build information instead.
if [ -x "$CENTRIFUGO" ] &&
  go version -m "$CENTRIFUGO" 2>/dev/null | grep -E "^\s+mod\s+github.com/centrifugal/centrifugo/v6\s+$CENTRIFUGO_VERSION\s" >/dev/null; then  # not -q: no SIGPIPE
  echo "centrifugo $CENTRIFUGO_VERSION: cached at $CENTRIFUGO"
else
  echo "installing centrifugo $CENTRIFUGO_VERSION into $BIN_DIR (go install)"
  mkdir -p "$BIN_DIR"
  GOBIN=$BIN_DIR go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION"
fi
if [ $BUILD = 1 ]; then
  cargo build --release -p fanfare-server -p fanfare-loadtest
fi
BUILDINFO=$(go version -m "$CENTRIFUGO") # whole, not piped: `head` would SIGPIPE it (pipefail)
CENTRIFUGO_VERSION_LINE="$(awk '$1 == "mod" {print $2 "@" $3; exit}' <<<"$BUILDINFO"), $(awk 'NR == 1 {print $2}' <<<"$BUILDINFO")"

# --- meta data for the summary --------------------------------------------
COMMIT=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- crates loadtest Cargo.lock 2>/dev/null || COMMIT="$COMMIT+dirty"
COMMAND="${ENV_PREFIX}scripts/bench/compare-centrifugo.sh ${ORIG_ARGS[*]}"
python3 - "$OUT/meta.json" <<PY
import json, sys
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "fanfare_commit": "$COMMIT",
    "centrifugo_version": "$CENTRIFUGO_VERSION",
    "centrifugo_version_line": "$CENTRIFUGO_VERSION_LINE",
    "command": "$COMMAND",
    "env": {k: v for k, v in {
        "RUNS": "$RUNS", "IDLE_N": "$IDLE_N", "IDLE_HOLD": "$IDLE_HOLD", "SETTLE": "$SETTLE",
        "FANOUT_N": "$FANOUT_N", "FANOUT_CHANNELS": "$FANOUT_CHANNELS",
        "FANOUT_RATE": "$FANOUT_RATE", "FANOUT_PUBLISHERS": "$FANOUT_PUBLISHERS", "FANOUT_DUR": "$FANOUT_DUR", "PAYLOAD": "$PAYLOAD",
        "WORKERS": "$WORKERS", "PUBLISH_MODE": "$PUBLISH_MODE", "AUTH": "$AUTH", "PROTOCOL": "$PROTOCOL",
        "BROKERS": "$BROKERS", "FANFARE_WRITE_DELAY": "$FANFARE_WRITE_DELAY", "FLOOR": "$FLOOR"}.items()},
}, open(sys.argv[1], "w"), indent=1)
PY

# --- processes -------------------------------------------------------------
SERVER=""; REDIS=""; PORT=""; RPORT=""
stop_pid() { # stop_pid PID: TERM, up to 15 s, then KILL (our own children only)
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() { stop_pid "$SERVER"; SERVER=""; stop_pid "$REDIS"; REDIS=""; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_redis() {
  RPORT=$(free_port)
  redis-server --save '' --appendonly no --port "$RPORT" --bind 127.0.0.1 \
    >"$OUT/logs/redis.log" 2>&1 &
  REDIS=$!
  wait_port "$RPORT" || { echo "redis-server did not start" >&2; exit 1; }
}

write_fanfare_config() { # write_fanfare_config BROKER FILE
  {
    echo "[http]"; echo "listen = \"127.0.0.1:$PORT\""
    echo "[grpc]"; echo "listen = \"127.0.0.1:$(free_port)\""
    echo "[log]"; echo 'level = "warn"'
    echo "[api]"; echo "key = \"$API_KEY\""
    echo "[client]"; echo 'ping_interval = "25s"'; echo 'pong_timeout = "8s"'
    echo "write_delay = \"$FANFARE_WRITE_DELAY\""
    if [ "$AUTH" = jwt ]; then
      echo "[auth]"; echo "hmac_secret = \"$SECRET\""
    else
      echo "[auth]"; echo "allow_anonymous = true"
    fi
    echo "[broker]"; echo "kind = \"$1\""
    if [ "$1" = redis ]; then
      echo "[redis]"; echo "urls = [\"redis://127.0.0.1:$RPORT\"]"
    fi
    # Centrifugo's open-source edition has no such limits: off, as in every bench.
    limits_off
    echo "[[namespaces]]"; echo 'name = ""'; echo "allow_publish = true"
  } >"$2"
}

write_centrifugo_config() { # write_centrifugo_config BROKER FILE
  python3 - "$1" "$2" "$PORT" "$RPORT" "$AUTH" "$SECRET" "$API_KEY" <<'PY'
import json, sys
broker, path, port, rport, auth, secret, api_key = sys.argv[1:]
ns = {"allow_subscribe_for_client": True, "allow_publish_for_client": True}
client = {"ping_interval": "25s", "pong_timeout": "8s"}
if auth == "jwt":
    client["token"] = {"hmac_secret_key": secret}
    # fanfare subscribes every authenticated connection to "#<user>"
    client["subscribe_to_user_personal_channel"] = {"enabled": True}
else:
    client["allow_anonymous_connect_without_token"] = True
    ns.update(allow_subscribe_for_anonymous=True, allow_publish_for_anonymous=True)
cfg = {
    "log": {"level": "warn"},
    "http_server": {"address": "127.0.0.1", "port": int(port)},
    "http_api": {"key": api_key},
    "client": client,
    "channel": {"without_namespace": ns},
    "health": {"enabled": True},
    "usage_stats": {"disabled": True},
    "engine": {"type": broker},
}
if broker == "redis":
    cfg["engine"]["redis"] = {"address": [f"redis://127.0.0.1:{rport}"]}
json.dump(cfg, open(path, "w"), indent=1)
PY
}

start_server() { # start_server fanfare|centrifugo|floor BROKER
  PORT=$(free_port)
  local cfg log=$OUT/logs/$1-$2.log ready
  if [ "$1" = floor ]; then
    "$LOADTEST" floor-server "127.0.0.1:$PORT" >>"$log" 2>&1 &
    SERVER=$!
    wait_port "$PORT" && return 0
    echo "floor-server did not start; see $log" >&2; exit 1
  elif [ "$1" = fanfare ]; then
    cfg=$OUT/cfg/fanfare-$2.toml
    write_fanfare_config "$2" "$cfg"
    "$FANFARE" --config "$cfg" >>"$log" 2>&1 &
    ready=/ready
  else
    cfg=$OUT/cfg/centrifugo-$2.json
    write_centrifugo_config "$2" "$cfg"
    "$CENTRIFUGO" --config "$cfg" >>"$log" 2>&1 &
    ready=/health
  fi
  SERVER=$!
  local i
  for i in $(seq 150); do
    curl -sf "http://127.0.0.1:$PORT$ready" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 0.1
  done
  echo "$1 did not start; see $log" >&2; tail -5 "$log" >&2; exit 1
}

auth_flags() { if [ "$AUTH" = jwt ]; then echo "--hmac-secret $SECRET"; fi; }

# run_one SERVER BROKER SCENARIO RUN
run_one() {
  local server=$1 broker=$2 scenario=$3 run=$4 name
  name=$broker-$scenario-$server-$run
  [ -n "$REDIS" ] && redis-cli -p "$RPORT" flushall >/dev/null
  wait_quiet
  # The load averages before the run, shown in the summary beside its figures.
  uptime >"$OUT/runs/$name.uptime"
  start_server "$server" "$broker"
  local url=ws://127.0.0.1:$PORT/connection/websocket
  # shellcheck disable=SC2046 # auth_flags is a list of words
  local common=(--url "$url" --protocol "$PROTOCOL" --workers "$WORKERS" --server-pid "$SERVER" --json --quiet $(auth_flags))
  echo "== $name (pid $SERVER, port $PORT)"
  case $scenario in
    idle)
      "$LOADTEST" idle "${common[@]}" -n "$IDLE_N" --subs 1 --ramp 0 --hold "$IDLE_HOLD" \
        --settle "$SETTLE" >"$OUT/runs/$name.json" 2>"$OUT/runs/$name.txt" || true ;;
    fanout)
      "$LOADTEST" fanout "${common[@]}" -n "$FANOUT_N" --channels "$FANOUT_CHANNELS" \
        --rate "$FANOUT_RATE" --publishers "$FANOUT_PUBLISHERS" -d "$FANOUT_DUR" --ramp 0 --drain 30s --payload-size "$PAYLOAD" \
        --publish-mode "$PUBLISH_MODE" --api-key "$API_KEY" --settle "$SETTLE" \
        >"$OUT/runs/$name.json" 2>"$OUT/runs/$name.txt" || true ;;
  esac
  stop_pid "$SERVER"; SERVER=""
  python3 "$ROOT/scripts/bench/compare_summary.py" --one "$OUT/runs/$name.json" || true
}

for broker in ${BROKERS//,/ }; do
  case $broker in memory|redis) ;; *) echo "unknown broker $broker" >&2; exit 2 ;; esac
  [ "$broker" = redis ] && start_redis
  for run in $(seq "$RUNS"); do
    for scenario in idle fanout; do
      servers="fanfare centrifugo"
      [ "$FLOOR" = 1 ] && [ "$broker" = memory ] && servers+=" floor"
      for server in $servers; do
        run_one "$server" "$broker" "$scenario" "$run"
      done
    done
  done
  stop_pid "$REDIS"; REDIS=""
done

SUMMARY_ARGS=("$OUT")
[ $WRITE_DOCS = 1 ] && SUMMARY_ARGS+=(--write-docs "$ROOT/docs/BENCHMARKS.md")
python3 "$ROOT/scripts/bench/compare_summary.py" "${SUMMARY_ARGS[@]}" | tee "$OUT/summary.md"
echo "reports: $OUT/runs, summary: $OUT/summary.md"
