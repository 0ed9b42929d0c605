"""Adam's secret sauce (Orvieto & Gower, "In Search of Adam's Secret Sauce", 2025) on the char-level LM.

Compares, on examples/train_charlm.py (cosine schedule with 5% warmup, gradient clipping 1.0, no weight
decay): Adam(β1=0.9, β2=0.95), AdamTied (β1 = β2 = β, β ∈ {0.9, 0.95}), Signum (β = 0.9) and SGD with
momentum 0.9. Each method's lr is tuned on seed 0 over a small grid (final validation loss), then the best
lr is run on the other seeds. Along the AdamTied runs it records ``AdamTied.gradient_snr()`` (per tensor:
mean of m²/σ² from the tied-beta online mean/variance) and the mean magnitude of the Adam direction
relative to Signum's, E|m|/√(m² + σ²) = E 1/√(1 + 1/snr) (eps ignored).

    python examples/research/adam_secret_sauce.py --quick     # ~1 min: 60 steps, 1 lr, 1 seed
    python examples/research/adam_secret_sauce.py             # the committed run (see docs/research.md)
    python examples/research/adam_secret_sauce.py --size default --steps 2000 --seeds 3   # the ~1M model
"""
from __future__ import annotations

import math

import torch

import common
from common import Timer, fmt_ms, grid_note, mean_std, savefig, subsample

NAME = "adam_secret_sauce"
METHODS = {  # name: (optimizer, fixed kwargs, lr grid)
    "Adam(0.9, 0.95)": ("Adam", {"betas": (0.9, 0.95)}, [1e-3, 3e-3, 1e-2]),
    "AdamTied(0.9)": ("AdamTied", {"beta": 0.9}, [1e-3, 3e-3, 1e-2]),
    "AdamTied(0.95)": ("AdamTied", {"beta": 0.95}, [1e-3, 3e-3, 1e-2]),
    "Signum(0.9)": ("Signum", {"momentum": 0.9}, [3e-4, 1e-3, 3e-3]),
    "SGD-momentum(0.9)": ("SGD", {"momentum": 0.9}, [0.1, 0.3, 1.0, 3.0]),
}


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, help="training steps (default 500; quick 60)")
    p.add_argument("--size", default="small", help="train_charlm size (default small: 0.11 M params)")
    return p.parse_args(argv)


def snr_probe(step, model, opt):
    """gradient_snr() summarised over tensors, and E|m|/sqrt(m^2 + var) over all elements."""
    if not hasattr(opt, "gradient_snr"):
        return None
    snr = [v for v in opt.gradient_snr().values() if math.isfinite(v)]
    num = den = 0.0
    for group in opt.param_groups:
        beta = group["betas"][0]
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            bc = 1.0 - beta ** float(st["step"])
            m = st["exp_avg"].double() / bc
            var = (st["exp_avg_sq"].double() / bc - m * m).clamp_min(0)
            r = m.abs() / (m * m + var).sqrt()
            r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
            num += float(r.sum())
            den += r.numel()
    snr.sort()
    return dict(snr_median=snr[len(snr) // 2] if snr else float("nan"),
                snr_mean=sum(snr) / len(snr) if snr else float("nan"), dir_frac=num / max(den, 1))


def run_one(method, lr, seed, steps, size, threads):
    from train_charlm import train
    opt, kw, _ = METHODS[method]
    r = train(opt=opt, opt_kwargs=dict(kw, lr=lr), steps=steps, seed=seed, size=size, schedule="cosine",
              on_eval=snr_probe if opt == "AdamTied" else None, threads=threads)
    print(f"  {method:20s} lr {lr:<7g} seed {seed}: val {r['final_val']:.4f}"
          f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.0f} s)", flush=True)
    return dict(lr=lr, seed=seed, final_val=r["final_val"], diverged=r["diverged"], val=r["val"],
                train=subsample(r["train_loss"]), extra=r["extra"], params=r["params"])


def run(args):
    steps = args.steps or (60 if args.quick else 500)
    nseeds = args.seeds or (1 if args.quick else 3)
    out = dict(steps=steps, size=args.size, seeds=nseeds, methods={})
    t = Timer()
    for method, (_, _, grid) in METHODS.items():
        grid_used = [grid[len(grid) // 2]] if args.quick else grid
        tune = [run_one(method, lr, 0, steps, args.size, args.threads) for lr in grid_used]
        best = min(tune, key=lambda r: r["final_val"])
        runs = [best] + [run_one(method, best["lr"], s, steps, args.size, args.threads) for s in range(1, nseeds)]
        out["methods"][method] = dict(grid=grid_used, tune=[dict(lr=r["lr"], final_val=r["final_val"]) for r in tune],
                                      best_lr=best["lr"], runs=runs)
    out["cpu_seconds"] = t.cpu()
    print(f"done: {t}")
    return out


def report(res):
    lines = [f"{res['size']} model ({res['methods'][next(iter(res['methods']))]['runs'][0]['params'] / 1e6:.2f} M "
             f"params), {res['steps']} steps, {res['seeds']} seed(s); lr tuned on seed 0.", "",
             "| method | lr grid | best lr | final val loss (mean ± std [min, max]) | gap to Adam |",
             "|---|---|---|---|---|"]
    ref = mean_std([r["final_val"] for r in res["methods"]["Adam(0.9, 0.95)"]["runs"]])[0]
    for m, d in res["methods"].items():
        vals = [r["final_val"] for r in d["runs"]]
        lines.append(f"| {m} | {', '.join(f'{x:g}' for x in d['grid'])} | {grid_note(d['grid'], d['best_lr'])} | "
                     f"{fmt_ms(vals)} | {mean_std(vals)[0] - ref:+.3f} |")
    sgd = mean_std([r["final_val"] for r in res["methods"]["SGD-momentum(0.9)"]["runs"]])[0]
    sig = mean_std([r["final_val"] for r in res["methods"]["Signum(0.9)"]["runs"]])[0]
    if math.isfinite(sgd) and sgd != ref:
        lines += ["", f"Signum closes {100 * (sgd - sig) / (sgd - ref):.0f}% of the SGD → Adam gap "
                  f"(SGD {sgd:.3f}, Signum {sig:.3f}, Adam {ref:.3f})."]
    lines += ["", "| AdamTied | step | median over tensors of gradient_snr() | E\\|m\\|/√(m²+σ²) |", "|---|---|---|---|"]
    for m in ("AdamTied(0.9)", "AdamTied(0.95)"):
        ex = [r["extra"] for r in res["methods"][m]["runs"]]
        for i in sorted({0, len(ex[0]) // 2, len(ex[0]) - 1}):
            step = ex[0][i][0]
            med = [e[i][1]["snr_median"] for e in ex]
            fr = [e[i][1]["dir_frac"] for e in ex]
            lines.append(f"| {m} | {step} | {fmt_ms(med, 3)} | {fmt_ms(fr, 3)} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, d in res["methods"].items():
        steps = [v[0] for v in d["runs"][0]["val"]]
        n = min(len(r["val"]) for r in d["runs"])
        curves = [[v[1] for v in r["val"][:n]] for r in d["runs"]]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        line, = ax[0].plot(steps[:n], mean, label=f"{m} lr={d['best_lr']:g}")
        ax[0].fill_between(steps[:n], [min(c[i] for c in curves) for i in range(n)],
                           [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.2)
    ax[0].set(xlabel="step", ylabel="validation loss (nats/char)", title="char-LM, best lr per method (band: min-max over seeds)")
    ax[0].set_ylim(top=min(3.5, ax[0].get_ylim()[1]))
    ax[0].legend(fontsize=8)
    for m, ls in (("AdamTied(0.9)", "-"), ("AdamTied(0.95)", "--")):
        for k, r in enumerate(res["methods"][m]["runs"]):
            st = [e[0] for e in r["extra"]]
            ax[1].plot(st, [e[1]["snr_median"] for e in r["extra"]], ls, color="C0", alpha=0.7,
                       label=f"{m}: median gradient_snr()" if k == 0 else None)
            ax[1].plot(st, [e[1]["dir_frac"] for e in r["extra"]], ls, color="C3", alpha=0.7,
                       label=f"{m}: E|m|/√(m²+σ²)" if k == 0 else None)
    ax[1].set(xlabel="step", yscale="log", title="AdamTied: gradient SNR estimate along training")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


def main(argv=None):
    return common.run_main(parse_args(argv), NAME, run, report, plot)


if __name__ == "__main__":
    main()
