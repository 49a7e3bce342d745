# Sourced by the Python-driven test runners (tests/api/run.sh,
# tests/conformance/run.sh): ensure_venv makes ./.venv from ./requirements.txt,
# again whenever requirements.txt changed. Uses $PY (default python3).
ensure_venv() {
  local py=${PY:-python3}
  if [ ! -x .venv/bin/python ] || ! cmp -s requirements.txt .venv/.requirements; then
    rm -rf .venv
    "$py" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/.requirements
  fi
}
