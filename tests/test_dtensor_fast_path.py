"""The cached plan with DTensor params (FSDP2), in one process (a one-rank gloo mesh; the two-rank runs are
tests/test_distributed.py).

A group of DTensor params takes the cached plan as a group of plain tensors does (momentum_fused/optim/plan_cache.py):
the C checks (``_C_cpu.cached_grads`` with its ``dtensor`` argument) read the local shards, and the buckets get the
local shards directly. These tests prove that the hot path is taken, that it gives bit for bit the steps of the full
plan (and of the same plain tensors), with gradients built as FSDP2 builds them (the param's own spec object) and as
``distribute_tensor`` does (an equal spec), and that every change it must notice sends the step through the full
plan, which raises on bad input before anything changes.
"""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from momentum_fused.optim import plan_cache
from optim_db import all_variants, make_grads, make_params

pytestmark = pytest.mark.skipif(plan_cache.C_CHECKS is None, reason="the cached plan needs the compiled cpu "
                                "extension, which is not built (backends.status() says why)")

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in backends.available(), reason="the compiled cpu extension is not built (pip install -e .)"))]
# the first variant of every rule (the others differ in flags, which the plan does not look at)
VARIANTS = [v for v in all_variants() if v.id.endswith("-0") and not isinstance(v.values[1].get("lr"), str)]


def _dtensor():
    from torch.distributed.tensor import DTensor
    return DTensor


def _local(t):
    return t._local_tensor if isinstance(t, _dtensor()) else t


def _fsdp_grad(p, g):
    """A gradient as FSDP2 makes it: a DTensor on the param's own spec object (_fsdp_common._from_local_no_grad)."""
    return _dtensor()(g, p._spec, requires_grad=False)


def _distributed_grad(p, g):
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(g, p.device_mesh, p.placements)


GRADS = {"fsdp": _fsdp_grad, "distribute_tensor": _distributed_grad}


def _run(case, kw, backend, mesh, grad_kind, cache):
    """8 steps over DTensor params (mesh None: the same plain tensors), with a param without gradient at step 2 and
    an lr change at step 5. Returns (optimizer, params, times the cached plan was taken)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    values = make_params(SHAPES)
    ps = [torch.nn.Parameter(v.detach().clone() if mesh is None else distribute_tensor(v.detach().clone(), mesh,
                                                                                        [Shard(0)]))
          for v in values]
    opt = case.cls([dict(params=ps[:2]), dict(params=ps[2:])], **{**kw, "backend": backend})
    hits = 0
    for t, gs in enumerate(make_grads(SHAPES, steps=8)):
        for i, (p, g) in enumerate(zip(ps, gs)):
            g = g.clone().to(p.dtype)
            p.grad = None if (t == 2 and i == 1) else g if mesh is None else GRADS[grad_kind](p, g)
        if t == 5:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
        if cache and opt._fast_plan() is not None:
            hits += 1
        opt.step()
        if not cache:
            opt.invalidate_caches()
    return opt, ps, hits


def _assert_same(a, pa, b, pb):
    def bits(t):
        t = _local(t).detach().contiguous().reshape(-1)
        return t.view(torch.uint8) if t.numel() else t
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(bits(x), bits(y)), f"param {i}"
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(bits(sa[k]), bits(sb[k])), f"param {i}, state {k!r}"
            else:
                assert sa[k] == sb[k], f"param {i}, state {k!r}"


@pytest.mark.parametrize("grad_kind", list(GRADS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kw", VARIANTS)
def test_dtensor_cached_plan_equals_full_plan_and_plain(case, kw, backend, grad_kind, one_rank_mesh):
    a, pa, hits = _run(case, kw, backend, one_rank_mesh, grad_kind, cache=True)
    b, pb, _ = _run(case, kw, backend, one_rank_mesh, grad_kind, cache=False)
    c, pc, _ = _run(case, kw, backend, None, grad_kind, cache=True)
    _assert_same(a, pa, b, pb)
    _assert_same(a, pa, c, pc)
    # taken at t = 1, 4 (after the full plan of a step with a param without gradient), 5 (an lr change), 6, 7
    assert hits >= 4, f"the cached plan was used {hits} times"
    assert all(e["dtensor"] is not None for e in a._fast["groups"])


def _set_local(t, value):
    t._local_tensor = value


def _respec(p):
    import copy
    p._spec = copy.copy(p._spec)


def _replicated_grad(p):
    from torch.distributed.tensor import Replicate, distribute_tensor
    p.grad = distribute_tensor(_local(p.grad).clone(), p.device_mesh, [Replicate()])


# (change, the error the full plan then raises, None: it steps, or "malformed": a DTensor whose local shard
# disagrees with its own metadata, which DTensor never makes; only the cached plan's refusal is checked)
CHANGES = {
    "nothing": None,
    "new FSDP2-style grads": None,
    "grads from distribute_tensor (an equal spec)": None,
    "grad replicated where the param is sharded": (RuntimeError, "placements"),
    "plain grad on a DTensor param": (RuntimeError, "plain tensor"),
    "grad's local shard of another dtype": "malformed",
    "grad's local shard with gaps (not dense)": None,
    "param's local shard replaced": None,
    "param's spec replaced": None,
    "state's local shard replaced": None,
    "state replaced by a plain tensor": (ValueError, "plain tensor"),
}


def _apply(change, ps, opt):
    st = opt.state[ps[0]]
    if change == "new FSDP2-style grads":
        for p in ps:
            p.grad = _fsdp_grad(p, _local(p.grad).clone())
    elif change == "grads from distribute_tensor (an equal spec)":
        for p in ps:
            p.grad = _distributed_grad(p, _local(p.grad).clone())
    elif change == "grad replicated where the param is sharded":
        _replicated_grad(ps[2])
    elif change == "plain grad on a DTensor param":
        ps[1].grad = _local(ps[1].grad).clone()
    elif change == "grad's local shard of another dtype":
        g = _local(ps[0].grad)
        _set_local(ps[0].grad, g.to(torch.float32 if g.dtype == torch.float64 else torch.float64))
    elif change == "grad's local shard with gaps (not dense)":
        g = _local(ps[0].grad)
        _set_local(ps[0].grad, torch.empty(g.shape[0], 2 * g.shape[1], dtype=g.dtype)[:, ::2].copy_(g))
    elif change == "param's local shard replaced":
        _set_local(ps[3], _local(ps[3]).clone())
    elif change == "param's spec replaced":
        _respec(ps[3])
    elif change == "state's local shard replaced":
        _set_local(st["exp_avg"], _local(st["exp_avg"]).clone())
    elif change == "state replaced by a plain tensor":
        st["exp_avg_sq"] = _local(st["exp_avg_sq"]).clone()


@pytest.mark.parametrize("change", list(CHANGES))
def test_dtensor_cached_plan_notices_every_change(change, one_rank_mesh):
    """After two steps the plan is cached; each change sends the next step through the full plan (a valid one:
    the results then equal those of an optimizer that never cached), or the full plan raises before anything
    changes."""
    from torch.distributed.tensor import Shard, distribute_tensor

    def build():
        ps = [torch.nn.Parameter(distribute_tensor(v.detach().clone(), one_rank_mesh, [Shard(0)]))
              for v in make_params(SHAPES)]
        return ps, mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference")

    grads = make_grads(SHAPES, steps=3)

    def set_grads(ps, t):
        for p, g in zip(ps, grads[t]):
            p.grad = _fsdp_grad(p, g.clone())

    ps, opt = build()
    qs, ref = build()
    for t in range(2):
        set_grads(ps, t)
        set_grads(qs, t)
        opt.step()
        ref.step()
        ref.invalidate_caches()
    set_grads(ps, 2)
    set_grads(qs, 2)
    assert opt._fast_plan() is not None
    _apply(change, ps, opt)
    want_cached = change in ("nothing", "new FSDP2-style grads", "grads from distribute_tensor (an equal spec)")
    fast = opt._fast_plan()
    assert (fast is not None) is want_cached
    if want_cached:  # the local shards of the gradients, for the buckets
        _, cached = fast
        got = [g for _, gs, _ in cached for g in gs]
        assert len(got) == len(ps) and all(g is _local(p.grad) for g, p in zip(got, ps))
    err = CHANGES[change]
    if err == "malformed":
        return
    if err is not None:
        before = [(_local(p).clone(), {k: _local(v).clone() for k, v in opt.state[p].items()
                                       if isinstance(v, torch.Tensor)}) for p in ps]
        with pytest.raises(err[0], match=err[1]):
            opt.step()
        for p, (v, st) in zip(ps, before):
            assert torch.equal(_local(p), v)
            assert all(torch.equal(_local(opt.state[p][k]), x) for k, x in st.items())
        return
    # the same step on the optimizer that never cached, with the same values where the change kept them
    _apply(change, qs, ref)
    opt.step()
    ref.step()
    _assert_same(opt, ps, ref, qs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "dtensor"])
def test_muon_cached_plan_equals_full_plan(backend, sharded, one_rank_mesh):
    """momentum_fused.Muon: its Muon groups (a multi-phase rule, whose persistent state is param-shaped) and its aux
    AdamW take the cached plan, with the results of an optimizer whose caches are dropped before every step."""
    from torch.distributed.tensor import Shard, distribute_tensor
    shapes = [(6, 4), (6,), (5, 3), (5, 3), (4,)]

    def go(cache):
        values = make_params(shapes, dtype=torch.float32)
        ps = [torch.nn.Parameter(distribute_tensor(v.detach().clone(), one_rank_mesh, [Shard(0)]) if sharded
                                 else v.detach().clone()) for v in values]
        opt = mf.Muon([dict(params=[p for p in ps if p.dim() == 2]),
                       dict(params=[p for p in ps if p.dim() < 2], use_muon=False)], lr=0.02, backend=backend)
        hits = 0
        for t, gs in enumerate(make_grads(shapes, steps=7, dtype=torch.float32)):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if (t == 3 and i == 2) else _fsdp_grad(p, g.clone()) if sharded else g.clone()
            if cache:
                hits += sum(o._fast_plan() is not None for o in (opt._core, opt._aux))
            opt.step()
            if not cache:
                opt._core.invalidate_caches()
                opt._aux.invalidate_caches()
        return opt, ps, hits

    a, pa, hits = go(True)
    b, pb, _ = go(False)
    _assert_same(a, pa, b, pb)
    # core from step 2 (its cache of step 0 is invalidated by the aux AdamW's new state), aux from step 1; both
    # re-plan after the step without a gradient (step 3)
    assert hits >= 7, f"the cached plans were used {hits} times"
