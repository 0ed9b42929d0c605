"""momentum_fused.Muon (docs/algorithms.md §10): parity with torch.optim.Muon (Newton-Schulz in bf16, as torch),
an independent float64 transcription of the equations (summed momentum form, one matrix at a time), checkpoints
both ways with torch.optim.Muon, the aux AdamW groups, GradScaler's found_inf/grad_scale, and errors that change
nothing."""
from __future__ import annotations

import contextlib
import copy
import math
import re

import pytest
import torch

import momentum_fused as mf
from momentum_fused.specs_muon import NS_SCHEDULES
from momentum_fused.optim.muon import AUX_DEFAULTS
from optim_db import (assert_snapshot_equal, device_amp_backend, muon_bf16_update_runs, refuse_host_reads, run,
                      snapshot)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:momentum_fused. using backend:UserWarning")]

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES_2D = [(3, 5), (7, 2), (6, 6), (3, 5), (3, 5), (16, 8)]
SHAPES = [(3, 5), (7, 2), (4, 3, 2), (3, 5), (3, 5), (4, 3, 2), (5, 5), (1, 4)]


def _problem(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


# ------------------------------------------------------------------------------------ torch.optim.Muon
@pytest.mark.parametrize("kw", [
    dict(lr=0.02),
    dict(lr=0.05, weight_decay=0.0, nesterov=False, momentum=0.9),
    dict(lr=0.01, weight_decay=0.3, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.01, adjust_lr_fn="original", ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), eps=1e-5),
], ids=["default", "heavy_ball", "match_rms_adamw", "coefficients"])
def test_matches_torch_muon_in_bf16(kw):
    """Same NS dtype (bf16) as torch: the params agree within bf16 tolerance of the update (measured: bitwise on
    this CPU), the momentum buffers (fp32, before NS) to fp32 rounding."""
    params, grads = _problem(SHAPES_2D, steps=10)
    ours = [p.clone() for p in params]
    a = mf.Muon(ours, ns_dtype=torch.bfloat16, **kw)
    b = torch.optim.Muon(params, **kw)
    run(a, ours, grads)
    run(b, params, grads)
    lr = kw["lr"]
    for p, q in zip(ours, params):
        scale = lr * max(1.0, 0.2 * math.sqrt(max(p.shape)), math.sqrt(max(1, p.shape[0] / p.shape[1])))
        torch.testing.assert_close(p, q, rtol=0, atol=10 * scale * 2 ** -8)  # 10 steps of bf16 update error
        torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(lr=0.02),
    dict(lr=0.01, weight_decay=0.3, adjust_lr_fn="match_rms_adamw", nesterov=False),
], ids=["default", "match_rms_adamw"])
@pytest.mark.parametrize("algorithm", ["standard", "auto"])
def test_flatten_false_steps_stacked_experts_as_separate_matrices(kw, algorithm):
    """flatten=False: a [E, out, in] param (and a 4-D one) is a batch of matrices, each with its lr factor: the
    same bits as each matrix registered as its own 2-D param of the same optimizer (one NS call either way), and
    with the standard algorithm within the bf16 tolerance of torch.optim.Muon over the separate matrices (as our
    separate matrices are: a batched bf16 product may round an element the other way, docs/muon.md "Parity"). A 2-D param is itself whatever flatten says; a 3-D one with flatten=True is the one
    matrix (shape[0], rest), another result."""
    shapes = [(4, 6, 3), (2, 3, 2, 12), (5, 7)]
    params, grads = _problem(shapes, steps=10)
    ours = [p.clone() for p in params]
    split = [m.clone() for p in params for m in (p.reshape(-1, *p.shape[-2:]).unbind(0) if p.dim() > 2 else [p])]
    cut = lambda gs: [m for g in gs for m in (g.reshape(-1, *g.shape[-2:]).unbind(0) if g.dim() > 2 else [g])]
    a = run(mf.Muon(ours, flatten=False, ns_algorithm=algorithm, **kw), ours, grads)
    b = run(mf.Muon(split, ns_algorithm=algorithm, **kw), split, [cut(gs) for gs in grads])
    assert all(torch.equal(x, y) for x, y in zip(cut(ours), split))
    assert all(torch.equal(x, y) for x, y in zip(cut([a.state[p]["momentum_buffer"] for p in ours]),
                                                 [b.state[q]["momentum_buffer"] for q in split]))
    if algorithm == "standard":
        t = [m.clone() for m in cut(params)]
        run(torch.optim.Muon(t, **kw), t, [cut(gs) for gs in grads])
        for x, y in zip(cut(ours), t):
            scale = kw["lr"] * max(1.0, 0.2 * math.sqrt(max(x.shape)), math.sqrt(max(1, x.shape[0] / x.shape[1])))
            torch.testing.assert_close(x, y, rtol=0, atol=10 * scale * 2 ** -8)
    flat = [p.clone() for p in params]
    run(mf.Muon(flat, ns_algorithm=algorithm, **kw), flat, grads)
    assert torch.equal(flat[2], ours[2]) and not torch.equal(flat[0], ours[0])


def test_flatten_is_a_group_key_read_at_each_step():
    """flatten per group and written between steps (no cached view of the matrices): a group switched to False
    steps as a group built with it."""
    params, grads = _problem([(3, 4, 5)], steps=4)
    p, q = params[0].clone(), params[0].clone()
    a, b = mf.Muon([p], lr=0.02), mf.Muon([q], lr=0.02, flatten=False)
    run(a, [p], grads[:2])
    run(mf.Muon([q], lr=0.02), [q], grads[:2])
    sd = copy.deepcopy(a.state_dict())  # (a state_dict holds the live state tensors)
    sd["param_groups"][0]["flatten"] = False
    b.load_state_dict(sd)
    a.param_groups[0]["flatten"] = False
    run(a, [p], grads[2:])
    run(b, [q], grads[2:])
    assert torch.equal(p, q) and b.param_groups[0]["flatten"] is False


def test_ns_dtype_none_is_bf16_on_cpu():
    params, grads = _problem(SHAPES, steps=3)
    q = [p.clone() for p in params]
    run(mf.Muon(params), params, grads)
    run(mf.Muon(q, ns_dtype=torch.bfloat16), q, grads)
    assert all(torch.equal(x, y) for x, y in zip(params, q))


# ------------------------------------------------------------------------------------ float64 transcription
def _ns64(u, schedule, eps):
    """One matrix, float64, the equations of docs/algorithms.md §10 written out with 2-D matmuls."""
    x = u.t() if u.shape[0] > u.shape[1] else u
    x = x / max(float(torch.linalg.matrix_norm(x)), eps)
    for a, b, c in schedule:
        m = x @ x.t()
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.t() if u.shape[0] > u.shape[1] else x


def _transcription(params, grads, *, lr, wd, mu, nesterov, schedule, eps, adjust, flatten=True):
    """The summed momentum form B <- mu B + g, U = g + mu B (torch's docs); our buffer is its EMA form, (1 - mu)
    times it, whose NS direction is the same. A param is the matrix (shape[0], rest), or without ``flatten`` (3 or
    more dims) the matrices (shape[-2], shape[-1]) of its leading indices, each with its own factor. Returns the
    params and the summed buffers."""
    x = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(t) for t in x]
    for gs in grads:
        for i, (t, g) in enumerate(zip(x, gs)):
            bufs[i] = mu * bufs[i] + g.double()
            u = g.double() + mu * bufs[i] if nesterov else bufs[i]
            mats = u.reshape(math.prod(t.shape[:-2]), *t.shape[-2:]) if not flatten and t.dim() > 2 else \
                u.reshape(1, t.shape[0], math.prod(t.shape[1:]))
            rows, cols = mats.shape[1:]
            s = 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else \
                math.sqrt(max(1.0, rows / cols)) if cols else 1.0  # (an empty matrix moves nothing)
            o = torch.stack([_ns64(m, schedule, eps) for m in mats.unbind(0)])
            t.mul_(1 - lr * wd)
            t.sub_(lr * s * o.reshape(t.shape))
    return x, bufs


@pytest.mark.parametrize("case", [
    dict(kw=dict(lr=0.02), schedule=[(A, B, C)] * 5),
    dict(kw=dict(lr=0.03, weight_decay=0.05, nesterov=False, momentum=0.8, adjust_lr_fn="match_rms_adamw"),
         schedule=[(A, B, C)] * 5),
    dict(kw=dict(lr=0.02, ns_coefficients=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], ns_steps=4),
         schedule=[(3.0, -3.2, 1.2)] + [(2.0, -1.5, 0.5)] * 3),
    dict(kw=dict(lr=0.02, ns_coefficients="polar_express", ns_steps=6),
         schedule=list(NS_SCHEDULES["polar_express"][:6])),
    dict(kw=dict(lr=0.02, flatten=False), schedule=[(A, B, C)] * 5),
    dict(kw=dict(lr=0.03, weight_decay=0.05, flatten=False, adjust_lr_fn="match_rms_adamw"),
         schedule=[(A, B, C)] * 5),
], ids=["default", "heavy_ball_rms", "per_step_list", "polar_express", "experts", "experts_rms"])
def test_float64_equals_an_independent_transcription(case):
    """ns_dtype=float64 over 12 steps, odd shapes (3-D and 4-D params viewed as (shape[0], rest), or with
    flatten=False as batches of (shape[-2], shape[-1]) matrices), several matrices of a shape (one batched NS per
    shape) against a per-matrix float64 transcription."""
    kw = case["kw"]
    params, grads = _problem(SHAPES + [(2, 3, 4, 2), (3, 1, 5), (2, 0, 3)], steps=12, dtype=torch.float64)
    x0 = [p.clone() for p in params]
    opt = mf.Muon(params, ns_dtype=torch.float64, **kw)
    run(opt, params, grads)
    mu = kw.get("momentum", 0.95)
    x, bufs = _transcription(x0, grads, lr=kw["lr"], wd=kw.get("weight_decay", 0.1), mu=mu,
                             nesterov=kw.get("nesterov", True), schedule=case["schedule"], eps=1e-7,
                             adjust=kw.get("adjust_lr_fn"), flatten=kw.get("flatten", True))
    for p, t, b in zip(params, x, bufs):
        torch.testing.assert_close(p, t, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], (1 - mu) * b, rtol=1e-10, atol=1e-12)
        assert set(opt.state[p]) == {"momentum_buffer"}  # the work buffer of the update is not state


def test_float32_ns_is_close_to_float64():
    params, grads = _problem(SHAPES, steps=5)
    p64 = [p.double() for p in params]
    run(mf.Muon(params, lr=0.02, ns_dtype=torch.float32), params, grads)
    run(mf.Muon(p64, lr=0.02, ns_dtype=torch.float64), p64, [[g.double() for g in gs] for gs in grads])
    for p, q in zip(params, p64):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_from_torch_muon_and_back():
    params, grads = _problem(SHAPES_2D, steps=8)
    t_params = [p.clone() for p in params]
    t = torch.optim.Muon(t_params, lr=0.02)
    run(t, t_params, grads[:3])
    ours = [p.clone() for p in t_params]
    m = mf.Muon(ours, lr=0.5)  # lr from the checkpoint wins
    m.load_state_dict(copy.deepcopy(t.state_dict()))
    assert m.param_groups[0]["lr"] == 0.02 and m.param_groups[0]["ns_dtype"] is None
    run(m, ours, grads[3:5])
    run(t, t_params, grads[3:5])
    for p, q in zip(ours, t_params):
        assert torch.equal(p, q)
    # ours -> torch
    t2_params = [p.clone() for p in ours]
    t2 = torch.optim.Muon(t2_params, lr=0.1)
    t2.load_state_dict(copy.deepcopy(m.state_dict()))
    run(m, ours, grads[5:])
    run(t2, t2_params, grads[5:])
    for p, q in zip(ours, t2_params):
        assert torch.equal(p, q)
        assert torch.equal(m.state[p]["momentum_buffer"], t2.state[q]["momentum_buffer"])


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("lr,wd", [(0.0173, 0.3), (0.031, 0.3), (0.02, 40.0), (0.7, 100.0)])
def test_a_tensor_lr_is_torch_muons_bit_for_bit(lr, wd, adjust_lr_fn):
    """torch 2.13's Muon keeps a tensor lr a 0-d tensor: lr * factor and 1 - lr * wd are fp32 products. A review
    found ours 1 ulp away on (7, 3) and (17, 4) where the docs said equal (they computed both in float64); a
    second one found a decay below 0.5 still apart after the first fix."""
    params, grads = _problem([(7, 3), (3, 11), (5, 5), (17, 4)], steps=6)
    t_params, ours = [p.clone() for p in params], [p.clone() for p in params]
    kw = dict(weight_decay=wd, adjust_lr_fn=adjust_lr_fn)
    run(torch.optim.Muon(t_params, lr=torch.tensor(lr), **kw), t_params, grads)
    run(mf.Muon(ours, lr=torch.tensor(lr), **kw), ours, grads)
    for p, q in zip(ours, t_params):
        assert torch.equal(p, q)


def test_resume_with_aux_groups_is_bitwise():
    params, grads = _problem([(4, 6), (6,), (4, 6), (3,)], steps=6)
    groups = lambda ps: [dict(params=[ps[0], ps[2]], lr=0.02), dict(params=[ps[1], ps[3]], use_muon=False, lr=1e-2)]
    a = mf.Muon(groups(params))
    run(a, params, grads[:3])
    sd = copy.deepcopy(a.state_dict())
    q = [p.clone() for p in params]
    b = mf.Muon(groups(q))
    b.load_state_dict(sd)
    run(a, params, grads[3:])
    run(b, q, grads[3:])
    assert_snapshot_equal(snapshot(a, params), snapshot(b, q))


# ------------------------------------------------------------------------------------ aux AdamW
def test_aux_groups_equal_a_separate_adamw():
    params, grads = _problem([(4, 6), (6,), (8,), (4, 6), (2, 3, 4)], steps=6)
    m_params, a_params = [params[0], params[3], params[4]], [params[1], params[2]]
    m_copy, a_copy = [p.clone() for p in m_params], [p.clone() for p in a_params]
    opt = mf.Muon([dict(params=m_params, lr=0.02),
                   dict(params=[a_params[0]], use_muon=False),  # the reference MuonWithAuxAdam's defaults
                   dict(params=[a_params[1]], use_muon=False, lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                        weight_decay=0.1)], weight_decay=0.0)
    assert "momentum" not in opt.param_groups[1] and opt.param_groups[1]["lr"] == AUX_DEFAULTS["lr"]
    adamw = mf.AdamW([dict(params=[a_copy[0]], lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0),
                      dict(params=[a_copy[1]], lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)])
    muon = mf.Muon(m_copy, lr=0.02, weight_decay=0.0)
    idx = {0: ("m", 0), 3: ("m", 1), 4: ("m", 2), 1: ("a", 0), 2: ("a", 1)}
    for step, gs in enumerate(grads):
        for i, g in enumerate(gs):
            params[i].grad = g.clone()
            kind, j = idx[i]
            (m_copy if kind == "m" else a_copy)[j].grad = g.clone()
        if step == 3:  # a schedule changing the aux lr reaches the inner AdamW
            opt.param_groups[2]["lr"] = 5e-3
            adamw.param_groups[1]["lr"] = 5e-3
        opt.step()
        adamw.step()
        muon.step()
    for p, q in zip(a_params + m_params, a_copy + m_copy):
        assert torch.equal(p, q)
    assert set(opt.state[a_params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------------------------------------------ GradScaler
def test_found_inf_skips_and_grad_scale_unscales():
    params, grads = _problem([(4, 6), (6,)], steps=3)
    groups = lambda ps: [dict(params=[ps[0]]), dict(params=[ps[1]], use_muon=False)]
    opt = mf.Muon(groups(params), lr=0.02)
    run(opt, params, grads[:1])
    before = snapshot(opt, params)
    opt.found_inf = torch.ones(())
    run(opt, params, grads[1:2])
    assert_snapshot_equal(before, snapshot(opt, params))
    del opt.found_inf
    q = [p.clone() for p in params]
    ref = mf.Muon(groups(q), lr=0.02)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.grad_scale = torch.tensor(8.0)
    run(opt, params, [[g * 8 for g in grads[2]]])  # a power of two: the unscaled gradients are exact
    run(ref, q, grads[2:])
    assert all(torch.equal(x, y) for x, y in zip(params, q))


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, err, match", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(ns_steps=100), ValueError, "ns_steps"),
    (dict(ns_steps=2.0), TypeError, "ns_steps"),
    (dict(ns_coefficients=(1.0, 2.0)), ValueError, "ns_coefficients"),
    (dict(ns_coefficients=[]), ValueError, "ns_coefficients"),
    (dict(ns_coefficients="polar"), ValueError, "ns_coefficients"),
    (dict(adjust_lr_fn="rms"), ValueError, "adjust_lr_fn"),
    (dict(ns_dtype=torch.float16), ValueError, "ns_dtype"),
    (dict(nesterov=1), TypeError, "nesterov"),
    (dict(flatten=0), TypeError, "flatten"),
])
def test_bad_hyperparameters_raise_at_construction(kw, err, match):
    with pytest.raises(err, match=match):
        mf.Muon([torch.zeros(2, 3)], **kw)


def test_vector_params_in_a_muon_group_raise_clearly():
    with pytest.raises(ValueError, match=r"param 1 has shape \(3,\).*use_muon=False"):
        mf.Muon([torch.zeros(2, 3), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        mf.Muon([dict(params=[torch.zeros(2, 3)], use_muon=False), dict(params=[torch.zeros(())])])
    opt = mf.Muon([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="use_muon=False"):
        opt.add_param_group(dict(params=[torch.zeros(4)]))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[torch.zeros(4)], use_muon=False))  # the same param as aux: fine
    with pytest.raises(TypeError, match="use_muon"):
        opt.add_param_group(dict(params=[torch.zeros(4)], use_muon="no"))


def test_key_warnings_name_the_users_line():
    """A fixed stacklevel named torch's optimizer.py for a key given to the constructor (a review, 2026-12-08)."""
    with pytest.warns(UserWarning) as got:
        opt = mf.Muon([dict(params=[torch.zeros(2, 3)], weight_decy=0.1), dict(params=[torch.zeros(3)],
                                                                              use_muon=False, momentum=0.9)])
        opt.add_param_group(dict(params=[torch.zeros(4, 4)], betas=(0.9, 0.99)))
    msgs = [w for w in got if "no effect" in str(w.message)]
    assert len(msgs) == 3 and {w.filename for w in msgs} == {__file__}


@pytest.mark.parametrize("shape", [(24,), ()])
def test_a_param_made_a_vector_after_it_was_added_is_refused_at_the_step(shape):
    """``p.data = t`` of another dim on a param without state yet: a 1-d one was stepped as an (n, 1) column and a
    0-d one raised an IndexError inside Newton-Schulz, after the momentum pass had moved the other params'
    buffers (a review, 2026-12-08); torch.optim.Muon refuses both at its step."""
    torch.manual_seed(0)
    b, a = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4, 6))
    opt = mf.Muon([b, a], lr=0.02)
    b.grad = torch.randn(4, 6)
    opt.step()
    a.data = torch.randn(shape)
    a.grad, b.grad = torch.randn(shape), torch.randn(4, 6)
    before = (b.detach().clone(), a.detach().clone(), opt.state[b]["momentum_buffer"].clone())
    with pytest.raises(ValueError, match=rf"param 1 has shape {re.escape(str(tuple(shape)))}.*use_muon=False"):
        opt.step()
    assert torch.equal(before[0], b) and torch.equal(before[1], a) and a not in opt.state
    assert torch.equal(before[2], opt.state[b]["momentum_buffer"])


@pytest.mark.parametrize("edit", [
    ("muon", "lr", -1.0, ValueError), ("muon", "ns_coefficients", (1, 2), ValueError),
    ("aux", "betas", (0.9, 1.5), ValueError), ("aux", "grad", "sparse", RuntimeError),
    ("muon", "momentum_buffer", torch.zeros(3, 3), ValueError), ("aux", "exp_avg", torch.zeros(5), ValueError),
    ("aux", "use_muon", True, ValueError), ("muon", "flatten", "no", TypeError),
])
def test_bad_input_at_step_changes_nothing(edit):
    kind, key, value, err = edit
    params, grads = _problem([(4, 6), (6,), (4, 6)], steps=2)
    opt = mf.Muon([dict(params=[params[0], params[2]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params, grads[:1])
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    if key == "grad":
        params[1].grad = params[1].grad.to_sparse()
    elif key in ("momentum_buffer", "exp_avg"):
        opt.state[params[1] if kind == "aux" else params[2]][key] = value
    else:
        opt.param_groups[0 if kind == "muon" else 1][key] = value
    before = snapshot(opt, params)
    with pytest.raises(err):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))


@pytest.mark.parametrize("device_protocol", [False, True], ids=["host-protocol", "device-protocol"])
def test_torch_grad_scaler_skips_the_inf_step(device_protocol):
    """torch's GradScaler on the host protocol (the cpu backend) and on the device protocol (the reference kernels
    marked device_scalars, optim_db.device_amp_backend: the rollback of the aux steps shows after sync_amp)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    mats = [p for p in model.parameters() if p.ndim == 2]
    with device_amp_backend("reference") if device_protocol else contextlib.nullcontext((None, [])) as (name, calls):
        opt = mf.Muon([dict(params=mats, lr=0.02), dict(params=[p for p in model.parameters() if p.ndim < 2],
                                                        use_muon=False)], backend=name)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = torch.randn(32, 8), torch.randn(32, 4)
        for i in range(4):
            opt.zero_grad()
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if i == 2:
                mats[0].grad[0, 0] = float("inf")
                opt.sync_amp()
                before = snapshot(opt, list(model.parameters()))
            scaler.step(opt)
            scaler.update()
            if i == 2:
                opt.sync_amp()
                assert_snapshot_equal(before, snapshot(opt, list(model.parameters())))
                assert scaler.get_scale() == 512.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(calls) == (12 if device_protocol else 0) and all(f for _, f in calls)  # 4 steps x 3 backend calls


def test_each_inner_optimizer_is_validated_once_per_step(monkeypatch):
    """Muon.step validates both inner optimizers before either changes anything, and each inner step takes that
    plan instead of validating again: per step, one plan per inner optimizer, the cached one where it applies: the
    aux AdamW's from the second step, the Muon groups' from the third (both share ``state``, to which the aux
    AdamW's first step, run after the Muon groups', added entries: their cached plan of step 1 no longer holds)."""
    from momentum_fused.optim.base import FusedOptimizer
    from momentum_fused.optim.plan_cache import C_CHECKS

    calls = []
    real_plan, real_fast = FusedOptimizer._plan, FusedOptimizer._fast_plan

    def plan(self):
        calls.append((type(self).__name__, "full"))
        return real_plan(self)

    def fast(self):
        out = real_fast(self)
        if out is not None:
            calls.append((type(self).__name__, "cached"))
        return out

    params, grads = _problem([(4, 6), (6,), (5, 3), (5,)], steps=3)
    monkeypatch.setattr(FusedOptimizer, "_plan", plan)
    monkeypatch.setattr(FusedOptimizer, "_fast_plan", fast)
    opt = mf.Muon([dict(params=params[0::2]), dict(params=params[1::2], use_muon=False)], lr=0.02)
    per_step = []
    for g in grads:
        calls.clear()
        run(opt, params, [g])
        per_step.append(sorted(calls))
    kind = "cached" if C_CHECKS is not None else "full"
    assert per_step == [[("AdamW", "full"), ("_MuonCore", "full")], [("AdamW", kind), ("_MuonCore", "full")],
                        [("AdamW", kind), ("_MuonCore", kind)]]
    assert "_planned" not in opt._core.__dict__ and "_planned" not in opt._aux.__dict__


def test_deepcopy_keeps_stepping_identically():
    params, grads = _problem([(4, 6), (6,)], steps=4)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params, grads[:2])
    twin = copy.deepcopy({"opt": opt, "params": params})
    run(opt, params, grads[2:])
    run(twin["opt"], twin["params"], grads[2:])
    assert_snapshot_equal(snapshot(opt, params), snapshot(twin["opt"], twin["params"]))


def test_newton_schulz_runs_once_per_shape_on_the_matrix_view(monkeypatch):
    import momentum_fused.specs_muon as sm
    calls = []
    real = sm.newton_schulz

    def spy(x, schedule, eps, dtype, **kw):
        assert kw == {"sym": None}  # ns_algorithm "standard" (the default): torch's iteration, torch's products
        calls.append((tuple(x.shape), dtype, len(schedule)))
        return real(x, schedule, eps, dtype)

    monkeypatch.setattr(sm, "newton_schulz", spy)
    params, grads = _problem(SHAPES, steps=1)
    run(mf.Muon(params, ns_steps=3), params, grads)
    # (3, 5) x3, (7, 2), (4, 3, 2) x2 -> [2, 4, 6], (5, 5), (1, 4): one batched call per shape, ns_dtype None -> bf16
    assert sorted(calls) == sorted([((3, 3, 5), torch.bfloat16, 3), ((1, 7, 2), torch.bfloat16, 3),
                                    ((2, 4, 6), torch.bfloat16, 3), ((1, 5, 5), torch.bfloat16, 3),
                                    ((1, 1, 4), torch.bfloat16, 3)])


def test_bf16_params_track_torch_within_bf16_rounding():
    """bf16 params: the passes compute in fp32 and round once (the reference backend's convention), torch rounds
    after each op; without decay (which torch's separate bf16 multiply mostly rounds away) the params agree to
    a few bf16 ulps over 10 steps."""
    params, grads = _problem(SHAPES_2D, steps=10, dtype=torch.bfloat16)
    ours = [p.clone() for p in params]
    run(mf.Muon(ours, lr=0.02, weight_decay=0.0), ours, grads)
    run(torch.optim.Muon(params, lr=0.02, weight_decay=0.0), params, grads)
    for p, q in zip(ours, params):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.float(), rtol=2 ** -6, atol=2 ** -6)


def test_empty_matrices_step_without_error():
    params = [torch.zeros(0, 3), torch.zeros(3, 0), torch.zeros(2, 0, 4), torch.ones(2, 3)]
    opt = mf.Muon(params, lr=0.02)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(p.numel() == 0 for p in params[:3]) and not torch.equal(params[3], torch.ones(2, 3))


def test_newton_schulz_stacks_are_views_of_one_buffer_per_shape(monkeypatch):
    """The update work buffer is one [n, *shape] buffer per shape: the momentum pass writes its rows, the NS phase
    gets it as is (no torch.stack copy), and the result equals the stacked path's (max_batch_bytes=1: one matrix
    per call, through the same views)."""
    import dataclasses
    from momentum_fused.specs import SPECS
    params, grads = _problem(SHAPES, steps=3)
    q = [p.clone() for p in params]
    real_stack = torch.stack

    def no_stack(*a, **k):
        raise AssertionError("the matrix phase copied its stack")

    a = mf.Muon(params, lr=0.02)
    monkeypatch.setattr(torch, "stack", no_stack)
    run(a, params, grads)
    monkeypatch.setattr(torch, "stack", real_stack)
    spec = SPECS["muon"]
    one = tuple(dataclasses.replace(ph, max_batch_bytes=1) if hasattr(ph, "fn") else ph for ph in spec.phases)
    monkeypatch.setitem(SPECS, "muon", dataclasses.replace(spec, phases=one))
    b = mf.Muon(q, lr=0.02)
    assert b._core.spec.phases[1].max_batch_bytes == 1
    run(b, q, grads)
    for x, y in zip(params, q):  # (equal on this CPU; a BLAS may pick other kernels for a batch of one)
        torch.testing.assert_close(x, y, rtol=0, atol=3 * 0.02 * 2 ** -7)


def test_newton_schulz_stacks_on_cpu_are_cut_to_the_cache_bound_and_cuda_stacks_are_not():
    """A phase's cpu_batch_bytes bounds a CPU stack (the update's bytes, bf16 by default) on top of the memory
    bound max_batch_bytes; on CUDA only the memory bound applies. Muon's spec takes specs_muon.NS_CPU_BATCH_BYTES
    on CPUs without AMX and no CPU bound with AMX (docs/muon.md)."""
    import dataclasses
    from momentum_fused.optim.phases import _chunk_size
    from momentum_fused.specs import SPECS
    from momentum_fused.specs_muon import NS_CPU_BATCH_BYTES, NS_MAX_BATCH_BYTES, cpu_has_amx
    spec_phase = SPECS["muon"].phases[1]
    assert spec_phase.max_batch_bytes == NS_MAX_BATCH_BYTES
    assert spec_phase.cpu_batch_bytes == (None if cpu_has_amx() else NS_CPU_BATCH_BYTES)
    assert NS_CPU_BATCH_BYTES < NS_MAX_BATCH_BYTES
    ph = dataclasses.replace(spec_phase, cpu_batch_bytes=NS_CPU_BATCH_BYTES)
    big, small = 384 * 1536 * 2, 384 * 384 * 2  # bf16 updates of a GPT block's fc and attention matrices
    assert _chunk_size(ph, 12, big, "cpu") == 1 and _chunk_size(ph, 12, big, "cuda") == 12
    assert _chunk_size(ph, 12, small, "cpu") == NS_CPU_BATCH_BYTES // small == 7
    assert _chunk_size(ph, 3, small, "cpu") == 3  # never more than the bucket
    assert _chunk_size(ph, 999, 4 << 20, "cuda") == NS_MAX_BATCH_BYTES // (4 << 20) == 64
    assert _chunk_size(ph, 999, NS_MAX_BATCH_BYTES + 1, "cuda") == 1  # one matrix per call at least
    uncut = dataclasses.replace(spec_phase, cpu_batch_bytes=None)
    assert _chunk_size(uncut, 12, big, "cpu") == 12


def test_newton_schulz_on_cpu_runs_per_cache_sized_chunk_with_the_uncut_result(monkeypatch):
    """A step on CPU tensors calls the NS once per chunk of at most cpu_batch_bytes of updates, and the params
    equal those of one uncut stack per shape (cpu_batch_bytes=None), within a bf16 update step (measured: equal on
    this CPU)."""
    import dataclasses
    from momentum_fused.specs import SPECS
    from momentum_fused.specs_muon import NS_CPU_BATCH_BYTES
    shapes = [(512, 1024)] * 5 + [(96, 64)] * 3  # 1 MiB bf16 updates: two per chunk; the small ones in one
    assert 2 * 512 * 1024 * 2 <= NS_CPU_BATCH_BYTES < 3 * 512 * 1024 * 2
    params, grads = _problem(shapes, steps=2)
    q = [p.clone() for p in params]
    spec = SPECS["muon"]
    calls = []

    def with_phase(**kw):
        def counted(fn):
            return lambda g, batch: (calls.append(tuple(batch.shape)), fn(g, batch))[1]
        phases = tuple(dataclasses.replace(ph, fn=counted(ph.fn), **kw) if hasattr(ph, "fn") else ph
                       for ph in spec.phases)
        monkeypatch.setitem(SPECS, "muon", dataclasses.replace(spec, phases=phases))

    with_phase(cpu_batch_bytes=NS_CPU_BATCH_BYTES)  # (the spec's value on a CPU without AMX)
    run(mf.Muon(params, lr=0.02), params, grads)
    assert sorted(calls) == sorted([(2, 512, 1024), (2, 512, 1024), (1, 512, 1024), (3, 96, 64)] * 2)
    calls.clear()
    with_phase(cpu_batch_bytes=None)
    run(mf.Muon(q, lr=0.02), q, grads)
    assert sorted(calls) == sorted([(5, 512, 1024), (3, 96, 64)] * 2)
    for x, y in zip(params, q):
        torch.testing.assert_close(x, y, rtol=0, atol=2 * 0.02 * 2 ** -7)


def test_flatten_false_passes_a_stack_as_matrices_batched_and_chunked_with_2d_ones(monkeypatch):
    """flatten=False: the driver passes a 3-D param's matrices as it passes 2-D params (MatrixPhase.stacked): one
    NS call per chunk of max_batch_bytes of matrices, with the 2-D params of their shape in the same stack, and
    the same bits as the separate params."""
    import dataclasses
    from momentum_fused.specs import SPECS
    spec = SPECS["muon"]
    calls = []
    phases = tuple(dataclasses.replace(ph, max_batch_bytes=3 * 6 * 5 * 2, cpu_batch_bytes=None,
                                       fn=lambda g, b, fn=ph.fn: (calls.append(tuple(b.shape)), fn(g, b))[1])
                   if hasattr(ph, "fn") else ph for ph in spec.phases)  # (3 bf16 matrices of (6, 5) per call)
    monkeypatch.setitem(SPECS, "muon", dataclasses.replace(spec, phases=phases))
    params, grads = _problem([(4, 6, 5), (6, 5), (2, 2, 6, 5)], steps=2)
    split = [m.clone() for p in params for m in p.reshape(-1, 6, 5).unbind(0)]
    cut = lambda gs: [m for g in gs for m in g.reshape(-1, 6, 5).unbind(0)]
    run(mf.Muon(params, lr=0.02, flatten=False), params, grads)
    assert calls == [(3, 6, 5), (3, 6, 5), (3, 6, 5)] * 2
    calls.clear()
    run(mf.Muon(split, lr=0.02), split, [cut(gs) for gs in grads])
    assert calls == [(3, 6, 5), (3, 6, 5), (3, 6, 5)] * 2
    assert all(torch.equal(x, y) for x, y in zip(cut(params), split))


@pytest.mark.parametrize("dtype,ns_dtype,want", [
    (torch.float32, None, torch.bfloat16), (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32), (torch.float64, torch.bfloat16, torch.float64),
    (torch.bfloat16, None, torch.bfloat16), (torch.float16, torch.bfloat16, torch.float16)], ids=str)
def test_update_work_buffer_dtype(monkeypatch, dtype, ns_dtype, want):
    """The update work buffer is bf16 for fp32 params whose NS runs in bf16 (the momentum pass rounds it once, as
    NS's first op would), else the param dtype (fp64 and fp16 keep torch's two roundings); NS gets it as is."""
    from momentum_fused.optim import phases
    seen = []
    real = phases.PhasesMixin._matrix_phase

    def spy(phase, group, items, work, memo):
        seen.extend(w[phase.tensor].dtype for w in work)
        return real(phase, group, items, work, memo)

    monkeypatch.setattr(phases.PhasesMixin, "_matrix_phase", staticmethod(spy))
    params, grads = _problem([(3, 5), (6, 4)], steps=2, dtype=dtype)
    run(mf.Muon(params, ns_dtype=ns_dtype), params, grads)
    assert seen == [want] * 4


def test_capturable_group_keeps_one_set_of_work_buffers_when_ns_dtype_changes():
    """A capturable group keeps its work buffers across steps; after its ns_dtype changes (bf16 -> fp32 -> bf16)
    it keeps only the set of the current dtype, and steps as a fresh optimizer with that dtype would."""
    params, grads = _problem([(3, 5), (6, 4), (3, 5)], steps=6)
    q = [p.clone() for p in params]
    a = mf.Muon(params, lr=0.02, capturable=True)
    b = mf.Muon(q, lr=0.02)
    for k, ns in enumerate((torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, None)):
        a.param_groups[0]["ns_dtype"] = b.param_groups[0]["ns_dtype"] = ns
        run(a, params, grads[k:k + 1])
        run(b, q, grads[k:k + 1])
        memo = a._core._phase_memos[0][1]
        kept = [key for key in memo if isinstance(key, tuple) and key[0] == "rows_bufs"]
        want = torch.float32 if ns == torch.float32 else torch.bfloat16
        assert len(kept) == 1 and kept[0][-1] == (want,), kept
        assert {buf.dtype for buf in memo[kept[0]]} == {want}
    for x, y in zip(params, q):  # (the same steps as the non-capturable run's, bit for bit)
        assert torch.equal(x, y) and torch.equal(a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"])


def _backends_here():
    return [b for b in ("cpu", "reference") if b in mf.backends.available()]


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_update_buffer_equals_an_fp32_one_bitwise(backend, nesterov):
    """fp32 params, bf16 NS: the run with the bf16 update buffer (the momentum pass under the bf16_state layout, the
    buffer in the param slot) equals, bit for bit, the run with an fp32 buffer that NS rounds to bf16 (the path
    before: ``specs_muon.update_dtype`` patched), and torch.optim.Muon's on this CPU (same bf16 products)."""
    new, old = muon_bf16_update_runs(backend, nesterov=nesterov)
    assert_snapshot_equal(new, old)
    shapes = [(3, 5), (65, 520), (7, 2), (3, 5), (16, 8)]
    params, grads = _problem(shapes, steps=10)
    t = [p.clone() for p in params]
    kw = dict(lr=0.02, nesterov=nesterov, weight_decay=0.1)
    run(mf.Muon(params, backend=backend, **kw), params, grads)
    run(torch.optim.Muon(t, **kw), t, grads)
    for x, y in zip(params, t):
        assert torch.equal(x, y)


@pytest.mark.skipif("cpu" not in mf.backends.available(), reason="needs the compiled cpu backend (not built)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False])
def test_cpu_kernels_equal_the_reference_backend_bitwise(dtype, nesterov):
    """The passes on the cpu kernels (torch's fma forms of lerp and add, fp32 math for bf16 rounded once) equal
    the reference backend's torch ops bit for bit, with a tensor above the kernels' per-thread grain."""
    shapes = [(3, 5), (65, 520), (7, 2), (3, 5)]
    params, grads = _problem(shapes, steps=10, dtype=dtype)
    q = [p.clone() for p in params]
    kw = dict(lr=0.02, nesterov=nesterov, weight_decay=0.1, maximize=not nesterov)
    a = mf.Muon(params, backend="cpu", **kw)
    b = mf.Muon(q, backend="reference", **kw)
    run(a, params, grads)
    run(b, q, grads)
    assert_snapshot_equal(snapshot(a, params), snapshot(b, q))


# ------------------------------------------------------------------------------------ GradScaler, device protocol
# On backends that read device scalars (triton, cuda) a step takes GradScaler's device protocol (optim/amp.py): the
# passes of the Muon groups and the aux AdamW's kernels get found_inf and grad_scale and skip every write when
# found_inf != 0 (the Newton-Schulz phase in between runs on the step's work buffer only), host counters are rolled
# back by sync_amp, and found_inf is never read on the host. Here it runs with the cpu and reference kernels, marked
# device_scalars by optim_db.device_amp_backend; tests/triton/test_muon_triton.py runs it on the Triton kernels,
# tests/test_capturable.py in a CUDA graph (GPU).
need_cpu = pytest.mark.skipif("cpu" not in mf.backends.available(), reason="needs the compiled cpu backend (not built)")
AMP_SHAPES = [(4, 6), (5, 3), (3, 2, 2), (4, 6), (6,), ()]  # the first 4 in a Muon group, the others aux
AMP_RUNS = [pytest.param("cpu", False, marks=need_cpu, id="cpu"),
            pytest.param("cpu", True, marks=need_cpu, id="cpu-capturable"),
            pytest.param("reference", False, id="reference")]  # (capturable=True needs a compiled backend)


def _amp_opt(params, backend, capturable=False):
    return mf.Muon([dict(params=params[:4]), dict(params=params[4:], use_muon=False, lr=0.01, weight_decay=0.1)],
                   lr=0.02, ns_dtype=torch.float32, backend=backend, capturable=capturable)


def _amp_grads(grads, inf, scale):
    """The gradients of a step as a GradScaler sees them: scaled by ``scale``; an inf and a NaN in an inf step."""
    out = [g * scale for g in grads]
    if inf:
        out[0][1, 2] = float("inf")
        out[4][3] = float("nan")
    return out


def _amp_step(opt, params, grads, found_inf, grad_scale=None, device=True):
    """One step with GradScaler's attributes set as GradScaler.step sets them; ``device``: a host read of found_inf
    during the step fails the test."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.found_inf = torch.full((), float(found_inf))
    if grad_scale is not None:
        opt.grad_scale = torch.full((), float(grad_scale))
    try:
        with refuse_host_reads(opt.found_inf) if device else contextlib.nullcontext():
            opt.step()
    finally:
        del opt.found_inf
        opt.__dict__.pop("grad_scale", None)


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
@pytest.mark.parametrize("base,capturable", AMP_RUNS)
def test_device_protocol_inf_step_changes_nothing(base, capturable, first):
    """found_inf = 1: params, momentum buffers, the aux exp_avg / exp_avg_sq / step are bit for bit as before (after
    sync_amp); a skipped first step leaves no state. Every backend call (momentum pass, apply pass, aux AdamW) got
    the flag: the kernels skipped, with NaN and inf in the gradients and so in the NS input."""
    params, grads = _problem(AMP_SHAPES, steps=3)
    with device_amp_backend(base) as (name, calls):
        opt = _amp_opt(params, name, capturable)
        for k in range(0 if first else 2):
            _amp_step(opt, params, grads[k], 0.0)
        opt.sync_amp()
        before = snapshot(opt, params)
        calls.clear()
        _amp_step(opt, params, _amp_grads(grads[2], True, 2.0), 1.0, 2.0)
    assert calls == [("muon_momentum", True), ("muon_apply", True), ("adam", True)]
    opt.sync_amp()
    assert_snapshot_equal(before, snapshot(opt, params))
    if first:
        assert not any(opt.state.get(p) for p in params)
    else:
        assert float(opt.state[params[4]]["step"]) == 2.0


@pytest.mark.parametrize("base", ["reference", pytest.param("cpu", marks=need_cpu)])
def test_device_protocol_grad_scale_equals_the_host_protocol(base):
    """found_inf = 0, grad_scale = s: s = 8 equals the host protocol's step on the unscaled gradients (a power of
    two: exact) bit for bit; s = 3 equals the host protocol with grad_scale = 3 bit for bit (the same grad_mult,
    1/3 in float64) and the host protocol's step on g * 3 / 3 within float32 rounding."""
    from tolerances import tol
    params, grads = _problem(AMP_SHAPES, steps=3)
    runs = {}
    with device_amp_backend(base) as (name, _):
        for case in ("dev8", "host-unscaled8", "dev3", "host3", "host-unscaled3"):
            q = [p.clone() for p in params]
            opt = _amp_opt(q, name if case.startswith("dev") else base)
            s = 8.0 if case.endswith("8") else 3.0
            for gs in grads:
                scaled = _amp_grads(gs, False, s)
                if case.startswith("host-unscaled"):
                    run(opt, q, [[g / s for g in scaled]])
                else:
                    _amp_step(opt, q, scaled, 0.0, s, device=case.startswith("dev"))
            opt.sync_amp()
            runs[case] = snapshot(opt, q)
    assert_snapshot_equal(runs["dev8"], runs["host-unscaled8"])
    assert_snapshot_equal(runs["dev3"], runs["host3"])
    for x, y in zip(runs["dev3"]["params"], runs["host-unscaled3"]["params"]):
        torch.testing.assert_close(x, y, **tol(torch.float32))


@pytest.mark.parametrize("base,capturable", AMP_RUNS)
def test_device_protocol_sequence_equals_the_host_protocol(base, capturable):
    """inf, ok, ok, inf, ok (grad_scale 4): the device protocol's params and state equal, bit for bit, the host
    protocol's run of the same steps (the base backend itself: found_inf read once on the host); the aux step
    counts the 3 steps taken. Under capturable=True, once the state exists nothing is left for the host to roll
    back (no deferred read)."""
    params, grads = _problem(AMP_SHAPES, steps=5)
    plan = [True, False, False, True, False]
    out = []
    with device_amp_backend(base) as (name, _):
        for backend in (name, base):
            q = [p.clone() for p in params]
            opt = _amp_opt(q, backend, capturable)
            for k, inf in enumerate(plan):
                _amp_step(opt, q, _amp_grads(grads[k], inf, 4.0), float(inf), 4.0, device=backend == name)
                if backend == name and capturable and k >= 2:
                    assert "pending_amp" not in opt._core._step_attrs and "pending_amp" not in opt._aux._step_attrs
            opt.sync_amp()
            out.append((opt, q))
    (a, pa), (b, pb) = out
    assert_snapshot_equal(snapshot(a, pa), snapshot(b, pb))
    assert all(float(a.state[p]["step"]) == 3.0 for p in pa[4:])


def test_device_protocol_refuses_a_bad_flag_before_any_change():
    params, grads = _problem(AMP_SHAPES, steps=2)
    with device_amp_backend("reference") as (name, _):
        opt = _amp_opt(params, name)
        _amp_step(opt, params, grads[0], 0.0)
        opt.sync_amp()
        before = snapshot(opt, params)
        with pytest.raises(ValueError, match="found_inf and grad_scale must be one-element tensors"):
            for p, g in zip(params, grads[1]):
                p.grad = g
            opt.found_inf = torch.zeros(2)
            opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))


@pytest.mark.parametrize("ns_dtype", [None, torch.bfloat16, torch.float32, torch.float64])
def test_state_dict_groups_hold_plain_values_and_the_dtype_comes_back(ns_dtype):
    """torch.distributed.checkpoint's full and CPU-offloaded optimizer state dicts take only plain values in the
    groups: a torch.dtype ``ns_dtype`` raised there. It is saved by name; loading gives the torch.dtype back, and
    torch.optim.Muon loads the checkpoint."""
    torch.manual_seed(0)
    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = mf.Muon([{"params": ps[:1], "ns_dtype": ns_dtype}, {"params": ps[1:], "use_muon": False}], lr=0.02)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()

    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (list, tuple)) and all(plain(x) for x in v))

    for g in sd["param_groups"]:
        assert all(plain(v) for v in g.values()), g
    assert opt.param_groups[0]["ns_dtype"] is ns_dtype  # (the live group keeps the dtype)
    q = [p.detach().clone().requires_grad_() for p in ps]
    o2 = mf.Muon([{"params": q[:1]}, {"params": q[1:], "use_muon": False}], lr=0.02)
    o2.load_state_dict(copy.deepcopy(sd))
    assert o2.param_groups[0]["ns_dtype"] is ns_dtype
    t = torch.optim.Muon(q[:1], lr=0.02)
    t.load_state_dict({"state": {0: sd["state"][0]}, "param_groups": [{**sd["param_groups"][0], "params": [0]}]})
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["ns_dtype"] = "bfloat17"
    with pytest.raises(ValueError, match="not a torch dtype"):
        o2.load_state_dict(bad)


def test_complex_params_are_refused_when_a_muon_group_takes_them():
    """A complex param was accepted by the constructor and add_param_group and refused only at step()
    (2026-12-06 review); torch.optim.Muon refuses it at its step too. Now at once, naming the fix."""
    z = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        mf.Muon([z])
    w = torch.randn(4, 4, requires_grad=True)
    opt = mf.Muon([w])
    with pytest.raises(TypeError, match="use_muon=False"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [z], "use_muon": False})  # AdamW takes it


# ------------------------------------------------------------------------------------ review of 2026-12-06
def test_maximize_and_capturable_reach_the_aux_groups():
    """The optimizer's maximize (and capturable) is every group's unless a group sets its own: before
    2026-12-06 the aux groups took AUX_DEFAULTS' maximize=False, so half the model descended."""
    params, grads = _problem([(4, 6), (6,), (5,)], steps=3)
    copies = [p.clone() for p in params]
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False),
                   dict(params=[params[2]], use_muon=False, maximize=False)], lr=0.02, maximize=True)
    assert [g["maximize"] for g in opt.param_groups] == [True, True, False]
    ref = mf.AdamW([dict(params=[copies[1]], maximize=True), dict(params=[copies[2]], maximize=False)], lr=3e-4,
                   betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    for gs in grads:
        for p, q, g in zip(params, copies, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(params[1], copies[1]) and torch.equal(params[2], copies[2])
    # a checkpoint whose aux group lacks the keys (the reference MuonWithAuxAdam's) takes the live optimizer's
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["maximize"], g["capturable"]
    other = mf.Muon([dict(params=[p.clone() for p in params[:1]]), dict(params=[params[1].clone()], use_muon=False),
                     dict(params=[params[2].clone()], use_muon=False)], lr=0.02, maximize=True, capturable=True)
    other.load_state_dict(sd)
    assert [(g["maximize"], g["capturable"]) for g in other.param_groups] == [(True, True)] * 3


def test_a_torch_checkpoint_keeps_the_live_capturable():
    params, grads = _problem(SHAPES_2D[:2], steps=2)
    t = torch.optim.Muon([p.clone() for p in params], lr=0.02)
    run(t, t.param_groups[0]["params"], grads)
    m = mf.Muon(params, lr=0.02, capturable=True)
    m.load_state_dict(copy.deepcopy(t.state_dict()))
    assert m.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("kind,key", [("muon", "momentum_buffer"), ("aux", "exp_avg"), ("aux", "exp_avg_sq")])
def test_load_refuses_state_of_another_size_and_keeps_the_live_state(kind, key):
    params, grads = _problem([(4, 6), (6,)], steps=2)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params, grads)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0 if kind == "muon" else 1][key] = torch.zeros(3, 3)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"Muon.load_state_dict: param 0 of group {0 if kind == 'muon' else 1} "
                                         rf".*state '{key}' has shape \(3, 3\).*Nothing was loaded"):
        opt.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(opt, params))
    run(opt, params, grads[:1])  # (still steps)


@pytest.mark.parametrize("case", ["aux step -1", "aux step 2.5", "aux step nan", "aux lacks exp_avg_sq",
                                  "muon state of another rule"])
def test_load_refuses_a_partial_state_or_a_bad_step_before_anything_is_loaded(case):
    """A review: Muon's load took such a checkpoint (groups and state replaced, lr included) and only the next
    step raised, where AdamW's load refuses it with nothing loaded (docs/conventions.md)."""
    params, grads = _problem([(4, 6), (6,)], steps=2)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params, grads)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        g["lr"] = 0.5
    if case.startswith("aux step"):
        sd["state"][1]["step"] = torch.tensor(float(case.split()[-1]))
        match = r"param 0 of group 1 \(state_dict index 1\): state 'step' is"
    elif case == "aux lacks exp_avg_sq":
        del sd["state"][1]["exp_avg_sq"]
        match = r"param 0 of group 1 .* lacks \['exp_avg_sq'\]"
    else:
        sd["state"][0] = {"exp_avg": torch.zeros(4, 6)}
        match = r"param 0 of group 0 .* lacks \['momentum_buffer'\]"
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="Muon.load_state_dict: " + match):
        opt.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(opt, params))
    assert [g["lr"] for g in opt.param_groups] == [0.02, AUX_DEFAULTS["lr"]]
    run(opt, params, grads[:1])  # (still steps)


@pytest.mark.parametrize("kind,key", [("muon", "lr"), ("muon", "momentum"), ("aux", "lr"), ("aux", "betas")])
def test_a_hyperparameter_deleted_from_a_live_group_is_refused(kind, key):
    """A fuzzing review: a key deleted from a live group was stepped with the inner group's old value (torch
    raises KeyError)."""
    params, grads = _problem([(4, 6), (6,)], steps=2)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params, grads[:1])
    del opt.param_groups[0 if kind == "muon" else 1][key]
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=f"Muon param group {0 if kind == 'muon' else 1}: missing hyperparameter "
                                         f"'{key}'"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))


@pytest.mark.parametrize("where", ["both kinds", "one group"])
def test_a_param_appended_to_two_groups_is_refused_before_any_change(where):
    """Appending a param to a Muon group and an aux group (by editing param_groups) stepped it twice, silently,
    before 2026-12-06; torch's constructor refuses such params, and so does the step now."""
    params, grads = _problem([(4, 6), (6,), (4, 4)], steps=2)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False)], lr=0.02)
    run(opt, params[:2], grads[:1])
    extra = params[2]
    opt.param_groups[0]["params"].append(extra)
    opt.param_groups[1 if where == "both kinds" else 0]["params"].append(extra)
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="param 1 is param 1 of param group 0 too" if where == "both kinds" else
                       "param 2 is param 1 of the same group too"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))
    assert extra not in opt.state


def test_a_momentum_scheduler_writing_into_aux_groups_warns_once():
    """OneCycleLR(cycle_momentum=True) writes Muon's ``momentum`` into every group (Muon's defaults have no
    betas); the aux groups' AdamW does not read it: a UserWarning at the first step after, naming the line of the
    user's step() call."""
    params, grads = _problem([(4, 6), (6,)], steps=3)
    opt = mf.Muon([dict(params=[params[0]]), dict(params=[params[1]], use_muon=False, lr=1e-3)], lr=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.01], total_steps=10)
    with pytest.warns(UserWarning, match=r"Muon param group 1: key 'momentum' .* OneCycleLR") as rec:
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        opt.step()
    assert len([w for w in rec if "'momentum'" in str(w.message)]) == 1 and rec[0].filename == __file__
    sched.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(opt, params, grads[1:])  # (no second warning: the keys were seen)


@pytest.mark.parametrize("use_muon", [True, False])
@pytest.mark.parametrize("when", ["constructor", "add_param_group", "written later", "checkpoint"])
def test_a_group_layout_other_than_native_is_refused(use_muon, when):
    """A per-group ``layout`` (the other optimizers' key) was kept in a Muon group and had no effect before
    2026-12-06: an int8_state group kept fp32 state, a use_muon=False group of bf16 params with "master" ran
    native bf16 AdamW. Refused wherever it enters live, before any change; "native" is accepted. A checkpoint
    holding one (saved by such a Muon: native state) loads with a warning, the key dropped."""
    params, grads = _problem([(4, 6), (6, 4)], steps=2)
    lay = "int8_state"
    match = rf"Muon param group {1 if when == 'add_param_group' else 0}: layout 'int8_state'"
    if when == "constructor":
        with pytest.raises(ValueError, match=match):
            mf.Muon([dict(params=[params[0]], use_muon=use_muon, layout=lay)], lr=0.02)
        mf.Muon([dict(params=[params[0]], use_muon=use_muon, layout="native")], lr=0.02)
        return
    opt = mf.Muon([dict(params=[params[0]], use_muon=use_muon)], lr=0.02)
    run(opt, params[:1], grads[:1])
    if when == "add_param_group":
        with pytest.raises(ValueError, match=match):
            opt.add_param_group(dict(params=[params[1]], use_muon=use_muon, layout=lay))
        assert len(opt.param_groups) == 1
        return
    if when == "checkpoint":  # (a checkpoint of a Muon that kept the key with no effect: its state is native)
        sd = opt.state_dict()
        sd["param_groups"][0]["layout"] = lay
        before = snapshot(opt, params[:1])
        with pytest.warns(UserWarning, match=r"Muon load_state_dict: param group\(s\) \[0\] hold layout "
                                             r"'int8_state', which Muon never applied"):
            opt.load_state_dict(sd)
        assert "layout" not in opt.param_groups[0] and sd["param_groups"][0]["layout"] == lay
        assert_snapshot_equal(before, snapshot(opt, params[:1]))
        run(opt, params[:1], grads[1:])
        return
    opt.param_groups[0]["layout"] = lay
    params[0].grad = grads[1][0].clone()
    before = snapshot(opt, params[:1])
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params[:1]))


def test_muon_defaults_survive_loads_and_unpickling_for_a_rebuild():
    """torch's Optimizer.__setstate__ adds ``differentiable`` to ``defaults``; Muon's load and unpickling kept it
    (a refused load too, through an in-place edit its rollback did not see), so the rebuild idiom
    ``type(opt)(params, **opt.defaults)`` raised TypeError after any load."""
    import pickle
    gen = torch.Generator().manual_seed(0)
    a, c = torch.nn.Parameter(torch.randn(32, 16, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))
    groups = lambda: [dict(params=[a]), dict(params=[c], use_muon=False)]  # noqa: E731
    opt = mf.Muon(groups(), lr=0.01)
    for _ in range(2):
        a.grad, c.grad = torch.randn(a.shape, generator=gen), torch.randn(c.shape, generator=gen)
        opt.step()
    want = dict(opt.defaults)
    good = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(copy.deepcopy(good))
    assert opt.defaults == want
    bad = copy.deepcopy(good)
    bad["param_groups"][1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    assert opt.defaults == want
    assert pickle.loads(pickle.dumps(opt)).defaults == want
    mf.Muon(groups(), **opt.defaults)
