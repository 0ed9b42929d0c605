"""Accuracy of the Newton-Schulz forms in bf16 against the float64 standard NS with the same coefficients
(docs/muon.md, "Gram form"): the standard form (torch's iteration) and the Gram form with several restart
choices, on Gaussian matrices, low-rank + noise matrices and real Muon momentum buffers (the char-LM of
examples/research/muon_charlm.py after a few steps), at aspect ratios 1-4, for torch's coefficients and
Polar Express.

    python -m bench.muon_gram_accuracy                  # the table of docs/muon.md (~3 min on 2 cores)
    python -m bench.muon_gram_accuracy --steps 8        # longer schedules (the restart period)

Per case and form: the relative Frobenius error ||Y - Y64||_F / ||Y64||_F (the max over the matrices of the
case), the max elementwise |Y - Y64| divided by max |Y64|, and the singular values of Y (min-max over the
case; Y64's in the first column). "ratio": the form's relative error over the standard form's."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from momentum_fused.reference import newton_schulz
from momentum_fused.specs_muon import DEFAULT_NS_COEFFICIENTS, gram_restarts, ns_schedule

M = 256  # the short side of the synthetic matrices


def synthetic(r: int, n: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + r)
    k = M * r
    gauss = torch.randn(n, M, k, generator=gen, dtype=torch.float64)
    u = torch.randn(n, M, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(n, 8, k, generator=gen, dtype=torch.float64)
    low = u @ v
    noise = torch.randn(n, M, k, generator=gen, dtype=torch.float64)
    low = low + 0.01 * noise * low.norm(dim=(-2, -1), keepdim=True) / noise.norm(dim=(-2, -1), keepdim=True)
    return {"gaussian": gauss, "low-rank+noise": low}


def momentum_buffers(steps: int = 20, seed: int = 0) -> dict:
    """{aspect ratio: [n, A, B] stack} of the Muon momentum buffers of the char-LM ("default" size, d 128) after
    ``steps`` steps of momentum_fused.Muon (lr 0.02, the example's settings); ratio 2 is the top half of fc."""
    here = os.path.dirname(os.path.abspath(__file__))
    for p in (os.path.join(here, "..", "examples"), os.path.join(here, "..", "examples", "research")):
        sys.path.insert(0, os.path.abspath(p))
    import muon_charlm as ex
    from torch.nn import functional as F

    import momentum_fused as mf
    model, ctx = ex.make_model("default", seed)
    hidden, other = ex.split_params(model)
    opt = mf.Muon([dict(params=hidden, lr=0.02, weight_decay=0.1),
                   dict(params=other, use_muon=False, lr=3e-3, weight_decay=0.1)])
    d = ex.data()
    gen = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(steps):
        x, y = d.batch(d.train, 32, ctx, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    by_shape: dict = {}
    for p in hidden:
        by_shape.setdefault(tuple(p.shape), []).append(opt.state[p]["momentum_buffer"].double())
    out = {}
    for shape, bufs in by_shape.items():
        r = max(shape) // min(shape)
        out.setdefault(r, []).extend(bufs if shape[0] <= shape[1] else [b.T for b in bufs])
        if r == 4 and shape[0] > shape[1]:  # (4d, d) fc: its top half is a (2d, d) matrix
            out.setdefault(2, []).extend(b[: shape[0] // 2].T for b in bufs)
    return {r: torch.stack(v) for r, v in sorted(out.items())}


def stats(y, ref):
    y = y.double()
    if not torch.isfinite(y).all():  # (a Gram form without restarts can overflow)
        return float("inf"), float("inf"), (float("nan"), float("nan"))
    rel = ((y - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()
    elem = ((y - ref).abs().amax() / ref.abs().amax()).item()
    sv = torch.linalg.svdvals(y)
    return rel, elem, (sv.min().item(), sv.max().item())


def run(steps: int, variants: dict) -> list:
    cases = []
    for r in (1, 2, 3, 4):
        for name, x in synthetic(r).items():
            cases.append((name, r, x))
    for r, x in momentum_buffers().items():
        cases.append(("momentum (char-LM)", r, x))
    rows = []
    for sname, coef in (("torch", DEFAULT_NS_COEFFICIENTS), ("polar_express", "polar_express")):
        sch = ns_schedule(dict(ns_coefficients=coef, ns_steps=steps))
        for name, r, x in cases:
            ref = newton_schulz(x, sch, 1e-7, torch.float64)
            sv64 = torch.linalg.svdvals(ref)
            f64gram = stats(newton_schulz(x, sch, 1e-7, torch.float64, gram=True, restarts=()), ref)[0]
            std = stats(newton_schulz(x, sch, 1e-7, torch.bfloat16), ref)
            row = dict(schedule=sname, input=name, ratio=r, n=x.shape[0], shape=tuple(x.shape[1:]),
                       sv64=(sv64.min().item(), sv64.max().item()), f64_gram_vs_std=f64gram, standard=std)
            for vname, rs in variants.items():
                row[vname] = stats(newton_schulz(x, sch, 1e-7, torch.bfloat16, gram=True, restarts=rs), ref)
            rows.append(row)
            print(f"{sname:13s} {name:18s} r={r} std {std[0]:.4f} " + " ".join(
                f"{v}:{row[v][0] / std[0]:.2f}" for v in variants) + f" (f64 gram vs std {f64gram:.1e})",
                file=sys.stderr, flush=True)
    return rows


def markdown(rows: list, variants: dict) -> str:
    vn = list(variants)
    head = ("| schedule | input | A x B (n) | sv of Y64 | standard bf16: rel / max-elem / sv | "
            + " | ".join(f"gram {v}: rel (ratio) / max-elem / sv" for v in vn) + " |")
    lines = [head, "|" + "---|" * (5 + len(vn))]
    f = lambda s: f"{s[0]:.4f} / {s[1]:.3f} / {s[2][0]:.2f}-{s[2][1]:.2f}"  # noqa: E731
    for r in rows:
        cells = [r["schedule"], r["input"], f"{r['shape'][0]} x {r['shape'][1]} ({r['n']})",
                 f"{r['sv64'][0]:.2f}-{r['sv64'][1]:.2f}", f(r["standard"])]
        for v in vn:
            s = r[v]
            cells.append(f"{s[0]:.4f} ({s[0] / r['standard'][0]:.2f}) / {s[1]:.3f} / {s[2][0]:.2f}-{s[2][1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(r["f64_gram_vs_std"] for r in rows)
    lines.append(f"\nfloat64 Gram form (no restart) vs float64 standard form: max relative error {worst:.1e}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.muon_gram_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    variants = {"no restart": (), "restart@2": (2,), "restart@1": (1,), "restart@2,4": (2, 4)}
    if args.steps != 5:
        variants = {"no restart": (), "restart@2,4,6..": tuple(range(2, args.steps, 2)),
                    "restart@2,5,..": tuple(range(2, args.steps, 3))}
    if gram_restarts(args.steps) not in variants.values():
        variants["default"] = gram_restarts(args.steps)
    print(markdown(run(args.steps, variants), variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
