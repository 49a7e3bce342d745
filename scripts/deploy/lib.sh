# Shared by scripts/render-k8s.sh and scripts/test-deploy.sh (sourced).
# Finds or installs the tools the deployment checks need.

HELM_VERSION=v3.22.0
KUBERNETES_VALIDATE_VERSION=1.37.0
# Kubernetes versions the manifests are validated against: the oldest the chart
# supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS=(1.30.0 1.37.0)
# The version helm template renders for (Capabilities.KubeVersion).
KUBE_RENDER_VERSION=1.33.0

# Prints the path of a helm $HELM_VERSION binary, building it with `go install`
# into $(go env GOPATH)/bin when neither it nor <repo>/.cache/bin has one.
ensure_helm() {
  local root=$1 gobin c
  gobin=$(go env GOPATH 2>/dev/null)/bin
  for c in "$root/.cache/bin/helm" "$gobin/helm" "$(command -v helm || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    # A go-installed helm records its module version; a release binary prints it.
    if go version -m "$c" 2>/dev/null | grep -q "helm.sh/helm/v3[[:space:]]*$HELM_VERSION" \
       || "$c" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
      echo "$c"; return 0
    fi
  done
  command -v go >/dev/null || { echo "ensure_helm: go is needed to install helm $HELM_VERSION" >&2; return 1; }
  echo "installing helm $HELM_VERSION with go install (a few minutes, once)" >&2
  GOBIN=$gobin go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  echo "$gobin/helm"
}

# Installs kubernetes-validate (and PyYAML with it) from PyPI when missing.
ensure_kubernetes_validate() {
  if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null \
     || [ "$(python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI" >&2
    python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
  fi
  command -v kubernetes-validate >/dev/null || { echo "kubernetes-validate is not on PATH" >&2; return 1; }
}

# Prints the path of scripts/deploy/crdcheck built from its current source
# (cached by content hash in ~/.cache/fanfare, outside the repository, so fresh
# clones on the same machine reuse it).
ensure_crdcheck() {
  local root=$1 src=$1/scripts/deploy/crdcheck hash dir bin
  command -v go >/dev/null || { echo "ensure_crdcheck: go is needed" >&2; return 1; }
  hash=$(cat "$src"/go.mod "$src"/go.sum "$src"/*.go | sha256sum | cut -c1-16)
  dir=${XDG_CACHE_HOME:-$HOME/.cache}/fanfare
  bin=$dir/crdcheck-$hash
  if [ ! -x "$bin" ]; then
    echo "building scripts/deploy/crdcheck (Prometheus Operator and Gateway API types; once)" >&2
    mkdir -p "$dir"
    (cd "$src" && go build -o "$bin.tmp" . && mv "$bin.tmp" "$bin") >&2
  fi
  echo "$bin"
}

# Makes a Docker engine answer on the default socket: the one already running,
# or a dockerd started here (root only). Ours runs without bridge networking,
# iptables or IP forwarding (test machines allow only `--network host`
# containers), on overlay2; its PID is left in DOCKERD_PID for the caller to
# stop, its log in $1. Returns 1, with the reason on stderr, when there is no
# engine to be had.
DOCKERD_PID=""
ensure_docker_engine() {
  local log=$1 _
  command -v docker >/dev/null || { echo "no docker client on PATH" >&2; return 1; }
  docker info >/dev/null 2>&1 && return 0
  command -v dockerd >/dev/null || { echo "no Docker engine running and no dockerd on PATH" >&2; return 1; }
  [ "$(id -u)" -eq 0 ] || { echo "no Docker engine running, and starting dockerd needs root (uid $(id -u))" >&2; return 1; }
  dockerd --storage-driver overlay2 --bridge none --iptables=false --ip6tables=false \
    --ip-forward=false --ip-masq=false >"$log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 150); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "dockerd did not start: $(tail -n 3 "$log")" >&2
  kill "$DOCKERD_PID" 2>/dev/null || true
  wait "$DOCKERD_PID" 2>/dev/null || true
  DOCKERD_PID=""
  return 1
}

# The Debian archive apt uses on this machine (a .sources or .list entry for
# the main archive, not -security), else deb.debian.org; FANFARE_DEBIAN_MIRROR
# overrides it.
debian_mirror() {
  local m
  if [ -n "${FANFARE_DEBIAN_MIRROR:-}" ]; then echo "$FANFARE_DEBIAN_MIRROR"; return; fi
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        | head -n 1 | tr -d '[:space:]' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# Makes a local image named $2 (default fanfare-debian-base:$1) of Debian $1
# (default bookworm) for deploy/Dockerfile's RUNTIME_IMAGE when no registry can
# be pulled from: debootstrap --variant=minbase with curl and ca-certificates
# (what the runtime stage would install), from debian_mirror, packed once into
# ~/.cache/fanfare/debian-<suite>-minbase-curl.tar.gz (about two minutes and
# 60 MB) and `docker import`ed when the image is absent. Sets BASE_IMPORTED=1
# when it imported the image (the caller may remove it; the tarball stays) and
# BASE_BUILT=1 when it ran debootstrap.
BASE_IMPORTED=""
BASE_BUILT=""
ensure_debian_base() {
  local suite=${1:-bookworm} image=${2:-fanfare-debian-base:${1:-bookworm}} dir tar root mirror
  docker image inspect "$image" >/dev/null 2>&1 && return 0
  dir=${XDG_CACHE_HOME:-$HOME/.cache}/fanfare
  tar=$dir/debian-$suite-minbase-curl.tar.gz
  if [ ! -s "$tar" ]; then
    command -v debootstrap >/dev/null || { echo "ensure_debian_base: debootstrap is needed" >&2; return 1; }
    mirror=$(debian_mirror)
    echo "building the Debian $suite base with debootstrap from $mirror into $tar (once)" >&2
    mkdir -p "$dir"
    rm -rf "$dir"/rootfs.* # left by an interrupted build
    root=$(mktemp -d "$dir/rootfs.XXXXXX")
    if ! debootstrap --variant=minbase --include=ca-certificates,curl "$suite" "$root" "$mirror" >"$root.log" 2>&1; then
      tail -n 20 "$root.log" >&2; rm -rf "$root" "$root.log"; return 1
    fi
    # What the official image leaves out too: downloaded packages and apt lists.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -c . | gzip -1 >"$tar.tmp"
    mv "$tar.tmp" "$tar"
    rm -rf "$root" "$root.log"
    BASE_BUILT=1
  fi
  docker import "$tar" "$image" >/dev/null || return 1
  BASE_IMPORTED=1
}
