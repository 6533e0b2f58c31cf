#!/usr/bin/env bash
# Installs the Debian packages prosam's tests use beyond the Rust toolchain: gcc (C examples),
# pkg-config and cmake (the C library's package files), valgrind (memory checks of the C API),
# dcmtk (an independent DICOM encoder: JPEG lossless and RLE copies of the test series).
# Prints what it cannot install instead of failing; the tests that need it then say so.
set -u
missing=()
for tool in gcc pkg-config cmake valgrind dcmcjpeg; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=()
for tool in "${missing[@]}"; do
  case "$tool" in
    gcc) packages+=(gcc libc6-dev) ;;
    dcmcjpeg) packages+=(dcmtk) ;;
    *) packages+=("$tool") ;;
  esac
done
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
echo "installing ${packages[*]}"
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}"; } >/dev/null 2>&1; then
  echo "could not install ${packages[*]} (no apt, no root or no network): the tests that need them will say so"
fi
exit 0
