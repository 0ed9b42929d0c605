"""The cached plan of ``FusedOptimizer.step`` (``_fast_plan`` / ``_remember_plan``).

After a step, the optimizer keeps what it validated; the next step re-checks it with C-speed identity
comparisons and skips the per-tensor Python validation. These tests prove that the hot path is taken,
and that every change it must notice sends the step through the full plan: an optimizer that caches
ends bit-identical to one whose cache is dropped before every step, through a sequence of changes
(a param without gradient, a new param group, an lr change, a non-contiguous gradient, a replaced
state dict, replaced state tensors), and bad input still raises before anything changes.
"""
import copy

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from optim_db import (all_variants, assert_snapshot_equal, assert_states_close, assert_step_raises_unchanged, make_grads, make_params,
                      snapshot)

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]
EXTRA = [(6,), (2, 2)]
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in backends.available(), reason="the compiled cpu extension is not built (pip install -e .)"))]
VARIANTS = [v for v in all_variants() if not isinstance(v.values[1].get("lr"), str)]


def _scenario(case, kw, backend, cache):
    p = make_params(SHAPES)
    extra = make_params(EXTRA, seed=5)
    opt = case.cls([dict(params=p[:2]), dict(params=p[2:])], **{**kw, "backend": backend})
    grads = make_grads(SHAPES + EXTRA, steps=10)
    hits = 0
    for t in range(10):
        if t == 4:
            opt.add_param_group(dict(params=extra))
        params = p + (extra if t >= 4 else [])
        for i, x in enumerate(params):
            g = grads[t][i].clone()
            if t == 2 and i == 1:
                g = None  # a param without gradient in this step
            if t == 6 and i == 0:  # a non-contiguous gradient (the backends copy it)
                g = torch.empty(4, 3, dtype=g.dtype).t().copy_(g)
            x.grad = g
        if t == 5:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
        if t == 7:
            opt.state[p[2]] = dict(opt.state[p[2]])  # a new dict holding the same tensors
        if t == 8:  # new state tensor objects with the same values
            st = opt.state[p[3]]
            for k in [k for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"]:
                st[k] = st[k].clone()
        if cache and opt._fast_plan() is not None:
            hits += 1
        opt.step()
        if not cache:
            opt.invalidate_caches()
    return opt, p + extra, hits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kw", VARIANTS)
def test_cached_plan_equals_full_plan(case, kw, backend):
    a, pa, hits = _scenario(case, kw, backend, cache=True)
    b, pb, _ = _scenario(case, kw, backend, cache=False)
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))
    # taken at t = 1, 5 (only an lr change: hyperparameters are re-validated, not a reason to re-plan), 9
    assert hits >= 3, f"the cached plan was used {hits} times"


@pytest.mark.parametrize("layout,dtype", [("bf16_state", torch.float32), ("master", torch.bfloat16),
                                          ("bf16_sr", torch.bfloat16)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plan_equals_full_plan_layouts(layout, dtype, backend):
    def go(cache):
        p = make_params(SHAPES, dtype=dtype)
        opt = mf.AdamW([dict(params=p[:2]), dict(params=p[2:], weight_decay=0.0)], lr=1e-2, layout=layout,
                       sr_seed=3, backend=backend)
        for t, gs in enumerate(make_grads(SHAPES, steps=6, dtype=dtype)):
            for x, g in zip(p, gs):
                x.grad = g.clone()
            opt.step()
            if not cache:
                opt.invalidate_caches()
        return opt, p
    a, pa = go(True)
    b, pb = go(False)
    assert a._fast is not None
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plan_sees_replaced_param_data(backend):
    """``p.data = <other shape>`` with a matching gradient: the state no longer fits, the full plan
    raises its error and nothing changes."""
    p = make_params(SHAPES)
    opt = mf.Adam(p, lr=1e-2, backend=backend)
    for _ in range(2):
        for x in p:
            x.grad = torch.ones_like(x)
        opt.step()
    assert opt._fast_plan() is not None
    p[1].data = torch.zeros(9, dtype=p[1].dtype)
    p[1].grad = torch.ones(9, dtype=p[1].dtype)
    assert_step_raises_unchanged(opt, p, ValueError, r"state 'exp_avg' has shape")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plan_sees_bad_gradient_and_state(backend):
    p = make_params(SHAPES)
    opt = mf.SGD(p, lr=1e-2, momentum=0.9, backend=backend)
    for _ in range(2):
        for x in p:
            x.grad = torch.ones_like(x)
        opt.step()
    p[3].grad.data = torch.ones(8, dtype=p[3].dtype)  # the same gradient object, a wrong shape
    assert opt._fast_plan() is None
    assert_step_raises_unchanged(opt, p, RuntimeError, r"gradient shape")
    p[3].grad.data = torch.ones(7, dtype=torch.float32)  # a wrong dtype
    assert opt._fast_plan() is None
    assert_step_raises_unchanged(opt, p, TypeError, r"gradient dtype")
    # (a gradient on another device after cached steps: tests/test_errors.py, kind "device", on a meta grad)
    p[3].grad = None
    p[3].grad = torch.ones(7, dtype=p[3].dtype)
    assert opt._fast_plan() is not None
    opt.state[p[2]]["momentum_buffer"] = torch.zeros(3)  # wrong shape
    assert_step_raises_unchanged(opt, p, ValueError, r"momentum_buffer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plan_after_load_state_dict(backend):
    """A loaded state_dict replaces the state: the next step uses the loaded tensors."""
    p = make_params(SHAPES)
    q = [x.clone() for x in p]
    a, b = mf.AdamW(p, lr=1e-2, backend=backend), mf.AdamW(q, lr=1e-2, backend=backend)
    grads = make_grads(SHAPES, steps=6)
    for t in range(3):
        for x, y, g in zip(p, q, grads[t]):
            x.grad, y.grad = g.clone(), g.clone() * 2
        a.step()
        b.step()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x, y in zip(p, q):
        y.data.copy_(x)
    for t in range(3, 6):
        for x, y, g in zip(p, q, grads[t]):
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    # (not bit-equal: torch's float64 lerp_ can differ in the last bit between two tensors of equal values)
    assert_states_close(b, q, a, p, rtol=1e-14, atol=1e-16)
