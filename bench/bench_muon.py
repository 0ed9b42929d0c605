"""Muon per step: momentum_fused.Muon vs torch.optim.Muon vs the reference package ``muon-optimizer``
(KellerJordan/Muon, module ``muon``; optional), on a GPT-like stack of hidden matrices, side by side.

    python -m bench.bench_muon                      # d=384, 6 layers (24 matrices, 10.6M params), 5 rounds
    python -m bench.bench_muon --d 768 --layers 12 --device cuda
    python -m bench.bench_muon --ns-algorithm standard,gram,auto --providers ours-cpu,torch.optim.Muon

Every provider runs the same Newton-Schulz dtype (bf16) and coefficients (torch's defaults, 5 steps). Ours runs
each ``--ns-algorithm`` given (default "standard", torch's iteration; "gram" and "auto": the Gram form,
docs/muon.md), as providers ``ours-<backend>`` (standard) and ``ours-<backend>-<algorithm>``; on a CPU with
AVX-512-BF16 "gram"/"auto" compute the symmetric products on a half-product kernel, and ``auto/torch-mm`` runs
"auto" on torch's products instead (the kernel's A/B in one process). The
providers take turns inside each round (one warm-up step, then ``--iters`` timed steps each), so machine noise
hits them alike; a round's figure is the median of its steps. Reported: the median over rounds, the spread
(min-max) over rounds, and each provider's ratio to torch.optim.Muon per round (median and min-max). ``python -m
bench`` runs a small version of this (``rows``)."""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys

import torch

import momentum_fused as mf
from momentum_fused.specs_muon import NS_ALGORITHMS

from .core import time_fn


def gpt_matrices(d: int, layers: int) -> list[tuple]:
    """The hidden matrices of a GPT block stack: per layer qkv (3d, d), proj (d, d), fc (4d, d), out (d, 4d)."""
    return [s for _ in range(layers) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def _peer(params, lr):
    mod = importlib.import_module("muon")  # the muon-optimizer package
    return mod.SingleDeviceMuon(params, lr=lr, weight_decay=0.1, momentum=0.95)


def providers(device: torch.device, algorithms=("standard",)) -> tuple[dict, dict]:
    """name -> factory(params), and name -> why a provider cannot run here."""
    lr = 0.02
    out, missing = {}, {}
    st = mf.backends.status()
    for b in ("cpu", "cuda", "triton", "reference"):
        if st.get(b) != "available":
            missing[f"ours-{b}"] = st.get(b, "not registered")
            continue
        if (b == "cpu") != (device.type == "cpu") and b != "reference":
            continue
        for alg in algorithms:
            name = f"ours-{b}" if alg == "standard" else f"ours-{b}-{alg}"
            base, _, how = alg.partition("/")
            out[name] = lambda ps, b=b, base=base, how=how: _torch_products(
                mf.Muon(ps, lr=lr, ns_dtype=torch.bfloat16, ns_algorithm=base, backend=b), how == "torch-mm")
    if hasattr(torch.optim, "Muon"):
        out["torch.optim.Muon"] = lambda ps: torch.optim.Muon(ps, lr=lr)
    else:
        missing["torch.optim.Muon"] = f"torch {torch.__version__} has no torch.optim.Muon"
    try:
        importlib.import_module("muon")
        out["muon-optimizer"] = lambda ps: _peer(ps, lr)
    except ImportError as e:
        missing["muon-optimizer"] = f"not installed (pip install --no-deps muon-optimizer): {e}"
    return out, missing


def _torch_products(opt, on: bool):
    """``--ns-algorithm auto/torch-mm``: the optimizer's steps with the symmetric CPU kernel switched off
    (specs_muon.symmetric_products -> None: torch's bmm/baddbmm), for an A/B of the kernel in one process."""
    if not on:
        return opt
    from momentum_fused import specs_muon
    real = opt.step

    def step(*a, **k):
        saved = specs_muon.symmetric_products
        specs_muon.symmetric_products = lambda *args: None
        try:
            return real(*a, **k)
        finally:
            specs_muon.symmetric_products = saved
    opt.step = step
    return opt


def _params(shapes, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device) * 0.02)
        p.grad = torch.randn(s, generator=g, device=device) * 1e-2
        ps.append(p)
    return ps


def measure(device: torch.device, shapes, rounds: int = 5, iters: int = 5, names=None,
            algorithms=("standard",)) -> dict:
    """{'rows': [{provider, median_ms, min_ms, max_ms, ratio_vs_torch (median, min, max)}], 'missing': {...}}."""
    makers, missing = providers(device, algorithms)
    if names is not None:
        makers = {k: v for k, v in makers.items() if k in names}
    opts = {}
    for name, make in makers.items():
        try:
            ps = _params(shapes, device)
            opts[name] = (make(ps), ps)
            opts[name][0].step()  # state created, plans cached
        except Exception as e:  # recorded, never silently dropped
            missing[name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    per_round: dict = {n: [] for n in opts}
    for _ in range(rounds):
        for name, (opt, _) in opts.items():
            per_round[name].append(statistics.median(time_fn(opt.step, device, warmup=1, iters=iters)) * 1e3)
    rows = []
    ref = per_round.get("torch.optim.Muon")
    for name, ts in per_round.items():
        row = {"provider": name, "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
               "rounds": len(ts), "numel": sum(p.numel() for p in opts[name][1]), "n_tensors": len(shapes)}
        if ref:
            r = [a / b for a, b in zip(ref, ts)]
            row.update(torch_over_this=statistics.median(r), torch_over_this_min=min(r), torch_over_this_max=max(r))
        rows.append(row)
    return {"rows": rows, "missing": missing}


def rows(device: torch.device, quick: bool, include_reference: bool = True) -> dict:
    """The Muon section of ``python -m bench`` (ns_algorithm "standard" and "auto"): in --quick a smoke run (one
    round of one step: a step of tiny matrices took ~0.3 s on the loaded shared CPU of 2026-12-03), else the
    10.6M-param stack, 5 rounds."""
    d, layers = (64, 1) if quick else (384, 6) if device.type == "cpu" else (1024, 12)
    algorithms = ("standard", "auto")
    names = None if include_reference else {n for n in providers(device, algorithms)[0]
                                            if not n.startswith("ours-reference")}
    rounds, iters = (1, 1) if quick else (5, 5)
    res = measure(device, gpt_matrices(d, layers), rounds=rounds, iters=iters, names=names, algorithms=algorithms)
    res.update(profile=f"gpt-matrices d={d} layers={layers}", rounds=rounds, iters=iters)
    return res


def markdown(res: dict) -> str:
    rounds, iters = res.get("rounds", 5), res.get("iters", 5)
    smoke = " A SMOKE RUN (--quick: one step), not a measurement." if rounds * iters == 1 else ""
    lines = [f"\nMuon per step ({res.get('profile', '')}, {res['rows'][0]['numel'] if res['rows'] else 0:.3g} params, "
             f"NS in bf16, {iters} steps a round, {rounds} rounds; median over rounds, min-max; torch/this > 1: "
             f"faster than torch.optim.Muon).{smoke}\n",
             "| provider | median ms | min-max ms | torch / this (median, min-max) |", "|---|---|---|---|"]
    for r in res["rows"]:
        ratio = (f"{r['torch_over_this']:.2f} ({r['torch_over_this_min']:.2f}-{r['torch_over_this_max']:.2f})"
                 if "torch_over_this" in r else "–")
        lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {ratio} |")
    for k, v in res["missing"].items():
        lines.append(f"- {k}: not measured: {v}")
    return "\n".join(lines) + "\n"


def ns_flops(shapes, steps: int = 5) -> float:
    """FLOPs of torch's Newton-Schulz ("standard") on ``shapes``: per step, for X (a x b, a <= b), A = X X^T
    (2 a^2 b), B = c A + d A A (2 a^3), X' = e X + B X (2 a^2 b)."""
    total = 0.0
    for m, n in shapes:
        a, b = min(m, n), max(m, n)
        total += steps * (4 * a * a * b + 2 * a ** 3)
    return total


def profile_step(opt, device: torch.device, top: int) -> str:
    """One step under torch.profiler: the device time (CPU time on a CPU) by kernel, the matrix products
    (names with gemm / matmul / mm / cutlass / sm90) apart, and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    evs = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if device.type == "cuda":  # kernels only (the CPU-side ops carry no device time of their own); not the GPU
        # spans of record_function ranges ("Optimizer.step#...": the whole step again, counted as "the rest" until
        # 2026-12-04's second H200 run)
        evs = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and not e.key.startswith("Optimizer.")] or evs
    total = sum(getattr(e, key) for e in evs) / 1e3
    mm = sum(getattr(e, key) for e in evs if any(w in e.key.lower() for w in ("gemm", "matmul", "mm", "cutlass",
                                                                             "sm90", "nvjet"))) / 1e3
    lines = [f"  {'device' if device.type == 'cuda' else 'CPU'} time {total:.2f} ms: matrix products {mm:.2f} ms, "
             f"the rest {total - mm:.2f} ms", "  | ms | calls | kernel |", "  |---|---|---|"]
    for e in sorted(evs, key=lambda e: -getattr(e, key))[:top]:
        lines.append(f"  | {getattr(e, key) / 1e3:.3f} | {e.count} | {e.key[:90]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_muon", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5, help="rounds (>= 1)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per provider and round (>= 1)")
    ap.add_argument("--providers", default=None, help="comma list (default: all that run here)")
    ap.add_argument("--ns-algorithm", default="standard",
                    help="comma list of ours' ns_algorithm: standard, gram, auto (default standard); gram/torch-mm "
                         "and auto/torch-mm: the same with the symmetric CPU kernel off (torch's products)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timing, one step of each provider under torch.profiler: matrix products vs the "
                         "rest, and the N kernels with the most device time")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    algorithms = tuple(args.ns_algorithm.split(","))
    bad = [a for a in algorithms if a.partition("/")[0] not in NS_ALGORITHMS or a.partition("/")[2] not in ("", "torch-mm")]
    if bad:
        ap.error(f"--ns-algorithm: {bad} not in {list(NS_ALGORITHMS)}")
    names = None
    if args.providers:  # ours-<backend> selects every algorithm of that backend
        sel = args.providers.split(",")
        makers, missing = providers(device, algorithms)
        every = [*makers, *missing]  # (one that cannot run here is named in the report's "not measured" lines)
        bad = [s for s in sel if not any(n == s or n.startswith(s + "-") for n in every)]
        if bad:  # (an unknown name would leave the table empty)
            ap.error(f"--providers: unknown {bad}; providers: {','.join(every)}")
        names = {n for n in every if n in sel or any(n.startswith(s + "-") for s in sel)}
    res = measure(device, gpt_matrices(args.d, args.layers), args.rounds, args.iters, names, algorithms)
    res.update(profile=f"gpt-matrices d={args.d} layers={args.layers}, {torch.get_num_threads()} threads",
               rounds=args.rounds, iters=args.iters)  # (the header said 5 and 5 whatever was run)
    print(markdown(res))
    if args.profile:
        shapes = gpt_matrices(args.d, args.layers)
        print(f"\nNewton-Schulz FLOPs of the stack (torch's iteration, 5 steps): {ns_flops(shapes) / 1e12:.3f} TFLOP")
        makers, _ = providers(device, algorithms)
        for name, make in makers.items():
            if names is not None and name not in names:
                continue
            try:
                print(f"\n### {name}\n" + profile_step(make(_params(shapes, device)), device, args.profile))
            except Exception as e:
                print(f"\n### {name}: not profiled: {type(e).__name__}: {str(e)[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
