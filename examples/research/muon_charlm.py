"""Muon + auxiliary AdamW against AdamW on the char-level LM (issue 16, item 7; docs/research_muon.md).

The model and data are examples/train_charlm.py's (default: the "small" preset, 0.11 M params; ``--size
default`` for the ~1 M one). Every optimizer sees the same init and the same batches for a given seed (the
model is built right after ``torch.manual_seed(seed)``, the batches come from their own generator seeded by
the seed). Cosine schedule with 5% linear warmup to 0, gradient clipping 1.0 (over all params), batch 32.

Methods:

- ``AdamW``: ``momentum_fused.AdamW`` on every param, betas (0.9, 0.95), weight decay 0.1, eps 1e-8.
- ``Muon + aux AdamW``: ``momentum_fused.Muon`` with two groups: the hidden 2-D matrices (qkv, proj, fc, out
  of every block) are Muon's (momentum 0.95, nesterov, 5 NS steps, torch's default coefficients, NS in bf16,
  adjust_lr_fn "original", weight decay 0.1 decoupled), the rest (tied token embedding = head, positions,
  LayerNorms, biases) is a ``use_muon=False`` group stepped by AdamW in the same ``step()`` with AdamW's
  settings above and **AdamW's tuned lr** (the best lr of the AdamW sweep). Only the Muon lr is swept.
- ``torch Muon + torch AdamW`` (cross-check, ``--no-torch`` skips it): torch.optim.Muon on the same hidden
  matrices and torch.optim.AdamW on the rest, with the same hyperparameters, at our Muon's tuned lr (no sweep).

Protocol: each lr of the method's grid on seed 0 (the lr is tuned on seed 0, by its final validation loss), then
seeds 1.. at the best lr. The validation loss (the same ``--eval-batches`` windows every time) is recorded every
``--eval-every`` steps. Reported: the final validation loss over seeds, the first step at which the Muon mean
curve reaches AdamW's mean final loss, plus (``--budgets``) Muon runs with shorter total schedules (a fraction
of the steps, the cosine compressed to fit) to find the budget at which Muon matches AdamW's full-length final
loss: the sample-efficiency ratio. Time per step: the optimizer step of each run (median over the run's
steps, measured in the training loop) and a side-by-side microbenchmark (the optimizers take turns on the same
gradients in one process).

    python examples/research/muon_charlm.py --quick       # a smoke run, ~1-2 min
    python examples/research/muon_charlm.py               # the committed run
    python examples/research/muon_charlm.py --report-only # re-print the tables, redraw the plot
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import common
from common import Timer, fmt_ms, grid_note, mean_std, savefig, subsample

NAME = "muon_charlm"
ADAMW = "AdamW"
MUON = "Muon + aux AdamW"
TORCH_MUON = "torch Muon + torch AdamW"
GRIDS = {ADAMW: [3e-3, 6e-3, 1e-2, 2e-2, 4e-2], MUON: [0.01, 0.02, 0.04, 0.08, 0.16]}
BETAS, WD, EPS = (0.9, 0.95), 0.1, 1e-8
MUON_WD, MUON_MOMENTUM = 0.1, 0.95


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, help="training steps (default 800; quick 60)")
    p.add_argument("--size", default="small", help="train_charlm size (default small: 0.11 M params; default: ~1 M)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default steps // 20)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of 32 x ctx (default 8)")
    p.add_argument("--budgets", default="0.33,0.4,0.5,0.67,0.8",
                   help="fractions of --steps for the shorter Muon runs at the tuned lr ('' skips them)")
    p.add_argument("--extend-budgets", metavar="FRACS",
                   help="do not rerun: load the saved JSON, add Muon runs at these fractions of --steps (comma "
                        "separated) at the saved tuned lrs, save")
    p.add_argument("--no-torch", action="store_true", help="skip the torch.optim.Muon cross-check")
    p.add_argument("--bench-rounds", type=int, default=7, help="rounds of the side-by-side step timing")
    return p.parse_args(argv)


# ------------------------------------------------------------------ model, optimizers
_DATA = {}


def data():
    from train_charlm import CharData, build_corpus
    if "d" not in _DATA:
        _DATA["d"] = CharData(build_corpus(None))
    return _DATA["d"]


def make_model(size, seed):
    from train_charlm import SIZES, CharGPT
    d, nl, nh, ctx = SIZES[size]
    torch.manual_seed(seed)
    return CharGPT(data().vocab, d, nl, nh, ctx), ctx


def split_params(model):
    """(hidden 2-D matrices, the rest): as docs/muon.md, the embeddings (tok is also the tied head) stay on AdamW."""
    hidden, other = [], []
    for n, p in model.named_parameters():
        (hidden if p.ndim >= 2 and not n.startswith(("tok.", "pos.")) else other).append(p)
    return hidden, other


def make_optimizers(method, model, lr, aux_lr):
    """A list of optimizers (two for the torch cross-check) stepping all of ``model``'s params."""
    import momentum_fused as mf
    if method == ADAMW:
        return [mf.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=WD)]
    hidden, other = split_params(model)
    if method == MUON:
        return [mf.Muon([dict(params=hidden, lr=lr, weight_decay=MUON_WD, momentum=MUON_MOMENTUM),
                         dict(params=other, use_muon=False, lr=aux_lr, betas=BETAS, eps=EPS, weight_decay=WD)])]
    if method == TORCH_MUON:
        return [torch.optim.Muon(hidden, lr=lr, weight_decay=MUON_WD, momentum=MUON_MOMENTUM),
                torch.optim.AdamW(other, lr=aux_lr, betas=BETAS, eps=EPS, weight_decay=WD)]
    raise ValueError(method)


# ------------------------------------------------------------------ one training run
def train_one(method, lr, seed, steps, args, aux_lr=None, total=None):
    """Train ``steps`` steps with a cosine schedule of ``steps`` steps; returns the curves and step times."""
    from train_charlm import evaluate, make_schedule
    model, ctx = make_model(args.size, seed)
    opts = make_optimizers(method, model, lr, aux_lr)
    scheds = [make_schedule(o, "cosine", steps) for o in opts]
    d = data()
    gen = torch.Generator().manual_seed(10_000 + seed)
    every = args.eval_every or max(1, (total or steps) // 20)
    val, train_loss, t_opt, t_step = [], [], [], []
    diverged = False
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        x, y = d.batch(d.train, 32, ctx, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        lv = loss.item()
        train_loss.append(lv)
        if not math.isfinite(lv) or lv > 10.0:
            diverged = True
            break
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        to = time.perf_counter()
        for o in opts:
            o.step()
        t_opt.append(time.perf_counter() - to)
        for s in scheds:
            s.step()
        t_step.append(time.perf_counter() - ts)
        if step % every == 0 or step == steps:
            val.append([step, evaluate(model, d, args.eval_batches, 32, ctx)])
    final = float("inf") if diverged else val[-1][1]
    r = dict(method=method, lr=lr, aux_lr=aux_lr, seed=seed, steps=steps, final_val=final, val=val,
             train=subsample(train_loss), diverged=diverged, seconds=time.perf_counter() - t0,
             opt_ms=1e3 * statistics.median(t_opt[1:] or t_opt), step_ms=1e3 * statistics.median(t_step[1:] or t_step),
             params=sum(p.numel() for p in model.parameters()))
    print(f"  {method:24s} lr {lr:<6g} seed {seed} steps {steps}: val {final:.4f}  opt {r['opt_ms']:.2f} ms/step, "
          f"step {r['step_ms']:.1f} ms ({r['seconds']:.0f} s)", flush=True)
    return r


def sweep(method, grid, nseeds, steps, args, aux_lr=None):
    tune = [train_one(method, lr, 0, steps, args, aux_lr) for lr in grid]
    best = min(tune, key=lambda r: r["final_val"])
    runs = [best] + [train_one(method, best["lr"], s, steps, args, aux_lr) for s in range(1, nseeds)]
    return dict(grid=grid, tune=[dict(lr=r["lr"], final_val=r["final_val"]) for r in tune], best_lr=best["lr"],
                aux_lr=aux_lr, runs=runs)


def add_budgets(out, fracs, args):
    """Muon runs with shorter cosine schedules (fractions of out["steps"]) at the tuned lrs, all seeds."""
    fracs = [float(f) for f in fracs.split(",") if f.strip()] if isinstance(fracs, str) else fracs
    d = out["methods"][MUON]
    for f in fracs:
        n = max(1, round(f * out["steps"]))
        runs = [train_one(MUON, d["best_lr"], s, n, args, d["aux_lr"], total=out["steps"]) for s in range(out["seeds"])]
        out["budgets"].append(dict(frac=f, steps=n, runs=runs))
    out["budgets"].sort(key=lambda b: b["steps"])


def parity(out, args, steps=(1, 2, 5, 20)):
    """Ours vs torch.optim.Muon + torch.optim.AdamW on the training problem (seed 0, the tuned lrs, the run's
    schedule): max |Δp| over the hidden matrices and over the AdamW params after each of ``steps`` steps. It
    tells rounding (which grows with the steps: bf16 NS, chaotic training) from a different rule (visible at
    step 1)."""
    from train_charlm import make_schedule
    d = out["methods"][MUON]
    snaps = {}
    for m in (MUON, TORCH_MUON):
        model, ctx = make_model(out["size"], 0)
        hidden = {id(p) for p in split_params(model)[0]}
        opts = make_optimizers(m, model, d["best_lr"], d["aux_lr"])
        scheds = [make_schedule(o, "cosine", out["steps"]) for o in opts]
        gen = torch.Generator().manual_seed(10_000)
        snaps[m] = []
        for step in range(1, max(steps) + 1):
            x, y = data().batch(data().train, 32, ctx, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()
            for s in scheds:
                s.step()
            if step in steps:
                snaps[m].append([(id(p) in hidden, p.detach().clone()) for p in model.parameters()])
    out["parity"] = []
    for k, step in enumerate(steps):
        pairs = list(zip(snaps[MUON][k], snaps[TORCH_MUON][k]))
        hid = max(float((a - b).abs().max()) for (h, a), (_, b) in pairs if h)
        oth = max(float((a - b).abs().max()) for (h, a), (_, b) in pairs if not h)
        out["parity"].append(dict(step=step, hidden=hid, aux=oth))


# ------------------------------------------------------------------ side-by-side step timing
def bench(methods, args, rounds, steps_per_round=20):
    """Median ms per optimizer.step() of each method, taking turns round by round on fixed gradients (one per
    param, the same for every method) so that the machine's load hits every method alike."""
    models, opts = {}, {}
    g = None
    for m, (lr, aux) in methods.items():
        model, _ = make_model(args.size, 0)
        if g is None:
            gg = torch.Generator().manual_seed(7)
            g = [1e-3 * torch.randn(p.shape, generator=gg) for p in model.parameters()]
        for p, gi in zip(model.parameters(), g):
            p.grad = gi.clone()
        models[m], opts[m] = model, make_optimizers(m, model, lr, aux)
        for o in opts[m]:
            o.step()  # warm-up (state allocation, backend choice)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            ts = []
            for _ in range(steps_per_round):
                t = time.perf_counter()
                for o in opts[m]:
                    o.step()
                ts.append(time.perf_counter() - t)
            times[m].append(1e3 * statistics.median(ts))
    return dict(rounds=rounds, steps_per_round=steps_per_round, ms=times)


# ------------------------------------------------------------------ the experiment
def run(args):
    t = Timer()
    steps = args.steps or (60 if args.quick else 800)
    nseeds = args.seeds or (1 if args.quick else 3)
    grids = {ADAMW: [3e-3], MUON: [0.02]} if args.quick else GRIDS
    out = dict(steps=steps, size=args.size, seeds=nseeds, eval_batches=args.eval_batches, eval_every=args.eval_every,
               methods={},
               torch_version=torch.__version__, threads=args.threads)
    out["methods"][ADAMW] = sweep(ADAMW, grids[ADAMW], nseeds, steps, args)
    aux_lr = out["methods"][ADAMW]["best_lr"]
    out["methods"][MUON] = sweep(MUON, grids[MUON], nseeds, steps, args, aux_lr)
    mlr = out["methods"][MUON]["best_lr"]
    if not args.no_torch:
        runs = [train_one(TORCH_MUON, mlr, s, steps, args, aux_lr) for s in range(nseeds)]
        out["methods"][TORCH_MUON] = dict(grid=[mlr], tune=None, best_lr=mlr, aux_lr=aux_lr, runs=runs)
    if not args.no_torch:
        parity(out, args)
    out["budgets"] = []
    add_budgets(out, [] if args.quick else args.budgets, args)
    bm = {m: (d["best_lr"], d["aux_lr"]) for m, d in out["methods"].items()}
    out["bench"] = bench(bm, args, 2 if args.quick else args.bench_rounds)
    out["cpu_seconds"] = t.cpu()
    print(f"done: {t}")
    return out


# ------------------------------------------------------------------ report
def mean_curve(runs):
    n = min(len(r["val"]) for r in runs)
    steps = [r_["val"][i][0] for r_ in runs[:1] for i in range(n)]
    cs = [[r["val"][i][1] for i in range(n)] for r in runs]
    return steps, [sum(c[i] for c in cs) / len(cs) for i in range(n)], cs


def first_reach(steps, curve, target):
    """The first evaluated step at which ``curve`` <= target (linear interpolation between evaluations), or None."""
    for i, (s, v) in enumerate(zip(steps, curve)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], curve[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def report(res):
    ms = res["methods"]
    p = ms[ADAMW]["runs"][0]["params"]
    lines = [f"{res['size']} model ({p / 1e6:.2f} M params), {res['steps']} steps, cosine (5% warmup), "
             f"{res['seeds']} seed(s); lr tuned on seed 0; validation on {res['eval_batches']} x 32 windows.", "",
             "| method | lr grid | best lr | aux AdamW lr | final val loss (mean ± std [min, max]) | Δ vs AdamW |",
             "|---|---|---|---|---|---|"]
    base = mean_std([r["final_val"] for r in ms[ADAMW]["runs"]])[0]
    for m, d in ms.items():
        fv = [r["final_val"] for r in d["runs"]]
        grid = ", ".join(f"{x:g}" for x in d["grid"]) if d["tune"] else "(Muon's)"
        aux = "-" if d["aux_lr"] is None else f"{d['aux_lr']:g}"
        lines.append(f"| {m} | {grid} | {grid_note(d['grid'], d['best_lr'])} | {aux} | {fmt_ms(fv)} | "
                     f"{mean_std(fv)[0] - base:+.3f} |")
    lines += ["", "Per-lr final val loss on seed 0:", ""]
    for m, d in ms.items():
        if d["tune"]:
            lines.append(f"- {m}: " + ", ".join(f"lr {t['lr']:g}: {t['final_val']:.4f}" for t in d["tune"]))
    if TORCH_MUON in ms:
        diffs = [max(abs(a[1] - b[1]) for a, b in zip(ra["val"], rb["val"]))
                 for ra, rb in zip(ms[MUON]["runs"], ms[TORCH_MUON]["runs"])]
        lines += ["", f"Ours vs torch.optim.Muon + torch AdamW, same seeds: largest |Δ val loss| over the curve, per "
                  f"seed: {', '.join(f'{x:.2e}' for x in diffs)}."]
        if res.get("parity"):
            lines += ["", "Same run, seed 0, max |Δp| ours − torch after k steps (hidden matrices / AdamW params): "
                      + "; ".join(f"k={q['step']}: {q['hidden']:.1e} / {q['aux']:.1e}" for q in res["parity"]) + "."]
    # sample efficiency
    st_a, mean_a, _ = mean_curve(ms[ADAMW]["runs"])
    target = mean_a[-1]
    st_m, mean_m, _ = mean_curve(ms[MUON]["runs"])
    reach = first_reach(st_m, mean_m, target)
    lines += ["", f"Sample efficiency, target = AdamW's mean final val loss {target:.4f} at {res['steps']} steps:", "",
              "| Muon run | total steps | reaches the target at | final val loss (mean ± std [min, max]) | "
              "AdamW steps / Muon steps |", "|---|---|---|---|---|"]
    r_in = "not reached" if reach is None else f"step {reach:.0f} (mean curve)"
    ratio = "-" if reach is None else f"{res['steps'] / reach:.2f}"
    lines.append(f"| full schedule, within the run | {res['steps']} | {r_in} | "
                 f"{fmt_ms([r['final_val'] for r in ms[MUON]['runs']])} | {ratio} |")
    for b in res.get("budgets", []):
        fv = [r["final_val"] for r in b["runs"]]
        m = mean_std(fv)[0]
        ok = "yes" if m <= target else "no"
        lines.append(f"| shorter schedule ({b['frac']:g} of the steps) | {b['steps']} | final mean {'≤' if ok == 'yes' else '>'}"
                     f" target: {ok} | {fmt_ms(fv)} | {res['steps'] / b['steps']:.2f} |")
    eq = equal_loss_steps(res)
    if eq is not None:
        lines += ["", f"Interpolating the final mean loss over the Muon budgets (and the full run), Muon matches "
                  f"AdamW's final loss with a {eq:.0f}-step schedule: **{res['steps'] / eq:.2f}x** fewer steps."]
    # time
    lines += ["", "Optimizer step time (ms, one thread):", "",
              "| method | in training: median opt.step() per run (mean [min, max] over runs) | "
              "in training: whole step | side by side: median of round medians [min, max] | ratio to AdamW "
              "(side by side) |", "|---|---|---|---|---|"]
    bms = res["bench"]["ms"]
    ba = statistics.median(bms[ADAMW])
    for m, d in ms.items():
        o = [r["opt_ms"] for r in d["runs"]]
        s = [r["step_ms"] for r in d["runs"]]
        bm = bms[m]
        lines.append(f"| {m} | {mean_std(o)[0]:.2f} [{min(o):.2f}, {max(o):.2f}] | {mean_std(s)[0]:.1f} "
                     f"[{min(s):.1f}, {max(s):.1f}] | {statistics.median(bm):.2f} [{min(bm):.2f}, {max(bm):.2f}] | "
                     f"{statistics.median(bm) / ba:.2f} |")
    if TORCH_MUON in bms:
        rat = [a / b for a, b in zip(bms[TORCH_MUON], bms[MUON])]
        lines += ["", f"torch / ours (Muon + aux AdamW) per round: {', '.join(f'{x:.2f}' for x in rat)} "
                  f"({res['bench']['rounds']} rounds of {res['bench']['steps_per_round']} steps)."]
    lines += ["", f"{res['cpu_seconds']:.0f} CPU-seconds in all."]
    return "\n".join(lines)


def equal_loss_steps(res):
    """Steps at which the Muon final-loss-vs-budget curve (mean over seeds) crosses AdamW's mean final loss,
    interpolated linearly between budgets; None if no budget brackets it."""
    target = mean_std([r["final_val"] for r in res["methods"][ADAMW]["runs"]])[0]
    pts = sorted([(b["steps"], mean_std([r["final_val"] for r in b["runs"]])[0]) for b in res.get("budgets", [])]
                 + [(res["steps"], mean_std([r["final_val"] for r in res["methods"][MUON]["runs"]])[0])])
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v0 > target >= v1:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None  # not bracketed (or even the shortest budget reaches it: the table says so)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ms = res["methods"]
    for m, d in ms.items():
        st, mean, cs = mean_curve(d["runs"])
        ls = "--" if m == TORCH_MUON else "-"
        lab = f"{m} lr={d['best_lr']:g}" + (f" (aux {d['aux_lr']:g})" if d["aux_lr"] is not None else "")
        for a in ax:
            line, = a.plot(st, mean, ls, label=lab)
            a.fill_between(st, [min(c[i] for c in cs) for i in range(len(st))],
                           [max(c[i] for c in cs) for i in range(len(st))], color=line.get_color(), alpha=0.2)
    bs = res.get("budgets", [])
    for i, b in enumerate(bs):
        st, mean, _ = mean_curve(b["runs"])
        ax[1].plot(st, mean, ":", lw=1.2, color=plt.cm.plasma(0.75 * i / max(1, len(bs) - 1)),
                   label=f"Muon, {b['steps']}-step schedule")
    target = mean_curve(ms[ADAMW]["runs"])[1][-1]
    for a in ax:
        a.axhline(target, color="gray", lw=0.7)
        a.set(xlabel="step", ylabel="validation loss (nats/char)")
    ax[0].set_ylim(top=min(3.5, ax[0].get_ylim()[1]))
    ax[0].set_title(f"char-LM {res['size']}: mean over {res['seeds']} seeds, band min-max")
    lo = min(min(mean_curve(d["runs"])[1]) for d in ms.values())
    ax[1].set_ylim(lo - 0.05, target + 0.35)
    ax[1].set_xlim(res["steps"] * 0.3, res["steps"] * 1.02)
    ax[1].set_title("zoom; dotted: Muon with shorter schedules")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    jpath, ppath = common.paths(args, NAME)
    if not (args.out_dir or args.quick):  # this experiment keeps its plot next to its JSON
        ppath = os.path.join(common.RESULTS, f"{NAME}.png")
    if args.report_only or args.extend_budgets:
        res = common.load_json(jpath)
        if args.extend_budgets:  # the saved run's settings, not the command line's
            args.size, args.eval_batches, args.eval_every = res["size"], res["eval_batches"], res.get("eval_every")
            t = Timer()
            add_budgets(res, args.extend_budgets, args)
            if "parity" not in res and TORCH_MUON in res["methods"]:  # added after the committed run began
                parity(res, args)
            res["cpu_seconds"] += t.cpu()
            common.save_json(res, jpath)
    else:
        res = run(args)
        common.save_json(res, jpath)
    print(report(res))
    plot(res, ppath)
    return res


if __name__ == "__main__":
    main()
