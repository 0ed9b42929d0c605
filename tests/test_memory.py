"""What the optimizer keeps alive and what a load copies (a memory review of 2026-12-06): state dropped between
steps is freed before the next step makes new state, a reloaded master layout keeps no old state, and a
checkpoint's 8-bit codes or bf16 state are not cast to the param dtype by torch's load on the way in (they were
taken again from the saved tensors after it: a load's peak was the checkpoint's state plus 4x its size on
int8_state). Weak references and the tensors torch's load sees, never a measured size."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import momentum_fused as mf

BACKENDS = [b for b in ("cpu", "reference") if b in mf.backends.available()]


def _stepped(layout, dtype, backend, shapes=((64, 64), (4096,), (3,)), steps=2, **kw):
    ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype))
          for i, s in enumerate(shapes)]
    opt = mf.AdamW(ps, lr=1e-3, layout=layout, backend=backend, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    return ps, opt


def _refs(opt):
    return [weakref.ref(t) for st in opt.state.values() for t in st.values()
            if isinstance(t, torch.Tensor) and t.numel() > 1]


def _alive(refs):
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,dtype", [("native", torch.float32), ("master", torch.bfloat16),
                                          ("int8_state", torch.float32)])
@pytest.mark.parametrize("reset", ["clear", "del", "new mapping"])
def test_state_dropped_between_steps_is_freed_before_the_next_step_makes_new_state(backend, layout, dtype, reset):
    """Before 2026-12-06 the cached plan of the last step (and the master layout's marks) held the dropped state
    until the end of the next step, which made new state meanwhile: a reset peaked at twice the state."""
    ps, opt = _stepped(layout, dtype, backend)
    refs = _refs(opt)
    assert refs and _alive(refs) == len(refs)
    if reset == "clear":
        opt.state.clear()
    elif reset == "del":
        for p in ps:
            del opt.state[p]
    else:
        from collections import defaultdict
        opt.state = defaultdict(dict)
    seen = []
    full_plan = opt._plan

    def plan():  # (the full plan validates, then the step makes new state)
        seen.append(_alive(refs))
        return full_plan()

    opt._plan = plan
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert seen == [0]
    assert len(opt.state) == len(ps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,dtype", [("native", torch.float32), ("master", torch.bfloat16),
                                          ("master16", torch.bfloat16), ("int8_state", torch.float32),
                                          ("master16_int8", torch.bfloat16)])
def test_load_state_dict_and_invalidate_caches_free_the_replaced_state(backend, layout, dtype):
    """An in-process rollback (load_state_dict into the live optimizer): the replaced state is freed by the load,
    not at the next step; the master layout's marks held it (2026-12-06). invalidate_caches() frees state dropped
    between steps right away."""
    ps, opt = _stepped(layout, dtype, backend)
    sd = copy.deepcopy(opt.state_dict())  # (torch's state_dict holds the live tensors)
    opt.step()
    refs = _refs(opt)
    opt.load_state_dict(sd)
    assert _alive(refs) == 0
    del sd  # (torch's load aliases the saved tensors of the params' dtype and device: native's)
    refs = _refs(opt)
    opt.state.clear()
    opt.invalidate_caches()
    assert _alive(refs) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,dtype,kept", [
    ("int8_state", torch.float32, {"exp_avg", "exp_avg_sq"}),
    ("int8_sr", torch.float32, {"exp_avg", "exp_avg_sq"}),
    ("bf16_state", torch.float32, {"exp_avg", "exp_avg_sq"}),
    ("master", torch.bfloat16, {"exp_avg", "exp_avg_sq", "master"}),
    ("master16_int8", torch.bfloat16, {"exp_avg", "exp_avg_sq", "master_lo"})])
def test_torch_load_does_not_cast_the_layouts_own_state(backend, layout, dtype, kept, monkeypatch):
    """torch's load_state_dict casts every floating-point state to the param dtype; the layouts' own state
    (8-bit codes, bf16 state, masters, remainders) is taken from the saved tensors after it, so torch's load is
    not given them (before 2026-12-06 it cast 8-bit codes of fp32 params to fp32 and threw the copies away).
    The loaded optimizer equals the saved one bit for bit."""
    ps, opt = _stepped(layout, dtype, backend)
    sd = copy.deepcopy(opt.state_dict())  # (torch's state_dict holds the live tensors, which a load may alias)
    cast = []
    policy = torch.optim.Optimizer._process_value_according_to_param_policy

    def spy(param, value, param_id, param_groups, key=None):
        cast.append(key)
        return policy(param, value, param_id, param_groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(spy))
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh = mf.AdamW(qs, lr=1e-3, layout=layout, backend=backend)
    fresh.load_state_dict(sd)
    assert cast and not kept & set(cast)
    for p, q in zip(ps, qs):
        a, b = opt.state[p], fresh.state[q]
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for p, q in zip(ps, qs):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    fresh.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
