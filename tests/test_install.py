"""Installing as a user does: ``pip install .`` (pip's build isolation: no torch in the build environment).

Such a build cannot compile the CPU extension, so the wheel ships the C++ sources
(momentum_fused/_csrc/) and momentum_fused/_jit.py compiles them at first import (cached). Pinned here:
- the loader compiles exactly the sources and flags setup.py compiles (both read momentum_fused/_cpu_build.py),
  and the files it ships/hashes are every file those sources include;
- a wheel built with build isolation is pure Python, ships the sources, _jit.py and no build marker;
  one built with MOMENTUM_FUSED_BUILD_CPU=0 ships the marker instead and stays pure Python at import;
- without a compiler, without ninja, with a failing build or with MOMENTUM_FUSED_JIT=0 the package imports,
  falls back to the reference backend and says why (one warning; backends.status());
- end to end: the wheel, imported in a clean interpreter with an empty cache, compiles the extension once
  (one stderr line), its step equals the float64 reference, and the next import loads it from the cache.

The installed package is tried in a separate interpreter started with ``-S`` and PYTHONPATH = the unpacked
wheel + this environment's site-packages: -S keeps out the editable install of the repository (its
finder would otherwise serve ``momentum_fused._C_cpu`` from the working tree). The end-to-end compile
takes ~2 CPU-minutes (~70 s on 2 idle cores): the one slow test of this file.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile

import pytest

import momentum_fused
from momentum_fused import _cpu_build, _jit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ("MOMENTUM_FUSED_JIT", "MOMENTUM_FUSED_CACHE_DIR", "MOMENTUM_FUSED_BUILD_CPU", "MOMENTUM_FUSED_BACKEND",
            "CXX", "PYTHONPATH")


def _copy_source(dest):
    """The files a build reads (setup.py, the packages, csrc/), without build outputs."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.build-error.txt", "_csrc")
    os.makedirs(dest)
    shutil.copy2(os.path.join(REPO, "setup.py"), dest)
    for d in ("momentum_fused", "triton_kernels", "csrc"):
        shutil.copytree(os.path.join(REPO, d), os.path.join(dest, d), ignore=ignore)
    return dest


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(extra)
    return env


def _pip_wheel(src, out, env):
    """``pip wheel . --no-deps`` as a user runs it (build isolation). Where the isolated build environment
    cannot be set up (no index for setuptools), the same build without isolation, torch made unimportable
    for it: the situation isolation creates."""
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", out, "-q"]
    r = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and re.search(r"(?i)no matching distribution|could not find a version", r.stdout + r.stderr):
        warnings.warn("pip could not set up an isolated build environment (no package index); building without "
                      "isolation and with torch hidden instead")
        blocker = os.path.join(os.path.dirname(out), "torch-blocker")
        os.makedirs(os.path.join(blocker, "torch"), exist_ok=True)
        with open(os.path.join(blocker, "torch", "__init__.py"), "w") as fh:
            fh.write("raise ImportError('torch is hidden from this build (tests/test_install.py)')\n")
        env = dict(env, PYTHONPATH=blocker)
        r = subprocess.run(cmd + ["--no-build-isolation"], cwd=src, env=env, capture_output=True, text=True,
                           timeout=600)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout}\n{r.stderr}"
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    return os.path.join(out, wheels[0])


def _unpack(wheel, dest):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    return dest


def _site_dirs():
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"]] + [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _run_installed(site, code, cwd, **env):
    """Run ``code`` in a fresh interpreter that sees the unpacked wheel ``site`` as its momentum_fused."""
    e = _clean_env(PYTHONPATH=os.pathsep.join([site] + _site_dirs()), **env)
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, the wheel of a default `pip wheel .`, its unpacked folder)."""
    root = tmp_path_factory.mktemp("install")
    src = _copy_source(str(root / "src"))
    wheel = _pip_wheel(src, str(root / "dist"), _clean_env())
    return src, wheel, _unpack(wheel, str(root / "site"))


# ------------------------------------------------------------------ one list of sources and flags
def test_jit_compiles_the_sources_and_flags_setup_py_compiles(tmp_path, monkeypatch):
    src = _copy_source(str(tmp_path / "src"))
    captured = {}
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(src)
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    import runpy

    runpy.run_path(os.path.join(src, "setup.py"), run_name="__main__")
    exts = {e.name: e for e in captured["ext_modules"]}
    ext = exts["momentum_fused._C_cpu"]
    root = _jit.csrc_root(os.path.join(src, "momentum_fused"))
    assert root == os.path.join(src, "csrc")
    jit = [os.path.relpath(s, root) for s in _jit.cpu_sources(root)]
    assert [os.path.relpath(os.path.join(src, s), os.path.join(src, "csrc")) for s in ext.sources] == jit
    assert ext.extra_compile_args["cxx"] == list(_cpu_build.CPU_CXX_FLAGS)
    assert ext.extra_link_args == list(_cpu_build.CPU_LINK_FLAGS)
    assert os.path.normpath(ext.include_dirs[0]) == root  # then torch's include folders
    # every file the sources include (transitively, within csrc/) is shipped and hashed
    files = set(_cpu_build.cpu_files(root))
    todo, seen = list(_cpu_build.CPU_SOURCES), set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        with open(os.path.join(root, rel)) as fh:
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', fh.read(), re.M):
                todo.append(os.path.normpath(os.path.join(os.path.dirname(rel), inc)))
    assert seen <= files, sorted(seen - files)
    assert not any(f.startswith("cuda/") for f in files)


def test_cache_key_tracks_sources_flags_and_env(tmp_path, monkeypatch):
    root = str(tmp_path / "csrc")
    shutil.copytree(os.path.join(REPO, "csrc"), root)
    h0 = _jit.source_hash(root)
    assert _jit.source_hash(root) == h0
    with open(os.path.join(root, "update_rules.h"), "a") as fh:
        fh.write("\n// changed\n")
    assert _jit.source_hash(root) != h0
    h1 = _jit.source_hash(root)
    monkeypatch.setattr(_cpu_build, "CPU_CXX_FLAGS", _cpu_build.CPU_CXX_FLAGS + ("-O2",))
    assert _jit.source_hash(root) != h1
    import torch

    env = {"MOMENTUM_FUSED_CACHE_DIR": str(tmp_path / "c")}
    d = _jit.build_dir(root, env)
    assert os.path.dirname(d) == str(tmp_path / "c")
    assert torch.__version__ in d and f"py{sys.version_info[0]}.{sys.version_info[1]}" in d
    assert _jit.cache_root({}) == os.path.join(os.path.expanduser("~"), ".cache", "momentum_fused")
    assert _jit.cache_root({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "momentum_fused")


def test_this_install_does_not_jit():
    """The development install compiled the extension: the loader had nothing to do."""
    if momentum_fused.backends.status().get("cpu") != "available":
        pytest.skip("this environment has no compiled CPU extension (installed without a compiler?)")
    assert _jit.STATUS["outcome"] == "installed"


# ------------------------------------------------------------------ the wheel
def test_default_wheel_is_pure_python_and_ships_sources(built):
    src, wheel, _ = built
    assert wheel.endswith("-py3-none-any.whl"), wheel  # built without torch: no compiled extension
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"momentum_fused/_jit.py", "momentum_fused/_cpu_build.py", "momentum_fused/__init__.py"} <= names
    assert not any(n.endswith((".so", ".pyd")) or "build-error" in n for n in names), sorted(names)
    csrc = os.path.join(REPO, "csrc")
    want = {f"momentum_fused/_csrc/{f}" for f in _cpu_build.cpu_files(csrc)}
    assert {n for n in names if n.startswith("momentum_fused/_csrc/")} == want
    with zipfile.ZipFile(wheel) as z:
        for f in _cpu_build.cpu_files(csrc):
            with open(os.path.join(csrc, f), "rb") as fh:
                assert z.read(f"momentum_fused/_csrc/{f}") == fh.read(), f


def test_the_sdist_carries_the_sources_and_a_wheel_builds_from_it(tmp_path):
    """``python -m build`` (sdist, then the wheel from it) and ``pip install <sdist>`` failed: without MANIFEST.in the
    sdist had no csrc/, and the wheel build crashed copying csrc/cpu/cpu_kernels.cpp (a review, 2026-12-06)."""
    import tarfile
    src = _copy_source(str(tmp_path / "src"))
    shutil.copy2(os.path.join(REPO, "MANIFEST.in"), src)
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=src,
                       env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (tarball,) = list((tmp_path / "sdist").glob("*.tar.gz"))
    with tarfile.open(tarball) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        t.extractall(tmp_path / "x", filter="data")
    csrc = os.path.join(REPO, "csrc")
    assert {f"csrc/{f}" for f in _cpu_build.cpu_files(csrc)} <= names
    assert {"csrc/cuda/fused_step.cu", "csrc/cuda/cuda_ops.cpp", "csrc/cuda/cuda_python.cpp"} <= names
    assert not any(n.endswith((".so", ".o")) or "build-error" in n for n in names)
    (root,) = list((tmp_path / "x").iterdir())
    wheel = _pip_wheel(str(root), str(tmp_path / "dist"), _clean_env())
    got = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("momentum_fused/_csrc/")}
    assert got == {f"momentum_fused/_csrc/{f}" for f in _cpu_build.cpu_files(csrc)}


def test_setup_flags_take_the_values_the_runtime_takes(tmp_path):
    """MOMENTUM_FUSED_BUILD_CPU=off meant "build" at install time (only 0/false/False/no were off) while the runtime
    switches took off/OFF: the same words now, in any case, and any other value stops the build with a message."""
    src = _copy_source(str(tmp_path / "src"))
    for value, want in (("OFF", "False"), ("On", "True"), ("", "None"), ("maybe", "neither on")):
        code = ("import runpy, sys; sys.argv = ['setup.py', '--name']\n"
                "import setuptools; setuptools.setup = lambda **kw: None\n"
                "g = runpy.run_path('setup.py'); print(g['_env_flag']('MOMENTUM_FUSED_BUILD_CUDA'))")
        r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300,
                           env=_clean_env(MOMENTUM_FUSED_BUILD_CUDA=value, MOMENTUM_FUSED_BUILD_CPU="0"))
        assert want in (r.stdout + r.stderr), (value, r.stdout, r.stderr)


def test_wheel_with_build_cpu_0_stays_pure_python(built, tmp_path):
    src, _, _ = built  # same source copy and build/ folder: the earlier build's _csrc must not leak in
    wheel = _pip_wheel(src, str(tmp_path / "dist"), _clean_env(MOMENTUM_FUSED_BUILD_CPU="0"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "momentum_fused/_C_cpu.build-error.txt" in names
    # (not in the source tree: it disabled the cpu backend of later runs from the checkout)
    assert not os.path.exists(os.path.join(src, "momentum_fused", "_C_cpu.build-error.txt"))
    assert not any(n.startswith("momentum_fused/_csrc/") for n in names)
    site = _unpack(wheel, str(tmp_path / "site"))
    r = _run_installed(site, "import momentum_fused as mf; print(mf._jit.STATUS['outcome']); "
                             "print(mf.backends.status()['cpu'])", str(tmp_path),
                       MOMENTUM_FUSED_CACHE_DIR=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "disabled"
    assert "MOMENTUM_FUSED_BUILD_CPU=0" in r.stdout and "unavailable" in r.stdout
    assert "Warning" not in r.stderr and "compiling" not in r.stderr
    assert not os.path.exists(tmp_path / "cache")


# ------------------------------------------------------------------ fallbacks (nothing compiled)
FALLBACK = """
import sys
if {block_ninja}:
    sys.modules['ninja'] = None  # the pip package, if installed, must not be found either
import momentum_fused as mf, torch
print(mf._jit.STATUS['outcome'])
print(mf.backends.status()['cpu'])
p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)
mf.SGD([p], lr=0.5).step()  # the reference backend still trains
assert p.tolist() == [0.5, 0.5, 0.5]
"""


@pytest.mark.parametrize("case", ["no_compiler", "no_ninja", "disabled"])
def test_jit_fallbacks_import_and_say_why(built, tmp_path, case):
    _, _, site = built
    env = dict(MOMENTUM_FUSED_CACHE_DIR=str(tmp_path / "cache"))
    if case == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-c++")
        expect = "no C++ compiler"
    elif case == "no_ninja":
        env["CXX"] = sys.executable  # exists; never run (the missing ninja is found first)
        env["PATH"] = str(tmp_path / "empty")
        expect = "ninja was not found"
    else:
        env["MOMENTUM_FUSED_JIT"] = "0"
        expect = "MOMENTUM_FUSED_JIT=0"
    r = _run_installed(site, FALLBACK.format(block_ninja=case == "no_ninja"), str(tmp_path), **env)
    assert r.returncode == 0, r.stderr
    outcome, status = r.stdout.splitlines()[:2]
    assert outcome == ("disabled" if case == "disabled" else "unavailable")
    assert status.startswith("unavailable") and expect in status, status
    assert "compiling" not in r.stderr
    n_warn = r.stderr.count("RuntimeWarning: momentum_fused: the compiled CPU backend is unavailable")
    assert n_warn == (0 if case == "disabled" else 1), r.stderr
    if case != "disabled":
        assert expect in r.stderr and "pip install --no-build-isolation" in r.stderr


def test_jit_failed_build_warns_once_and_is_not_retried(built, tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None or shutil.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja (the build must start, then fail)")
    _, wheel, _ = built
    site = _unpack(wheel, str(tmp_path / "site"))
    for f in _cpu_build.CPU_SOURCES:  # every translation unit fails at once: no real compile
        with open(os.path.join(site, "momentum_fused", "_csrc", f), "w") as fh:
            fh.write('#error "broken on purpose (tests/test_install.py)"\n')
    code = FALLBACK.format(block_ninja=False)
    cache = str(tmp_path / "cache")
    r1 = _run_installed(site, code, str(tmp_path), MOMENTUM_FUSED_CACHE_DIR=cache)
    assert r1.returncode == 0, r1.stderr
    assert r1.stderr.count("momentum_fused: compiling the C++ CPU extension") == 1
    assert "broken on purpose" in r1.stderr and "FAILED.txt" in r1.stderr
    assert r1.stdout.splitlines()[0] == "unavailable" and "build at first import failed" in r1.stdout
    (failed,) = [os.path.join(cache, d, "FAILED.txt") for d in os.listdir(cache)]
    assert "broken on purpose" in open(failed).read()
    r2 = _run_installed(site, code, str(tmp_path), MOMENTUM_FUSED_CACHE_DIR=cache)
    assert r2.returncode == 0, r2.stderr
    assert "compiling" not in r2.stderr and "failed before" in r2.stderr
    assert r2.stderr.count("RuntimeWarning") == 1


# ------------------------------------------------------------------ end to end: compile, run, cache
E2E = """
import sys, torch
import momentum_fused as mf
print(mf._jit.STATUS['outcome'])
print(mf.backends.status()['cpu'])
print(mf._C_cpu.__file__)
from momentum_fused import _C_cpu  # what _backend_cpu and optim/base.py do
assert _C_cpu is sys.modules['momentum_fused._C_cpu']
g = torch.Generator().manual_seed(0)
for dtype, opt, kw in ((torch.float64, mf.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
                       (torch.float32, mf.AdamW, dict(lr=1e-2, weight_decay=0.1))):
    p0 = torch.randn(1000, generator=g, dtype=dtype)
    grads = [torch.randn(1000, generator=g, dtype=dtype) for _ in range(3)]
    out = {}
    for backend in ('cpu', 'reference'):
        p = p0.clone().requires_grad_(True)
        o = opt([p], backend=backend, **kw)
        for gr in grads:
            p.grad = gr.clone()
            o.step()
        out[backend] = p.detach()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out['cpu'], out['reference'], **tol)
    assert not torch.equal(out['cpu'], p0)
print('steps equal the reference')
"""


def test_jit_compiles_at_first_import_and_loads_from_the_cache(built, tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None or shutil.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja to compile the extension")
    _, _, site = built
    cache = str(tmp_path / "cache")
    r1 = _run_installed(site, E2E, str(tmp_path), MOMENTUM_FUSED_CACHE_DIR=cache)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    outcome, status, path = r1.stdout.splitlines()[:3]
    assert (outcome, status) == ("built", "available"), r1.stdout + r1.stderr
    assert path.startswith(cache + os.sep) and os.path.basename(os.path.dirname(path)).startswith("cpu-torch")
    assert r1.stdout.splitlines()[-1] == "steps equal the reference"
    assert r1.stderr.count("momentum_fused: compiling the C++ CPU extension") == 1
    assert "Warning" not in r1.stderr, r1.stderr
    r2 = _run_installed(site, E2E, str(tmp_path), MOMENTUM_FUSED_CACHE_DIR=cache)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert r2.stdout.splitlines()[:3] == ["cached", "available", path]
    assert "compiling" not in r2.stderr and "Warning" not in r2.stderr, r2.stderr


def test_a_checkout_on_pythonpath_finds_its_triton_kernels_without_an_install():
    """A checkout used as ``PYTHONPATH=<checkout>`` with nothing installed (the GPU machine's runs): the Triton
    backend's package ``momentum_fused.triton_kernels`` is the checkout's triton_kernels/ (momentum_fused/_checkout.py).
    ``python -S`` runs without site, so no editable-install finder: site-packages and the checkout go on sys.path
    by hand."""
    import site
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path[:0] = {[root] + site.getsitepackages()!r}\n"
            "import importlib.util, momentum_fused\n"
            "assert not any('editable' in type(f).__module__ for f in sys.meta_path)\n"
            "print(importlib.util.find_spec('momentum_fused.triton_kernels.launcher').origin)\n"
            "print(momentum_fused.backends.status()['triton'])")
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-3000:]
    origin, status = res.stdout.strip().splitlines()[-2:]
    assert origin == os.path.join(root, "triton_kernels", "launcher.py")
    assert "momentum_fused.triton_kernels" not in status, status  # not "import of ... failed"


def test_a_second_checkout_run_with_this_venv_loads_its_own_triton_kernels(tmp_path):
    """Another checkout (here: its package a link to this one's, its own copy of triton_kernels/) imported with
    this environment, whose editable install maps ``momentum_fused.triton_kernels`` to this checkout: the kernels
    must be the other checkout's, the same tree as its package (before 2026-12-06 the install's finder won, and a
    kernel edit in a second clone was silently never loaded)."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = tmp_path / "clone"
    other.mkdir()
    shutil.copy(os.path.join(root, "setup.py"), other / "setup.py")
    shutil.copytree(os.path.join(root, "triton_kernels"), other / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(os.path.join(root, "momentum_fused"), other / "momentum_fused")
    code = ("import importlib.util, momentum_fused\n"
            "print(importlib.util.find_spec('momentum_fused.triton_kernels.launcher').origin)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(other),
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(other / "triton_kernels" / "launcher.py")


def test_a_compile_lock_of_a_killed_process_is_removed_and_a_live_one_waited_for(tmp_path):
    """A first import killed while compiling left torch's lock file, and every later import waited on it forever,
    silently (a review, 2026-12-06)."""
    import io
    import platform
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text("")
    (tmp_path / "OWNER").write_text(f"{dead.pid} {platform.node()}\n")
    out = io.StringIO()
    _jit.take_stale_lock(str(tmp_path), out)
    assert not (tmp_path / "lock").exists() and "removed the compile lock" in out.getvalue()
    assert (tmp_path / "OWNER").read_text().split()[0] == str(os.getpid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "lock").write_text("")
        (tmp_path / "OWNER").write_text(f"{live.pid} {platform.node()}\n")
        out = io.StringIO()
        _jit.take_stale_lock(str(tmp_path), out)
        assert (tmp_path / "lock").exists() and f"waiting for process {live.pid}" in out.getvalue()
        assert (tmp_path / "OWNER").read_text().split()[0] == str(live.pid)  # (kept: the holder's record)
    finally:
        live.kill()
        live.wait()
