"""capturable=True on the Triton backend, in the interpreter: the scalar table computed on the device by
tensor ops (step counters on the device, a tensor lr read there) gives the ordinary run's results, and
one launch per step stays one launch. (CUDA-graph capture itself: tests/test_capturable.py, GPU.)"""
import pytest
import torch

import momentum_fused as mf
from tolerances import tol
from momentum_fused.triton_kernels import launcher

SHAPES = [(17,), (4097,), (), (0,), (3, 5)]
CASES = [(mf.AdamW, dict(lr=1e-2, weight_decay=0.1)), (mf.Adam, dict(lr=1e-2, amsgrad=True)),
         (mf.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)), (mf.RMSprop, dict(lr=1e-3, centered=True, momentum=0.5)),
         (mf.Lion, dict(lr=1e-3)), (mf.QHM, dict(lr=0.1))]


def _run(cls, kw, capturable):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    if capturable:
        kw = {**kw, "lr": torch.tensor(kw["lr"], dtype=torch.float64)}
    opt = cls(ps, backend="triton", capturable=capturable, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    launches = []
    for _ in range(10):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        before = launcher.launch_count()
        opt.step()
        launches.append(launcher.launch_count() - before)
        sched.step()
    return opt, ps, launches


@pytest.mark.parametrize("cls,kw", CASES, ids=[c[0].__name__ for c in CASES])
def test_capturable_equals_host_scalars(cls, kw):
    a, pa, la = _run(cls, kw, True)
    b, pb, _ = _run(cls, kw, False)
    assert la == [1] * 10
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, **tol(torch.float32))
        for k, v in b.state[q].items():
            w = a.state[p][k]
            if k == "step":
                assert w.device == p.device and float(w) == float(v)
            else:
                torch.testing.assert_close(w, v, **tol(torch.float32))


def test_compiled_step_is_traced_on_triton():
    """torch.compile traces the step (a tensor lr, a capturable rule): the Triton launch runs inside the
    momentum_fused::bucket_step op of the graph; no graph break from momentum_fused; equal to eager."""
    from torch._dynamo.utils import counters

    graphs = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        opt = mf.AdamW(model.parameters(), lr=torch.tensor(1e-2), backend="triton", capturable=not compiled)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)

        def step(x, y):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        if compiled:
            step = torch.compile(step, backend=record)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            step(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen))
            sched.step()
        runs.append((model, opt))
    assert not [r for r in counters["graph_break"] if "momentum_fused" in r or "FusedOptimizer" in r]
    assert any("momentum_fused.bucket_step" in g for g in graphs)
    (me, oe), (mc, oc) = runs
    for a, b in zip(me.parameters(), mc.parameters()):
        assert torch.equal(a, b)
        for k, v in oe.state[a].items():
            assert torch.equal(v, oc.state[b][k]), k
