"""Steps where the set of params with a gradient changes (a mixture of experts whose unrouted experts get no
gradient, multi-task heads, ``zero_grad(set_to_none=True)`` with unused params): the cached plan keeps the params
whose state the full plan validated as *members*, with or without a gradient, and serves any step where a subset of
its members has gradients (optim/plan_cache.py, ``checks.sparse_ok``). Before 2026-12-07 each such step took the full
plan: 5x torch's fused AdamW on 300 tiny tensors (bench/tools/host_review/variable_grads.py).

Every run here is compared bit for bit with the same run whose caches are dropped before every step (the full plan
each step), and the number of full plans is counted where the cached plan must serve the steps. A member's state is
not read while it has no gradient; what changed in it meanwhile is found at the step that gives it one (the C check),
and a param whose state does not pass the full plan's checks is left out (never raised while it has no gradient)."""
import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from momentum_fused.optim import plan_cache
from optim_db import (all_variants, assert_snapshot_equal, assert_step_raises_unchanged, assert_twin_runs_equal,
                      make_grads, make_params, snapshot)

_C_cpu = plan_cache.C_CHECKS
pytestmark = pytest.mark.skipif(_C_cpu is None, reason="the cached plan needs the compiled cpu extension, which "
                                "is not built (backends.status() says why)")

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,), (4097,), (6,), (1,)]
LATE = 5  # the param that gets its first gradient at step 4 (one full plan there)
STEPS = 12
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in backends.available(), reason="the compiled cpu extension is not built (pip install -e .)"))]
VARIANTS = [v for v in all_variants() if not isinstance(v.values[1].get("lr"), str)]


def _masks(n, steps=STEPS, seed=0):
    """Which params have a gradient at each step: all but LATE at step 0, then ~60% at random, LATE none before 4."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        m = [True] * n if t == 0 else (torch.rand(n, generator=gen) < 0.6).tolist()
        m[LATE] = t >= 4 and (t == 4 or m[LATE])
        out.append(m)
    return out


def _count_full_plans(opt) -> list:
    full = []
    real = opt._plan
    opt._plan = lambda real=real, full=full: full.append(1) or real()
    return full


def _run(make, cache, shapes=SHAPES, dtype=torch.float64, steps=STEPS, seed=0):
    p = [torch.nn.Parameter(t) for t in make_params(shapes, dtype=dtype)]
    opt = make(p)
    full = _count_full_plans(opt)
    grads = make_grads(shapes, steps=steps, dtype=dtype)
    for t, (gs, mask) in enumerate(zip(grads, _masks(len(shapes), steps, seed))):
        for x, g, m in zip(p, gs, mask):
            x.grad = g.clone() if m else None
        opt.step()
        if not cache:
            opt.invalidate_caches()
    return opt, p, len(full)


def _sparse(opt) -> bool:
    from momentum_fused.optim.checks import sparse_ok
    return all(sparse_ok(opt.spec, g) for g in opt.param_groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kw", VARIANTS)
def test_changing_sets_of_gradients_step_as_the_full_plan(case, kw, backend):
    """Every rule and variant: bit for bit the run that plans in full every step (NAdam's ``mu_product`` too, a
    per-tensor host counter of its packs); two full plans in 12 steps: the first step and the one that gives a
    param its first gradient (it makes state; one full plan for a rule without state)."""
    def make(p):
        return case.cls([dict(params=p[:3]), dict(params=p[3:])], **{**kw, "backend": backend})
    a, pa, full = _run(make, cache=True)
    b, pb, _ = _run(make, cache=False)
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))
    if _sparse(a):  # (a rule without state: its params are members from the first step on)
        assert full == (2 if any(a.state.get(x) for x in pa) else 1), f"{full} full plans"


LAYOUTS = [("native", torch.float32), ("bf16_state", torch.float32), ("master", torch.bfloat16),
           ("master16", torch.bfloat16), ("bf16_sr", torch.bfloat16), ("int8_state", torch.float32),
           ("int8_sr", torch.float32), ("master16_int8", torch.bfloat16)]
INT8_SHAPES = [(16, 256), (300,), (5, 7), (4096,), (2, 2048), (8192,), (3,)]  # quantized: 1st, 4th, 5th, 6th


@pytest.mark.parametrize("rule", ["AdamW", "Lion", "SGD"])
@pytest.mark.parametrize("layout,dtype", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_sets_of_gradients_in_every_layout(layout, dtype, rule, backend):
    """The dtype layouts: the members' codes and scales, masters and remainders, and the stochastic rounding's
    per-param keys (by the param's position in its group, whoever else has a gradient) as the full plan's."""
    kw = dict(betas=(0.9, 0.99)) if rule == "Lion" else dict(momentum=0.9) if rule == "SGD" else {}

    def make(p):
        return getattr(mf, rule)([dict(params=p[:3]), dict(params=p[3:], weight_decay=0.0)], lr=1e-3, layout=layout,
                                 sr_seed=7, backend=backend, **kw)
    shapes = INT8_SHAPES if "int8" in layout else SHAPES
    a, pa, full = _run(make, cache=True, shapes=shapes, dtype=dtype)
    b, pb, _ = _run(make, cache=False, shapes=shapes, dtype=dtype)
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))
    assert full == 2, f"{full} full plans"


@pytest.mark.parametrize("cls", [mf.SGDScheduleFree, mf.AdamWScheduleFree])
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_sets_of_gradients_schedule_free(cls, backend):
    """Schedule-free (per-group counters that move every step, params without a gradient not at all)."""
    def make(p):
        return cls([dict(params=p[:3]), dict(params=p[3:])], lr=1e-2, warmup_steps=2, backend=backend)
    a, pa, full = _run(make, cache=True)
    b, pb, _ = _run(make, cache=False)
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))
    assert full == 2, f"{full} full plans"


def test_changing_sets_of_gradients_match_torch():
    """The convention itself (a param without a gradient neither moves nor counts a step) against torch.optim.AdamW
    on the same sequence, through the cached plan."""
    p = [torch.nn.Parameter(t) for t in make_params(SHAPES)]
    q = [torch.nn.Parameter(t.detach().clone()) for t in p]
    a = mf.AdamW(p, lr=1e-2, weight_decay=0.1, backend="reference")
    b = torch.optim.AdamW(q, lr=1e-2, weight_decay=0.1, foreach=False)
    for gs, mask in zip(make_grads(SHAPES, steps=STEPS), _masks(len(SHAPES))):
        for x, y, g, m in zip(p, q, gs, mask):
            x.grad = g.clone() if m else None
            y.grad = g.clone() if m else None
        a.step()
        b.step()
    for x, y in zip(p, q):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        assert float(a.state[x]["step"]) == float(b.state[y]["step"])
        torch.testing.assert_close(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"], rtol=1e-12, atol=1e-14)


def _stepped_once(backend="reference"):
    """AdamW over SHAPES after one step of every param."""
    p = [torch.nn.Parameter(t) for t in make_params(SHAPES)]
    opt = mf.AdamW(p, lr=1e-2, backend=backend)
    for x in p:
        x.grad = torch.ones_like(x)
    opt.step()
    return opt, p


def _members_after_full_plan(backend="reference"):
    """AdamW over SHAPES: every param stepped once, then a step with params 1 and 3 without gradients; the
    cached plan then holds all as members."""
    opt, p = _stepped_once(backend)
    p[1].grad = p[3].grad = None
    opt.invalidate_caches()
    opt.step()  # a full plan with two params without gradients: members all the same
    e = opt._fast["groups"][0]
    assert e["sparse"] and len(e["items"]) == len(p), "the params without gradients are members"
    return opt, p


def test_a_member_without_gradient_is_not_read_and_checked_when_it_gets_one():
    """A member's state broken while it has no gradient: the steps go on (torch ignores such params too); the step
    that gives it a gradient raises and changes nothing."""
    opt, p = _members_after_full_plan()
    full = _count_full_plans(opt)
    opt.state[p[1]]["exp_avg"] = opt.state[p[1]]["exp_avg"].float()  # wrong dtype, while without gradient
    opt.step()
    opt.step()
    assert full == [], "the other params' steps took the cached plan"
    p[1].grad = torch.ones_like(p[1])
    assert_step_raises_unchanged(opt, p, (TypeError, ValueError), "exp_avg")


def test_a_param_without_gradient_whose_state_is_bad_is_left_out_not_raised():
    """The full plan validates the params without gradients for membership only: one whose state fails is left
    out, the step runs (as torch's would); when it gets a gradient, the full plan names it."""
    opt, p = _stepped_once()
    p[2].grad = None
    opt.state[p[2]]["exp_avg_sq"] = torch.zeros(3)  # the wrong shape
    opt.invalidate_caches()
    before = p[2].detach().clone()
    opt.step()
    assert torch.equal(p[2], before)
    e = opt._fast["groups"][0]
    assert all(x is not p[2] for x in e["items"]) and len(e["items"]) == len(p) - 1
    p[2].grad = torch.ones_like(p[2])
    assert_step_raises_unchanged(opt, p, ValueError, "exp_avg_sq")


def test_a_member_without_gradient_sharing_state_memory_is_left_out():
    """A param without gradient whose state shares memory with another's (the full plan does not check it while it
    is not stepped): not a member; the step that gives it a gradient refuses it, as the full plan always did."""
    opt, p = _stepped_once()
    p[3].grad = None
    opt.state[p[3]]["exp_avg"] = opt.state[p[4]]["exp_avg"][:7]  # (a view into param 4's state)
    opt.invalidate_caches()
    opt.step()
    assert all(x is not p[3] for x in opt._fast["groups"][0]["items"])
    p[3].grad = torch.ones_like(p[3])
    assert_step_raises_unchanged(opt, p, ValueError, "share state memory")


def test_a_param_in_two_groups_without_gradient_is_no_member():
    """A param listed in two groups (the full plan refuses it once it has a gradient) is no member of either while it
    has none: a later step with a gradient raises instead of updating it twice."""
    p = [torch.nn.Parameter(t) for t in make_params(SHAPES[:3])]
    opt = mf.SGD([dict(params=p[:2]), dict(params=p[2:])], lr=0.1, momentum=0.9, backend="reference")
    for x in p:
        x.grad = torch.ones_like(x)
    opt.step()
    opt.param_groups[1]["params"].append(p[0])
    opt.state[p[0]]  # (its state is there: a member candidate in both groups)
    p[0].grad = None
    opt.step()
    assert all(x is not p[0] for e in opt._fast["groups"] for x in e["items"])
    p[0].grad = torch.ones_like(p[0])
    assert_step_raises_unchanged(opt, p, ValueError, "param groups 0 and 1")


def test_cached_grads_sparse_mode():
    """The C check with sparse=True: (gradients, None) when every member has one, (gradients, positions) when some
    do, None when a param that is no member has one or a member with a gradient changed."""
    opt, p = _members_after_full_plan()
    e = opt._fast["groups"][0]
    args = (e["params"], e["mask"], e["states"], e["keys"], e["flat"], e["pdtype"], e["device"], e["sdtypes"], None,
            e["sigs"], e["ptrs"])
    for x in p:
        x.grad = torch.ones_like(x)
    gs, sel = _C_cpu.cached_grads(*args, True)
    assert sel is None and [g is x.grad for g, x in zip(gs, p)] == [True] * len(p)
    p[0].grad = p[4].grad = None
    gs, sel = _C_cpu.cached_grads(*args, True)
    assert sel == [1, 2, 3, 5, 6] and all(g is p[i].grad for g, i in zip(gs, sel))
    assert _C_cpu.cached_grads(*args, False) is None  # (exact mode: a member without gradient)
    p[2].grad = torch.ones(2, 3, 4, dtype=p[2].dtype)[:, :, ::2]  # a member's gradient with gaps (not dense)
    assert _C_cpu.cached_grads(*args, True) is None
    p[2].grad = None
    opt.state[p[2]]["exp_avg"] = opt.state[p[2]]["exp_avg"].clone()  # a member without gradient: not read
    gs, sel = _C_cpu.cached_grads(*args, True)
    assert sel == [1, 3, 5, 6]
    for x in p:
        x.grad = None
    assert _C_cpu.cached_grads(*args, True) == ([], [])


def test_changing_sets_of_gradients_under_muon():
    """Muon's aux AdamW (an inner optimizer planned by Muon before any steps) with a changing set of gradients."""
    shapes = [(8, 6), (6, 8), (6,), (8,), (5,)]

    def make(p):
        return mf.Muon([dict(params=p[:2]), dict(params=p[2:], use_muon=False)], lr=0.02, backend="reference")

    def go(cache):
        p = [torch.nn.Parameter(t) for t in make_params(shapes, dtype=torch.float32)]
        opt = make(p)
        grads = make_grads(shapes, steps=8, dtype=torch.float32)
        for t, gs in enumerate(grads):
            for i, (x, g) in enumerate(zip(p, gs)):
                x.grad = None if (t > 0 and (t + i) % 3 == 0) else g.clone()
            opt.step()
            if not cache:
                for inner in (opt._core, opt._aux):
                    inner.invalidate_caches()
        return opt, p
    a, pa = go(True)
    b, pb = go(False)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


FIRST_VARIANTS = [v for v in VARIANTS if v.id.endswith("-0")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kw", FIRST_VARIANTS)
def test_changing_sets_of_gradients_of_dtensor_params(case, kw, backend, one_rank_mesh):
    """FSDP2 (DTensor params, gradients as FSDP2 makes them: on the param's own spec; a param a batch did not use
    gets none): the members are DTensors, checked and stepped on their local shards; bit for bit the full plan
    every step and the same plain tensors, two full plans in 12 steps (one for a rule without state)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    def go(mesh, cache):
        values = make_params(SHAPES)
        ps = [torch.nn.Parameter(v.clone() if mesh is None else distribute_tensor(v.clone(), mesh, [Shard(0)]))
              for v in values]
        opt = case.cls([dict(params=ps[:3]), dict(params=ps[3:])], **{**kw, "backend": backend})
        full = _count_full_plans(opt)
        for gs, mask in zip(make_grads(SHAPES, steps=STEPS), _masks(len(SHAPES))):
            for p, g, m in zip(ps, gs, mask):
                p.grad = None if not m else g.clone() if mesh is None else DTensor(g.clone(), p._spec,
                                                                                   requires_grad=False)
            opt.step()
            if not cache:
                opt.invalidate_caches()
        return opt, ps, len(full)

    def local(t):
        return t._local_tensor if isinstance(t, DTensor) else t

    a, pa, full = go(one_rank_mesh, True)
    b, pb, _ = go(one_rank_mesh, False)
    c, pc, _ = go(None, True)
    for x, y, z in zip(pa, pb, pc):
        assert torch.equal(local(x), local(y)) and torch.equal(local(x), z)
        for k, v in a.state[x].items():
            w, u = b.state[y][k], c.state[z][k]
            assert torch.equal(local(v), local(w)) and torch.equal(local(v), u), k
    if _sparse(a):
        assert full == (2 if any(a.state.get(x) for x in pa) else 1), f"{full} full plans"
        assert all(e["dtensor"] is not None and e["sparse"] for e in a._fast["groups"])


def test_a_param_without_gradient_keeps_its_host_counters_and_checkpoint_forms_as_they_are():
    """A param without a gradient keeps its state untouched, as in torch: a ``step`` set by hand to a number (a
    review, 2026-12-07: the cached plan's members' counters were restacked into float32 views) stays that number,
    NAdam's ``mu_product`` the same; such a param is no member until it steps (a stepped counter becomes the tensor
    torch keeps)."""
    for cls, key, value in ((mf.AdamW, "step", 7), (mf.NAdam, "mu_product", 0.5)):
        p = [torch.nn.Parameter(t) for t in make_params(SHAPES[:3])]
        opt = cls(p, lr=1e-2, backend="reference")
        for x in p:
            x.grad = torch.ones_like(x)
        opt.step()
        opt.state[p[1]][key] = value
        p[1].grad = None
        opt.step()
        assert opt.state[p[1]][key] == value and type(opt.state[p[1]][key]) is type(value), (cls, key)
        assert all(x is not p[1] for x in opt._fast["groups"][0]["items"])
        opt.step()
        p[1].grad = torch.ones_like(p[1])
        opt.step()
        assert isinstance(opt.state[p[1]][key], torch.Tensor)


def test_a_param_without_gradient_keeps_a_checkpoints_form_of_its_state():
    """Block scales in the (blocks,) form of checkpoints from 2026-12-05 or before: the step that gives the param a
    gradient reshapes them (and steps it as the current form); a step where it has none leaves them as they are (it
    is no member then)."""
    p = [torch.nn.Parameter(t) for t in make_params([(16, 256), (4096,)], dtype=torch.float32)]
    opt = mf.AdamW(p, lr=1e-3, layout="int8_state", backend="reference")
    for x in p:
        x.grad = torch.ones_like(x)
    opt.step()
    st = opt.state[p[0]]
    st["exp_avg_scale"] = st["exp_avg_scale"].reshape(-1)
    p[0].grad = None
    opt.invalidate_caches()
    opt.step()
    assert tuple(st["exp_avg_scale"].shape) == (16,)
    assert all(x is not p[0] for x in opt._fast["groups"][0]["items"])
    p[0].grad = torch.ones_like(p[0])
    opt.step()
    assert tuple(st["exp_avg_scale"].shape) == (16, 1)


@pytest.mark.parametrize("make", [lambda g: mf.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
                                  lambda g: mf.NAdam(g, lr=1e-2, backend="cpu"),
                                  lambda g: mf.SGD(g, lr=1e-2, momentum=0.9, backend="cpu"),
                                  lambda g: mf.Lion(g, lr=1e-3, betas=(0.9, 0.99), backend="reference")],
                         ids=["adamw", "nadam", "sgd", "lion-reference"])
def test_changing_sets_of_gradients_in_a_group_of_several_dtypes(make):
    """One group of bf16 and fp32 params (a bf16 MoE model whose norms and router stay fp32, one param group) with
    a changing set of gradients: one set of C checks per kind, each with its members; bit for bit the same params
    split into one group per dtype, and two full plans in 12 steps."""
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    shapes = [((64, 64), torch.bfloat16), ((64,), torch.float32), ((8192,), torch.bfloat16), ((33,), torch.float32),
              ((5,), torch.bfloat16), ((7,), torch.float32), ((300,), torch.bfloat16)]
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen).to(dt) for s, dt in shapes]
    grads = [[torch.randn(s, generator=gen).to(dt) for s, dt in shapes] for _ in range(STEPS)]
    masks = _masks(len(shapes))
    runs = []
    for split in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [dict(params=[p for p in ps if p.dtype == dt]) for dt in (torch.bfloat16, torch.float32)] \
            if split else ps
        opt = make(groups)
        full = _count_full_plans(opt)
        for gs, mask in zip(grads, masks):
            for p, g, m in zip(ps, gs, mask):
                p.grad = g.clone() if m else None
            opt.step()
        if not split:
            assert len(full) == 2 and "subs" in opt._fast["groups"][0], full
        runs.append((ps, opt, len(full)))
    assert_twin_runs_equal(*runs)
