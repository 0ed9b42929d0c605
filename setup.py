"""Installs momentum_fused. The compiled backends in csrc/ are optional:

- CPU extension ``momentum_fused._C_cpu`` (C++17, OpenMP, AVX-512 variant picked at run time): built
  whenever torch's C++ extension machinery and a C++ compiler are available. Its sources and flags are
  in momentum_fused/_cpu_build.py (read here and by the build at first import, momentum_fused/_jit.py).
  The wheel ships the sources (momentum_fused/_csrc/, see BuildPyWithSources), so an install built
  without torch in the build environment (``pip install .``: pip's build isolation) compiles the
  extension at first import instead (cached; needs ninja and a compiler then).
  MOMENTUM_FUSED_BUILD_CPU=0 skips both: the install stays pure Python.
- CUDA extension ``momentum_fused._C_cuda``: built only when nvcc is found AND torch is a CUDA build,
  or when forced with MOMENTUM_FUSED_BUILD_CUDA=1 (=0 never builds it).

A failed optional build never fails the install: the package stays pure Python, and the reason is
written to ``momentum_fused/_C_<name>.build-error.txt``, which the backend module reports through
``momentum_fused.backends.status()``. A successful build removes that file.
"""
import importlib.util
import os
import shutil
import sys
import traceback

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_DIR = os.path.join(HERE, "momentum_fused")

ext_modules = []
cmdclass = {}


def _load_build_config():
    """momentum_fused/_cpu_build.py, loaded by path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location("_momentum_fused_cpu_build", os.path.join(PKG_DIR, "_cpu_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU_BUILD = _load_build_config()


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
    """None (unset or empty), True (1/true/yes/on) or False (0/false/no/off), in any case, as momentum_fused/_jit.py
    reads its switches; any other value stops the build with a message (it meant "build" before 2026-12-06, so
    MOMENTUM_FUSED_BUILD_CPU=off built the extension)."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"momentum_fused setup.py: {name}={os.environ[name]!r} is neither on (1/true/yes/on) nor off "
                     "(0/false/no/off)")


BUILD_CPU = _env_flag("MOMENTUM_FUSED_BUILD_CPU") is not False
DISABLED_CPU = "not built: MOMENTUM_FUSED_BUILD_CPU=0 at install time"  # = momentum_fused._jit.DISABLED_AT_INSTALL
# A wheel or sdist carries its own markers (BuildPyWithSources); the source tree's marker is for builds that run
# from it (editable installs, build_ext --inplace). Written on a wheel build, it kept disabling the cpu backend of
# the checkout after a one-off `MOMENTUM_FUSED_BUILD_CPU=0 pip wheel .` (a review, 2026-12-06).
IN_TREE = not any(c in sys.argv[1:] for c in ("bdist_wheel", "sdist", "egg_info", "dist_info", "--name"))
if not BUILD_CPU and IN_TREE:
    _record("cpu", DISABLED_CPU)

try:
    import torch
    from torch.utils import cpp_extension
except Exception as e:  # no torch at build time (pip's build isolation): compiled at first import instead
    torch = None
    if BUILD_CPU and IN_TREE:
        _record("cpu", f"not built at install time: torch was not importable in the build environment "
                       f"({type(e).__name__}: {e}); it is compiled at first import (momentum_fused/_jit.py)")


class BuildPyWithSources(build_py):
    """build_py that ships the CPU sources (CPU_BUILD.cpu_files) in momentum_fused/_csrc/, for the build at
    first import; with MOMENTUM_FUSED_BUILD_CPU=0 it ships the marker _C_cpu.build-error.txt instead, so
    that such an install stays pure Python. Editable installs read csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        pkg = os.path.join(self.build_lib, "momentum_fused")
        target = os.path.join(pkg, "_csrc")
        marker = os.path.join(pkg, "_C_cpu.build-error.txt")
        for stale in (target, marker):  # left by an earlier build in the same build/ folder
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.remove(stale)
        if not BUILD_CPU:
            os.makedirs(pkg, exist_ok=True)
            with open(marker, "w") as fh:
                fh.write(DISABLED_CPU + "\n")
            return
        csrc = os.path.join(HERE, "csrc")
        if not os.path.isdir(csrc):  # (a source tree without csrc/: the install stays pure Python, and says why)
            os.makedirs(pkg, exist_ok=True)
            with open(marker, "w") as fh:
                fh.write(f"not built: the source tree {HERE} has no csrc/ folder\n")
            sys.stderr.write("WARNING: momentum_fused: no csrc/ folder: the CPU extension cannot be built\n")
            return
        for rel in CPU_BUILD.cpu_files(csrc):
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(os.path.join(csrc, rel), dest)


cmdclass["build_py"] = BuildPyWithSources

if torch is not None:
    if BUILD_CPU:  # the flags and their reasons: momentum_fused/_cpu_build.py
        ext_modules.append(cpp_extension.CppExtension(
            name="momentum_fused._C_cpu",
            sources=[f"csrc/{s}" for s in CPU_BUILD.CPU_SOURCES],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": list(CPU_BUILD.CPU_CXX_FLAGS)},
            extra_link_args=list(CPU_BUILD.CPU_LINK_FLAGS),
        ))

    force_cuda = _env_flag("MOMENTUM_FUSED_BUILD_CUDA")
    nvcc = shutil.which("nvcc")
    cuda_torch = torch.version.cuda is not None
    if force_cuda or (force_cuda is None and nvcc and cuda_torch):
        if not os.environ.get("CUDA_HOME") and nvcc:
            # the toolkit root is the folder above nvcc's bin/ (follow a symlinked nvcc first)
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        try:  # (torch raises here, while setup.py is read, when it finds no CUDA toolkit: forced without nvcc)
            ext_modules.append(cpp_extension.CUDAExtension(
                name="momentum_fused._C_cuda",
                sources=["csrc/cuda/cuda_ops.cpp", "csrc/cuda/cuda_python.cpp", "csrc/cuda/fused_step.cu"],
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--fmad=false"]},
                extra_link_args=[CPU_BUILD.LINK_HIDE_STATIC_LIBS],  # why: momentum_fused/_cpu_build.py
            ))
        except Exception as e:
            msg = f"not built: the CUDA extension could not be set up ({type(e).__name__}: {e})"
            _record("cuda", msg)
            sys.stderr.write(f"WARNING: momentum_fused: {msg}\n  (continuing without it)\n")
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
    # the Triton kernels keep their top-level folder in the repository but install under the package's namespace
    # (momentum_fused.triton_kernels): no top-level ``triton_kernels`` module (another PyPI package's name)
    packages=find_packages(include=["momentum_fused", "momentum_fused.*"]) + ["momentum_fused.triton_kernels"],
    package_dir={"momentum_fused.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    # ninja: the build at first import (momentum_fused/_jit.py) runs torch.utils.cpp_extension.load
    # torch: the oldest release the suite passed on (.ci/torch_matrix.sh, docs/ecosystem.md "Torch versions")
    install_requires=["torch>=2.10", "ninja"],
    extras_require={
        "dev": ["pytest", "hypothesis", "matplotlib"],
        # peer packages benchmarked side by side (bench/) and used as oracles (tests/test_peers.py)
        "bench-peers": ["lion-pytorch", "qhoptim", "schedulefree", "pytorch-optimizer"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
