"""The CUDA extension's torch glue compiles on a machine without a GPU.

`.ci/run` compiles the kernels (csrc/cuda/*.cu, no torch headers) with nvcc; the binding files
(csrc/cuda/*.cpp: the registered op, the pybind eager entry, and the argument checks they share with the CPU
op, csrc/step_args.h and csrc/py_borrow.h) need torch's headers and are built only with a CUDA build of torch,
which this project's CPU machines do not have. Here each is compiled by the host compiler with
``-fsyntax-only`` against the installed torch's headers (a CPU wheel ships the c10/cuda headers) and the CUDA
toolkit's ``cuda_runtime.h``, with the flags torch's CUDAExtension passes: a binding that stops compiling
fails this test, not the next GPU session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
BINDINGS = sorted(f for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cpp"))


def _cuda_include():
    """The CUDA toolkit's include folder (the one holding cuda_runtime.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        for sub in ("include", os.path.join("targets", "x86_64-linux", "include")):
            inc = os.path.join(root, sub)
            if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
                return inc
    return None


def _compile_command(source):
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    flags = ["-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
             # the CPU wheel lacks the CUDA build's generated c10/cuda/impl/cuda_cmake_macros.h
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}",
                                                  f"-I{CSRC}"]
    return [cxx, *flags, *incs, os.path.join(CSRC, "cuda", source)]


def test_every_binding_file_is_checked():
    assert BINDINGS == ["cuda_ops.cpp", "cuda_python.cpp"], "a new binding file: check that setup.py builds it"


def test_cuda_bindings_compile():
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("needs a C++ compiler (g++ or $CXX)")
    if _cuda_include() is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime.h; set CUDA_HOME)")
    # the files compile side by side (~10 and ~40 s)
    procs = {f: subprocess.Popen(_compile_command(f), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in BINDINGS}
    failed = {}
    for f, p in procs.items():
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            failed[f] = "\n".join(line for line in out.splitlines() if "error" in line)[:4000] or out[-4000:]
    assert not failed, "CUDA binding files do not compile:\n" + "\n\n".join(f"{f}:\n{e}" for f, e in failed.items())


if __name__ == "__main__":  # print the commands (to run them by hand)
    for f in BINDINGS:
        print(" ".join(_compile_command(f)), file=sys.stdout)


# ------------------------------------------------------------------------------ the launch planner (host C++)
_PLAN_DRIVER = r"""
#include <cstdio>
#include <vector>
#include "cuda/launch_plan.h"
using namespace mf::cuda;
struct Rec {
  int launch_no = 0;
  std::vector<long long> slots;
  void add_tensor(int slot, int64_t i) {
    if ((int)slots.size() <= slot) slots.resize(slot + 1, -1);
    slots[slot] = i;
    std::printf("T %d %d %lld\n", launch_no, slot, (long long)i);
  }
  void add_block(int b, int slot, int64_t c) {
    std::printf("B %d %d %d %lld %lld\n", launch_no, b, slot, (long long)slots.at(slot), (long long)c);
  }
  bool launch(int nt, int nb) { std::printf("L %d %d %d\n", launch_no, nt, nb); ++launch_no; slots.clear(); return true; }
};
int main(int argc, char** argv) {
  // stdin: chunk max_tensors max_blocks n numel...; or "caps": the table capacities
  if (argc > 1) {
    for (int nl = 2; nl <= 8; ++nl) {
      TableCapacity big = table_capacity(nl, 32764 - 128), small = table_capacity(nl, 4096 - 128);
      std::printf("C %d %d %d %lld %d %d %lld\n", nl, big.tensors, big.blocks,
                  (long long)table_bytes(nl, big.tensors, big.blocks), small.tensors, small.blocks,
                  (long long)table_bytes(nl, small.tensors, small.blocks));
    }
    return 0;
  }
  long long chunk, n;
  int mt, mb;
  if (std::scanf("%lld %d %d %lld", &chunk, &mt, &mb, &n) != 4) return 2;
  std::vector<int64_t> numel(n);
  for (auto& x : numel) { long long v; if (std::scanf("%lld", &v) != 1) return 2; x = v; }
  Rec r;
  long long launches = plan_launches(n, numel.data(), chunk, mt, mb, r);
  std::printf("N %lld\n", launches);
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("needs a C++ compiler (g++ or $CXX)")
    d = tmp_path_factory.mktemp("plan")
    src, exe = d / "plan.cpp", d / "plan"
    src.write_text(_PLAN_DRIVER)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    return str(exe)


def _plan(exe, numels, chunk=65536, max_tensors=256, max_blocks=4256):
    inp = f"{chunk} {max_tensors} {max_blocks} {len(numels)} " + " ".join(map(str, numels))
    out = subprocess.run([exe], input=inp, capture_output=True, text=True, check=True).stdout.split("\n")
    launches, blocks, tensors = {}, [], {}
    for line in filter(None, out):
        f = line.split()
        if f[0] == "L":
            launches[int(f[1])] = (int(f[2]), int(f[3]))
        elif f[0] == "B":
            blocks.append(tuple(map(int, f[1:])))
        elif f[0] == "T":
            tensors.setdefault(int(f[1]), {})[int(f[2])] = int(f[3])
        elif f[0] == "N":
            n = int(f[1])
    assert n == len(launches)
    return n, launches, blocks, tensors


def _check_plan(exe, numels, chunk=65536, max_tensors=256, max_blocks=4256):
    n, launches, blocks, tensors = _plan(exe, numels, chunk, max_tensors, max_blocks)
    seen = {}
    for launch, b, slot, tensor, c in blocks:
        assert 0 <= slot < launches[launch][0] <= max_tensors
        assert 0 <= b < launches[launch][1] <= max_blocks
        assert tensors[launch][slot] == tensor
        key = (tensor, c)
        assert key not in seen, f"chunk {key} in two blocks"
        seen[key] = launch
    for launch, (nt, nb) in launches.items():
        assert sorted(b for ln, b, *_ in blocks if ln == launch) == list(range(nb)), "blocks 0..nb-1, each once"
        assert sorted(tensors[launch]) == list(range(nt))
    want = {(t, c) for t, x in enumerate(numels) for c in range(-(-x // chunk)) if x > 0}
    assert set(seen) == want, "every chunk of every non-empty tensor exactly once"
    return n


def test_launch_plan_covers_every_chunk_once(plan_driver):
    import random
    rng = random.Random(0)
    cases = [[], [0], [1], [65536], [65537], [0, 5, 0], [65536 * 7 + 3] * 3,
             [rng.choice([0, 1, 100, 65535, 65536, 65537, 300000]) for _ in range(200)]]
    for numels in cases:
        for mt, mb in ((256, 4256), (36, 320), (2, 3), (1, 1), (3, 1000)):
            _check_plan(plan_driver, numels, max_tensors=mt, max_blocks=mb)


def _profile(name, total):
    """bench.core.profile_shapes's element counts (imported lazily: bench imports torch)."""
    import math

    from bench.core import profile_shapes
    return [math.prod(s) for s in profile_shapes(name, int(total))]


def test_launch_counts_llm_and_tiny_profiles(plan_driver):
    caps = {int(f[1]): tuple(map(int, f[2:]))
            for f in (line.split() for line in subprocess.run([plan_driver, "caps"], capture_output=True, text=True,
                                                               check=True).stdout.splitlines())}
    for nl, (bt, bb, bbytes, st, sb, sbytes) in caps.items():
        assert bbytes <= 32764 - 128 and sbytes <= 4096 - 128 and (st, sb) == (36 if nl <= 6 else 28, 320) and bt == 256
    llm, tiny = _profile("llm", 1e9), _profile("tiny", 5.4e6)
    assert (len(llm), len(tiny)) == (292, 4981)
    t4, b4 = caps[4][:2]  # AdamW: param, grad, exp_avg, exp_avg_sq
    # the 32 KB table: 15,464 chunks of 1e9 params in 4 launches (49 with the 4 KB table), 4,981 tiny tensors in
    # 20 launches of 256 (139 of 36)
    assert _check_plan(plan_driver, llm, max_tensors=t4, max_blocks=b4) == 4
    assert _check_plan(plan_driver, llm, max_tensors=36, max_blocks=320) == 49
    assert _check_plan(plan_driver, tiny, max_tensors=t4, max_blocks=b4) == 20
    assert _check_plan(plan_driver, tiny, max_tensors=36, max_blocks=320) == 139
