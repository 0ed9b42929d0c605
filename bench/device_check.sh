#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H200 image: Python 3.12, torch 2.11+cu130, triton 3.6, nvcc
# 13, ninja, pytest; no internet). It builds the extensions in place, runs the GPU tests (compiled Triton,
# TRITON_INTERPRET unset) and the benchmarks, and writes everything under $OUT as two files (the device
# tool brings back at most 8): summary.txt and results.tgz (logs, JSON/markdown tables, plots).
#
# Usage: bash bench/device_check.sh [PHASE ...]      (no phase: all, in this order)
#   env build test-cuda test-triton test-gpu-other bench-llm bench-layouts bench-tiny bench-retraction bench-lowrank
# DEADLINE_S (default 480): the script's own time budget; each phase's timeout is cut to what is left,
# so the archive is written before the device tool's limit. Give the tool a timeout_s ~40 s above it.
# TRITON_K: an optional pytest -k filter for the Triton GPU tests (careful: "float16" also matches
# "bfloat16"). Next GPU session, first: `env build test-cuda test-gpu-other test-triton` (never passed on a
# GPU yet: the layout parity, the device-side GradScaler and the crashing bad-argument tests of
# tests/test_cuda_backend.py, see bench/results/h200-20261128/README.md; and the CUDA-graph capture tests of
# tests/test_capturable.py, in test-gpu-other), and the cuda backend's eager entry _C_cuda.cuda_step with the
# argument checks it shares with the CPU op (written 2026-11-29 without a GPU; test_cuda_backend.py: both
# entries' bits and errors, each error path in a child process). Then bench-tiny: the cached plan of step()
# and the eager entry are new since the H200 figures.
set -uo pipefail
T0=$(date +%s)
DEADLINE_S="${DEADLINE_S:-480}"
OUT="${OUT:-bench/results/device-$(date -u +%Y%m%d)}"
WORK="$(mktemp -d)/device-check"
mkdir -p "$OUT" "$WORK"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET MOMENTUM_FUSED_BACKEND

finish() {
  echo "== archive ($(( $(date +%s) - T0 )) s)" >> "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/results.tgz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
}
trap finish EXIT

left() { echo $(( DEADLINE_S - ($(date +%s) - T0) - 10 )); }
# run NAME BUDGET_S CMD...: runs CMD with min(BUDGET_S, time left) as timeout, log in $WORK/NAME.log
run() {
  local name=$1 budget=$2; shift 2
  local t=$(left); [ "$t" -lt "$budget" ] && budget=$t
  if [ "$budget" -le 5 ]; then echo "SKIP $name: out of time" | tee -a "$WORK/summary.txt"; return; fi
  local s=$(date +%s)
  timeout "$budget" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - s )) s, budget $budget s)" | tee -a "$WORK/summary.txt"
  grep -E "passed|failed|error" "$WORK/$name.log" | tail -2 | sed 's/^/    /' | tee -a "$WORK/summary.txt"
}

phase_env() {
  { nvidia-smi; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))";
    "$PY" -c "import triton; print('triton', triton.__version__)"; nvcc --version | tail -2; git log -1 --oneline; } > "$WORK/env.log" 2>&1
  grep -E "^torch|^triton|H200|release" "$WORK/env.log" | tee -a "$WORK/summary.txt"
  # Control for the segfault of 2026-11-28 (the first c10::Error thrown by our cuda_step killed the process):
  # does an error thrown by torch's own C++ (a TORCH_CHECK in ATen), on the CPU and on CUDA, reach Python as a
  # RuntimeError in this image? If these crash too, the cause is the environment, not the extension.
  for dev in cpu cuda; do
    "$PY" -X faulthandler -c "import torch
try:
    torch.zeros(2, device='$dev') + torch.zeros(3, device='$dev')
except RuntimeError:
    print('torch C++ error on $dev -> RuntimeError: ok')" > "$WORK/env-cpp-error-$dev.log" 2>&1
    echo "control: torch C++ error on $dev: rc=$? $(head -c 200 "$WORK/env-cpp-error-$dev.log" | tr '\n' ' ')" \
      | tee -a "$WORK/summary.txt"
  done
}
phase_build() {
  MOMENTUM_FUSED_BUILD_CUDA=1 run build 240 "$PY" setup.py build_ext --inplace
  "$PY" -c "import momentum_fused as m; print(m.backends.status())" 2>&1 | tee -a "$WORK/summary.txt"
}
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
phase_test_cuda() { run test-cuda 150 "${PYTEST[@]}" -m gpu tests/test_cuda_backend.py; }
# TRITON_INTERPRET=0 explicitly: tests/triton/conftest.py defaults it to 1 (and then skips the GPU tests)
phase_test_triton() { TRITON_INTERPRET=0 run test-triton 200 "${PYTEST[@]}" -m gpu tests/triton ${TRITON_K:+-k "$TRITON_K"}; }
phase_test_gpu_other() { run test-gpu-other 90 "${PYTEST[@]}" -m gpu tests --ignore=tests/triton --ignore=tests/test_cuda_backend.py; }
phase_bench_llm() {
  run bench-llm 200 "$PY" -m bench --device cuda --quick --no-reference --params 1e9 --profiles llm \
    --rules "${LLM_RULES:-adamw,sgd_momentum,lion,sf_adamw,adam,nadam,rmsprop,signum,qhm,fsgdm}" --out "$WORK/bench-llm"
}
phase_bench_layouts() {
  run bench-layouts 120 "$PY" -m bench --device cuda --quick --no-reference --params 1e9 --profiles llm \
    --layouts fp32,bf16,bf16_state,master,bf16_sr --rules "${LAYOUT_RULES:-adamw,sgd_momentum,lion}" --out "$WORK/bench-layouts"
}
phase_bench_tiny() {
  run bench-tiny 120 "$PY" -m bench --device cuda --quick --no-reference --params 5.4e6 --profiles tiny \
    --rules "${TINY_RULES:-adamw,sgd_momentum,lion,sf_adamw}" --out "$WORK/bench-tiny"
}
phase_bench_retraction() { [ -f bench/bench_retraction.py ] && run bench-retraction 90 "$PY" -m bench.bench_retraction --device cuda --out "$WORK/bench-retraction"; }
phase_bench_lowrank() { [ -f bench/bench_lowrank.py ] && run bench-lowrank 60 "$PY" -m bench.bench_lowrank --device cuda --out "$WORK/bench-lowrank"; }

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(env build test-cuda test-triton test-gpu-other bench-llm bench-layouts bench-tiny bench-retraction bench-lowrank)
for ph in "${phases[@]}"; do
  echo "== $ph ($(( $(date +%s) - T0 )) s)" >> "$WORK/summary.txt"
  "phase_${ph//-/_}"
done
