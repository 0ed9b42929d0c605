"""capturable=True: no host read and no host-computed per-step number in step(), so that a step can be
captured in a CUDA graph (FusedOptimizer._device_scalars / _advance_steps_device).

On the CPU (this file's first part, the compiled cpu backend): a capturable run equals the ordinary run
(the same ``spec.advance`` computed by tensor ops instead of Python floats), step counters are tensors
on the params' device, a tensor lr driven by a scheduler is read on the device, state_dicts round-trip,
and every configuration that cannot be captured raises before anything changes. The second part (marked
gpu) captures steps in a CUDA graph and replays them; it needs a CUDA device.
"""
import copy

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends
from optim_db import (CASES, assert_snapshot_equal, assert_states_close, assert_step_raises_unchanged,
                      device_amp_backend, make_grads, make_params, refuse_host_reads, snapshot, train_reading_lr)
from tolerances import tol

SHAPES = [(3, 4), (5,), (), (0,), (4097,)]
CAPTURABLE_CLASSES = ("SGD", "QHM", "Adam", "AdamW", "AdamTied", "RMSprop", "SignSGD", "Signum", "Lion")
NOT_CAPTURABLE = [(mf.NAdam, dict(lr=1e-2), "mu_product"), (mf.FSGDM, dict(lr=1e-2), "host counters"),
                  (mf.SGDScheduleFree, dict(lr=1e-2), "host counters"),
                  (mf.AdamWScheduleFree, dict(lr=1e-2), "host counters")]

need_cpu = pytest.mark.skipif("cpu" not in backends.available(),
                              reason="the compiled cpu extension is not built (pip install -e .)")


def _variants():
    out = []
    for case in CASES.values():
        if case.cls.__name__ not in CAPTURABLE_CLASSES:
            continue
        for i, kw in enumerate(case.variants):
            if isinstance(kw.get("lr"), str):
                continue
            # sign-based rules: float64 only (tests/tolerances.py)
            for dtype in (torch.float64,) if case.sign_rule else (torch.float64, torch.float32):
                out.append(pytest.param(case, kw, dtype, id=f"{case.name}-{i}-{str(dtype)[6:]}"))
    return out


def _run(cls, kw, capturable, dtype=torch.float64, steps=10, lr_tensor=False, sched=False):
    ps = make_params(SHAPES, dtype=dtype)
    kw = dict(kw)
    if lr_tensor:
        kw["lr"] = torch.tensor(float(kw.get("lr", 1e-3)), dtype=torch.float64)
    opt = cls([dict(params=ps[:2]), dict(params=ps[2:])], backend="cpu", capturable=capturable, **kw)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    for gs in make_grads(SHAPES, steps=steps, dtype=dtype):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        if sch is not None:
            sch.step()
    return opt, ps


@need_cpu
@pytest.mark.parametrize("case,kw,dtype", _variants())
def test_capturable_equals_host_scalars(case, kw, dtype):
    a, pa = _run(case.cls, kw, True, dtype)
    b, pb = _run(case.cls, kw, False, dtype)
    assert_states_close(a, pa, b, pb, **tol(dtype))
    for p in pa:
        st = a.state[p].get("step")
        if st is not None:
            assert isinstance(st, torch.Tensor) and st.device == p.device and st.dtype == torch.float32


@need_cpu
@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2, weight_decay=0.1)), (mf.SGD, dict(lr=0.1, momentum=0.9)),
                                    (mf.Lion, dict(lr=1e-3))])
def test_tensor_lr_with_a_scheduler(cls, kw):
    """The scheduler writes the tensor lr in place (``fill_``): a captured graph would read the new value."""
    a, pa = _run(cls, kw, True, lr_tensor=True, sched=True)
    b, pb = _run(cls, kw, False, sched=True)
    lr = a.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == b.param_groups[0]["lr"]
    assert_states_close(a, pa, b, pb, **tol(torch.float64))


@need_cpu
@pytest.mark.parametrize("layout", ["master16", "int8_state", "master16_int8"])
@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2, weight_decay=0.1)), (mf.SGD, dict(lr=0.1, momentum=0.9)),
                                    (mf.Lion, dict(lr=1e-3))], ids=["adamw", "sgd", "lion"])
def test_capturable_compressed_layouts_equal_the_ordinary_steps(cls, kw, layout):
    """The compressed layouts with capturable=True (device scalar tables): params, codes, scales, remainders and
    fp32 states bit for bit those of the host-scalar steps, on tensors large enough to be quantized."""
    dtype = torch.float32 if layout == "int8_state" else torch.bfloat16
    shapes = [(64, 128), (300,), (4096,)]
    runs = []
    for capturable in (True, False):
        ps = make_params(shapes, dtype=dtype)
        opt = cls(ps, backend="cpu", capturable=capturable, layout=layout, **kw)
        for gs in make_grads(shapes, steps=6, dtype=dtype):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        snap = snapshot(opt, ps)
        assert {g.pop("capturable") for g in snap["groups"]} == {capturable}
        runs.append(snap)
    assert_snapshot_equal(runs[0], runs[1])
    assert any(k.endswith("_scale") for st in runs[0]["state"] for k in st) == (layout != "master16")


@pytest.mark.parametrize("cls,kw,match", NOT_CAPTURABLE, ids=[c[0].__name__ for c in NOT_CAPTURABLE])
def test_rules_with_host_counters_raise(cls, kw, match):
    with pytest.raises(ValueError, match=f"capturable=True.*{match}"):
        cls(make_params(), capturable=True, **kw)
    opt = cls(make_params(), **kw)  # and as a param-group key
    with pytest.raises(ValueError, match="capturable=True"):
        opt.add_param_group(dict(params=make_params(seed=3), capturable=True))


def test_bad_capturable_values_raise():
    with pytest.raises(ValueError, match="bf16_sr"):
        mf.AdamW(make_params(dtype=torch.bfloat16), layout="bf16_sr", capturable=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        mf.AdamW(make_params(), capturable=1)


@need_cpu
@pytest.mark.parametrize("bad", [float("nan"), -1.0, 2.5])
def test_a_step_counter_assigned_by_hand_is_checked_in_a_capturable_group(bad):
    # (a review, 2026-12-07: the capturable hot path never re-planned for a replaced counter, and the full plan
    # skipped capturable counters, so NaN or -1 went into the bias corrections: NaN params). A counter on the host
    # is read at no cost; one on a GPU is not read (no sync), as before.
    ps = make_params()
    opt = mf.Adam(ps, lr=1e-2, capturable=True)
    for p, g in zip(ps, make_grads(steps=1)[0]):
        p.grad = g
    opt.step()
    opt.step()  # (the hot path: the cached plan)
    for value in (torch.tensor(bad), bad):  # (a tensor on the CPU, or a Python number: the second review)
        opt.state[ps[0]]["step"] = value
        assert_step_raises_unchanged(opt, ps, ValueError, "state 'step' is")
    opt.state[ps[0]]["step"] = torch.tensor(2.0)
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 3.0


def test_reference_backend_raises_before_any_change():
    ps = make_params()
    opt = mf.AdamW(ps, lr=1e-2, backend="reference")
    for p, g in zip(ps, make_grads(steps=1)[0]):
        p.grad = g
    opt.step()
    opt.param_groups[0]["capturable"] = True
    assert_step_raises_unchanged(opt, ps, RuntimeError, "capturable=True needs a compiled backend")


@need_cpu
def test_state_dict_round_trip_moves_steps_to_the_device():
    a, pa = _run(mf.AdamW, dict(lr=1e-2), True, steps=4)
    sd = copy.deepcopy(a.state_dict())
    assert sd["param_groups"][0]["capturable"] is True
    pb = [p.detach().clone() for p in pa]
    b = mf.AdamW([dict(params=pb[:2]), dict(params=pb[2:])], lr=1e-2, backend="cpu", capturable=True)
    b.load_state_dict(sd)
    for p in pb:
        assert b.state[p]["step"].device == p.device and float(b.state[p]["step"]) == 4.0
    for opt, ps in ((a, pa), (b, pb)):
        for p, g in zip(ps, make_grads(SHAPES, steps=1, seed=9)[0]):
            p.grad = g.clone()
        opt.step()
    assert_states_close(a, pa, b, pb, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ GPU
def _graph_run(cls, kw, backend, capture):
    """10 steps with new gradients and a halving tensor lr: eagerly (capture=False, capturable=False, float
    lr set by hand) or by replaying one captured step (capture=True)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.randn(s, device="cuda", generator=gen).requires_grad_() for s in ((17,), (4097,), (), (70_001,))]
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) for p in ps] for _ in range(13)]
    lrs = [kw["lr"] * 0.5 ** (k // 4) for k in range(13)]
    if not capture:
        opt = cls(ps, backend=backend, **kw)
        for k in range(13):
            opt.param_groups[0]["lr"] = lrs[k]
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            opt.step()
        return opt, ps
    lr = torch.tensor(lrs[0], device="cuda", dtype=torch.float64)
    opt = cls(ps, backend=backend, capturable=True, **{**kw, "lr": lr})
    _capture_and_replay(opt, ps, lr, lrs, grads)
    return opt, ps


def _capture_and_replay(opt, ps, lr, lrs, grads, warm=3, prologue=None):
    """Steps of a capturable ``opt`` on static gradient buffers: ``warm`` eager ones on a side stream (state, step
    counters, launcher tables, Triton compilation), then one captured step replayed for the rest of ``grads``, the
    tensor ``lr`` written in place to ``lrs[k]`` before step k. ``prologue(static_grads)``: run before every step,
    in the graph too (GradScaler's inf check)."""
    static = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, static):
        p.grad = g

    def step():
        if prologue is not None:
            prologue(static)
        opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(warm):
            lr.fill_(lrs[k])
            for g, new in zip(static, grads[k]):
                g.copy_(new)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for k in range(warm, len(grads)):
        lr.fill_(lrs[k])
        for g, new in zip(static, grads[k]):
            g.copy_(new)
        graph.replay()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                    (mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
                                    (mf.Lion, dict(lr=1e-3)), (mf.RMSprop, dict(lr=1e-3, centered=True))])
def test_cuda_graph_replay_equals_eager(cls, kw, backend):
    if backends.status().get(backend) != "available":
        pytest.fail(f"a CUDA device is visible but backend {backend!r} is not usable: {backends.status().get(backend)}")
    a, pa = _graph_run(cls, kw, backend, capture=True)
    b, pb = _graph_run(cls, kw, backend, capture=False)
    for p in pa:
        if "step" in a.state[p]:
            assert float(a.state[p]["step"]) == 13.0
    assert_states_close(a, pa, b, pb, **tol(torch.float32), host_exact=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capturable_step_does_not_synchronize(backend):
    ps = [torch.randn(s, device="cuda").requires_grad_() for s in ((17,), (4097,))]
    opt = mf.AdamW(ps, lr=torch.tensor(1e-2, device="cuda", dtype=torch.float64), backend=backend, capturable=True)
    for _ in range(2):  # state and caches exist after these
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ Muon (multi-phase: passes + Newton-Schulz)
def _muon_run(cap, lr_tensor=False, backend="cpu", steps=4, device="cpu", graph=False, flatten=True):
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (5, 8), (4, 3, 2), (7,)]
    ps = [torch.randn(s, generator=gen, dtype=torch.float32).to(device).requires_grad_() for s in shapes]
    lrs = [0.02 * 0.9 ** k for k in range(steps)]
    lr = torch.tensor(lrs[0], dtype=torch.float64, device=device) if lr_tensor else lrs[0]
    opt = mf.Muon([dict(params=ps[:3], lr=lr), dict(params=ps[3:], use_muon=False, lr=0.01)], capturable=cap,
                  ns_dtype=torch.float32, backend=backend, flatten=flatten)
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(steps)]
    for k in range(steps):
        if lr_tensor:
            lr.fill_(lrs[k])  # a scheduler writing the tensor lr in place
        else:
            opt.param_groups[0]["lr"] = lrs[k]
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        opt.step()
    return opt, ps


@need_cpu
@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "batched"])
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float-lr", "tensor-lr"])
def test_muon_capturable_equals_host_scalars(monkeypatch, lr_tensor, flatten):
    """Muon's passes take their scalars as device tables (a tensor lr read there, not on the host): the steps
    equal the ordinary ones, for the Muon groups and the aux AdamW group alike (with flatten=False too: the lr
    factor of the 3-D param's matrices in the device table)."""
    from momentum_fused.optim import phases
    tables = []
    real = phases._device_table
    monkeypatch.setattr(phases, "_device_table", lambda rows, device: tables.append(len(rows)) or real(rows, device))
    a, pa = _muon_run(True, lr_tensor, flatten=flatten)
    assert tables == [3, 3] * 4  # the momentum and apply passes of the 3 matrices, every step
    b, pb = _muon_run(False, flatten=flatten)
    assert_states_close(a, pa, b, pb, **tol(torch.float32))
    assert a.param_groups[0]["capturable"] and a.param_groups[1]["capturable"]


@need_cpu
@pytest.mark.parametrize("cap", [True, False], ids=["capturable", "eager"])
def test_muon_capturable_steps_reuse_their_work_buffers(monkeypatch, cap):
    """A capturable group's work buffers are the same memory every step once the cached plan holds (from step 2):
    a captured step then writes the buffers of its warm-up steps, whose Triton launch tables are cached (the H200
    run of 2026-12-04: a captured Muon step on the triton backend met new buffers and failed). Otherwise each step
    allocates its own, and nothing keeps them after the step."""
    from momentum_fused.optim import phases
    seen = []
    real = phases.PhasesMixin._work_buffers
    monkeypatch.setattr(phases.PhasesMixin, "_work_buffers", staticmethod(
        lambda *a: seen.append(w := real(*a)) or w))
    opt, _ = _muon_run(cap, steps=4)
    ptrs = [[t.data_ptr() for w in work for t in w.values()] for work in seen]
    assert len(ptrs) == 4 and all(len(x) == len(ptrs[0]) > 3 for x in ptrs)  # the Muon group, every step
    kept = [k for _, memo in opt._core._phase_memos.values() for k in memo if k[0] in ("work", "rows_bufs")]
    if cap:
        assert ptrs[1] == ptrs[2] == ptrs[3] and kept
    else:
        assert not kept


def test_triton_launch_tables_are_refused_during_capture(monkeypatch):
    """Building a launch table during CUDA graph capture raises a message that names the cause and the remedy."""
    pytest.importorskip("triton")
    from momentum_fused.triton_kernels import launcher

    class CudaRef:
        is_cuda = True
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="first seen during CUDA graph capture"):
        launcher._refuse_during_capture(CudaRef())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launcher._refuse_during_capture(CudaRef())


@need_cpu
def test_muon_capturable_step_reads_no_tensor_on_the_host(monkeypatch):
    opt, ps = _muon_run(True, lr_tensor=True, steps=2)
    for p in ps:
        p.grad = torch.randn_like(p)

    def refuse(*a, **k):
        raise AssertionError("a capturable step read a tensor value on the host")
    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.step()


@need_cpu
def test_muon_capturable_step_with_a_grad_scaler_reads_no_tensor_on_the_host():
    """GradScaler's device protocol (the cpu kernels marked device_scalars, optim_db.device_amp_backend, standing
    for triton and cuda): once the state exists a capturable step reads no tensor value on the host (the kernels
    read found_inf and grad_scale), found_inf = 1 changes nothing, and nothing is left for a deferred read."""
    with device_amp_backend("cpu") as (name, calls):
        opt, ps = _muon_run(True, lr_tensor=True, steps=1, backend=name)
        scale = torch.full((), 4.0)
        for k, inf in enumerate([True, False, False, True, False]):  # (2 warm steps, then read-free ones)
            for p in ps:
                p.grad = torch.randn_like(p) * 4
            opt.found_inf, opt.grad_scale = torch.full((), float(inf)), scale
            before = snapshot(opt, ps)
            calls.clear()
            if k < 2:
                opt.step()
                opt.sync_amp()
                continue
            with refuse_host_reads():
                opt.step()
            assert calls and all(f for _, f in calls)
            assert "pending_amp" not in opt._core._step_attrs and "pending_amp" not in opt._aux._step_attrs
            if inf:
                assert_snapshot_equal(before, snapshot(opt, ps))
            else:
                assert not torch.equal(before["params"][0], ps[0])
    assert float(opt.state[ps[3]]["step"]) == 4.0  # the aux param: 1 + 5 steps, 2 of them skipped


def test_muon_capturable_on_the_reference_backend_raises():
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
        _muon_run(True, backend="reference", steps=1)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        mf.Muon([torch.zeros(3, 3, requires_grad=True)], capturable="yes")


def _capturable_muon(init, lr0, backend):
    """CUDA copies of ``init`` (two matrices, then a bias for the aux AdamW group), a float64 device lr and a
    capturable Muon on them: (params, lr, optimizer)."""
    ps = [x.cuda().requires_grad_() for x in init]
    lr = torch.tensor(lr0, device="cuda", dtype=torch.float64)
    opt = mf.Muon([dict(params=ps[:2], lr=lr), dict(params=ps[2:], use_muon=False, lr=0.01)], capturable=True,
                  backend=backend)
    return ps, lr, opt


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_muon_cuda_graph_replay_equals_eager(backend):
    """One Muon step captured in a CUDA graph (passes, Newton-Schulz, aux AdamW) and replayed with new gradients and
    an lr written in place equals the eager steps."""
    if backends.status().get(backend) != "available":
        pytest.fail(f"a CUDA device is visible but backend {backend!r} is not usable: {backends.status().get(backend)}")
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48, 64), (64,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(8)]
    lrs = [0.02 * 0.9 ** k for k in range(8)]

    ps, lr, opt = _capturable_muon(init, lrs[0], backend)
    for k in range(8):
        lr.fill_(lrs[k])
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        opt.step()
    qs, lr2, opt2 = _capturable_muon(init, lrs[0], backend)
    _capture_and_replay(opt2, qs, lr2, lrs, grads)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_muon_cuda_graph_replay_with_a_grad_scaler(backend):
    """GradScaler's device protocol in the graph: found_inf set by torch's inf check of the scaled gradients (as
    GradScaler.step runs it, inv_scale 1) captured before the step, grad_scale a device tensor. The captured Muon
    step (passes, Newton-Schulz, aux AdamW) replayed over gradients with inf and NaN in some steps equals, bit for
    bit, the eager steps that skip those steps, on the unscaled gradients (a power-of-two scale: exact)."""
    if backends.status().get(backend) != "available":
        pytest.fail(f"a CUDA device is visible but backend {backend!r} is not usable: {backends.status().get(backend)}")
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48, 64), (64,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    infs = [False, True, False, True, False, False, True, True, False, False]  # (steps 0-2 are the eager warm-up)
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in infs]
    lrs = [0.02 * 0.9 ** k for k in range(len(infs))]
    scale = 1024.0
    scaled = [[g * scale for g in gs] for gs in grads]
    for gs, inf in zip(scaled, infs):
        if inf:
            gs[0][3, 5] = float("inf")
            gs[2][7] = float("nan")

    ps, lr, opt = _capturable_muon(init, lrs[0], backend)
    for k, inf in enumerate(infs):
        if not inf:
            lr.fill_(lrs[k])
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            opt.step()
    qs, lr2, opt2 = _capturable_muon(init, lrs[0], backend)
    found_inf, one = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
    opt2.found_inf, opt2.grad_scale = found_inf, torch.full((1,), scale, device="cuda")

    def inf_check(static):  # GradScaler._unscale_grads_ with the dummy inv_scale of GradScaler.step
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(static, found_inf, one)
    _capture_and_replay(opt2, qs, lr2, lrs, scaled, prologue=inf_check)
    opt2.sync_amp()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        for k, v in opt.state[p].items():
            torch.testing.assert_close(opt2.state[q][k], v, rtol=0, atol=0)
    assert float(opt2.state[qs[2]]["step"]) == infs.count(False)


@pytest.mark.parametrize("bad", [0, 3])
def test_adamtied_gradient_snr_reads_the_rolled_back_state(bad):
    """gradient_snr read the state without resolving a skipped step's deferred rollback (device protocol): the
    advanced step count (a wrong bias correction) or the state of a skipped first step."""
    def run(backend):
        g = torch.Generator().manual_seed(0)
        p = torch.randn(8, generator=g).requires_grad_()
        opt = mf.AdamTied([p], lr=0.01, beta=0.9, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for t in range(bad + 1):
            opt.zero_grad()
            scaler.scale(((p - torch.randn(8, generator=g)) ** 2).sum()).backward()
            if t == bad:
                p.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return list(opt.gradient_snr().values())

    with device_amp_backend("reference") as (dev, _):
        assert run(dev) == run("reference")


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_step_that_is_not_capturable_raises_on_a_gpu():
    """A real capture (tests/test_ecosystem.py fakes the capture query on CPU): an optimizer with capturable=False
    raises before anything changes, as torch's do."""
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    p.grad = torch.randn(64, device="cuda")
    opt = mf.AdamW([p], lr=0.1)
    before = p.detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with pytest.raises(RuntimeError, match="CUDA graph capture of step.*capturable is False"):
            with torch.cuda.graph(g, stream=s):
                opt.step()
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(p.detach(), before) and not opt.state


@pytest.mark.gpu
def test_capturable_written_by_dynamo_on_cuda_is_set_back_for_nadam():
    """torch.compile's dynamo writes capturable=True into the groups of an optimizer on CUDA without state when
    compiled code reads param_groups; NAdam cannot be capturable: set back with a warning, and the run equals eager
    (tests/test_ecosystem.py checks the same on CPU with dynamo's CUDA condition dropped)."""
    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).cuda()
        opt = mf.NAdam(model.parameters(), lr=1e-2)
        train = train_reading_lr(model, opt)
        f = torch.compile(train, backend="aot_eager") if compiled else train
        xs = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).cuda()
        for x in xs:
            f(x)
        assert opt.param_groups[0]["capturable"] is False
        return [p.detach().clone() for p in model.parameters()]

    with pytest.warns(RuntimeWarning, match="capturable=True was set after construction"):
        got = run(True)
    for a, b in zip(run(False), got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_capturable_on_the_reference_backend_is_refused_at_construction():
    """As the rules and layouts that cannot be capturable (since 2026-12-07; it raised at the first step): so that
    a capturable=True found later on a group without state is one torch.compile's dynamo wrote (set back, with a
    warning: tests/test_ecosystem.py -k set_back), never one the user asked for."""
    ps = make_params()
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend.*'reference'"):
        mf.AdamW(ps, lr=1e-2, backend="reference", capturable=True)
    opt = mf.AdamW(ps[:1], lr=1e-2, backend="reference")
    with pytest.raises(RuntimeError, match="param group 1: capturable=True needs a compiled backend"):
        opt.add_param_group(dict(params=ps[1:], capturable=True))
    assert len(opt.param_groups) == 1
    # an optimizer built on meta params (before to_empty) is not refused: their device is not known yet
    meta = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    assert mf.AdamW([meta], capturable=True).param_groups[0]["capturable"] is True
