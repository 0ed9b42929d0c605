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


def _phase_lists():
    """The presets (``[name]="phase ..."`` in the PRESET table) and the default list (``${@:-...}``)."""
    text = " ".join(_logical_lines())
    presets = dict(re.findall(r'\[(\w+)\]="([^"]*)"', text))
    default = re.search(r'"\$\{@:-([^}]*)\}"', text)
    return presets, default.group(1) if default else ""


def test_every_preset_phase_is_defined():
    text = _text()
    defined = set(re.findall(r"^phase_([a-z0-9_]+)\(\)", text, re.M))
    presets, default = _phase_lists()
    assert {"open", "issue16", "issue17", "issue20"} <= set(presets) and default, (presets, default)
    for names in [*presets.values(), default]:
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



def _stubs(tmp_path, fail="", sleep=""):
    """A fake toolchain: `python` (prints "1 passed"; exits 3 when its arguments contain $fail, sleeps 60 s on
    $sleep), `nvcc` (writes an executable that prints a JSON run), `nvidia-smi`."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f"""#!/bin/bash
case "$*" in *{fail or '@@'}*) echo "1 failed"; exit 3;; *{sleep or '@@'}*) sleep 60;; esac
cat > /dev/null 2>&1 < /dev/null; echo "1 passed"; exit 0
""")
    (bin_ / "nvcc").write_text("""#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = -o ] && { printf '#!/bin/bash\\necho {}\\n' > "$2"; chmod +x "$2"; }; shift; done
echo "release 13.0"
""")
    (bin_ / "nvidia-smi").write_text("#!/bin/bash\necho 'NVIDIA H200'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python"),
            "OUT": str(tmp_path / "out"), "DEADLINE_S": "120"}, work


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_a_stubbed_run_reports_failures_in_its_exit_status_and_summary(tmp_path):
    """A review (2026-12-06) found the script exiting non-zero with nothing failed (a grep's status), nvcc failures
    reported as built, and a preset usable only alone. With a fake toolchain: presets expand anywhere in the list,
    a failed phase is named in the summary and the exit status, a clean run exits 0."""
    env, work = _stubs(tmp_path, fail="muon_ns_shapes")
    r = subprocess.run(["bash", SCRIPT, "env", "issue16", "kernels-int8"], capture_output=True, text=True, env=env,
                       cwd=work, timeout=300)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert r.returncode == 1, (r.returncode, summary)
    assert "== muon-ns" in summary and "== kernels-int8" in summary and summary.count("== env") == 1
    assert re.search(r"FAILED \(rc != 0\): .*muon-ns-\S+:3", summary), summary
    assert "step_timing-i8-1: nvcc rc" not in summary and (tmp_path / "out" / "results.tgz").exists()
    env, work2 = _stubs(tmp_path / "b")
    r = subprocess.run(["bash", SCRIPT, "env", "test-cuda"], capture_output=True, text=True, env=env, cwd=work2,
                       timeout=300)
    assert r.returncode == 0 and "every phase that ran returned 0" in (tmp_path / "b" / "out" / "summary.txt").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_a_run_killed_by_sigkill_leaves_its_summary_and_logs(tmp_path):
    """Everything was written to a temporary folder and copied by the exit trap, which a SIGKILL (the device tool's
    limit) never runs: nothing came back. The summary is now written in $OUT as the run goes, the logs archived
    after every phase."""
    import signal
    import time
    env, work = _stubs(tmp_path, sleep="bench_muon")
    proc = subprocess.Popen(["bash", SCRIPT, "env", "test-cuda", "muon"], env=env, cwd=work, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = tmp_path / "out" / "summary.txt"
    try:
        for _ in range(300):
            if summary.exists() and "muon-test" in summary.read_text():
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = summary.read_text()
    assert "== env" in text and "test-cuda: rc=0" in text and "muon-test: rc=0" in text, text
    assert (tmp_path / "out" / "results.tgz").exists()
