"""What a review of tensor layout and identity found on 2026-12-05 (each test failed before its fix): gradients
with a lazy bit or without memory (autograd's ZeroTensor: a segfault on the cpu backend; conjugate views refused
after the step counters had moved; negative views read with the wrong sign), params whose version counters the
compiled kernels did not bump (autograd's in-place check silently off), a non-contiguous param overlapping another
(one update lost on the cpu backend) or itself (half a step applied before the error), two Parameters over one
memory (a race), an expanded state tensor, a None state entry, group params replaced by a tuple. The tests of what
stays allowed (views of one flat buffer, column halves of a matrix) and the negative-view one (its fix is the C
check, already in the build the old code was run with) passed before."""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends

_CPU = backends.status().get("cpu")
BACKENDS = ["reference"] + (["cpu"] if _CPU == "available" else [])
_needs_cpu = pytest.mark.skipif(_CPU != "available", reason=f"the cpu backend is not built: {_CPU}")

RULES = [
    (mf.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (mf.AdamW, torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
    (mf.NAdam, torch.optim.NAdam, dict(lr=0.1, weight_decay=0.1)),
]


def _pair(ours, theirs, kw, backend, params):
    a = [p.detach().clone().requires_grad_() for p in params]
    b = [p.detach().clone().requires_grad_() for p in params]
    return a, ours(a, backend=backend, **kw), b, theirs(b, **kw)


# ---------------------------------------------------------------- gradients with a lazy bit or no memory
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours, theirs, kw", RULES, ids=lambda x: getattr(x, "__name__", ""))
def test_zerotensor_grad_steps_as_zeros(ours, theirs, kw, backend):
    """``w.sgn()`` gives w a ZeroTensor gradient (no memory, data_ptr 0): the cpu backend read it (SIGSEGV)."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    a, oa, b, ob = _pair(ours, theirs, kw, backend, init)
    for step in range(3):
        for ps, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            (ps[0].sgn().sum() + (ps[1] ** 2).sum()).backward()
            assert ps[0].grad._is_zerotensor()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert float(oa.state[a[0]]["step"] if "step" in oa.state[a[0]] else 3) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_conjugate_view_grad_of_a_complex_param(backend):
    """``p.conj()`` in the loss gives a gradient with the conjugate bit: view_as_real refused it, after the step
    counters of the group had moved (the error came from the bucket loop)."""
    torch.manual_seed(0)
    init = [torch.randn(4, 3, dtype=torch.complex64), torch.randn(6)]
    w = torch.randn(4, 3, dtype=torch.complex64)
    a, oa, b, ob = _pair(mf.Adam, torch.optim.Adam, dict(lr=0.05, weight_decay=0.1), backend, init)
    for _ in range(3):
        for ps, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            ((ps[0].conj() * w).real.sum() + ps[1].sum()).backward()
            opt.step()
    assert a[0].grad.is_conj()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert [float(oa.state[p]["step"]) for p in a] == [3.0, 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_view_grad_is_read_with_its_sign(backend):
    """A contiguous gradient with the negative bit (``torch._neg_view``): the cpu backend read its memory, the
    opposite sign."""
    p = torch.ones(4, requires_grad=True)
    q = torch.ones(4, requires_grad=True)
    opt = mf.SGD([p], lr=0.1, backend=backend)
    ref = torch.optim.SGD([q], lr=0.1)
    for x, o in ((p, opt), (q, ref)):
        x.grad = torch._neg_view(torch.full((4,), 2.0))
        assert x.grad.is_neg()
        o.step()
    torch.testing.assert_close(p, q)
    assert float(p.detach()[0]) == pytest.approx(1.2)


@_needs_cpu
def test_backend_entry_takes_lazy_and_memoryless_grads():
    """The cpu backend called directly (its fast entry reads memory): such tensors go through the dispatcher."""
    spec = mf.specs.get_spec("sgd")
    b = backends.resolve("cpu", spec, torch.device("cpu"), torch.float32)
    sc = spec.Scalars(0.5, 0.0, 0.0, 0.0, 1.0, 1.0)
    p, q = torch.ones(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    w.sgn().sum().backward()  # a ZeroTensor
    b.apply(spec, spec.Flags(False, False), [p, q], [w.grad, torch._neg_view(torch.ones(3))], [(), ()], [sc, sc])
    assert p.tolist() == [1.0, 1.0, 1.0] and q.tolist() == [1.5, 1.5, 1.5]


def test_a_lazy_view_param_is_refused_before_anything_changes():
    base = torch.randn(3, dtype=torch.complex64)
    p = torch.nn.Parameter(base.conj())
    other = torch.nn.Parameter(torch.randn(3))
    opt = mf.AdamW([other, p], lr=0.1)
    other.grad, p.grad = torch.ones(3), torch.ones(3, dtype=torch.complex64)
    before = other.detach().clone()
    with pytest.raises(ValueError, match="lazy conjugate view"):
        opt.step()
    assert torch.equal(other, before) and not opt.state


# ---------------------------------------------------------------- autograd's version counters
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda ps, b: mf.Adam(ps, lr=0.1, backend=b),
                                  lambda ps, b: mf.SGD(ps, lr=0.1, momentum=0.9, backend=b),
                                  lambda ps, b: mf.Adam(ps, lr=0.1, backend=b, layout="int8_state"),
                                  lambda ps, b: mf.Muon([{"params": [ps[0]]},
                                                         {"params": [ps[1]], "use_muon": False}], lr=0.1, backend=b)],
                         ids=["adam", "sgd", "adam-int8", "muon"])
def test_step_bumps_the_params_version_counters(make, backend):
    """The GAN mistake (D stepped between the forward and the backward of G's loss) must raise as with torch."""
    torch.manual_seed(0)
    G, D = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
    opt = make([D.weight, D.bias], backend)
    out = D(G(torch.randn(16, 64)))
    out.square().mean().backward(retain_graph=True)
    v = D.weight._version
    opt.step()
    assert D.weight._version > v and D.bias._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (-out).square().mean().backward()


# ---------------------------------------------------------------- params that overlap in memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_param_overlapping_another(backend):
    """Two distinct Parameters over the same memory, one transposed: the cpu backend updated the transposed one on
    a copy and wrote it back over the other's update. Refused there, with the reference backend as the way out;
    the reference backend updates them one after the other as torch."""
    torch.manual_seed(0)
    w = torch.randn(6, 4)

    def run(make):
        a = torch.nn.Parameter(w.clone())
        b = torch.nn.Parameter(a.data.t())
        opt = make([a, b])
        for k in range(3):
            a.grad, b.grad = torch.full((6, 4), 0.1 * k + 0.1), torch.full((4, 6), 0.3)
            opt.step()
        return a.detach().clone()

    ref = run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    if backend == "reference":
        torch.testing.assert_close(run(lambda ps: mf.SGD(ps, lr=0.1, momentum=0.9, backend=backend)), ref)
        return
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(a.data.t())
    opt = mf.SGD([a, b], lr=0.1, momentum=0.9, backend=backend)
    a.grad, b.grad = torch.ones(6, 4), torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"param 0 of group 0 \(shape \(6, 4\)\) and param 1 .* elements overlap"):
        opt.step()
    assert torch.equal(a.detach(), w) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_disjoint_strided_params_still_step(backend):
    """Column halves of one matrix as two Parameters share a storage without sharing an element: allowed."""
    torch.manual_seed(0)
    w = torch.randn(5, 8)
    outs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: mf.Adam(ps, lr=0.1, backend=backend)):
        base = w.clone()
        a, b = torch.nn.Parameter(base[:, :4]), torch.nn.Parameter(base[:, 4:])
        a.data, b.data = base[:, :4], base[:, 4:]
        opt = make([a, b])
        for k in range(3):
            a.grad, b.grad = torch.full((5, 4), 1.0 + k), torch.full((5, 4), -2.0)
            opt.step()
        outs.append(base)
    torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_overlapping_itself_is_refused_before_anything_changes(backend):
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.zeros(4))
    b.data = torch.zeros(1).expand(4)
    opt = mf.Adam([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state


@_needs_cpu
@pytest.mark.parametrize("path", ["fast entry", "non-contiguous copy", "dispatcher"])
def test_cpu_backend_bumps_versions_on_every_path(path):
    """The cpu backend bumps the counters itself (Backend.bumps_versions): in its C entry, and in Python after the
    registered op (the path taken under a TorchDispatchMode) or a written-back copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    if path == "non-contiguous copy":
        ps[0] = torch.randn(4, 6).t().requires_grad_()
    opt = mf.Adam(ps, lr=0.1, backend="cpu")
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p._version for p in ps]
    if path == "dispatcher":
        with Passthrough():
            opt.step()
    else:
        opt.step()
    assert all(p._version > v for p, v in zip(ps, before))
    assert not torch.equal(ps[1].detach(), torch.zeros(5))


# ---------------------------------------------------------------- state tensors
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["native", "int8_state"])
def test_a_state_tensor_overlapping_itself_is_refused_before_anything_changes(backend, layout):
    """An expanded state tensor was updated on a copy whose write-back raised after every tensor of the bucket had
    been written (a retry then applied the step twice)."""
    ps = [torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4096))]
    opt = mf.Adam(ps, lr=0.1, backend=backend, layout=layout)
    for p in ps:
        p.grad = torch.ones(4096)
    opt.step()
    st = opt.state[ps[1]]
    st["exp_avg"] = st["exp_avg"][:1].expand(4096)
    if layout == "int8_state":
        st["exp_avg_scale"] = st["exp_avg_scale"][:1].expand(16)
    before = [p.detach().clone() for p in ps]
    steps = [float(opt.state[p]["step"]) for p in ps]
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert [float(opt.state[p]["step"]) for p in ps] == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_entry_set_to_none_is_named(backend):
    p = torch.nn.Parameter(torch.randn(8))
    opt = mf.Adam([p], lr=0.1, backend=backend)
    p.grad = torch.ones(8)
    opt.step()
    opt.state[p]["exp_avg_sq"] = None
    with pytest.raises(TypeError, match="state 'exp_avg_sq' is a NoneType, expected a Tensor"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_params_replaced_by_a_tuple_of_the_same_params(backend):
    """The cached plan handed the group's (now tuple) params to a C check that takes a list: a pybind TypeError."""
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    ours, theirs = mf.SGD([a], lr=0.1, momentum=0.9, backend=backend), torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for k in range(3):
        for x, o in ((a, ours), (b, theirs)):
            x.grad = torch.full((10,), 1.0 + k)
            if k == 1:
                o.param_groups[0]["params"] = tuple(o.param_groups[0]["params"])
            o.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_params_over_one_memory(backend):
    """Weight tying done as two Parameters over one memory (``b = nn.Parameter(a.data)``): torch updates the memory
    twice a step, one after the other; the compiled kernels update a bucket's tensors in parallel (a race). The
    reference backend matches torch; the others refuse before anything changes."""
    torch.manual_seed(0)
    w = torch.randn(64, 32)

    def run(make):
        a = torch.nn.Parameter(w.clone())
        b = torch.nn.Parameter(a.data)
        opt = make([a, b])
        for k in range(3):
            a.grad, b.grad = torch.full((64, 32), 0.1 * k + 0.1), torch.full((64, 32), -0.3)
            opt.step()
        return a.detach().clone(), opt

    ref, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.1))
    if backend == "reference":
        torch.testing.assert_close(run(lambda ps: mf.Adam(ps, lr=0.1, backend=backend))[0], ref)
        return
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(a.data[8:])  # (a partial overlap too)
    opt = mf.Adam([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.ones(64, 32), torch.ones(56, 32)
    with pytest.raises(ValueError, match="param 0 of group 0 .* and param 1 of group 0 .* elements overlap"):
        opt.step()
    assert torch.equal(a.detach(), w) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_that_are_views_of_one_flat_buffer(backend):
    """Disjoint contiguous views of one flat buffer (as frameworks with contiguous parameter buffers make them):
    one storage, no shared element: stepped as torch."""
    torch.manual_seed(0)
    flat0 = torch.randn(100)
    outs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.1), lambda ps: mf.AdamW(ps, lr=0.1, backend=backend)):
        flat = flat0.clone()
        ps = [torch.nn.Parameter(torch.empty(0)) for _ in range(3)]
        for p, (i, j) in zip(ps, ((0, 40), (40, 50), (50, 100))):
            p.data = flat[i:j]
        opt = make(ps)
        for k in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 1.0 + k)
            opt.step()
        outs.append(flat)
    torch.testing.assert_close(outs[1], outs[0])


# ---------------------------------------------------------------- found by a second review, of the fixes above
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_overlapping_itself_in_a_pattern_torch_cannot_classify(backend):
    """Strides for which torch's own internal-overlap check answers "too hard to tell" (``as_strided((3, 3),
    (2, 1))``: elements 2 and 4 counted twice) are checked element by element: refused before anything changes;
    a pattern of the same kind without a shared element steps as torch."""
    base = torch.randn(20)
    p = torch.nn.Parameter(torch.empty(0))
    p.data = base.as_strided((3, 3), (2, 1))
    q = torch.nn.Parameter(torch.randn(4))
    opt = mf.Adam([q, p], lr=0.1, backend=backend)
    q.grad, p.grad = torch.ones(4), torch.ones(3, 3)
    before = (q.detach().clone(), base.clone())
    with pytest.raises(ValueError, match="param 1 of group 0 .* share memory"):
        opt.step()
    assert torch.equal(q.detach(), before[0]) and torch.equal(base, before[1]) and not opt.state
    outs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: mf.Adam(ps, lr=0.1, backend=backend)):
        buf = before[1].clone()
        r = torch.nn.Parameter(torch.empty(0))
        r.data = buf.as_strided((2, 2, 2), (1, 5, 10))  # (disjoint: 0 1 5 6 10 11 15 16)
        assert torch._debug_has_internal_overlap(r) == 2
        opt = make([r])
        for k in range(3):
            r.grad = torch.full((2, 2, 2), 1.0 + k)
            opt.step()
        outs.append(buf)
    torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_storage_as_different_dtypes(backend):
    """Interleaved params viewing one byte buffer as float64 (bytes 0-7 of every 16) and as float32 (bytes 8-11)
    step as torch (views of different dtypes with overlapping extents were counted as overlapping); sharing a
    byte is refused."""
    torch.manual_seed(0)
    raw = torch.zeros(256, dtype=torch.uint8)
    raw.view(torch.float64)[0::2].copy_(torch.randn(16, dtype=torch.float64))
    raw.view(torch.float32)[2::4].copy_(torch.randn(16))

    def views(buf, first):
        a, b = torch.nn.Parameter(torch.empty(0, dtype=torch.float64)), torch.nn.Parameter(torch.empty(0))
        a.data, b.data = buf.view(torch.float64)[0::2], buf.view(torch.float32)[first::4]
        return a, b

    outs = []
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: mf.SGD(ps, lr=0.1, momentum=0.9, backend=backend)):
        buf = raw.clone()
        a, b = views(buf, 2)
        opt = make([a, b])
        for k in range(3):
            a.grad, b.grad = torch.full((16,), 0.5 + k, dtype=torch.float64), torch.full((16,), -1.0)
            opt.step()
        outs.append(buf)
    torch.testing.assert_close(outs[1].view(torch.float64)[0::2], outs[0].view(torch.float64)[0::2])
    torch.testing.assert_close(outs[1].view(torch.float32)[2::4], outs[0].view(torch.float32)[2::4])
    if backend == "reference":
        return
    buf = raw.clone()
    a, b = views(buf, 1)  # (bytes 4-7 of every 16: the high half of each float64)
    opt = mf.SGD([a, b], lr=0.1, momentum=0.9, backend=backend)
    a.grad, b.grad = torch.ones(16, dtype=torch.float64), torch.ones(16)
    with pytest.raises(ValueError, match="elements overlap"):
        opt.step()
    assert torch.equal(buf, raw) and not opt.state


def test_a_wrapper_subclass_param_without_a_storage_steps():
    """A tensor subclass that wraps others (``TwoTensor``, as torch's tests use; no storage of its own): reading
    its storage raised inside the shared-memory check."""
    from torch.testing._internal.two_tensor import TwoTensor
    outs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.1), lambda ps: mf.AdamW(ps, lr=0.1, backend="reference")):
        torch.manual_seed(0)
        p = torch.nn.Parameter(TwoTensor(torch.randn(4, 3), torch.randn(4, 3)))
        q = torch.nn.Parameter(torch.randn(5))
        opt = make([p, q])
        for k in range(3):
            p.grad = TwoTensor(torch.full((4, 3), 1.0 + k), torch.full((4, 3), -1.0))
            q.grad = torch.full((5,), 0.5)
            opt.step()
        outs.append((p.a.detach().clone(), p.b.detach().clone(), q.detach().clone()))
    for x, y in zip(*outs):
        torch.testing.assert_close(y, x)


def test_column_slices_are_checked_without_enumerating_their_elements(monkeypatch):
    """Every non-dense view (a column slice) is "too hard to tell" for torch's overlap check: enumerating its
    elements on every step made the step of two column halves of a 2048-column matrix ~20x slower. Nested
    strides are decided from the strides; only views that are not nested are enumerated (once per layout)."""
    from momentum_fused.optim import overlap
    calls = []
    real = overlap.elements_overlap
    monkeypatch.setattr(overlap, "elements_overlap", lambda a, b: calls.append(a is b) or real(a, b))
    w = torch.randn(64, 128)
    a, b = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    a.data, b.data = w[:, :64], w[:, 64:]
    opt = mf.SGD([a, b], lr=0.1)
    for _ in range(3):
        a.grad, b.grad = torch.ones(64, 64), torch.ones(64, 64)
        opt.step()
    assert True not in calls
    c = torch.nn.Parameter(torch.empty(0))
    c.data = torch.randn(40).as_strided((3, 3), (2, 1))
    o2 = mf.SGD([c], lr=0.1)
    c.grad = torch.ones(3, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match="share memory"):
            o2.step()
    assert calls.count(True) <= 1


# ---------------------------------------------------------------- model surgery between steps (a review, 2026-12-06)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["one dict", "one tensor"])
def test_state_shared_by_two_params_is_refused_before_anything_changes(backend, how):
    """Layer duplication with a shallow copy of the state (``opt.state[new] = opt.state[old]``): torch updates the
    shared moments once per param; the cpu backend updated them from two threads at once (a race: two identical
    runs differed by up to 0.2). Refused on every backend, naming both params."""
    from optim_db import assert_step_raises_unchanged
    torch.manual_seed(0)
    params = [torch.randn(4096, requires_grad=True) for _ in range(2)]
    opt = mf.AdamW(params[:1], lr=0.1, backend=backend)
    params[0].grad = torch.randn(4096)
    opt.step()
    opt.add_param_group(dict(params=params[1:]))
    if how == "one dict":
        opt.state[params[1]] = opt.state[params[0]]
    else:
        opt.state[params[1]] = {k: (v.clone() if k != "exp_avg" else v) for k, v in opt.state[params[0]].items()}
    for p in params:
        p.grad = torch.randn(4096)
    assert_step_raises_unchanged(opt, params, ValueError,
                                 r"param 0 of group 0 and param 0 of group 1 share state memory \('exp_avg")
    opt.state[params[1]] = {k: v.clone() for k, v in opt.state[params[0]].items()}  # (the fix the message names)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["another state of the param", "the param", "the gradient", "a view overlapping another param",
                                  "another param's gradient"])
def test_a_state_sharing_memory_with_its_own_tensors_is_refused(backend, what):
    """A state tensor that is the param, its gradient or another state of the same param (set by hand or loaded
    so): the kernels read and write them through distinct restrict pointers, and the result depended on the
    backend and the ISA (SGD: 1.629 vs 0.719 under MOMENTUM_FUSED_CPU_ISA=baseline; a review, 2026-12-06).
    Refused before anything changes, naming both tensors."""
    from optim_db import assert_step_raises_unchanged
    torch.manual_seed(0)
    params = [torch.randn(64, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(64)
    opt = mf.Adam(params, lr=0.1, backend=backend)
    opt.step()
    st = opt.state[params[0]]
    victim, want = {"another state of the param": (st["exp_avg"], r"state 'exp_avg' of param 0 of group 0 shares "
                                                   r"memory with state 'exp_avg_sq' of param 0"),
                    "the param": (params[0].detach(), r"state 'exp_avg_sq' of param 0 of group 0 shares memory with "
                                  r"param 0 of group 0;"),
                    "the gradient": (params[0].grad, r"shares memory with the gradient of param 0 of group 0"),
                    "a view overlapping another param": (None, r"state 'exp_avg_sq' of param 0 of group 0 shares memory with "
                                             r"param 1 of group 0;"),
                    "another param's gradient": (params[1].grad, r"shares memory with the gradient of param 1")}[what]
    if victim is None:  # another param a view of one buffer, this param's state a view overlapping its tail
        big = torch.zeros(128)
        params[1].data = big[:64]
        victim = big[32:96]
    st["exp_avg_sq"] = victim
    for p in params:
        if p.grad is None:
            p.grad = torch.randn(64)
    assert_step_raises_unchanged(opt, params, ValueError, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["same group", "other group"])
def test_a_param_put_twice_into_param_groups_is_refused_at_the_step(backend, where):
    """The constructor and add_param_group refuse a param listed twice; appending it to ``param_groups[i]["params"]``
    by hand was stepped twice on the reference backend (as torch does) and refused on the cpu one as two
    "distinct params" sharing memory (misleading). Both now name the duplicate."""
    from optim_db import assert_step_raises_unchanged
    params = [torch.randn(4, 4, requires_grad=True) for _ in range(2)]
    opt = mf.Adam([dict(params=params[:1]), dict(params=params[1:])], lr=0.1, backend=backend)
    opt.param_groups[0 if where == "same group" else 1]["params"].append(params[0])
    for p in params:
        p.grad = torch.ones_like(p)
    assert_step_raises_unchanged(opt, params, ValueError, r"listed twice in param group 0" if where == "same group"
                                 else r"is in param groups 0 and 1")


def test_a_dtype_change_after_the_first_step_names_the_conversion():
    """``model.half()`` mid-training: the state keeps its dtype, refused before anything changes, and the message
    names the fix (a state_dict round trip converts the state), which then steps as torch does."""
    from optim_db import assert_step_raises_unchanged
    torch.manual_seed(0)
    p = torch.randn(8, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, theirs = mf.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for x, o in ((p, ours), (q, theirs)):
        x.grad = torch.ones(8)
        o.step()
        x.data = x.data.half()
        x.grad = torch.ones(8, dtype=torch.half)
    assert_step_raises_unchanged(ours, [p], ValueError, r"opt\.load_state_dict\(opt\.state_dict\(\)\) converts it")
    ours.load_state_dict(ours.state_dict())
    ours.step()
    theirs.step()
    assert ours.state[p]["momentum_buffer"].dtype == torch.half and torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_the_step_does_not_write_or_that_shares_no_element_may_share_memory(backend):
    """What the shared-state check leaves alone (a review of it, 2026-12-06): keys the update does not write (a
    user's read-only tensor in every param's state), and buffers from two storages over one memory that share no
    element (numpy's interleaved views: compared at their absolute addresses, not their storage offsets)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    params = [torch.randn(6, requires_grad=True) for _ in range(2)]
    opt = mf.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    flat = np.zeros(12, dtype=np.float32)
    shared = torch.ones(3)
    for i, p in enumerate(params):
        opt.state[p]["momentum_buffer"] = torch.from_numpy(flat[i::2])
        opt.state[p]["user_scale"] = shared
        p.grad = torch.ones(6)
    ref = [p.detach().clone() for p in params]
    opt.step()
    for p, r in zip(params, ref):
        assert torch.allclose(p, r - 0.1)
    assert np.allclose(flat, 1.0)
