#!/usr/bin/env bash
# The test suite on another torch and Python than CI's (CI: torch 2.13.0+cpu, Python 3.11, triton 3.6.0).
#
#   bash .ci/torch_matrix.sh TORCH_VERSION [PYTHON] [main|triton|both]     e.g. bash .ci/torch_matrix.sh 2.11.0 python3.12
#
# Makes a venv under $WORK (default /tmp/mf-torch-matrix) with torch==TORCH_VERSION from the package index (on
# x86_64 Linux that is torch's CUDA wheel with its nvidia-* packages, ~3-5 GB, and the triton that torch asks for;
# it runs on the CPU), clones this checkout's HEAD there, builds the CPU extension in place (no CUDA build:
# MOMENTUM_FUSED_BUILD_CUDA=1 in the environment adds it, with CUDA_HOME and TORCH_CUDA_ARCH_LIST set), and runs
# the main suite and the Triton-interpreter suite as `make test` does. Logs: $WORK/<tag>/{build,main,triton}.log;
# the last lines of each are printed. Exit status 1 when a build or a suite failed. Not part of CI (the download
# alone takes minutes); docs/ecosystem.md ("Torch versions") lists the versions it passed on and what it found.
set -uo pipefail
TORCH="${1:?usage: bash .ci/torch_matrix.sh TORCH_VERSION [PYTHON] [main|triton|both]}"
PYBIN="${2:-python3}"
WHICH="${3:-both}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/mf-torch-matrix}"
PYVER="$("$PYBIN" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" || exit 2
TAG="torch${TORCH}-py${PYVER}"
D="$WORK/$TAG"
mkdir -p "$D"
echo "== $TAG in $D"
if [ ! -x "$D/venv/bin/python" ] || ! "$D/venv/bin/python" -c "import torch" 2>/dev/null; then
  "$PYBIN" -m venv "$D/venv" || exit 2
  "$D/venv/bin/python" -m pip install -q --upgrade pip
  # the repo's dev requirements without its torch and triton pins (torch brings the triton it was built with)
  grep -v -E '^(torch|triton)==' "$ROOT/requirements-dev.txt" > "$D/requirements.txt"
  PIP_CONSTRAINT= "$D/venv/bin/python" -m pip install -q "torch==$TORCH" -r "$D/requirements.txt" > "$D/pip.log" 2>&1 ||
    { tail -5 "$D/pip.log"; exit 2; }
fi
"$D/venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rm -rf "$D/repo" && git clone -q "$ROOT" "$D/repo" || exit 2
cd "$D/repo" || exit 2
FAILED=0
MOMENTUM_FUSED_BUILD_CUDA="${MOMENTUM_FUSED_BUILD_CUDA:-0}" "$D/venv/bin/python" setup.py build_ext --inplace -q \
  > "$D/build.log" 2>&1 || FAILED=1
grep -E "WARNING|error" "$D/build.log" | head -5
export PYTHONPATH="$D/repo"  # (not pip-installed: the examples and subprocess tests import it from here)
if [ "$WHICH" != triton ]; then
  "$D/venv/bin/python" -m pytest -q -p no:cacheprovider tests --ignore=tests/triton > "$D/main.log" 2>&1 || FAILED=1
  echo "-- main suite:"; grep -E "^(FAILED|ERROR)" "$D/main.log" | head -20; tail -1 "$D/main.log"
fi
if [ "$WHICH" != main ]; then
  TRITON_INTERPRET=1 "$D/venv/bin/python" -m pytest -q -p no:cacheprovider tests/triton > "$D/triton.log" 2>&1 ||
    FAILED=1
  echo "-- Triton interpreter suite:"; grep -E "^(FAILED|ERROR)" "$D/triton.log" | head -20; tail -1 "$D/triton.log"
fi
exit $FAILED
