"""QHM unification (Gitman, Lang, Zhang, Xiao, "Understanding the Role of Momentum in Stochastic
Gradient Methods", NeurIPS 2019): the stability region of QHM on quadratics, measured against the
spectral-radius prediction.

On f = ½ h x², QHM (b ← βb + (1−β)g, x ← x − γ[(1−ν)g + νb]) is the linear recurrence with characteristic
polynomial z² − c₁z + c₂, c₁ = 1 − γh + γνβh + β, c₂ = β(1 − γh + γνh) (docs/algorithms.md §2); it
converges iff the spectral radius ρ < 1, i.e. 0 < γh < 2(1+β)/(1 + β(1−2ν)). For each β we run the real
optimizer (momentum_fused.QHM, float64, default backend) on a grid of (ν, γh): one param group per ν, one
tensor element per γh (lr = 1, the curvature h varies per element), and measure the contraction rate
from the iterates (at ν = 0, plain GD, x does not read the buffer and the prediction is |1 − γh|). Then: the fraction of grid points where measured convergence (|x| shrinks) agrees with
ρ < 1, the largest |measured rate − ρ| over the points with ρ in [0.5, 0.995], and the methods the
converters place in the (ν, γh) plane (QHM.from_momentum / from_nesterov: heavy ball and Nesterov at the
same β), and known facts of torch heavy ball, Nesterov and triple momentum checked through the converters.

    python examples/research/qhm_stability.py --quick    # ~10 s
    python examples/research/qhm_stability.py            # the committed run (deterministic: no seeds)
"""
from __future__ import annotations

import cmath
import math

import torch

import common
from common import Timer, savefig

NAME = "qhm_stability"


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    return p.parse_args(argv)


def radius(lr_h, beta, nu):
    c1 = 1 - lr_h + lr_h * nu * beta + beta
    c2 = beta * (1 - lr_h + lr_h * nu)
    d = cmath.sqrt(c1 * c1 - 4 * c2)
    return max(abs((c1 + d) / 2), abs((c1 - d) / 2))


def boundary(beta, nu):
    den = 1 + beta * (1 - 2 * nu)
    return 2 * (1 + beta) / den if den > 0 else float("inf")


def measure(beta, nus, lrhs, steps):
    """Per (nu, lr h): the measured rate exp(mean of log|x| increments over the last half, taken on the
    running max over a window to smooth complex-root oscillations). Runs mf.QHM on all points at once."""
    import momentum_fused as mf
    h = torch.tensor(lrhs, dtype=torch.float64)
    xs = [torch.ones(len(lrhs), dtype=torch.float64) for _ in nus]
    opt = mf.QHM([dict(params=[x], nu=nu) for x, nu in zip(xs, nus)], lr=1.0, momentum=beta)
    logs = torch.zeros(len(nus), len(lrhs), steps + 1, dtype=torch.float64)
    offset = torch.zeros(len(nus), len(lrhs), dtype=torch.float64)
    for t in range(1, steps + 1):
        for x in xs:
            x.grad = h * x
        opt.step()
        with torch.no_grad():
            for i, x in enumerate(xs):  # renormalise the joint state (x, b) to avoid overflow/underflow
                st = opt.state[x]
                s = torch.maximum(x.abs(), st["momentum_buffer"].abs()).clamp_min(1e-300).log()
                shift = torch.where((s > 50) | (s < -50), s, torch.zeros_like(s))
                x.mul_(torch.exp(-shift))
                st["momentum_buffer"].mul_(torch.exp(-shift))
                offset[i] += shift
                logs[i, :, t] = offset[i] + x.abs().clamp_min(1e-300).log()
    w = max(2, steps // 8)
    half = logs[:, :, steps // 2:]
    mx = half.unfold(2, w, 1).amax(-1)  # running max over windows of w steps
    slope = (mx[:, :, -1] - mx[:, :, 0]) / (mx.shape[2] - 1)
    rate = slope.exp()
    # x underflowed against the renormalised buffer (only at nu = 0, where x does not read b): not measurable
    zero = torch.stack([x.abs() < 1e-250 for x in xs])
    return torch.where(zero, torch.full_like(rate, float("nan")), rate)


def run(args):
    t = Timer()
    nus = [i / (12 if args.quick else 40) for i in range(13 if args.quick else 41)]
    out = dict(betas=args.betas, nus=nus, panels=[])
    for beta in args.betas:
        top = 2 * (1 + beta) / (1 - beta) * 1.3  # nu = 1 boundary, plus margin
        n = 30 if args.quick else 80
        lrhs = [math.exp(math.log(0.01) + (math.log(top) - math.log(0.01)) * i / (n - 1)) for i in range(n)]
        steps = 600 if args.quick else (4000 if beta >= 0.99 else 1500)
        rate = measure(beta, nus, lrhs, steps)
        # nu = 0 is plain GD: x does not read the buffer, so the buffer's root beta is not seen in x
        pred = [[radius(l, beta, nu) if nu > 0 else abs(1 - l) for l in lrhs] for nu in nus]
        agree = tot = unmeasured = 0
        worst = 0.0
        for i in range(len(nus)):
            for j in range(len(lrhs)):
                p, m = pred[i][j], float(rate[i, j])
                if abs(p - 1) < 2e-3:  # at the boundary itself the sign is a tie
                    continue
                if math.isnan(m):  # x underflowed (converged): rate not measurable
                    unmeasured += 1
                    m = 0.0
                tot += 1
                agree += (p < 1) == (m < 1)
                if 0.5 <= p <= 0.995 and not math.isnan(float(rate[i, j])):
                    worst = max(worst, abs(m - p))
        conv = {"heavy ball (from_momentum)": mf_kw("from_momentum", beta),
                "Nesterov (from_nesterov)": mf_kw("from_nesterov", beta)}
        out["panels"].append(dict(beta=beta, lrhs=lrhs, steps=steps,
                                  rate=[[round(float(v), 4) for v in row] for row in rate], agree=agree, total=tot,
                                  unmeasured=unmeasured, worst=worst, converters=conv))
        print(f"  beta {beta}: stable/unstable agree on {agree}/{tot}; max |rate - rho| (rho in [0.5, 0.995]) "
              f"{worst:.2e} ({t})", flush=True)
    out["checks"] = converter_checks()
    out["cpu_seconds"] = t.cpu()
    return out


def mf_kw(name, beta):
    import momentum_fused as mf
    kw = getattr(mf.QHM, name)(1.0, beta)  # lr = 1 in torch units: the QHM lr is 1/(1-beta)
    return dict(nu=kw["nu"], lr_scale=kw["lr"], momentum=kw["momentum"])


def converter_checks():
    """Known facts of the original methods, through the converters: the largest stable curvature of torch
    heavy ball (αh < 2(1+β)) and Nesterov (αh < 2(1+β)/(1+2β)), and triple momentum's designed rate
    1 − 1/√κ at both ends h = μ and h = L; each against the QHM spectral radius and the measured rate."""
    import momentum_fused as mf
    out = []
    for name, kw, known in (("heavy ball (torch lr 0.1, β 0.9)", mf.QHM.from_momentum(0.1, 0.9), 2 * 1.9 / 0.1),
                            ("Nesterov (torch lr 0.1, β 0.9)", mf.QHM.from_nesterov(0.1, 0.9), 2 * 1.9 / (0.1 * 2.8))):
        hmax = boundary(kw["momentum"], kw["nu"]) / kw["lr"]
        hs = [hmax * 0.98, hmax * 1.02]
        rates = measure(kw["momentum"], [kw["nu"]], [kw["lr"] * h for h in hs], 3000)[0].tolist()
        out.append(dict(name=name, kw=kw, known=f"largest stable h = {known:.3f}", predicted=f"h_max = {hmax:.3f}",
                        measured=f"rate {rates[0]:.4f} at 0.98 h_max, {rates[1]:.4f} at 1.02 h_max"))
    kw = mf.QHM.from_triple_momentum(1.0, 100.0)
    hs = [0.01, 1.0]
    pred = [radius(kw["lr"] * h, kw["momentum"], kw["nu"]) for h in hs]
    rates = measure(kw["momentum"], [kw["nu"]], [kw["lr"] * h for h in hs], 3000)[0].tolist()
    out.append(dict(name="triple momentum (L = 1, κ = 100)", kw=kw, known="rate 1 − 1/√κ = 0.9 at h = μ and h = L",
                    predicted=f"ρ = {pred[0]:.4f} / {pred[1]:.4f}", measured=f"rate {rates[0]:.4f} / {rates[1]:.4f}"))
    return out


def report(res):
    lines = ["| β | grid (ν × γh) | steps | stable/unstable agreement | x underflowed (rate not measured) "
             "| max \\|measured rate − ρ\\| (ρ ∈ [0.5, 0.995]) |", "|---|---|---|---|---|---|"]
    for p in res["panels"]:
        lines.append(f"| {p['beta']} | {len(res['nus'])} × {len(p['lrhs'])} | {p['steps']} | {p['agree']}/{p['total']} "
                     f"({100 * p['agree'] / p['total']:.2f}%) | {p.get('unmeasured', 0)} | {p['worst']:.1e} |")
    lines += ["", "| method (through its QHM converter) | QHM (lr, β, ν) | known | QHM prediction | measured (mf.QHM) |",
              "|---|---|---|---|---|"]
    for c in res["checks"]:
        kw = c["kw"]
        lines.append(f"| {c['name']} | ({kw['lr']:.4g}, {kw['momentum']:.4g}, {kw['nu']:.4g}) | {c['known']} | "
                     f"{c['predicted']} | {c['measured']} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    panels = res["panels"]
    fig, ax = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
    ax = np.atleast_1d(ax)
    nus = np.array(res["nus"])
    for a, p in zip(ax, panels):
        lrhs = np.array(p["lrhs"])
        rate = np.clip(np.nan_to_num(np.array(p["rate"], dtype=float), nan=0.0), 0, 1.2)
        im = a.pcolormesh(lrhs, nus, rate, shading="nearest", cmap="viridis", vmin=0, vmax=1.2, rasterized=True)
        a.contour(lrhs, nus, rate, levels=[1.0], colors="w", linewidths=1.0)
        b = [boundary(p["beta"], nu) for nu in nus]
        a.plot(b, nus, "r--", lw=1.5, label="predicted ρ = 1")
        for (name, c), mk in zip(p["converters"].items(), ("o", "s")):
            a.axhline(c["nu"], color="w" if mk == "o" else "orange", ls=":", lw=1)
            a.plot([], [], ls=":", color="w" if mk == "o" else "orange", label=f"{name}: ν={c['nu']:.2f}")
        a.set(xscale="log", xlabel="γh (QHM lr × curvature)", ylabel="ν", title=f"β = {p['beta']}: measured rate",
              xlim=(lrhs[0], lrhs[-1]))
        a.legend(fontsize=6, loc="lower left")
    fig.colorbar(im, ax=list(ax), shrink=0.8, label="measured contraction rate (white: measured = 1)")
    savefig(fig, path)


def main(argv=None):
    return common.run_main(parse_args(argv), NAME, run, report, plot)


if __name__ == "__main__":
    main()
