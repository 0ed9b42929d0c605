"""Schedule-Free SGD / AdamW (docs/algorithms.md §6, schedule_free v1.4), the WSD schedule and the
Polyak step. Oracles:
- fixed lr: 3-step goldens written below as literals, produced by ``sf_scalar`` (an independent
  scalar pure-Python implementation of the memory-efficient form; the test asserts it too);
- eval-mode x: ``sf_xyz`` (the explicit x, y, z form, float64, 10 steps);
- weight rules: the algebraic identity lr_t == lr_max while lr never decreases, and a hand formula
  for c under a decaying schedule;
- Polyak: a hand computation of gamma_t from the explicit x, y, z form, and convergence on least
  squares with f* = 0.
"""
import copy
import math

import pytest
import torch

import momentum_fused as mf
from momentum_fused.schedules import wsd, wsd_factor
from tolerances import TOL

F64 = torch.float64
Y0 = [0.5, -1.25, 2.0]
A = [1.0, 0.5, 2.0]
B = [0.1, -0.2, 0.3]


# ------------------------------------------------------------------ independent oracles
def sf_scalar(kind, y0, a, b, steps, lr, beta, beta2=0.999, eps=1e-8, wd=0.0, warmup=0, r=0.0, wlp=2.0):
    """Scalar schedule-free (memory-efficient form, schedule_free v1.4), gradient g_i = a_i y_i + b_i."""
    n = len(y0)
    y, z, v = list(y0), list(y0), [0.0] * n
    k, lr_max, wsum = 0, -1.0, 0.0
    for _ in range(steps):
        sched = (k + 1) / warmup if k < warmup else 1.0
        gam = lr * sched
        lr_max = max(lr_max, gam)
        w = (k + 1) ** r * lr_max ** wlp
        wsum += w
        c = w / wsum if wsum != 0 else 0.0
        for i in range(n):
            g = a[i] * y[i] + b[i]
            if kind == "sgd":
                d = g + wd * y[i]
            else:
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                d = g / (math.sqrt(v[i] / (1 - beta2 ** (k + 1))) + eps) + wd * y[i]
            y[i] = y[i] + c * (z[i] - y[i])
            y[i] = y[i] + gam * (beta * (1 - c) - 1) * d
            z[i] = z[i] - gam * d
        k += 1
    return y, z, (k, lr_max, wsum)


def sf_xyz(kind, x0, grad_fn, lrs, beta, beta2=0.999, eps=1e-8, wd=0.0, r=0.0, wlp=2.0, weight_rule="lr_max"):
    """Explicit (non-memory-efficient) form of docs/algorithms.md §6, float64: returns the list of x_t.
    ``lrs`` are the scheduled lrs gamma_k (warmup already applied)."""
    x, z = x0.clone(), x0.clone()
    v = torch.zeros_like(x0)
    lr_max, wsum, xs = -1.0, 0.0, []
    for k, gam in enumerate(lrs):
        y = (1 - beta) * z + beta * x
        g = grad_fn(y)
        if kind == "sgd":
            d = g + wd * y
        else:
            v = beta2 * v + (1 - beta2) * g * g
            d = g / ((v / (1 - beta2 ** (k + 1))).sqrt() + eps) + wd * y
        lr_max = max(lr_max, gam)
        w = (k + 1) ** r * (lr_max if weight_rule == "lr_max" else gam) ** wlp
        wsum += w
        c = w / wsum
        z = z - gam * d
        x = (1 - c) * x + c * z
        xs.append(x.clone())
    return xs


# Goldens: sf_scalar(kind, Y0, A, B, 3, **hp) -> (y_3, z_3), printed with repr() once.
GOLDEN = {
    "sgd_plain": ("sgd", dict(lr=0.5, beta=0.9),
                  [0.05150000000000001, -0.5142031250000001, -0.14999999999999997],
                  [-0.05875000000000001, -0.26128906249999995, -0.15000000000000002]),
    "sgd_wd_warmup_r": ("sgd", dict(lr=0.5, beta=0.8, wd=0.1, warmup=2, r=1.0),
                        [0.033603591269841304, -0.43133071428571423, -0.1834696428571428],
                        [-0.015675694444444443, -0.3153583333333333, -0.24006249999999996]),
    "adamw_plain": ("adamw", dict(lr=0.1, beta=0.9),
                    [0.3020193727402699, -1.0440084942415808, 1.7930411627405545],
                    [0.22295330067218944, -0.9576431663733951, 1.705797319826723]),
    "adamw_wd_warmup_r": ("adamw", dict(lr=0.1, beta=0.8, beta2=0.99, wd=0.1, warmup=2, r=1.0),
                          [0.29331863320055357, -1.018449309523509, 1.7516782445597456],
                          [0.2591704400326614, -0.9780940195600477, 1.7081397263824136]),
}


def make_opt(kind, params, hp):
    hp = dict(hp)
    kw = dict(lr=hp.pop("lr"), weight_decay=hp.pop("wd", 0.0), warmup_steps=hp.pop("warmup", 0),
              r=hp.pop("r", 0.0))
    beta = hp.pop("beta")
    if kind == "sgd":
        return mf.SGDScheduleFree(params, momentum=beta, **kw)
    return mf.AdamWScheduleFree(params, betas=(beta, hp.pop("beta2", 0.999)), **kw)


def lin_grad(p, dtype=F64):
    """Sets p.grad = a * p + b (the gradient sf_scalar uses)."""
    p.grad = torch.tensor(A, dtype=dtype) * p.detach() + torch.tensor(B, dtype=dtype)


# ------------------------------------------------------------------ goldens
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_three_steps(name):
    kind, hp, y3, z3 = GOLDEN[name]
    ys, zs, _ = sf_scalar(kind, Y0, A, B, 3, **hp)
    torch.testing.assert_close(torch.tensor(ys, dtype=F64), torch.tensor(y3, dtype=F64), **TOL[F64])
    torch.testing.assert_close(torch.tensor(zs, dtype=F64), torch.tensor(z3, dtype=F64), **TOL[F64])
    p = torch.tensor(Y0, dtype=F64, requires_grad=True)
    opt = make_opt(kind, [p], hp)
    for _ in range(3):
        lin_grad(p)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(y3, dtype=F64), **TOL[F64])
    torch.testing.assert_close(opt.state[p]["z"], torch.tensor(z3, dtype=F64), **TOL[F64])
    g = opt.param_groups[0]
    assert g["k"] == 3 and g["train_mode"] is True


def test_defaults_and_exports():
    p = torch.zeros(2, requires_grad=True)
    s = mf.SGDScheduleFree([p]).defaults
    assert (s["lr"], s["momentum"], s["weight_decay"], s["warmup_steps"], s["r"], s["weight_lr_power"],
            s["weight_rule"]) == (1.0, 0.9, 0.0, 0, 0.0, 2.0, "lr_max")
    a = mf.AdamWScheduleFree([p]).defaults
    assert (a["lr"], a["betas"], a["eps"], a["weight_lr_power"], a["r"], a["warmup_steps"], a["weight_decay"],
            a["inner_momentum"]) == (0.0025, (0.9, 0.999), 1e-8, 2.0, 0.0, 0, 0.0, 0.0)
    assert mf.optim.SGDScheduleFree is mf.SGDScheduleFree and mf.optim.AdamWScheduleFree is mf.AdamWScheduleFree
    opt = mf.AdamWScheduleFree([p])
    assert opt.training and all(g["train_mode"] for g in opt.state_dict()["param_groups"])


def test_z_starts_as_y_and_no_grad_params_untouched():
    p = torch.tensor(Y0, dtype=F64, requires_grad=True)
    q = torch.ones(2, dtype=F64, requires_grad=True)
    opt = mf.AdamWScheduleFree([p, q], lr=0.0)  # lr 0: weight 0 -> c = 0, nothing moves
    lin_grad(p)
    opt.step()
    assert torch.equal(opt.state[p]["z"], torch.tensor(Y0, dtype=F64)) and torch.equal(p.detach(), opt.state[p]["z"])
    assert q not in opt.state and opt.param_groups[0]["sf_c"] == 0.0


# ------------------------------------------------------------------ weight rules
def _run(kind, steps, hp, sched=None, dtype=F64):
    p = torch.tensor(Y0, dtype=dtype, requires_grad=True)
    opt = make_opt(kind, [p], dict(hp)) if not isinstance(hp, tuple) else hp[0]([p], **hp[1])
    s = sched(opt) if sched else None
    cs = []
    for t in range(steps):
        lin_grad(p, dtype)
        opt.step()
        cs.append(opt.param_groups[0]["sf_c"])
        if s:
            s.step()
    return p.detach().clone(), opt, cs


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
@pytest.mark.parametrize("setting", ["constant", "warmup", "warmup_sched"])
def test_lr_t_equals_lr_max_while_lr_never_decreases(cls, setting):
    kw = dict(lr=0.05, warmup_steps=4 if setting == "warmup" else 0, r=0.5)
    sched = (lambda o: wsd(o, warmup=5, stable=10, decay=3)) if setting == "warmup_sched" else None
    pa, oa, ca = _run(None, 8, (cls, dict(kw, weight_rule="lr_max")), sched)
    pb, ob, cb = _run(None, 8, (cls, dict(kw, weight_rule="lr_t")), sched)
    assert torch.equal(pa, pb) and ca == cb
    assert torch.equal(oa.state_dict()["state"][0]["z"], ob.state_dict()["state"][0]["z"])


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_t_differs_under_decay_and_follows_scheduled_lr(cls, schedule):
    def sched(o):
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8)
        return wsd(o, warmup=2, stable=2, decay=4, decay_shape="cosine")
    kw = dict(lr=0.05, weight_lr_power=1.0)
    pa, _, ca = _run(None, 8, (cls, dict(kw, weight_rule="lr_max")), sched)
    pb, ob, cb = _run(None, 8, (cls, dict(kw, weight_rule="lr_t")), sched)
    assert not torch.allclose(pa, pb, rtol=1e-6, atol=0) and ca != cb
    # power 1: c_{t+1} = gamma_{t+1} / sum_i gamma_i with gamma the scheduled lr of each step
    lrs = [0.05 * (0.5 * (1 + math.cos(math.pi * t / 8)) if schedule == "cosine"
                   else wsd_factor(t, 2, 2, 4, 0.0, "cosine")) for t in range(8)]
    expect = [lrs[t] / sum(lrs[:t + 1]) for t in range(8)]
    assert cb == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_wsd_factors_and_validation():
    f = [wsd_factor(s, 2, 2, 4, 0.1, "linear") for s in range(10)]
    assert f == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1])
    assert wsd_factor(5, 0, 0, 4, 0.0, "sqrt") == pytest.approx(0.0)
    assert wsd_factor(0, 0, 0, 4, 0.0, "sqrt") == pytest.approx(1 - math.sqrt(0.25))
    assert wsd_factor(1, 0, 0, 4, 0.0, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="invalid decay_shape"):  # (returned 0.0: found 2026-12-05)
        wsd_factor(5, 1, 1, 4, 0.0, "exp")
    p = torch.zeros(2, requires_grad=True)
    opt = mf.SGDScheduleFree([p], lr=0.5)
    s = wsd(opt, 2, 2, 4)
    assert isinstance(s, torch.optim.lr_scheduler.LambdaLR) and opt.param_groups[0]["lr"] == 0.25
    for bad, exc in [(dict(warmup=-1), ValueError), (dict(stable=1.5), TypeError), (dict(final_lr_frac=1.5), ValueError),
                     (dict(decay_shape="exp"), ValueError), (dict(warmup=0, stable=0, decay=0), ValueError)]:
        kw = {**dict(warmup=2, stable=2, decay=4), **bad}
        with pytest.raises(exc):
            wsd(opt, **kw)
    with pytest.raises(ValueError, match="numeric lr"):
        wsd(mf.SGDScheduleFree([p], lr="polyak"), 1, 1, 1)


# ------------------------------------------------------------------ train / eval
QUAD = torch.tensor([[2.0, 0.3, 0.0, 0.1], [0.3, 1.0, 0.2, 0.0], [0.0, 0.2, 0.5, 0.1], [0.1, 0.0, 0.1, 1.5]],
                    dtype=F64)
QB = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=F64)
X0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)


def quad_grad(y):
    return QUAD @ y - QB


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_eval_x_matches_explicit_xyz_form(kind):
    beta, lr, warm, wd = 0.85, (0.1 if kind == "sgd" else 0.05), 3, 0.05
    lrs = [lr * ((k + 1) / warm if k < warm else 1.0) for k in range(10)]
    xs = sf_xyz(kind, X0, quad_grad, lrs, beta, beta2=0.99, wd=wd, r=1.0)
    p = X0.clone().requires_grad_()
    opt = (mf.SGDScheduleFree([p], lr=lr, momentum=beta, weight_decay=wd, warmup_steps=warm, r=1.0)
           if kind == "sgd" else
           mf.AdamWScheduleFree([p], lr=lr, betas=(beta, 0.99), weight_decay=wd, warmup_steps=warm, r=1.0))
    for t in range(10):
        p.grad = quad_grad(p.detach())
        opt.step()
        if t in (0, 4, 9):
            opt.eval()
            torch.testing.assert_close(p.detach(), xs[t], **TOL[F64])
            opt.train()


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_train_eval_round_trip_and_idempotence(cls):
    p = X0.clone().requires_grad_()
    opt = cls([p], lr=0.05, warmup_steps=2)
    opt.eval()
    opt.train()  # before any step: no z, nothing changes
    assert torch.equal(p.detach(), X0)
    for _ in range(5):
        p.grad = quad_grad(p.detach())
        opt.step()
    y = p.detach().clone()
    opt.eval()
    x = p.detach().clone()
    assert not torch.allclose(x, y) and not opt.training
    assert opt.state_dict()["param_groups"][0]["train_mode"] is False
    opt.eval()
    assert torch.equal(p.detach(), x)  # eval twice: harmless
    opt.train()
    torch.testing.assert_close(p.detach(), y, **TOL[F64])
    y2 = p.detach().clone()
    opt.train()
    assert torch.equal(p.detach(), y2) and opt.training
    opt.eval()
    q = torch.zeros(4, dtype=F64, requires_grad=True)
    opt.add_param_group(dict(params=[q]))  # joins the current (eval) mode
    assert opt.param_groups[1]["train_mode"] is False


# ------------------------------------------------------------------ errors before any change
def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in st.items()}
             for i, st in enumerate(opt.state.values())}
    groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    return params, state, groups


def assert_same(a, b):
    assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        assert all(torch.equal(a[1][i][k], b[1][i][k]) for k in a[1][i])
    assert a[2] == b[2]


def _warm(cls, steps=3, **kw):
    p = X0.clone().requires_grad_()
    opt = cls([p], **kw)
    for _ in range(steps):
        p.grad = quad_grad(p.detach())
        opt.step()
    p.grad = quad_grad(p.detach())
    return p, opt


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_errors_leave_everything_unchanged(cls):
    calls = []

    def closure_of(value):
        def closure():
            calls.append(1)
            return torch.tensor(value, dtype=F64)
        return closure

    # eval mode: raises before even running the closure
    p, opt = _warm(cls, lr=0.05)
    opt.eval()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step(closure_of(1.0))
    assert_same(before, snapshot(opt)) and not calls

    # non-finite loss (fixed lr and polyak)
    for lr in (0.05, "polyak"):
        for bad in (float("nan"), float("inf")):
            p, opt = _warm(cls, lr=lr) if lr != "polyak" else _warm(cls, steps=0, lr=lr)
            if lr == "polyak":
                for _ in range(2):
                    opt.step(lambda: (setattr(p, "grad", quad_grad(p.detach())), torch.tensor(1.0, dtype=F64))[1])
            before = snapshot(opt)
            with pytest.raises(ValueError, match="non-finite loss"):
                opt.step(closure_of(bad))
            assert_same(before, snapshot(opt))
    # ... as a NumPy number, or in a loss of several elements (both were stepped silently before 2026-12-06)
    import numpy as np
    for loss in (np.float32("nan"), np.float64("inf"), torch.tensor([1.0, float("nan")])):
        p, opt = _warm(cls, lr=0.05)
        before = snapshot(opt)
        with pytest.raises(ValueError, match="non-finite loss"):
            opt.step(lambda loss=loss: loss)
        assert_same(before, snapshot(opt))
    p, opt = _warm(cls, steps=0, lr="polyak")  # a NumPy float32 loss is a number for the Polyak step too
    p.grad = quad_grad(p.detach())
    opt.step(lambda: np.float32(1.0))
    # ... and a NumPy array (0-d or of several elements) or a complex tensor (2026-12-07: a NaN array was stepped
    # silently, a complex loss raised float()'s TypeError even where its value is not used)
    for loss in (np.array(float("nan")), np.array([1.0, float("nan")]), torch.tensor(complex(1.0, float("nan")))):
        p, opt = _warm(cls, lr=0.05)
        before = snapshot(opt)
        with pytest.raises(ValueError, match="non-finite loss"):
            opt.step(lambda loss=loss: loss)
        assert_same(before, snapshot(opt))
    p, opt = _warm(cls, lr=0.05)  # a finite complex loss: the step is taken, as torch.optim's
    opt.step(lambda: torch.tensor(complex(1.0, 2.0)))
    p, opt = _warm(cls, steps=0, lr="polyak")  # ... but it is no Polyak loss
    p.grad = quad_grad(p.detach())
    before = snapshot(opt)
    with pytest.raises(ValueError, match="real number"):
        opt.step(lambda: torch.tensor(complex(1.0, 2.0)))
    assert_same(before, snapshot(opt))
    p, opt = _warm(cls, lr=0.05)  # a misspelt lr string is named as such, not as "polyak needs a closure"
    opt.param_groups[0]["lr"] = "polyax"
    with pytest.raises((ValueError, TypeError), match="lr") as err:
        opt.step()
    assert "closure" not in str(err.value)

    # polyak without a closure, or a closure that returns no number
    p, opt = _warm(cls, steps=0, lr="polyak")
    before = snapshot(opt)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="return the loss"):
        opt.step(lambda: None)
    assert_same(before, snapshot(opt))

    # hyperparameters broken mid-run (beta outside (0, 1), warmup, lr, M, weight_rule)
    bkey = "momentum" if cls is mf.SGDScheduleFree else "betas"
    bads = [(bkey, v if bkey == "momentum" else (v, 0.999)) for v in (0.0, 1.0, 1.5, -0.1)]
    bads += [("warmup_steps", -1), ("warmup_steps", 2.5), ("warmup_steps", True), ("lr", -0.1), ("lr", "fast"),
             ("M", 0.0), ("polyak_max_lr", 0.0), ("weight_rule", "bogus"), ("r", -1.0), ("weight_decay", -1.0),
             ("k", -1)]
    for key, value in bads:
        p, opt = _warm(cls, lr=0.05)
        before = snapshot(opt)
        opt.param_groups[0][key] = value
        with pytest.raises((ValueError, TypeError)):
            opt.step()
        opt.param_groups[0][key] = before[2][0][key]
        assert_same(before, snapshot(opt))
        if key != "k":  # and at construction (k is a host counter, not an argument)
            with pytest.raises((ValueError, TypeError)):
                cls([torch.zeros(2, requires_grad=True)], **{key: value})


def test_invalid_combinations():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="maximize"):
        mf.SGDScheduleFree([p], lr="polyak", maximize=True)
    with pytest.raises(ValueError, match="inner_momentum"):
        mf.AdamWScheduleFree([p], lr="polyak", inner_momentum=0.9)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        mf.AdamWScheduleFree([p], betas=(0.0, 0.999))


# ------------------------------------------------------------------ inner momentum (AdamW option)
def test_inner_momentum_step_one_equals_upstream_then_differs():
    def run(mu, steps):
        p = X0.clone().requires_grad_()
        opt = mf.AdamWScheduleFree([p], lr=0.05, inner_momentum=mu)
        for _ in range(steps):
            p.grad = quad_grad(p.detach())
            opt.step()
        return p.detach(), opt

    a, _ = run(0.0, 1)
    b, ob = run(0.9, 1)
    torch.testing.assert_close(a, b, **TOL[F64])  # bias-corrected EMA: m_1 / (1 - mu) = g/D
    assert "exp_avg" in ob.state[ob.param_groups[0]["params"][0]]
    a, oa = run(0.0, 4)
    b, _ = run(0.9, 4)
    assert not torch.allclose(a, b, rtol=1e-6) and "exp_avg" not in oa.state[oa.param_groups[0]["params"][0]]


# ------------------------------------------------------------------ Polyak
def ls_problem():
    g = torch.Generator().manual_seed(0)
    Am = torch.randn(20, 6, generator=g, dtype=F64)
    xs = torch.randn(6, generator=g, dtype=F64)
    return Am, Am @ xs  # consistent system: f* = 0


def polyak_hand(kind, Am, bv, x0, steps, beta, beta2=0.999, eps=1e-8, M=1e-8, f_star=0.0):
    """gamma_t = [f(y) - f* + beta <g, z - x>]_+ / max(||g||^2_{D^-1}, M), explicit x, y, z form, c = 1/(t+1)."""
    x, z, v = x0.clone(), x0.clone(), torch.zeros_like(x0)
    gammas = []
    for t in range(steps):
        y = (1 - beta) * z + beta * x
        r = Am @ y - bv
        f = 0.5 * float((r * r).mean())
        g = Am.T @ r / Am.shape[0]
        if kind == "sgd":
            D = torch.ones_like(g)
        else:
            v = beta2 * v + (1 - beta2) * g * g
            D = (v / (1 - beta2 ** (t + 1))).sqrt() + eps
        gam = max(f - f_star + beta * float(g @ (z - x)), 0.0) / max(float((g * g / D).sum()), M)
        gammas.append(gam)
        z = z - gam * g / D
        c = 1.0 / (t + 1)
        x = (1 - c) * x + c * z
    return gammas


def _ls_closure(opt, p, Am, bv):
    def closure():
        opt.zero_grad()
        r = Am @ p - bv
        loss = 0.5 * (r * r).mean()
        loss.backward()
        return loss.detach()
    return closure


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_polyak_gamma_matches_hand_computation(kind):
    Am, bv = ls_problem()
    x0 = torch.zeros(6, dtype=F64)
    hand = polyak_hand(kind, Am, bv, x0, 3, beta=0.9)
    assert hand[2] != pytest.approx(polyak_hand(kind, Am, bv, x0, 3, beta=0.9 + 1e-3)[2], rel=1e-9)
    p = x0.clone().requires_grad_()
    opt = mf.SGDScheduleFree([p], lr="polyak") if kind == "sgd" else mf.AdamWScheduleFree([p], lr="polyak")
    closure = _ls_closure(opt, p, Am, bv)
    got = []
    for _ in range(3):
        opt.step(closure)
        got.append(opt.param_groups[0]["polyak_lr"])
        assert opt.param_groups[0]["scheduled_lr"] == got[-1]
    assert got == pytest.approx(hand, rel=1e-10)
    assert opt.param_groups[0]["sf_c"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_polyak_converges_on_least_squares(cls):
    Am, bv = ls_problem()
    p = torch.zeros(6, dtype=F64, requires_grad=True)
    opt = cls([p], lr="polyak")
    closure = _ls_closure(opt, p, Am, bv)
    first = float(opt.step(closure))
    for _ in range(200):
        last = float(opt.step(closure))
    assert last < first * 1e-2, (first, last)
    opt.eval()
    assert float(closure()) < first * 1e-2


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_polyak_constant_loss_no_division_by_zero(cls):
    p = X0.clone().requires_grad_()
    opt = cls([p], lr="polyak", M=0.5)

    def closure():
        p.grad = torch.zeros_like(p)
        return torch.tensor(3.0, dtype=F64)
    for _ in range(3):
        opt.step(closure)
        g = opt.param_groups[0]
        assert g["polyak_lr"] == 0.0 and math.isfinite(g["scheduled_lr"])  # no gradient: no Polyak step
    assert torch.equal(p.detach(), X0)
    opt2 = cls([p], lr="polyak", polyak_max_lr=0.25, f_star=1.0, M=0.5)

    def closure2():
        p.grad = torch.full_like(p, 1e-3)  # a tiny gradient: (f - f*)/M, capped
        return torch.tensor(3.0, dtype=F64)
    opt2.step(closure2)
    assert opt2.param_groups[0]["polyak_lr"] == 0.25
    p2 = X0.clone().requires_grad_()
    opt3 = cls([p2], lr="polyak", f_star=5.0)  # f < f*: clipped at 0
    opt3.step(lambda: (setattr(p2, "grad", torch.ones_like(p2)), torch.tensor(3.0, dtype=F64))[1])
    assert opt3.param_groups[0]["polyak_lr"] == 0.0 and torch.equal(p2.detach(), X0)


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_polyak_group_with_zero_gradients_does_not_move_under_weight_decay(cls):
    """A group whose params the batch did not use (zero gradients, zero_grad(set_to_none=False)) took
    gamma = (f - f*)/M = 1e8 f, which multiplied its weight decay: the group diverged at once. It takes no step."""
    w, unused = torch.randn(5, dtype=F64, requires_grad=True), torch.randn(3, dtype=F64, requires_grad=True)
    start = unused.detach().clone()
    opt = cls([dict(params=[w]), dict(params=[unused])], lr="polyak", weight_decay=0.01)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = ((w - 1) ** 2).sum() + 1.0
        loss.backward()
        if unused.grad is None:
            unused.grad = torch.zeros_like(unused)
        return loss
    for _ in range(3):
        opt.step(closure)
    assert opt.param_groups[1]["polyak_lr"] == 0.0 and opt.param_groups[0]["polyak_lr"] > 0.0
    assert torch.equal(opt.state[unused]["z"], start) and torch.equal(unused.detach(), start)


# ------------------------------------------------------------------ checkpoints
def _train(cls, kw, steps, p=None, opt=None, sched=None, make_sched=None):
    if p is None:
        p = X0.clone().requires_grad_()
        opt = cls([p], **kw)
        sched = make_sched(opt) if make_sched else None
    for t in range(steps):
        p.grad = quad_grad(p.detach())
        opt.step()
        if sched:
            sched.step()
    return p, opt, sched


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_resume_mid_warmup_equals_uninterrupted(cls):
    kw = dict(lr=0.05, warmup_steps=6, r=1.0)
    ref, ref_opt, _ = _train(cls, kw, 8)
    p, opt, _ = _train(cls, kw, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["k"] == 3 and sd["param_groups"][0]["lr_max"] < 0.05
    p2 = p.detach().clone().requires_grad_()
    opt2 = cls([p2], **kw)
    opt2.load_state_dict(sd)
    _train(cls, kw, 5, p2, opt2)
    assert torch.equal(p2.detach(), ref.detach())
    assert torch.equal(opt2.state[p2]["z"], ref_opt.state[ref]["z"])
    # torch's load_state_dict may add its own bookkeeping keys; every key of the reference group matches
    assert all(opt2.param_groups[0][k] == v for k, v in ref_opt.param_groups[0].items() if k != "params")


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_resume_mid_wsd_decay_saved_in_eval_mode(cls):
    kw = dict(lr=0.05, weight_rule="lr_t")
    mk = lambda o: wsd(o, warmup=2, stable=3, decay=6, decay_shape="sqrt")  # noqa: E731
    ref, ref_opt, ref_s = _train(cls, kw, 8, make_sched=mk)
    ref_opt.eval()
    ref_opt.train()
    _train(cls, kw, 4, ref, ref_opt, ref_s)

    p, opt, s = _train(cls, kw, 8, make_sched=mk)
    opt.eval()  # save the model as x, as upstream recommends
    osd, ssd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(s.state_dict()), p.detach().clone()
    assert osd["param_groups"][0]["train_mode"] is False
    p2 = weights.clone().requires_grad_()
    opt2 = cls([p2], **kw)
    s2 = mk(opt2)
    opt2.load_state_dict(osd)
    s2.load_state_dict(ssd)
    assert not opt2.training
    with pytest.raises(RuntimeError, match="train"):
        opt2.step()
    opt2.train()
    _train(cls, kw, 4, p2, opt2, s2)
    assert torch.equal(p2.detach(), ref.detach())
    assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 0.05
    assert opt2.param_groups[0]["weight_sum"] == ref_opt.param_groups[0]["weight_sum"]


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("cls,kw", [(mf.SGDScheduleFree, dict(lr=0.1, warmup_steps=3, weight_decay=0.01)),
                                    (mf.AdamWScheduleFree, dict(lr=0.02, warmup_steps=3, weight_decay=0.01, r=1.0))])
def test_float32_matches_float64(cls, kw):
    out = {}
    for dt in (torch.float32, F64):
        p = X0.to(dt).clone().requires_grad_()
        opt = cls([p], **kw)
        for _ in range(10):
            p.grad = (QUAD.to(dt) @ p.detach() - QB.to(dt))
            opt.step()
        out[dt] = (p.detach().clone(), opt.state[p]["z"].clone())
        opt.eval()
        out[dt] += (p.detach().clone(),)
    for a, b in zip(out[torch.float32], out[F64]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, **TOL[torch.float32])


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_warmup_steps_takes_a_float_of_integral_value(cls):
    """``warmup_steps=0.1 * total_steps`` is a float; schedule_free takes it, and this library refused it (a
    TypeError) before 2026-12-06. A float of integral value now steps bit for bit as the int; another float is
    refused, naming what it takes (its last warmup factor would exceed 1)."""
    def run(w):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64, generator=gen))
        opt = cls([p], lr=0.05, warmup_steps=w)
        for _ in range(8):
            p.grad = torch.randn(7, dtype=torch.float64, generator=gen)
            opt.step()
        return p.detach()
    assert torch.equal(run(0.1 * 40), run(4))
    for bad in (2.5, float("inf"), float("nan")):
        with pytest.raises(TypeError, match="warmup_steps must be an int \\(or a float of integral value\\)"):
            cls([torch.nn.Parameter(torch.ones(3))], warmup_steps=bad)


def _sf_two_groups(backend, layout="native"):
    dtype = torch.bfloat16 if layout in ("master", "master16") else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64, generator=gen).to(dtype))
    b = torch.nn.Parameter(torch.randn(32, 256, generator=gen).to(dtype))
    c = torch.nn.Parameter(torch.randn(16, generator=gen).to(dtype))
    opt = mf.SGDScheduleFree([dict(params=[a, b]), dict(params=[c])], lr=0.1, backend=backend, layout=layout)
    for _ in range(2):
        for q in (a, b, c):
            q.grad = torch.randn(q.shape, generator=gen).to(dtype)
        opt.step()
    return opt, (a, b, c)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad, layout", [(b, lay) for b in ("z of a later param", "z of the last group")
                                         for lay in ("native", "master", "master16")]
                         + [("master of a later param", "master")])
def test_eval_and_train_refuse_bad_state_before_moving_any_param(bad, layout, backend):
    """eval()/train() checked only the hyperparameters, then moved the params group by group: a z of another shape
    raised torch's message after the params before it had moved (within a group, the group's mode unchanged, so
    a retry moved them twice: a silently wrong model). Everything is checked first now; the error names the
    param and the key, nothing moves, and after the fix the run equals one that never failed."""
    if backend == "cpu" and mf.backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    opt, ps = _sf_two_groups(backend, layout)
    twin, tps = _sf_two_groups(backend, layout)
    q = ps[2] if bad == "z of the last group" else ps[1]
    key = "master" if bad.startswith("master") else "z"
    good = opt.state[q][key]
    opt.state[q][key] = good.reshape(-1)[:-1] if q.dim() == 1 else good[:, : good.shape[1] // 2]
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=f"param . of group . .*state '{key}' has shape"):
        opt.eval()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(g["train_mode"] for g in opt.param_groups)
    opt.state[q][key] = good
    opt.eval()
    twin.eval()
    assert all(torch.equal(p, t) for p, t in zip(ps, tps))
    opt.train()
    twin.train()
    assert all(torch.equal(p, t) for p, t in zip(ps, tps))


def test_eval_takes_a_remainder_in_its_checkpoint_form_as_the_step_does():
    """State put into ``opt.state`` directly (ZeroRedundancyOptimizer's load) holds master16's remainder in its
    saved byte form, which the step converts back to int16; eval() refused it (its new checks)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = mf.AdamWScheduleFree([p], lr=1e-2, layout="master16", backend="reference")
    opt.train()
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["master_lo"].dtype == torch.uint8
    q = torch.nn.Parameter(p.detach().clone())
    o2 = mf.AdamWScheduleFree([q], lr=1e-2, layout="master16", backend="reference")
    o2.train()
    o2.state[q] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd["state"][0].items()}
    o2.eval()
    opt.eval()
    assert torch.equal(q, p) and o2.state[q]["master_lo"].dtype == torch.int16



@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
def test_the_polyak_step_size_does_not_depend_on_the_thread_count(cls, threads):
    """The Polyak reductions summed each tensor with torch's whole-tensor sum, which splits its input among the
    threads: the step size moved by an ulp with the thread count, and float64 params with it (a review,
    2026-12-08). Alternating 1 and 2 threads equals 1 thread throughout, bit for bit."""
    def run(alternate):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn((1 << 20) + 3, generator=g, dtype=torch.float64))
        opt = cls([p], lr="polyak", f_star=0.0, polyak_max_lr=10.0)
        lrs = []
        for k in range(3):
            threads(2 if alternate and k % 2 == 0 else 1)
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step(lambda: 1.0)
            lrs.append(opt.param_groups[0]["polyak_lr"])
        return p.detach().clone(), lrs

    (a, lr_a), (b, lr_b) = run(False), run(True)
    assert lr_a == lr_b and torch.equal(a, b)
