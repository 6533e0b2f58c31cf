#!/usr/bin/env bash
# What the edge-target checks need beyond the host toolchain: the Rust targets aarch64-unknown-linux-gnu
# (Jetson) and aarch64-apple-darwin (Apple, type-check only), Debian's aarch64 cross compiler and C
# library, and qemu-user to run aarch64 test binaries. Prints what it cannot install instead of
# failing; scripts/cross-check.sh then says which step it skips.
set -u
for target in aarch64-unknown-linux-gnu aarch64-apple-darwin; do
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >/dev/null 2>&1 || echo "could not install the Rust target $target (rustup offline?)"
  fi
done
packages=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || packages+=(qemu-user)
[ ${#packages[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
echo "installing ${packages[*]}"
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}"; } >/dev/null 2>&1; then
  echo "could not install ${packages[*]} (no apt, no root or no network)"
fi
exit 0
