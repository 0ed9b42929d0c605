#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu and csrc/cuda/tools/*.cu file standalone (no torch headers) with
#   nvcc -O3 -arch=sm_90 -std=c++17 --fmad=false -c
# (tools/: the kernel-only timing harness bench/device_check.sh builds on a GPU machine)
# Exits nonzero on the first failure; prints 'nvcc not found, skipping' and exits 0 without nvcc.
# Usage: csrc/check_cuda_compile.sh [extra nvcc flags...]   (NVCC=/path/to/nvcc to pick one)
# Without extra flags, fused_step.cu's cubin and ptxas log (--resource-usage) are kept where
# bench/kernel_report.py looks for them (build/kernel_report/cuda-sm_90-<digest of the sources>), so the kernel
# report test (tests/test_kernel_report.py) reuses this compile instead of running nvcc again.
set -u
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  echo "nvcc not found, skipping"
  exit 0
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
KEEP=""
if [ $# -eq 0 ] && command -v python3 > /dev/null; then
  KEEP="$(cd "$ROOT" && python3 -c 'from bench.kernel_report import cuda_cache_dir; print(cuda_cache_dir("sm_90"))' 2>/dev/null || true)"
fi
status=0
shopt -s nullglob
files=("$HERE"/cuda/*.cu "$HERE"/cuda/tools/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "no .cu files under $HERE/cuda"
  exit 1
fi
for f in "${files[@]}"; do
  start=$(date +%s)
  name="$(basename "$f" .cu)"
  extra=()
  if [ -n "$KEEP" ] && [ "$name" = fused_step ]; then
    mkdir -p "$OUT/keep"
    extra=(--keep --keep-dir "$OUT/keep" --resource-usage)
  fi
  if "$NVCC" -O3 -std=c++17 --fmad=false -arch=sm_90 -I"$HERE" "${extra[@]}" "$@" -c "$f" -o "$OUT/$name.o" \
      > "$OUT/$name.log" 2>&1; then
    grep -v "^ptxas info" "$OUT/$name.log" | grep -v "^ *[0-9]* bytes stack frame" || true
    echo "ok   $(basename "$f") ($(( $(date +%s) - start )) s)"
    if [ ${#extra[@]} -gt 0 ] && [ -f "$OUT/keep/$name.sm_90.cubin" ]; then
      mkdir -p "$KEEP" && cp "$OUT/$name.log" "$KEEP/ptxas.log" && cp "$OUT/keep/$name.sm_90.cubin" "$KEEP/$name.cubin"
    fi
  else
    cat "$OUT/$name.log"
    echo "FAIL $(basename "$f")"
    status=1
    break
  fi
done
exit $status
