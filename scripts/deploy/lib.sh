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
