#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H200 image: Python 3.12, torch 2.11+cu130, triton 3.6,
# nvcc, ninja, no internet). It builds the extensions in place, runs the GPU tests (compiled Triton,
# TRITON_INTERPRET unset), then the quick benchmark on the llm profile at 1e9 fp32 params and on the
# tiny profile (~5,000 tensors of <= 4096 elements), and writes everything under $OUT.
# Budget: under 8 minutes. Usage (device tool): bash bench/device_check.sh
# Not yet run on a GPU (no GPU was available when it was written): expect to fix details on first use.
set -uo pipefail
OUT="${OUT:-bench/results/device-$(date -u +%Y%m%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}"
unset TRITON_INTERPRET MOMENTUM_FUSED_BACKEND

step() { echo "== $* ($(date -u +%T))" | tee -a "$OUT/summary.txt"; }

step "environment"
{ nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))";
  "$PY" -c "import triton; print('triton', triton.__version__)"; "$PY" -m pytest --version; } > "$OUT/env.txt" 2>&1

step "build (CPU + CUDA extensions, in place)"
MOMENTUM_FUSED_BUILD_CUDA=1 timeout 300 "$PY" -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$OUT/summary.txt"
"$PY" -c "import momentum_fused as m; print(m.backends.status())" 2>&1 | tee -a "$OUT/summary.txt"

step "GPU tests"
timeout 240 "$PY" -m pytest -q -m gpu tests/triton/test_gpu.py > "$OUT/gpu_tests_triton.txt" 2>&1
echo "triton gpu tests rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/gpu_tests_triton.txt" >> "$OUT/summary.txt"
timeout 120 "$PY" -m pytest -q -m gpu tests --ignore=tests/triton > "$OUT/gpu_tests_main.txt" 2>&1
echo "main gpu tests rc=$? (5 = none marked yet)" | tee -a "$OUT/summary.txt"

step "benchmark: llm profile, 1e9 fp32 params"
timeout 240 "$PY" -m bench --device cuda --quick --no-reference --params 1e9 --profiles llm --out "$OUT/bench-llm" \
  > "$OUT/bench-llm.txt" 2> "$OUT/bench-llm.err"
echo "bench llm rc=$?" | tee -a "$OUT/summary.txt"

step "benchmark: tiny profile, ~5,000 tensors"
timeout 120 "$PY" -m bench --device cuda --quick --no-reference --params 5.4e6 --profiles tiny --out "$OUT/bench-tiny" \
  > "$OUT/bench-tiny.txt" 2> "$OUT/bench-tiny.err"
echo "bench tiny rc=$?" | tee -a "$OUT/summary.txt"
step "done"
