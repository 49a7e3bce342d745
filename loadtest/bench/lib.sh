# Shell helpers shared by the benchmark scripts (sourced, not run):
# loadtest/bench/*.sh, scripts/bench/*.sh, scripts/bench-api.sh, and
# tests/conformance/run.sh (free_port, wait_port).

# Other work on the machine (builds, tests) ruins CPU-bound figures: wait (up
# to QUIET_WAIT seconds, default 900) until all CPUs together are less than
# 15 % busy over 5 s. The report's `machine.other_cpu_seconds_per_second` says
# how quiet it stayed.
wait_quiet() {
  local deadline=$((SECONDS + ${QUIET_WAIT:-900}))
  local cpus ticks u n s i si st
  cpus=$(nproc)
  # /proc/stat counts 1/100 s ticks: 5 s x cpus x 100 ticks, 15 % of it
  ticks=$((5 * cpus * 100 * 15 / 100))
  while [ $SECONDS -lt $deadline ]; do
    read -r _ u n s _ _ i si st _ < /proc/stat; local b1=$((u + n + s + i + si + st))
    sleep 5
    read -r _ u n s _ _ i si st _ < /proc/stat; local b2=$((u + n + s + i + si + st))
    [ $((b2 - b1)) -lt "$ticks" ] && return 0
  done
  echo "machine not quiet; running anyway" >&2
}

# A free TCP port on 127.0.0.1 (the kernel's choice; racy but good enough here).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_port PORT [TRIES]: until something accepts on 127.0.0.1:PORT (0.1 s steps).
wait_port() {
  local i
  for i in $(seq "${2:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# limits_off: the [limits] section of every benchmark node (fanfare's; the
# Centrifugo of compare-centrifugo.sh has no such limits).
limits_off() {
  cat <<EOF
[limits]
# Benchmarks open tens of thousands of connections from a few loopback
# addresses and publish thousands a second over one connection: off here.
connect_rate = 0
ip_connect_rate = 0
node_connections = 0
user_connections = 0
client_commands = 0
user_commands = 0
EOF
}

# node_config PORT: the TOML of a benchmark node on 127.0.0.1:PORT (gRPC on
# PORT+1, log level warn, [limits] off); callers append their own sections.
node_config() {
  cat <<EOF
[http]
listen = "127.0.0.1:$1"
[grpc]
listen = "127.0.0.1:$(($1 + 1))"
[log]
level = "warn"
EOF
  limits_off
}
