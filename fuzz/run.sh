#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 60) from its committed seeds, JOBS
# targets at a time (default 2; each fuzzer is one process on one core), then replays the
# committed crash regressions. A crash fails the run and leaves the input in
# fuzz/artifacts/<target>/; each target's log is target/fuzz-<target>.log.
#   fuzz/run.sh [SECONDS] [TARGET...]        (JOBS=1 fuzz/run.sh 600 for a campaign)
# Stable Rust with RUSTC_BOOTSTRAP=1 for the sanitizer flags, so no nightly toolchain is needed.
# libFuzzer's RSS limit (3 GiB) is the memory check; its malloc limit is raised to 8 GiB because
# the DICOM parser reserves (never touches) an element's declared length before it reads it, and
# AddressSanitizer's quarantine is kept to 64 MiB: targets that allocate up to their 64 MiB budget
# per input otherwise hold gigabytes of freed memory after 100 000 inputs (one input alone: 57 MiB).
set -euo pipefail
cd "$(dirname "$0")"
export SECONDS_PER_TARGET=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(nifti npy checkpoint model_file dicom c_volume)
fi
export RUSTC_BOOTSTRAP=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -O -s address
export HOST; HOST=$(rustc -vV | sed -n "s/^host: //p")

fuzz_one() {
  local target=$1 corpus="../target/fuzz-corpus/$1" log="../target/fuzz-$1.log" status=0
  local bin="./target/$HOST/release/$target"
  mkdir -p "$corpus"
  # Run the built binary directly: `cargo fuzz run` would check the build once per target.
  "$bin" "$corpus" "seeds/$target" \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=3072 -malloc_limit_mb=8192 \
    -print_final_stats=1 -artifact_prefix="artifacts/$target/" >"$log" 2>&1 || status=$?
  echo "== $target: $(grep -E "^#[0-9]+[[:space:]]+DONE" "$log" | tail -1)"
  grep -E "stat::number_of_executed_units|ERROR|SUMMARY|Test unit" "$log" | sed "s/^/   $target: /" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz $target found a crash (status $status; log: $log)"
    return 1
  fi
  if [ -d "regressions/$target" ]; then
    "$bin" -runs=1 regressions/"$target"/* >/dev/null 2>&1 \
      || { echo "fuzz $target: a regression input crashes again"; return 1; }
  fi
}
export -f fuzz_one
mkdir -p artifacts
for target in "${targets[@]}"; do mkdir -p "artifacts/$target"; done
printf '%s\n' "${targets[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'fuzz_one "$1"' _ {}
