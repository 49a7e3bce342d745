# Starting a fanfare node from a shell script on free loopback ports, ready
# only once it is the process started here (sourced by scripts/check-metrics.sh
# and scripts/test-deploy.sh). A port chosen free may be taken by another
# suite's server before ours binds it; ours exits then, and the stranger would
# answer /health or /ready just as well, so readiness is the node's own log
# line ("control API listening", logged once both ports are bound) and then
# its HTTP answer.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# node_ready PID LOG PORT PATH: the node PID still runs, LOG has its
# listening line and http://127.0.0.1:PORT/PATH answers 2xx. 15 s.
node_ready() {
  local pid=$1 log=$2 port=$3 path=$4
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || return 1
    grep -q "control API listening" "$log" && curl -sf "http://127.0.0.1:$port$path" >/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# start_node LOG PATH COMMAND...: runs COMMAND (e.g. `env K=V "$BIN"`) with
# FANFARE__HTTP__LISTEN / FANFARE__GRPC__LISTEN on free ports, output in LOG,
# until node_ready; retried on new ports when it exited at bind, 3 attempts.
# Sets node_pid, node_port (HTTP) and node_gport. Returns 1, with node_pid
# set, when a node runs but is not ready (the caller stops it).
start_node() {
  local log=$1 path=$2 attempt
  shift 2
  for attempt in 1 2 3; do
    node_port=$(free_port); node_gport=$(free_port)
    FANFARE__HTTP__LISTEN="127.0.0.1:$node_port" FANFARE__GRPC__LISTEN="127.0.0.1:$node_gport" \
      "$@" >"$log" 2>&1 &
    node_pid=$!
    node_ready "$node_pid" "$log" "$node_port" "$path" && return 0
    if kill -0 "$node_pid" 2>/dev/null; then
      cat "$log"; echo "node (PID $node_pid) runs but is not ready" >&2
      return 1
    fi
    echo "the node exited before it was ready (attempt $attempt):"; cat "$log"
  done
  node_pid=
  return 1
}
