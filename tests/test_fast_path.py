"""The cached plan of ``FusedOptimizer.step`` (``_fast_plan`` / ``_remember_plan``).

After a step, the optimizer keeps what it validated; the next step re-checks it with C-speed identity
comparisons and skips the per-tensor Python validation. These tests prove that the hot path is taken,
and that every change it must notice sends the step through the full plan: an optimizer that caches
ends bit-identical to one whose cache is dropped before every step, through a sequence of changes
(a param without gradient, a new param group, an lr change, a non-contiguous gradient, a replaced
state dict, replaced state tensors), and bad input still raises before anything changes.

The cached plan's checks are C functions of the cpu extension (``momentum_fused._C_cpu.cached_grads``,
``same_objects``, ``same_dict``, ``same_entries``); a pure-Python install has no cached plan (every step takes the
full plan: ``test_without_the_c_checks_every_step_takes_the_full_plan``).
"""
import copy

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from momentum_fused.optim import plan_cache, scalars
from optim_db import (OwnGradParam, all_variants, assert_snapshot_equal, assert_states_close, assert_step_raises_unchanged,
                      assert_twin_runs_equal, channels_last_twin_runs, make_grads, make_params, snapshot)

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]
EXTRA = [(6,), (2, 2)]
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in backends.available(), reason="the compiled cpu extension is not built (pip install -e .)"))]
VARIANTS = [v for v in all_variants() if not isinstance(v.values[1].get("lr"), str)]

_C_cpu = plan_cache.C_CHECKS
pytestmark = pytest.mark.skipif(_C_cpu is None, reason="the cached plan needs the compiled cpu extension, which "
                                "is not built (backends.status() says why)")


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


INT8_SHAPES = [(16, 256), (300,), (5, 7), (4096,), (2, 2048)]  # quantized: the 1st, 4th and 5th


@pytest.mark.parametrize("layout,dtype", [("int8_state", torch.float32), ("master16_int8", torch.bfloat16)])
@pytest.mark.parametrize("rule", ["AdamW", "Lion"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_plan_equals_full_plan_int8(layout, dtype, rule, backend):
    """The int8 layouts take the cached plan (per tensor: codes and block scales, or fp32 state), with the results of
    the full plan bit for bit, through a param without gradient and an lr change."""
    def go(cache):
        p = make_params(INT8_SHAPES, dtype=dtype)
        kw = dict(betas=(0.9, 0.99)) if rule == "Lion" else {}
        opt = getattr(mf, rule)([dict(params=p[:3]), dict(params=p[3:], weight_decay=0.0)], lr=1e-3, layout=layout,
                                backend=backend, **kw)
        hits = 0
        for t, gs in enumerate(make_grads(INT8_SHAPES, steps=7, dtype=dtype)):
            for i, (x, g) in enumerate(zip(p, gs)):
                x.grad = None if (t == 3 and i == 0) else g.clone()
            if t == 5:
                opt.param_groups[1]["lr"] = 5e-4
            if cache and opt._fast_plan() is not None:
                hits += 1
            opt.step()
            if not cache:
                opt.invalidate_caches()
        return opt, p, hits
    a, pa, hits = go(True)
    b, pb, _ = go(False)
    assert hits >= 4, f"the cached plan was used {hits} times"
    assert sum(k.endswith("_scale") for st in a.state.values() for k in st) == 3 * (1 if rule == "Lion" else 2)
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))


def _int8_cached(backend="reference"):
    p = make_params(INT8_SHAPES, dtype=torch.float32)
    opt = mf.AdamW(p, lr=1e-3, layout="int8_state", backend=backend)
    for gs in make_grads(INT8_SHAPES, steps=2, dtype=torch.float32):
        for x, g in zip(p, gs):
            x.grad = g.clone()
        opt.step()
    assert opt._fast_plan() is not None
    return opt, p


INT8_CHANGES = {
    "scale replaced": lambda o, p: o.state[p[0]].__setitem__("exp_avg_scale", o.state[p[0]]["exp_avg_scale"].clone()),
    "scale removed": lambda o, p: o.state[p[3]].pop("exp_avg_sq_scale"),
    "scale resized": lambda o, p: _set_data(o.state[p[0]]["exp_avg_scale"], torch.ones(3)),
    "scale of another dtype": lambda o, p: _set_data(o.state[p[4]]["exp_avg_scale"],
                                                     o.state[p[4]]["exp_avg_scale"].double()),
    "codes of another dtype": lambda o, p: _set_data(o.state[p[0]]["exp_avg"], o.state[p[0]]["exp_avg"].float()),
    "codes resized": lambda o, p: _set_data(o.state[p[3]]["exp_avg_sq"], torch.zeros(8, 512, dtype=torch.uint8)),
    "fp32 state of another dtype": lambda o, p: _set_data(o.state[p[1]]["exp_avg"], o.state[p[1]]["exp_avg"].double()),
    "a scale where the state is fp32": lambda o, p: o.state[p[2]].__setitem__("exp_avg_scale", torch.ones(1)),
}


@pytest.mark.parametrize("change", list(INT8_CHANGES))
def test_int8_cached_plan_notices_every_change(change):
    """Each change to the codes, scales or fp32 state of the int8 layouts sends the step through the full plan."""
    opt, p = _int8_cached()
    INT8_CHANGES[change](opt, p)
    assert opt._fast_plan() is None
    if change == "a scale where the state is fp32":  # (the full plan refuses it, the other changes are valid or
        assert_step_raises_unchanged(opt, p, ValueError, "block scales, but this param keeps fp32 state")  # theirs)


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
    assert opt._fast is None  # (a stale cache is dropped when found: it held the state it checked)
    opt.step()  # (the full plan, cached again)
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


def _cached_case(change, subclass):
    """An Adam optimizer after three steps of every param but param 1 (which has no state, so no member of the
    cached plan: the plan is remembered with a mask), then ``change(params, opt)``; returns the arguments of the
    cached plan's per-tensor check for its first group (its exact mode: tests/test_sparse_grads.py has the other)."""
    p = make_params(SHAPES)
    if subclass:
        p[2] = torch.Tensor._make_subclass(OwnGradParam, p[2])
    opt = mf.Adam(p, lr=1e-2, backend="reference")
    for _ in range(3):
        for x in p:
            x.grad = None if x is p[1] else torch.ones_like(x)
        opt.step()
    for x in p:
        if x is not p[1]:
            x.grad = torch.ones_like(x)
    change(p, opt)
    e = opt._fast["groups"][0]
    return (opt.param_groups[0]["params"], e["mask"], e["states"], e["keys"], e["flat"], e["pdtype"],
            e["device"], e["sdtypes"], None, None, e["ptrs"])


def _set_data(t, value):
    t.data = value


def _set_meta_grad(p):
    """(torch refuses a meta ``.grad`` on a cpu tensor: tests/test_errors.py's trick, a subclass)"""
    assert type(p) is OwnGradParam
    p.grad = torch.ones(p.shape, dtype=p.dtype, device="meta")


CHANGES = {
    "nothing": lambda p, o: None,
    "grad where the mask has none": lambda p, o: setattr(p[1], "grad", torch.ones_like(p[1])),
    "grad missing": lambda p, o: setattr(p[0], "grad", None),
    "grad with gaps (not dense)": lambda p, o: setattr(p[0], "grad", torch.ones(3, 8, dtype=p[0].dtype)[:, ::2]),
    "grad of another dtype": lambda p, o: _set_data(p[2].grad, torch.ones(2, 3, 2, dtype=torch.float32)),
    "grad of another shape": lambda p, o: _set_data(p[3].grad, torch.ones(8, dtype=p[3].dtype)),
    "grad of another shape, same numel": lambda p, o: _set_data(p[0].grad, torch.ones(4, 3, dtype=p[0].dtype)),
    "grad on meta (a param subclass with its own grad property)": lambda p, o: _set_meta_grad(p[2]),
    "param resized": lambda p, o: (_set_data(p[0], torch.ones(12, dtype=p[0].dtype)),
                                   setattr(p[0], "grad", torch.ones(12, dtype=p[0].dtype))),
    "param of another dtype": lambda p, o: (_set_data(p[3], p[3].float()), setattr(p[3], "grad", torch.ones(7))),
    "param with gaps (not dense)": lambda p, o: _set_data(p[0], torch.ones(3, 8, dtype=p[0].dtype)[:, ::2]),
    "state tensor replaced": lambda p, o: o.state[p[2]].__setitem__("exp_avg", o.state[p[2]]["exp_avg"].clone()),
    "state tensor removed": lambda p, o: o.state[p[3]].pop("exp_avg_sq"),
    "state of another dtype": lambda p, o: _set_data(o.state[p[0]]["exp_avg"], o.state[p[0]]["exp_avg"].float()),
    "state resized": lambda p, o: _set_data(o.state[p[0]]["exp_avg"], torch.zeros(12, dtype=p[0].dtype)),
    "param given other memory, same shape": lambda p, o: _set_data(p[0], p[0].detach().clone()),
    "param tied to another's memory": lambda p, o: _set_data(p[3], p[2].detach().reshape(-1)[:7]),
    "state given other memory, same shape": lambda p, o: _set_data(o.state[p[2]]["exp_avg"],
                                                                   o.state[p[2]]["exp_avg"].clone()),
    "state with gaps (not dense)": lambda p, o: _set_data(o.state[p[0]]["exp_avg_sq"],
                                                          torch.zeros(3, 8, dtype=p[0].dtype)[:, ::2]),
    "grad set to its own state": lambda p, o: setattr(p[0], "grad", o.state[p[0]]["exp_avg"]),
    "grad a view into its own state": lambda p, o: setattr(p[3], "grad", o.state[p[3]]["exp_avg_sq"][:]),
    # a dense non-contiguous tensor (the memory of a contiguous one, permuted: channels_last) passes since
    # 2026-12-07: the step runs it in memory order (backends.contiguous_lists)
    "a transposed (dense) grad": lambda p, o: setattr(p[0], "grad", torch.ones(4, 3, dtype=p[0].dtype).t()),
}  # (a replaced state dict or param list: the identity checks of _fast_plan itself, tests above)


@pytest.mark.parametrize("change", list(CHANGES))
def test_cached_grads_notices_every_change(change):
    """The C check of the cached plan: the gradient objects when nothing changed (or a dense gradient replaced
    another), None after any other change."""
    args = _cached_case(CHANGES[change], subclass="subclass" in change)
    got = _C_cpu.cached_grads(*args)
    if change in ("nothing", "a transposed (dense) grad"):
        params, mask = args[0], args[1]
        want = [x.grad for x, m in zip(params, mask or [True] * len(params)) if m]
        assert got is not None and len(got) == len(want) and all(a is b for a, b in zip(got, want))
    else:
        assert got is None


def test_without_the_c_checks_every_step_takes_the_full_plan(monkeypatch):
    """A pure-Python install (no C checks): no cached plan, the same results."""
    case, kw = VARIANTS[0].values
    a, pa, hits = _scenario(case, kw, "reference", cache=True)
    assert hits >= 3
    monkeypatch.setattr(plan_cache, "C_CHECKS", None)
    monkeypatch.setattr(scalars, "_same_entries", scalars._same_entries_py)
    b, pb, hits = _scenario(case, kw, "reference", cache=True)
    assert hits == 0 and b._fast is None
    assert_snapshot_equal(snapshot(b, pb), snapshot(a, pa))


def test_identity_checks():
    """The cached plan's identity checks (same_objects, same_dict, same_entries; the latter also in Python for
    the host counters of a pure-Python install), on identical contents and on every kind of difference:
    length, one replaced object, an equal but distinct object, order, a missing key, an entry that is not a
    dict, a dict subclass."""
    from collections import defaultdict

    objs = [torch.zeros(1) for _ in range(5)]
    twin = [torch.zeros(1) for _ in range(5)]  # equal values, other objects
    cases = [(list(objs), objs, True), (tuple(objs), objs, True), (objs[:4], objs, False), (objs[::-1], objs, False),
             ([*objs[:2], twin[2], *objs[3:]], objs, False), ([], [], True), ([objs[0]], [], False),
             (iter(objs), objs, False), ({o: 1 for o in objs}, objs, False)]  # not a list or tuple
    for now, cached, want in cases:
        assert _C_cpu.same_objects(now, list(cached)) is want

    keys, values = objs[:3], [{"a": 1}, {"a": 2}, {"a": 3}]
    d = defaultdict(dict, zip(keys, values))
    reordered = dict(zip(keys[::-1], values[::-1]))
    replaced = dict(zip(keys, [values[0], dict(values[1]), values[2]]))
    for dd, want in ((d, True), (dict(d), True), (reordered, False), (replaced, False), ({}, False),
                     ({**d, objs[4]: {}}, False)):
        assert _C_cpu.same_dict(dd, keys, values) is want
    assert _C_cpu.same_dict({}, [], [])

    dicts = [{"step": t} for t in objs[:3]]
    for ds, key, cached, want in ((dicts, "step", objs[:3], True), (tuple(dicts), "step", objs[:3], True),
                                  (dicts, "step", [objs[0], twin[1], objs[2]], False), (dicts, "other", objs[:3], False),
                                  (dicts[:2], "step", objs[:3], False), ([dicts[0], 5, dicts[2]], "step", objs[:3], False),
                                  ([dicts[0], {}, dicts[2]], "step", objs[:3], False),
                                  (iter(dicts), "step", objs[:3], False)):
        assert _C_cpu.same_entries(ds, key, list(cached)) is want
        assert scalars._same_entries_py(ds, key, list(cached)) is want


def test_cached_plan_serves_params_off_the_cpu():
    """Params that are not CPU tensors (``meta`` here, standing for CUDA, which the cached plan treats alike: its
    checks read metadata only) take the cached plan, and a backend receives exactly what the full plan gives it:
    the same tensor objects in the same order, the same scalar packs (bench/frontend.py times this path)."""
    seen = []

    def apply(spec, flags, params, grads, states, scalars, **kw):
        seen.append((flags, list(params), list(grads), [tuple(s) for s in states],
                     [tuple(float(x) for x in sc) for sc in scalars], kw))

    backends.register(backends.Backend(name="null-meta", apply=apply, devices=("meta",), device_scalars=True,
                                       scalar_tables=True))
    try:
        ps = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in SHAPES]
        for p in ps:
            p.grad = torch.empty_like(p)
        runs = {}
        for cache in (True, False):
            opt = mf.AdamW([dict(params=ps[:2]), dict(params=ps[2:], lr=1e-2)], lr=1e-3, backend="null-meta")
            seen.clear()
            hits = 0
            for _ in range(4):
                if cache and opt._fast_plan() is not None:
                    hits += 1
                opt.step()
                if not cache:
                    opt.invalidate_caches()
            runs[cache] = (hits, [(f, [id(x) for x in p], [id(x) for x in g], [tuple(map(id, t)) for t in s], sc, kw)
                                  for f, p, g, s, sc, kw in seen], opt)
        assert runs[True][0] == 3 and runs[False][0] == 0  # every step after the first took the cached plan
        # (the two optimizers share the params: the packs (step counters, lr) agree, the state objects are each
        # optimizer's own, so compare them by position)
        cached, full = runs[True][1], runs[False][1]
        assert [(f, p, g, sc, kw) for f, p, g, s, sc, kw in cached] == [(f, p, g, sc, kw) for f, p, g, s, sc, kw
                                                                       in full]
        st_c, st_f = runs[True][2].state, runs[False][2].state
        order = lambda st: [[id(st[p][k]) for k in ("exp_avg", "exp_avg_sq")] for p in ps]  # noqa: E731
        assert [[list(t) for t in s] for _, _, _, s, _, _ in cached][-1] == [o for o in order(st_c)]
        assert [[list(t) for t in s] for _, _, _, s, _, _ in full][-1] == [o for o in order(st_f)]
    finally:
        backends._REGISTRY.pop("null-meta", None)


@pytest.mark.skipif(backends.status().get("cpu") != "available", reason="needs the cpu extension")
def test_weight_tying_made_between_steps_is_refused_by_the_cached_plan():
    """``b.data = a.data`` after a step: the cached plan sent both params to the kernels, which updated the shared
    memory from two threads at once (a review found results differing from torch by 0.8, changing from run to
    run). The cached plan now sees the new memory and the full plan refuses the overlap, changing nothing."""
    a, b = (torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2))
    opt = mf.SGD([a, b], lr=0.1, momentum=0.9, backend="cpu")
    for _ in range(2):
        a.grad, b.grad = torch.ones_like(a), torch.full_like(b, 2.0)
        opt.step()
    assert opt._fast is not None  # (the cached plan is in use)
    b.data = a.data
    a.grad, b.grad = torch.ones_like(a), torch.full_like(b, 2.0)
    before = a.detach().clone(), [opt.state[p]["momentum_buffer"].clone() for p in (a, b)]
    with pytest.raises(ValueError, match="overlap"):
        opt.step()
    assert torch.equal(a, before[0])
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip((a, b), before[1]))


@pytest.mark.skipif(backends.status().get("cpu") != "available", reason="needs the cpu extension")
def test_a_tie_to_memory_starting_at_the_same_address_is_refused_by_the_cached_plan():
    """The cached plan compared data pointers only: a stateless rule's param given a longer view starting at its
    old address (overlapping the next param) was stepped on the cached plan (a review). Sizes are compared too."""
    buf = torch.zeros(8)
    a = torch.nn.Parameter(buf[:4])
    b = torch.nn.Parameter(buf[4:])
    opt = mf.SGD([a, b], lr=1.0, backend="cpu")
    for _ in range(2):
        a.grad, b.grad = torch.ones(4), torch.ones(4)
        opt.step()
    a.data = buf[:8]
    a.grad, b.grad = torch.ones(8), torch.ones(4)
    with pytest.raises(ValueError, match="overlap"):
        opt.step()


@pytest.mark.skipif(backends.status().get("cpu") != "available", reason="needs the cpu extension")
def test_an_inference_param_stepped_in_inference_mode_is_refused_outside_it():
    """Steps inside torch.inference_mode() may update an inference param; a later step outside it took the cached
    plan, and the cpu kernels wrote the inference tensor (a review). The cached plan now leaves such a param to the
    full plan, which refuses it before anything changes."""
    a = torch.nn.Parameter(torch.ones(4))
    with torch.inference_mode():
        b = torch.ones(4)
    opt = mf.SGD([a, b], lr=1.0, backend="cpu")
    with torch.inference_mode():
        for _ in range(2):
            a.grad, b.grad = torch.ones(4), torch.ones(4)
            opt.step()
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    before = a.detach().clone(), b.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_dense_non_contiguous_tensors_step_in_memory_order_without_copies():
    """backends.contiguous_lists: a channels_last param whose state has its strides runs through flat views of
    its memory (no working copy written back), its gradient too when it has those strides, else a copy in the
    param's memory format; a state of other strides, or a layout whose values depend on the element's row-major
    index (memory_order False: int8 blocks, stochastic bits), takes the contiguous copies as before."""
    cl = torch.channels_last
    p = torch.randn(4, 3, 5, 2).to(memory_format=cl)
    g, s = torch.randn_like(p), torch.zeros_like(p)  # (preserve_format: channels_last)
    ps, gs, flat, writeback = backends.contiguous_lists([p], [g], [(s,)], memory_order=True)
    assert writeback == [] and all(t.is_contiguous() and t.dim() == 1 for t in (*ps, *gs, *flat))
    assert (ps[0].data_ptr(), gs[0].data_ptr(), flat[0].data_ptr()) == (p.data_ptr(), g.data_ptr(), s.data_ptr())
    ps[0].add_(1.0)  # (a write through the view is a write of p, logical element for element)
    assert torch.equal(p, ps[0].as_strided(p.shape, p.stride()))
    gc = g.contiguous()
    _, gs, _, writeback = backends.contiguous_lists([p], [gc], [(s,)], memory_order=True)
    assert writeback == [] and torch.equal(gs[0].as_strided(p.shape, p.stride()), gc)
    for st, mo in (((s.contiguous(),), True), ((s,), False)):
        ps, _, flat, writeback = backends.contiguous_lists([p], [g], [st], memory_order=mo)
        assert [w[0] for w in writeback][:1] == [p] and ps[0].data_ptr() != p.data_ptr()


@pytest.mark.parametrize("layout, dtype", [("native", torch.float32), ("master", torch.bfloat16),
                                           ("master16", torch.bfloat16), ("bf16_state", torch.float32),
                                           ("int8_state", torch.float32), ("bf16_sr", torch.bfloat16)])
def test_channels_last_params_take_the_cached_plan_and_equal_contiguous_ones(layout, dtype):
    """A channels_last model (conv weights and their autograd gradients in that format) took the full plan every
    step (the cached plan's C checks asked for contiguous tensors) and ran on contiguous copies of params and
    state written back: 3.2x torch's fused step on a ResNet's params (a review, 2026-12-07). Now the cached plan
    holds after the first step, and the trajectory is the contiguous twin's bit for bit."""
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    a, b = channels_last_twin_runs("cpu", layout, dtype)
    assert (a[2], b[2]) == (1, 1), "the full plan ran after the first step"
    assert b[0][0].is_contiguous(memory_format=torch.channels_last)
    assert_twin_runs_equal(a, b)


@pytest.mark.parametrize("make", [lambda g: mf.AdamW(g, lr=1e-2, weight_decay=0.1, backend="cpu"),
                                  lambda g: mf.SGD(g, lr=1e-2, momentum=0.9, nesterov=True, backend="cpu"),
                                  lambda g: mf.NAdam(g, lr=1e-2, backend="cpu")], ids=["adamw", "sgd", "nadam"])
def test_a_group_of_several_dtypes_takes_the_cached_plan(make):
    """One group of bf16 and fp32 params (a bf16 model's fp32 norms, one param group) took the full plan every
    step (the cached plan knew one (device, dtype) a group: 2.9x torch's fused step on tiny tensors, a review,
    2026-12-07). It keeps one set of C checks per kind now, one bucket per kind from the cache; the trajectory is
    that of the same params split into one group per dtype, bit for bit. A param without a gradient, of a kind no
    other param has, that gets one later sends that step to the full plan (its kind's mask), and is stepped."""
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    gen = torch.Generator().manual_seed(1)
    shapes = [((64, 64), torch.bfloat16), ((64,), torch.float32), ((8192,), torch.bfloat16), ((33,), torch.float32),
              ((5,), torch.float16)]
    init = [torch.randn(s, generator=gen).to(dt) for s, dt in shapes]
    grads = [[torch.randn(s, generator=gen).to(dt) for s, dt in shapes] for _ in range(6)]
    runs = []
    for split in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [dict(params=[p for p in ps if p.dtype == dt]) for dt in (torch.bfloat16, torch.float32,
                                                                          torch.float16)] if split else ps
        opt = make(groups)
        full = []
        real = opt._plan
        opt._plan = lambda real=real, full=full: full.append(1) or real()  # (bound now: the loop rebinds them)
        for t, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if i == 4 and t < 3 else g.clone()  # (the fp16 param gets its first gradient at 3)
            opt.step()
        if not split:
            assert len(full) == 2 and "subs" in opt._fast["groups"][0], full  # (steps 0 and 3)
        runs.append((ps, opt, len(full)))
    assert_twin_runs_equal(*runs)
    (pa, oa, _), _ = runs
    with torch.no_grad():  # a param's dtype changed since: its kind's check fails, the full plan names it
        pa[1].data = pa[1].data.double()
    pa[1].grad = torch.ones_like(pa[1])
    with pytest.raises((TypeError, ValueError)):
        oa.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["same group", "other group"])
def test_a_gradient_that_is_another_params_state_is_refused_by_the_cached_plan(where, backend):
    """A gradient sharing memory with another param's state tensor (the step would write it while reading the
    gradient): the full plan refuses it; the cached plan's C check compared a gradient with its own param's state
    only, and stepped it (a review, 2026-12-07). It checks every state span of the cached plan now: the step raises
    the full plan's error and changes nothing."""
    p = make_params([(3, 4), (5,), (2, 3, 2), (5,)])
    opt = mf.AdamW([dict(params=p[:2]), dict(params=p[2:])], lr=1e-2, backend=backend)
    for _ in range(2):
        for x in p:
            x.grad = torch.ones_like(x)
        opt.step()
    assert opt._fast_plan() is not None
    for x in p:
        x.grad = torch.ones_like(x)
    if where == "same group":  # param 1's gradient: a view of param 0's exp_avg
        p[1].grad = opt.state[p[0]]["exp_avg"].reshape(-1)[:5]
    else:  # param 3's (group 1): param 1's exp_avg (group 0)
        p[3].grad = opt.state[p[1]]["exp_avg"]
    assert opt._fast_plan() is None
    assert_step_raises_unchanged(opt, p, ValueError, "shares memory")
