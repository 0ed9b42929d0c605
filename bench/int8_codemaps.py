"""Evidence for the code map of the planned ``int8_state`` layout (docs/algorithms.md §11, issue 17).

Block-wise 8-bit optimizer state: each block of 256 consecutive elements of a state tensor keeps one fp32
scale (its absmax) and one 8-bit code per element. The candidates for the code map (code -> value in
[-1, 1], or [0, 1] for the unsigned second moment):

- ``dynamic``: the dynamic tree map of bitsandbytes / torchao AdamW8bit (Dettmers et al.), re-implemented
  here: for exponent level i = 0..6, the midpoints of linspace(0.1, 1, k + 1) times 10^(i - 6), with
  k = 2^i values per sign (signed map) or k = 2^(i+1) (unsigned map), plus 0 and 1.
- ``sqrt``: sign / square-root companding: value = sign(c) (|c| / 127)^2 (signed, c = -127..127) and
  (c / 255)^2 (unsigned, c = 0..255): a code is the rounded square root of the normalized value.
- ``sqrt-v4``: as ``sqrt`` for m, and (c / 255)^4 for v (a code is the rounded fourth root): the chosen map,
  ``momentum_fused.layouts.int8_table`` (the run checks that ``layouts.int8_encode`` gives the same codes but
  for rare one-code differences next to a midpoint: the spec decides in the map's integer space).
- ``minifloat``: 8-bit floats normalized to a largest value of 1, E4M3 (signed) for m and E5M3 for v: a
  candidate whose encode would be bit arithmetic (``minifloat_map``); ``e4m3-v4`` and ``e3m4-v4``: a minifloat
  for m only, the chosen map for v.

Encode (every map; the form docs/algorithms.md §11 used until 2026-12-04, when the spec moved to the map's
integer space, with the same codes but within a few ulps of a midpoint): x / scale (fp32 division; an all-zero
block has scale 0 and codes of the value 0), then the nearest value of the map; a value exactly halfway between
two map values takes the lower one (``torch.bucketize`` on the fp32 midpoints, right=False). Decode: map value
times the scale.

Run: ``python bench/int8_codemaps.py --seeds 5`` (the table of docs/algorithms.md §11; the default is 3 seeds)
(CPU, under a minute): AdamW for 30 steps, every candidate against the same
loop with fp32 state, on (A) a small MLP regression and (B) a noisy separable quadratic whose curvatures span
six decades inside every block (the second moment's range within a block is what breaks a coarse v map);
prints the relative error of the parameter change, the largest element error in units of lr * steps (an element
whose v decodes to 0 takes steps of m / eps) and the final losses.
"""
from __future__ import annotations

import argparse

import torch

from momentum_fused import layouts

BLOCK = layouts.INT8_BLOCK


def dynamic_map(signed: bool) -> torch.Tensor:
    vals = [0.0, 1.0]
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        vals += mids
        if signed:
            vals += [-v for v in mids]
    assert len(vals) == 256, len(vals)
    return torch.tensor(sorted(vals), dtype=torch.float64).float()


def power_map(signed: bool, power: float) -> torch.Tensor:
    if signed:
        c = torch.arange(-127, 128, dtype=torch.float64)
        v = c.sign() * (c.abs() / 127) ** power
        v = torch.cat([v, torch.tensor([1.0], dtype=torch.float64)])  # 256 entries: 1.0 twice (unused code)
    else:
        v = (torch.arange(256, dtype=torch.float64) / 255) ** power
    return v.sort().values.float()


def minifloat_map(signed: bool, mbits: int = 3) -> torch.Tensor:
    """An 8-bit float normalized to a largest value of 1: sign + (7 - mbits) exponent bits + mbits mantissa bits
    (E4M3 without infinities or NaN by default: 255 values, 16 binades) for m, (8 - mbits) exponent bits for v
    (E5M3: 256 values, 32 binades); subnormals below the smallest binade. Its encode is bit arithmetic on the fp32
    pattern (rounding the mantissa to mbits bits), no square root: a candidate for a cheaper kernel
    (docs/layouts.md)."""
    ebits = (7 if signed else 8) - mbits
    top, q = 2 ** ebits - 1, 2 ** mbits
    vals = [0.0] + [m / q * 2.0 ** (1 - top) for m in range(1, q)]  # subnormals
    vals += [(1 + m / q) * 2.0 ** (e - top) for e in range(1, top + 1) for m in range(q)]
    v = torch.tensor(vals, dtype=torch.float64) / vals[-1]
    if signed:
        v = torch.cat([-v.flip(0)[:-1], v, torch.tensor([1.0], dtype=torch.float64)])  # 256: 1.0 twice (unused)
    return v.sort().values.float()


MAPS = {
    "dynamic": (dynamic_map(True), dynamic_map(False)),
    "sqrt": (power_map(True, 2), power_map(False, 2)),
    "sqrt-v4": (layouts.int8_table(True), layouts.int8_table(False)),  # the chosen map (momentum_fused.layouts)
    "minifloat": (minifloat_map(True), minifloat_map(False)),  # E4M3 for m, E5M3 for v (a candidate)
    "e4m3-v4": (minifloat_map(True), layouts.int8_table(False)),  # E4M3 for m, the chosen map for v
    "e3m4-v4": (minifloat_map(True, 4), layouts.int8_table(False)),  # E3M4 for m, the chosen map for v
}


def encode(x: torch.Tensor, table: torch.Tensor):
    """fp32 tensor (numel a multiple of BLOCK) -> (uint8 codes, fp32 scale per block)."""
    b = x.float().reshape(-1, BLOCK)
    scale = b.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = b / safe[:, None]
    mids = ((table[1:].double() + table[:-1].double()) / 2).float()  # as momentum_fused.layouts
    codes = torch.bucketize(y, mids, right=False)
    return codes.to(torch.uint8), scale


def decode(codes: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, shape) -> torch.Tensor:
    return (table[codes.long()] * scale[:, None]).reshape(shape)


def adamw_run(params0, data, steps, maps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.01, model=None):
    """torch AdamW's update (fp32), the state of eligible tensors stored through ``maps`` (None: fp32)."""
    ps = [p.clone().requires_grad_() for p in params0]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    losses = []
    for t in range(1, steps + 1):
        x, y = data(t)
        loss = (model or mlp)(ps, x, y)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.mul_(1 - lr * wd)
                m[i].lerp_(g, 1 - betas[0])
                v[i].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
                denom = (v[i].sqrt() / bc2 ** 0.5).add_(eps)
                p.addcdiv_(m[i], denom, value=-lr / bc1)
                if maps is not None and p.numel() >= 4096 and p.numel() % BLOCK == 0:
                    sm, um = maps
                    m[i] = decode(*encode(m[i], sm), sm, p.shape)
                    v[i] = decode(*encode(v[i], um), um, p.shape)
    return [p.detach() for p in ps], losses


def mlp(ps, x, y):
    w1, b1, w2, b2 = ps
    h = torch.nn.functional.gelu(x @ w1 + b1)
    return ((h @ w2 + b2 - y) ** 2).mean()


def quadratic(ps, x, y):
    """0.5 sum h (p - target)^2 + <noise, p>: x = (h, target), y = the step's noise."""
    h, target = x
    return 0.5 * (h * (ps[0] - target) ** 2).sum() + (y * ps[0]).sum()


def report(title, res, lr, steps):
    print(title)
    print(f"{'map':10s} {'rel err':>10s} {'max err/(lr*steps)':>20s} {'final loss':>12s} {'fp32 loss':>12s}")
    for name, rows in res.items():
        n = len(rows)
        print(f"{name:10s} {sum(r[0] for r in rows) / n:10.2e} {max(r[1] for r in rows) / (lr * steps):20.2e} "
              f"{sum(r[2] for r in rows) / n:12.6f} {sum(r[3] for r in rows) / n:12.6f}")


def torchao_run(params0, data, steps, lr, model, wd=0.01):
    """torchao's AdamW8bit (block 256, dynamic maps, tensors under 4096 elements in fp32), when installed."""
    from torchao.optim import AdamW8bit
    ps = [p.clone().requires_grad_() for p in params0]
    opt = AdamW8bit(ps, lr=lr, weight_decay=wd)
    losses = []
    for t in range(1, steps + 1):
        x, y = data(t)
        opt.zero_grad()
        loss = model(ps, x, y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    return [p.detach() for p in ps], losses


def compare(params0, data, steps, lr, model, torchao=False):
    ref, ref_losses = adamw_run(params0, data, steps, None, lr=lr, model=model)
    d_ref = torch.cat([(r - p0).flatten() for r, p0 in zip(ref, params0)])
    out = {}
    runs = {name: (lambda maps=maps: adamw_run(params0, data, steps, maps, lr=lr, model=model))
            for name, maps in MAPS.items()}
    if torchao:
        runs["torchao"] = lambda: torchao_run(params0, data, steps, lr, model)
    for name, run in runs.items():
        got, losses = run()
        d = torch.cat([(g - p0).flatten() for g, p0 in zip(got, params0)])
        out[name] = (float((d - d_ref).norm() / d_ref.norm()), float((d - d_ref).abs().max()), losses[-1],
                     ref_losses[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-torchao", action="store_true", help="skip torchao's AdamW8bit even when installed")
    args = ap.parse_args(argv)
    have_torchao = False
    if not args.no_torchao:
        try:
            import importlib
            importlib.import_module("torchao.optim")
            have_torchao = True
        except Exception as e:  # not installed (it is no dependency of this project)
            print(f"torchao AdamW8bit not run: {type(e).__name__}: {e}")
    torch.set_num_threads(1)
    x = torch.randn(8 * BLOCK)
    for signed in (True, False):  # the spec's encoder and this script's agree on the chosen map (but next to a midpoint)
        v = x if signed else x * x
        diff = (layouts.int8_encode(v, signed)[0].long().flatten() + (127 if signed else 0)
                - encode(v, MAPS["sqrt-v4"][0 if signed else 1])[0].long().flatten())
        assert diff.abs().max() <= 1 and (diff != 0).sum() <= 2, diff.nonzero()
    res_a = {name: [] for name in [*MAPS, *(["torchao"] if have_torchao else [])]}
    res_b = {name: [] for name in res_a}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        params0 = [torch.randn(64, 256, generator=gen) / 8, torch.zeros(256), torch.randn(256, 64, generator=gen) / 16,
                   torch.zeros(64)]
        teacher = torch.randn(64, 64, generator=gen) / 8
        batches = {}

        def data(t):
            if t not in batches:
                g = torch.Generator().manual_seed(1000 * seed + t)
                x = torch.randn(128, 64, generator=g) * torch.exp(torch.randn(64, generator=g))  # uneven features
                batches[t] = (x, torch.tanh(x @ teacher))
            return batches[t]

        for name, row in compare(params0, data, args.steps, 1e-3, mlp, have_torchao).items():
            res_a[name].append(row)
        n = 1 << 16
        h = 10.0 ** (torch.rand(n, generator=gen) * 6 - 4)
        target = torch.randn(n, generator=gen)

        def noisy(t):
            g = torch.Generator().manual_seed(7000 * seed + t)
            return (h, target), 0.1 * h.sqrt() * torch.randn(n, generator=g)

        for name, row in compare([torch.zeros(n)], noisy, args.steps, 1e-2, quadratic, have_torchao).items():
            res_b[name].append(row)
    report(f"(A) MLP 64-256-64 regression (weights: 16384 elements, 64 blocks each), AdamW lr=1e-3 wd=0.01, "
           f"{args.steps} steps, {args.seeds} seeds", res_a, 1e-3, args.steps)
    report(f"(B) quadratic, 65536 elements, curvature 10^U(-4, 2), gradient noise, AdamW lr=1e-2 wd=0.01, "
           f"{args.steps} steps, {args.seeds} seeds", res_b, 1e-2, args.steps)
    print("rel err = ||dp_q - dp_fp32|| / ||dp_fp32|| (dp: change from the start; mean over seeds); max err: the "
          "largest element error (max over seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
