"""Our optimizers against the public packages whose conventions they follow (installed by
requirements-dev.txt): lion-pytorch (Lion), qhoptim (QHM), facebookresearch's schedulefree 1.4
(SGD/AdamW schedule-free), pytorch-optimizer (SignSGD with momentum = our Signum, and signSGD). float64, >= 12 steps, params and every state tensor.
These packages modify .grad in place (weight decay), so each side gets its own gradient copy."""
import warnings

import pytest
import torch

import momentum_fused as mf
from tolerances import TOL

lion_pytorch = pytest.importorskip("lion_pytorch", reason="needs lion-pytorch (pip install -r requirements-dev.txt)")
qhoptim_pyt = pytest.importorskip("qhoptim.pyt", reason="needs qhoptim (pip install -r requirements-dev.txt)")
schedulefree = pytest.importorskip("schedulefree", reason="needs schedulefree (pip install -r requirements-dev.txt)")

STEPS = 12


def _params(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), ()][:n]
    ours = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs


def _grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


def _run(ours, theirs, o, t, state_map, steps=STEPS, after_step=None):
    for k in range(steps):
        for a, b, g in zip(ours, theirs, _grads(ours, k)):
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
        if after_step is not None:
            after_step(k)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
            for mine, theirs_key in state_map.items():
                torch.testing.assert_close(o.state[a][mine], t.state[b][theirs_key], **TOL[torch.float64])


@pytest.mark.parametrize("kw", [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
                                dict(lr=3e-2, betas=(0.95, 0.98), weight_decay=0.1)])
def test_lion_matches_lion_pytorch(kw):
    ours, theirs = _params()
    _run(ours, theirs, mf.Lion(ours, **kw), lion_pytorch.Lion(theirs, **kw), {"exp_avg": "exp_avg"})


@pytest.mark.parametrize("kw", [dict(lr=0.5, momentum=0.9, nu=0.7),
                                dict(lr=1.0, momentum=0.999, nu=0.7, weight_decay=0.01),
                                dict(lr=0.3, momentum=0.8, nu=0.5, weight_decay=0.05, weight_decay_type="direct")])
def test_qhm_matches_qhoptim(kw):
    ours, theirs = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # qhoptim uses torch's deprecated add_(Number, Tensor)
        _run(ours, theirs, mf.QHM(ours, **kw), qhoptim_pyt.QHM(theirs, **kw), {"momentum_buffer": "momentum_buffer"})


SF_CASES = [dict(), dict(warmup_steps=5), dict(warmup_steps=4, weight_decay=0.05, r=0.5),
            dict(weight_lr_power=1.0, r=1.0)]


@pytest.mark.parametrize("kw", SF_CASES)
def test_sgd_schedulefree_matches_upstream(kw):
    ours, theirs = _params()
    o = mf.SGDScheduleFree(ours, lr=0.5, momentum=0.9, **kw)
    t = schedulefree.SGDScheduleFree(theirs, lr=0.5, momentum=0.9, **kw)
    t.train()
    _run(ours, theirs, o, t, {"z": "z"})
    o.eval()
    t.eval()  # both now hold x
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert o.param_groups[0]["k"] == t.param_groups[0]["k"] == STEPS


def _two_groups(ps):
    """Per-group lr, warmup, weight decay and weight_lr_power (a peer review, 2026-12-06, found no test with more
    than one group): each group keeps its own k, lr_max and weight_sum, as upstream's."""
    return [dict(params=ps[:2], lr=2e-2, warmup_steps=3, weight_decay=0.05),
            dict(params=ps[2:], lr=5e-3, warmup_steps=0, weight_lr_power=1.0)]


@pytest.mark.parametrize("kw", SF_CASES + ["two groups"])
def test_adamw_schedulefree_matches_upstream(kw):
    ours, theirs = _params()
    make = (lambda ps: ps) if kw != "two groups" else _two_groups  # noqa: E731
    kw = {} if kw == "two groups" else kw
    o = mf.AdamWScheduleFree(make(ours), lr=2e-2, betas=(0.9, 0.99), **kw)
    t = schedulefree.AdamWScheduleFree(make(theirs), lr=2e-2, betas=(0.9, 0.99), **kw)
    t.train()
    _run(ours, theirs, o, t, {"z": "z", "exp_avg_sq": "exp_avg_sq"})
    o.eval()
    t.eval()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    for go, gt in zip(o.param_groups, t.param_groups):
        assert go["k"] == gt["k"] == STEPS
        for key in ("lr_max", "weight_sum"):
            assert go[key] == pytest.approx(gt[key], rel=1e-12), key


def test_schedulefree_under_a_decaying_scheduler_matches_upstream_lr_max_rule():
    """Upstream's rule is weight_rule='lr_max'; under a decaying schedule ours must still match it."""
    ours, theirs = _params()
    o = mf.AdamWScheduleFree(ours, lr=2e-2, warmup_steps=3)
    t = schedulefree.AdamWScheduleFree(theirs, lr=2e-2, warmup_steps=3)
    t.train()
    so = torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 if s < 5 else 0.5 ** (s - 4))
    st = torch.optim.lr_scheduler.LambdaLR(t, lambda s: 1.0 if s < 5 else 0.5 ** (s - 4))

    def sched(_):
        so.step()
        st.step()

    _run(ours, theirs, o, t, {"z": "z", "exp_avg_sq": "exp_avg_sq"}, after_step=sched)


@pytest.mark.parametrize("kw", [dict(lr=1e-2, momentum=0.9), dict(lr=3e-2, momentum=0.8, weight_decay=0.1),
                                dict(lr=1e-2, momentum=0.9, weight_decay=0.05, maximize=True),
                                dict(lr=1e-2, momentum=0.0, weight_decay=0.1)])
@pytest.mark.parametrize("foreach", [False, True])
def test_signum_matches_pytorch_optimizer_signsgd(kw, foreach):
    """pytorch-optimizer's SignSGD is Signum with momentum > 0 (m <- beta m + (1 - beta) g, decoupled weight
    decay, sign(0) = 0) and signSGD with momentum 0 (no state)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer",
                                            reason="needs pytorch-optimizer (pip install -r requirements-dev.txt)")
    ours, theirs = _params()
    o = mf.Signum(ours, **kw) if kw["momentum"] else mf.SignSGD(ours, **{k: v for k, v in kw.items()
                                                                        if k != "momentum"})
    t = pytorch_optimizer.SignSGD(theirs, weight_decouple=True, foreach=foreach, **kw)
    _run(ours, theirs, o, t, {"momentum_buffer": "momentum_buffer"} if kw["momentum"] else {})
