"""Property tests (hypothesis): random shapes (0-d, 0-numel, 65537 elements...), random valid hyperparameters,
1-3 param groups, float64/float32/bfloat16, against the float64 reference and against each other:

- the compiled cpu backend equals the reference backend (the tolerance table of tests/tolerances.py);
- maximize=True with gradient g is minimize with -g, bit for bit, on every backend;
- the identities: AdamTied(beta) == Adam(betas=(beta, beta)); Signum(momentum=0) == SignSGD, bit for bit.

The examples are derandomized (the same ones every run, so CI cannot flake); set HYPOTHESIS_PROFILE=explore for
new random ones (and more of them)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import momentum_fused as mf
from momentum_fused import backends
from optim_db import assert_states_close
from tolerances import tol

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

CPU = backends.status().get("cpu") == "available"
BACKENDS = ["reference"] + (["cpu"] if CPU else [])

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (4097,), (65537,)]
SIGN_RULES = ("SignSGD", "Signum", "Lion")
lr_s = st.floats(1e-3, 0.3)
wd_s = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
unit_s = st.floats(0.0, 0.95)


@st.composite
def hyper(draw, name):
    """Valid, well-conditioned constructor kwargs of optimizer ``name``."""
    kw = dict(lr=draw(lr_s), weight_decay=draw(wd_s), maximize=draw(st.booleans()))
    if name == "SGD":
        kw["momentum"] = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["dampening"] = 0.0 if kw["nesterov"] else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    elif name in ("Adam", "AdamW", "NAdam"):
        kw["lr"] = draw(st.floats(1e-4, 0.05))
        kw["betas"] = (draw(unit_s), draw(st.floats(0.9, 0.999)))
        kw["eps"] = draw(st.floats(1e-8, 1e-4))
        if name == "NAdam":
            kw["momentum_decay"] = draw(st.floats(0.0, 0.01))
            kw["decoupled_weight_decay"] = draw(st.booleans())
        else:
            kw["amsgrad"] = draw(st.booleans())
    elif name == "RMSprop":
        kw["lr"] = draw(st.floats(1e-4, 0.02))
        kw.update(alpha=draw(st.floats(0.8, 0.999)), eps=draw(st.floats(1e-6, 1e-3)),
                  momentum=draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9))), centered=draw(st.booleans()))
    elif name == "QHM":
        kw.update(momentum=draw(unit_s), nu=draw(st.floats(0.0, 1.0)),
                  weight_decay_type=draw(st.sampled_from(["grad", "direct"])))
    elif name in ("Signum", "Lion"):
        kw["lr"] = draw(st.floats(1e-4, 0.01))
        if name == "Signum":
            kw["momentum"] = draw(unit_s)
        else:
            kw["betas"] = (draw(unit_s), draw(st.floats(0.9, 0.99)))
    elif name == "SignSGD":
        kw["lr"] = draw(st.floats(1e-4, 0.01))
    elif name == "AdamWScheduleFree":
        kw["lr"] = draw(st.floats(1e-4, 0.02))
        kw.update(betas=(draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.999))),
                  warmup_steps=draw(st.integers(0, 3)))
    elif name == "SGDScheduleFree":
        kw.update(momentum=draw(st.floats(0.5, 0.95)), warmup_steps=draw(st.integers(0, 3)))
    return kw


NAMES = ["SGD", "Adam", "AdamW", "NAdam", "RMSprop", "QHM", "SignSGD", "Signum", "Lion", "SGDScheduleFree",
         "AdamWScheduleFree"]


@st.composite
def problem(draw, names=NAMES, dtypes=(torch.float64, torch.float32, torch.bfloat16)):
    name = draw(st.sampled_from(names))
    dtype = torch.float64 if name in SIGN_RULES else draw(st.sampled_from(dtypes))
    kw = draw(hyper(name))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    n_groups = draw(st.integers(1, min(3, len(shapes))))
    cuts = sorted(draw(st.lists(st.integers(1, len(shapes) - 1), min_size=n_groups - 1, max_size=n_groups - 1,
                                unique=True))) if n_groups > 1 else []
    bounds = [0, *cuts, len(shapes)]
    # each group overrides the lr (and the weight decay) of the defaults
    groups = [dict(lr=kw["lr"] * draw(st.floats(0.25, 2.0)), weight_decay=draw(wd_s)) for _ in range(len(bounds) - 1)]
    seed = draw(st.integers(0, 2 ** 16))
    return name, dtype, kw, shapes, bounds, groups, seed


def _run(name, dtype, kw, shapes, bounds, groups, seed, backend, steps=4, negate=False, flip_maximize=False):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]
    kw = dict(kw)
    if flip_maximize:
        kw["maximize"] = not kw["maximize"]
    pg = [dict(params=params[a:b], **g) for (a, b), g in zip(zip(bounds, bounds[1:]), groups)]
    opt = getattr(mf, name)(pg, backend=backend, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = -g if negate else g.clone()
        opt.step()
    return opt, params


@pytest.mark.skipif(not CPU, reason="the compiled cpu backend is not built (backends.status() says why)")
@settings(settings.get_profile(PROFILE))
@given(problem())
def test_cpu_backend_equals_the_reference(prob):
    opt_c, p_c = _run(*prob, backend="cpu")
    opt_r, p_r = _run(*prob, backend="reference")
    assert_states_close(opt_c, p_c, opt_r, p_r, **tol(prob[1]))


@settings(settings.get_profile(PROFILE))
@given(problem(), st.sampled_from(BACKENDS))
def test_maximize_is_minimize_of_the_negated_gradient(prob, backend):
    opt_a, p_a = _run(*prob, backend=backend)
    opt_b, p_b = _run(*prob, backend=backend, negate=True, flip_maximize=True)
    assert_states_close(opt_a, p_a, opt_b, p_b, rtol=0, atol=0)


@settings(settings.get_profile(PROFILE))
@given(problem(names=["Adam"]), st.sampled_from(BACKENDS), st.floats(0.0, 0.99))
def test_adam_tied_is_adam_with_equal_betas(prob, backend, beta):
    name, dtype, kw, shapes, bounds, groups, seed = prob
    kw = {**kw, "betas": (beta, beta)}
    opt_a, p_a = _run("Adam", dtype, kw, shapes, bounds, groups, seed, backend)
    tied = {k: v for k, v in kw.items() if k not in ("betas", "amsgrad")}
    if kw.get("amsgrad"):
        return  # (AdamTied has no amsgrad keyword)
    opt_b, p_b = _run("AdamTied", dtype, {**tied, "beta": beta}, shapes, bounds, groups, seed, backend)
    assert_states_close(opt_a, p_a, opt_b, p_b, rtol=0, atol=0)


@settings(settings.get_profile(PROFILE))
@given(problem(names=["SignSGD"]), st.sampled_from(BACKENDS))
def test_signum_without_momentum_is_signsgd(prob, backend):
    name, dtype, kw, shapes, bounds, groups, seed = prob
    opt_a, p_a = _run("SignSGD", dtype, kw, shapes, bounds, groups, seed, backend)
    opt_b, p_b = _run("Signum", dtype, {**kw, "momentum": 0.0}, shapes, bounds, groups, seed, backend)
    assert_states_close(opt_a, p_a, opt_b, p_b, rtol=0, atol=0)
