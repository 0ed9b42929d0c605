"""The Newton-Schulz phase alone, per shape: torch's products against the symmetric-product kernel (the CPU one,
csrc/cpu/cpu_symmm.cpp; on CUDA the Triton one, triton_kernels/symmm.py), in the standard and the Gram form, side by
side (interleaved repetitions; min and median ms; ratio = the standard form's median / this).

    python -m bench.muon_ns_shapes --threads 2            # 6 matrices of each shape of the bench_muon stack (d=384)
    python -m bench.muon_ns_shapes --device cuda --d 1024 --batch 12   # cuBLAS vs the Triton kernel (a GPU lend)

What it decides: where "auto" should take the Gram form (specs_muon.GRAM_MIN_ASPECT), what the CPU kernel gains per
shape (docs/muon.md, "Symmetric products"), and whether the Triton kernel beats cuBLAS (it is opt-in,
MOMENTUM_FUSED_TRITON_SYMMM=1, until this says so on a GPU)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from momentum_fused._backend_cpu import symmetric_product
from momentum_fused.reference import newton_schulz
from momentum_fused.specs_muon import DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS, gram_restarts


def _shapes(d: int) -> tuple:
    return ((d, d), (2 * d, d), (3 * d, d), (4 * d, d), (d, 4 * d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--d", type=int, default=384, help="the model width: shapes (d, d), (2d, d), (3d, d), (4d, d), "
                                                      "(d, 4d) (default 384, bench_muon's stack)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here")
        from momentum_fused.triton_kernels.symmm import config, symmetric_baddbmm
        sym, what = symmetric_baddbmm, f"Triton (BLOCK x BLOCK_K x warps {config()}) vs cuBLAS"
    else:
        sym = symmetric_product()
        what = "the CPU kernel" if sym else "no (torch products only)"
    schedule = [DEFAULT_NS_COEFFICIENTS] * DEFAULT_NS_STEPS
    restarts = gram_restarts(len(schedule))
    print(f"Newton-Schulz in bf16 on {args.device}, {args.batch} matrices per shape, {torch.get_num_threads()} threads, "
          f"{args.reps} repetitions; kernel: {what}\n")
    print("| shape | " + " | ".join(["standard", "standard + kernel", "Gram", "Gram + kernel"]) + " |")
    print("|---|---|---|---|---|")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for shape in _shapes(args.d):
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).to(args.device)
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
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                ts[k].append(time.perf_counter() - t0)
        base = statistics.median(ts["std"])
        cells = [f"{min(v) * 1e3:.1f}/{statistics.median(v) * 1e3:.1f} ({base / statistics.median(v):.2f}x)"
                 for v in ts.values()]
        cells += ["–"] * (4 - len(cells))
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
