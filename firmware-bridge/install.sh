#!/usr/bin/env bash
# Installs libprosam for C and C++ builds: the shared library (libprosam.so.0.1.0 with the
# libprosam.so.2 and libprosam.so links), the static library, prosam.h, a pkg-config file and a
# CMake package config, so that `pkg-config --libs prosam` and `find_package(prosam)` work.
#
#   cargo build --release -p prosam-firmware-bridge && firmware-bridge/install.sh PREFIX
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 PREFIX" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
prefix=$(realpath -m "$1")
built=${CARGO_TARGET_DIR:-$here/../target}/release
version=0.1.0
abi=2
for f in libprosam.so libprosam.a; do
  [ -f "$built/$f" ] || { echo "$built/$f is missing: run cargo build --release -p prosam-firmware-bridge" >&2; exit 1; }
done
install -d "$prefix/lib/pkgconfig" "$prefix/lib/cmake/prosam" "$prefix/include"
install -m 755 "$built/libprosam.so" "$prefix/lib/libprosam.so.$version"
ln -sf "libprosam.so.$version" "$prefix/lib/libprosam.so.$abi"
ln -sf "libprosam.so.$abi" "$prefix/lib/libprosam.so"
install -m 644 "$built/libprosam.a" "$prefix/lib/libprosam.a"
install -m 644 "$here/include/prosam.h" "$prefix/include/prosam.h"
for template in prosam.pc:pkgconfig prosamConfig.cmake:cmake/prosam prosamConfigVersion.cmake:cmake/prosam; do
  name=${template%%:*}
  dir=${template#*:}
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@ABI@|$abi|g" \
    "$here/packaging/$name.in" > "$prefix/lib/$dir/$name"
done
echo "installed libprosam $version (ABI $abi) under $prefix"
