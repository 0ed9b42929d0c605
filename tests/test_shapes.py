"""Every optimizer variant of optim_db on odd shapes (0-d, 0-numel, 1, 4097, a list of 300 small tensors):
low-precision runs (float32, float16, bfloat16) against a float64 run of the same optimizer from the same
(rounded) starting values, within the tolerance table, on params and every state tensor after 10 steps.
Sign rules are compared in float64 only (tests/tolerances.py): their float64 optimizer run is checked
against the float64 reference functions driven directly with the spec's scalar packs."""
import pytest
import torch

from momentum_fused import reference
from optim_db import CASES, all_variants
from tolerances import TOL

STEPS = 10
ODD_SHAPES = [(), (0,), (3, 0), (1,), (4097,), (5, 3)]
MANY_SHAPES = [((i % 5) + 1, (i * 7) % 4 + 1) if i % 3 else ((i % 11) + 1,) for i in range(300)]


def _inputs(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(STEPS)]
    return params, grads


def _run(case, kwargs, params, grads):
    opt = case.cls(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return opt


def _tol(dtype, scale):
    """TOL[dtype] with atol multiplied by ``scale``: the largest magnitude (never below 1) the same
    quantity (params, or one state key) reaches over all tensors of the float64 run.

    Why: TOL's atol is the absolute error of O(1) quantities. A momentum buffer sums ~1/(1-mu) = 10
    gradients (RMSprop with momentum: of g/sqrt(v) terms of size ~1/sqrt(1-alpha) = 10 each), so its
    entries, and the params it moves, reach 10-100 and carry rounding errors 10-100x the O(1) atol in
    float16/bfloat16 storage (measured: 0.03-0.09 in bfloat16 on buffers whose entries reach 10-30, where
    one rounding unit is 0.06-0.125; an entry that ends small after cancellation keeps the error of
    its large summands, hence the run-wide scale rather than the entry's own). The table's values are
    kept; a wrong rule still errs by O(scale)."""
    tol = dict(TOL[dtype])
    tol["atol"] = tol["atol"] * scale
    return tol


def _scale(tensors):
    return max([1.0] + [float(t.abs().max()) for t in tensors if isinstance(t, torch.Tensor) and t.numel()])


def _compare(opt_lo, p_lo, opt_hi, p_hi, dtype):
    p_scale = _scale(p_hi)
    keys = {k for b in p_hi for k in opt_hi.state.get(b, {})} - {"step", "mu_product"}
    k_scale = {k: _scale([opt_hi.state[b][k] for b in p_hi if k in opt_hi.state.get(b, {})]) for k in keys}
    for i, (a, b) in enumerate(zip(p_lo, p_hi)):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, **_tol(dtype, p_scale),
                                   msg=lambda m, i=i: f"param {i} {tuple(a.shape)}: {m}")
        sa, sb = opt_lo.state.get(a, {}), opt_hi.state.get(b, {})
        assert set(sa) == set(sb)
        for k in sa:
            if k in ("step", "mu_product"):
                assert float(sa[k]) == float(sb[k])
                continue
            assert sa[k].dtype == dtype and sa[k].shape == a.shape, k
            torch.testing.assert_close(sa[k].double(), sb[k], **_tol(dtype, k_scale[k]),
                                       msg=lambda m, i=i, k=k: f"param {i} {tuple(a.shape)} state {k}: {m}")


def _lowp_vs_f64(case, kwargs, shapes, dtype):
    p_lo, g_lo = _inputs(shapes, dtype)
    p_hi = [p.double() for p in p_lo]
    g_hi = [[g.double() for g in gs] for gs in g_lo]
    opt_lo = _run(case, kwargs, p_lo, g_lo)
    opt_hi = _run(case, kwargs, p_hi, g_hi)
    _compare(opt_lo, p_lo, opt_hi, p_hi, dtype)
    # the run did something (odd shapes with elements moved)
    moved = [not torch.equal(a.double(), b) for a, b in zip(p_lo, _inputs(shapes, dtype)[0]) if a.numel()]
    assert any(moved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: not c.sign_rule))
def test_odd_shapes_low_precision_vs_float64(case, kwargs, dtype):
    _lowp_vs_f64(case, kwargs, ODD_SHAPES, dtype)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.sign_rule])
def test_300_tensors_float32_vs_float64(name):
    case = CASES[name]
    _lowp_vs_f64(case, case.variants[-1], MANY_SHAPES, torch.float32)


# ------------------------------------------------------------------ float64 vs the reference functions
def _reference_run(case, kwargs, params, grads):
    """Drive reference.RULES directly: the spec's host logic (validation-free), zeros-initialised state,
    one scalar pack per tensor and step; FSGDM's group counter advanced once per step."""
    opt = case.cls([torch.zeros(1, dtype=torch.float64)], **kwargs)  # only to get the filled-in group
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    spec = opt.spec
    fn = reference.RULES[spec.name]
    names = spec.state_names(group)
    flags = spec.make_flags(group)
    states = [{} for _ in params]
    for gs in grads:
        for p, g, st in zip(params, gs, states):
            fresh = any(k not in st for k in names) if names else len(st) == 0
            for k in names:
                st.setdefault(k, torch.zeros_like(p))
            sc = spec.make_scalars(group, st, fresh, -1.0 if group["maximize"] else 1.0)
            fn(p, g, tuple(st[k] for k in names), sc, flags)
        if spec.group_advance is not None:
            spec.group_advance(group)
    return states


@pytest.mark.parametrize("shapes", [ODD_SHAPES, MANY_SHAPES[:60]], ids=["odd", "many"])
@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: c.sign_rule or c.name in ("QHM", "FSGDM", "AdamTied")))
def test_float64_optimizer_vs_reference_functions(case, kwargs, shapes):
    p_opt, grads = _inputs(shapes, torch.float64)
    p_ref = [p.clone() for p in p_opt]
    opt = _run(case, kwargs, p_opt, grads)
    states = _reference_run(case, kwargs, p_ref, grads)
    for i, (a, b, st) in enumerate(zip(p_opt, p_ref, states)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
        got = opt.state.get(a, {})
        assert set(got) == set(st), (set(got), set(st))
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() == a.dim() and v.shape == a.shape and k not in ("step", "mu_product"):
                torch.testing.assert_close(got[k], v, **TOL[torch.float64])
            else:
                assert float(got[k]) == float(v)
    # the run moved (nearly) every tensor; a tensor may return exactly to its start when the signs of
    # its updates alternate, so require most, not all
    nonempty = [(a, b0) for a, b0 in zip(p_opt, _inputs(shapes, torch.float64)[0]) if a.numel()]
    assert sum(not torch.equal(a, b0) for a, b0 in nonempty) >= 0.8 * len(nonempty)
