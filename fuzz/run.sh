#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 60) from its committed seeds, then
# replays the committed crash regressions. A crash fails the run and leaves the input in
# fuzz/artifacts/<target>/.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Stable Rust with RUSTC_BOOTSTRAP=1 for the sanitizer flags, so no nightly toolchain is needed.
# libFuzzer's RSS limit (2 GiB) is the memory check; its malloc limit is raised to 8 GiB because
# the DICOM parser reserves (never touches) an element's declared length before it reads it.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(nifti npy checkpoint model_file dicom c_volume)
fi
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -O -s address
for target in "${targets[@]}"; do
  corpus="../target/fuzz-corpus/$target"
  mkdir -p "$corpus"
  echo "== fuzz $target for ${seconds}s"
  log="../target/fuzz-$target.log"
  status=0
  cargo fuzz run -O -s address "$target" "$corpus" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=8192 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|ERROR|SUMMARY|Test unit" "$log" || true
  [ "$status" -eq 0 ] || { echo "fuzz $target found a crash (status $status; log: $log)"; exit 1; }
  if [ -d "regressions/$target" ]; then
    cargo fuzz run -O -s address "$target" regressions/"$target"/* -- -runs=1 >/dev/null 2>&1 \
      || { echo "regression inputs of $target crash again"; exit 1; }
  fi
done
