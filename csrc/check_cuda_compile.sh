#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu file standalone (no torch headers) with
#   nvcc -O3 -arch=sm_90a -std=c++17 --fmad=false -c
# Exits nonzero on the first failure; prints 'nvcc not found, skipping' and exits 0 without nvcc.
# Usage: csrc/check_cuda_compile.sh [extra nvcc flags...]   (NVCC=/path/to/nvcc to pick one)
set -u
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  echo "nvcc not found, skipping"
  exit 0
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
shopt -s nullglob
files=("$HERE"/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "no .cu files under $HERE/cuda"
  exit 1
fi
for f in "${files[@]}"; do
  start=$(date +%s)
  if "$NVCC" -O3 -arch=sm_90a -std=c++17 --fmad=false -I"$HERE" "$@" -c "$f" -o "$OUT/$(basename "$f").o"; then
    echo "ok   $(basename "$f") ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL $(basename "$f")"
    status=1
    break
  fi
done
exit $status
