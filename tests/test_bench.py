"""The benchmark runs end to end (tiny sizes) and counts bytes as docs/algorithms.md §9 does.
Timing values are never asserted."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.core import profile_shapes
from bench.rules import bytes_per_elem, providers, rules

ROOT = Path(__file__).resolve().parents[1]

# docs/algorithms.md §9, fp32 unless noted.
EXPECTED_FP32 = {"sgd": 12, "signsgd": 12, "sgd_momentum": 20, "nesterov": 20, "qhm": 20, "signum": 20, "lion": 20,
                 "fsgdm": 20, "rmsprop": 20, "sf_sgd": 20, "adam": 28, "adamw": 28, "adam_tied": 28, "nadam": 28,
                 "sf_adamw": 28, "amsgrad": 36}


def test_bytes_per_element_match_the_roofline_table():
    seen = set()
    for rule in rules():
        assert bytes_per_elem(rule.n_state) == EXPECTED_FP32[rule.name], rule.name
        # the optimizer's own spec agrees with the benchmark's count
        p = torch.zeros(3, requires_grad=True)
        opt = rule.ours([p], "reference")
        assert opt.spec.bytes_per_elem(opt.param_groups[0]) == EXPECTED_FP32[rule.name], rule.name
        seen.add(rule.name)
    assert {"sgd", "adam", "amsgrad", "lion", "fsgdm", "nadam", "rmsprop"} <= seen
    # bf16 p, g, m, v (Adam): 14 B/elem; bf16 params with fp32 state would be 2*2 + 2 + 2*4*2 = 22
    assert bytes_per_elem(2, torch.bfloat16) == 14
    assert bytes_per_elem(2, torch.bfloat16, state_dtype=torch.float32) == 22


@pytest.mark.parametrize("profile", ["few-large", "llm", "tiny"])
def test_profiles_fit_the_budget(profile):
    total = 3_000_000
    shapes = profile_shapes(profile, total)
    numel = sum(math.prod(s) for s in shapes)
    assert 0.5 * total <= numel <= 1.01 * total + 4096
    if profile == "llm":
        assert 250 <= len(shapes) <= 350
    if profile == "tiny":
        assert max(math.prod(s) for s in shapes) <= 4096


def test_quick_bench_smoke(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "bench", "--quick", "--params", "3000", "--rules", "adamw,lion,sgd_momentum,muon",
           "--profiles", "tiny", "--iters", "2", "--no-plots", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "MOMENTUM_FUSED_BACKEND"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rule | layout | profile |" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == 1
    for key in ("cpu", "torch", "date", "git_commit", "backends", "bandwidth"):
        assert key in res["meta"]
    assert res["meta"]["bandwidth"]["rmw_GBps"] > 0
    runs = res["runs"]
    for r in runs:
        for key in ("rule", "layout", "profile", "provider", "numel", "n_tensors", "bytes_per_elem", "median_ms",
                    "min_ms", "max_ms", "GBps", "pct_rmw", "pct_copy", "speedup_vs_best_torch"):
            assert key in r, key
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    # every provider that can run a rule here produced a number
    for rule in rules():
        if rule.name not in ("adamw", "lion", "sgd_momentum"):
            continue
        provs, _ = providers(rule, torch.device("cpu"), torch.float32)
        got = {r["provider"] for r in runs if r["rule"] == rule.name}
        assert {p.name for p in provs} <= got, (rule.name, {p.name for p in provs} - got)
    assert {r["provider"] for r in runs if r["rule"] == "adamw"} >= {"ours:reference", "torch:foreach"}
    assert res["host_overhead"], "host overhead was not measured"
    assert (out / "results.csv").exists() and (out / "results.md").exists()
    # the Muon section: ours and torch.optim.Muon side by side (a peer that cannot run says why)
    muon = res["muon"]
    got = {r["provider"] for r in muon["rows"]}
    assert "torch.optim.Muon" in got and "ours-reference" in got, (got, muon["missing"])
    assert "muon-optimizer" in got or "muon-optimizer" in muon["missing"]
    for r in muon["rows"]:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["torch_over_this"] > 0
    assert "| provider | median ms |" in proc.stdout


class _FusedDoesNothing(torch.optim.SGD):
    """A torch variant that runs without error but does not do the work (as torch 2.13's CPU fused SGD on bf16/fp16
    params, which never writes them)."""

    def step(self, closure=None):
        if self.defaults.get("fused"):
            return None
        return super().step(closure)


def test_a_torch_variant_with_wrong_results_is_no_baseline():
    """providers() times a torch variant only if its update matches the same class's for-loop step in float64; one
    that gives wrong results is left out with the reason (the figures would compare with a step that skips work)."""
    from bench.rules import Rule, torch_update_error
    import momentum_fused as mf
    rule = Rule("sgd", lambda p, b: mf.SGD(p, lr=1e-3, backend=b), 0, _FusedDoesNothing, dict(lr=1e-3))
    provs, missing = providers(rule, torch.device("cpu"), torch.float32, include_reference=False)
    assert {"torch:forloop", "torch:foreach"} <= {p.name for p in provs}
    assert "torch:fused" not in {p.name for p in provs}
    assert missing["torch:fused"].startswith("wrong results here: its update is 100% off")
    assert torch_update_error(torch.optim.SGD, dict(lr=1e-3, momentum=0.9), torch.device("cpu"), torch.float32) < 1e-6
    assert torch_update_error(torch.optim.Adam, {}, torch.device("cpu"), torch.bfloat16) < 0.02


def test_frontend_bench_smoke(tmp_path, capsys):
    """bench/frontend.py runs, keeps the cached plan on meta tensors (the int8 layout's too), and leaves no backend
    registered."""
    from bench import frontend
    from momentum_fused import backends
    out = tmp_path / "fe.json"
    assert frontend.main(["--rules", "adamw,adamw-int8", "--profiles", "llm", "--runs", "1", "--iters", "2",
                          "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["rule"], r["device"], r["plan"]) for r in rows] == [
        (rule, device, plan) for rule in ("adamw", "adamw-int8")
        for device, plan in (("meta", "cached"), ("cpu", "cached"), ("meta", "full"))]
    assert rows[0]["cache_kept"] and rows[3]["cache_kept"] and rows[0]["tensors"] == len(profile_shapes("llm", 10**7))
    assert "WARNING" not in capsys.readouterr().out and frontend.NULL not in backends._REGISTRY


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend")
def test_muon_experts_bench_smoke():
    """bench/bench_muon_experts.py runs 2 gloo processes end to end: stacked experts (flatten=False) spend no time
    in all_to_all_single, the same experts as separate params do."""
    from bench import bench_muon_experts as b
    res = b.measure(layers=1, experts=3, d=4, h=6, rounds=1, iters=2, warmup=1)
    (stacked,), (separate,) = res[b.CASES[0]], res[b.CASES[1]]
    assert stacked[1] == 0 and separate[1] > 0 and stacked[0] > 0
    assert "| stacked (flatten=False) |" in b.table(res)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend")
def test_muon_fsdp_bench_smoke():
    """bench/bench_muon_fsdp.py runs 2 gloo processes end to end; the FSDP2 case spends time in the NS phase's
    collectives (all_to_all_single) and the NS, the unwrapped one none in collectives, and the columns add up to
    the total."""
    from bench import bench_muon_fsdp as b
    cases = ["fsdp / ours", "plain / ours"]
    res = b.measure(d=8, blocks=1, rounds=1, iters=2, warmup=1, cases=cases)
    for rank in (0, 1):
        assert list(res[rank]) == cases
        (fsdp,), (plain,) = res[rank]["fsdp / ours"], res[rank]["plain / ours"]
        assert fsdp[1] > 0 and fsdp[2] > 0 and fsdp[3] > 0 and plain[2] == 0 and plain[1] > 0
        for row in (fsdp, plain):
            assert math.isclose(row[0], sum(row[1:]), rel_tol=1e-9)
    assert "| fsdp / ours |" in b.table(res, 0)
    # GPT shapes (four per block), the exchange in one round and in one per NS call
    cases = ["fsdp / ours, one round", "fsdp / ours, a round per call"]
    res = b.measure(d=8, blocks=1, rounds=1, iters=2, warmup=1, cases=cases, shapes="gpt")
    for rank in (0, 1):
        assert list(res[rank]) == cases
        for (row,) in res[rank].values():
            assert row[1] > 0 and row[2] > 0 and math.isclose(row[0], sum(row[1:]), rel_tol=1e-9)


def test_muon_bench_profile_smoke(capsys):
    """bench/bench_muon.py --profile: one profiled step per provider, matrix products apart from the rest."""
    from bench import bench_muon
    assert bench_muon.main(["--device", "cpu", "--d", "32", "--layers", "1", "--rounds", "1", "--iters", "1",
                            "--providers", "ours-cpu", "--profile", "3"]) == 0
    out = capsys.readouterr().out
    assert "### ours-cpu" in out and "matrix products" in out and "not profiled" not in out
    assert bench_muon.ns_flops([(64, 32)], steps=1) == 4 * 32 * 32 * 64 + 2 * 32 ** 3


def test_triton_host_bench_smoke():
    """bench/triton_host.py (its own process: it sets TRITON_INTERPRET and stubs the kernel launches)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "bench.triton_host", "--profiles", "llm", "--rules", "sgd", "--runs",
                          "1", "--iters", "2"], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| llm | sgd | 292 |" in res.stdout


def test_the_headline_ratio_lies_inside_its_range_over_the_rounds():
    # (a review printed "0.45x (2.52-57.34)": the headline divided medians over all steps, the range per round)
    from bench.__main__ import _add_speedups
    base = dict(rule="adamw", layout="fp32", profile="tiny")
    torch_run = dict(base, kind="torch", provider="torch:fused", median_ms=1.0, round_median_ms=[10.0, 0.5, 0.6])
    ours = dict(base, kind="ours", provider="cpu", median_ms=2.0, round_median_ms=[4.0, 0.25, 0.2])
    _add_speedups([torch_run, ours])
    lo, hi = min(ours["speedup_rounds"]), max(ours["speedup_rounds"])
    assert lo <= ours["speedup_vs_best_torch"] <= hi and ours["speedup_vs_best_torch"] == 2.5


def test_bench_compressed_headline_is_the_median_of_the_paired_runs(tmp_path):
    """The verdict's ratio is the median of the runs' side-by-side ratios and lies inside their range (it was the
    ratio of the medians, which said "met" at 1.14x where the runs' own median was 0.96x, 2026-12-06)."""
    import re
    out = subprocess.run([sys.executable, "-m", "bench.bench_compressed", "--quick", "--runs", "3", "--seconds",
                          "0.01", "--out", str(tmp_path / "c.md")], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("- int8_state AdamW vs torch fused fp32"))
    m = re.search(r"fp32: ([\d.]+)x .*median of 3 runs' side-by-side ratios \(range ([\d.]+) - ([\d.]+)x; "
                  r"ratio of the medians [\d.]+x\)", line)
    assert m, line
    med, lo, hi = map(float, m.groups())
    assert lo <= med <= hi


@pytest.mark.parametrize("argv", [["-m", "bench.bench_compressed", "--runs", "0"],
                                  ["-m", "bench.frontend", "--rules", "adam"],
                                  ["-m", "bench.frontend", "--profiles", "few-large"]])
def test_bad_bench_arguments_are_usage_errors_not_tracebacks(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_kernel_report_time_without_cuda_says_so():
    out = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--time"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr and "Traceback" not in out.stderr
