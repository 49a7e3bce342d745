#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ and runs each for a while (docs/SECURITY.md,
# "Fuzzing"). Installs cargo-fuzz when missing; stable rustc takes libFuzzer's
# nightly flags through RUSTC_BOOTSTRAP=1.
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS (20) each
#   FUZZ_SECONDS=3600 scripts/fuzz.sh jwt config   a long run of two targets
#
# Working corpora grow in fuzz/corpus/<target> (not committed), seeded from
# the committed fuzz/seeds/<target>. A crash stops the script with the input
# saved under fuzz/artifacts/<target>/: turn it into a unit test in the crate
# that owns the parser, fix, and keep the test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# No sanitizer: the parsers are safe Rust (one `set_len` after a read), and
# without ASan a run does ~3x the executions; debug assertions catch overflow.
# Short runs (test.sh) use an unoptimized build, which compiles in a fraction
# of the time; long runs an optimized one (FUZZ_RELEASE=1 forces it).
if [ "${FUZZ_RELEASE:-0}" = 1 ] || [ "$SECONDS_EACH" -gt 60 ]; then
  FLAGS=(-O -a -s none)
else
  FLAGS=(--dev -s none)
fi
cd fuzz
echo "==> building the fuzz targets"
cargo fuzz build "${FLAGS[@]}"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
  echo "==> $t for ${SECONDS_EACH}s"
  set +e
  # The CPU time matters more than the wall time when the run shares cores
  # (docs/SECURITY.md reports both).
  TIMEFORMAT="==> $t: %0R s wall, %0U s user + %0S s sys CPU"
  time cargo fuzz run "${FLAGS[@]}" "$t" "corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    2>&1 | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done )|ERROR|panicked|SUMMARY|Test unit written'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "fuzz target $t failed (exit $rc): the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "==> fuzzing done: ${#targets[@]} targets, ${SECONDS_EACH}s each"
