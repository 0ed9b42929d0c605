"""momentum_fused vs torch.optim (the oracle for SGD, Adam, AdamW, NAdam, RMSprop), over >= 10 steps, on
params and on every state tensor, in float64 (round-off only: TOL[float64]) and float32 (TOL[float32])."""
import pytest
import torch

import momentum_fused as mf
from optim_db import (CASES, all_variants, assert_states_close, clone_params, make_grads, make_params,
                      oracle_kwargs, run)
from tolerances import TOL

STEPS = 12



def _pair(case, kwargs, dtype, shapes=None, seed=0):
    kw = {} if shapes is None else dict(shapes=shapes)
    ours_p = make_params(dtype=dtype, seed=seed, **kw)
    torch_p = clone_params(ours_p)
    ours = case.cls(ours_p, **kwargs)
    ref = case.oracle(torch_p, **oracle_kwargs(kwargs))
    return ours, ours_p, ref, torch_p


@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: c.oracle is not None))
def test_parity_float64(case, kwargs, default_f64):
    ours, op, ref, tp = _pair(case, kwargs, torch.float64)
    grads = make_grads(steps=STEPS)
    run(ours, op, grads)
    run(ref, tp, grads)
    assert_states_close(ours, op, ref, tp, **TOL[torch.float64])


@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: c.oracle is not None))
def test_parity_float32(case, kwargs):
    assert torch.get_default_dtype() == torch.float32
    ours, op, ref, tp = _pair(case, kwargs, torch.float32)
    grads = make_grads(steps=STEPS, dtype=torch.float32)
    run(ours, op, grads)
    run(ref, tp, grads)
    assert_states_close(ours, op, ref, tp, **TOL[torch.float32])


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1)),
])
@pytest.mark.parametrize("cdtype", [torch.complex128, torch.complex64])
def test_parity_complex(name, kwargs, cdtype, default_f64):
    case = CASES[name]
    shapes = [(3, 2), (4,)]
    gen = torch.Generator().manual_seed(3)
    op = [torch.randn(s, dtype=cdtype, generator=gen) for s in shapes]
    tp = clone_params(op)
    grads = [[torch.randn(s, dtype=cdtype, generator=gen) for s in shapes] for _ in range(STEPS)]
    ours = case.cls(op, **kwargs)
    ref = case.oracle(tp, **kwargs)
    run(ours, op, grads)
    run(ref, tp, grads)
    real = torch.float64 if cdtype == torch.complex128 else torch.float32
    key = "exp_avg" if "Adam" in name else "square_avg" if name == "RMSprop" else "momentum_buffer"
    assert op[0].dtype == cdtype and ours.state[op[0]][key].dtype == cdtype
    assert_states_close(ours, op, ref, tp, **TOL[real])


@pytest.mark.parametrize("name,g0,g1", [
    ("SGD", dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.1)),
    ("SGD", dict(lr=0.1), dict(lr=0.2, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01), dict(lr=0.03, betas=(0.5, 0.9), amsgrad=True, weight_decay=0.2)),
    ("NAdam", dict(lr=0.01), dict(lr=0.02, momentum_decay=0.1, decoupled_weight_decay=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01), dict(lr=0.02, centered=True, momentum=0.5, alpha=0.9)),
])
def test_per_group_hyperparameters(name, g0, g1, default_f64):
    case = CASES[name]
    op = make_params()
    tp = clone_params(op)
    ours = case.cls([dict(params=op[:2], **g0), dict(params=op[2:], **g1)])
    ref = case.oracle([dict(params=tp[:2], **g0), dict(params=tp[2:], **g1)])
    grads = make_grads(steps=STEPS)
    run(ours, op, grads)
    run(ref, tp, grads)
    assert_states_close(ours, op, ref, tp, **TOL[torch.float64])
    # the two groups really differ: same-hyperparameter run of group 1's params gives other values
    alt = make_params()[2:]
    run(case.cls(alt, **g0), alt, [g[2:] for g in grads])
    assert not torch.allclose(alt[0], op[2])


@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: c.oracle is not None and c.name in ("SGD", "Adam", "NAdam", "RMSprop")))
def test_grad_none_params_are_skipped(case, kwargs, default_f64):
    op = make_params()
    tp = clone_params(op)
    ours = case.cls(op, **kwargs)
    ref = case.oracle(tp, **oracle_kwargs(kwargs))
    grads = make_grads(steps=STEPS)
    # param 1 has no grad during steps 0-3 and again at steps 7-8; param 2 never has one
    for t in range(STEPS):
        grads[t][2] = None
        if t < 4 or t in (7, 8):
            grads[t][1] = None
    p1_initial = op[1].clone()
    p2_initial = op[2].clone()
    run(ours, op, grads, steps=4)
    assert torch.equal(op[1], p1_initial) and len(ours.state.get(op[1], {})) == 0
    run(ref, tp, grads[:4])
    run(ours, op, grads[4:7])
    run(ref, tp, grads[4:7])
    state_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ours.state[op[1]].items()}
    p1_before = op[1].clone()
    run(ours, op, grads[7:9])
    run(ref, tp, grads[7:9])
    assert torch.equal(op[1], p1_before)
    for k, v in state_before.items():
        assert torch.equal(ours.state[op[1]][k], v), k
    run(ours, op, grads[9:])
    run(ref, tp, grads[9:])
    assert torch.equal(op[2], p2_initial) and len(ours.state.get(op[2], {})) == 0
    assert_states_close(ours, op, ref, tp, **TOL[torch.float64])


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    ("NAdam", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5)),
])
@pytest.mark.parametrize("sched", ["step", "lambda"])
def test_lr_scheduler(name, kwargs, sched, default_f64):
    case = CASES[name]
    op = make_params()
    tp = clone_params(op)
    ours = case.cls(op, **kwargs)
    ref = case.oracle(tp, **kwargs)

    def make_sched(opt):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e) ** 0.5)

    s_ours, s_ref = make_sched(ours), make_sched(ref)
    grads = make_grads(steps=STEPS)
    lrs = []
    for gs in grads:
        run(ours, op, [gs])
        run(ref, tp, [gs])
        s_ours.step()
        s_ref.step()
        lrs.append(ours.param_groups[0]["lr"])
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert len(set(lrs)) > 2  # the schedule did change the lr
    assert_states_close(ours, op, ref, tp, **TOL[torch.float64])
    # and a constant-lr run differs (the scheduled lr reached the update)
    const = make_params()
    run(case.cls(const, **kwargs), const, grads)
    assert not torch.allclose(const[0], op[0])


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(momentum=0.9)),
    ("Adam", dict()),
    ("AdamW", dict(weight_decay=0.1)),
    ("NAdam", dict()),
    ("RMSprop", dict(centered=True)),
])
def test_lr_as_0d_tensor(name, kwargs, default_f64):
    case = CASES[name]
    lr = 2.0 ** -6
    op, fp = make_params(), make_params()
    tp = clone_params(op)
    ours = case.cls(op, lr=torch.tensor(lr), **kwargs)
    ours_float = case.cls(fp, lr=lr, **kwargs)
    ref = case.oracle(tp, lr=torch.tensor(lr), **kwargs)
    grads = make_grads(steps=STEPS)
    run(ours, op, grads)
    run(ours_float, fp, grads)
    run(ref, tp, grads)
    assert_states_close(ours, op, ref, tp, **TOL[torch.float64])
    assert_states_close(ours, op, ours_float, fp, rtol=0, atol=0)  # a tensor lr is just its value
