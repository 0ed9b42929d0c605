"""The Newton-Schulz phase alone, per shape: torch's products against the symmetric CPU kernel, in the standard and
the Gram form, side by side (interleaved repetitions; min and median ms; ratio = the standard form's median / this).

    python -m bench.muon_ns_shapes --threads 2            # 6 matrices of each shape of the bench_muon stack (d=384)

What it decides: where "auto" should take the Gram form (specs_muon.GRAM_MIN_ASPECT) and what the kernel
(csrc/cpu/cpu_symmm.cpp) gains per shape (docs/muon.md, "Symmetric products")."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from momentum_fused._backend_cpu import symmetric_product
from momentum_fused.reference import newton_schulz
from momentum_fused.specs_muon import DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS, gram_restarts

SHAPES = ((384, 384), (768, 384), (1152, 384), (1536, 384), (384, 1536))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sym = symmetric_product()
    schedule = [DEFAULT_NS_COEFFICIENTS] * DEFAULT_NS_STEPS
    restarts = gram_restarts(len(schedule))
    print(f"Newton-Schulz in bf16, {args.batch} matrices per shape, {torch.get_num_threads()} threads, "
          f"{args.reps} repetitions; kernel: {'yes' if sym else 'no (torch products only)'}\n")
    print("| shape | " + " | ".join(["standard", "standard + kernel", "Gram", "Gram + kernel"]) + " |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
        fns = {"std": lambda: newton_schulz(x, schedule, 1e-7, torch.bfloat16),
               "std+k": lambda: newton_schulz(x, schedule, 1e-7, torch.bfloat16, sym=sym),
               "gram": lambda: newton_schulz(x, schedule, 1e-7, torch.bfloat16, gram=True, restarts=restarts),
               "gram+k": lambda: newton_schulz(x, schedule, 1e-7, torch.bfloat16, gram=True, restarts=restarts,
                                               sym=sym)}
        if sym is None:
            fns = {k: v for k, v in fns.items() if not k.endswith("+k")}
        ts: dict = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        base = statistics.median(ts["std"])
        cells = [f"{min(v) * 1e3:.1f}/{statistics.median(v) * 1e3:.1f} ({base / statistics.median(v):.2f}x)"
                 for v in ts.values()]
        cells += ["–"] * (4 - len(cells))
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
