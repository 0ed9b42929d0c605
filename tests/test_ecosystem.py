"""The PyTorch toolbox around the optimizers (docs/ecosystem.md): torch.amp.GradScaler,
torch.compile, every torch LR scheduler (+ momentum_fused.schedules.wsd), transformers.Trainer.

"Every optimizer" is the package's public list: each FusedOptimizer subclass in momentum_fused.__all__,
built with its case-table base kwargs (tests/optim_db.py) or its defaults.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import sys

import pytest
import torch
from torch.optim import lr_scheduler as lrs

import momentum_fused as mf
from optim_db import CASES, assert_snapshot_equal, opcheck_one_step, snapshot, train_reading_lr

PUBLIC = [getattr(mf, n) for n in mf.__all__
          if isinstance(getattr(mf, n), type) and issubclass(getattr(mf, n), mf.FusedOptimizer)
          and getattr(mf, n) is not mf.FusedOptimizer]
_CPU_STATUS = mf.backends.status().get("cpu", "not registered")
BACKENDS = [pytest.param("reference"),
            pytest.param("cpu", marks=pytest.mark.skipif(_CPU_STATUS != "available",
                                                         reason=f"cpu backend not built here: {_CPU_STATUS}"))]


def _kwargs(cls) -> dict:
    case = CASES.get(cls.__name__)
    return dict(case.base) if case is not None else {}


def _ids(classes):
    return [c.__name__ for c in classes]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def _data(steps, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype))
            for _ in range(steps)]


def test_public_list_is_complete():
    assert {c.__name__ for c in PUBLIC} >= {"SGD", "AdamW", "Lion", "SGDScheduleFree", "AdamWScheduleFree"}


# ------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", PUBLIC, ids=_ids(PUBLIC))
def test_grad_scaler_inf_step_changes_nothing_and_halves_the_scale(cls, backend):
    model = _model()
    params = list(model.parameters())
    opt = cls(params, **_kwargs(cls), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    data = _data(4)
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        if t == 2:  # overflow: one inf in one gradient
            params[0].grad[0, 0] = float("inf")
            before, scale = snapshot(opt, params), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if t == 2:
            assert_snapshot_equal(before, snapshot(opt, params))  # params, state, group counters
            assert scaler.get_scale() == scale / 2
    # the step after the overflow is taken again
    assert not torch.equal(params[0], before["params"][0])


# ------------------------------------------------------------------ torch.compile
def _train_step_fn(model, opt):
    def train_step(x, y):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return train_step


def _our_breaks(counters) -> set:
    """The functions named by graph-break reasons that involve momentum_fused. dynamo may word one break
    more than once, so the check is on the set of functions named."""
    import re

    out = set()
    for reason in counters["graph_break"]:
        if "momentum_fused" in reason or "FusedOptimizer" in reason or "_ScheduleFree" in reason:
            assert "marked as skipped" in reason, reason  # not an unsupported op/builtin of ours
            out.update(re.findall(r"function `([^`]+)`", reason) or re.findall(r"qualname: ([\w.]+)", reason)
                       or [reason])
    return out


def test_traceable_check_carries_dynamos_constant_mark():
    """FusedOptimizer._traceable is marked as torch.compiler.assume_constant_result would mark it (set by
    hand in base.py so that importing momentum_fused does not import torch._dynamo)."""
    def f():
        return True
    torch.compiler.assume_constant_result(f)
    marks = {k for k in vars(f) if k.startswith("_dynamo")}
    assert marks and all(getattr(mf.FusedOptimizer._traceable, k, None) == getattr(f, k) for k in marks)


def _traced(cls, backend, lr_kind) -> bool:
    """Does torch.compile trace this step (FusedOptimizer.step): a capturable rule, a tensor lr, a
    backend that takes scalar tables."""
    return cls is not mf.AdamWScheduleFree and lr_kind == "tensor" and backend == "cpu"


COMPILE_CLASSES = [mf.SGD, mf.AdamW, mf.Lion, mf.AdamWScheduleFree]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", COMPILE_CLASSES, ids=_ids(COMPILE_CLASSES))
def test_compiled_train_step_equals_eager(cls, backend, lr_kind):
    """torch.compile(fullgraph=False) of a train step that calls step(), with a scheduler changing the
    lr every step, bitwise equal to eager (aot_eager keeps the forward/backward math). A capturable rule
    with a tensor lr on a backend with scalar tables is traced into the graph: NO graph break from
    momentum_fused, its bucket op is in a graph, and one recompilation only (when the state appears);
    every other step runs eagerly: exactly ONE graph break from momentum_fused (the dynamo-disabled
    eager step) and no recompilation when the lr changes."""
    from torch._dynamo.utils import counters

    traced = _traced(cls, backend, lr_kind)
    graphs = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, inputs)

    kw = _kwargs(cls)
    if lr_kind == "tensor":
        kw["lr"] = torch.tensor(float(kw.get("lr", 1e-3)))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        # the eager run computes the scalars the way the traced step does (capturable: on the device)
        opt = cls(model.parameters(), **copy.deepcopy(kw), backend=backend, capturable=traced and not compiled)
        sched = lrs.ExponentialLR(opt, gamma=0.7)
        step = _train_step_fn(model, opt)
        if compiled:
            step = torch.compile(step, fullgraph=False, backend=record)
        n_graphs = []
        for x, y in _data(5):
            step(x, y)
            sched.step()
            n_graphs.append(counters["stats"]["unique_graphs"])
        runs.append((model, opt))
    (m_e, o_e), (m_c, o_c) = runs
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        assert torch.equal(a, b)
        for k, v in o_e.state[a].items():
            assert torch.equal(v, o_c.state[b][k]), k
    if traced:
        assert _our_breaks(counters) == set()
        assert any("momentum_fused.bucket_step" in g for g in graphs), graphs
        assert n_graphs[1:] == [n_graphs[1]] * 4, n_graphs  # no recompilation after the state exists
    else:
        assert _our_breaks(counters) == {"_ScheduleFree.step" if cls is mf.AdamWScheduleFree else
                                         "FusedOptimizer._eager_step"}
        assert n_graphs == [n_graphs[0]] * 5, n_graphs  # no recompile on lr changes
    assert not any("momentum_fused.bucket_step" in g for g in graphs) or traced


@pytest.mark.parametrize("case", ["onecycle_momentum", "weight_decay_schedule"])
def test_a_float_hyperparameter_changing_between_compiled_steps_does_not_recompile(case):
    """OneCycleLR's default cycle_momentum=True writes SGD's momentum every step, a weight-decay schedule the
    decay: the traced step takes such floats as graph inputs, as torch.optim's do (before 2026-12-06 the scalar
    table filled them in as constants: one recompilation per value, then dynamo's recompile limit and an eager
    frame). Bitwise equal to the eager capturable step."""
    from torch._dynamo.utils import counters
    if _CPU_STATUS != "available":
        pytest.skip(f"needs the compiled cpu backend (a traced step needs scalar tables): {_CPU_STATUS}")
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        if case == "onecycle_momentum":
            opt = mf.SGD(model.parameters(), lr=torch.tensor(0.01), momentum=0.9, backend="cpu",
                         capturable=not compiled)
            sched = lrs.OneCycleLR(opt, max_lr=0.01, total_steps=20)
        else:
            opt = mf.AdamW(model.parameters(), lr=torch.tensor(0.01), weight_decay=0.1, backend="cpu",
                           capturable=not compiled)
            sched = None
        step = _train_step_fn(model, opt)
        if compiled:
            step = torch.compile(step, fullgraph=False, backend="aot_eager")
        n_graphs = []
        for x, y in _data(6):
            step(x, y)
            if sched is not None:
                sched.step()
            else:
                opt.param_groups[0]["weight_decay"] *= 0.9
            n_graphs.append(counters["stats"]["unique_graphs"])
        runs.append((model, n_graphs))
    (m_e, _), (m_c, n_graphs) = runs
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        assert torch.equal(a, b)
    assert n_graphs[2:] == [n_graphs[2]] * 4, n_graphs  # (the state's recompilation, then one per value's: none)


def test_compiled_tests_run_under_torch_2_11s_rule_for_optimizer_attributes():
    """tests/conftest.py makes dynamo refuse an attribute written on an optimizer inside a traced frame, as torch
    2.11's does (2.13's accepts it): every compiled step of 2.11, the lent H200 image's torch, raised until
    2026-12-06 ("Attempted setattr on a user-defined object that does not have an AttributeMutation
    mutation_type"; found by running this suite on 2.11). The compiled tests here and in tests/triton therefore
    check it; this one fails where that patch no longer applies to this torch (its dynamo moved the hook)."""
    from torch._dynamo.variables.optimizer import OptimizerVariable
    from torch._dynamo.variables.user_defined import UserDefinedObjectVariable

    assert issubclass(OptimizerVariable, UserDefinedObjectVariable)
    assert UserDefinedObjectVariable.method_setattr_standard.__name__ == "refuse", \
        "tests/conftest.py could not patch this torch's dynamo (OptimizerVariable or method_setattr_standard moved)"
    torch._dynamo.reset()
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)

    def write():
        opt.anything = 1

    with pytest.raises(Exception, match="torch 2.11's dynamo refuses"):
        torch.compile(write, backend="eager", fullgraph=True)()
    torch._dynamo.reset()


@pytest.mark.parametrize("cls,layout,dtype", [(mf.AdamW, "int8_state", torch.float32),
                                               (mf.AdamW, "master16_int8", torch.bfloat16),
                                               (mf.SGD, "int8_state", torch.float32),
                                               (mf.RMSprop, "int8_state", torch.float32)])
def test_compiled_step_of_an_int8_layout_equals_eager(cls, layout, dtype):
    """A traced bucket of an 8-bit layout holds quantized params (codes and scales) beside small ones (fp32
    state): the bucket op splits the flat state list by each param's count (before 2026-12-06 by an equal
    share, which raised on a weight + bias + LayerNorm model)."""
    kw = dict(lr=torch.tensor(1e-3), layout=layout, backend="cpu")
    if cls is mf.SGD:
        kw["momentum"] = 0.9
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128),
                                    torch.nn.Linear(128, 3)).to(dtype)
        opt = cls(model.parameters(), capturable=not compiled, **kw)
        step = _train_step_fn(model, opt)
        if compiled:
            step = torch.compile(step, fullgraph=False, backend="aot_eager")
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            step(torch.randn(16, 64, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype))
        runs.append((model, opt))
    (m_e, o_e), (m_c, o_c) = runs
    assert any(mf.layouts.int8_quantized(p) for p in m_e.parameters())
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        assert torch.equal(a, b)
        assert o_e.state[a].keys() == o_c.state[b].keys()
        for k, v in o_e.state[a].items():
            assert torch.equal(v, o_c.state[b][k]), k


def test_compiled_step_after_loading_a_master_checkpoint_equals_eager():
    """The first step after a load checks the masters against the params (checkpoints._repair_stale_masters);
    a traced step skips that check (a data-dependent read there broke the graph mid-update and the bucket op got
    the host scalars: a crash, 2026-12-06, found before release)."""
    def build():
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 64).to(torch.bfloat16)
        return m, mf.AdamW(m.parameters(), lr=torch.tensor(1e-3), layout="master", backend="cpu")

    src, sopt = build()
    step = _train_step_fn(src, sopt)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 64, generator=gen).to(torch.bfloat16), torch.randn(8, 64, generator=gen)
                .to(torch.bfloat16)) for _ in range(5)]
    for x, y in batches[:2]:
        step(x, y)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        m, o = build()
        m.load_state_dict(src.state_dict())
        o.load_state_dict(copy.deepcopy(sopt.state_dict()))
        f = _train_step_fn(m, o)
        f = torch.compile(f, fullgraph=False, backend="aot_eager") if compiled else f
        for x, y in batches[2:]:
            f(x, y)
        runs.append((m, o))
    (me, oe), (mc, oc) = runs
    for a, b in zip(me.parameters(), mc.parameters()):
        assert torch.equal(a, b) and torch.equal(oe.state[a]["master"], oc.state[b]["master"])


def test_a_param_listed_twice_is_refused_by_a_compiled_step_too():
    # (a review found the traced step applied the update twice: the check ran with the memory checks, which a
    # traced step skips)
    torch._dynamo.reset()
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = mf.SGD([w, b], lr=torch.tensor(0.1))

    def step():
        ((w.sum() + b.sum()) ** 2).backward()
        opt.step()
        opt.zero_grad()

    f = torch.compile(step, backend="aot_eager")
    f()
    opt.param_groups[0]["params"].append(w)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="listed twice in param group 0"):
        f()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("zero_from", [0, 2])
def test_a_zerotensor_or_lazy_bit_grad_in_a_compiled_step_equals_eager(zero_from):
    # (a review, 2026-12-07: a param used only through an op of zero derivative gets autograd's ZeroTensor as its
    # grad; the traced step handed it to the bucket op, which has no ZeroTensor kernel: an internal dispatcher
    # error where the eager step and torch's compiled AdamW step it. Such a step now runs eagerly.)
    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
        opt = mf.AdamW([a, b], lr=torch.tensor(0.1), backend="cpu")
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(5):
            (a.sum() + (torch.sgn(b) if i >= zero_from else b).sum()).backward()
            assert b.grad._is_zerotensor() == (i >= zero_from)
            if i == 4:  # and a neg view
                a.grad = torch.ones(4).neg().neg()._neg_view()
            step()
            opt.zero_grad()
        return a.detach().clone(), b.detach().clone(), opt.state[b]["exp_avg_sq"].clone()

    for x, y in zip(run(False), run(True)):
        assert torch.equal(x, y)


def _dynamo_sets_capturable_on_cpu(monkeypatch):
    """torch.compile's dynamo writes capturable=True into the groups of an optimizer whose params are all on CUDA and
    have no state, when compiled code reads ``optimizer.param_groups``; here the same on CPU params (the GPU
    condition dropped), to test what the next step does without a GPU."""
    ov = pytest.importorskip("torch._dynamo.variables.optimizer", reason="needs torch._dynamo")
    orig = getattr(ov.OptimizerVariable, "_set_capturable", None)
    if orig is None:
        pytest.skip("this torch's dynamo has no OptimizerVariable._set_capturable (nothing sets capturable)")

    def patched(self, tx):
        for group in self.value.param_groups:
            if "capturable" in group and all(p not in self.value.state for p in group["params"]):
                group["capturable"] = True
        return orig(self, tx)

    monkeypatch.setattr(ov.OptimizerVariable, "_set_capturable", patched)


@pytest.mark.parametrize("make,dtype", [(lambda ps: mf.NAdam(ps, lr=1e-2), torch.float32),
                                        (lambda ps: mf.AdamWScheduleFree(ps, lr=1e-2), torch.float32),
                                        (lambda ps: mf.AdamW(ps, lr=1e-2, layout="bf16_sr"), torch.bfloat16),
                                        (lambda ps: mf.AdamW(ps, lr=1e-2, backend="reference"), torch.float32),
                                        (lambda ps: mf.Muon([ps[0]], lr=1e-2, backend="reference"), torch.float32)],
                         ids=["nadam", "sf_adamw", "bf16_sr", "reference", "muon_reference"])
def test_capturable_set_by_dynamo_on_an_optimizer_that_cannot_be_is_set_back(make, dtype, monkeypatch):
    # (a review, 2026-12-07: reading optimizer.param_groups inside a compiled function, e.g. a scheduler's step,
    # made the first step of these optimizers raise "cannot run with capturable=True" on CUDA params)
    _dynamo_sets_capturable_on_cpu(monkeypatch)

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).to(dtype)
        opt = make(list(model.parameters()))

        train = train_reading_lr(model, opt)
        f = torch.compile(train, backend="aot_eager") if compiled else train
        for i in range(3):
            if compiled and i == 0:
                with pytest.warns(RuntimeWarning, match="capturable=True was set after construction"):
                    f(torch.randn(3, 4, dtype=dtype))
            else:
                f(torch.randn(3, 4, dtype=dtype))
        assert opt.param_groups[0]["capturable"] is False
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda ps: mf.SGD(ps, lr=1e-2, backend="reference"),
                                  lambda ps: mf.SignSGD(ps, lr=1e-2, backend="reference")], ids=["sgd", "signsgd"])
def test_a_stateless_group_set_back_does_not_recompile_at_every_call(make, monkeypatch):
    """A group that never gains state is written by dynamo at every trace; set back at every step, it failed the
    compiled function's guard on the flag: a recompile at every call until dynamo's limit (a review, 2026-12-08).
    Its steps run with False and the group keeps dynamo's True between them; state dicts and copies save False."""
    from torch._dynamo.utils import counters

    _dynamo_sets_capturable_on_cpu(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Linear(4, 2)
    opt = make(list(model.parameters()))

    f = torch.compile(train_reading_lr(model, opt), backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="capturable=True was set after construction") as got:
        for _ in range(6):
            f(torch.randn(3, 4))
    assert sum("set after construction" in str(w.message) for w in got) == 1
    assert [w.filename for w in got if "set after" in str(w.message)] == [train_reading_lr.__code__.co_filename]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert opt.param_groups[0]["capturable"] is True and not opt.state
    assert opt.state_dict()["param_groups"][0]["capturable"] is False
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.param_groups[0]["capturable"] is False
        p = copied.param_groups[0]["params"][0]
        p.grad = torch.ones_like(p)
        copied.step()  # (False: stepped on the reference backend; a True would be refused)


def test_a_capturable_the_user_asked_for_is_never_set_back():
    """Only a True no one asked for (dynamo's) is set back: one given to the constructor on meta params (their device
    unknown there), or restored by load_state_dict from a checkpoint saved before any step, still raises at the step
    on the reference backend (a review, 2026-12-07: both were set back, with a warning blaming torch.compile)."""
    meta = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    opt = mf.AdamW([meta], lr=0.1, capturable=True, backend="reference")
    torch.utils.swap_tensors(meta, torch.nn.Parameter(torch.randn(4, 4)))  # (to_empty with the params kept)
    meta.grad = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
        opt.step()
    assert opt.param_groups[0]["capturable"] is True and not opt.state
    p = torch.nn.Parameter(torch.randn(4, 4))
    saved = mf.AdamW([p], lr=0.1, capturable=True).state_dict()  # (no step yet)
    opt = mf.AdamW([p], lr=0.1, backend="reference")
    opt.load_state_dict(saved)
    p.grad = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
        opt.step()
    for cls, torch_cls in ((mf.SGD, torch.optim.SGD), (mf.Muon, torch.optim.Muon)):  # torch's checkpoints have no
        meta = torch.nn.Parameter(torch.empty(4, 4, device="meta"))  # capturable key: the load fills the user's True
        opt = cls([meta], lr=0.1, capturable=True, backend="reference")  # (a review, 2026-12-08: it was recorded
        opt.load_state_dict(torch_cls([p], lr=0.1).state_dict())  # as added with False, then set back)
        torch.utils.swap_tensors(meta, torch.nn.Parameter(torch.randn(4, 4)))
        meta.grad = torch.randn(4, 4)
        with pytest.raises(RuntimeError, match="capturable=True needs a compiled backend"):
            opt.step()
        assert opt.param_groups[0]["capturable"] is True
    opt = mf.NAdam([p], lr=0.1)  # a group dict put in param_groups by hand, with capturable=True (twice: the second
    for _ in range(2):  # dict may reuse the id of the freed first group, added with False: a review)
        opt.param_groups[0] = {**opt.param_groups[0], "capturable": True}
        with pytest.raises(ValueError, match="cannot run with capturable=True"):
            opt.step()


def test_a_cuda_graph_capture_of_a_step_that_is_not_capturable_raises(monkeypatch):
    # (as torch's optimizers: the host-side numbers of such a step would be constants of the graph; checked with
    # torch.cuda's capture query answering yes, on CPU params)
    ps = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(3, 3)
    plain, cap = mf.AdamW(ps, lr=0.1), mf.AdamW(ps, lr=0.1, capturable=True, backend="cpu")
    muon = mf.Muon([ps[0]], lr=0.1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = [p.detach().clone() for p in ps]
    for opt in (plain, muon):
        with pytest.raises(RuntimeError, match="CUDA graph capture of step.*capturable is False"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, ps)) and not opt.state
    cap.step()  # (capturable: the check lets it through)
    assert not torch.equal(before[0], ps[0])


def test_a_refused_capture_drops_gradscalers_attributes(monkeypatch):
    # (a review, 2026-12-07: the capture check ran before the step's guard that drops GradScaler's grad_scale and
    # found_inf when a step raises: the next plain step divided its gradient by the stale scale)
    for make in (lambda ps: mf.SGD(ps, lr=0.1), lambda ps: mf.Muon(ps, lr=0.1)):
        p = torch.nn.Parameter(torch.zeros(3, 3))
        opt = make([p])
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(torch.ones(()))
        p.grad = torch.full((3, 3), 1024.0)
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_initialized", lambda: True)
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            with pytest.raises(RuntimeError, match="CUDA graph capture"):
                scaler.step(opt)
        assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
        q = torch.nn.Parameter(torch.zeros(3, 3))
        ref = make([q])
        p.grad, q.grad = torch.ones(3, 3), torch.ones(3, 3)
        opt.step()
        ref.step()
        assert torch.equal(p, q) and torch.equal(p.grad, torch.ones(3, 3))


def test_compiled_train_step_inductor_matches_eager():
    """The default inductor backend: the compiled forward/backward differ from eager by round-off only."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    outs = []
    for compiled in (False, True):
        model = _model(dtype=torch.float64)
        opt = mf.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        step = _train_step_fn(model, opt)
        if compiled:
            step = torch.compile(step, fullgraph=False)
        for x, y in _data(4, torch.float64):
            step(x, y)
        outs.append(list(model.parameters()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert _our_breaks(counters) == {"FusedOptimizer._eager_step"}  # a float lr: the eager step


@pytest.mark.skipif(_CPU_STATUS != "available", reason=f"cpu backend not built here: {_CPU_STATUS}")
def test_cpu_step_op_registration_passes_opcheck():
    """momentum_fused::cpu_step, called with the arguments a real AdamW step passes it: schema with
    mutation annotations, fake kernel, autograd registration and AOT dispatch (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="cpu")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    opt.step()  # creates the state
    opcheck_one_step(torch.ops.momentum_fused.cpu_step.default, opt)


# ------------------------------------------------------------------ LR schedulers
SCHEDULERS = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda s: 0.9),
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=4),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, start_factor=0.5, total_iters=3),
                                                   lrs.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=2),
                                                        lrs.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=False),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=1e-2, total_steps=10, cycle_momentum=False),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=6, power=2.0),
    "wsd": lambda o: mf.schedules.wsd(o, warmup=2, stable=3, decay=3),
}
SCHED_STEPS = 9


def test_scheduler_table_covers_every_torch_scheduler():
    public = {n for n in lrs.__all__ if n not in ("LRScheduler", "_LRScheduler")
              and isinstance(getattr(lrs, n), type)}
    assert public <= set(SCHEDULERS), sorted(public - set(SCHEDULERS))


def _drive(opt, name, params, grads, manual_lrs=None):
    """SCHED_STEPS steps; returns the lr each step used (or, with manual_lrs, sets it by hand)."""
    sched = SCHEDULERS[name](opt) if manual_lrs is None else None
    used = []
    for t in range(SCHED_STEPS):
        if manual_lrs is not None:
            for g in opt.param_groups:
                g["lr"] = manual_lrs[t]
        used.append(float(opt.param_groups[0]["lr"]))
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()  # a flat metric: it reduces
    return used


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("cls", PUBLIC, ids=_ids(PUBLIC))
def test_scheduler_drives_the_optimizer(cls, name):
    """The scheduler produces the same lr sequence as for torch.optim.SGD, and the optimizer's steps
    equal a run where group["lr"] is set by hand to that sequence (nothing caches the lr)."""
    kw = {**_kwargs(cls), "lr": 0.01}
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(SCHED_STEPS)]
    ref_params = [p.clone() for p in init]
    ref_lrs = _drive(torch.optim.SGD(ref_params, lr=0.01), name, ref_params, grads)
    a = [p.clone() for p in init]
    opt = cls(a, **kw, backend="reference")
    got = _drive(opt, name, a, grads)
    assert got == ref_lrs
    assert len(set(got)) > 1, "the schedule never changed the lr: the test would prove nothing"
    b = [p.clone() for p in init]
    manual = cls(b, **kw, backend="reference")
    _drive(manual, name, b, grads, manual_lrs=got)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if issubclass(cls, (mf.SGDScheduleFree, mf.AdamWScheduleFree)):
        # schedule-free: the y and z updates of the last step used the group's lr at that step (times
        # the warmup factor, 1 here): gamma_k = scheduled_lr
        assert opt.param_groups[0]["scheduled_lr"] == got[-1]


# ------------------------------------------------------------------ transformers.Trainer
_HF_MISSING = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("make", [lambda ps: mf.AdamW(ps), lambda ps: mf.Muon(ps)], ids=["adamw", "muon"])
def test_an_instance_gradscaler_setting_survives_a_copy_and_a_pickle(make):
    # (docs/ecosystem.md, accelerate: the setting lived in the instance's __dict__, which torch's __getstate__ leaves
    # out; a review found it lost by copy.deepcopy and torch.save of the optimizer)
    import io
    opt = make([torch.nn.Parameter(torch.randn(4, 4))])
    assert type(opt)._step_supports_amp_scaling is True
    opt._step_supports_amp_scaling = False
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    for other in (copy.deepcopy(opt), torch.load(buf, weights_only=False)):
        assert other._step_supports_amp_scaling is False
    assert copy.deepcopy(make([torch.nn.Parameter(torch.randn(4, 4))])).__dict__.get("_step_supports_amp_scaling") \
        is None  # (not set: nothing carried, the class's value)


@pytest.mark.skipif(bool(_HF_MISSING), reason=f"needs {' and '.join(_HF_MISSING)} (pip install -r requirements-dev.txt)")
def test_accelerate_sees_a_skipped_step_with_the_documented_gradscaler_setting():
    """docs/ecosystem.md (GradScaler): accelerate's AcceleratedOptimizer counts any call of step() as a step taken
    (huggingface/accelerate#4242), and GradScaler calls the step of an optimizer that skips by itself
    (``_step_supports_amp_scaling``): its scheduler then advanced on overflow steps (a review, 2026-12-07). With the
    attribute False on the instance, GradScaler unscales and skips as for torch's default AdamW: the skip is seen,
    the schedule holds, and the run equals torch.optim.AdamW's under the same scaler."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate import Accelerator

    Accelerator(cpu=True)  # (the state AcceleratedOptimizer reads)
    runs = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=0.1)), ("ours", lambda ps: mf.AdamW(ps, lr=0.1))):
        model = _model(dtype=torch.float64)
        inner = make(model.parameters())
        if name == "ours":
            inner._step_supports_amp_scaling = False
        opt = AcceleratedOptimizer(inner, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
        sched = AcceleratedScheduler(torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5), opt)
        skipped = []
        for t, (x, y) in enumerate(_data(4, torch.float64)):
            opt.zero_grad()
            opt.scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if t == 1:
                next(model.parameters()).grad[0, 0] = float("inf")
            opt.step()
            sched.step()
            skipped.append(opt.step_was_skipped)
        runs[name] = (skipped, inner.param_groups[0]["lr"], [p.detach().clone() for p in model.parameters()])
    assert runs["ours"][0] == runs["torch"][0] == [False, True, False, False]
    assert runs["ours"][1] == runs["torch"][1] == 0.1 * 0.5 ** 3
    for a, b in zip(runs["ours"][2], runs["torch"][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(bool(_HF_MISSING), reason=f"needs {' and '.join(_HF_MISSING)} (pip install -r requirements-dev.txt)")
@pytest.mark.parametrize("optimizer", ["adamw", "sf_adamw"])
def test_hf_trainer_example(optimizer):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import hf_trainer
    finally:
        sys.path.pop(0)
    model0 = None
    steps = 4
    out = hf_trainer.main(steps=steps, optimizer=optimizer)
    opt, model = out["optimizer"], out["model"]
    assert len(out["losses"]) == steps and all(torch.isfinite(torch.tensor(out["losses"])))
    # Trainer stepped OUR optimizer, once per training step
    assert isinstance(opt, (mf.AdamW, mf.AdamWScheduleFree))
    counts = {float(st["step"]) for st in opt.state.values() if "step" in st}
    if optimizer == "adamw":
        assert counts == {float(steps)}
        # and the lr each step used is the WSD schedule's (warmup 1, stable 2, decay 1)
        assert out["lrs"] == pytest.approx([3e-3 * mf.schedules.wsd_factor(s, 1, 2, 1) for s in range(steps)])
    else:
        assert opt.param_groups[0]["k"] == steps and opt.state  # schedule-free counts steps in the group
    del model0, model


def test_lr_scheduler_order_warning_still_works():
    """FusedOptimizer.step carries the LR scheduler's 'already tracked' mark (so that the scheduler does
    not wrap it in a dynamo-skipped function) and records its calls itself: the scheduler's warning about
    calling scheduler.step() before optimizer.step() must still fire, and only then."""
    import warnings

    for call_opt_first in (False, True):
        model = _model()
        opt = mf.AdamW(model.parameters(), lr=1e-2)
        sched = lrs.StepLR(opt, step_size=1)
        assert opt.step.__func__ is not None and getattr(opt.step, "_wrapped_by_lr_sched", False)
        if call_opt_first:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sched.step()
        order = [x for x in w if "before `optimizer.step()`" in str(x.message)]
        assert bool(order) == (not call_opt_first), [str(x.message) for x in w]


def test_compile_capturable_example_runs():
    """examples/compile_capturable.py (CPU part): a compiled train step whose optimizer step is traced; the
    example itself asserts that no graph break comes from momentum_fused."""
    import subprocess

    here = os.path.join(os.path.dirname(__file__), "..")
    res = subprocess.run([sys.executable, "examples/compile_capturable.py"], cwd=here, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "graph breaks from momentum_fused: 0" in res.stdout


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend")
def test_fsdp2_muon_example_runs_and_resumes_bit_for_bit():
    """examples/fsdp2_muon.py: 2 gloo processes, fully_shard, Muon + aux AdamW, a torch.distributed.checkpoint round
    trip; the example exits nonzero unless the resumed steps equal the uninterrupted ones bit for bit."""
    import subprocess

    here = os.path.join(os.path.dirname(__file__), "..")
    res = subprocess.run([sys.executable, "examples/fsdp2_muon.py", "--steps", "4"], cwd=here, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "largest param difference to the uninterrupted run 0" in res.stdout
    # no warning, except one torch issues from its own files about its own code (torch 2.10's DCP writer calls the
    # deprecated tensor.storage(): "TypedStorage is deprecated", from torch/distributed/checkpoint/filesystem.py)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    ours = [ln for ln in res.stderr.splitlines() if "Warning" in ln and not ln.startswith(torch_dir)]
    assert not ours, res.stderr[-3000:]


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_compiled_muon_step_runs_eagerly_and_equals_eager(tensor_lr):
    """Muon (with an aux AdamW group) inside a compiled train step: its step is one graph break and runs
    eagerly, equal to the eager run bit for bit. The first compiled call raised AttributeError (an inner
    optimizer's plan traced halfway) before 2026-12-05."""
    from torch._dynamo.utils import counters
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        lr = torch.tensor(0.02) if tensor_lr else 0.02
        opt = mf.Muon([dict(params=[model[0].weight, model[2].weight], lr=lr),
                       dict(params=[model[0].bias, model[2].bias], use_muon=False)])
        sched = lrs.ExponentialLR(opt, gamma=0.7)
        step = _train_step_fn(model, opt)
        if compiled:
            step = torch.compile(step, fullgraph=False, backend="aot_eager")
        for x, y in _data(4):
            step(x, y)
            sched.step()
        runs.append((model, opt))
        if compiled:
            assert _our_breaks(counters) in ({"Muon.step"}, {"Muon._eager_step"}), dict(counters["graph_break"])
    (m_e, o_e), (m_c, o_c) = runs
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        assert torch.equal(a, b)
        for k, v in o_e.state[a].items():
            assert torch.equal(v, o_c.state[b][k]), k


def test_compiled_step_of_dtensor_params_runs_eagerly(one_rank_mesh):
    """A capturable group of DTensor params (FSDP2) with a tensor lr inside torch.compile: the traced bucket op
    takes local shards, so the step is not traced (one graph break, eager, equal to the eager run); it raised
    in the fake-tensor call before 2026-12-05."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch._dynamo.utils import counters
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), one_rank_mesh, [Shard(0)]))]
        opt = mf.AdamW(ps, lr=torch.tensor(1e-2), capturable=True)

        def step():
            ps[0].grad = distribute_tensor(torch.ones(4, 3), one_rank_mesh, [Shard(0)])
            opt.step()
        f = torch.compile(step, fullgraph=False, backend="aot_eager") if compiled else step
        for _ in range(3):
            f()
        out.append(ps[0].detach().full_tensor())
        if compiled:
            assert "FusedOptimizer._eager_step" in _our_breaks(counters)
    assert torch.equal(out[0], out[1])


# ---------------------------------------------------------------- GradScaler review, 2026-12-05
@pytest.mark.skipif(_CPU_STATUS != "available", reason=f"cpu backend not built here: {_CPU_STATUS}")
def test_compiled_training_step_with_a_gradscaler_equals_eager():
    """A compiled step with GradScaler on a backend that reads found_inf on the host (cpu): the read broke the
    graph inside the update (AttributeError at the first step, a bad scalars argument after an eager one) with
    the step counters already advanced. Such a step now runs eagerly (one graph break), equal to eager."""
    torch._logging.set_logs(graph_breaks=False)

    def make():
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for q in model.parameters():
                q.copy_(torch.randn(q.shape, generator=g))
        return (model, mf.AdamW(model.parameters(), lr=torch.tensor(0.01), backend="cpu"),
                torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000))

    def train_step(model, opt, scaler, x, inf):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        if inf:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    xs = [torch.randn(8, 4, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    infs = [False, False, True, False, False]
    ref, got = make(), make()
    compiled = torch.compile(train_step, backend="aot_eager")
    for x, inf in zip(xs, infs):
        train_step(*ref, x, inf)
        compiled(*got, x, inf)
    for a, b in zip(got[0].parameters(), ref[0].parameters()):
        assert torch.equal(a, b)
    assert float(got[1].state[got[0].weight]["step"]) == float(ref[1].state[ref[0].weight]["step"]) == 4.0


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _CPU_STATUS == "available" else []))
@pytest.mark.parametrize("which", ["SGD", "Muon"])
def test_a_step_that_raises_does_not_leave_gradscalers_attributes(which, backend):
    """GradScaler deletes ``grad_scale`` / ``found_inf`` only after the step returns: a refused step (a bad lr
    the user then fixes) left them, and every later step divided its gradients by the stale scale."""
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = mf.SGD([p], lr=0.1, backend=backend) if which == "SGD" else mf.Muon([p], lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.param_groups[0]["lr"] = -1.0
    scaler.scale(p.sum()).backward()
    with pytest.raises(ValueError, match="lr"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


@pytest.mark.parametrize("refusal", ["eval_mode", "polyak_without_closure", "closure_raises"])
def test_a_refused_schedule_free_step_does_not_leave_gradscalers_attributes(refusal):
    """Schedule-free's own refusals (eval mode, lr="polyak" without a closure) ran before FusedOptimizer's step,
    which drops GradScaler's attributes, and so did a closure that raised: the retried step divided its gradients
    by the scale twice, or a stale found_inf skipped every later plain step (a review, 2026-12-08)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = mf.SGDScheduleFree([p], lr="polyak" if refusal == "polyak_without_closure" else 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(p.sum()).backward()
    if refusal == "eval_mode":
        opt.eval()
    with pytest.raises((RuntimeError, ValueError)):
        if refusal == "closure_raises":
            scaler.step(opt, lambda: (_ for _ in ()).throw(RuntimeError("the user's closure")))
        else:
            scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


def test_adamtied_under_cycled_momentum_names_the_fix():
    """OneCycleLR with its default cycle_momentum=True writes betas[0] only, so AdamTied's next step refuses the
    untied betas (2026-12-06 review): the error says to pass cycle_momentum=False; with it the schedule runs."""
    p = torch.zeros(3, requires_grad=True)
    opt = mf.AdamTied([p], lr=1e-3, beta=0.9)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # betas (0.95, 0.9) at once
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        opt.step()
    opt2 = mf.AdamTied([p], lr=1e-3, beta=0.9)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1e-2, total_steps=10, cycle_momentum=False)
    for _ in range(5):
        opt2.step()
        sched2.step()


def test_a_step_inside_an_autocast_region_computes_as_outside():
    """A training loop that steps inside ``torch.autocast`` ran Muon's Newton-Schulz products with
    ``ns_dtype=torch.float32``, and the low-rank steps' products, in bf16 (a review, 2026-12-08); the caller's
    autocast is off for the step (torch.optim.Muon's bf16 NS is unaffected either way)."""
    from momentum_fused.lowrank import LowRankAdam, LowRankLinear

    def run(autocast, make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), LowRankLinear(32, 24, rank=4, max_rank=8))
        opt = make(model)
        for _ in range(3):
            model(torch.randn(5, 16)).square().sum().backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    muon = lambda m: mf.Muon([dict(params=[m[0].weight]), dict(params=[m[0].bias], use_muon=False)], lr=0.02,
                             ns_dtype=torch.float32)
    for make in (muon, lambda m: LowRankAdam(m[1].parameters(), lr=0.01)):
        assert torch.equal(run(False, make), run(True, make))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), LowRankLinear(32, 24, rank=4, max_rank=8))
    seen = []  # a closure's forward keeps the caller's autocast, as in torch's optimizers

    def closure():
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(torch.randn(5, 16)).float().square().sum()

    for opt in (torch.optim.SGD(model[0].parameters(), lr=0.1), mf.SGD(model[0].parameters(), lr=0.1), muon(model),
                LowRankAdam(model[1].parameters(), lr=0.01)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step(closure)
    assert seen == [True] * 4
