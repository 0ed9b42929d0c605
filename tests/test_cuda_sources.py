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
