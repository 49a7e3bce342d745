#!/usr/bin/env bash
# Deployment checks (called by scripts/test.sh; runs on its own too):
#   - helm lint --strict and helm template: default values and helm/fanfare/ci/*.yaml
#   - every rendered manifest validated with kubernetes-validate --strict against
#     the oldest and the newest Kubernetes the chart targets; CRD objects
#     (ServiceMonitor, PrometheusRule, HTTPRoute) are not in its schemas: they
#     are decoded strictly into their projects' Go types (scripts/deploy/crdcheck)
#     and the PrometheusRule's rules go through promtool
#   - bad values (helm/fanfare/tests/) rejected, each with the expected message
#   - values.schema.json `config` and the binary's configuration keys agree
#   - a rehearsal of every rendered Deployment: the real binary with exactly the
#     rendered args, config file and environment, against local Redis
#     (scripts/deploy/rehearse.py): probes, a client, an API call, SIGTERM
#   - deploy/k8s/ and deploy/prometheus/fanfare-alerts.yml equal a fresh render
#   - promtool check config / check rules / test rules on deploy/prometheus
#   - the Grafana dashboard parses, its queries are valid PromQL, and every
#     metric it queries exists on a live node (driven through a Redis restart)
#   - deploy/compose references and ports agree; its node config passes check-config
#   - helm template without --kube-version (what a new user types) renders
#   - the container image (deploy/Dockerfile, target runtime-prebuilt with this
#     binary, on a Debian base made by debootstrap: no registry is needed) run
#     the way the chart runs it: read-only, uid 10001, no capabilities,
#     no-new-privileges, --network host; /ready, a WebSocket client, the
#     HEALTHCHECK, docker stop -> close 3001 and exit 0. Skipped, saying why,
#     where no Docker engine can be started (dockerd is started as root when
#     none runs, and stopped again), unless FANFARE_REQUIRE_DOCKER=1.
# Tools are installed if missing (helm via go install, kubernetes-validate from
# PyPI, Debian packages). Processes started here are stopped by PID.
# Usage: FANFARE_BIN=target/debug/fanfare scripts/test-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/deploy/lib.sh

step() { printf '\n--> %s\n' "$*"; }
die() { echo "test-deploy: FAILED: $*" >&2; exit 1; }
passed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }

# Tools.
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server redis-tools)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
HELM=$(ensure_helm "$ROOT")
export HELM
ensure_kubernetes_validate
FANFARE_BIN=${FANFARE_BIN:-target/debug/fanfare}
case "$FANFARE_BIN" in /*) ;; *) FANFARE_BIN="$ROOT/$FANFARE_BIN" ;; esac
if [ ! -x "$FANFARE_BIN" ]; then
  cargo build -q -p fanfare-server
  FANFARE_BIN="$ROOT/target/debug/fanfare"
fi
echo "helm: $HELM ($("$HELM" version --short 2>/dev/null)), kubernetes-validate $KUBERNETES_VALIDATE_VERSION, fanfare: $FANFARE_BIN"

TMP=$(mktemp -d)
PIDS=()
# Containers and images this run created (removed at the end; the cached
# Debian base tarball stays), and the dockerd it started, if any.
CONTAINERS=()
IMAGES=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ ${#CONTAINERS[@]} -eq 0 ] || docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
  [ ${#IMAGES[@]} -eq 0 ] || docker rmi -f "${IMAGES[@]}" >/dev/null 2>&1 || true
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
CHART=helm/fanfare
# Stand-ins for keys of Secrets the chart does not render (existingSecret).
STAND_INS=(--existing-secret api-key=rehearsal-api-key --existing-secret hmac-secret=rehearsal-hmac-secret
           --existing-secret redis-urls=redis://redis-a:6379,redis://redis-b:6379
           --existing-secret admin-password=rehearsal-admin-password
           --existing-secret admin-secret=rehearsal-admin-secret-of-32-characters)

step "helm lint --strict"
"$HELM" lint --strict "$CHART" --kube-version "$KUBE_RENDER_VERSION" >"$TMP/lint.log" 2>&1 || { cat "$TMP/lint.log"; die "helm lint (default values)"; }
for f in "$CHART"/ci/*.yaml; do
  "$HELM" lint --strict "$CHART" -f "$f" --kube-version "$KUBE_RENDER_VERSION" >"$TMP/lint.log" 2>&1 || { cat "$TMP/lint.log"; die "helm lint -f $f"; }
done
ok "helm lint --strict: default values and $(ls "$CHART"/ci/*.yaml | wc -l) ci values files"

step "helm template + kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]})"
renders=(default)
"$HELM" template fanfare "$CHART" --kube-version "$KUBE_RENDER_VERSION" >"$TMP/default.yaml"
for f in "$CHART"/ci/*.yaml; do
  n=$(basename "$f" .yaml)
  renders+=("$n")
  "$HELM" template fanfare "$CHART" -f "$f" --kube-version "$KUBE_RENDER_VERSION" >"$TMP/$n.yaml"
done
renders+=(deploy-k8s)
cp deploy/k8s/fanfare.yaml "$TMP/deploy-k8s.yaml"
for n in "${renders[@]}"; do
  for kv in "${KUBE_VERSIONS[@]}"; do
    out=$(kubernetes-validate --strict -k "$kv" "$TMP/$n.yaml" 2>&1) || { echo "$out"; die "kubernetes-validate $n (Kubernetes $kv)"; }
    # Objects without a built-in schema must be the CRDs we expect.
    unknown=$(grep "Couldn't find schema" <<<"$out" | grep -v -E "kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1|kind HTTPRoute with api version gateway.networking.k8s.io/v1" || true)
    [ -z "$unknown" ] || { echo "$unknown"; die "$n: objects without a schema"; }
    grep -q "ERROR\|FAIL" <<<"$out" && { echo "$out"; die "kubernetes-validate $n"; }
  done
  kinds=$(python3 -c 'import sys,yaml; print(" ".join(sorted({d["kind"] for d in yaml.safe_load_all(open(sys.argv[1])) if d})))' "$TMP/$n.yaml")
  echo "  $n: $kinds"
done
ok "${#renders[@]} renders valid against Kubernetes ${KUBE_VERSIONS[*]} (custom resources checked below)"

# What a new user types first, without --kube-version: helm then checks the
# chart against its offline default (v1.20.0 for a go-installed helm), so the
# chart declares no kubeVersion (its README states the supported range). The
# templates do not read .Capabilities, so the manifests are the ones above.
"$HELM" template fanfare "$CHART" >"$TMP/plain.yaml" 2>"$TMP/plain.err" || { cat "$TMP/plain.err"; die "helm template fanfare $CHART (no --kube-version)"; }
diff -u "$TMP/default.yaml" "$TMP/plain.yaml" || die "helm template without --kube-version renders other manifests"
ok "helm template fanfare $CHART works without --kube-version and renders the same manifests"

# NOTES.txt renders for every values set (helm template does not render it: a
# copy of the chart wraps it in a ConfigMap).
cp -r "$CHART" "$TMP/notes-chart"
{ echo '{{- define "fanfare.notesCopy" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end }}'; } >"$TMP/notes-chart/templates/_notescopy.tpl"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n    {{- include "fanfare.notesCopy" . | nindent 4 }}\n' >"$TMP/notes-chart/templates/zz-notes.yaml"
for f in "" "$CHART"/ci/*.yaml; do
  "$HELM" template fanfare "$TMP/notes-chart" ${f:+-f "$f"} --kube-version "$KUBE_RENDER_VERSION" \
      --show-only templates/zz-notes.yaml >"$TMP/notes.yaml" 2>&1 || { cat "$TMP/notes.yaml"; die "NOTES.txt with ${f:-default values}"; }
  grep -q "connection/websocket" "$TMP/notes.yaml" || die "NOTES.txt with ${f:-default values} lacks the endpoint"
done
ok "NOTES.txt renders with every values set"

# The production render has every optional object; the PrometheusRule's rules pass promtool.
prod_kinds=$(python3 -c 'import sys,yaml; print(" ".join(sorted({d["kind"] for d in yaml.safe_load_all(open(sys.argv[1])) if d})))' "$TMP/production-values.yaml")
for k in Deployment Service ConfigMap HorizontalPodAutoscaler PodDisruptionBudget Ingress HTTPRoute ServiceMonitor PrometheusRule NetworkPolicy; do
  grep -qw "$k" <<<"$prod_kinds" || die "production render lacks a $k"
done
python3 - "$TMP/production-values.yaml" "$TMP/prodrules.yml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
assert any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "fanfare_connections" for m in hpa["spec"]["metrics"]), "HPA lacks the connections metric"
sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
svc = next(d for d in docs if d["kind"] == "Service" and any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in d["spec"]["ports"]))
assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), "ServiceMonitor does not select the client Service"
route = next(d for d in docs if d["kind"] == "HTTPRoute")
assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == svc["metadata"]["name"], "HTTPRoute backend is not the client Service"
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"))
EOF
promtool check rules "$TMP/prodrules.yml" >"$TMP/promtool.log" 2>&1 || { cat "$TMP/promtool.log"; die "PrometheusRule rules"; }
CRDCHECK=$(ensure_crdcheck "$ROOT")
"$CRDCHECK" "$TMP/production-values.yaml" >"$TMP/crd.log" 2>&1 || { cat "$TMP/crd.log"; die "custom resources"; }
grep -c '^ok ' "$TMP/crd.log" | grep -qx 3 || { cat "$TMP/crd.log"; die "expected 3 custom resources"; }
ok "production render: all optional objects present; ServiceMonitor, PrometheusRule, HTTPRoute decode strictly into their Go types and select the client Service; the rules pass promtool"

step "bad values are rejected"
nbad=0
for f in "$CHART"/tests/bad-values.yaml "$CHART"/tests/bad/*.yaml; do
  if "$HELM" template fanfare "$CHART" -f "$f" --kube-version "$KUBE_RENDER_VERSION" >/dev/null 2>"$TMP/bad.err"; then
    die "$f was accepted"
  fi
  while IFS= read -r want; do
    grep -qF -- "$want" "$TMP/bad.err" || { cat "$TMP/bad.err"; die "$f: error does not mention: $want"; }
  done < <(sed -n 's/^# expect: //p' "$f")
  grep -q '^# expect: ' "$f" || die "$f has no '# expect:' line"
  nbad=$((nbad + 1))
done
"$HELM" lint --strict "$CHART" -f "$CHART/tests/bad-values.yaml" >/dev/null 2>&1 && die "helm lint accepted tests/bad-values.yaml"
ok "$nbad bad values files rejected with the expected messages"

python3 - "$CHART" <<'PY' || die "chart README"
import sys, yaml
chart = sys.argv[1]
readme = open(f"{chart}/README.md").read()
def flat(d, prefix=""):
    for k, v in d.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict) and v and p != "commonLabels":
            yield from flat(v, p + ".")
        else:
            yield p
missing = [k for k in flat(yaml.safe_load(open(f"{chart}/values.yaml"))) if f"| `{k}` |" not in readme]
if missing:
    sys.exit("helm/fanfare/README.md does not list: " + ", ".join(missing))
PY
ok "the chart README lists every value"

step "values schema and binary agree on configuration keys"
python3 scripts/deploy/check_schema_keys.py "$FANFARE_BIN" "$CHART/values.schema.json" || die "schema keys"
ok "every binary config key is in the schema (or chart-managed); every schema key is accepted by the binary"

step "rehearsal: the rendered Deployments run the real binary"
for n in "${renders[@]}"; do
  echo "  == $n"
  timeout 180 python3 scripts/deploy/rehearse.py "$TMP/$n.yaml" --bin "$FANFARE_BIN" "${STAND_INS[@]}" >"$TMP/rehearse.log" 2>&1 \
    || { cat "$TMP/rehearse.log"; die "rehearsal of $n"; }
  sed 's/^/    /' "$TMP/rehearse.log"
done
ok "${#renders[@]} rehearsals: probes 200, client + API call, SIGTERM closes clients with 3001 and exits 0 within the grace period"

step "deploy/k8s and deploy/prometheus/fanfare-alerts.yml equal a fresh render"
scripts/render-k8s.sh "$TMP/render" >/dev/null
diff -u deploy/k8s/fanfare.yaml "$TMP/render/k8s/fanfare.yaml" || die "deploy/k8s/fanfare.yaml is stale: run scripts/render-k8s.sh"
diff -u deploy/prometheus/fanfare-alerts.yml "$TMP/render/prometheus/fanfare-alerts.yml" || die "deploy/prometheus/fanfare-alerts.yml is stale: run scripts/render-k8s.sh"
cmp -s deploy/grafana/fanfare.json "$CHART/dashboards/fanfare.json" || die "helm/fanfare/dashboards/fanfare.json differs from deploy/grafana/fanfare.json (copy it)"
ok "rendered files are in sync (and the chart's dashboard copy)"

step "promtool: deploy/prometheus"
promtool check config deploy/prometheus/prometheus.yml >"$TMP/p.log" 2>&1 || { cat "$TMP/p.log"; die "promtool check config"; }
promtool check rules deploy/prometheus/fanfare-alerts.yml >"$TMP/p.log" 2>&1 || { cat "$TMP/p.log"; die "promtool check rules"; }
promtool test rules deploy/prometheus/tests/fanfare-alerts.test.yml >"$TMP/p.log" 2>&1 || { cat "$TMP/p.log"; die "promtool test rules"; }
ok "promtool check config, check rules, test rules (each alert fires on its input, none on a healthy cluster)"

step "Grafana dashboard against a live node"
# free_port, node_ready, start_node: readiness is always that of the process
# started here (a stranger on a port chosen free answers /ready or PING too).
source scripts/lib/node.sh
# redis_is PORT PID: the Redis on PORT is process PID (its INFO server says so).
redis_is() {
  [ "$(redis-cli -p "$1" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')" = "$2" ]
}
# start_redis [PORT]: a redis-server (rpid) on PORT, or on a fresh port (rport),
# retried on new ports when it exited at bind. 10 s per attempt.
start_redis() {
  local attempt fixed=${1:-}
  for attempt in 1 2 3; do
    rport=${fixed:-$(free_port)}
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >"$TMP/redis.log" 2>&1 &
    rpid=$!; PIDS+=("$rpid")
    for _ in $(seq 100); do
      kill -0 "$rpid" 2>/dev/null || break
      redis_is "$rport" "$rpid" && return 0
      sleep 0.1
    done
    kill "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true
    echo "redis-server on :$rport did not start (attempt $attempt):"; cat "$TMP/redis.log"
    # A restart must come back on the port the node is configured with.
    [ -z "$fixed" ] || die "redis-server could not be restarted on :$fixed"
  done
  die "redis-server did not start on 3 free ports"
}
wait_ready() { node_ready "$npid" "$TMP/node.log" "$hport" /ready || { cat "$TMP/node.log"; die "node (PID $npid) not ready"; }; }
start_redis
if ! start_node "$TMP/node.log" /ready env FANFARE__BROKER__KIND=redis \
    FANFARE__REDIS__URLS="redis://127.0.0.1:$rport" \
    FANFARE__SHUTDOWN__DRAIN_DELAY=0s FANFARE__SHUTDOWN__DRAIN_PERIOD=0s "$FANFARE_BIN"; then
  [ -z "$node_pid" ] || PIDS+=("$node_pid")
  die "the node did not start"
fi
npid=$node_pid; hport=$node_port; PIDS+=("$npid")
# One client session and one control API call.
timeout 30 python3 scripts/deploy/drive.py "127.0.0.1:$hport" >/dev/null || die "client/API drive"
# A subscriber held through a Redis restart: broker reconnect, then a stream gap.
timeout 40 python3 scripts/deploy/drive.py "127.0.0.1:$hport" --hold 30 >"$TMP/hold.log" 2>&1 &
hpid=$!; PIDS+=("$hpid")
for _ in $(seq 100); do grep -q subscribed "$TMP/hold.log" && break; sleep 0.1; done
grep -q subscribed "$TMP/hold.log" || { cat "$TMP/hold.log"; die "holder did not subscribe"; }
kill "$rpid"; wait "$rpid" 2>/dev/null || true
sleep 1
start_redis "$rport"
wait_ready
wait "$hpid" || { cat "$TMP/hold.log"; die "the held subscriber was not told to recover"; }
sleep 0.2
curl -sf "http://127.0.0.1:$hport/metrics" >"$TMP/metrics.txt"
python3 scripts/deploy/check_dashboard.py deploy/grafana/fanfare.json "$TMP/metrics.txt" "$TMP/dashboard-rules.yml" || die "dashboard"
promtool check rules "$TMP/dashboard-rules.yml" >"$TMP/p.log" 2>&1 || { cat "$TMP/p.log"; die "dashboard queries are not valid PromQL"; }
ok "dashboard parses, its queries are valid PromQL, and every metric it queries is on a live node"

step "compose"
python3 scripts/deploy/check_compose.py "$ROOT" "$TMP/compose.env" || die "compose"
(
  set -a; source <(grep -v '^CONFIG=' "$TMP/compose.env"); set +a
  "$FANFARE_BIN" check-config --config "$(sed -n 's/^CONFIG=//p' "$TMP/compose.env")" >"$TMP/cc.log" 2>&1
) || { cat "$TMP/cc.log"; die "the compose node configuration does not pass check-config"; }
ok "compose file references agree; the nodes' config + environment pass fanfare check-config"

step "container image: deploy/Dockerfile built here and run the way the chart runs it"
skipped=()
ms() { date +%s%3N; }
if ! ensure_docker_engine "$TMP/dockerd.log" 2>"$TMP/engine.err"; then
  # FANFARE_REQUIRE_DOCKER=1 (a CI machine known to have one) turns this into a failure.
  [ "${FANFARE_REQUIRE_DOCKER:-0}" = 0 ] || { cat "$TMP/engine.err"; die "no Docker engine (FANFARE_REQUIRE_DOCKER=1)"; }
  echo "SKIPPED: container image: no Docker engine can be used here: $(cat "$TMP/engine.err")"
  skipped+=("container image")
else
  echo "  Docker engine $(docker version --format '{{.Server.Version}}')${DOCKERD_PID:+, dockerd started here (PID $DOCKERD_PID)}"
  # No registry is assumed: the runtime base is a local debootstrap image
  # (built once into ~/.cache/fanfare), and the image takes this binary
  # (target runtime-prebuilt) instead of building one in the Rust image. The
  # legacy builder (what a docker client without buildx uses) proves that
  # path needs no BuildKit; --network host because there is no bridge.
  base_image=fanfare-debian-base:bookworm
  t0=$(ms)
  ensure_debian_base bookworm "$base_image" || die "the Debian base image (debootstrap + docker import)"
  [ -z "$BASE_IMPORTED" ] || IMAGES+=("$base_image")
  t_base=$(( $(ms) - t0 ))
  base_how="image present"
  [ -z "$BASE_IMPORTED" ] || base_how="import of the cached tarball"
  [ -z "$BASE_BUILT" ] || base_how="debootstrap + import"
  image=fanfare:test-deploy-$$
  ctx=$TMP/image-context
  mkdir -p "$ctx/config"
  cp "$FANFARE_BIN" "$ctx/fanfare"
  cp config/fanfare.example.toml "$ctx/config/"
  IMAGES+=("$image")
  t0=$(ms)
  DOCKER_BUILDKIT=0 docker build --network host -f deploy/Dockerfile --target runtime-prebuilt \
      --build-arg RUNTIME_IMAGE="$base_image" -t "$image" "$ctx" >"$TMP/build.log" 2>&1 \
    || { cat "$TMP/build.log"; die "docker build --target runtime-prebuilt (a binary built against a newer glibc than bookworm's fails its --version step)"; }
  t_build=$(( $(ms) - t0 ))
  docker run --rm --read-only --network host "$image" check-config >"$TMP/cc-image.log" 2>&1 \
    || { cat "$TMP/cc-image.log"; die "fanfare check-config in the image"; }

  # container_ready: the container runs, its node logged that it holds its
  # ports (a /ready answer alone may come from another process on the host
  # network's port), and /ready answers 200. 15 s.
  container_ready() {
    for _ in $(seq 150); do
      [ "$(docker inspect -f '{{.State.Running}}' "$cname" 2>/dev/null)" = true ] || return 1
      # (Not piped into grep -q: under pipefail its early exit could fail the pipe.)
      grep -q "control API listening" <<<"$(docker logs "$cname" 2>&1)" \
        && curl -sf "http://127.0.0.1:$hport/ready" >/dev/null && return 0
      sleep 0.1
    done
    return 1
  }
  # Retried on new ports when the node exited at bind.
  for attempt in 1 2 3; do
    hport=$(free_port); gport=$(free_port)
    cname=fanfare-test-deploy-$$-$attempt
    CONTAINERS+=("$cname")
    t0=$(ms)
    # The chart's pod security: read-only root, uid/gid 10001, no capabilities,
    # no privilege escalation. Host networking on loopback ports; the Redis of
    # the dashboard check above as the broker. The health interval is shortened
    # (the image's command and retries stay) so that `healthy` comes in seconds.
    docker run -d --name "$cname" --read-only --user 10001:10001 --cap-drop ALL \
        --security-opt no-new-privileges --network host --health-interval 1s \
        -e FANFARE__HTTP__LISTEN="127.0.0.1:$hport" -e FANFARE__GRPC__LISTEN="127.0.0.1:$gport" \
        -e FANFARE__BROKER__KIND=redis -e FANFARE__REDIS__URLS="redis://127.0.0.1:$rport" \
        -e FANFARE__SHUTDOWN__DRAIN_DELAY=0s -e FANFARE__SHUTDOWN__DRAIN_PERIOD=0s \
        "$image" >/dev/null || die "docker run"
    container_ready && break
    docker logs "$cname" 2>&1 | tail -n 30
    [ "$(docker inspect -f '{{.State.Running}}' "$cname")" = true ] && die "the container runs but its /ready is not 200"
    echo "the container exited before it was ready (attempt $attempt)"
    [ "$attempt" -lt 3 ] || die "the container did not start on 3 sets of free ports"
  done
  t_ready=$(( $(ms) - t0 ))
  # What the kernel says about the node's process, not what the image claims.
  cpid=$(docker inspect -f '{{.State.Pid}}' "$cname")
  grep -qE '^Uid:[[:space:]]+10001[[:space:]]+10001' "/proc/$cpid/status" || { grep -E '^(Uid|Gid)' "/proc/$cpid/status"; die "the node does not run as uid 10001"; }
  grep -qE '^CapEff:[[:space:]]+0+$' "/proc/$cpid/status" || { grep Cap "/proc/$cpid/status"; die "the node has capabilities"; }
  grep -qE '^NoNewPrivs:[[:space:]]+1$' "/proc/$cpid/status" || die "no_new_privs is not set"
  if docker exec "$cname" sh -c ': >/tmp/probe' 2>"$TMP/ro.err"; then die "the container's root filesystem is writable"; fi
  grep -q 'Read-only file system' "$TMP/ro.err" || { cat "$TMP/ro.err"; die "writing to /tmp failed for another reason than a read-only root"; }
  timeout 30 python3 scripts/deploy/drive.py "127.0.0.1:$hport" >"$TMP/drive-image.log" 2>&1 \
    || { cat "$TMP/drive-image.log"; docker logs "$cname" 2>&1 | tail -n 30; die "a WebSocket client and an API call against the container"; }
  health=""
  for _ in $(seq 100); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$cname")
    [ "$health" = healthy ] || [ "$health" = unhealthy ] && break
    sleep 0.2
  done
  [ "$health" = healthy ] || { docker inspect -f '{{json .State.Health}}' "$cname"; die "HEALTHCHECK: $health, not healthy"; }
  t_healthy=$(( $(ms) - t0 ))

  timeout 40 python3 scripts/deploy/drive.py "127.0.0.1:$hport" --hold 30 --expect-close 3001 >"$TMP/hold-image.log" 2>&1 &
  hpid=$!; PIDS+=("$hpid")
  for _ in $(seq 100); do grep -q subscribed "$TMP/hold-image.log" && break; sleep 0.1; done
  grep -q subscribed "$TMP/hold-image.log" || { cat "$TMP/hold-image.log"; die "the client to be drained did not subscribe"; }
  # Past -t docker sends SIGKILL (exit code 137): 0 means fanfare exited itself.
  t0=$(ms)
  docker stop -t 15 "$cname" >/dev/null
  t_stop=$(( $(ms) - t0 ))
  wait "$hpid" || { cat "$TMP/hold-image.log"; die "docker stop: the client was not closed with 3001"; }
  code=$(docker inspect -f '{{.State.ExitCode}}' "$cname")
  [ "$code" = 0 ] || { docker logs "$cname" 2>&1 | tail -n 30; die "docker stop: exit code $code, not 0"; }
  docker rm "$cname" >/dev/null
  echo "  image $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'); base $((t_base / 1000)) s ($base_how), build $((t_build / 1000)) s, /ready $t_ready ms after docker run, healthy after $t_healthy ms, docker stop $t_stop ms"
  ok "container image (runtime-prebuilt on a debootstrap bookworm base, legacy builder): read-only, uid 10001, no capabilities, no-new-privileges, --network host; check-config, /ready 200, WebSocket client + API call, HEALTHCHECK healthy, docker stop closes the client with 3001 and exits 0"
fi

echo
echo "test-deploy: $passed passed, 0 failed${skipped:+, skipped: ${skipped[*]}}"
