"""bench/device_check.sh, the one script a lent GPU runs, checked here where mistakes cost nothing: a typo in a
preset, a renamed test file or a bench flag that no longer exists would otherwise burn minutes of a 15-minute lend
(2026-12-04: a test body that had gone missing, and a checkout without its Triton package, each cost a phase).

- the script parses (bash -n);
- every phase named by a preset (and the default list) has its ``phase_<name>`` function;
- every test file and tool it names exists, and every ``-k`` filter selects at least one test;
- every ``python -m bench...`` command's options are options of that module (its --help)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def _text():
    with open(SCRIPT) as fh:
        return fh.read()


def _logical_lines():
    """The script's lines with backslash continuations joined, comments dropped."""
    out, cur = [], ""
    for line in _text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_preset_phase_is_defined():
    text = _text()
    defined = set(re.findall(r"^phase_([a-z0-9_]+)\(\)", text, re.M))
    lists = [x for x in re.findall(r"phases=\(([^)]*)\)", " ".join(_logical_lines())) if "$" not in x]
    assert len(lists) >= 5, lists  # the presets and the default list
    for names in lists:
        for name in names.split():
            assert name.replace("-", "_") in defined, f"preset phase {name!r} has no phase_{name.replace('-', '_')}()"


def test_named_tests_and_tools_exist_and_filters_select_tests():
    lines = _logical_lines()
    paths = {p for line in lines for p in re.findall(r"\b((?:tests|bench)/[\w/.-]+\.(?:py|c|cu|sh))", line)}
    assert paths
    for p in sorted(paths):
        assert os.path.exists(os.path.join(ROOT, p)), f"device_check.sh names {p}, which does not exist"
    for line in lines:
        if "PYTEST[@]" not in line:
            continue
        files = [p for p in re.findall(r"\b(tests/[\w/.-]+)", line) if "$" not in p]
        m = re.search(r'-k "([^"$]+)"', line)
        if not m or not files:
            continue
        env = dict(os.environ)
        if any(f.startswith("tests/triton") for f in files):
            env["TRITON_INTERPRET"] = "1"
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *(["-m", "gpu"] if "-m gpu" in line else []), *files, "-k", m.group(1)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        # pytest -q's last line: "K/N tests collected (M deselected)", "N tests collected" or "no tests collected"
        got = re.search(r"^(\d+)(?:/\d+)? tests? collected", r.stdout, re.M)
        assert got and int(got.group(1)) > 0, f"-k {m.group(1)!r} on {files} selects nothing:\n{r.stdout[-1500:]}"


def test_bench_commands_use_options_their_modules_have():
    seen = {}
    for line in _logical_lines():
        for m in re.finditer(r'-m (bench(?:\.\w+)?)((?:\s+(?!run\b)[^;|&]*)?)', line):
            module, args = m.group(1), m.group(2)
            opts = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args))
            seen.setdefault(module, set()).update(opts)
    assert {"bench.kernel_report", "bench.bench_muon", "bench.muon_ns_shapes", "bench.bench_muon_fsdp"} <= set(seen)
    for module, opts in seen.items():
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{module} --help: {r.stderr[-1500:]}"
        for opt in sorted(opts):
            assert re.search(rf"(?<![\w-]){re.escape(opt)}\b", r.stdout), f"{module} has no option {opt}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_help_and_unknown_phases_spend_nothing(tmp_path):
    """--help printed 'phase___help: command not found' after the exit trap had written an archive into the repo;
    a misspelled phase failed only when the loop reached it, after the phases before it had spent device time.
    Both now exit before anything runs or is written."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    r = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and "Usage: bash bench/device_check.sh" in r.stdout and not out.exists()
    r = subprocess.run(["bash", SCRIPT, "env", "test-cudaa"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "no phase 'test-cudaa'" in r.stderr and not out.exists()
