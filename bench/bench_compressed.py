"""Compressed optimizer state on the CPU: AdamW steps on a GPT-like set of ~16M params, side by side in ONE
process (interleaved runs, so that a noisy shared machine slows every provider alike).

    python -m bench.bench_compressed            # 7 runs per provider
    python -m bench.bench_compressed --runs 5 --quick   # ~4M params (a smoke run)
    python -m bench.bench_compressed --threads 1         # one thread (no parallel-region wake-ups)

Providers (AdamW, lr 1e-3, weight_decay 0.01):
  torch fused fp32     torch.optim.AdamW(fused=True), fp32 params and state            (the 1.0x baseline)
  ours native fp32     momentum_fused.AdamW(backend="cpu")
  ours int8_state      momentum_fused.AdamW(backend="cpu", layout="int8_state"), fp32 params
  ours int8_sr         momentum_fused.AdamW(backend="cpu", layout="int8_sr"): the same, codes rounded stochastically
  ours master16        momentum_fused.AdamW(backend="cpu", layout="master16"), bf16 params
  ours master16_int8   momentum_fused.AdamW(backend="cpu", layout="master16_int8"), bf16 params
  torch fused bf16     torch.optim.AdamW(fused=True) on bf16 params (bf16 state), if torch runs it
  torchao AdamW8bit    torchao.optim.AdamW8bit, fp32 params, if torchao is installed (an optional peer, never
                       a dependency of momentum_fused: `pip install --no-deps torchao`)
  bitsandbytes AdamW8bit  bitsandbytes.optim.AdamW8bit (block-wise dynamic 8-bit state; its CPU path in
                       bitsandbytes >= 0.45), if installed (`pip install --no-deps bitsandbytes`)
Reported per provider: optimizer-state bytes per param (the step counter excluded; int8: codes + scales, the
small tensors' fp32 state included), the median ms per step over the runs and the spread (min - max of the runs'
per-step times), and the ratio of torch fused fp32's median to the provider's (> 1: faster than torch); the
verdict lines under the table take the median of the runs' side-by-side ratios (run r of both providers
interleaved), with its range and the ratio of the medians beside it.
Writes bench/results/compressed_cpu_<date>.md (machine, torch version, thread count).

torch's fused CPU AdamW opens a parallel region per tensor; ours opens one per bucket. On a machine whose cores
are shared with other work, waking the threads of a region can take milliseconds, so with > 1 thread the many
small tensors of this set (50 vectors) can dominate torch's time: run --threads 1 as well to see the kernels
alone.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import platform
import statistics
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # python bench/bench_compressed.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momentum_fused as mf  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR, WD = 1e-3, 0.01


def gpt_shapes(d: int = 448, layers: int = 6, vocab: int = 4096) -> list[tuple]:
    """A GPT-like list of param shapes: per layer qkv, proj, fc1, fc2 matrices (4 x 6 = 24), their biases and
    two layer norms; a token embedding (matrix 25) and a final layer norm. d=448, 6 layers: 16.3M params."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return shapes + [(d,), (d,)]


def state_bytes(opt, params) -> float:
    """Optimizer state bytes per param element: each storage counted once (a code table shared by every tensor,
    torchao's ``qmap`` and bitsandbytes' ``qmap1``/``qmap2``, once in all; before 2026-12-07 bitsandbytes' were
    counted per tensor: 2.047 where 2.044 is right)."""
    total, seen = 0, set()
    for p in params:
        for k, v in opt.state[p].items():
            if k == "step" or not isinstance(v, torch.Tensor):
                continue
            if hasattr(v, "__tensor_flatten__") and type(v) is not torch.Tensor:  # torchao's OptimState8bit
                names, _ = v.__tensor_flatten__()
                parts = [getattr(v, n) for n in names]
            else:
                parts = [v]
            for t in parts:
                key = (t.untyped_storage().data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total / sum(p.numel() for p in params)


class Provider:
    def __init__(self, name, make, dtype):
        self.name, self.make, self.dtype = name, make, dtype
        self.times: list[float] = []  # ms per step, one per run
        self.error = None

    def setup(self, shapes, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(self.dtype)) for s in shapes]
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(self.dtype)
        self.opt = self.make(self.params)

    def step(self, n):
        t0 = time.perf_counter()
        for _ in range(n):
            self.opt.step()
        return (time.perf_counter() - t0) * 1e3 / n


def providers():
    out = [
        Provider("torch fused fp32", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True),
                 torch.float32),
        Provider("ours native fp32", lambda ps: mf.AdamW(ps, lr=LR, weight_decay=WD, backend="cpu"), torch.float32),
        Provider("ours int8_state", lambda ps: mf.AdamW(ps, lr=LR, weight_decay=WD, backend="cpu",
                                                        layout="int8_state"), torch.float32),
        Provider("ours int8_sr", lambda ps: mf.AdamW(ps, lr=LR, weight_decay=WD, backend="cpu",
                                                     layout="int8_sr"), torch.float32),
        Provider("ours master16 (bf16 params)", lambda ps: mf.AdamW(ps, lr=LR, weight_decay=WD, backend="cpu",
                                                                    layout="master16"), torch.bfloat16),
        Provider("ours master16_int8 (bf16 params)", lambda ps: mf.AdamW(ps, lr=LR, weight_decay=WD, backend="cpu",
                                                                         layout="master16_int8"), torch.bfloat16),
        Provider("torch fused bf16 (bf16 state)", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD,
                                                                               fused=True), torch.bfloat16),
    ]
    for name, module, attr in (("torchao AdamW8bit", "torchao.optim", "AdamW8bit"),
                               ("bitsandbytes AdamW8bit", "bitsandbytes.optim", "AdamW8bit")):
        try:
            cls = getattr(importlib.import_module(module), attr)
            out.append(Provider(name, lambda ps, cls=cls: cls(ps, lr=LR, weight_decay=WD), torch.float32))
        except Exception as e:  # noqa: BLE001 (an optional peer: any import failure skips it, with the reason)
            p = Provider(name, None, torch.float32)
            p.error = f"not importable: {type(e).__name__}: {e}"
            out.append(p)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per provider (interleaved), >= 5 for a report")
    ap.add_argument("--seconds", type=float, default=1.0, help="target duration of one run of one provider")
    ap.add_argument("--quick", action="store_true", help="~4M params (d=224)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="markdown output path (default bench/results/compressed_cpu_<date>.md)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:  # (checked before the run: a traceback after it lost the table)
        ap.error(f"--runs must be >= 1 and --seconds > 0, got {args.runs} and {args.seconds}")
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = gpt_shapes(224) if args.quick else gpt_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    provs = providers()
    print(f"{numel / 1e6:.2f}M params in {len(shapes)} tensors, {torch.get_num_threads()} threads", file=sys.stderr)
    for p in provs:
        if p.error:
            continue
        try:
            p.setup(shapes)
            p.step(2)  # warm-up (state creation; torchao compiles its step here)
            # the run length from the median of 3 single steps, and at least 5 steps a run for every provider
            # (one slow first step gave torch's baseline 1 step a run: no averaging at all, a review found)
            est = statistics.median(p.step(1) for _ in range(3))
            p.reps = max(5, int(args.seconds * 1e3 / max(est, 1e-3)))
            p.bytes = state_bytes(p.opt, p.params)
        except Exception as e:  # noqa: BLE001 (a provider that cannot run here is reported, not fatal)
            p.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"  {p.name}: {p.error or 'ready'}", file=sys.stderr)
    for r in range(args.runs):
        k = r % len(provs)  # the order rotates every run (a burst of load falls on every provider alike)
        for p in provs[k:] + provs[:k]:
            if not p.error:
                p.times.append(p.step(p.reps))
        print(f"  run {r + 1}/{args.runs} done", file=sys.stderr)
    base = statistics.median(provs[0].times) if not provs[0].error else float("nan")
    rows = []
    for p in provs:
        if p.error:
            rows.append(f"| {p.name} | - | - | - | - | skipped: {p.error} |")
            continue
        med = statistics.median(p.times)
        rows.append(f"| {p.name} | {p.bytes:.3f} | {med:.2f} | {min(p.times):.2f} - {max(p.times):.2f} | "
                    f"{base / med:.2f}x | {p.reps} steps x {len(p.times)} runs |")
    by = {p.name: p for p in provs}

    def paired(a, b):  # the runs are interleaved: run r of each provider saw the same machine state
        pa, pb = by.get(a), by.get(b)
        if pa is None or pb is None or pa.error or pb.error:
            return None
        return sorted(tb / ta for ta, tb in zip(pa.times, pb.times))

    def verdict_line(a, b, what, target=None, fmt=".2f"):
        """The median of the runs' side-by-side ratios (the headline, as `python -m bench`'s since 2026-12-06: the
        ratio of the medians, also shown, can fall outside the runs' own range), its range, the target."""
        rs = paired(a, b)
        if rs is None:
            miss = by.get(b) if by.get(b) is not None and by[b].error else by.get(a)
            return f"- vs {what}: n/a ({miss.error if miss is not None else 'not run'})"
        med = statistics.median(rs)
        of_medians = statistics.median(by[b].times) / statistics.median(by[a].times)
        goal = "" if target is None else f" (target >= {target:g}x: {'met' if med >= target else 'NOT met'})"
        return (f"- int8_state AdamW vs {what}: {med:{fmt}}x{goal}, the median of {len(rs)} runs' side-by-side "
                f"ratios (range {rs[0]:{fmt}} - {rs[-1]:{fmt}}x; ratio of the medians {of_medians:{fmt}}x)")

    verdict = [verdict_line("ours int8_state", "torch fused fp32", "torch fused fp32", 1.0),
               verdict_line("ours int8_state", "torchao AdamW8bit", "torchao AdamW8bit", 10, ".1f"),
               verdict_line("ours int8_state", "bitsandbytes AdamW8bit", "bitsandbytes AdamW8bit", None, ".1f")]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torchao
        ao = torchao.__version__
    except Exception:  # noqa: BLE001
        ao = "not installed"
    isa = torch.ops.momentum_fused.cpu_isa() if hasattr(torch.ops.momentum_fused, "cpu_isa") else "?"
    md = "\n".join([
        f"# Compressed optimizer state on the CPU: AdamW, {numel / 1e6:.2f}M params ({len(shapes)} tensors)",
        "",
        f"{_dt.datetime.now():%Y-%m-%d %H:%M}; {cpu}; {os.cpu_count()} CPUs, torch.get_num_threads() = "
        f"{torch.get_num_threads()}; torch {torch.__version__}; torchao {ao}; momentum_fused cpu kernels: {isa}. "
        f"Command: `python -m bench.bench_compressed {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        f"Runs interleaved round-robin (the order rotating every run), {args.runs} per provider, at least 5 steps "
        "each; per-step ms = a run's time / its steps; median and min - max over the runs. State bytes per param: optimizer state only (no params, no step counter).",
        "",
        "| provider | state B/param | ms/step (median) | spread (min - max) | speed vs torch fused fp32 | steps |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *verdict,
        "",
    ])
    print(md)
    path = args.out or os.path.join(RESULTS, f"compressed_cpu_{_dt.datetime.now():%Y%m%d-%H%M%S}.md")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # (a bare file name: the current directory)
    with open(path, "w") as fh:
        fh.write(md)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
