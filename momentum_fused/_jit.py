"""Build the CPU extension ``momentum_fused._C_cpu`` at first import when the install has none.

``pip install .`` (pip's default build isolation) builds in an environment without torch, so setup.py
cannot compile the extension there and the wheel is pure Python. Such a wheel ships the C++ sources in
``momentum_fused/_csrc/`` (setup.py's build_py), and :func:`load_cpu_extension` (called by
``momentum_fused/__init__.py`` before anything imports ``_C_cpu``) compiles them once with
``torch.utils.cpp_extension.load`` (ninja), with the sources and flags of the install-time build
(momentum_fused/_cpu_build.py, read by both), into a cache folder keyed by the torch version, the Python
version, the machine and a hash of the sources and flags:

    $MOMENTUM_FUSED_CACHE_DIR, else $XDG_CACHE_HOME/momentum_fused, else ~/.cache/momentum_fused

It prints one line to stderr while it compiles (about 1-4 minutes, once); later imports load the cached
library directly. The module is registered as ``momentum_fused._C_cpu`` in ``sys.modules`` (and as the
package attribute), so the rest of the package finds it as if it had been installed.

Nothing is compiled when the extension is importable already (an install that compiled it), when
``MOMENTUM_FUSED_JIT=0``, or when the install was made with ``MOMENTUM_FUSED_BUILD_CPU=0`` (setup.py
then ships a ``_C_cpu.build-error.txt`` saying so instead of the sources). When there is no C++
compiler, no ninja, or the build fails, the package stays pure Python (the reference backend) and ONE
warning says why and how to fix it; a failed build is remembered in the cache folder (``FAILED.txt``,
with the compiler output), so later imports warn without compiling again until that folder is removed.
The reason is also what ``import momentum_fused._C_cpu`` raises (a meta-path finder answering only for
that name), which is how ``momentum_fused.backends.status()["cpu"]`` reports it. ``STATUS`` holds this
process's outcome.
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import os
import platform
import re
import shutil
import sys
import warnings

from . import _cpu_build

MODULE = "momentum_fused._C_cpu"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DISABLED_AT_INSTALL = "not built: MOMENTUM_FUSED_BUILD_CPU=0 at install time"
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")

# this process's outcome: "installed" (nothing to do), "cached", "built", "disabled", "unavailable"
STATUS: dict = {"outcome": None, "reason": None, "build_dir": None}


def _flag_off(env, name) -> bool:
    v = env.get(name)
    return v is not None and v.strip().lower() in _FALSE


def csrc_root(package_dir: str = PACKAGE_DIR) -> str | None:
    """Where the C++ sources are: ``<package>/_csrc`` (an installed wheel) or ``<package>/../csrc`` (the
    repository); None when neither has every CPU source."""
    for root in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if all(os.path.isfile(os.path.join(root, s)) for s in _cpu_build.CPU_SOURCES):
            return root
    return None


def cpu_sources(root: str) -> list[str]:
    """The translation units the build at first import compiles (absolute paths under ``root``)."""
    return [os.path.join(root, s) for s in _cpu_build.CPU_SOURCES]


def cache_root(env=os.environ) -> str:
    d = env.get("MOMENTUM_FUSED_CACHE_DIR")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "momentum_fused")


def source_hash(root: str) -> str:
    """sha256 (16 hex digits) of every file a CPU build reads (names and bytes) and the flags."""
    h = hashlib.sha256(repr((_cpu_build.CPU_CXX_FLAGS, _cpu_build.CPU_LINK_FLAGS)).encode())
    for rel in _cpu_build.cpu_files(root):
        h.update(b"\0" + rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def build_dir(root: str, env=os.environ) -> str:
    import torch

    tag = (f"cpu-torch{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}-"
           f"{source_hash(root)}")
    return os.path.join(cache_root(env), tag)


def _find_ninja(env) -> str | None:
    """The folder holding a ``ninja`` executable: on PATH, or the ``ninja`` pip package's (whose bin folder
    is on PATH only in an activated virtualenv)."""
    exe = shutil.which("ninja", path=env.get("PATH"))
    if exe:
        return os.path.dirname(exe)
    try:
        import ninja  # the pip package (install_requires)
    except Exception:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    return bin_dir if bin_dir and shutil.which("ninja", path=bin_dir) else None


def _import_library(path: str):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(why: str) -> None:
    warnings.warn(f"momentum_fused: the compiled CPU backend is unavailable, using the pure-Python reference "
                  f"backend (slower). {why}", RuntimeWarning, stacklevel=4)


def jit_build(package_dir: str = PACKAGE_DIR, env=os.environ, *, stream=None):
    """Compile (or load from the cache) the CPU extension from the sources next to ``package_dir``.
    Returns ``(module, None)`` or ``(None, reason)``; warns (once) when it cannot build for a reason the
    user can fix. Does not touch ``sys.modules``."""
    STATUS.update(outcome="unavailable", reason=None, build_dir=None)
    raw = env.get("MOMENTUM_FUSED_JIT")
    if raw is not None and raw.strip().lower() not in (*_FALSE, *_TRUE, ""):
        STATUS.update(outcome="disabled")
        return None, (f"MOMENTUM_FUSED_JIT={raw!r} is neither on ({'/'.join(_TRUE)}) nor off ({'/'.join(_FALSE)}): "
                      "no build at first import")
    if _flag_off(env, "MOMENTUM_FUSED_JIT"):
        STATUS.update(outcome="disabled")
        return None, ("the extension was not compiled at install time and the build at first import is "
                      "disabled (MOMENTUM_FUSED_JIT=0)")
    marker = os.path.join(package_dir, "_C_cpu.build-error.txt")
    if os.path.isfile(marker):
        with open(marker) as fh:
            stored = fh.read().strip()
        if stored.startswith(DISABLED_AT_INSTALL):
            STATUS.update(outcome="disabled")
            return None, stored
    fix = ("reinstall with `pip install --no-build-isolation .` in an environment with torch, ninja and a C++ "
           "compiler; or set MOMENTUM_FUSED_JIT=0 to skip this build at import (each optimizer then still warns once "
           "that it runs on the reference backend; MOMENTUM_FUSED_BACKEND=reference picks it without a warning)")
    root = csrc_root(package_dir)
    if root is None:
        why = f"the C++ sources are not in this install ({os.path.join(package_dir, '_csrc')}); {fix}"
        _warn(why)
        return None, why
    if os.name == "nt":
        why = f"the build at first import supports Linux and macOS only; {fix}"
        _warn(why)
        return None, why
    bdir = build_dir(root, env)
    STATUS["build_dir"] = bdir
    lib = os.path.join(bdir, "_C_cpu.so")
    ready = os.path.join(bdir, "READY")
    failed = os.path.join(bdir, "FAILED.txt")
    if os.path.isfile(ready) and os.path.isfile(lib):  # built before: load it, no toolchain needed
        try:
            module = _import_library(lib)
        except Exception as e:
            why = (f"loading the cached build {lib} failed ({type(e).__name__}: {e}); remove {bdir} to rebuild")
            _warn(why)
            return None, why
        STATUS.update(outcome="cached")
        return module, None
    if os.path.isfile(failed):
        why = (f"its build at first import failed before (compiler output: {failed}); fix the cause, then "
               f"remove {bdir} to try again, or {fix}")
        _warn(why)
        return None, why
    cxx = env.get("CXX") or "c++"
    if shutil.which(cxx, path=env.get("PATH")) is None:
        why = (f"no C++ compiler was found to build it at first import ({cxx!r} is not on PATH): install one "
               f"(e.g. `apt install g++`) or point CXX at it, then import again; or {fix}")
        _warn(why)
        return None, why
    ninja_dir = _find_ninja(env)
    if ninja_dir is None:
        why = f"ninja was not found to build it at first import: `pip install ninja`, then import again; or {fix}"
        _warn(why)
        return None, why

    import torch
    from torch.utils import cpp_extension

    os.makedirs(bdir, exist_ok=True)
    stream = sys.stderr if stream is None else stream
    stream.write(f"momentum_fused: compiling the C++ CPU extension for torch {torch.__version__}, Python "
                 f"{sys.version_info[0]}.{sys.version_info[1]} (once, about 1-4 minutes; cached in {bdir}; "
                 f"MOMENTUM_FUSED_JIT=0 skips this) ...\n")
    stream.flush()
    old_path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=old_path) is None:
        os.environ["PATH"] = ninja_dir + os.pathsep + old_path
    take_stale_lock(bdir, stream)
    try:
        cpp_extension.load(name="_C_cpu", sources=cpu_sources(root),
                           extra_cflags=list(_cpu_build.CPU_CXX_FLAGS),
                           extra_ldflags=list(_cpu_build.CPU_LINK_FLAGS), extra_include_paths=[root],
                           build_directory=bdir, is_python_module=False, verbose=False)
        module = _import_library(lib)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        try:
            with open(failed, "w") as fh:
                fh.write(text + "\n")
        except OSError:
            pass
        lines = text.strip().splitlines()
        diags = [ln.strip() for ln in lines if re.search(r": (fatal )?error: ", ln)]  # gcc/clang diagnostics
        first = (diags or lines or ["(no output)"])[0 if diags else -1]
        why = (f"its build at first import failed ({first} ...; full output: {failed}); fix the cause and "
               f"remove {bdir} to try again, or {fix}")
        _warn(why)
        return None, why
    finally:
        os.environ["PATH"] = old_path
    tmp = ready + f".{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(lib + "\n")
    os.replace(tmp, ready)  # atomic: a concurrent import sees READY only once the library is complete
    STATUS.update(outcome="built")
    return module, None


def take_stale_lock(bdir: str, stream) -> None:
    """Before compiling into ``bdir``: torch's ``cpp_extension.load`` holds a ``lock`` file there while it builds and
    waits, forever, while another process holds it. A process killed while compiling (SIGTERM, SIGKILL: a timeout,
    a stopped container, a killed notebook kernel) leaves its lock behind, and every later import hung without a
    word (a review, 2026-12-06). So the builder writes ``OWNER`` (its pid and host) first; a lock whose owner ran on
    this host and is gone is removed, saying so; a live owner (or one on another host, or no OWNER file) is waited
    for, saying which file to delete if nothing is compiling. Otherwise this process writes itself as the owner."""
    lock, owner = os.path.join(bdir, "lock"), os.path.join(bdir, "OWNER")
    host = platform.node()
    if os.path.exists(lock):
        pid, their_host = None, None
        try:
            with open(owner) as fh:
                p, their_host = fh.read().split()[:2]
            pid = int(p)
        except (OSError, ValueError):
            pass
        alive = True
        if pid is not None and their_host == host and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:  # (another user's live process)
                pass
        if not alive:
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            stream.write(f"momentum_fused: removed the compile lock {lock} of process {pid}, which is gone (killed "
                         "while compiling); compiling again\n")
        else:
            who = f"process {pid} on {their_host}" if pid is not None else "another process"
            stream.write(f"momentum_fused: waiting for {who}, which holds the compile lock {lock}; if nothing is "
                         "compiling momentum_fused, delete that file\n")
        stream.flush()
        if alive:  # (the owner's record stays: if it is killed, the next import finds its lock stale)
            return
    try:
        with open(owner, "w") as fh:
            fh.write(f"{os.getpid()} {host}\n")
    except OSError:
        pass


class _Unavailable(importlib.abc.MetaPathFinder):
    """Answers ``import momentum_fused._C_cpu`` with an ImportError carrying the reason (backends.status())."""

    def __init__(self, reason: str):
        self.reason = reason

    def find_spec(self, fullname, path=None, target=None):
        if fullname == MODULE:
            raise ImportError(self.reason, name=MODULE)
        return None


def load_cpu_extension() -> None:
    """Make ``momentum_fused._C_cpu`` importable when the install did not compile it (see the module doc)."""
    if MODULE in sys.modules or importlib.util.find_spec(MODULE) is not None:
        STATUS.update(outcome="installed")
        return
    try:
        module, why = jit_build()
    except Exception as e:  # never let the optional build break `import momentum_fused`
        module, why = None, f"the build at first import raised {type(e).__name__}: {e}"
        _warn(why)
    if module is None:
        STATUS["reason"] = why
        sys.meta_path.insert(0, _Unavailable(why))
        return
    sys.modules[MODULE] = module
    setattr(sys.modules[__package__], "_C_cpu", module)
