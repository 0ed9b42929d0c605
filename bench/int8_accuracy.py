"""int8_state against fp32 state on two small trainings (docs/algorithms.md §11): AdamW, reference backend.

- digits: sklearn's bundled digits (no download), the MLP 64-256-256-10 of examples/research/fsgdm_digits.py
  (its data split), AdamW lr 1e-3, weight decay 0.01, batch 32; final train loss and test accuracy.
- charlm: examples/train_charlm.py (--size small by default), AdamW lr 3e-3, weight decay 0.1, cosine
  schedule; final validation loss.

Run: ``python bench/int8_accuracy.py [--epochs 20] [--seeds 3] [--charlm-steps 300] [--charlm-size small]``.
Both layouts see the same data order and init per seed; the difference is the state storage alone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import momentum_fused as mf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "examples"), os.path.join(HERE, "..", "examples", "research")]


def digits_run(layout, seed, epochs, data):
    from fsgdm_digits import make_model
    (Xtr, ytr), _, (Xte, yte) = data
    torch.manual_seed(seed)
    model = make_model("MLP")
    opt = mf.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, layout=layout, backend="reference")
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        train_loss = float(loss_fn(model(Xtr), ytr))
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    return train_loss, acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--charlm-steps", type=int, default=300)
    ap.add_argument("--charlm-size", default="small")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fsgdm_digits import digits
    data = digits()
    print(f"digits MLP, AdamW lr 1e-3, {args.epochs} epochs:  layout  train loss  test acc  (per seed)")
    for layout in ("native", "int8_state"):
        rows = [digits_run(layout, s, args.epochs, data) for s in range(args.seeds)]
        print(f"  {layout:10s} " + "  ".join(f"{a:.4f} {b:.4f}" for a, b in rows)
              + f"   mean loss {sum(a for a, _ in rows) / len(rows):.4f}")
    if args.charlm_steps:
        from train_charlm import train
        print(f"charlm {args.charlm_size}, AdamW lr 3e-3 wd 0.1, {args.charlm_steps} steps: final val loss")
        for layout in ("native", "int8_state"):
            vals = [train(opt="AdamW", opt_kwargs={"lr": 3e-3, "weight_decay": 0.1, "layout": layout,
                                                   "backend": "reference"},
                          steps=args.charlm_steps, size=args.charlm_size, seed=s)["final_val"]
                    for s in range(args.seeds)]
            print(f"  {layout:10s} " + " ".join(f"{v:.4f}" for v in vals) + f"   mean {sum(vals) / len(vals):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
