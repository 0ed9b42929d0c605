"""The low-rank experiments of docs/lowrank.md (issue 6), on CPU.

1. Synthetic rank-r matrix regression: L(W) = ½ E_x ‖W x − M x‖² with x ~ N(0, I) (minibatches of
   64), whose rank-r minimiser is the truncated SVD M_r of M (Eckart–Young). torch.optim.SGD(momentum)
   and torch.optim.Adam applied naively to (U, S, V) as plain tensors, against LowRankSGD and
   LowRankAdam at the same fixed rank r. Each method gets its best learning rate from a small grid.
   Reported: the population loss ½‖W − M‖²_F − ½‖M − M_r‖²_F (excess over the rank-r optimum) and
   ‖W − M_r‖_F / ‖M_r‖_F, versus steps.
2. An MLP 64-256-256-10 on sklearn.datasets.load_digits (bundled with scikit-learn, no download):
   dense SGD / Adam against LowRankSGD / LowRankAdam (both hidden layers low-rank, the 10-way output
   layer dense) at several τ: test accuracy, final ranks and compression of the low-rank layers.

    python examples/lowrank_experiments.py            # ~17 min wall on 2 CPU cores (docs/lowrank.md)
    python examples/lowrank_experiments.py --quick    # < 60 s, fewer steps/seeds (a smoke run)

Writes lowrank_synthetic.png, lowrank_digits.png and lowrank_results.json to --out DIR (default: docs/img,
the committed plots; with --quick a new temporary directory) and prints the markdown tables used in
docs/lowrank.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch
from torch import nn

from momentum_fused.lowrank import LowRankAdam, LowRankLinear, LowRankSGD

torch.set_num_threads(1)  # tiny matrices: one thread is faster than oversubscribed ones


# ------------------------------------------------------------------ 1. synthetic
class Factored(nn.Module):
    """W = U S Vᵀ with U, S, V plain parameters (the naive baseline)."""

    def __init__(self, U, S, V):
        super().__init__()
        self.U, self.S, self.V = nn.Parameter(U.clone()), nn.Parameter(S.clone()), nn.Parameter(V.clone())

    @property
    def weight(self):
        return self.U @ self.S @ self.V.T

    def forward(self, x):
        return x @ self.weight.T


def synthetic_problem(m=60, n=50, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Uq = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    Vq = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    k = min(m, n)
    # a spread of scales inside the top r (ill-conditioned core: kappa = 100), then a small tail
    sig = torch.cat([torch.logspace(0, -2, r, dtype=torch.float64), 3e-3 * torch.rand(k - r, generator=g, dtype=torch.float64)])
    M = (Uq[:, :k] * sig) @ Vq[:, :k].T
    Mr = (Uq[:, :r] * sig[:r]) @ Vq[:, :r].T
    return M, Mr, float(0.5 * (sig[r:] ** 2).sum())


def run_synthetic(method, lr, steps, M, Mr, floor, r, seed=0, batch=64):
    m, n = M.shape
    torch.manual_seed(seed)
    layer = LowRankLinear(n, m, r, r, bias=False, dtype=torch.float64)
    with torch.no_grad():  # small random start
        layer.S.mul_(0.1 / layer.S.diagonal().max())
    if method in ("SGD-momentum on U,S,V", "Adam on U,S,V"):
        model = Factored(layer.U.detach(), layer.S.detach(), layer.V.detach())
        opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if method.startswith("SGD")
               else torch.optim.Adam(model.parameters(), lr=lr))
    else:
        model = layer
        opt = (LowRankSGD(model.parameters(), lr=lr, momentum=0.9, fixed_rank=True) if method == "LowRankSGD"
               else LowRankAdam(model.parameters(), lr=lr, fixed_rank=True))
    g = torch.Generator().manual_seed(seed + 1)
    excess, dist = [], []
    nMr = float(Mr.norm())
    for _ in range(steps):
        x = torch.randn(batch, n, generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss = 0.5 * ((model(x) - x @ M.T) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W = model.weight
            excess.append(float(0.5 * ((W - M) ** 2).sum()) - floor)
            dist.append(float((W - Mr).norm()) / nMr)
        if not math.isfinite(excess[-1]) or excess[-1] > 1e6:
            excess += [float("nan")] * (steps - len(excess))
            dist += [float("nan")] * (steps - len(dist))
            break
    return excess, dist


def experiment_synthetic(quick):
    steps = 200 if quick else 1500
    r = 5
    M, Mr, floor = synthetic_problem(r=r)
    grids = {"SGD-momentum on U,S,V": [0.01, 0.03, 0.1, 0.3], "LowRankSGD": [0.01, 0.03, 0.1, 0.3],
             "Adam on U,S,V": [1e-3, 3e-3, 1e-2, 3e-2], "LowRankAdam": [1e-3, 3e-3, 1e-2, 3e-2]}
    if quick:  # one learning rate each, from the full grid: SGD-momentum's full-run best; the others one grid step
        # above theirs (docs/lowrank.md: 0.01, 0.01 and 0.001)
        grids = {"SGD-momentum on U,S,V": [0.1], "LowRankSGD": [0.03], "Adam on U,S,V": [3e-3], "LowRankAdam": [3e-3]}
    out = {}
    for method, grid in grids.items():
        best = None
        for lr in grid:
            ex, di = run_synthetic(method, lr, steps, M, Mr, floor, r)
            tail = sum(ex[-max(1, steps // 10):]) / max(1, steps // 10)  # mean of the last 10%
            score = tail if math.isfinite(tail) else float("inf")
            if best is None or score < best[0]:
                best = (score, lr, ex, di)
        out[method] = dict(lr=best[1], excess=best[2], dist=best[3])
        print(f"  {method:24s} best lr {best[1]:g}: excess loss {best[2][-1]:.3e}, "
              f"‖W−M_r‖/‖M_r‖ {best[3][-1]:.3e}", flush=True)
    return dict(steps=steps, r=r, shape=list(M.shape), methods=out)


# ------------------------------------------------------------------ 2. digits
def digits_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return t((Xtr - mu) / sd), torch.tensor(ytr), t((Xte - mu) / sd), torch.tensor(yte)


def mlp(low_rank, seed, rank0=(32, 64), max_rank=(32, 128)):
    torch.manual_seed(seed)
    if not low_rank:
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(LowRankLinear(64, 256, rank0[0], max_rank[0]), nn.ReLU(),
                         LowRankLinear(256, 256, rank0[1], max_rank[1]), nn.ReLU(), nn.Linear(256, 10))


def train_digits(kind, tau, seed, epochs, data):
    Xtr, ytr, Xte, yte = data
    low = kind.startswith("LowRank")
    model = mlp(low, seed)
    if kind == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif kind == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif kind == "LowRankSGD":
        opt = LowRankSGD(model.parameters(), lr=0.05, momentum=0.9, tau=tau)
    else:
        opt = LowRankAdam(model.parameters(), lr=1e-3, tau=tau)
    g = torch.Generator().manual_seed(seed)
    lossf = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            lossf(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    dense_params = 64 * 256 + 256 * 256  # the two hidden weight matrices
    if low:
        ranks = [model[0].r, model[2].r]
        lr_params = sum(layer.r * (layer.in_features + layer.out_features) + layer.r ** 2 for layer in (model[0], model[2]))
    else:
        ranks, lr_params = [64, 256], dense_params
    return dict(acc=acc, ranks=ranks, compression=1.0 - lr_params / dense_params)


def experiment_digits(quick):
    data = digits_data()
    seeds = [0] if quick else [0, 1, 2]
    epochs = 8 if quick else 40
    taus = [0.1] if quick else [0.05, 0.1, 0.2, 0.3]
    runs = [("SGD", None), ("Adam", None)] + [(k, t) for k in ("LowRankSGD", "LowRankAdam") for t in taus]
    rows = []
    for kind, tau in runs:
        res = [train_digits(kind, tau, s, epochs, data) for s in seeds]
        accs = [x["acc"] for x in res]
        row = dict(kind=kind, tau=tau, acc_mean=sum(accs) / len(accs), acc_min=min(accs), acc_max=max(accs),
                   ranks=[x["ranks"] for x in res],
                   compression=sum(x["compression"] for x in res) / len(res))
        rows.append(row)
        print(f"  {kind:12s} tau={tau}: acc {row['acc_mean']:.4f} [{row['acc_min']:.4f}, {row['acc_max']:.4f}] "
              f"ranks {row['ranks']} compression {row['compression']:.3f}", flush=True)
    return dict(seeds=seeds, epochs=epochs, rows=rows)


# ------------------------------------------------------------------ plots and tables
def plot(syn, dig, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"SGD-momentum on U,S,V": ("C0", "--"), "LowRankSGD": ("C0", "-"),
              "Adam on U,S,V": ("C1", "--"), "LowRankAdam": ("C1", "-")}
    for name, res in syn["methods"].items():
        c, ls = styles[name]
        lab = f"{name} (lr {res['lr']:g})"
        ax[0].semilogy([max(v, 1e-16) for v in res["excess"]], color=c, ls=ls, label=lab)
        ax[1].semilogy(res["dist"], color=c, ls=ls, label=lab)
    ax[0].set(xlabel="step", ylabel="½‖W−M‖² − ½‖M−M_r‖²", title=f"rank-{syn['r']} regression {tuple(syn['shape'])}: excess loss")
    ax[1].set(xlabel="step", ylabel="‖W − M_r‖ / ‖M_r‖", title="distance to the Eckart–Young optimum")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lowrank_synthetic.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, c in (("SGD", "C0"), ("Adam", "C1")):
        d = [r for r in dig["rows"] if r["kind"] == kind][0]
        ax.axhline(100 * d["acc_mean"], color=c, ls="--", label=f"dense {kind}")
        lr_rows = [r for r in dig["rows"] if r["kind"] == f"LowRank{kind}"]
        ax.plot([100 * r["compression"] for r in lr_rows], [100 * r["acc_mean"] for r in lr_rows], "o-", color=c,
                label=f"LowRank{kind} (τ = {', '.join(str(r['tau']) for r in lr_rows)})")
        for r in lr_rows:
            ax.annotate(f"τ={r['tau']}", (100 * r["compression"], 100 * r["acc_mean"]), fontsize=7)
    ax.set(xlabel="compression of the hidden layers (%)", ylabel="test accuracy (%)",
           title=f"MLP on load_digits, mean of {len(dig['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lowrank_digits.png"), dpi=110)
    plt.close(fig)


def tables(syn, dig):
    lines = ["| method | best lr | excess loss (final) | ‖W−M_r‖/‖M_r‖ (final) |", "|---|---|---|---|"]
    for name, res in syn["methods"].items():
        lines.append(f"| {name} | {res['lr']:g} | {res['excess'][-1]:.2e} | {res['dist'][-1]:.2e} |")
    lines += ["", "| optimizer | τ | test acc. (mean [min, max]) | final ranks per seed | compression |",
              "|---|---|---|---|---|"]
    for r in dig["rows"]:
        tau = "—" if r["tau"] is None else r["tau"]
        lines.append(f"| {r['kind']} | {tau} | {100 * r['acc_mean']:.2f}% [{100 * r['acc_min']:.2f}, "
                     f"{100 * r['acc_max']:.2f}] | {' '.join(str(tuple(x)) for x in r['ranks'])} | "
                     f"{100 * r['compression']:.1f}% |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, seeds and tau values (< 60 s)")
    ap.add_argument("--out", default=None, help="output directory (default: docs/img; with --quick a new "
                    "temporary directory, so a smoke run leaves the committed plots alone)")
    args = ap.parse_args()
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="lowrank_quick_") if args.quick
                    else os.path.join(os.path.dirname(__file__), "..", "docs", "img"))
    try:  # (before the runs: experiment 2 needs it, after minutes of experiment 1)
        import sklearn.datasets  # noqa: F401
    except ImportError:
        ap.error("needs scikit-learn for its load_digits data (pip install scikit-learn, or "
                 "pip install -r requirements-dev.txt)")
    t0 = time.perf_counter()
    print("1. synthetic rank-r matrix regression", flush=True)
    syn = experiment_synthetic(args.quick)
    print("2. MLP on load_digits", flush=True)
    dig = experiment_digits(args.quick)
    print(tables(syn, dig))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lowrank_results.json"), "w") as f:  # (the results first: then the plots)
        json.dump(dict(quick=args.quick, synthetic=syn, digits=dig), f)
    try:
        plot(syn, dig, args.out)
        wrote = "lowrank_synthetic.png, lowrank_digits.png, lowrank_results.json"
    except ImportError as e:
        print(f"no plots ({e}: pip install matplotlib)", flush=True)
        wrote = "lowrank_results.json"
    print(f"wrote {wrote} to {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
