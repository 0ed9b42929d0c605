"""The Gram form of Newton-Schulz (momentum_fused.Muon(ns_algorithm="gram" | "auto"), reference.gram_newton_schulz;
docs/muon.md, "Gram form"): the same polynomial as the standard form (float64: equal to rounding), its bf16 error
within the bound measured in docs/muon.md, the choice of "auto", option validation, both backends."""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf
import momentum_fused.specs_muon as sm
from momentum_fused.reference import newton_schulz
from momentum_fused.specs_muon import DEFAULT_NS_COEFFICIENTS, GRAM_MIN_ASPECT, gram_restarts, ns_schedule
from optim_db import run

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:momentum_fused. using backend:UserWarning")]

SCHEDULES = {
    "torch": dict(ns_coefficients=DEFAULT_NS_COEFFICIENTS, ns_steps=5),
    "list": dict(ns_coefficients=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], ns_steps=4),
    "polar_express": dict(ns_coefficients="polar_express", ns_steps=5),
    "polar_express_8": dict(ns_coefficients="polar_express", ns_steps=8),
}
SHAPES = [(3, 5), (7, 2), (4, 3, 2), (3, 5), (5, 5), (1, 4), (3, 9), (10, 3), (2, 0)]


def _stack(shape, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("sched", sorted(SCHEDULES))
@pytest.mark.parametrize("shape", [(16, 48), (40, 10), (12, 12), (1, 7), (5, 0)], ids=str)
@pytest.mark.parametrize("restarts", [(), (1,), (2,), (1, 2, 3)], ids=str)
def test_float64_gram_equals_the_standard_form(sched, shape, restarts):
    """The Gram form evaluates the same polynomial: in float64 it equals the standard form to rounding."""
    x = _stack(shape)
    s = ns_schedule(SCHEDULES[sched])
    want = newton_schulz(x, s, 1e-7, torch.float64)
    got = newton_schulz(x, s, 1e-7, torch.float64, gram=True, restarts=restarts)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("restarts", [(), (2,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_gram_result_of_a_tall_stack_is_contiguous(restarts, dtype):
    """A tall stack's Gram-form result comes back in the tall layout, contiguous (X^T Q^T, one product), so that
    the matrix phase writes it into the update buffer without a transposing copy; it is the wide stack's result
    transposed: in float64 to rounding, in bf16 to bf16's rounding (the same products, operands transposed)."""
    x = _stack((40, 10))
    s = ns_schedule(SCHEDULES["torch"])
    got = newton_schulz(x, s, 1e-7, dtype, gram=True, restarts=restarts)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    want = newton_schulz(x.mT.contiguous(), s, 1e-7, dtype, gram=True, restarts=restarts).mT
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want.double(), **tol)


def _rel_err(y, ref):
    return ((y.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()


# The bf16 error bound of the Gram form (the default restarts) relative to the standard form's bf16 error, both
# against the float64 standard form, at m = 256 (docs/muon.md, "Gram form": measured <= 1.14 with torch's
# coefficients, 3.1-4.2 with Polar Express on Gaussian input; the ratio is larger for small m: ~1.5-2 at m <= 64).
GRAM_BF16_BOUND = {"torch": 1.25, "polar_express": 5.0}


@pytest.mark.parametrize("sched", sorted(GRAM_BF16_BOUND))
@pytest.mark.parametrize("ratio", [2, 3, 4])
@pytest.mark.parametrize("kind", ["gaussian", "low_rank"])
def test_bf16_gram_error_is_within_the_documented_bound(sched, ratio, kind):
    gen = torch.Generator().manual_seed(ratio)
    m, k = 256, 256 * ratio
    x = torch.randn(2, m, k, generator=gen, dtype=torch.float64)
    if kind == "low_rank":
        x = torch.randn(2, m, 8, generator=gen, dtype=torch.float64) @ torch.randn(2, 8, k, generator=gen,
                                                                                   dtype=torch.float64) + 0.01 * x
    s = ns_schedule(SCHEDULES[sched])
    ref = newton_schulz(x, s, 1e-7, torch.float64)
    std = _rel_err(newton_schulz(x, s, 1e-7, torch.bfloat16), ref)
    gram = newton_schulz(x, s, 1e-7, torch.bfloat16, gram=True, restarts=gram_restarts(len(s)))
    assert gram.dtype == torch.bfloat16
    assert _rel_err(gram, ref) <= GRAM_BF16_BOUND[sched] * std, (_rel_err(gram, ref), std)


def test_bf16_gram_without_restart_fails_on_low_rank_input():
    """Why the restarts: without them the bf16 Gram form blows up on a low-rank + noise matrix (the rounding
    error of R = X X^T grows with every step), with them it is as accurate as the standard form."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 8, generator=gen, dtype=torch.float64) @ torch.randn(2, 8, 768, generator=gen,
                                                                                 dtype=torch.float64)
    x = x + 1e-2 * torch.randn(2, 256, 768, generator=gen, dtype=torch.float64)
    s = ns_schedule(SCHEDULES["torch"])
    ref = newton_schulz(x, s, 1e-7, torch.float64)
    std = _rel_err(newton_schulz(x, s, 1e-7, torch.bfloat16), ref)
    assert _rel_err(newton_schulz(x, s, 1e-7, torch.bfloat16, gram=True), ref) > 3 * std
    assert _rel_err(newton_schulz(x, s, 1e-7, torch.bfloat16, gram=True, restarts=gram_restarts(5)), ref) <= 1.2 * std


def test_restart_steps():
    assert gram_restarts(5) == (2, 4)
    assert gram_restarts(2) == ()
    assert gram_restarts(0) == ()
    assert gram_restarts(9) == tuple(range(2, 9, sm.GRAM_RESTART_PERIOD))


# ------------------------------------------------------------------------------------ the optimizer
def _problem(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return params, grads


BACKENDS = ["reference"] + (["cpu"] if "cpu" in mf.backends.available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ["gram", "auto"])
@pytest.mark.parametrize("sched", ["torch", "polar_express"])
def test_optimizer_float64_gram_equals_standard(backend, algorithm, sched):
    """ns_dtype=float64, 6 steps: "gram" and "auto" give the params and buffers of "standard" to rounding."""
    params, grads = _problem(SHAPES, steps=6)
    q = [p.clone() for p in params]
    kw = dict(lr=0.02, ns_dtype=torch.float64, backend=backend, **SCHEDULES[sched])
    a = mf.Muon(params, ns_algorithm=algorithm, **kw)
    b = mf.Muon(q, **kw)
    assert b.param_groups[0]["ns_algorithm"] == "standard"
    run(a, params, grads)
    run(b, q, grads)
    for p, r in zip(params, q):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[r]["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
def test_optimizer_bf16_ns_tracks_float64(backend, algorithm):
    """The default NS dtype (bf16) with each algorithm: 5 steps within bf16 tolerance of the float64 NS."""
    params, grads = _problem([(8, 24), (24, 8), (8, 8)], steps=5)
    params = [p.float() for p in params]
    q = [p.double() for p in params]
    run(mf.Muon(params, lr=0.02, ns_algorithm=algorithm, backend=backend), params, grads)
    run(mf.Muon(q, lr=0.02, ns_dtype=torch.float64, backend=backend), q, grads)
    for p, r in zip(params, q):
        assert (p.double() - r).abs().max() <= 5 * 0.02 * 1.8 * 2 ** -5  # 5 steps of lr * shape factor * ~3% error


def test_auto_runs_gram_where_the_aspect_ratio_is_large(monkeypatch):
    calls = []
    real = sm.newton_schulz

    def spy(x, schedule, eps, dtype, **kw):
        calls.append((tuple(x.shape[1:]), kw.get("gram", False), kw.get("restarts", ())))
        return real(x, schedule, eps, dtype, **kw)

    monkeypatch.setattr(sm, "newton_schulz", spy)
    shapes = [(4, 10), (10, 4), (4, 9), (4, 8), (6, 6), (2, 3, 4), (3, 0)]  # aspect 2.5, 2.5, 2.25, 2, 1, 6 (2 x 12), empty
    params, grads = _problem(shapes, steps=1)
    run(mf.Muon(params, ns_algorithm="auto", ns_dtype=torch.float64), params, grads)
    got = {s: (g, r) for s, g, r in calls}
    assert GRAM_MIN_ASPECT == 2.5
    assert got == {(4, 10): (True, (2, 4)), (10, 4): (True, (2, 4)), (4, 9): (False, ()), (4, 8): (False, ()),
                   (6, 6): (False, ()), (2, 12): (True, (2, 4)), (3, 0): (False, ())}
    calls.clear()
    run(mf.Muon(params, ns_algorithm="gram", ns_dtype=torch.float64), params, grads)
    assert all(g for _, g, _ in calls) and len(calls) == len(shapes)


@pytest.mark.parametrize("value", ["fast", "Gram", None, 1, ("gram",)])
def test_bad_ns_algorithm_raises(value):
    with pytest.raises(ValueError, match="ns_algorithm.*standard.*gram.*auto"):
        mf.Muon([torch.zeros(2, 3)], ns_algorithm=value)
    opt = mf.Muon([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="ns_algorithm"):
        opt.add_param_group(dict(params=[torch.zeros(3, 4)], ns_algorithm=value))


def test_bad_ns_algorithm_set_later_changes_nothing():
    params, grads = _problem([(3, 9), (4, 4)], steps=2)
    opt = mf.Muon(params, lr=0.02)
    run(opt, params, grads[:1])
    before = [p.clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    opt.param_groups[0]["ns_algorithm"] = "fast"
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    with pytest.raises(ValueError, match="ns_algorithm"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs))


def test_torch_checkpoint_keeps_this_optimizers_own_settings():
    """A torch.optim.Muon checkpoint has no ns_algorithm, ns_dtype or maximize: the loading optimizer's own
    (constructor) values fill them, as for the other optimizers' keys torch lacks. They were the module defaults
    until 2026-12-06, which turned a maximize=True optimizer around silently."""
    params, grads = _problem([(3, 9)], steps=2)
    params = [p.float() for p in params]
    t = torch.optim.Muon(params, lr=0.02)
    run(t, params, grads)
    ours = mf.Muon([p.clone() for p in params], ns_algorithm="gram", ns_dtype=torch.float32, maximize=True)
    ours.load_state_dict(t.state_dict())
    g = ours.param_groups[0]
    assert (g["ns_algorithm"], g["ns_dtype"], g["maximize"]) == ("gram", torch.float32, True)
