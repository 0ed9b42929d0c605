"""int8_state against fp32 state on two small trainings (docs/algorithms.md §11): AdamW.

- digits: sklearn's bundled digits (no download), the MLP 64-256-256-10 of examples/research/fsgdm_digits.py
  (its data split), AdamW lr 1e-3, weight decay 0.01, batch 32; train loss per epoch, final test loss and
  accuracy.
- charlm: examples/train_charlm.py (--size small by default), AdamW lr 3e-3, weight decay 0.1, cosine
  schedule; validation loss curve.

Run: ``python bench/int8_accuracy.py [--epochs 20] [--seeds 5] [--charlm-steps 300] [--charlm-size small]
[--plot docs/img/int8_accuracy.png] [--torchao] [--ablation] [--sr-seeds 1,2,3] [--lr-scales 0.995,1.005]``
(``--torchao``: the digits runs of torchao's AdamW8bit too, for comparison; ``--ablation``: a sensitivity floor and
which state's map costs what; ``--sr-seeds``: int8_sr with other random streams; ``--lr-scales``: fp32 state with a
scaled lr, the train loss's sensitivity to the step size).

Every layout sees the same data order and init per seed; the difference is the state storage alone. Four runs per
seed: fp32 state on the reference backend (the baseline), ``int8_state`` and ``int8_sr`` (the same codes rounded
stochastically, ``sr_seed`` 0) on the reference backend, and fp32 state on the compiled cpu backend (when built) as
the noise floor: the same fp32 algorithm whose arithmetic differs from
the reference's only in the last bits (FMA contraction, division by reciprocal), which shows how far a final loss
moves from round-off alone. A relative difference of the final loss is compared with that floor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import momentum_fused as mf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "examples"), os.path.join(HERE, "..", "examples", "research")]

# (label, layout, backend)
RUNS = [("fp32 state", "native", "reference"), ("int8_state", "int8_state", "reference"),
        ("int8_sr (stochastic codes)", "int8_sr", "reference"),
        ("fp32 state, cpu backend (round-off floor)", "native", "cpu")]


class _QuantizedAdamW(torch.optim.Optimizer):
    """The ablation of ``--ablation``: torch.optim.AdamW's update in fp32 (torch's formula), where after each step the
    first moment (``which`` holds "m"), the second ("v") or both of every tensor that int8_state quantizes are
    replaced by their int8 round trip (layouts.int8_encode / int8_decode: the same map, blocks and scales). With both
    it is int8_state's arithmetic up to the order of fp32 operations; with one, the cost of that state's map alone."""

    def __init__(self, params, which, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.which = which

    @torch.no_grad()
    def step(self):
        from momentum_fused import layouts
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["step"] += 1
                t, m, v, g = st["step"], st["m"], st["v"], p.grad
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                if layouts.int8_quantized(p):
                    for name, signed in (("m", True), ("v", False)):
                        if name in self.which:
                            st[name].copy_(layouts.int8_decode(*layouts.int8_encode(st[name], signed), signed))


def digits_run(layout, backend, seed, epochs, data, lr_scale=1.0, sr_seed=0):
    """(train loss after each epoch, final test accuracy, final test loss). backend "torchao": torchao's AdamW8bit (a peer, not this
    project's: its own 8-bit maps; block 256, tensors of >= 4096 elements quantized, as int8_state); backend
    "ablation": ``_QuantizedAdamW`` with ``layout`` the states it round-trips ("", "m", "v", "mv")."""
    from fsgdm_digits import make_model
    (Xtr, ytr), _, (Xte, yte) = data
    torch.manual_seed(seed)
    model = make_model("MLP")
    if backend == "torchao":
        from torchao.optim import AdamW8bit
        opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    elif backend == "ablation":
        opt = _QuantizedAdamW(model.parameters(), layout, lr=1e-3 * lr_scale, weight_decay=0.01)
    else:
        opt = mf.AdamW(model.parameters(), lr=1e-3 * lr_scale, weight_decay=0.01, layout=layout, backend=backend,
                       sr_seed=sr_seed)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            curve.append(float(loss_fn(model(Xtr), ytr)))
    with torch.no_grad():
        out = model(Xte)
        acc, test_loss = float((out.argmax(1) == yte).float().mean()), float(loss_fn(out, yte))
    return curve, acc, test_loss


def _rel(a, b):
    return (a - b) / b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--charlm-steps", type=int, default=300)
    ap.add_argument("--charlm-size", default="small")
    ap.add_argument("--plot", default=None, help="write the loss curves to this PNG (needs matplotlib)")
    ap.add_argument("--torchao", action="store_true",
                    help="digits: add torchao's AdamW8bit (pip install --no-deps torchao; no dependency of this project)")
    ap.add_argument("--ablation", action="store_true",
                    help="digits: also a sensitivity floor (fp32 state, lr x (1 + 1e-6)) and torch's AdamW formula with "
                         "m, v or both round-tripped through the int8 map after each step (which state costs what)")
    ap.add_argument("--lr-scales", default="",
                    help="digits: also fp32 state with lr times each of these factors (comma-separated, e.g. "
                         "0.995,1.005): how far the train loss moves with the effective step size, to read the "
                         "layouts' differences against")
    ap.add_argument("--sr-seeds", default="",
                    help="digits: also int8_sr with each of these sr_seed values (comma-separated; cpu backend when "
                         "built), to see how much the random stream moves the result")
    args = ap.parse_args(argv)
    if args.torchao:  # (checked before the runs: the import error came after all the others had run)
        import importlib.util
        if importlib.util.find_spec("torchao") is None:
            ap.error("--torchao needs torchao (pip install --no-deps torchao; no dependency of this project)")
    torch.set_num_threads(1)
    runs = [r for r in RUNS if r[2] in mf.backends.available()]
    sr_seed = {}
    for k in [int(x) for x in args.sr_seeds.split(",") if x.strip()]:
        be = "cpu" if "cpu" in mf.backends.available() else "reference"
        runs.append((f"int8_sr, sr_seed {k} ({be} backend)", "int8_sr", be))
        sr_seed[runs[-1][0]] = k
    if args.torchao:
        runs.append(("torchao AdamW8bit (peer)", None, "torchao"))
    scale = {}
    for f in [float(x) for x in args.lr_scales.split(",") if x.strip()]:
        runs.append((f"fp32 state, lr x {f!r}", "native", "reference"))
        scale[runs[-1][0]] = f
    if args.ablation:
        runs += [("fp32 state, lr x (1 + 1e-6) (sensitivity floor)", "native", "reference")]
        scale[runs[-1][0]] = 1 + 1e-6
        runs += [(f"ablation: {what}", which, "ablation") for what, which in (
            ("torch's AdamW formula, fp32 state", ""), ("m round-tripped through int8", "m"),
            ("v round-tripped through int8", "v"), ("m and v round-tripped", "mv"))]
    from fsgdm_digits import digits
    data = digits()
    dig = {label: [digits_run(lay, be, s, args.epochs, data, scale.get(label, 1.0), sr_seed.get(label, 0))
                   for s in range(args.seeds)] for label, lay, be in runs}
    base = dig[RUNS[0][0]]
    print(f"digits MLP, AdamW lr 1e-3, {args.epochs} epochs, {args.seeds} seeds: final train loss, test accuracy, "
          "test loss, relative difference of the final train loss (rel) and of the test loss (trel) to fp32 state "
          "(per seed, then the mean and max |.|)")
    for label, rows in dig.items():
        rel = [_rel(r[0][-1], b[0][-1]) for r, b in zip(rows, base)]
        trel = [_rel(r[2], b[2]) for r, b in zip(rows, base)]
        print(f"  {label}:\n    loss " + " ".join(f"{r[0][-1]:.4f}" for r in rows)
              + f"  mean {statistics.mean(r[0][-1] for r in rows):.4f}\n    acc  "
              + " ".join(f"{r[1]:.4f}" for r in rows) + f"  mean {statistics.mean(r[1] for r in rows):.4f}"
              + "\n    rel  " + " ".join(f"{x:+.2%}" for x in rel)
              + f"  mean {statistics.mean(rel):+.2%}  max |.| {max(map(abs, rel)):.2%}"
              + "\n    test " + " ".join(f"{r[2]:.4f}" for r in rows) + f"  mean {statistics.mean(r[2] for r in rows):.4f}"
              + "\n    trel " + " ".join(f"{x:+.2%}" for x in trel)
              + f"  mean {statistics.mean(trel):+.2%}  max |.| {max(map(abs, trel)):.2%}")
    lm = {}
    if args.charlm_steps:
        from train_charlm import train
        for label, lay, be in [r for r in runs if r[2] not in ("torchao", "ablation") and r[0] not in sr_seed]:
            lm[label] = [train(opt="AdamW", opt_kwargs={"lr": 3e-3 * scale.get(label, 1.0), "weight_decay": 0.1,
                                                        "layout": lay, "backend": be},
                               steps=args.charlm_steps, size=args.charlm_size, seed=s) for s in range(args.seeds)]
        lbase = lm[RUNS[0][0]]
        print(f"charlm {args.charlm_size}, AdamW lr 3e-3 wd 0.1, {args.charlm_steps} steps: final val loss, "
              "relative difference to fp32 state")
        for label, rows in lm.items():
            rel = [_rel(r["final_val"], b["final_val"]) for r, b in zip(rows, lbase)]
            print(f"  {label}:\n    val  " + " ".join(f"{r['final_val']:.4f}" for r in rows)
                  + f"  mean {statistics.mean(r['final_val'] for r in rows):.4f}\n    rel  "
                  + " ".join(f"{x:+.2%}" for x in rel) + f"  mean {statistics.mean(rel):+.2%}  max |.| "
                  + f"{max(map(abs, rel)):.2%}")
    if args.plot:
        _plot(args, dig, lm)
    return 0


def _plot(args, dig, lm):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if lm else 1, figsize=(11 if lm else 6, 4), squeeze=False)
    ax = axes[0][0]
    for label, rows in dig.items():
        mean = [statistics.mean(c) for c in zip(*(r[0] for r in rows))]
        ax.plot(range(1, len(mean) + 1), mean, label=label, ls="--" if "floor" in label else "-")
    ax.set(yscale="log", xlabel="epoch", ylabel="train loss (mean over seeds)",
           title=f"digits MLP, AdamW, {args.seeds} seeds")
    ax.legend(fontsize=8)
    if lm:
        ax = axes[0][1]
        for label, rows in lm.items():
            steps = [s for s, _ in rows[0]["val"]]
            mean = [statistics.mean(v for _, v in vals) for vals in zip(*(r["val"] for r in rows))]
            ax.plot(steps, mean, label=label, ls="--" if "floor" in label else "-")
        ax.set(xlabel="step", ylabel="validation loss (mean over seeds)",
               title=f"char-LM ({args.charlm_size}), AdamW, {args.seeds} seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    raise SystemExit(main())
