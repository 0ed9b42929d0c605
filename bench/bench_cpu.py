"""CPU optimizer-step benchmark: momentum_fused's compiled cpu backend vs torch.optim and vs our
reference backend, side by side in ONE process, with the in-place read-modify-write bandwidth of this
machine measured in the same run as the roofline.

    python -m bench.bench_cpu            # full: 64M fp32 params (1 tensor, 300 tensors), 10,000 x ~1k
    python -m bench.bench_cpu --quick    # 8M params, 2,000 x ~1k (a smoke run, ~30 s)

Providers per rule:
  ours       momentum_fused.<Optimizer>(backend="cpu")
  torch      torch.optim.X(fused=True) where torch 2.13 has a CPU fused kernel (AdamW, SGD); else
             torch.optim.X(foreach=True) (NAdam); for rules torch lacks (Lion, Signum, QHM, FSGDM) a
             hand-written torch._foreach_* implementation of the same rule ("torch foreach").
  reference  momentum_fused.<Optimizer>(backend="reference") (per-tensor torch ops, the spec)
Reported: median ms/step over the timed steps (after warm-up), effective GB/s = bytes/elem (specs'
bytes_per_elem, docs/algorithms.md §9, scaled by the storage size for bf16) x numel / time, % of the
measured in-place RMW bandwidth (x.mul_(1.0001), 8 B/elem), and ours/torch speed ratio.
Writes bench/results/cpu-<date>.md and .json (and cpu-latest.md/.json). Uses only the public API.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # python bench/bench_cpu.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momentum_fused as mf  # noqa: E402
from bench.core import cpu_roofline_numel, llc_bytes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------ foreach baselines
class _ForeachOpt:
    """Minimal torch._foreach_* implementations of rules torch.optim lacks (same math as the spec)."""

    def __init__(self, params, rule, **hp):
        self.params, self.rule, self.hp = list(params), rule, hp
        self.bufs = None
        self.t = 0

    @torch.no_grad()
    def step(self):
        ps = self.params
        gs = [p.grad for p in ps]
        hp = self.hp
        lr = hp["lr"]
        self.t += 1
        if self.bufs is None:
            self.bufs = [torch.zeros_like(p) for p in ps]
        b = self.bufs
        if self.rule == "signum":
            beta = hp["momentum"]
            torch._foreach_mul_(b, beta)
            torch._foreach_add_(b, gs, alpha=1 - beta)
            torch._foreach_add_(ps, torch._foreach_sign(b), alpha=-lr)
        elif self.rule == "lion":
            b1, b2 = hp["betas"]
            c = torch._foreach_mul(b, b1)
            torch._foreach_add_(c, gs, alpha=1 - b1)
            torch._foreach_sign_(c)
            torch._foreach_add_(ps, c, alpha=-lr)
            torch._foreach_mul_(b, b2)
            torch._foreach_add_(b, gs, alpha=1 - b2)
        elif self.rule == "qhm":
            beta, nu = hp["momentum"], hp["nu"]
            torch._foreach_mul_(b, beta)
            torch._foreach_add_(b, gs, alpha=1 - beta)
            torch._foreach_add_(ps, b, alpha=-lr * nu)
            torch._foreach_add_(ps, gs, alpha=-lr * (1 - nu))
        elif self.rule == "fsgdm":
            if self.t == 1:
                torch._foreach_copy_(b, gs)
            else:
                torch._foreach_mul_(b, hp["u"])
                torch._foreach_add_(b, gs, alpha=hp["v"])
            torch._foreach_add_(ps, b, alpha=-lr)
        else:
            raise ValueError(self.rule)


# (name, our class + kwargs, torch provider label + factory, bytes/elem key)
def _rules():
    return [
        ("AdamW", lambda ps, be: mf.AdamW(ps, lr=1e-3, weight_decay=1e-2, backend=be),
         "torch fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True)),
        ("SGD-momentum", lambda ps, be: mf.SGD(ps, lr=1e-2, momentum=0.9, backend=be),
         "torch fused", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)),
        ("NAdam", lambda ps, be: mf.NAdam(ps, lr=2e-3, backend=be),
         "torch foreach", lambda ps: torch.optim.NAdam(ps, lr=2e-3, foreach=True)),
        ("Lion", lambda ps, be: mf.Lion(ps, lr=1e-4, betas=(0.9, 0.99), backend=be),
         "torch foreach", lambda ps: _ForeachOpt(ps, "lion", lr=1e-4, betas=(0.9, 0.99))),
        ("Signum", lambda ps, be: mf.Signum(ps, lr=1e-4, momentum=0.9, backend=be),
         "torch foreach", lambda ps: _ForeachOpt(ps, "signum", lr=1e-4, momentum=0.9)),
        ("QHM", lambda ps, be: mf.QHM(ps, lr=1.0, momentum=0.999, nu=0.7, backend=be),
         "torch foreach", lambda ps: _ForeachOpt(ps, "qhm", lr=1.0, momentum=0.999, nu=0.7)),
        ("FSGDM", lambda ps, be: mf.FSGDM(ps, lr=0.1, weight_decay=0.0, backend=be),
         "torch foreach", lambda ps: _ForeachOpt(ps, "fsgdm", lr=0.1, u=0.0, v=1.0)),
    ]


def _profiles(quick):
    total = 8 * 2 ** 20 if quick else 64 * 2 ** 20
    gen = torch.Generator().manual_seed(0)
    # 300 tensors, LLM-like: a few large matrices and many small vectors, summing to `total`
    w = torch.rand(300, generator=gen) ** 3 + 1e-3
    sizes300 = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
    sizes300[0] += total - sum(sizes300)
    n_small = 2000 if quick else 10_000
    small = [int(x) for x in torch.randint(512, 1537, (n_small,), generator=gen)]
    return [
        ("1 tensor", [total]),
        ("300 tensors", sizes300),
        (f"{n_small:,} tensors ~1k", small),
    ]


def _median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _make(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for n in sizes:
        p = torch.empty(n, dtype=dtype).normal_(generator=gen).requires_grad_()
        p.grad = torch.empty(n, dtype=dtype).normal_(generator=gen).mul_(1e-2)
        ps.append(p)
    return ps


def rmw_bandwidth(numel, iters=20):
    """The in-place read-modify-write bandwidth: the best of ``iters`` x.mul_ (as ``python -m bench``: a roofline is
    the most the machine gave, not its median; a median made kernels read above 100 %)."""
    x = torch.ones(numel, dtype=torch.float32)
    for _ in range(3):
        x.mul_(1.0001)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        x.mul_(1.0001)
        ts.append(time.perf_counter() - t0)
    del x
    ms = min(ts) * 1e3
    return 8 * numel / (ms * 1e-3) / 1e9, ms


def _bytes_per_elem(opt, dtype):
    fp32 = mf.specs.get_spec(opt.rule).bytes_per_elem(opt.param_groups[0])
    return fp32 * torch.empty((), dtype=dtype).element_size() / 4


def run(quick=False, warmup=2, iters=5, rules=None, skip_reference=False):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    profiles = _profiles(quick)
    # twice the last-level cache (a fixed 256 MiB buffer sat in a 480 MiB L3, 2026-12-06), --quick too
    bw_numel = cpu_roofline_numel(floor=64 * 2 ** 20)
    bw, bw_ms = rmw_bandwidth(bw_numel)
    llc = llc_bytes() / 2 ** 20
    print(f"in-place RMW bandwidth (x.mul_ on {bw_numel:,} fp32): {bw:.1f} GB/s ({bw_ms:.2f} ms); last-level cache "
          f"{llc:.0f} MiB: a row whose params, grads and state fit in it can read above 100 %", flush=True)
    rows = []
    cases = []
    for name, ours, tlabel, tfac in _rules():
        if rules and name not in rules:
            continue
        for pname, sizes in profiles:
            cases.append((name, ours, tlabel, tfac, pname, sizes, torch.float32))
        if name == "AdamW":
            for pname, sizes in profiles[:2]:
                cases.append((name, ours, tlabel, tfac, pname, sizes, torch.bfloat16))
    for name, ours, tlabel, tfac, pname, sizes, dtype in cases:
        numel = sum(sizes)
        row = dict(rule=name, profile=pname, dtype=str(dtype).replace("torch.", ""), numel=numel,
                   tensors=len(sizes))
        providers = [("ours", lambda ps: ours(ps, "cpu")), (tlabel, tfac)]
        if not skip_reference:
            providers.append(("reference", lambda ps: ours(ps, "reference")))
        bpe, built = None, []
        for label, fac in providers:  # every provider built and warmed up first, then their steps alternate
            ps = _make(sizes, dtype)
            try:
                opt = fac(ps)
                if label == "ours":
                    bpe = _bytes_per_elem(opt, dtype)
                for _ in range(warmup if label != "reference" else 1):
                    opt.step()
            except Exception as e:  # e.g. torch has no fused kernel for this dtype; reported, the run goes on
                row[label] = None
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            built.append((label, opt, ps, iters if label != "reference" or len(sizes) < 1000 else max(2, iters // 2)))
        times = _alternate(built, dtype, row)
        for label, ts in times.items():
            row[label] = statistics.median(ts) * 1e3
            row.setdefault("providers", []).append(label)
        del built
        gc.collect()
        row["torch_label"] = tlabel
        row["bytes_per_elem"] = bpe
        if row.get("ours"):
            gbs = bpe * numel / (row["ours"] * 1e-3) / 1e9
            row["ours_GBps"] = gbs
            row["ours_pct_rmw"] = 100 * gbs / bw
            if row.get(tlabel):
                row["speedup_vs_torch"] = row[tlabel] / row["ours"]
                row["torch_GBps"] = bpe * numel / (row[tlabel] * 1e-3) / 1e9
            if row.get("reference"):
                row["speedup_vs_reference"] = row["reference"] / row["ours"]
            if row.get("ours_apply"):
                row["ours_apply_GBps"] = bpe * numel / (row["ours_apply"] * 1e-3) / 1e9
                if row.get(tlabel):
                    row["apply_speedup_vs_torch"] = row[tlabel] / row["ours_apply"]
        rows.append(row)
        print(_fmt_row(row), flush=True)
    bw_end, _ = rmw_bandwidth(bw_numel)  # again at the end (as python -m bench): the roofline is the larger
    if bw_end > bw:
        bw = bw_end
        for row in rows:
            if row.get("ours_GBps"):
                row["ours_pct_rmw"] = 100 * row["ours_GBps"] / bw
    meta = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_model(), cpu_flags=_cpu_flags(), torch=torch.__version__, python=platform.python_version(),
        threads=threads, quick=quick, warmup=warmup, iters=iters, rmw_GBps=bw, rmw_numel=bw_numel,
        backend_status=mf.backends.status(), cpu_isa=_isa(),
    )
    return meta, rows


def _isa():
    try:
        return str(torch.ops.momentum_fused.cpu_isa())
    except Exception:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16") if f in fl]
    except OSError:
        pass
    return []


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _alternate(built, dtype, row) -> dict:
    """One timed step of each built provider in turn, the order rotating every round, until each has its count
    (since 2026-12-06: the providers ran one after another before, so a burst of load on this shared machine fell on
    one of them). Returns {label: step times in s}; ours also puts the median time inside the backend's apply()
    (the C++ op and its argument packing, vs the whole step(): the Python front end) into ``row["ours_apply"]``.
    A provider that raises is recorded in ``row`` and dropped."""
    times = {label: [] for label, *_ in built}
    spent: list = []
    be = mf.backends.resolve("cpu", mf.specs.get_spec(built[0][1].rule), torch.device("cpu"), dtype) \
        if built and built[0][0] == "ours" else None
    for k in range(max((it for *_, it in built), default=0)):
        order = built[k % len(built):] + built[:k % len(built)]
        for label, opt, _, it in order:
            if label not in times or len(times[label]) >= it:
                continue
            if label == "ours" and be is not None:
                orig = be.apply

                def timed_apply(*a, _orig=orig):
                    t0 = time.perf_counter()
                    _orig(*a)
                    spent.append(time.perf_counter() - t0)

                be.apply = timed_apply
            try:
                t0 = time.perf_counter()
                opt.step()
                times[label].append(time.perf_counter() - t0)
            except Exception as e:
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                del times[label]
            finally:
                if label == "ours" and be is not None:
                    be.apply = orig
    if spent and "ours" in times:
        row["ours_apply"] = statistics.median(spent) * 1e3
    return times


def _fmt_row(r):
    tl = r["torch_label"]
    return (f"{r['rule']:<13} {r['profile']:<20} {r['dtype']:<9} ours {_f(r.get('ours'))} ms "
            f"({_f(r.get('ours_GBps'), '{:.1f}')} GB/s, {_f(r.get('ours_pct_rmw'), '{:.0f}')}% of the RMW measured at the start) | "
            f"{tl} {_f(r.get(tl))} ms (x{_f(r.get('speedup_vs_torch'))}) | reference {_f(r.get('reference'))} ms"
            f" | apply {_f(r.get('ours_apply'))} ms")


def to_markdown(meta, rows):
    out = [f"# CPU optimizer-step benchmark ({meta['date']})", "",
           f"- CPU: {meta['cpu']} (flags: {', '.join(meta['cpu_flags']) or 'n/a'}; kernel variant: "
           f"{meta['cpu_isa']}), threads: {meta['threads']}",
           f"- torch {meta['torch']}, Python {meta['python']}; {'--quick (reduced sizes)' if meta['quick'] else 'full sizes'}; "
           f"median of {meta['iters']} timed steps after {meta['warmup']} warm-up steps (reference: fewer), the providers' "
           "steps alternating, the order rotating every round",
           f"- Roofline: in-place read-modify-write `x.mul_(1.0001)` on {meta['rmw_numel']:,} fp32 = "
           f"**{meta['rmw_GBps']:.1f} GB/s** (8 B/elem), the best of 20 at the start and at the end of the run (a % "
           "above 100: the machine's bandwidth varied during the run)",
           "- GB/s = bytes/elem (docs/algorithms.md §9; bf16 storage: half) x numel / time; "
           "`x torch` = torch time / our time (>1: ours faster)", "",
           "- `ours apply ms`: the part of our step() spent in the backend's apply() (the C++ op and its "
           "argument packing); the rest of `ours ms` is the Python front-end (validation, host scalars: "
           "base.py/specs.py), which grows with the tensor count", "",
           "| rule | profile | dtype | B/elem | ours ms | ours GB/s | % RMW | torch provider | torch ms | "
           "torch GB/s | x torch | reference ms | x reference | ours apply ms | apply x torch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = [(r, k[:-6], v) for r in rows for k, v in r.items() if k.endswith("_error")]
    for r in rows:
        tl = r["torch_label"]
        out.append(f"| {r['rule']} | {r['profile']} | {r['dtype']} | {_f(r.get('bytes_per_elem'), '{:g}')} | "
                   f"{_f(r.get('ours'))} | {_f(r.get('ours_GBps'), '{:.1f}')} | {_f(r.get('ours_pct_rmw'), '{:.0f}')} | "
                   f"{tl} | {_f(r.get(tl))} | {_f(r.get('torch_GBps'), '{:.1f}')} | "
                   f"**{_f(r.get('speedup_vs_torch'))}** | {_f(r.get('reference'))} | "
                   f"{_f(r.get('speedup_vs_reference'), '{:.1f}')} | {_f(r.get('ours_apply'))} | "
                   f"{_f(r.get('apply_speedup_vs_torch'))} |")
    if failed:
        out += ["", "Not measured (`-` above), and why:"]
        out += [f"- {r['rule']} / {r['profile']} / {r['dtype']} / {label}: {why}" for r, label, why in failed]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (8M params, 2,000 small tensors)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rules", nargs="*", help="subset of: AdamW SGD-momentum NAdam Lion Signum QHM FSGDM")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    ap.add_argument("--out", default=RESULTS, help="results folder")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if a.rules:  # names as listed, in any case (an unknown one would leave the table empty)
        known = {name.lower(): name for name, *_ in _rules()}
        bad = [r for r in a.rules if r.lower() not in known]
        if bad:
            ap.error(f"--rules: unknown {bad}; rules: {' '.join(known.values())}")
        a.rules = [known[r.lower()] for r in a.rules]
    if "cpu" not in mf.backends.available():
        print(f"cpu backend unavailable: {mf.backends.status().get('cpu')}", file=sys.stderr)
        return 2
    meta, rows = run(quick=a.quick, warmup=a.warmup, iters=a.iters, rules=a.rules, skip_reference=a.no_reference)
    md = to_markdown(meta, rows)
    print(md)
    if not a.no_save:
        os.makedirs(a.out, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if a.quick else "")
        for base in (f"cpu-{stamp}", "cpu-latest" + ("-quick" if a.quick else "")):
            with open(os.path.join(a.out, base + ".md"), "w") as fh:
                fh.write(md)
            with open(os.path.join(a.out, base + ".json"), "w") as fh:
                json.dump(dict(meta=meta, rows=rows), fh, indent=1)
        print(f"wrote {a.out}/cpu-{stamp}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
