"""The case table of the test suite, in the spirit of torch's OptimizerInfo
(torch/testing/_internal/common_optimizers.py): one ``OptimCase`` per optimizer class with

- ``variants``: keyword-argument dicts covering every flag of the class;
- ``oracle``: the torch.optim class that implements the same rule (None where torch has none);
- ``errors``: constructor kwargs that must raise (exception type, message regex naming the parameter);
- ``group_errors``: (hyperparameter edits applied to an existing param group) that must make the next
  ``step()`` raise before anything changes.

Tests are parametrized from ``CASES`` / ``all_variants()`` / ``all_errors()``. The helpers at the bottom
(deterministic params and gradients, running, snapshots, state comparison) are shared by the tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import momentum_fused as mf


@dataclass(frozen=True)
class ErrorCase:
    kwargs: dict
    error: type
    match: str  # regex searched in str(exception); names the offending parameter
    desc: str = ""


@dataclass(frozen=True)
class GroupError:
    """Edit ``group[key] = value`` (after some good steps) -> the next step raises ``error``."""

    edits: dict
    error: type
    match: str
    desc: str = ""


@dataclass
class OptimCase:
    name: str
    cls: type
    variants: list[dict]
    oracle: type | None = None
    sign_rule: bool = False  # sign-based: compare in float64 only (docs/algorithms.md §5)
    errors: list[ErrorCase] = field(default_factory=list)
    group_errors: list[GroupError] = field(default_factory=list)
    # kwargs a good "base" run uses when a test just needs a working optimizer
    base: dict = field(default_factory=dict)

    def make(self, params, **kw):
        return self.cls(params, **{**self.base, **kw})


_COMMON_LR_ERRORS = [
    ErrorCase(dict(lr=-1.0), ValueError, r"lr", "negative lr"),
    ErrorCase(dict(lr=float("nan")), ValueError, r"lr", "nan lr"),
    ErrorCase(dict(lr=float("inf")), ValueError, r"lr", "inf lr"),
    ErrorCase(dict(lr="0.1"), TypeError, r"lr", "str lr"),
    ErrorCase(dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"lr", "2-element tensor lr"),
    ErrorCase(dict(maximize=1), TypeError, r"maximize", "non-bool maximize"),
    ErrorCase(dict(backend="no_such_backend"), ValueError, r"backend", "unknown backend"),
]

_COMMON_GROUP_ERRORS = [
    GroupError(dict(lr=-0.5), ValueError, r"lr", "negative lr"),
    GroupError(dict(lr=float("nan")), ValueError, r"lr", "nan lr"),
    GroupError(dict(maximize="no"), TypeError, r"maximize", "non-bool maximize"),
]

SGD_VARIANTS = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, maximize=True),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.5),
    dict(lr=0.1, momentum=0.9, weight_decay=0.05),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05, maximize=True),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05),
    dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True),
]

ADAM_VARIANTS = [
    dict(lr=0.01),
    dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, amsgrad=True),
    dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True),
    dict(lr=0.01, maximize=True),
    dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
]

CASES: dict[str, OptimCase] = {}


def _add(case: OptimCase) -> None:
    CASES[case.name] = case


_add(OptimCase(
    "SGD", mf.SGD, SGD_VARIANTS, oracle=torch.optim.SGD, base=dict(lr=0.1, momentum=0.9),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(momentum=-0.1), ValueError, r"momentum", "negative momentum"),
        ErrorCase(dict(momentum=1.0), ValueError, r"momentum", "momentum = 1"),
        ErrorCase(dict(dampening=1.5), ValueError, r"dampening", "dampening > 1"),
        ErrorCase(dict(weight_decay=-1e-3), ValueError, r"weight_decay", "negative weight decay"),
        ErrorCase(dict(momentum=0.9, nesterov=True, dampening=0.1), ValueError, r"nesterov", "nesterov+dampening"),
        ErrorCase(dict(momentum=0.0, nesterov=True), ValueError, r"nesterov", "nesterov without momentum"),
        ErrorCase(dict(nesterov="yes"), TypeError, r"nesterov", "non-bool nesterov"),
    ],
    group_errors=_COMMON_GROUP_ERRORS + [
        GroupError(dict(nesterov=True, dampening=0.5), ValueError, r"nesterov", "nesterov with dampening"),
        GroupError(dict(weight_decay=-0.1), ValueError, r"weight_decay", "negative weight decay"),
        GroupError(dict(momentum=1.0), ValueError, r"momentum", "momentum 1"),
    ],
))

_ADAM_ERRORS = _COMMON_LR_ERRORS + [
    ErrorCase(dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]", "beta1 = 1"),
    ErrorCase(dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]", "beta2 < 0"),
    ErrorCase(dict(betas=0.9), TypeError, r"betas", "betas not a pair"),
    ErrorCase(dict(eps=-1e-8), ValueError, r"eps", "negative eps"),
    ErrorCase(dict(eps=float("inf")), ValueError, r"eps", "inf eps"),
    ErrorCase(dict(weight_decay=-0.1), ValueError, r"weight_decay", "negative weight decay"),
    ErrorCase(dict(amsgrad=None), TypeError, r"amsgrad", "non-bool amsgrad"),
]
_ADAM_GROUP_ERRORS = _COMMON_GROUP_ERRORS + [
    GroupError(dict(eps=float("inf")), ValueError, r"eps", "inf eps"),
    GroupError(dict(betas=(1.0, 0.999)), ValueError, r"betas", "beta1 = 1"),
    GroupError(dict(betas=(0.9, 1.5)), ValueError, r"betas", "beta2 > 1"),
]

_add(OptimCase(
    "Adam", mf.Adam, ADAM_VARIANTS, oracle=torch.optim.Adam, base=dict(lr=0.01),
    errors=_ADAM_ERRORS + [
        ErrorCase(dict(decoupled_weight_decay=0), TypeError, r"decoupled_weight_decay", "non-bool flag"),
    ],
    group_errors=_ADAM_GROUP_ERRORS,
))

_add(OptimCase(
    "AdamW", mf.AdamW,
    [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1, amsgrad=True),
     dict(lr=0.01, weight_decay=0.1, maximize=True, betas=(0.8, 0.95))],
    oracle=torch.optim.AdamW, base=dict(lr=0.01),
    errors=_ADAM_ERRORS, group_errors=_ADAM_GROUP_ERRORS,
))

_add(OptimCase(
    "AdamTied", mf.AdamTied,
    [dict(lr=0.01), dict(lr=0.01, beta=0.9, weight_decay=0.1),
     dict(lr=0.01, beta=0.99, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    oracle=None, base=dict(lr=0.01),
    errors=[e for e in _COMMON_LR_ERRORS] + [
        ErrorCase(dict(beta=1.0), ValueError, r"betas", "beta = 1"),
        ErrorCase(dict(beta=-0.5), ValueError, r"betas", "beta < 0"),
        ErrorCase(dict(eps=-1.0), ValueError, r"eps", "negative eps"),
    ],
    group_errors=_ADAM_GROUP_ERRORS,
))

_add(OptimCase(
    "NAdam", mf.NAdam,
    [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     dict(lr=0.01, momentum_decay=0.1, betas=(0.8, 0.9)), dict(lr=0.01, maximize=True, momentum_decay=0.0)],
    oracle=torch.optim.NAdam, base=dict(lr=0.01),
    errors=_ADAM_ERRORS[:-1] + [
        ErrorCase(dict(momentum_decay=-1e-3), ValueError, r"momentum_decay", "negative momentum_decay"),
        ErrorCase(dict(decoupled_weight_decay="x"), TypeError, r"decoupled_weight_decay", "non-bool flag"),
    ],
    group_errors=_ADAM_GROUP_ERRORS + [
        GroupError(dict(momentum_decay=float("nan")), ValueError, r"momentum_decay", "nan momentum_decay"),
    ],
))

_add(OptimCase(
    "RMSprop", mf.RMSprop,
    [dict(lr=0.01), dict(lr=0.01, centered=True), dict(lr=0.01, momentum=0.9),
     dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
     dict(lr=0.01, alpha=0.9, eps=1e-4, maximize=True, centered=True)],
    oracle=torch.optim.RMSprop, base=dict(lr=0.01),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(alpha=1.0), ValueError, r"alpha", "alpha = 1"),
        ErrorCase(dict(alpha=-0.1), ValueError, r"alpha", "alpha < 0"),
        ErrorCase(dict(momentum=-0.1), ValueError, r"momentum", "negative momentum"),
        ErrorCase(dict(eps=-1.0), ValueError, r"eps", "negative eps"),
        ErrorCase(dict(centered=1), TypeError, r"centered", "non-bool centered"),
    ],
    group_errors=_COMMON_GROUP_ERRORS + [
        GroupError(dict(eps=float("inf")), ValueError, r"eps", "inf eps"),
        GroupError(dict(alpha=1.0), ValueError, r"alpha", "alpha = 1"),
    ],
))

_add(OptimCase(
    "QHM", mf.QHM,
    [dict(lr=0.1, momentum=0.9, nu=0.7), dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1),
     dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1, weight_decay_type="direct"),
     dict(lr=0.1, momentum=0.5, nu=1.0, maximize=True), dict(lr=0.1, momentum=0.9, nu=0.0),
     dict(lr=0.05, momentum=0.9, nu=1.5, weight_decay=0.1, weight_decay_type="direct", maximize=True)],
    oracle=None, base=dict(lr=0.1, momentum=0.9, nu=0.7),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(momentum=1.0), ValueError, r"momentum", "momentum = 1"),
        ErrorCase(dict(nu=float("inf")), ValueError, r"nu", "inf nu"),
        ErrorCase(dict(weight_decay_type="l2"), ValueError, r"weight_decay_type", "bad weight_decay_type"),
        ErrorCase(dict(weight_decay=-0.5), ValueError, r"weight_decay", "negative weight decay"),
    ],
    group_errors=_COMMON_GROUP_ERRORS + [
        GroupError(dict(weight_decay_type="decoupled"), ValueError, r"weight_decay_type", "bad weight_decay_type"),
        GroupError(dict(nu=float("nan")), ValueError, r"nu", "nan nu"),
    ],
))

_SIGN_GROUP_ERRORS = _COMMON_GROUP_ERRORS + [
    GroupError(dict(weight_decay=float("inf")), ValueError, r"weight_decay", "inf weight decay"),
]

_add(OptimCase(
    "SignSGD", mf.SignSGD,
    [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, maximize=True, weight_decay=0.1)],
    sign_rule=True, base=dict(lr=0.01),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(weight_decay=-0.1), ValueError, r"weight_decay", "negative weight decay"),
    ],
    group_errors=_SIGN_GROUP_ERRORS,
))

_add(OptimCase(
    "Signum", mf.Signum,
    [dict(lr=0.01), dict(lr=0.01, momentum=0.5, weight_decay=0.1), dict(lr=0.01, momentum=0.0),
     dict(lr=0.01, maximize=True, weight_decay=0.1)],
    sign_rule=True, base=dict(lr=0.01),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(momentum=1.0), ValueError, r"momentum", "momentum = 1"),
        ErrorCase(dict(weight_decay=-0.1), ValueError, r"weight_decay", "negative weight decay"),
    ],
    group_errors=_SIGN_GROUP_ERRORS + [GroupError(dict(momentum=-0.5), ValueError, r"momentum", "negative momentum")],
))

_add(OptimCase(
    "Lion", mf.Lion,
    [dict(lr=0.01), dict(lr=0.01, betas=(0.5, 0.8), weight_decay=0.1),
     dict(lr=0.01, maximize=True, weight_decay=0.1), dict(lr=0.01, betas=(0.0, 0.0))],
    sign_rule=True, base=dict(lr=0.01),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]", "beta2 = 1"),
        ErrorCase(dict(betas=(0.9,)), TypeError, r"betas", "one beta"),
        ErrorCase(dict(weight_decay=-0.1), ValueError, r"weight_decay", "negative weight decay"),
    ],
    group_errors=_SIGN_GROUP_ERRORS + [GroupError(dict(betas=(-0.1, 0.9)), ValueError, r"betas", "beta1 < 0")],
))

_add(OptimCase(
    "FSGDM", mf.FSGDM,
    # sigma / n_stages small so that u moves off 0 within a few steps (spe = sigma // n_stages)
    [dict(lr=0.1, sigma=6, n_stages=3, c_scaling=0.5), dict(lr=0.1, sigma=12, n_stages=4, c_scaling=0.1,
                                                             weight_decay=0.0),
     dict(lr=0.1, sigma=10, n_stages=5, c_scaling=0.2, v_coefficient=0.5, weight_decay=0.1, maximize=True),
     dict(lr=0.1)],
    base=dict(lr=0.1, sigma=6, n_stages=3, c_scaling=0.5),
    errors=_COMMON_LR_ERRORS + [
        ErrorCase(dict(sigma=2, n_stages=3), ValueError, r"sigma", "sigma < n_stages"),
        ErrorCase(dict(n_stages=0), ValueError, r"n_stages", "n_stages = 0"),
        ErrorCase(dict(n_stages=2.5), TypeError, r"n_stages", "float n_stages"),
        ErrorCase(dict(sigma=True), TypeError, r"sigma", "bool sigma"),
        ErrorCase(dict(c_scaling=0.0), ValueError, r"c_scaling", "c_scaling = 0"),
        ErrorCase(dict(v_coefficient=-1.0), ValueError, r"v_coefficient", "negative v"),
        ErrorCase(dict(weight_decay=-5e-4), ValueError, r"weight_decay", "negative weight decay"),
    ],
    group_errors=_COMMON_GROUP_ERRORS + [
        GroupError(dict(sigma=2, n_stages=3), ValueError, r"sigma", "sigma < n_stages"),
        GroupError(dict(c_scaling=-1.0), ValueError, r"c_scaling", "negative c_scaling"),
    ],
))


def all_variants(filter_fn: Callable[[OptimCase], bool] = lambda c: True):
    """(case, kwargs) pairs with readable ids, for pytest.mark.parametrize."""
    import pytest

    out = []
    for case in CASES.values():
        if not filter_fn(case):
            continue
        for i, kw in enumerate(case.variants):
            out.append(pytest.param(case, kw, id=f"{case.name}-{i}"))
    return out


def all_errors():
    import pytest

    return [pytest.param(case, err, id=f"{case.name}-{err.desc or i}")
            for case in CASES.values() for i, err in enumerate(case.errors)]


def all_group_errors():
    import pytest

    return [pytest.param(case, err, id=f"{case.name}-{err.desc or i}")
            for case in CASES.values() for i, err in enumerate(case.group_errors)]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------
SHAPES = [(3, 4), (5,), (2, 3, 2)]


class OwnGradParam(torch.Tensor):
    """A param whose ``.grad`` is a Python property (what the optimizers read), not autograd's field: it can
    be anything (torch refuses to assign a grad on another device), and C code reading the autograd
    gradient does not see it."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def grad(self):
        return self.__dict__.get("_g")

    @grad.setter
    def grad(self, value):
        self.__dict__["_g"] = value


def make_params(shapes=SHAPES, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def make_grads(shapes=SHAPES, steps=10, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def clone_params(params, dtype=None):
    return [p.detach().clone() if dtype is None else p.detach().to(dtype).clone() for p in params]


def run(opt, params, grads, steps=None):
    """Set ``p.grad`` from ``grads[t]`` and step, for each t."""
    for t, gs in enumerate(grads if steps is None else grads[:steps]):
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.to(p.dtype).clone()
        opt.step()
    return opt


def snapshot(opt, params):
    """Deep copy of every param, every state entry and every group host counter."""
    state = []
    for p in params:
        st = opt.state.get(p, {})
        state.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()})
    groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return dict(params=[p.detach().clone() for p in params], state=state, groups=groups)


def _bit_equal(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                                b.detach().contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_snapshot_equal(before, after):
    """Bit-identical params, state and group counters."""
    assert len(before["params"]) == len(after["params"])
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert _bit_equal(a, b), f"param {i} changed"
    for i, (sa, sb) in enumerate(zip(before["state"], after["state"])):
        assert set(sa) == set(sb), f"state keys of param {i} changed: {set(sa)} vs {set(sb)}"
        for k in sa:
            assert _bit_equal(sa[k], sb[k]), f"state {k!r} of param {i} changed"
    for i, (ga, gb) in enumerate(zip(before["groups"], after["groups"])):
        assert set(ga) == set(gb)
        for k in ga:
            assert _bit_equal(ga[k], gb[k]), f"group {i} entry {k!r} changed: {ga[k]!r} -> {gb[k]!r}"


def as_float(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def assert_states_close(opt_a, params_a, opt_b, params_b, rtol, atol, *, check_dtype=True, host_exact=True):
    """Params and every state entry of two optimizers agree (``a`` is the run, ``b`` the oracle).
    The key sets must be equal (an empty dict and a missing entry are the same). Host scalars
    (``step``, ``mu_product``) are compared as numbers: step exactly, mu_product within rtol."""
    from torch.testing import assert_close

    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close(pa, pb.to(pa.dtype) if not check_dtype else pb, rtol=rtol, atol=atol,
                     msg=lambda m, i=i: f"param {i}: {m}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), f"param {i}: state keys differ: {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            if k == "step":
                assert as_float(va) == as_float(vb), f"param {i}: step {va} vs {vb}"
            elif k == "mu_product":
                assert math.isclose(as_float(va), as_float(vb), rel_tol=max(rtol, 1e-15), abs_tol=0.0), \
                    f"param {i}: mu_product {va} vs {vb}"
            else:
                assert_close(va, vb.to(va.dtype) if not check_dtype else vb, rtol=rtol, atol=atol,
                             msg=lambda m, i=i, k=k: f"param {i} state {k!r}: {m}")


def oracle_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "backend"}


def grad_fn_quadratic(h):
    """Gradient of 0.5 * sum(h * x^2)."""
    return lambda x: h * x


def assert_step_raises_unchanged(opt, params, exc, match):
    """``opt.step()`` raises ``exc`` matching ``match``, and params, state and group counters are
    bit-identical to before: the project's rule that bad input is rejected before anything changes."""
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))


def opcheck_one_step(op, opt) -> None:
    """Runs ``opt.step()`` (its state already created) under a TorchDispatchMode that records the calls of the
    registered op ``op`` (an OpOverload, e.g. torch.ops.momentum_fused.cpu_step.default): the step must call it
    exactly once, and ``torch.library.opcheck`` must pass on the arguments the real step gave it (schema with
    mutation annotations, fake kernel, autograd registration, AOT dispatch)."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op:
                calls.append(copy.deepcopy((args, kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Capture():
        opt.step()
    assert len(calls) == 1, f"the step did not go through {op} once ({len(calls)} calls)"
    args, kwargs = calls[0]
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------ GradScaler's device protocol on this machine
HOST_READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")
_IN_KERNEL: list = []  # nonempty while a device_amp_backend's kernels run


@contextlib.contextmanager
def device_amp_backend(base: str):
    """The backend ``base`` (cpu or reference) registered again, as ``"<base>-device-amp"``, as one that reads
    GradScaler's found_inf / grad_scale in its kernels (``device_scalars=True``, as triton and cuda): optimizers
    forced onto it take the device protocol of optim/amp.py on this machine, with ``base``'s own kernels. Yields
    (name, calls): one (rule, found_inf passed?) per backend call. Its kernels may read the flags while
    ``refuse_host_reads`` is armed: they stand for the device's."""
    from momentum_fused import backends
    real = backends._REGISTRY[base]
    calls = []

    def apply(spec, flags, params, grads, states, scalars, **kw):
        calls.append((spec.name, kw.get("found_inf") is not None))
        _IN_KERNEL.append(True)
        try:
            return real.apply(spec, flags, params, grads, states, scalars, **kw)
        finally:
            _IN_KERNEL.pop()

    name = f"{base}-device-amp"
    backends.register(dataclasses.replace(real, name=name, apply=apply, device_scalars=True, _warned=set()))
    try:
        yield name, calls
    finally:
        backends._REGISTRY.pop(name, None)


@contextlib.contextmanager
def refuse_host_reads(of: torch.Tensor | None = None):
    """A host read of a tensor's value (``HOST_READS``) fails the test, outside the kernels of a
    ``device_amp_backend``: of the tensor ``of`` only, or (None) of any tensor."""
    saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def guard(name):
        real = saved[name]

        def read(self, *a, **k):
            if not _IN_KERNEL and (of is None or self is of):
                raise AssertionError(f"a host read (Tensor.{name}) of {'found_inf' if of is not None else 'a tensor'}"
                                     " during the step")
            return real(self, *a, **k)
        return read

    for n in HOST_READS:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def muon_bf16_update_runs(backend: str, device: str = "cpu", steps: int = 10, nesterov: bool = True):
    """Muon on fp32 params with bf16 Newton-Schulz, twice on ``backend``: with the bf16 update work buffer (the
    momentum pass under the bf16_state layout rounds the update once) and with an fp32 one that NS rounds to bf16
    as its first op (``specs_muon.update_dtype`` patched: the path before). Returns both snapshots, which must be
    equal bit for bit wherever the kernel's fp32 -> bf16 store is torch's round to nearest even; the NS phase is
    the same torch ops on the same device in both."""
    from momentum_fused import specs_muon
    from momentum_fused.optim import phases
    shapes = [(3, 5), (65, 520), (7, 2), (3, 5), (16, 8), (4, 3, 2)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    kw = dict(lr=0.02, nesterov=nesterov, weight_decay=0.1, ns_dtype=torch.bfloat16, backend=backend)
    out, seen = [], []
    real_update, real_phase = specs_muon.update_dtype, phases.PhasesMixin._matrix_phase

    def spy(phase, group, items, work, memo):
        seen.append({w[phase.tensor].dtype for w in work})
        return real_phase(phase, group, items, work, memo)

    for patched in (False, True):
        params = [x.to(device, copy=True).requires_grad_() for x in init]
        if patched:
            specs_muon.update_dtype = lambda group, dtype, dev: dtype
        phases.PhasesMixin._matrix_phase = staticmethod(spy)
        try:
            opt = run(mf.Muon(params, **kw), params, [[g.to(device) for g in gs] for gs in grads])
        finally:
            specs_muon.update_dtype, phases.PhasesMixin._matrix_phase = real_update, staticmethod(real_phase)
        out.append(snapshot(opt, params))
    assert seen[:steps] == [{torch.bfloat16}] * steps and seen[steps:] == [{torch.float32}] * steps, seen
    return out


def channels_last_twin_runs(backend: str, layout: str, dtype, device: str = "cpu", steps: int = 4):
    """AdamW on conv-shaped params and a bias, once contiguous and once channels_last (gradients in each one's
    format, the same values), on ``backend``; returns ((params, opt, full plans taken) contiguous, (...) channels_last).
    The compiled backends step a dense param in memory order where the layout is elementwise
    (backends.contiguous_lists); the two trajectories must be equal bit for bit."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16, 3, 3), (8, 3, 1, 1), (16,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]
    runs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        def put(t, fmt=fmt):
            return (t.clone(memory_format=fmt) if t.dim() == 4 else t.clone()).to(device)
        ps = [torch.nn.Parameter(put(t)) for t in init]
        opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend, layout=layout)
        full = []
        real = opt._plan
        opt._plan = lambda real=real, full=full: full.append(1) or real()
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = put(g)
            opt.step()
        runs.append((ps, opt, len(full)))
    return runs[0], runs[1]


def assert_twin_runs_equal(a, b) -> None:
    """The params and every state tensor of two runs (``channels_last_twin_runs``'s) equal bit for bit."""
    (pa, oa, _), (pb, ob, _) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == ob.state[y].keys()
        for k in oa.state[x]:
            assert torch.equal(oa.state[x][k], ob.state[y][k]), k


def train_reading_lr(model, opt):
    """A train step that reads ``optimizer.param_groups`` (an lr logged), where torch.compile's dynamo writes
    ``capturable=True`` (tests/test_ecosystem.py, tests/test_capturable.py)."""
    def train(x):
        lr = opt.param_groups[0]["lr"]
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        return lr

    return train
