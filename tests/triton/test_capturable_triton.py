"""capturable=True on the Triton backend, in the interpreter: the scalar table computed on the device by
tensor ops (step counters on the device, a tensor lr read there) gives the ordinary run's results, and
one launch per step stays one launch. (CUDA-graph capture itself: tests/test_capturable.py, GPU.)"""
import pytest
import torch

import momentum_fused as mf
from tolerances import tol
from triton_kernels import launcher

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
