"""Optimizer API: state_dict round trips (ours <-> ours, torch <-> ours), torch.save/load(weights_only),
deepcopy, hooks, closures, backend selection, the GradScaler protocol."""
import copy
import io

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from optim_db import (CASES, all_variants, assert_snapshot_equal, assert_states_close, assert_step_raises_unchanged,
                      clone_params, make_grads,
                      make_params, run, snapshot)
from tolerances import TOL

STEPS = 10



def _flat_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ------------------------------------------------------------------ state_dict round trips
@pytest.mark.parametrize("case,kwargs", all_variants())
def test_state_dict_round_trip(case, kwargs):
    grads = make_grads(steps=STEPS)
    a = make_params()
    full = case.cls(a, **kwargs)
    run(full, a, grads)

    b = make_params()
    first = case.cls(b, **kwargs)
    run(first, b, grads[:3])
    sd = copy.deepcopy(first.state_dict())
    c = clone_params(b)
    second = case.cls(c, **kwargs)
    second.load_state_dict(sd)
    for p in c:
        st = second.state[p]
        if "step" in st:
            assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"
        if "mu_product" in st:
            assert st["mu_product"].dtype == torch.float64 and st["mu_product"].device.type == "cpu"
    if case.name == "FSGDM":
        assert second.param_groups[0]["step"] == 4.0
    run(second, c, grads[3:])
    assert_states_close(second, c, full, a, rtol=0, atol=0)
    if case.name == "FSGDM":
        assert second.param_groups[0]["step"] == full.param_groups[0]["step"] == STEPS + 1.0



@pytest.mark.parametrize("saved_dtype", [torch.float64, torch.int64])
def test_a_step_count_past_2_24_keeps_counting_as_torch_does(saved_dtype, default_f64):
    """torch keeps its step counters in float64 under a default dtype float64 (and a loaded int64 or float64 one as
    it is): they count exactly past 2**24, where a float32 count stops. Ours rounded such a count to float32 at
    the load and then stood still, and new counters were float32 there (a review, 2026-12-08)."""
    torch.manual_seed(0)
    init, grads = torch.randn(6), [torch.randn(6) for _ in range(5)]
    ref_p, p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ref, ours = torch.optim.Adam([ref_p], lr=1e-3, betas=(0.9, 0.9999999)), mf.Adam([p], lr=1e-3, betas=(0.9, 0.9999999))
    for opt, q in ((ref, ref_p), (ours, p)):
        q.grad = grads[0].clone()
        opt.step()
        assert opt.state[q]["step"].dtype == torch.float64
    ref.state[ref_p]["step"] = torch.tensor(2 ** 24 + 1).to(saved_dtype)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for g in grads[1:]:
        for opt, q in ((ref, ref_p), (ours, p)):
            q.grad = g.clone()
            opt.step()
    assert float(ours.state[p]["step"]) == float(ref.state[ref_p]["step"]) == 2 ** 24 + 5
    torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=1e-12, atol=1e-15)

def test_state_dict_round_trip_float32_nadam_keeps_host_dtypes():
    """A float32 model: step stays float32, mu_product float64 (not cast to the param dtype)."""
    grads = make_grads(steps=STEPS, dtype=torch.float32)
    a = make_params(dtype=torch.float32)
    full = run(mf.NAdam(a, lr=0.01), a, grads)
    b = make_params(dtype=torch.float32)
    first = run(mf.NAdam(b, lr=0.01), b, grads[:3])
    c = clone_params(b)
    second = mf.NAdam(c, lr=0.01)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.state[c[0]]["mu_product"].dtype == torch.float64
    run(second, c, grads[3:])
    assert_states_close(second, c, full, a, rtol=0, atol=0)


_TORCH_INTEROP = [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, momentum_decay=0.05)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
]


@pytest.mark.parametrize("name,kwargs", _TORCH_INTEROP)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_torch_state_dict_interop(name, kwargs, direction, default_f64):
    case = CASES[name]
    grads = make_grads(steps=STEPS)
    ref_p = make_params()
    ref = run(case.oracle(ref_p, **kwargs), ref_p, grads)  # the uninterrupted torch run

    src_cls, dst_cls = (case.oracle, case.cls) if direction == "torch_to_ours" else (case.cls, case.oracle)
    p = make_params()
    src = run(src_cls(p, **kwargs), p, grads[:3])
    q = clone_params(p)
    dst = dst_cls(q, **kwargs)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    run(dst, q, grads[3:])
    assert_states_close(dst, q, ref, ref_p, **TOL[torch.float64], check_dtype=False)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "FSGDM", "QHM", "Lion"])
def test_torch_save_load_weights_only(name):
    case = CASES[name]
    kwargs = case.variants[-1]
    grads = make_grads(steps=STEPS)
    a = make_params()
    full = run(case.cls(a, **kwargs), a, grads)
    b = make_params()
    first = run(case.cls(b, **kwargs), b, grads[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    c = clone_params(b)
    second = case.cls(c, **kwargs)
    second.load_state_dict(sd)
    run(second, c, grads[3:])
    assert_states_close(second, c, full, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "FSGDM", "AdamTied"])
def test_deepcopy(name):
    case = CASES[name]
    kwargs = dict(case.variants[-1], backend="reference")
    grads = make_grads(steps=STEPS)
    p = make_params()
    opt = run(case.cls(p, **kwargs), p, grads[:3])
    dup = copy.deepcopy(opt)
    assert dup.backend == "reference"
    q = _flat_params(dup)
    assert all(x is not y and torch.equal(x, y) for x, y in zip(p, q))
    assert_states_close(dup, q, opt, p, rtol=0, atol=0)
    run(opt, p, grads[3:])
    run(dup, q, grads[3:])
    assert_states_close(dup, q, opt, p, rtol=0, atol=0)
    assert dup.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_hooks_fire():
    p = make_params()
    opt = mf.Adam(p, lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", float(o.state[p[0]]["step"]) if o.state.get(p[0]) else 0.0)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", float(o.state[p[0]]["step"]))))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre",)))

    def sd_post(o, sd):
        calls.append(("sd_post",))
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre",)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post",)))
    run(opt, p, make_grads(steps=2))
    assert calls == [("pre", 0.0), ("post", 1.0), ("pre", 1.0), ("post", 2.0)]
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls[-2:] == [("sd_pre",), ("sd_post",)]
    del sd["extra"]
    opt.load_state_dict(sd)
    assert calls[-2:] == [("load_pre",), ("load_post",)]


def _migrate_muon(o, sd):
    """A load pre-hook migrating an old format: the momentum buffers under another key."""
    sd["state"] = {i: {"momentum_buffer": st.pop("old_buf")} for i, st in sd["state"].items()}


def _tie_betas(o, sd):
    return {**sd, "param_groups": [{**g, "betas": (0.95, 0.95)} for g in sd["param_groups"]]}


@pytest.mark.parametrize("kind", ["Muon: renamed state", "Muon: hook returns its own checkpoint",
                                  "AdamTied: untied betas"])
def test_load_pre_hooks_run_before_the_checkpoint_is_checked(kind):
    """torch runs the load pre-hooks first, so a hook may migrate a checkpoint the optimizer would refuse (Muon
    and AdamTied checked it before their hooks ran, which then never did), and what a hook returns is what is
    converted and checked (Muon's ns_dtype saved by name)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    calls = []
    if kind.startswith("Muon"):
        src = mf.Muon([p], lr=0.01, ns_dtype=torch.bfloat16)
        src.step()
        sd = copy.deepcopy(src.state_dict())
        opt = mf.Muon([torch.nn.Parameter(p.detach().clone())], lr=0.01)
        if kind == "Muon: renamed state":
            sd["state"] = {i: {"old_buf": st["momentum_buffer"]} for i, st in sd["state"].items()}
            hook = _migrate_muon
        else:
            hook = lambda o, d: copy.deepcopy(sd)  # noqa: E731 (ns_dtype "bfloat16", as saved)
        want = src.state[p]["momentum_buffer"]
    else:
        src = mf.Adam([p], lr=0.01)  # (betas 0.9, 0.999: AdamTied refuses them unless a hook ties them)
        src.step()
        sd = copy.deepcopy(src.state_dict())
        opt = mf.AdamTied([torch.nn.Parameter(p.detach().clone())], lr=0.01)
        hook, want = _tie_betas, src.state[p]["exp_avg"]
    opt.register_load_state_dict_pre_hook(lambda o, d: (calls.append("pre"), hook(o, d))[1])
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt.load_state_dict(sd)
    assert calls == ["pre", "post"]
    q = opt.param_groups[0]["params"][0]
    st = opt.state[q]
    assert torch.equal(st["momentum_buffer" if kind.startswith("Muon") else "exp_avg"], want)
    if kind.startswith("Muon"):
        assert opt.param_groups[0]["ns_dtype"] is torch.bfloat16
    else:
        assert opt.param_groups[0]["betas"] == (0.95, 0.95)
    q.grad = torch.randn(4, 3)
    opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: mf.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: mf.AdamW(ps, lr=0.01, layout="int8_state"),
    lambda ps: mf.Muon(ps, lr=0.01),
], ids=["SGD", "AdamW-int8_state", "Muon"])
def test_a_state_dict_post_hook_sees_the_saved_forms_and_may_return_another_object(make):
    """torch returns what a state-dict post-hook returns, whatever its shape (a wrapper {"format", "optimizer"}
    raised KeyError: the saved forms were made after the hooks); the hook sees those saved forms (int8 codes one
    level down, Muon's ns_dtype by name)."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    p.grad = torch.randn(64, 80)
    opt = make([p])
    opt.step()
    seen = []

    def wrap(o, sd):
        seen.append(copy.copy(sd["state"][0]))
        seen.append(sd["param_groups"][0].get("ns_dtype", "n/a"))
        return {"format": 2, "optimizer": sd}

    opt.register_state_dict_post_hook(wrap)
    out = opt.state_dict()
    assert set(out) == {"format", "optimizer"} and set(out["optimizer"]) == {"state", "param_groups"}
    if "exp_avg_scale" in seen[0]:
        assert isinstance(seen[0]["exp_avg"], dict) and seen[0]["exp_avg"]["codes"].dtype == torch.int8
    assert seen[1] in ("n/a", None) or isinstance(seen[1], str)
    opt.register_load_state_dict_pre_hook(lambda o, sd: sd["optimizer"])
    opt.load_state_dict(out)  # (a pre-hook unwraps it)


class _Pair(__import__("collections").abc.Sequence):
    """A pair-like config value that is neither a tuple nor a list (as omegaconf's ListConfig from Hydra)."""

    def __init__(self, *v):
        self.v = v

    def __getitem__(self, i):
        return self.v[i]

    def __len__(self):
        return len(self.v)


@pytest.mark.parametrize("cls", [mf.Adam, mf.AdamW, mf.NAdam, mf.Lion, mf.AdamWScheduleFree])
def test_betas_of_any_sequence_are_kept_as_a_tuple_of_numbers_and_checkpoints_load_weights_only(cls):
    """torch.optim.Adam keeps ``tuple(betas)``: a ListConfig-like sequence (or a NumPy array's numbers) kept as
    given made a checkpoint that ``torch.load(weights_only=True)``, torch's default, refuses."""
    import numpy as np
    for betas in (_Pair(0.9, 0.99), np.array([0.9, 0.99])):
        p = torch.nn.Parameter(torch.randn(3))
        opt = cls([p], lr=0.01, betas=betas)
        assert opt.defaults["betas"] == (0.9, 0.99) and type(opt.param_groups[0]["betas"]) is tuple
        assert all(type(b) is float for b in opt.param_groups[0]["betas"])
        p.grad = torch.randn(3)
        opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        cls([torch.nn.Parameter(p.detach().clone())], lr=0.01).load_state_dict(torch.load(buf, weights_only=True))


@pytest.mark.parametrize("name", ["SGD", "Adam", "FSGDM"])
def test_closure(name):
    case = CASES[name]
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = case.cls([x], **case.base)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    before = x.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1
    assert float(loss) == float((before ** 2).sum())
    assert not torch.equal(x.detach(), before)
    torch.testing.assert_close(x.grad, 2 * before)
    # no closure: returns None
    assert opt.step() is None


# ------------------------------------------------------------------ backends
def test_backend_reference_and_unknown():
    p = make_params()
    opt = mf.SGD(p, lr=0.1, momentum=0.9, backend="reference")
    assert opt.backend == "reference"
    run(opt, p, make_grads(steps=2))
    with pytest.raises(ValueError, match=r"no_such.*reference"):
        mf.SGD(make_params(), lr=0.1, backend="no_such")
    with pytest.raises(TypeError, match="backend"):
        mf.SGD(make_params(), lr=0.1, backend=3)


def test_backend_env_var(monkeypatch):
    grads = make_grads(steps=3)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    p = make_params()
    run(mf.Adam(p, lr=0.01), p, grads)
    q = make_params()
    run(mf.Adam(q, lr=0.01, backend="reference"), q, grads)
    assert all(torch.equal(x, y) for x, y in zip(p, q))
    # an unknown value raises at step time, naming the variable, before anything changes
    monkeypatch.setenv(backends.ENV_VAR, "bogus_backend")
    r = make_params()
    opt = mf.Adam(r, lr=0.01)
    for x, g in zip(r, grads[0]):
        x.grad = g.clone()
    assert_step_raises_unchanged(opt, r, ValueError,
                                 r"bogus_backend.*MOMENTUM_FUSED_BACKEND|MOMENTUM_FUSED_BACKEND.*bogus_backend")
    assert len(opt.state.get(r[0], {})) == 0


def test_backends_status():
    st = backends.status()
    assert st["reference"] == "available"
    for name, s in st.items():
        assert s == "available" or s.startswith(("unavailable: ", "available (")), (name, s)
    assert set(backends.available()) == {n for n, s in st.items() if s.startswith("available")}
    b = backends.resolve(None, mf.specs.get_spec("sgd"), torch.device("cpu"), torch.float32)
    assert b.available and b.name in st


@pytest.mark.skipif("triton" not in backends.available(), reason="needs triton installed")
@pytest.mark.parametrize("cuda,interpret", [(False, False), (False, True), (True, False)])
def test_status_says_when_triton_can_step_nothing_here(cuda, interpret, monkeypatch):
    """status() said 'available' for triton on a CPU-only machine without TRITON_INTERPRET=1, where every step
    on it raises (2026-12-06: it names why in parentheses)."""
    from momentum_fused import _backend_triton
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(_backend_triton, "_interpreting", lambda: interpret)
    st = backends.status()["triton"]
    if cuda or interpret:
        assert st == "available"
    else:
        assert st.startswith("available (no CUDA device here") and "TRITON_INTERPRET=1" in st


class _Entry:
    """A compiled op's two entries for backends.run_step_op: ``fast`` answers the scripted statuses (doing the
    update only on DONE), ``op`` (the registered op) always does it; both record what they got."""
    DONE, PYTHON_DISPATCH, NOT_CONTIGUOUS = 0, 1, 2

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.fast_calls, self.op_calls = [], []

    @staticmethod
    def _update(params, flat):  # p += 1, every state -= 1
        for p in params:
            p.add_(1)
        for s in flat:
            s.sub_(1)

    def fast(self, params, grads, states, *args):  # states: per-param tuples, or (after copies) a flat list
        status = self.statuses.pop(0)
        self.fast_calls.append((list(params), list(grads), list(states), args))
        if status == self.DONE:
            self._update(params, [t for st in states for t in (st if isinstance(st, tuple) else (st,))])
        return status

    def op(self, params, grads, flat, *args):
        self.op_calls.append((list(params), list(grads), list(flat), args))
        self._update(params, flat)


@pytest.mark.parametrize("statuses,fast_calls,op_calls,copies", [
    ([0], 1, 0, False),     # DONE: the eager entry did it
    ([1], 1, 1, False),     # PYTHON_DISPATCH: the registered op
    ([2, 0], 2, 0, True),   # NOT_CONTIGUOUS: contiguous copies, the eager entry again, results copied back
    ([2, 1], 2, 1, True),   # ...and a subclass among them: the registered op on the copies
])
def test_run_step_op_protocol(statuses, fast_calls, op_calls, copies):
    """The eager-entry protocol shared by the cpu and cuda backends (backends.run_step_op), with scripted
    entries: which entry runs, on which tensors, and that a non-contiguous param and state get the result."""
    e = _Entry(statuses)
    p = torch.zeros(3, 4).t() if copies else torch.zeros(4, 3)  # (4, 3), transposed strides when copies
    s = torch.zeros(3, 4).t() if copies else torch.zeros(4, 3)
    q, g = torch.zeros(5), torch.zeros(5)
    backends.run_step_op(e, e.fast, e.op, [p, q], [torch.zeros(4, 3), g], [(s,), (torch.zeros(5),)], ("args",))
    assert (len(e.fast_calls), len(e.op_calls)) == (fast_calls, op_calls)
    assert all(c[3] == ("args",) for c in e.fast_calls + e.op_calls)
    if copies:  # the second entry call (and the op) saw contiguous copies, not the originals
        second = (e.op_calls or e.fast_calls[1:])[0]
        assert second[0][0] is not p and second[0][0].is_contiguous()
    assert torch.equal(p, torch.ones(4, 3)) and torch.equal(q, torch.ones(5))  # updated once, copied back
    assert torch.equal(s, -torch.ones(4, 3))


def test_run_step_op_under_a_dispatch_mode_calls_the_registered_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Noop(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    e = _Entry([])
    p = torch.zeros(2)
    with Noop():
        backends.run_step_op(e, e.fast, e.op, [p], [torch.zeros(2)], [()], ())
    assert (len(e.fast_calls), len(e.op_calls)) == (0, 1)
    assert torch.equal(p, torch.ones(2))


# ------------------------------------------------------------------ GradScaler protocol
@pytest.mark.parametrize("case,kwargs", all_variants())
def test_found_inf_skips_everything(case, kwargs):
    p = make_params()
    grads = make_grads(steps=4)
    opt = run(case.cls(p, **kwargs), p, grads[:2])
    before = snapshot(opt, p)
    for x, g in zip(p, grads[2]):
        x.grad = g.clone()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert_snapshot_equal(before, snapshot(opt, p))
    # a fresh optimizer skipped on its first step creates no state at all
    q = make_params()
    fresh = case.cls(q, **kwargs)
    for x, g in zip(q, grads[0]):
        x.grad = g.clone()
    fresh.found_inf = torch.tensor(1.0)
    fresh.step()
    assert all(len(fresh.state.get(x, {})) == 0 for x in q)
    assert all(torch.equal(x, y) for x, y in zip(q, make_params()))
    # found_inf = 0 steps normally
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(p[0], before["params"][0])


@pytest.mark.parametrize("case,kwargs", all_variants())
def test_grad_scale_equals_unscaled_step(case, kwargs):
    grads = make_grads(steps=STEPS)
    a, b = make_params(), make_params()
    plain = run(case.cls(a, **kwargs), a, grads)
    scaled = case.cls(b, **kwargs)
    scaled.grad_scale = torch.tensor(4.0)
    for gs in grads:
        for x, g in zip(b, gs):
            x.grad = 4.0 * g
        scaled.step()
        for x, g in zip(b, gs):
            assert torch.equal(x.grad, g)  # .grad is unscaled after the step, as torch.optim leaves it
    # scaling by a power of two is exact: bitwise equal
    assert_states_close(scaled, b, plain, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam"])
def test_torch_grad_scaler_cpu_end_to_end(name):
    case = CASES[name]
    kwargs = case.variants[-1]
    torch.manual_seed(0)
    model_a = torch.nn.Linear(4, 3)
    model_b = copy.deepcopy(model_a)
    opt_a = case.cls(model_a.parameters(), **kwargs)
    opt_b = case.cls(model_b.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randn(8, 4, generator=gen)
        opt_a.zero_grad()
        scaler.scale(model_a(x).pow(2).sum()).backward()
        if t == 3:  # an overflow: the scaler must skip the step and back off
            model_a.weight.grad[0, 0] = float("inf")
        scaler.step(opt_a)
        scaler.update()
        assert not hasattr(opt_a, "grad_scale") and not hasattr(opt_a, "found_inf")
        if t != 3:
            opt_b.zero_grad()
            model_b(x).pow(2).sum().backward()
            opt_b.step()
    assert scaler.get_scale() == 2.0 ** 9
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, **TOL[torch.float32])
        for k, v in opt_b.state[pb].items():
            torch.testing.assert_close(opt_a.state[pa][k], v, **TOL[torch.float32])


@pytest.mark.parametrize("raw,want", [("", 8 << 20), ("8M", 8 << 20), ("64k", 64 << 10), ("0", 0), ("1", 1),
                                      ("8MB", None), ("-1", None), ("x", None)])
def test_ns_round_elems_from_the_environment(monkeypatch, raw, want):
    """MOMENTUM_FUSED_NS_ROUND_ELEMS was read with int() at import: "8M" (the docs' wording of the default) or an
    empty value broke ``import momentum_fused`` for every user. Suffixes are taken; a bad value warns and keeps
    the default (it tunes the overlap of the exchange only)."""
    from momentum_fused.optim import phases
    monkeypatch.setenv("MOMENTUM_FUSED_NS_ROUND_ELEMS", raw)
    if want is None:
        with pytest.warns(RuntimeWarning, match="MOMENTUM_FUSED_NS_ROUND_ELEMS"):
            assert phases._round_elems() == 8 << 20
    else:
        assert phases._round_elems() == want
