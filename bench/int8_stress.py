"""The largest one-step move of one element under the 8-bit layouts, with gradients spread over many decades
within a tensor (so within its 256-element blocks): AdamW, lr 1e-3, zero weight decay, 65,536 elements, each
element's gradient N(0, 1) times a fixed scale log-spaced over the decades and shuffled. fp32 state moves every
element by about lr at most; an 8-bit state whose v decodes far below its value moves an element by m̂ / √v̂.
Prints, per spread and layout, the largest |Δp| / lr over the steps and the stored (decoded) m and v of that
element. docs/algorithms.md §11 ("the floor") has the figures before and after the floor of 2026-12-06.

    python bench/int8_stress.py [--decades 4,6] [--steps 50] [--layouts native,int8_state,int8_sr]

Not a test: the figures depend on the draws; compare the rows of one run."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momentum_fused as mf  # noqa: E402
from momentum_fused import layouts  # noqa: E402

N, LR = 65536, 1e-3


def stored(st: dict, i: int) -> tuple[float, float]:
    """Element i's m and v as the next step reads them (decoded where the state is coded)."""
    if "exp_avg_scale" in st:
        m = layouts.int8_decode(st["exp_avg"], st["exp_avg_scale"], True).view(-1)[i]
        v = layouts.int8_decode(st["exp_avg_sq"], st["exp_avg_sq_scale"], False).view(-1)[i]
        return float(m), float(v)
    return float(st["exp_avg"].view(-1)[i]), float(st["exp_avg_sq"].view(-1)[i])


def worst_move(decades: float, layout: str, steps: int, backend: str) -> tuple[float, str]:
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-decades / 2, decades / 2, N)[torch.randperm(N, generator=gen)]
    p = torch.zeros(N, requires_grad=True)
    opt = mf.AdamW([p], lr=LR, weight_decay=0.0, layout=layout, backend=backend)
    worst, where = 0.0, ""
    for t in range(steps):
        before = p.detach().clone()
        p.grad = torch.randn(N, generator=gen) * scale
        opt.step()
        d = (p.detach() - before).abs()
        if float(d.max()) / LR > worst:
            i = int(d.argmax())
            m, v = stored(opt.state[p], i)
            worst = float(d.max()) / LR
            where = f"step {t}, element {i} (grad scale {float(scale[i]):.2g}): stored m {m:.3g}, v {v:.3g}"
    return worst, where


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decades", default="4,6")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layouts", default="native,int8_state,int8_sr")
    ap.add_argument("--backend", default=None, help="default: the one momentum_fused picks")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    for dec in (float(x) for x in args.decades.split(",")):
        for lay in args.layouts.split(","):
            w, where = worst_move(dec, lay, args.steps, args.backend)
            print(f"{dec:g} decades {lay:10s}: largest one-step |dp| = {w:10.4g} x lr  [{where}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
