"""The backend parity case table and its runner, shared by the compiled backends' tests
(tests/test_cpu_backend.py on CPU, tests/test_cuda_backend.py on a CUDA device).

Every case runs one backend against the float64 reference backend for >= 10 steps over two param
groups (different hyperparameters, same flags, so one bucket) and compares params and every state
tensor with the one tolerance table (tests/tolerances.py).
"""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf

from tolerances import tol

SHAPES = [(), (0,), (1,), (15,), (17,), (4097,), (65537,), (3, 5, 7)]
STEPS = 10
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# (id, class, kwargs of group 0, overrides for group 1 (same flags, other hyperparameters), sign rule,
#  bf16/fp16 settings). Low-precision runs keep every value the storage dtype rounds near magnitude 1,
#  where tolerances.py's bf16/fp16 budget applies: gradients ~0.1 ("gscale") for momentum-buffer rules
#  (a buffer of ~5 has a bf16 ulp of 0.03 > atol), ~1 for second-moment rules (v = (1-beta2) g^2 stays
#  out of the fp16 subnormals), and eps=1 for RMSprop with momentum (g/(sqrt(v)+eps) stays ~g).
_M = dict(gscale=0.1)  # momentum-buffer rules
_V = dict(gscale=1.0)  # second-moment rules
CASES = [
    ("sgd", mf.SGD, dict(lr=0.05), dict(lr=0.02, weight_decay=0.01), False, _M),
    ("sgd-momentum", mf.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     dict(lr=0.02, dampening=0.0, weight_decay=0.0, maximize=True), False, _M),
    ("sgd-nesterov", mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
     dict(lr=0.02, momentum=0.8, maximize=False), False, _M),
    ("qhm-grad", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01), dict(lr=0.05, nu=0.5), False, _M),
    ("qhm-direct", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01, weight_decay_type="direct"),
     dict(momentum=0.5, weight_decay=0.1), False, _M),
    ("adam", mf.Adam, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, betas=(0.8, 0.99), weight_decay=0.0), False,
     _V),
    ("adamw", mf.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(lr=5e-3, eps=1e-6, maximize=True), False, _V),
    ("adam-amsgrad", mf.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01), dict(betas=(0.5, 0.9)), False, _V),
    ("adamw-amsgrad", mf.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True), dict(lr=2e-2, weight_decay=0.0), False,
     _V),
    ("adamtied", mf.AdamTied, dict(lr=1e-2, beta=0.9), dict(betas=(0.95, 0.95)), False, _V),
    ("nadam", mf.NAdam, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, momentum_decay=1e-2), False, _V),
    ("nadamw", mf.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), dict(betas=(0.8, 0.99)),
     False, _V),
    ("rmsprop", mf.RMSprop, dict(lr=1e-3), dict(weight_decay=0.01, alpha=0.9), False, _V),
    ("rmsprop-momentum", mf.RMSprop, dict(lr=1e-3, momentum=0.9, weight_decay=0.01), dict(momentum=0.5), False,
     dict(gscale=0.1, eps=1.0)),
    ("rmsprop-centered", mf.RMSprop, dict(lr=1e-3, centered=True), dict(lr=2e-3, maximize=True), False, _V),
    ("rmsprop-momentum-centered", mf.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True),
     dict(alpha=0.95, eps=1e-4), False, dict(gscale=0.1, eps=1.0)),
    ("signsgd", mf.SignSGD, dict(lr=1e-2, weight_decay=0.1), dict(lr=2e-2, weight_decay=0.0), True, _M),
    ("signum", mf.Signum, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), dict(momentum=0.5, maximize=True), True,
     _M),
    ("lion", mf.Lion, dict(lr=1e-2, weight_decay=0.1), dict(betas=(0.5, 0.9), weight_decay=0.0), True, _M),
    ("fsgdm", mf.FSGDM, dict(lr=0.05, sigma=9, n_stages=3), dict(lr=0.02, c_scaling=0.1, weight_decay=0.0), False,
     _M),
]
CASES += [  # schedule-free rules
    ("sgd_sf", mf.SGDScheduleFree, dict(lr=0.1, weight_decay=0.01, warmup_steps=3),
     dict(lr=0.05, momentum=0.5), False, _M),
    ("adamw_sf", mf.AdamWScheduleFree, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, betas=(0.8, 0.99)),
     False, _V),
    # fp16: eps=0.1 keeps d = g/(sqrt(v)+eps) away from ratios of fp16-subnormal v, which the inner
    # momentum would accumulate
    ("adamw_sf-inner", mf.AdamWScheduleFree, dict(lr=1e-2, inner_momentum=0.9, weight_lr_power=1.0),
     dict(weight_decay=0.1), False, dict(gscale=1.0, eps=0.1)),
]


def _params(shapes, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]
    rs = [p.detach().cpu().double().clone().requires_grad_() for p in ps]
    return ps, rs, gen


def _grads(shapes, dtype, gen, signs=None, scale=1.0):
    gs = []
    for i, s in enumerate(shapes):
        g = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        if signs is not None:  # fixed sign per element, magnitude in [0.5, 1.5]: no sign near a tie
            g = signs[i] * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))
        gs.append(g.to(dtype))
    return gs


def _groups(params, kw0, kw1):
    half = len(params) // 2
    return [dict(params=params[:half], **kw0), dict(params=params[half:], **{**kw0, **kw1})]


def _state_names(opt, p):
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return opt.spec.state_names(group)
    raise AssertionError("param not in optimizer")


def _compare(opt, ref, ps, rs, dtype, what=""):
    t = tol(dtype)
    for i, (p, r) in enumerate(zip(ps, rs)):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), **t, msg=lambda m: f"{what} param {i}: {m}")
        names = _state_names(ref, r)
        for k in names:
            a, e = opt.state[p][k], ref.state[r][k]
            assert a.dtype == p.dtype and a.shape == p.shape
            torch.testing.assert_close(a.cpu().double(), e, **t, msg=lambda m: f"{what} param {i} state {k}: {m}")


def _run(cls, kw0, kw1, dtype, shapes=SHAPES, steps=STEPS, sign=False, seed=0, lp=None, backend="cpu",
         device="cpu"):
    gscale = 1.0
    if lp is not None and dtype in (torch.bfloat16, torch.float16):
        lp = dict(lp)
        gscale = lp.pop("gscale", 1.0)
        kw0 = {**kw0, **lp}
        kw1 = {k: v for k, v in kw1.items() if k not in lp}
    ps, rs, gen = _params(shapes, dtype, seed, device)
    opt = cls(_groups(ps, kw0, kw1), backend=backend)
    ref = cls(_groups(rs, kw0, kw1), backend="reference")
    signs = [torch.randint(0, 2, s, generator=gen).double() * 2 - 1 for s in shapes] if sign else None
    for _ in range(steps):
        for p, r, g in zip(ps, rs, _grads(shapes, dtype, gen, signs, gscale)):
            p.grad = g.to(device)
            r.grad = g.double()
        opt.step()
        ref.step()
    return opt, ref, ps, rs


def _case_params():
    out = []
    for cid, cls, kw0, kw1, sign, lp in CASES:
        for dt in DTYPES:
            if sign and dt not in (torch.float64, torch.float32):
                continue
            out.append(pytest.param(cls, kw0, kw1, dt, sign, lp, id=f"{cid}-{str(dt).replace('torch.', '')}"))
    return out


