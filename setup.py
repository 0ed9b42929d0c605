"""Installs momentum_fused. The compiled backends in csrc/ are optional:

- CPU extension ``momentum_fused._C_cpu`` (C++17, OpenMP, AVX-512 variant picked at run time): built
  whenever torch's C++ extension machinery and a C++ compiler are available.
  MOMENTUM_FUSED_BUILD_CPU=0 skips it.
- CUDA extension ``momentum_fused._C_cuda``: built only when nvcc is found AND torch is a CUDA build,
  or when forced with MOMENTUM_FUSED_BUILD_CUDA=1 (=0 never builds it).

A failed optional build never fails the install: the package stays pure Python, and the reason is
written to ``momentum_fused/_C_<name>.build-error.txt``, which the backend module reports through
``momentum_fused.backends.status()``. A successful build removes that file.
"""
import os
import shutil
import sys
import traceback

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_DIR = os.path.join(HERE, "momentum_fused")

ext_modules = []
cmdclass = {}


def _status_path(short):
    return os.path.join(PKG_DIR, f"_C_{short}.build-error.txt")


def _record(short, reason):
    """Write (reason) or clear (None) the stored build error of extension ``short`` ('cpu'/'cuda')."""
    path = _status_path(short)
    try:
        if reason is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "w") as fh:
                fh.write(reason.strip() + "\n")
    except OSError:
        pass


def _env_flag(name):
    v = os.environ.get(name)
    return None if v is None or v == "" else v not in ("0", "false", "False", "no")


try:
    import torch
    from torch.utils import cpp_extension
except Exception as e:  # no torch at build time: pure-Python install
    torch = None
    _record("cpu", f"not built: torch was not importable at build time ({type(e).__name__}: {e})")

if torch is not None:
    # -fno-math-errno: sqrt vectorizes (else it stays scalar, 2.4x slower); -fno-trapping-math: gcc
    # if-converts the uniform branches of the rules; -ffp-contract=off: no FMA contraction, so every
    # ISA variant (and the CUDA kernels, built with --fmad=false) gives the same bits.
    CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-Wno-unused-function"]
    CSRC = os.path.join("csrc")

    if _env_flag("MOMENTUM_FUSED_BUILD_CPU") is not False:
        ext_modules.append(cpp_extension.CppExtension(
            name="momentum_fused._C_cpu",
            sources=["csrc/cpu/cpu_ops.cpp", "csrc/cpu/cpu_python.cpp", "csrc/cpu/cpu_kernels.cpp", "csrc/cpu/cpu_kernels_baseline.cpp",
                     "csrc/cpu/cpu_kernels_avx2.cpp", "csrc/cpu/cpu_kernels_avx512.cpp"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        ))
    else:
        _record("cpu", "not built: MOMENTUM_FUSED_BUILD_CPU=0 at install time")

    force_cuda = _env_flag("MOMENTUM_FUSED_BUILD_CUDA")
    nvcc = shutil.which("nvcc")
    cuda_torch = torch.version.cuda is not None
    if force_cuda or (force_cuda is None and nvcc and cuda_torch):
        if not os.environ.get("CUDA_HOME") and nvcc:
            # the toolkit root is the folder above nvcc's bin/ (follow a symlinked nvcc first)
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        ext_modules.append(cpp_extension.CUDAExtension(
            name="momentum_fused._C_cuda",
            sources=["csrc/cuda/cuda_ops.cpp", "csrc/cuda/cuda_python.cpp", "csrc/cuda/fused_step.cu"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--fmad=false"]},
        ))
    else:
        why = ("MOMENTUM_FUSED_BUILD_CUDA=0" if force_cuda is False else
               "nvcc not found" if not nvcc else f"torch {torch.__version__} is not a CUDA build")
        _record("cuda", f"not built: {why} (set MOMENTUM_FUSED_BUILD_CUDA=1 to force)")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension whose failures are recorded instead of failing the install."""

        def build_extensions(self):
            self._failed = []
            # no debug info (python's default CFLAGS carry -g): halves the compile time
            for attr in ("compiler_so", "compiler_cxx", "compiler"):
                cmd = getattr(self.compiler, attr, None)
                if isinstance(cmd, list):
                    setattr(self.compiler, attr, [a for a in cmd if a != "-g"])
            try:
                super().build_extensions()
            except Exception as e:  # failed before/around the per-extension builds (e.g. ABI check)
                for ext in self.extensions:
                    if ext not in self._failed and not os.path.exists(self.get_ext_fullpath(ext.name)):
                        self._fail(ext, e)
            # drop failed extensions so that the install step does not look for their outputs
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext):
            short = ext.name.rsplit("_C_", 1)[-1]
            try:
                super().build_extension(ext)
            except Exception as e:
                self._fail(ext, e)
                return
            _record(short, None)

        def _fail(self, ext, e):
            self._failed.append(ext)
            short = ext.name.rsplit("_C_", 1)[-1]
            tail = "".join(traceback.format_exception_only(type(e), e)).strip()
            msg = (f"build of {ext.name} failed: {tail} (the compiler output is in the log of "
                   "`pip install -v -e . --no-build-isolation`)")
            _record(short, msg)
            sys.stderr.write(f"WARNING: momentum_fused: {msg}\n  (continuing with a pure-Python install)\n")

    cmdclass["build_ext"] = OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)

setup(
    name="momentum_fused",
    version="0.1.0",
    description="Fused multi-tensor momentum optimizers for PyTorch, with a float64 reference spec",
    packages=find_packages(include=["momentum_fused", "momentum_fused.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "dev": ["pytest", "hypothesis", "matplotlib"],
        # peer packages benchmarked side by side (bench/) and used as oracles (tests/test_peers.py)
        "bench-peers": ["lion-pytorch", "qhoptim", "schedulefree", "pytorch-optimizer"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
