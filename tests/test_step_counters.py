"""Per-tensor step counters: the optimizer advances a group's counters together (one add on a
shared buffer while the same tensors keep stepping). Whatever the pattern of missing gradients,
replaced counters or reloaded state, every tensor's count and update must equal torch.optim's."""
import copy

import pytest
import torch

import momentum_fused as mf


# torch keeps NAdam's mu_product in the default dtype; float64 makes it comparable with ours.
pytestmark = pytest.mark.usefixtures("default_f64")


def _pair(cls, tcls, n=4, **kw):
    torch.manual_seed(0)
    ours = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs, cls(ours, **kw), tcls(theirs, **kw)


def _same_grads(ours, theirs):
    for a, b in zip(ours, theirs):
        g = torch.randn(a.shape, dtype=torch.float64)
        a.grad, b.grad = g, g.clone()


def _assert_same(ours, theirs, o, t):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        sa, sb = o.state.get(a, {}), t.state.get(b, {})
        assert set(sa) == set(sb)
        for k in sb:
            torch.testing.assert_close(torch.as_tensor(sa[k]).double(), torch.as_tensor(sb[k]).double(), rtol=0,
                                       atol=1e-14)


@pytest.mark.parametrize("cls,tcls", [(mf.Adam, torch.optim.Adam), (mf.NAdam, torch.optim.NAdam),
                                      (mf.RMSprop, torch.optim.RMSprop)])
def test_changing_sets_of_gradients(cls, tcls):
    ours, theirs, o, t = _pair(cls, tcls, lr=0.1)
    patterns = [(0, 1, 2, 3), (0, 1, 2, 3), (1, 3), (0, 1, 2, 3), (2,), (), (0, 2), (0, 1, 2, 3), (0, 1, 2, 3)]
    for step, have in enumerate(patterns):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = torch.randn(5, dtype=torch.float64) if i in have else None
            a.grad, b.grad = g, (None if g is None else g.clone())
        o.step()
        t.step()
        _assert_same(ours, theirs, o, t)
    assert [float(o.state[p]["step"]) for p in ours] == [6.0, 6.0, 7.0, 6.0]


def test_replaced_counter_and_deepcopy_continue_correctly():
    ours, theirs, o, t = _pair(mf.Adam, torch.optim.Adam, lr=0.1)
    for step in range(6):
        _same_grads(ours, theirs)
        if step == 3:  # a user resets one counter by assigning a new tensor
            o.state[ours[1]]["step"] = torch.tensor(10.0)
            t.state[theirs[1]]["step"] = torch.tensor(10.0)
        if step == 4:  # a deepcopy steps on its own counters, never on the original's
            o2 = copy.deepcopy(o)
            assert all(o2.state[p2]["step"] is not o.state[p]["step"]
                       for p, p2 in zip(ours, o2.param_groups[0]["params"]))
            for p2 in o2.param_groups[0]["params"]:
                p2.grad = torch.zeros_like(p2)
            o2.step()
        o.step()
        t.step()
        _assert_same(ours, theirs, o, t)
    assert float(o.state[ours[1]]["step"]) == 13.0


def test_counters_after_load_state_dict_are_independent():
    ours, theirs, o, t = _pair(mf.Adam, torch.optim.Adam, lr=0.1)
    for _ in range(3):
        _same_grads(ours, theirs)
        o.step()
        t.step()
    sd = o.state_dict()
    o.load_state_dict(copy.deepcopy(sd))
    for _ in range(3):
        _same_grads(ours, theirs)
        o.step()
        t.step()
        _assert_same(ours, theirs, o, t)
    # the state_dict taken earlier still says 3 steps
    assert all(float(s["step"]) == 3.0 for s in sd["state"].values())


@pytest.mark.parametrize("name", [n for n, s in mf.specs.SPECS.items() if s.advance_many is not None])
def test_advance_many_equals_advance_per_tensor(name):
    """A rule's vectorized pack computation (``advance_many``, NAdam) gives exactly the packs and the host
    state of its per-tensor ``advance``, with tensors at different steps and different products."""
    spec = mf.specs.SPECS[name]
    key, initial = spec.host_state
    group = dict(spec.defaults, lr=3e-3, momentum_decay=0.05)
    ts = [1.0, 1.0, 2.0, 7.0, 7.0, 130.0]
    start = [initial, initial, 0.73, 0.41, 0.41, 1e-9]
    fresh = [True, True, False, False, False, False]
    states = [{} if i < 2 else {key: torch.tensor(v, dtype=torch.float64)} for i, v in enumerate(start)]
    one = [spec.advance(group, st, f, t) for st, f, t in zip(states, fresh, ts)]
    values = torch.tensor(start, dtype=torch.float64)
    many = spec.advance_many(group, values, fresh, ts)
    assert many == one  # exact: the same IEEE operations
    assert values.tolist() == [float(st[key]) for st in states]
    assert many[0] is many[1] and many[3] is many[4]  # equal (t, host state): one shared pack
