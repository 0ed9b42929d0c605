"""FSGDM (Li et al., "On the Performance Analysis of Momentum Method: A Frequency Domain Perspective",
ICLR 2025) against SGD with momentum on sklearn's bundled digits (8 × 8 images, no download).

Data: load_digits (1797 images) split 1147 train / 200 validation / 450 test (fixed split), pixels / 16.
Models: an MLP 64-256-256-10 (ReLU) and a small CNN (conv 3×3 1→16, conv 3×3 16→32, 2×2 max-pool,
fc 512→64→10). Both optimizers: batch 32, cosine lr schedule to 0 over the run, weight decay 5e-4 (FSGDM's
default, given to SGD too). SGD: momentum 0.9 (torch convention, no dampening). FSGDM: the defaults of the
official code (c = 0.033, v = 1, 300 stages, fewer if the run is shorter) with sigma = the total number of steps. lr tuned per method
and model over a grid on the mean validation accuracy of all seeds; the table reports the test
accuracy and test loss at the chosen lr.

    python examples/research/fsgdm_digits.py --quick   # ~1 min: 8 epochs, 2 lrs, 2 seeds
    python examples/research/fsgdm_digits.py           # the committed run
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import common
from common import Timer, fmt_ms, grid_note, mean_std, savefig

NAME = "fsgdm_digits"
GRID = [0.003, 0.01, 0.03, 0.1, 0.3]


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--epochs", type=int, help="epochs (default 30; quick 8)")
    return p.parse_args(argv)


def digits():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return (X[:1147], y[:1147]), (X[1147:1347], y[1147:1347]), (X[1347:], y[1347:])


def make_model(kind):
    if kind == "MLP":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))


@torch.no_grad()
def evaluate(model, X, y):
    out = model(X)
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


def run_one(method, kind, lr, seed, epochs, data, batch=32):
    import momentum_fused as mf
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data
    torch.manual_seed(seed)
    model = make_model(kind)
    steps = epochs * ((len(Xtr) + batch - 1) // batch)
    if method == "SGD-momentum":
        opt = mf.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = mf.FSGDM(model.parameters(), lr=lr, weight_decay=5e-4, sigma=steps, n_stages=min(300, steps))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(100 + seed)
    curve = []
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        tot = 0.0
        for i in range(0, len(Xtr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        curve.append([tot / len(Xtr), *evaluate(model, Xte, yte)])
    va, _ = evaluate(model, Xva, yva)
    te, tl = evaluate(model, Xte, yte)
    return dict(val_acc=va, test_acc=te, test_loss=tl, train_loss=curve[-1][0], curve=curve)


def run(args):
    epochs = args.epochs or (8 if args.quick else 30)
    nseeds = args.seeds or (2 if args.quick else 5)
    grid = [0.01, 0.1] if args.quick else GRID
    data = digits()
    t = Timer()
    out = dict(epochs=epochs, seeds=nseeds, grid=grid, results={})
    for kind in ("MLP", "CNN"):
        for method in ("SGD-momentum", "FSGDM"):
            per_lr = {}
            for lr in grid:
                per_lr[lr] = [run_one(method, kind, lr, s, epochs, data) for s in range(nseeds)]
                print(f"  {kind} {method:12s} lr {lr:<6g}: val {mean_std([r['val_acc'] for r in per_lr[lr]])[0]:.4f} "
                      f"test {mean_std([r['test_acc'] for r in per_lr[lr]])[0]:.4f} ({t})", flush=True)
            best = max(grid, key=lambda lr: mean_std([r["val_acc"] for r in per_lr[lr]])[0])
            out["results"][f"{kind}|{method}"] = dict(
                best_lr=best, runs=per_lr[best],
                tune={str(lr): dict(val=mean_std([r["val_acc"] for r in rs])[0],
                                    test=mean_std([r["test_acc"] for r in rs])[0]) for lr, rs in per_lr.items()})
    out["cpu_seconds"] = t.cpu()
    print(f"done: {t}")
    return out


def report(res):
    lines = [f"{res['epochs']} epochs, {res['seeds']} seeds, lr grid {{{', '.join(f'{x:g}' for x in res['grid'])}}} "
             "(chosen on mean validation accuracy).", "",
             "| model | optimizer | best lr | test acc. (mean ± std [min, max]) | test loss | final train loss |",
             "|---|---|---|---|---|---|"]
    for key, d in res["results"].items():
        kind, method = key.split("|")
        rs = d["runs"]
        lines.append(f"| {kind} | {method} | {grid_note(res['grid'], d['best_lr'])} | "
                     f"{fmt_ms([r['test_acc'] for r in rs], 4, pct=True)} | {fmt_ms([r['test_loss'] for r in rs], 3)} | "
                     f"{fmt_ms([r['train_loss'] for r in rs], 4)} |")
    lines += ["", "Mean validation / test accuracy per lr:", "",
              "| model | optimizer | " + " | ".join(f"lr {x:g}" for x in res["grid"]) + " |",
              "|---|---|" + "---|" * len(res["grid"])]
    for key, d in res["results"].items():
        kind, method = key.split("|")
        lines.append(f"| {kind} | {method} | " + " | ".join(
            f"{100 * d['tune'][str(lr)]['val']:.1f} / {100 * d['tune'][str(lr)]['test']:.1f}" for lr in res["grid"]) + " |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for j, kind in enumerate(("MLP", "CNN")):
        for method, c in (("SGD-momentum", "C0"), ("FSGDM", "C3")):
            d = res["results"][f"{kind}|{method}"]
            ep = list(range(1, len(d["runs"][0]["curve"]) + 1))
            for k, r in enumerate(d["runs"]):
                ax[j].plot(ep, [x[0] for x in r["curve"]], color=c, alpha=0.6,
                           label=f"{method} lr={d['best_lr']:g}: train loss" if k == 0 else None)
                ax[j].plot(ep, [x[2] for x in r["curve"]], "--", color=c, alpha=0.6,
                           label=f"{method}: test loss" if k == 0 else None)
        ax[j].set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title=f"digits {kind} (one line per seed)")
        ax[j].legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


def main(argv=None):
    return common.run_main(parse_args(argv), NAME, run, report, plot)


if __name__ == "__main__":
    main()
