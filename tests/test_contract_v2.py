"""Contract v2 (docs/architecture.md): a rule may declare (a) state tensors of their own shape and dtype
(``StateTensor``: int8 codes, per-block fp32 scales; work buffers of one step) and (b) phases, elementwise
passes with a matrix phase between them batched by shape. Proved here on two toy rules registered by this
module (reference math only; a backend without their passes is skipped with a warning, or refused when forced):

- ``toy_nm``: normalized momentum, the shape of orthogonalized momentum (Muon): pass 1 m <- beta m + g and
  u <- m (u a work buffer); matrix phase u <- u / ||u||_F per matrix; pass 2 p <- p - lr u.
- ``toy_q8``: SGD momentum whose buffer is kept as int8 codes with one fp32 absmax scale per block of 4 elements
  (the shape of 8-bit block-wise state): decode, update, re-encode in one elementwise pass.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from momentum_fused import backends, reference
from momentum_fused.optim.base import FusedOptimizer
from momentum_fused.specs import (LR, SPECS, UNIT_OPEN, ElementwisePass, MatrixPhase, StateTensor,
                                  UpdateRuleSpec)
from optim_db import assert_snapshot_equal, run, snapshot

BLOCK = 4


# ------------------------------------------------------------------------------------ toy_nm (phases)
def _nm_momentum_ref(p, g, state, s, f):
    m, u = state
    g = g * s.grad_mult
    m.mul_(s.momentum).add_(g)
    u.copy_(m)


def _nm_apply_ref(p, g, state, s, f):
    (u,) = state
    p.add_(u, alpha=-s.lr)


def _frobenius_normalize(group, batch):
    flat = batch.reshape(batch.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-30)
    CALLS.append(tuple(batch.shape))
    return (flat / norms[:, None]).reshape(batch.shape)


CALLS: list = []
_NM_HP = dict(lr=LR, momentum=UNIT_OPEN)
NM_MOMENTUM = UpdateRuleSpec(
    name="toy_nm_momentum", family="toy", hparams=_NM_HP, defaults=dict(lr=0.1, momentum=0.9),
    state_names=lambda g: ("momentum_buffer", "update"), flag_names=(), flags=lambda g: (),
    scalar_names=("momentum", "grad_mult"), advance=lambda g, st, fresh, t: (float(g["momentum"]),))
NM_APPLY = UpdateRuleSpec(
    name="toy_nm_apply", family="toy", hparams=_NM_HP, defaults=dict(lr=0.1, momentum=0.9),
    state_names=lambda g: ("update",), flag_names=(), flags=lambda g: (),
    scalar_names=("lr", "grad_mult"), advance=lambda g, st, fresh, t: (float(g["lr"]),))
NM = UpdateRuleSpec(
    name="toy_nm", family="toy", hparams=_NM_HP, defaults=dict(lr=0.1, momentum=0.9),
    state_names=lambda g: ("momentum_buffer",), flag_names=(), flags=lambda g: (), scalar_names=("grad_mult",),
    advance=lambda g, st, fresh, t: (), counts_steps=True,
    state_tensors=lambda g: (StateTensor("momentum_buffer"), StateTensor("update", persistent=False)),
    phases=(ElementwisePass("toy_nm_momentum"), MatrixPhase("normalize", "update", _frobenius_normalize, max_batch=2),
            ElementwisePass("toy_nm_apply")))


# ------------------------------------------------------------------------------------ toy_q8 (own state shapes)
def _blocks(numel):
    return max(1, math.ceil(numel / BLOCK))


def _decode(codes, scales, like):
    n = like.numel()
    pad = _blocks(n) * BLOCK - n
    q = torch.nn.functional.pad(codes.reshape(-1).to(like.dtype), (0, pad)).view(-1, BLOCK)
    return (q * (scales.to(like.dtype)[:, None] / 127.0)).reshape(-1)[:n].view(like.shape)


def _encode(m, codes, scales):
    n = m.numel()
    pad = _blocks(n) * BLOCK - n
    b = torch.nn.functional.pad(m.reshape(-1), (0, pad)).view(-1, BLOCK)
    amax = b.abs().amax(dim=1)
    scales.copy_(amax)
    q = torch.where(amax[:, None] > 0, b / amax.clamp_min(1e-30)[:, None] * 127.0, torch.zeros_like(b))
    codes.copy_(q.round().clamp(-127, 127).reshape(-1)[:n].view(codes.shape).to(torch.int8))


def _q8_ref(p, g, state, s, f):
    codes, scales = state
    g = g * s.grad_mult
    m = _decode(codes, scales, p).mul_(s.momentum).add_(g)
    _encode(m, codes, scales)
    p.add_(_decode(codes, scales, p), alpha=-s.lr)


Q8 = UpdateRuleSpec(
    name="toy_q8", family="toy", hparams=dict(lr=LR, momentum=UNIT_OPEN), defaults=dict(lr=0.1, momentum=0.9),
    state_names=lambda g: ("codes", "scales"), flag_names=(), flags=lambda g: (),
    scalar_names=("lr", "momentum", "grad_mult"), advance=lambda g, st, fresh, t: (float(g["lr"]), float(g["momentum"])),
    state_tensors=lambda g: (StateTensor("codes", dtype=torch.int8),
                             StateTensor("scales", shape=lambda p: (_blocks(p.numel()),), dtype=torch.float32)))


class ToyNM(FusedOptimizer):
    rule = "toy_nm"
    supported_layouts = ("native",)

    def __init__(self, params, lr=0.1, momentum=0.9, *, maximize=False, backend=None, capturable=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, maximize=maximize), backend=backend,
                         capturable=capturable)


class ToyQ8(FusedOptimizer):
    rule = "toy_q8"

    def __init__(self, params, lr=0.1, momentum=0.9, *, maximize=False, backend=None, layout=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, maximize=maximize), backend=backend, layout=layout)


@pytest.fixture(autouse=True)
def toy_rules(monkeypatch):
    for spec in (NM_MOMENTUM, NM_APPLY, NM, Q8):
        monkeypatch.setitem(SPECS, spec.name, spec)
    monkeypatch.setitem(reference.RULES, "toy_nm_momentum", _nm_momentum_ref)
    monkeypatch.setitem(reference.RULES, "toy_nm_apply", _nm_apply_ref)
    monkeypatch.setitem(reference.RULES, "toy_q8", _q8_ref)
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the automatic choice warns once that the cpu backend lacks the toys)
        yield


SHAPES = [(3, 4), (5, 5), (3, 4), (3, 4), (7,), (0,), ()]


def _problem(dtype=torch.float64, steps=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


# ------------------------------------------------------------------------------------ (b) phases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_phased_rule_equals_an_independent_transcription(dtype):
    params, grads = _problem(dtype)
    opt = ToyNM([dict(params=params[:4]), dict(params=params[4:], lr=0.05)], lr=0.1, momentum=0.8)
    run(opt, params, grads)
    x, _ = _problem(torch.float64)
    m = [torch.zeros_like(t) for t in x]
    for gs in grads:
        for i, (t, g) in enumerate(zip(x, gs)):
            m[i] = 0.8 * m[i] + g.double()
            n = m[i].norm()
            u = m[i] / max(float(n), 1e-30)
            t -= (0.1 if i < 4 else 0.05) * u
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(params, x):
        torch.testing.assert_close(a.double(), b, **tol)
    assert all(set(opt.state[p]) == {"step", "momentum_buffer"} for p in params)  # the work buffer is not state
    assert "update" not in str(opt.state_dict()["state"])


def test_matrix_phase_is_batched_by_shape_and_chunked():
    params, grads = _problem(steps=1)
    opt = ToyNM(params, lr=0.1)
    run(opt, params, grads)
    # one group: (3, 4) x3 -> chunks of max_batch 2 -> [2, 3, 4] and [1, 3, 4]; (5, 5), (7,), (0,), () once each
    assert sorted(CALLS) == sorted([(2, 3, 4), (1, 3, 4), (1, 5, 5), (1, 7), (1, 0), (1,)])


def test_phased_rule_resumes_bitwise_and_skips_on_found_inf():
    params, grads = _problem()
    a = ToyNM(params, lr=0.1)
    run(a, params, grads[:4])
    sd = copy.deepcopy(a.state_dict())
    saved = [p.clone() for p in params]
    run(a, params, grads[4:])
    q = [p.clone() for p in saved]
    b = ToyNM(q, lr=0.1)
    b.load_state_dict(sd)
    run(b, q, grads[4:])
    assert_snapshot_equal(snapshot(a, params), snapshot(b, q))
    before = snapshot(b, q)
    b.found_inf = torch.ones(())
    run(b, q, grads[:1])
    assert_snapshot_equal(before, snapshot(b, q))


def test_phased_rule_refuses_what_it_does_not_support_before_any_change():
    params, grads = _problem(steps=1)
    # capturable=True: a multi-phase rule may be (Muon is), on backends that take device scalar tables; the toy
    # passes run on the reference backend only, which reads its scalars on the host: refused at construction (since
    # 2026-12-07), and at the step when set on a group with state
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
        ToyNM(params, capturable=True)
    opt = ToyNM(params)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    opt.param_groups[0]["capturable"] = True
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))
    c = torch.randn(3, 4, dtype=torch.complex64)
    opt = ToyNM([c])
    c.grad = torch.randn_like(c)
    before = c.clone()
    with pytest.raises(TypeError, match="complex params"):
        opt.step()
    assert torch.equal(c, before) and not opt.state


@pytest.mark.skipif("cpu" not in backends.available(), reason="needs the compiled cpu backend (not built)")
def test_a_forced_backend_without_the_passes_is_refused_naming_the_pass():
    params, grads = _problem(steps=1)
    opt = ToyNM(params, backend="cpu")
    for p, g in zip(params, grads[0]):
        p.grad = g
    with pytest.raises(RuntimeError, match="backend 'cpu'.*pass 'toy_nm_momentum'"):
        opt.step()
    assert not opt.state


# ------------------------------------------------------------------------------------ (a) own state shapes
def test_own_shaped_state_is_created_updated_and_equals_the_transcription():
    params, grads = _problem()
    opt = ToyQ8(params, lr=0.1, momentum=0.9)
    run(opt, params, grads)
    for p in params:
        st = opt.state[p]
        assert st["codes"].dtype == torch.int8 and st["codes"].shape == p.shape
        assert st["scales"].dtype == torch.float32 and st["scales"].shape == (_blocks(p.numel()),)
    x, _ = _problem()
    for i, t in enumerate(x):
        codes = torch.zeros(t.shape, dtype=torch.int8)
        scales = torch.zeros(_blocks(t.numel()))
        for gs in grads:
            m = _decode(codes, scales, t) * 0.9 + gs[i]
            _encode(m, codes, scales)
            t -= 0.1 * _decode(codes, scales, t)
        assert torch.equal(codes, opt.state[params[i]]["codes"]) and torch.equal(scales, opt.state[params[i]]["scales"])
        torch.testing.assert_close(params[i], t, rtol=1e-12, atol=1e-12)


def test_own_shaped_state_round_trips_through_a_checkpoint_with_its_dtypes():
    params, grads = _problem()
    a = ToyQ8(params)
    run(a, params, grads[:3])
    sd = copy.deepcopy(a.state_dict())
    q = [p.clone() for p in params]
    b = ToyQ8(q)
    b.load_state_dict(sd)  # torch.optim would cast the int8 codes to the param dtype
    for p in q:
        assert b.state[p]["codes"].dtype == torch.int8 and b.state[p]["scales"].dtype == torch.float32
    run(a, params, grads[3:])
    run(b, q, grads[3:])
    assert_snapshot_equal(snapshot(a, params), snapshot(b, q))


def test_own_shaped_state_of_the_wrong_shape_raises_naming_it_and_nothing_changes():
    params, grads = _problem()
    opt = ToyQ8(params)
    run(opt, params, grads[:2])
    opt.state[params[1]]["scales"] = torch.zeros(3)
    before = snapshot(opt, params)
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    with pytest.raises(ValueError, match=r"param 1 .*'scales' has shape \(3,\), expected \(7,\)"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))
