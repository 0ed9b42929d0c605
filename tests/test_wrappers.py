"""What a review of the optimizer's lifecycle found on 2026-12-05 in the wrappers, which step inner optimizers
(Muon: _MuonCore + AdamW; LowRankSGD/LowRankAdam: the dense params' optimizer); each test failed before its fix:
torch's global step hooks ran for the inner optimizers too (2-3 calls per step, a hook's edit applied twice), a
replaced ``state`` mapping or edited ``param_groups`` were not followed (torch's optimizers read both at every
step), and the low-rank optimizers did not survive a deep copy or a pickle (their settings were lost). The test of
a group's kind after a reorder pins behaviour that held before."""
from __future__ import annotations

import copy
import io
import pickle
from collections import defaultdict

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import momentum_fused as mf
from momentum_fused.lowrank import LowRankLinear, LowRankSGD, LowRankAdam


# ---------------------------------------------------------------- Muon and the low-rank optimizers
def _muon_model(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(8, 6, requires_grad=True), torch.randn(6, 4, requires_grad=True),
            torch.randn(5, 5, requires_grad=True), torch.randn(6, requires_grad=True)]


def _grads(ps, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_global_step_hooks_fire_once_per_user_step():
    seen = []
    h = register_optimizer_step_pre_hook(lambda opt, a, kw: seen.append(type(opt).__name__))
    try:
        ps = _muon_model()
        opt = mf.Muon([{"params": ps[:2]}, {"params": ps[3:], "use_muon": False}], lr=0.02)
        _grads(ps, 0)
        opt.step()
        layer = LowRankLinear(12, 10, 2, 4)
        lin = torch.nn.Linear(10, 3)
        lo = LowRankSGD(list(layer.parameters()) + list(lin.parameters()), lr=0.05, momentum=0.9)
        lin(layer(torch.randn(8, 12))).square().mean().backward()
        lo.step()
    finally:
        h.remove()
    assert seen == ["Muon", "LowRankSGD"]


def test_muon_follows_edits_of_param_groups_as_torch():
    """The inner optimizers were built once: a param appended to a group was never updated, a deleted group's
    params still were, reordered groups swapped their learning rates."""
    edits = {
        "append": lambda opt, ps: opt.param_groups[0]["params"].append(ps[2]),
        "replace": lambda opt, ps: opt.param_groups[0].__setitem__("params", [ps[2]]),
        "delete": lambda opt, ps: opt.param_groups.pop(1),
        "reverse": lambda opt, ps: opt.param_groups.reverse(),
    }
    for name, edit in edits.items():
        runs = []
        for cls in (torch.optim.Muon, mf.Muon):
            ps = _muon_model()
            opt = cls([{"params": [ps[0]], "lr": 0.02}, {"params": [ps[1]], "lr": 0.05}], lr=0.02)
            for k in range(4):
                if k == 2:
                    edit(opt, ps)
                _grads(ps, k)
                opt.step()
            runs.append([p.detach().clone() for p in ps[:3]])
        for x, y in zip(*runs):
            torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)


def test_muon_kind_of_a_group_stays_fixed_after_a_reorder():
    ps = _muon_model()
    opt = mf.Muon([{"params": ps[:2]}, {"params": ps[3:], "use_muon": False}], lr=0.02)
    _grads(ps, 0)
    opt.step()
    opt.param_groups.reverse()
    opt.param_groups[1]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon changed"):
        opt.step()


def test_muon_rejects_a_vector_appended_to_a_muon_group_and_keeps_stepping():
    ps = _muon_model()
    opt = mf.Muon([{"params": ps[:2]}], lr=0.02)
    _grads(ps, 0)
    opt.step()
    opt.param_groups[0]["params"].append(ps[3])
    _grads(ps, 1)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="Muon param group 0: param 2 has shape"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    opt.param_groups[0]["params"].pop()
    opt.step()


@pytest.mark.parametrize("wrapper", ["muon", "lowrank"])
def test_a_replaced_state_mapping_is_the_one_stepped_and_saved(wrapper):
    """``opt.state = defaultdict(dict)`` (a reset used by some training loops): the inner optimizers kept the old
    mapping, so momentum was not reset and later checkpoints dropped it."""
    if wrapper == "muon":
        ps = _muon_model()
        make = lambda: mf.Muon([{"params": ps[:2]}, {"params": ps[3:], "use_muon": False}], lr=0.02)  # noqa: E731
        step = lambda k: (_grads(ps, k), opt.step())  # noqa: E731
    else:
        torch.manual_seed(0)
        m = torch.nn.Sequential(LowRankLinear(12, 10, 2, 4), torch.nn.Linear(10, 3))
        X = torch.randn(8, 12)
        make = lambda: LowRankSGD(m.parameters(), lr=0.05, momentum=0.9)  # noqa: E731
        step = lambda k: (opt.zero_grad(), m(X).square().mean().backward(), opt.step())  # noqa: E731
    opt = make()
    step(0)
    step(1)
    n = len(opt.state_dict()["state"])
    opt.state = defaultdict(dict)
    step(2)
    assert len(opt.state_dict()["state"]) == n
    inners = [i for i in (getattr(opt, "_core", None), getattr(opt, "_aux", None), getattr(opt, "_inner", None))
              if i is not None]
    assert inners and all(i.state is opt.state for i in inners)


@pytest.mark.parametrize("cls", [LowRankSGD, LowRankAdam])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "pickle-optimizer-first"])
def test_lowrank_optimizers_survive_a_copy(cls, how):
    torch.manual_seed(0)
    m = torch.nn.Sequential(LowRankLinear(12, 10, 2, 4), torch.nn.Linear(10, 3))
    kw = dict(lr=0.05, momentum=0.9) if cls is LowRankSGD else dict(lr=0.01)
    opt = cls(m.parameters(), tau=0.2, r_min=2, **kw)
    X = torch.randn(8, 12)

    def step(model, o):
        o.zero_grad()
        model(X).square().mean().backward()
        o.step()

    step(m, opt)
    if how == "deepcopy":
        d = copy.deepcopy({"m": m, "o": opt})
    else:
        buf = io.BytesIO()
        obj = {"o": opt, "m": m} if how == "pickle-optimizer-first" else {"m": m, "o": opt}
        torch.save(obj, buf)
        buf.seek(0)
        d = torch.load(buf, weights_only=False)
    assert (d["o"].tau, d["o"].r_min) == (0.2, 2)
    for _ in range(3):
        step(m, opt)
        step(d["m"], d["o"])
    for x, y in zip(m.parameters(), d["m"].parameters()):
        assert torch.equal(x, y)
    assert pickle.loads(pickle.dumps(d["o"].state_dict()))["param_groups"] == opt.state_dict()["param_groups"]


# ---------------------------------------------------------------- found by a second review, of the fixes above
def test_muon_add_param_group_after_an_edit_of_the_groups():
    """add_param_group recorded the edited groups as built without rebuilding: after ``param_groups.pop(0)`` the
    removed group's params were still stepped and the new group took the wrong inner group's settings."""
    runs = []
    for cls in (torch.optim.Muon, mf.Muon):
        ps = _muon_model()
        opt = cls([{"params": [ps[0]], "lr": 0.02}, {"params": [ps[1]], "lr": 0.05}], lr=0.02)
        _grads(ps, 0)
        opt.step()
        opt.param_groups.pop(0)
        opt.add_param_group({"params": [ps[2]], "lr": 0.03})
        for k in (1, 2):
            _grads(ps, k)
            opt.step()
        runs.append([p.detach().clone() for p in ps[:3]])
    for x, y in zip(*runs):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_muon_add_param_group_after_a_kind_change_is_refused():
    ps = _muon_model()
    opt = mf.Muon([{"params": ps[:2]}], lr=0.02)
    opt.param_groups[0]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon changed"):
        opt.add_param_group({"params": [ps[2]]})
    assert len(opt.param_groups) == 1


def test_lowrank_add_param_group_refused_by_the_dense_optimizer_adds_nothing():
    """The group's dense params refused by the inner optimizer left the group half added: every later step
    raised."""
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10, 2, 4)
    lin = torch.nn.Linear(10, 3)
    opt = LowRankSGD(list(layer.parameters()), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match="lr"):  # (a group setting the dense rule refuses)
        opt.add_param_group({"params": list(lin.parameters()), "lr": -0.05})
    assert len(opt.param_groups) == 1 and len(opt._layers) == 1
    opt.add_param_group({"params": list(lin.parameters())})
    lin(layer(torch.randn(8, 12))).square().mean().backward()
    opt.step()


@pytest.mark.skipif(mf.backends.status().get("cpu") != "available", reason="the cpu backend is not built")
def test_muon_error_names_this_optimizers_groups_everywhere_in_the_message():
    """An inner error naming two groups had only its first group index mapped to the Muon group's."""
    a = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(a.data)  # (two Parameters over one memory: refused by the compiled backends)
    v, c = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4, 4))
    opt = mf.Muon([{"params": [v], "use_muon": False}, {"params": [c]}, {"params": [a]}, {"params": [b]}],
                  lr=0.02, backend="cpu")
    for p in (v, c, a, b):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"^Muon: param 0 of group 2 \(shape \(8, 6\)\) and param 0 of group 3 "):
        opt.step()


# ---------------------------------------------------------------- a third review (of the GradScaler fix)
@pytest.mark.parametrize("error", [RuntimeError("launch failed"), KeyboardInterrupt()])
def test_muon_inner_step_errors_come_through_under_a_gradscaler(error, monkeypatch):
    """A raising inner step dropped the GradScaler attributes itself, and Muon's cleanup then deleted them again:
    the caller got AttributeError('grad_scale') instead of the error (an OOM, a Ctrl-C)."""
    ps = _muon_model()
    opt = mf.Muon([{"params": ps[:2]}, {"params": ps[3:], "use_muon": False}], lr=0.02)
    _grads(ps, 0)
    opt.step()

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(opt._aux, "_launch", boom)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for p in ps:
        p.grad = None
    scaler.scale(sum(p.sum() for p in ps[:2] + ps[3:])).backward()
    with pytest.raises(type(error)):
        scaler.step(opt)
    assert not any(k in i.__dict__ for i in (opt, opt._core, opt._aux) for k in ("grad_scale", "found_inf"))


def test_lowrank_errors_name_the_users_group():
    layer = LowRankLinear(12, 10, 2, 4)
    bias = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=r"^LowRankAdam param group 1: Invalid betas\[1\]"):
        LowRankAdam([{"params": list(layer.parameters())}, {"params": [bias], "betas": (0.9, 1.5)}], lr=0.01)
    opt = LowRankAdam([{"params": list(layer.parameters())}], lr=0.01)
    with pytest.raises(ValueError, match=r"^LowRankAdam param group 1: Invalid betas\[1\]"):
        opt.add_param_group({"params": [bias], "betas": (0.9, 1.5)})
