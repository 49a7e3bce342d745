#!/usr/bin/env bash
# End-to-end tests of fanfare with the real centrifuge-go SDK (NewProtobufClient
# and NewJsonClient). Modules come through the Go module proxy (go.sum pins them).
# Usage: FANFARE_BIN=/abs/path/to/fanfare tests/go/run.sh [go test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ -z "${FANFARE_BIN:-}" ] || [ ! -x "${FANFARE_BIN}" ]; then
  echo "run.sh: FANFARE_BIN must name the fanfare binary (absolute path)" >&2
  exit 2
fi
command -v go >/dev/null || { echo "run.sh: go is needed" >&2; exit 2; }

export GOFLAGS=-mod=mod
exec go test -count=1 "$@" ./...
