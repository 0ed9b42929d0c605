"""Hand-checked goldens for the rules torch.optim does not have (QHM, Signum, signSGD, Lion, FSGDM,
AdamTied): 3 steps on a 3-element float64 tensor, with literal expected values.

The literals were computed once with the scalar pure-Python implementations below (written from
docs/algorithms.md, independent of momentum_fused) and pasted; the scalar implementations stay in this
file as a second oracle that is asserted too, so a change of either the literals or the library is
caught. Inputs: p0 = [1, -2, 0.5]; g1 = [0.5, -1, 2], g2 = [-0.25, 0.5, 1], g3 = [1.5, 0, -0.5].
"""
import math

import pytest
import torch

import momentum_fused as mf
from tolerances import TOL

P0 = [1.0, -2.0, 0.5]
GRADS = [[0.5, -1.0, 2.0], [-0.25, 0.5, 1.0], [1.5, 0.0, -0.5]]


# ------------------------------------------------------------------ the scalar oracles
def sign(x):
    return (x > 0) - (x < 0)  # sign(0) = 0


def qhm_scalar(lr, beta, nu, wd, wd_type, p0=P0, grads=GRADS):
    # "grad": g <- g + wd p ; "direct": p <- p (1 - lr wd)
    # b <- beta b + (1 - beta) g  (b0 = 0) ;  p <- p - lr [(1 - nu) g + nu b]
    p, b = list(p0), [0.0] * len(p0)
    for gs in grads:
        for i, g in enumerate(gs):
            if wd_type == "grad":
                g = g + wd * p[i]
            else:
                p[i] = p[i] * (1 - lr * wd)
            b[i] = beta * b[i] + (1 - beta) * g
            p[i] = p[i] - lr * ((1 - nu) * g + nu * b[i])
    return p, b


def signum_scalar(lr, beta, wd, p0=P0, grads=GRADS):
    # m <- beta m + (1 - beta) g (m0 = 0) ; p <- p (1 - lr wd) - lr sign(m). beta = 0: signSGD
    p, m = list(p0), [0.0] * len(p0)
    for gs in grads:
        for i, g in enumerate(gs):
            m[i] = beta * m[i] + (1 - beta) * g
            p[i] = p[i] * (1 - lr * wd) - lr * sign(m[i])
    return p, m


def lion_scalar(lr, b1, b2, wd, p0=P0, grads=GRADS):
    # c = b1 m + (1 - b1) g ; p <- p (1 - lr wd) - lr sign(c) ; m <- b2 m + (1 - b2) g
    p, m = list(p0), [0.0] * len(p0)
    for gs in grads:
        for i, g in enumerate(gs):
            c = b1 * m[i] + (1 - b1) * g
            p[i] = p[i] * (1 - lr * wd) - lr * sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g
    return p, m


def fsgdm_scalar(lr, wd, c, v, n_stages, sigma, p0=P0, grads=GRADS):
    # s = 1.0, 2.0, ... ; spe = sigma // N ; stage = (s // spe) spe ; u = stage / (stage + c sigma)
    # d = g + wd p ; b <- d on step 1, else u b + v d ; p <- p - lr b
    p, b = list(p0), [0.0] * len(p0)
    s = 1.0
    us = []
    for t, gs in enumerate(grads):
        spe = sigma // n_stages
        stage = (s // spe) * spe
        u = stage / (stage + c * sigma)
        us.append(u)
        for i, g in enumerate(gs):
            d = g + wd * p[i]
            b[i] = d if t == 0 else u * b[i] + v * d
            p[i] = p[i] - lr * b[i]
        s += 1.0
    return p, b, us, s


def adam_tied_scalar(lr, beta, eps, wd, p0=P0, grads=GRADS):
    # g <- g + wd p ; m <- beta m + (1-beta) g ; v <- beta v + (1-beta) g^2 ; bc = 1 - beta^t
    # p <- p - lr (m / bc) / (sqrt(v / bc) + eps)
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            g = g + wd * p[i]
            m[i] = beta * m[i] + (1 - beta) * g
            v[i] = beta * v[i] + (1 - beta) * g * g
            bc = 1 - beta ** t
            p[i] = p[i] - lr * (m[i] / bc) / (math.sqrt(v[i] / bc) + eps)
    return p, m, v


# ------------------------------------------------------------------ running the library
def _run(cls, **kw):
    p = torch.tensor(P0, dtype=torch.float64)
    opt = cls([p], **kw)
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p, opt.state[p], opt


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), **TOL[torch.float64])


# ------------------------------------------------------------------ goldens
def test_qhm_grad_decay_golden():
    kw = dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1, weight_decay_type="grad")
    p_lit = [0.918084413082, -1.947168826164, 0.3715960676135]
    b_lit = [0.19469672139999997, -0.08939344279999999, 0.21359400644999996]
    p_sc, b_sc = qhm_scalar(0.1, 0.9, 0.7, 0.1, "grad")
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(b_sc, dtype=torch.float64), b_lit)
    p, st, _ = _run(mf.QHM, **kw)
    _close(p, p_lit)
    _close(st["momentum_buffer"], b_lit)


def test_qhm_direct_decay_golden():
    kw = dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1, weight_decay_type="direct")
    p_lit = [0.90144615, -1.9138922999999999, 0.36437810000000004]
    b_lit = [0.16799999999999995, -0.036, 0.20199999999999996]
    p_sc, b_sc = qhm_scalar(0.1, 0.9, 0.7, 0.1, "direct")
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(b_sc, dtype=torch.float64), b_lit)
    p, st, _ = _run(mf.QHM, **kw)
    _close(p, p_lit)
    _close(st["momentum_buffer"], b_lit)


def test_signum_golden():
    # element 1: m = -0.5, then 0.5 (-0.5) + 0.5 (0.5) = 0 exactly, then 0: sign(0) = 0, no move
    p_lit = [0.977022989, -1.984025988, 0.4685314895]
    m_lit = [0.75, 0.0, 0.25]
    p_sc, m_sc = signum_scalar(0.01, 0.5, 0.1)
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(m_sc, dtype=torch.float64), m_lit)
    p, st, _ = _run(mf.Signum, lr=0.01, momentum=0.5, weight_decay=0.1)
    _close(p, p_lit)
    _close(st["momentum_buffer"], m_lit)


def test_signsgd_golden():
    # step 3 has g = 0 in element 1: sign(0) = 0, only the decay moves it
    p_lit = [0.987012989, -1.994015988, 0.4885314895]
    p_sc, _ = signum_scalar(0.01, 0.0, 0.1)
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    p, st, _ = _run(mf.SignSGD, lr=0.01, weight_decay=0.1)
    _close(p, p_lit)
    assert "momentum_buffer" not in st  # signSGD keeps no buffer


def test_lion_golden():
    p_lit = [0.987012989, -1.984015988, 0.4685314895]
    m_lit = [0.32399999999999995, -0.048, 0.31599999999999995]
    p_sc, m_sc = lion_scalar(0.01, 0.5, 0.8, 0.1)
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(m_sc, dtype=torch.float64), m_lit)
    p, st, _ = _run(mf.Lion, lr=0.01, betas=(0.5, 0.8), weight_decay=0.1)
    _close(p, p_lit)
    _close(st["exp_avg"], m_lit)


def test_fsgdm_golden():
    # sigma = 6, N = 3: spe = 2; s = 1 -> stage 0, u = 0; s = 2, 3 -> stage 2, u = 2 / (2 + 0.5 * 6) = 0.4
    kw = dict(lr=0.1, weight_decay=0.1, c_scaling=0.5, v_coefficient=0.8, n_stages=3, sigma=6)
    p_lit = [0.79644416, -1.83288832, 0.10385087999999999]
    b_lit = [1.3203584, -0.2407168, 0.2678912000000001]
    p_sc, b_sc, us, s_end = fsgdm_scalar(0.1, 0.1, 0.5, 0.8, 3, 6)
    assert us == [0.0, 0.4, 0.4] and s_end == 4.0
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(b_sc, dtype=torch.float64), b_lit)
    p, st, opt = _run(mf.FSGDM, **kw)
    _close(p, p_lit)
    _close(st["momentum_buffer"], b_lit)
    assert opt.param_groups[0]["step"] == 4.0


def test_adam_tied_golden():
    p_lit = [0.9782174691536245, -1.9803841847408181, 0.4744006537656257]
    m_lit = [0.1948620782585756, -0.0899620062280835, 0.21526498462695026]
    v_lit = [0.2867389592306092, 0.12873511151204936, 0.45986448414701975]
    p_sc, m_sc, v_sc = adam_tied_scalar(0.01, 0.9, 1e-8, 0.1)
    _close(torch.tensor(p_sc, dtype=torch.float64), p_lit)
    _close(torch.tensor(m_sc, dtype=torch.float64), m_lit)
    _close(torch.tensor(v_sc, dtype=torch.float64), v_lit)
    p, st, _ = _run(mf.AdamTied, lr=0.01, beta=0.9, eps=1e-8, weight_decay=0.1)
    _close(p, p_lit)
    _close(st["exp_avg"], m_lit)
    _close(st["exp_avg_sq"], v_lit)
    assert float(st["step"]) == 3.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("which", ["qhm_grad", "qhm_direct", "signum", "lion", "fsgdm", "adam_tied"])
def test_scalar_oracle_random_inputs(which, seed):
    """The scalar oracles on random inputs, 8 steps, 5 elements (beyond the pasted literals)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(8)]
    gl = [g.tolist() for g in grads]
    if which.startswith("qhm"):
        wt = which.split("_")[1]
        cls, kw = mf.QHM, dict(lr=0.05, momentum=0.8, nu=0.6, weight_decay=0.2, weight_decay_type=wt)
        exp_p, exp_b = qhm_scalar(0.05, 0.8, 0.6, 0.2, wt, p0.tolist(), gl)
        keys = {"momentum_buffer": exp_b}
    elif which == "signum":
        cls, kw = mf.Signum, dict(lr=0.01, momentum=0.7, weight_decay=0.3)
        exp_p, exp_m = signum_scalar(0.01, 0.7, 0.3, p0.tolist(), gl)
        keys = {"momentum_buffer": exp_m}
    elif which == "lion":
        cls, kw = mf.Lion, dict(lr=0.01, betas=(0.6, 0.95), weight_decay=0.3)
        exp_p, exp_m = lion_scalar(0.01, 0.6, 0.95, 0.3, p0.tolist(), gl)
        keys = {"exp_avg": exp_m}
    elif which == "fsgdm":
        cls, kw = mf.FSGDM, dict(lr=0.05, weight_decay=0.1, c_scaling=0.2, v_coefficient=1.0, n_stages=4, sigma=8)
        exp_p, exp_b, us, _ = fsgdm_scalar(0.05, 0.1, 0.2, 1.0, 4, 8, p0.tolist(), gl)
        assert len(set(us)) >= 3  # u changes several times within the run
        keys = {"momentum_buffer": exp_b}
    else:
        cls, kw = mf.AdamTied, dict(lr=0.01, beta=0.8, eps=1e-8, weight_decay=0.1)
        exp_p, exp_m, exp_v = adam_tied_scalar(0.01, 0.8, 1e-8, 0.1, p0.tolist(), gl)
        keys = {"exp_avg": exp_m, "exp_avg_sq": exp_v}
    p = p0.clone()
    opt = cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    _close(p, exp_p)
    for k, v in keys.items():
        _close(opt.state[p][k], v)
