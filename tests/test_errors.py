"""Every error case of optim_db raises the declared type with a message naming the parameter, and every
error at step time is raised before any tensor changes: several params and groups, the bad one LAST,
params + every state tensor + step counters + FSGDM group step bit-identical afterwards."""
import copy

import pytest
import torch

import momentum_fused as mf
from optim_db import (CASES, OwnGradParam, all_errors, all_group_errors, all_variants, assert_snapshot_equal,
                      assert_step_raises_unchanged, make_grads,
                      make_params, run, snapshot)

SHAPES4 = [(3, 4), (5,), (2, 3), (4,)]


def _two_group_opt(case, kwargs=None):
    """2 groups x 2 params, 2 good steps taken; returns (opt, params, next grads)."""
    kwargs = case.base if kwargs is None else kwargs
    p = make_params(SHAPES4)
    opt = case.cls([dict(params=p[:2]), dict(params=p[2:])], **kwargs)
    grads = make_grads(SHAPES4, steps=3)
    run(opt, p, grads[:2])
    for x, g in zip(p, grads[2]):
        x.grad = g.clone()
    return opt, p


@pytest.mark.parametrize("case,err", all_errors())
def test_constructor_error(case, err):
    with pytest.raises(err.error, match=err.match):
        case.cls(make_params(), **{**case.base, **err.kwargs})


@pytest.mark.parametrize("case,err", [e for e in all_errors() if "backend" not in e.values[1].kwargs])
def test_param_group_error(case, err):
    """The same bad values in a param group dict (constructor and add_param_group) raise the same way,
    and add_param_group leaves the optimizer as it was."""
    p = make_params()
    bad = dict(err.kwargs)  # (AdamTied maps a group's beta -> betas in add_param_group)
    with pytest.raises(err.error, match=err.match):
        case.cls([dict(params=p[:1]), dict(params=p[1:], **bad)], **case.base)
    opt = case.cls(p[:2], **case.base)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(err.error, match=err.match):
        opt.add_param_group(dict(params=p[2:], **bad))
    assert len(opt.param_groups) == 1
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


@pytest.mark.parametrize("case,err", all_group_errors())
def test_corrupted_group_raises_before_any_change(case, err):
    opt, p = _two_group_opt(case)
    opt.param_groups[-1].update(err.edits)
    assert_step_raises_unchanged(opt, p, err.error, err.match)
    # and the message says which group
    with pytest.raises(err.error, match=r"group 1"):
        opt.step()



def _bad_grad(kind, p):
    if kind == "sparse":
        idx = torch.tensor([[0, 1]])
        return torch.sparse_coo_tensor(idx, torch.ones(2, dtype=p.dtype), p.shape[:1] + p.shape[1:])
    if kind == "shape":
        return torch.zeros(p.numel() + 1, dtype=p.dtype)
    if kind == "dtype":
        return torch.zeros(p.shape, dtype=torch.float32)
    if kind == "device":
        return torch.zeros(p.shape, dtype=p.dtype, device="meta")
    raise AssertionError(kind)


_KINDS = {"sparse": (RuntimeError, r"sparse"), "shape": (RuntimeError, r"shape"),
          "dtype": (TypeError, r"dtype"), "device": (RuntimeError, r"meta")}


@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("case,kwargs", all_variants(lambda c: c.name in ("SGD", "Adam", "NAdam", "FSGDM", "Lion", "RMSprop")))
def test_bad_grad_on_last_param_raises_before_any_change(case, kwargs, kind):
    shapes = [(3, 4), (5,), (2, 3), (4,)]
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes[:3]]
    last = torch.randn(shapes[3], generator=gen, dtype=torch.float64)
    last = torch.Tensor._make_subclass(OwnGradParam, last) if kind == "device" else last
    p.append(last)
    opt = case.cls([dict(params=p[:2]), dict(params=p[2:])], **kwargs)
    grads = make_grads(shapes, steps=3)
    run(opt, p, grads[:2])
    for x, g in zip(p, grads[2]):
        x.grad = g.clone()
    bad = _bad_grad(kind, p[-1])
    if kind in ("shape", "dtype"):
        p[-1].grad.data = bad  # torch refuses a plain assignment of a mismatched grad
    else:
        p[-1].grad = bad
    exc, match = _KINDS[kind]
    assert_step_raises_unchanged(opt, p, exc, match)
    # the message names the param and its group
    with pytest.raises(exc, match=r"param 1 of group 1"):
        opt.step()


def _stateful(param):
    case, kwargs = param.values
    default_momentum = {"SGD": 0.0, "Signum": 0.9}.get(case.name, 1.0)
    return kwargs.get("momentum", default_momentum) != 0  # SGD / Signum without momentum keep no state


_STATEFUL = [v for v in all_variants(lambda c: c.name in ("SGD", "Adam", "NAdam", "RMSprop", "QHM", "FSGDM", "Lion",
                                                          "Signum")) if _stateful(v)]


@pytest.mark.parametrize("case,kwargs", _STATEFUL)
def test_state_dict_shape_mismatch_raises_before_any_change(case, kwargs):
    p = make_params(SHAPES4)
    opt = case.cls([dict(params=p[:2]), dict(params=p[2:])], **kwargs)
    grads = make_grads(SHAPES4, steps=4)
    run(opt, p, grads[:3])
    sd = copy.deepcopy(opt.state_dict())
    tensors = [k for k, v in sd["state"][3].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        pytest.fail(f"{case.name} {kwargs}: expected elementwise state")  # every variant listed has some
    bad = copy.deepcopy(sd)
    for k in tensors:
        bad["state"][3][k] = torch.zeros(7, dtype=torch.float64)
    q = [x.clone() for x in p]
    fresh = case.cls([dict(params=q[:2]), dict(params=q[2:])], **kwargs)
    before = snapshot(fresh, q)
    with pytest.raises(ValueError, match=r"has shape \(7,\).*Nothing was loaded"):  # refused whole at load
        fresh.load_state_dict(bad)
    assert_snapshot_equal(before, snapshot(fresh, q))
    fresh.load_state_dict(sd)  # the same tensors put in the state by hand: refused by the step
    for k in tensors:
        fresh.state[q[3]][k] = torch.zeros(7, dtype=fresh.state[q[3]][k].dtype)
    for x, g in zip(q, grads[3]):
        x.grad = g.clone()
    assert_step_raises_unchanged(fresh, q, ValueError, r"shape")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_params_raise(name, dtype):
    case = CASES[name]
    with pytest.raises(TypeError, match=r"floating point|dtype"):
        case.cls([torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=dtype)], **case.base)


@pytest.mark.parametrize("kwargs", [dict(weight_decay=False), dict(lr=True), dict(momentum=False)])
def test_a_bool_for_a_number_hyperparameter_is_refused(kwargs):
    # (docs/conventions.md: torch takes it as 0 or 1; more often a keyword out of place than meant)
    with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a real number, got bool"):
        mf.SGD([torch.nn.Parameter(torch.randn(3))], **{"lr": 0.1, **kwargs})


def test_grad_scale_zero_or_inf_raises_before_any_change():
    opt, p = _two_group_opt(CASES["Adam"])
    for bad in (0.0, float("inf"), float("nan")):
        opt.grad_scale = torch.tensor(bad)
        assert_step_raises_unchanged(opt, p, ValueError, "grad_scale")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_gradient_that_grad_scale_cannot_unscale_in_place_is_refused_before_the_update(backend):
    """With grad_scale set the gradients are divided in place after the update (as torch's fused kernels leave
    them): an expanded gradient (readable, not writable in place) made the step raise after every param and
    counter had moved, some gradients unscaled and some not, naming no param. Refused first now."""
    if backend == "cpu" and mf.backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    a, b = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(5))
    opt = mf.Adam([dict(params=[a]), dict(params=[b])], lr=0.1, backend=backend)
    a.grad, b.grad = torch.full((8,), 2.0), torch.full((5,), 2.0)
    opt.step()
    a.grad, b.grad = torch.full((8,), 2.0), torch.full((1,), 2.0).expand(5)
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([0.0])
    grads = (a.grad.clone(), b.grad.clone())
    assert_step_raises_unchanged(opt, [a, b], ValueError, "group 1 .*share memory.*grad_scale cannot unscale")
    assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])
    b.grad = b.grad.contiguous()  # (the fix the message names; the scaler's attributes were dropped)
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([0.0])
    opt.step()
    assert float(a.grad[0]) == 1.0 and float(b.grad[0]) == 1.0


@pytest.mark.parametrize("attr, value", [("found_inf", torch.zeros(2)), ("grad_scale", torch.ones(2)),
                                         ("found_inf", torch.zeros(1, device="meta")),
                                         ("grad_scale", torch.ones((), device="meta"))])
def test_grad_scaler_attributes_that_are_not_one_value_are_named(attr, value):
    """A found_inf / grad_scale of two elements, or on the meta device, raised torch's conversion message (naming
    neither); nothing changed then and nothing changes now."""
    opt, p = _two_group_opt(CASES["Adam"])
    setattr(opt, attr, value)
    assert_step_raises_unchanged(opt, p, ValueError, f"{attr} must be a one-element tensor with a value")


def test_a_meta_tensor_lr_is_named():
    """torch's .item() message (no hyperparameter named) before; nothing changed then and nothing changes now."""
    opt, p = _two_group_opt(CASES["SGD"])
    lr, before = opt.param_groups[1]["lr"], snapshot(opt, p)
    opt.param_groups[1]["lr"] = torch.tensor(0.1, device="meta")
    with pytest.raises(ValueError, match="param group 1: lr as a Tensor is on the meta device"):
        opt.step()
    opt.param_groups[1]["lr"] = lr  # (the snapshot compares group values: a meta tensor has none)
    assert_snapshot_equal(before, snapshot(opt, p))


def test_error_then_recovery_steps_like_a_clean_run():
    """After a failed step is fixed, the run continues exactly as if the failure never happened."""
    case = CASES["NAdam"]
    opt, p = _two_group_opt(case)
    clean, q = _two_group_opt(case)
    opt.param_groups[1]["eps"] = float("inf")
    with pytest.raises(ValueError):
        opt.step()
    opt.param_groups[1]["eps"] = clean.param_groups[1]["eps"]
    opt.step()
    clean.step()
    assert_snapshot_equal(snapshot(clean, q), snapshot(opt, p))


def test_fsgdm_group_step_untouched_by_failed_step():
    opt, p = _two_group_opt(CASES["FSGDM"])
    assert [g["step"] for g in opt.param_groups] == [3.0, 3.0]
    opt.param_groups[1]["sigma"] = 1
    with pytest.raises(ValueError, match="sigma"):
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [3.0, 3.0]


def test_mf_namespace_has_every_case():
    assert {c.cls for c in CASES.values()} <= {getattr(mf, n) for n in mf.__all__ if isinstance(getattr(mf, n), type)}


def test_the_backend_fallback_warning_names_the_users_line(monkeypatch):
    """With the cpu extension unavailable (MOMENTUM_FUSED_JIT=0, a failed build) each optimizer warns once that it
    runs on the reference backend: the warning named checks.py (a fixed stacklevel; a review, 2026-12-08)."""
    from momentum_fused import backends

    cpu = backends._REGISTRY["cpu"]
    monkeypatch.setattr(cpu, "load_error", "simulated: the extension was not built")
    monkeypatch.setattr(cpu, "_warned", set())
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.ones(8)
    opt = mf.AdamW([p], lr=0.1)
    with pytest.warns(UserWarning, match="using backend 'reference'") as got:
        opt.step()
    assert {w.filename for w in got if "using backend" in str(w.message)} == {__file__}
