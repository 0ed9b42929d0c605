"""Heavy ball in continuous time (Lyu et al., "Heavy-Ball Momentum Method in Continuous Time and
Discretization Error Analysis", arXiv 2506.14806): the discrete HB trajectory against ODE models.

Discrete HB is momentum_fused.SGD(lr=η, momentum=β) in float64 (torch's convention: b₀ = g₀, so
x_{k+1} = x_k + β(x_k − x_{k−1}) − η∇f(x_k) with x_{−1} = x₀). The ODE models, in step units (one unit of
time per step), g = ∇f, H = ∇²f, T = ∇³f:

- plain ODE:                ẋ = −η/(1−β) g
- piecewise, order 1:       ẋ = −η A_k g − η² C_k Hg                                on [k, k+1)
- piecewise, order 2:       ... − η³ (E_k H²g + G_k T[g, g])                       on [k, k+1)

The counter-term coefficients follow from a backward-error expansion of the HB recursion derived here
(the paper's construction has the same structure; its exact terms are not copied): with
α₋₁ = b₋₁ = γ₋₁ = δ₋₁ = 0,
  α_k = 1 + βα_{k−1},  b_k = β(α²_{k−1} + b_{k−1}),  γ_k = β(α³_{k−1} + 2α_{k−1}b_{k−1} + γ_{k−1}),
  δ_k = β(α³_{k−1}/2 + α_{k−1}b_{k−1} + δ_{k−1}),
  A_k = α_k,  C_k = b_k + A_k²/2,  E_k = γ_k + A_kC_k − A_k³/6,  G_k = δ_k + A_kC_k/2 − A_k³/6.
The k-dependence is the momentum's transient (β^k); for large k, A → 1/(1−β), C → (1+β)/(2(1−β)³), i.e.
the order-1 model is gradient flow on f + η(1+β)/(4(1−β)²)‖∇f‖² at lr η/(1−β) (GD at the same lr gets
η/(4(1−β))‖∇f‖²: momentum multiplies the implicit gradient-norm penalty by (1+β)/(1−β)), and the order-2
term contains ∇(gᵀHg) = 2H²g + T[g, g], the gradient of the directional smoothness gᵀHg/‖g‖² times ‖g‖².

Part A (discretization error): max_k ‖x_k − X(k)‖ over a fixed effective time τ = kη/(1−β) (10 on the
quadratic, 2 on the network), for η = 0.2(1−β)²/λ_max(∇²f(x₀)) halved 3 times, on a random quadratic (d = 20, eigenvalues in [0.05, 1]) and a diagonal linear network
w = u² − v² (sparse regression, n = 20, d = 40); the ODEs are integrated with RK4 (2 substeps per step).
The expected slopes of log error vs log η are 1, 2, 3.

Part B (implicit regularisation): on the diagonal linear network from a small init, GD at lr η/(1−β) and HB
(η, β = 0.9) run to a fit; reported: the recovery error ‖w − w*‖, ‖w‖₁, the sharpness λ_max(∇²f) and the
mean directional smoothness gᵀHg/‖g‖² along the path, and whether the order-1 models of each predict the
final w.

    python examples/research/hb_continuous.py --quick     # ~30 s
    python examples/research/hb_continuous.py             # the committed run
"""
from __future__ import annotations


import numpy as np
import torch

import common
from common import Timer, fmt_ms, mean_std, savefig

NAME = "hb_continuous"


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--beta", type=float, nargs="+", default=[0.5, 0.9])
    return p.parse_args(argv)


# ------------------------------------------------------------------ problems (float64 numpy)
class Quadratic:
    name = "quadratic"

    def __init__(self, seed, d=20):
        rng = np.random.default_rng(seed)
        Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        self.A = (Q * np.linspace(0.05, 1.0, d)) @ Q.T
        self.x0 = rng.standard_normal(d)

    def f(self, x):
        return 0.5 * x @ self.A @ x

    def g(self, x):
        return self.A @ x

    def hvp(self, x, v):
        return self.A @ v

    def t(self, x, v):  # T[v, v]
        return np.zeros_like(x)


class DiagLinearNet:
    """f(u, v) = ‖X(u² − v²) − y‖² / (2n), x = (u, v); w* sparse; init u = v = scale (w = 0)."""
    name = "diagonal linear net"

    def __init__(self, seed, n=20, d=40, k=3, scale=0.5):
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, d))
        self.wstar = np.zeros(d)
        self.wstar[rng.choice(d, k, replace=False)] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 1.5, k)
        self.y = self.X @ self.wstar
        self.M = self.X.T @ self.X / n
        self.c = self.X.T @ self.y / n
        self.d = d
        self.x0 = np.full(2 * d, scale)

    def w(self, x):
        return x[:self.d] ** 2 - x[self.d:] ** 2

    def f(self, x):
        r = self.X @ self.w(x) - self.y
        return 0.5 * r @ r / len(r)

    def g(self, x):
        u, v = x[:self.d], x[self.d:]
        e = self.M @ self.w(x) - self.c
        return np.concatenate([2 * e * u, -2 * e * v])

    def hvp(self, x, pq):
        u, v, p, q = x[:self.d], x[self.d:], pq[:self.d], pq[self.d:]
        e = self.M @ self.w(x) - self.c
        de = self.M @ (2 * u * p - 2 * v * q)
        return np.concatenate([2 * de * u + 2 * e * p, -2 * de * v - 2 * e * q])

    def t(self, x, pq):
        u, v, p, q = x[:self.d], x[self.d:], pq[:self.d], pq[self.d:]
        de = self.M @ (2 * u * p - 2 * v * q)
        dde = self.M @ (2 * p * p - 2 * q * q)
        return np.concatenate([2 * dde * u + 4 * de * p, -2 * dde * v - 4 * de * q])


# ------------------------------------------------------------------ HB and its ODE models
def hb_discrete(prob, eta, beta, steps):
    import momentum_fused as mf
    x = torch.tensor(prob.x0, dtype=torch.float64)
    opt = mf.SGD([x], lr=eta, momentum=beta) if beta > 0 else mf.SGD([x], lr=eta)
    xs = [prob.x0.copy()]
    for _ in range(steps):
        x.grad = torch.from_numpy(prob.g(x.detach().numpy().copy()))
        opt.step()
        xs.append(x.detach().numpy().copy())
    return np.array(xs)


def coefficients(beta, steps):
    """A_k, C_k, E_k, G_k for k = 0..steps-1 (see the module docstring)."""
    a = b = c = d = 0.0
    out = []
    for _ in range(steps):
        a, b, c, d = 1 + beta * a, beta * (a * a + b), beta * (a ** 3 + 2 * a * b + c), beta * (a ** 3 / 2 + a * b + d)
        A = a
        C = b + A * A / 2
        out.append((A, C, c + A * C - A ** 3 / 6, d + A * C / 2 - A ** 3 / 6))
    return out


def ode(prob, eta, beta, steps, model, sub=4):
    """X(0..steps) of an ODE model: "plain", "order1", "order2" (piecewise), "stationary1" (order 1 without
    the transient: gradient flow on the modified loss)."""
    co = coefficients(beta, steps)
    Ainf, Cinf = 1 / (1 - beta), (1 + beta) / (2 * (1 - beta) ** 3)
    x = prob.x0.copy()
    xs = [x.copy()]
    h = 1.0 / sub
    for k in range(steps):
        A, C, E, G = co[k]
        if model == "plain":
            F = lambda z: -eta * Ainf * prob.g(z)  # noqa: E731
        elif model == "stationary1":
            F = lambda z: -eta * Ainf * (g := prob.g(z)) - eta ** 2 * Cinf * prob.hvp(z, g)  # noqa: E731
        elif model == "order1":
            F = lambda z: -eta * A * (g := prob.g(z)) - eta ** 2 * C * prob.hvp(z, g)  # noqa: E731
        else:
            def F(z, A=A, C=C, E=E, G=G):
                g = prob.g(z)
                hg = prob.hvp(z, g)
                return -eta * A * g - eta ** 2 * C * hg - eta ** 3 * (E * prob.hvp(z, hg) + G * prob.t(z, g))
        for _ in range(sub):
            k1 = F(x)
            k2 = F(x + 0.5 * h * k1)
            k3 = F(x + 0.5 * h * k2)
            k4 = F(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(x.copy())
    return np.array(xs)


MODELS = ("plain", "order1", "order2")


def part_a(args):
    """η = r (1−β)² / λ₀ / 2^i with r = 0.2 and λ₀ = λ_max(∇²f(x₀)): ηλ/(1−β)² is the expansion parameter."""
    nseeds = args.seeds or (1 if args.quick else 3)
    out = []
    for Prob, tau in ((Quadratic, 10.0), (DiagLinearNet, 2.0)):
        for beta in args.beta:
            for seed in range(nseeds):
                prob = Prob(seed)
                lam0 = sharpness(prob, prob.x0)
                etas = [0.2 * (1 - beta) ** 2 / lam0 / 2 ** i for i in range(3 if args.quick else 4)]
                row = dict(problem=Prob.name, beta=beta, seed=seed, etas=etas, tau=tau, err={m: [] for m in MODELS})
                for eta in etas:
                    steps = int(round(tau * (1 - beta) / eta))
                    xd = hb_discrete(prob, eta, beta, steps)
                    for m in MODELS:
                        row["err"][m].append(float(np.abs(xd - ode(prob, eta, beta, steps, m, sub=2)).max()))
                row["slope"] = {m: float(np.polyfit(np.log(etas), np.log(row["err"][m]), 1)[0]) for m in MODELS}
                print(f"  {Prob.name:20s} beta {beta} seed {seed}: slopes "
                      + ", ".join(f"{m} {row['slope'][m]:.2f}" for m in MODELS), flush=True)
                out.append(row)
    return out


# ------------------------------------------------------------------ B. implicit regularisation on the DLN
def dsmooth(prob, x):
    g = prob.g(x)
    gg = g @ g
    return float(g @ prob.hvp(x, g) / gg) if gg > 0 else float("nan")


def sharpness(prob, x):
    n = len(x)
    H = np.stack([prob.hvp(x, e) for e in np.eye(n)])
    return float(np.linalg.eigvalsh(0.5 * (H + H.T)).max())


def part_b(args):
    nseeds = args.seeds or (1 if args.quick else 3)
    beta = 0.9
    steps = 3000 if args.quick else 8000
    lrs = [0.005, 0.02] if args.quick else [0.005, 0.01, 0.02]
    out = []
    for seed in range(nseeds):
        prob = DiagLinearNet(seed, scale=0.1)
        for lr_eff in lrs:
            row = dict(seed=seed, lr_eff=lr_eff, steps=steps)
            for name, eta, b in (("GD", lr_eff, 0.0), ("HB", lr_eff * (1 - beta), beta)):
                xs = hb_discrete(prob, eta, b, steps)
                w = prob.w(xs[-1])
                row[name] = dict(loss=float(prob.f(xs[-1])), rec=float(np.linalg.norm(w - prob.wstar)),
                                 r=eta * sharpness(prob, xs[-1]) / (1 - b) ** 2,
                                 l1=float(np.abs(w).sum()), sharp=sharpness(prob, xs[-1]),
                                 dsmooth=float(np.nanmean([dsmooth(prob, x) for x in xs[:steps // 2:10]])))
                for m in ("plain", "order1"):
                    xo = ode(prob, eta, b, steps, m, sub=2) if b > 0 else None
                    if b == 0:  # GD's models: gradient flow, and flow on f + eta/4 |grad f|^2
                        xo = ode(prob, eta, 0.0, steps, "plain" if m == "plain" else "stationary1", sub=2)
                    row[name][f"dist_{m}"] = float(np.linalg.norm(prob.w(xo[-1]) - w))
            out.append(row)
            print(f"  DLN seed {seed} lr_eff {lr_eff}: " + "; ".join(
                f"{n} loss {row[n]['loss']:.1e} |w-w*| {row[n]['rec']:.3f} |w|1 {row[n]['l1']:.3f} "
                f"sharp {row[n]['sharp']:.2f} dsmooth {row[n]['dsmooth']:.2f}" for n in ("GD", "HB")), flush=True)
    return out


def run(args):
    t = Timer()
    res = dict(a=part_a(args), b=part_b(args))
    res["cpu_seconds"] = t.cpu()
    print(f"done: {t}")
    return res


def report(res):
    lines = ["A. max_k ‖x_k − X(k)‖ over τ = kη/(1−β) ≤ 10 (quadratic) or 2 (DLN); slope of log error vs log η (mean ± std over seeds, "
             f"{len({r['seed'] for r in res['a']})} seeds):", "",
             "| problem | β | η (largest → smallest) | plain ODE | piecewise order 1 | piecewise order 2 |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["problem"], r["beta"]) for r in res["a"]}, key=lambda k: (k[0] != "quadratic", k[1]))
    for prob, beta in keys:
        rows = [r for r in res["a"] if r["problem"] == prob and r["beta"] == beta]
        etas = rows[0]["etas"]
        cells = []
        for m in MODELS:
            s = mean_std([r["slope"][m] for r in rows])
            e0, e1 = (mean_std([r["err"][m][i] for r in rows])[0] for i in (0, -1))
            cells.append(f"slope {s[0]:.2f} ± {s[1]:.2f}; err {e0:.1e} → {e1:.1e}")
        lines.append(f"| {prob} | {beta} | {etas[0]:.3g} → {etas[-1]:.3g} | " + " | ".join(cells) + " |")
    b = res["b"]
    lines += ["", f"B. diagonal linear network (init 0.1, β = 0.9, GD at the same effective lr η/(1−β)), "
              f"{len({r['seed'] for r in b})} seeds:", "",
              "| lr η/(1−β) | method | ηλ_max/(1−β)² | final loss | ‖w − w*‖ | ‖w‖₁ | λ_max(∇²f) at the end | mean gᵀHg/‖g‖² (first half) "
              "| ‖w − w_plain ODE‖ | ‖w − w_order-1 model‖ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for lr in sorted({r["lr_eff"] for r in b}):
        rows = [r for r in b if r["lr_eff"] == lr]
        for n in ("GD", "HB"):
            f = lambda k, d=3: fmt_ms([r[n][k] for r in rows], d)  # noqa: E731
            lines.append(f"| {lr:g} | {n} | {mean_std([r[n]['r'] for r in rows])[0]:.2f} | {mean_std([r[n]['loss'] for r in rows])[0]:.1e} | {f('rec')} | {f('l1')} | "
                         f"{f('sharp', 2)} | {f('dsmooth', 2)} | {f('dist_plain')} | {f('dist_order1')} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probs = ["quadratic", "diagonal linear net"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    labels = {"plain": "plain ODE", "order1": "piecewise, order 1", "order2": "piecewise, order 2"}
    for j, prob in enumerate(probs):
        for beta, ls in zip(sorted({r["beta"] for r in res["a"]}), ("--", "-")):
            rows = [r for r in res["a"] if r["problem"] == prob and r["beta"] == beta]
            if not rows:
                continue
            etas = np.array(rows[0]["etas"])
            for m, c in zip(MODELS, ("C0", "C1", "C2")):
                e = np.array([r["err"][m] for r in rows])
                ax[j].plot(etas, e.mean(0), ls, marker="o", color=c, label=f"{labels[m]}, β={beta}")
        ax[j].set(xscale="log", yscale="log", xlabel="step size η", ylabel="max_k ‖x_k − X(k)‖",
                  title=f"{prob}: HB vs ODE models")
        ax[j].legend(fontsize=7)
    b = res["b"]
    lrs = sorted({r["lr_eff"] for r in b})
    for n, c in (("GD", "C0"), ("HB", "C3")):
        ax[2].errorbar(lrs, [mean_std([r[n]["rec"] for r in b if r["lr_eff"] == lr])[0] for lr in lrs],
                       yerr=[mean_std([r[n]["rec"] for r in b if r["lr_eff"] == lr])[1] for lr in lrs],
                       marker="o", color=c, label=f"{n}: ‖w − w*‖")
        ax[2].errorbar(lrs, [mean_std([r[n]["sharp"] for r in b if r["lr_eff"] == lr])[0] / 10 for lr in lrs],
                       marker="s", ls="--", color=c, label=f"{n}: λ_max(∇²f)/10")
    ax[2].set(xlabel="effective lr η/(1−β)", title="diagonal linear net: implicit bias (β = 0.9)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


def main(argv=None):
    return common.run_main(parse_args(argv), NAME, run, report, plot)


if __name__ == "__main__":
    main()
