"""Schedulers for schedule-free (Pun, Buchholz, Gower, arXiv 2511.07767) on the CPU.

Part A, the char-level LM (examples/train_charlm.py, gradient clipping 1.0, no weight decay,
betas (0.9, 0.95)): AdamWScheduleFree under a warmup-stable-decay schedule (5% warmup, linear decay to 0
over the last 20%) with ``weight_rule="lr_t"`` (each iterate weighted by its scheduled lr) against
``weight_rule="lr_max"`` (the schedule_free default: weighted by the peak lr), both with
``weight_lr_power=1`` (the convex theory's weights), and against AdamW with a cosine schedule (5% warmup).
lr tuned per method on seed 0 over {1e-3, 3e-3, 1e-2}; the schedule-free models are evaluated at the
averaged iterate x (``opt.eval()``).

Part B, the Polyak step on a convex problem: L2-regularised logistic regression (λ = 1e-3) on sklearn's
bundled breast-cancer data (569 × 30, standardised, + bias), minibatches of 16. SGDScheduleFree
(momentum 0.9) with ``lr="polyak"`` (f* = 0, uncapped and capped at 10) against SGDScheduleFree with a
constant lr tuned over {0.03, 0.1, 0.3, 1, 3, 10} (by the mean over seeds, which favours the baseline).
Reported: the full-batch suboptimality f(x) − f_opt of the averaged iterate (f_opt from L-BFGS in float64).

    python examples/research/schedulefree_schedulers.py --quick   # ~1.5 min
    python examples/research/schedulefree_schedulers.py --steps 400   # the committed run (default: 500 steps)
"""
from __future__ import annotations

import math

import torch

import common
from common import Timer, fmt_ms, grid_note, mean_std, savefig, subsample

NAME = "schedulefree_schedulers"
LM_METHODS = {  # name: (optimizer, kwargs, schedule)
    "SF-AdamW + WSD, lr_t": ("AdamWScheduleFree", {"betas": (0.9, 0.95), "weight_rule": "lr_t", "weight_lr_power": 1.0}, "wsd"),
    "SF-AdamW + WSD, lr_max": ("AdamWScheduleFree", {"betas": (0.9, 0.95), "weight_rule": "lr_max", "weight_lr_power": 1.0}, "wsd"),
    "AdamW + cosine": ("AdamW", {"betas": (0.9, 0.95), "weight_decay": 0.0}, "cosine"),
}
LM_GRID = [1e-3, 3e-3, 1e-2]
LOGREG_GRID = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
LAM = 1e-3


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, help="char-LM steps (default 500; quick 60)")
    p.add_argument("--size", default="small", help="train_charlm size (default small: 0.11 M params)")
    p.add_argument("--logreg-steps", type=int, help="logistic regression steps (default 1500; quick 300)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ A. char-LM
def run_lm(args):
    from train_charlm import train
    steps = args.steps or (60 if args.quick else 500)
    nseeds = args.seeds or (1 if args.quick else 3)
    grid = [3e-3] if args.quick else LM_GRID
    out = dict(steps=steps, size=args.size, seeds=nseeds, methods={})

    def one(m, lr, seed):
        opt, kw, sched = LM_METHODS[m]
        r = train(opt=opt, opt_kwargs=dict(kw, lr=lr), steps=steps, seed=seed, size=args.size, schedule=sched,
                  threads=args.threads)
        print(f"  {m:24s} lr {lr:<6g} seed {seed}: val {r['final_val']:.4f} ({r['seconds']:.0f} s)", flush=True)
        return dict(lr=lr, seed=seed, final_val=r["final_val"], val=r["val"], train=subsample(r["train_loss"]),
                    params=r["params"])

    for m in LM_METHODS:
        tune = [one(m, lr, 0) for lr in grid]
        best = min(tune, key=lambda r: r["final_val"])
        runs = [best] + [one(m, best["lr"], s) for s in range(1, nseeds)]
        out["methods"][m] = dict(grid=grid, tune=[dict(lr=r["lr"], final_val=r["final_val"]) for r in tune],
                                 best_lr=best["lr"], runs=runs)
    return out


# ------------------------------------------------------------------ B. Polyak on logistic regression
def logreg_data():
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    X = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    return X, torch.tensor(y, dtype=torch.float64)


def objective(w, X, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * LAM * (w * w).sum()


def f_opt(X, y):
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = objective(w, X, y)
        f.backward()
        return f
    for _ in range(5):
        opt.step(closure)
    return float(objective(w.detach(), X, y))


def run_logreg_one(lr, seed, steps, X, y, fstar, cap=None, batch=16):
    import momentum_fused as mf
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    kw = dict(lr=lr, momentum=0.9)
    if lr == "polyak":
        kw.update(f_star=0.0, polyak_max_lr=cap)
    opt = mf.SGDScheduleFree([w], **kw)
    g = torch.Generator().manual_seed(seed)
    sub, gammas = [], []
    every = max(1, steps // 100)
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(X), (batch,), generator=g)

        def closure():
            opt.zero_grad()
            f = objective(w, X[idx], y[idx])
            f.backward()
            return f
        opt.step(closure)
        if lr == "polyak":
            gammas.append(opt.param_groups[0]["polyak_lr"])
        if t % every == 0 or t == steps:
            opt.eval()
            with torch.no_grad():
                sub.append([t, float(objective(w, X, y)) - fstar])
            opt.train()
    return dict(sub=sub, final=sub[-1][1], gammas=subsample(gammas, 100) if gammas else None)


def run_logreg(args):
    steps = args.logreg_steps or (300 if args.quick else 1500)
    nseeds = args.seeds or (2 if args.quick else 5)
    X, y = logreg_data()
    fstar = f_opt(X, y)
    out = dict(steps=steps, seeds=nseeds, f_opt=fstar, lam=LAM, methods={})
    for name, cap in (("SF-SGD Polyak (f*=0, no cap)", None), ("SF-SGD Polyak (f*=0, cap 10)", 10.0)):
        runs = [run_logreg_one("polyak", s, steps, X, y, fstar, cap) for s in range(nseeds)]
        out["methods"][name] = dict(runs=runs)
        print(f"  {name}: f(x) - f_opt {fmt_ms([r['final'] for r in runs], 6)}", flush=True)
    grid = [0.3, 3.0] if args.quick else LOGREG_GRID
    per_lr = {lr: [run_logreg_one(lr, s, steps, X, y, fstar) for s in range(nseeds)] for lr in grid}
    score = {lr: mean_std([r["final"] if math.isfinite(r["final"]) else 1e9 for r in rs])[0] for lr, rs in per_lr.items()}
    best = min(score, key=score.get)
    out["methods"]["SF-SGD constant lr (tuned)"] = dict(runs=per_lr[best], best_lr=best, grid=grid,
                                                        tune={str(k): v for k, v in score.items()})
    print(f"  SF-SGD constant: best lr {best}: {fmt_ms([r['final'] for r in per_lr[best]], 6)}", flush=True)
    return out


def run(args):
    t = Timer()
    res = dict(lm=run_lm(args), logreg=run_logreg(args))
    res["cpu_seconds"] = t.cpu()
    print(f"done: {t}")
    return res


def report(res):
    lm = res["lm"]
    p = lm["methods"][next(iter(lm["methods"]))]["runs"][0]["params"]
    lines = [f"A. char-LM: {lm['size']} model ({p / 1e6:.2f} M params), {lm['steps']} steps, {lm['seeds']} seed(s); "
             "lr tuned on seed 0.", "",
             "| method | lr grid | best lr | final val loss (mean ± std [min, max]) |", "|---|---|---|---|"]
    for m, d in lm["methods"].items():
        lines.append(f"| {m} | {', '.join(f'{x:g}' for x in d['grid'])} | {grid_note(d['grid'], d['best_lr'])} | "
                     f"{fmt_ms([r['final_val'] for r in d['runs']])} |")
    lines += ["", "Per-lr results on seed 0 (final val loss):", "",
              "| method | " + " | ".join(f"lr {x:g}" for x in lm["methods"][next(iter(lm["methods"]))]["grid"]) + " |",
              "|---|" + "---|" * len(lm["methods"][next(iter(lm["methods"]))]["grid"])]
    for m, d in lm["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f"{t['final_val']:.4f}" for t in d["tune"]) + " |")
    lr = res["logreg"]
    lines += ["", f"B. logistic regression (breast cancer, λ = {lr['lam']:g}, batch 16), {lr['steps']} steps, "
              f"{lr['seeds']} seeds; f_opt = {lr['f_opt']:.6f}.", "",
              "| method | lr | f(x) − f_opt at the end (mean ± std [min, max]) | f(x) − f_opt at 20% of the steps |",
              "|---|---|---|---|"]
    for m, d in lr["methods"].items():
        i = max(0, len(d["runs"][0]["sub"]) // 5 - 1)
        lrs = "Polyak" if "Polyak" in m else grid_note(d["grid"], d["best_lr"]) + f" of {{{', '.join(f'{x:g}' for x in d['grid'])}}}"
        lines.append(f"| {m} | {lrs} | {fmt_ms([r['final'] for r in d['runs']], 5)} | "
                     f"{fmt_ms([r['sub'][i][1] for r in d['runs']], 5)} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, d in res["lm"]["methods"].items():
        n = min(len(r["val"]) for r in d["runs"])
        steps = [v[0] for v in d["runs"][0]["val"][:n]]
        cs = [[v[1] for v in r["val"][:n]] for r in d["runs"]]
        line, = ax[0].plot(steps, [sum(c[i] for c in cs) / len(cs) for i in range(n)], label=f"{m} lr={d['best_lr']:g}")
        ax[0].fill_between(steps, [min(c[i] for c in cs) for i in range(n)], [max(c[i] for c in cs) for i in range(n)],
                           color=line.get_color(), alpha=0.2)
    ax[0].set(xlabel="step", ylabel="validation loss (x for schedule-free)", title="char-LM (band: min-max over seeds)")
    ax[0].set_ylim(top=min(3.5, ax[0].get_ylim()[1]))
    ax[0].legend(fontsize=8)
    for m, d in res["logreg"]["methods"].items():
        n = min(len(r["sub"]) for r in d["runs"])
        st = [v[0] for v in d["runs"][0]["sub"][:n]]
        cs = [[max(v[1], 1e-12) for v in r["sub"][:n]] for r in d["runs"]]
        lab = m + (f" lr={d['best_lr']:g}" if "best_lr" in d else "")
        line, = ax[1].plot(st, [sum(c[i] for c in cs) / len(cs) for i in range(n)], label=lab)
        ax[1].fill_between(st, [min(c[i] for c in cs) for i in range(n)], [max(c[i] for c in cs) for i in range(n)],
                           color=line.get_color(), alpha=0.2)
    ax[1].set(xlabel="step", ylabel="f(x) − f_opt", yscale="log", title="logistic regression, averaged iterate x")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


def main(argv=None):
    return common.run_main(parse_args(argv), NAME, run, report, plot)


if __name__ == "__main__":
    main()
