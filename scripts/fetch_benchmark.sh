#!/usr/bin/env bash
# Unpacks Debian's Google Benchmark packages into PREFIX (no root, nothing installed system-wide)
# and prints the CMake prefix path to use: cmake -DCMAKE_PREFIX_PATH="$(scripts/fetch_benchmark.sh DIR)".
# Does nothing but print the path when PREFIX already holds the unpacked packages.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

unpacked() {
  compgen -G "$prefix/usr/lib/*/cmake/benchmark/benchmarkConfig.cmake" >/dev/null &&
    compgen -G "$prefix/usr/lib/*/libbenchmark.so.1.*" >/dev/null
}

if ! unpacked; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && apt-get download libbenchmark-dev libbenchmark1debian >&2); then
    echo "$0: 'apt-get download libbenchmark-dev libbenchmark1debian' failed" \
      "(needs a Debian/Ubuntu apt source that carries them; try 'apt-get update' first)" >&2
    exit 1
  fi
  for deb in "$tmp"/*.deb; do
    dpkg -x "$deb" "$prefix"
  done
  if ! unpacked; then
    echo "$0: the packages did not contain benchmarkConfig.cmake and libbenchmark.so.1.*" >&2
    exit 1
  fi
  echo "$0: Google Benchmark unpacked into $prefix" >&2
fi
echo "$prefix/usr"
