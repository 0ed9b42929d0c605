"""How the CPU extension ``momentum_fused._C_cpu`` is compiled: its sources and flags, in ONE place.

Read by setup.py (the build at install time, loaded by file path: this module imports nothing from the
package and no torch) and by momentum_fused/_jit.py (the build at first import, for installs made
without torch in the build environment, e.g. ``pip install .`` with pip's default build isolation).
Paths are relative to the csrc root: ``csrc/`` in the repository, ``momentum_fused/_csrc/`` in an
installed wheel (setup.py's build_py copies ``cpu_files()`` there).
"""
from __future__ import annotations

import os

# the translation units of _C_cpu (relative to the csrc root)
CPU_SOURCES = (
    "cpu/cpu_ops.cpp",
    "cpu/cpu_python.cpp",
    "cpu/cpu_kernels.cpp",
    "cpu/cpu_kernels_baseline.cpp",
    "cpu/cpu_kernels_avx2.cpp",
    "cpu/cpu_kernels_avx512.cpp",
    "cpu/cpu_kernels_avx512w.cpp",
    "cpu/cpu_symmm.cpp",
)

# -fno-math-errno: sqrt vectorizes (else it stays scalar, 2.4x slower); -fno-trapping-math: gcc
# if-converts the uniform branches of the rules; -ffp-contract=off: no FMA contraction, so every
# ISA variant (and the CUDA kernels, built with --fmad=false) gives the same bits. -DNDEBUG: the
# setup.py build gets it from Python's CFLAGS too; the JIT build has no such defaults.
CPU_CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-Wno-unused-function", "-DNDEBUG")
# -Wl,--exclude-libs,ALL: a toolchain that links libstdc++ statically (the H200 image's /opt/gcc does) would
# otherwise export that copy's symbols; with -Bsymbolic-functions (Python's LDFLAGS) the extension then ran its
# own copy's functions on the data of the process's shared libstdc++ (locale facet ids), and the first integer
# formatted into an error message crashed the process (segfault) or cut the message short. Hidden, the static
# copy is self-consistent. No effect where libstdc++ is linked as a shared library. Both extensions (setup.py).
LINK_HIDE_STATIC_LIBS = "-Wl,--exclude-libs,ALL"
CPU_LINK_FLAGS = ("-fopenmp", LINK_HIDE_STATIC_LIBS)

# the files a CPU build reads: the sources and every header outside csrc/cuda/ (csrc/*.h, csrc/cpu/*.h and
# *.inc, csrc/generated/*.h, ...); tests/test_install.py checks this covers the sources' #include closure
_FILE_SUFFIXES = (".h", ".hpp", ".inc")
_SKIP_DIRS = ("cuda",)  # top-level folders a CPU build never reads


def cpu_files(csrc_root: str) -> list[str]:
    """Every file of ``csrc_root`` a CPU build reads, relative ('/'-separated), sorted: CPU_SOURCES plus the
    headers outside csrc/cuda/ (what build_py ships in the wheel and what the JIT cache key hashes)."""
    out = set(CPU_SOURCES)
    for dirpath, dirnames, filenames in os.walk(csrc_root):
        rel_dir = os.path.relpath(dirpath, csrc_root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        dirnames.sort()
        for name in filenames:
            if name.endswith(_FILE_SUFFIXES):
                out.add(name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}")
    return sorted(out)
