"""Time of one LowRankSGD / LowRankAdam step, split into augment / gradient / update / truncate.

For each (m, n, r) a bucket of ``--layers`` LowRankLinear layers of that shape is stepped in
fixed-rank mode (every step augments r -> 2r and truncates back to r, so every step costs the same).
The split comes from the optimizer's ``profile`` dict (device-synchronised phase timers):
  augment  = the batched QR of [U, G_U] and [V, G_V] and the lift of S and the momentum cores,
  gradient = the Galerkin core gradient (the solves with S and the projections),
  update   = the elementwise SGD/Adam rule on the 2r x 2r cores,
  truncate = the batched SVD, the rank choice (one host sync) and the write-back of U, S, V, cores,
  other    = the rest of step(): validation (non-finite check, one host sync) and stacking the bucket.
Gradients are random (fixed between steps): only the optimizer is timed, not a forward/backward.

    python -m bench.bench_lowrank                       # CPU, writes bench/results/lowrank-cpu/
    python -m bench.bench_lowrank --device cuda --out bench/results/lowrank-cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from momentum_fused.lowrank import LowRankAdam, LowRankLinear, LowRankSGD

SHAPES = [(256, 256, 16), (1024, 1024, 32), (4096, 1024, 64)]
PHASES = ("augment", "gradient", "update", "truncate")
COLUMNS = PHASES + ("other",)


def bench_one(cls, m, n, r, layers, device, steps, warmup, retraction):
    torch.manual_seed(0)
    mods = [LowRankLinear(n, m, r, r, bias=False, device=device) for _ in range(layers)]
    params = [p for mod in mods for p in mod.parameters()]
    kw = dict(lr=1e-3, momentum=0.9) if cls is LowRankSGD else dict(lr=1e-4)
    opt = cls(params, fixed_rank=True, retraction=retraction, **kw)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    totals, per_phase = [], {k: [] for k in PHASES}
    for i in range(warmup + steps):
        opt.profile = {}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            totals.append(dt)
            for k in PHASES:
                per_phase[k].append(opt.profile.get(k, 0.0))
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731  (ms)
    res = dict(opt=cls.__name__, m=m, n=n, r=r, layers=layers, total_ms=med(totals),
               **{f"{k}_ms": med(v) for k, v in per_phase.items()})
    # the rest: validation (the non-finite check, one host sync), stacking the factors into buckets
    res["other_ms"] = statistics.median([t - sum(per_phase[k][i] for k in PHASES)
                                         for i, t in enumerate(totals)]) * 1e3
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4, help="layers per bucket (stacked in one batched call)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--retraction", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="folder for the .md/.json table (default bench/results/lowrank-<device>)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"lowrank-{device.type}")
    rows = []
    for cls in (LowRankSGD, LowRankAdam):
        for m, n, r in SHAPES:
            row = bench_one(cls, m, n, r, args.layers, device, args.steps, args.warmup, args.retraction)
            rows.append(row)
            print(f"{row['opt']:12s} {m}x{n} r={r} x{args.layers}: {row['total_ms']:8.2f} ms  " +
                  "  ".join(f"{k} {row[k + '_ms']:.2f}" for k in COLUMNS), flush=True)
    meta = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), retraction=args.retraction,
                layers=args.layers, steps=args.steps,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lowrank_step.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# One LowRank* step, split by phase ({meta['device']}, torch {meta['torch']}, "
             f"{meta['threads']} threads, retraction={args.retraction}, {args.layers} layers per bucket, "
             f"median of {args.steps} steps, ms)", "",
             "| optimizer | m x n | r | total | augment | gradient | update | truncate | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['opt']} | {row['m']}x{row['n']} | {row['r']} | {row['total_ms']:.2f} | " +
                     " | ".join(f"{row[k + '_ms']:.2f}" for k in COLUMNS) + " |")
    with open(os.path.join(out, "lowrank_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
