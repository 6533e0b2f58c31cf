#!/usr/bin/env bash
# The edge-target checks CI runs (README, "Targets"):
#   1. Jetson-class boards: cross-build for aarch64-unknown-linux-gnu and run the 64^3 MONAI parity
#      test (tests/monai_parity.rs) under qemu-user emulation;
#   2. Apple silicon: type-check the Metal build (`cargo check --target aarch64-apple-darwin
#      --features metal`); it cannot link or run off macOS.
# A step whose tools are missing is skipped with a line that says so; a step that runs must pass.
set -euo pipefail
cd "$(dirname "$0")/.."

have_target() { rustup target list --installed 2>/dev/null | grep -qx "$1"; }

echo "-- aarch64-unknown-linux-gnu: cross build and MONAI parity under qemu"
if have_target aarch64-unknown-linux-gnu && command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  cargo test --release --target aarch64-unknown-linux-gnu -p prosam --test monai_parity -- --exact fs12_library_matches_monai --nocapture
else
  echo "SKIPPED: needs the Rust target aarch64-unknown-linux-gnu, aarch64-linux-gnu-gcc and qemu-aarch64 (scripts/cross-deps.sh)"
fi

echo "-- aarch64-apple-darwin: type-check with --features metal"
if have_target aarch64-apple-darwin; then
  cargo check --release --target aarch64-apple-darwin --workspace --features metal
else
  echo "SKIPPED: needs the Rust target aarch64-apple-darwin (scripts/cross-deps.sh)"
fi
