"""What a review acting as a migrating user found on 2026-12-05, each test failing before its fix: partial state
(a key deleted, another optimizer's checkpoint) refused instead of completed with zeros; AdamW loading an Adam
checkpoint as AdamW; load hooks seeing and keeping what torch's do; a checkpoint that never changes a group's dtype
layout; a checkpoint of other params refused whole; master16 -> master rounding the tie params back; Muon's errors
naming the user's group and warning on keys a group's kind does not read; then the research optimizers', a
backend failing at launch, and configuration values that were silently ignored. (The three tests of states
switched on later pin the behaviour kept: they passed before.)"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import momentum_fused as mf
from optim_db import assert_snapshot_equal, snapshot


def _stepped(make, shapes=((8, 8), (5,)), steps=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    opt = make(ps)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, opt


# ---------------------------------------------------------------- partial state
@pytest.mark.parametrize("make, key", [
    (lambda ps: mf.AdamW(ps, lr=1e-2), "step"),
    (lambda ps: mf.AdamW(ps, lr=1e-2), "exp_avg_sq"),
    (lambda ps: mf.NAdam(ps, lr=1e-2), "mu_product"),
    (lambda ps: mf.RMSprop(ps, lr=1e-2), "square_avg"),
    (lambda ps: mf.Adam(ps, lr=1e-2, amsgrad=True), "exp_avg"),
])
def test_a_partial_state_raises_at_step_and_changes_nothing(make, key):
    ps, opt = _stepped(make)
    del opt.state[ps[0]][key]
    for p in ps:
        p.grad = torch.ones_like(p)
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=f"lacks \\['{key}'\\]"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, ps))
    opt.state.pop(ps[0])  # the documented way to restart a param: drop all of its state
    opt.step()
    assert float(opt.state[ps[0]].get("step", 1)) == 1.0


def test_a_partial_checkpoint_is_refused_at_load_with_nothing_loaded():
    ps, lion = _stepped(lambda ps: mf.Lion(ps, lr=1e-3))
    qs, adamw = _stepped(lambda ps: mf.AdamW(ps, lr=1e-2), seed=1)
    before = snapshot(adamw, qs)
    with pytest.raises(ValueError, match="lacks \\['exp_avg_sq', 'step'\\]"):
        adamw.load_state_dict(lion.state_dict())
    assert_snapshot_equal(before, snapshot(adamw, qs))
    sgd = torch.optim.SGD([torch.zeros(8, 8, requires_grad=True), torch.zeros(5, requires_grad=True)], lr=0.1,
                          momentum=0.9)
    for p in sgd.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(ValueError, match="momentum_buffer"):
        adamw.load_state_dict(sgd.state_dict())  # torch.optim.Adam would load it and fail at step
    assert_snapshot_equal(before, snapshot(adamw, qs))


@pytest.mark.parametrize("make, switch, key", [
    (lambda ps: mf.SGD(ps, lr=0.1), ("momentum", 0.9), "momentum_buffer"),
    (lambda ps: mf.Adam(ps, lr=1e-2), ("amsgrad", True), "max_exp_avg_sq"),
    (lambda ps: mf.RMSprop(ps, lr=1e-2), ("centered", True), "grad_avg"),
])
def test_a_state_switched_on_later_starts_as_at_a_first_step(make, switch, key):
    ps, opt = _stepped(make)
    opt.param_groups[0][switch[0]] = switch[1]
    opt.step()
    assert key in opt.state[ps[0]]


@pytest.mark.parametrize("layout", ["master", "master16", "master16_int8"])
def test_signum_momentum_switched_on_under_a_master_layout_starts_its_buffer(layout):
    # (a review, 2026-12-07: the master's state entry made the missing buffer a "partial state", refused at every
    # later step, where every other layout starts it; the fix it named, state.pop(param), lost the master's low
    # bits). The master then follows fp32 Signum on fp32 params (int8_state's for master16_int8), the same switch at
    # the same step.
    g = torch.Generator().manual_seed(3)
    init = torch.randn(4096, generator=g).bfloat16()
    grads = [torch.randn(4096, generator=g).bfloat16() for _ in range(5)]
    p, q = init.clone().requires_grad_(), init.float().requires_grad_()
    ours = mf.Signum([p], lr=1e-2, momentum=0.0, weight_decay=0.1, layout=layout)
    fp32 = mf.Signum([q], lr=1e-2, momentum=0.0, weight_decay=0.1, layout="int8_state" if "int8" in layout else None)
    for i, gr in enumerate(grads):
        if i == 2:
            for opt in (ours, fp32):
                opt.param_groups[0]["momentum"] = 0.9
        p.grad, q.grad = gr, gr.float()
        ours.step()
        fp32.step()
    st = ours.state[p]
    assert "momentum_buffer" in st
    master = st["master"] if layout == "master" else mf.layouts.master16_decode(p.detach(), st["master_lo"])
    assert torch.equal(master, q.detach())


# ---------------------------------------------------------------- checkpoints
def test_adamw_loads_an_adam_checkpoint_as_adamw_as_torch_does():
    res = []
    for cls in (torch.optim.AdamW, mf.AdamW):
        p = torch.ones(3, requires_grad=True)
        adam = torch.optim.Adam([p], lr=0.1, weight_decay=0.5)
        p.grad = torch.ones(3)
        adam.step()
        q = torch.ones(3, requires_grad=True)
        opt = cls([q], lr=0.1, weight_decay=0.5)
        opt.load_state_dict(adam.state_dict())
        assert opt.param_groups[0]["decoupled_weight_decay"] is True
        q.grad = torch.ones(3)
        opt.step()
        res.append(q.detach().clone())
    assert torch.equal(res[0], res[1])


@pytest.mark.parametrize("torch_cls, cls", [(torch.optim.Adam, mf.Adam), (torch.optim.NAdam, mf.NAdam)])
def test_load_hooks_see_and_keep_what_torch_hooks_do(torch_cls, cls):
    def pre(opt, sd):
        sd = copy.deepcopy(sd)
        sd["state"][0]["step"] = torch.tensor(100.0)
        return sd

    def post(opt):
        for st in opt.state.values():
            st["step"] = torch.tensor(7.0)

    out = []
    for c in (torch_cls, cls):
        (p,), opt = _stepped(lambda ps: c(ps, lr=0.1), shapes=((3,),))
        sd = opt.state_dict()
        steps = []
        for hooks in ((pre, None), (None, post), (pre, post)):
            q = torch.ones(3, requires_grad=True)
            o = c([q], lr=0.1)
            if hooks[0]:
                o.register_load_state_dict_pre_hook(hooks[0])
            if hooks[1]:
                o.register_load_state_dict_post_hook(hooks[1])
            o.load_state_dict(sd)
            steps.append(float(o.state[q]["step"]))
        out.append(steps)
    assert out[0] == out[1] == [100.0, 7.0, 7.0]


@pytest.mark.parametrize("src, dst, dtype", [
    ("native", "master16", torch.bfloat16), ("native", "master", torch.bfloat16), ("master", "native", torch.bfloat16),
    ("bf16_sr", "master16", torch.bfloat16), ("bf16_state", "native", torch.float32),
    ("native", "bf16_state", torch.float32)])
def test_a_checkpoint_never_changes_the_layout(src, dst, dtype):
    (p,), a = _stepped(lambda ps: mf.AdamW(ps, lr=1e-2, layout=src), shapes=((512,),), dtype=dtype)
    q = p.detach().clone().requires_grad_()
    b = mf.AdamW([q], lr=1e-2, layout=dst)
    b.load_state_dict(a.state_dict())
    assert b.param_groups[0]["layout"] == dst
    want = mf.layouts.get_layout(dst)
    for key in ("exp_avg", "exp_avg_sq"):
        assert b.state[q][key].dtype == (dtype if dst == "native" else want.dtype_of(key, dtype))
    assert not ({"master", "master_lo"} - set(want.extra_keys)) & set(b.state[q])
    q.grad = torch.ones_like(q)
    b.step()
    # the layout's own keys start from the param as at a first step: the master equals the param it came from
    if dst == "master":
        assert torch.equal(b.state[q]["master"].to(dtype), q.detach())


def test_master16_to_master_keeps_the_tie_params_until_the_first_step():
    master = torch.full((256,), 1.0 + 2.0 ** -8)  # a tie between two bf16 values: the odd one is 1 + 2^-7
    p = torch.zeros(256, dtype=torch.bfloat16, requires_grad=True)
    a = mf.SGD([p], lr=0.0, layout="master16")
    hi, lo = mf.layouts.master16_encode(master)
    with torch.no_grad():
        p.copy_(hi.view(p.shape))
    p.grad = torch.zeros_like(p)
    a.step()
    a.state[p]["master_lo"].copy_(lo.view(p.shape))
    assert p[0].item() == 1.0 + 2.0 ** -7  # master16: the tie rounded away from zero
    q = p.detach().clone().requires_grad_()
    b = mf.SGD([q], lr=0.0, layout="master")
    b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict())  # (the same master: the load does not write the param)
    assert torch.equal(b.state[q]["master"], master)
    assert torch.equal(q.detach(), p.detach())  # as loaded: master16's rounding, ties away
    q.grad = torch.zeros_like(q)
    b.step()  # (the first step's check takes that rounding as the master's)
    assert torch.equal(b.state[q]["master"], master)
    assert torch.equal(q.detach(), master.to(torch.bfloat16))  # nearest even: 1.0


def test_a_checkpoint_of_other_params_is_refused_whole():
    ps, a = _stepped(lambda ps: mf.AdamW(ps, lr=1e-2, layout="int8_state"), shapes=((4096,), (8192,)))
    qs = [torch.zeros(4096, requires_grad=True), torch.zeros(8448, requires_grad=True)]
    b = mf.AdamW(qs, lr=0.123)
    for q in qs:
        q.grad = torch.ones_like(q)
    b.step()
    before = snapshot(b, qs)
    with pytest.raises(ValueError, match="state 'exp_avg' has shape \\(8192,\\).*Nothing was loaded"):
        b.load_state_dict(a.state_dict())
    assert_snapshot_equal(before, snapshot(b, qs))
    assert b.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize("make", [lambda ps: mf.AdamW(ps, lr=1e-2), lambda ps: mf.SGD(ps, lr=1e-2, momentum=0.9),
                                  lambda ps: mf.AdamW(ps, lr=1e-2, layout="int8_state"),
                                  lambda ps: mf.Muon([dict(params=ps[:1]), dict(params=ps[1:], use_muon=False)])],
                         ids=["adamw", "sgd", "adamw-int8", "muon"])
def test_a_key_the_optimizer_does_not_know_loads_as_torch_loads_it(make):
    """A tensor of any shape that user code keeps in a param's state (a 0-d running norm) is saved, loaded
    and kept, as torch.optim does: the size check covers the optimizer's param-shaped keys only (before
    2026-12-06 it refused the whole checkpoint, a review found)."""
    shapes = ((64, 64), (4096,))
    ps, a = _stepped(make, shapes=shapes)
    a.state[ps[0]]["grad_norm_ema"] = torch.tensor(0.5)
    a.state[ps[1]]["seen"] = torch.ones(3, dtype=torch.int64)
    qs = [torch.zeros(s, requires_grad=True) for s in shapes]
    b = make(qs)
    b.load_state_dict(a.state_dict())
    assert float(b.state[qs[0]]["grad_norm_ema"]) == 0.5 and b.state[qs[1]]["seen"].tolist() == [1, 1, 1]
    for q in qs:
        q.grad = torch.ones_like(q)
    b.step()


# ---------------------------------------------------------------- Muon's groups
def test_muon_errors_name_the_users_group():
    w = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    opt = mf.Muon([dict(params=[b], use_muon=False), dict(params=[w])])
    w.grad, b.grad = torch.ones(4, 4), torch.ones(4)
    opt.param_groups[1]["momentum"] = 2.0
    with pytest.raises(ValueError, match="^Muon param group 1: Invalid momentum"):
        opt.step()
    opt.param_groups[1]["momentum"] = 0.95
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="^Muon \\(use_muon=False group, AdamW\\) param group 0: Invalid lr"):
        opt.step()
    v = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="^Muon: param 1 of the new param group is param 0 again"):
        opt.add_param_group(dict(params=[v, v]))
    assert len(opt.param_groups) == 2


def test_muon_warns_on_keys_a_groups_kind_does_not_read():
    w = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with pytest.warns(UserWarning) as rec:
        mf.Muon([dict(params=[w], betas=(0.9, 0.95), weight_decy=0.1),
                 dict(params=[b], use_muon=False, momentum=0.9, betaz=(0.9, 0.9))])
    msgs = " | ".join(str(r.message) for r in rec)
    assert "group 0: key 'betas' is an AdamW hyperparameter" in msgs
    assert "group 0: key 'weight_decy'" in msgs and "did you mean 'weight_decay'" in msgs
    assert "group 1: key 'momentum' is a Muon hyperparameter" in msgs and "betas[0]" in msgs
    assert "group 1: key 'betaz'" in msgs and "did you mean 'betas'" in msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference MuonWithAuxAdam's own keys, and carried extras: silent
        mf.Muon([dict(params=[w], lr=0.02, name="matrices"),
                 dict(params=[b], use_muon=False, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)])


# ---------------------------------------------------------------- research optimizers (second review)
def test_adamtied_refuses_untied_betas_at_step_and_load():
    """Untied betas were refused by the constructor and add_param_group only: an edited group or an Adam
    checkpoint ran plain Adam until gradient_snr() raised."""
    (p,), opt = _stepped(lambda ps: mf.AdamTied(ps, lr=1e-2, beta=0.9), shapes=((6,),))
    opt.param_groups[0]["betas"] = (0.9, 0.95)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match="param group 0: betas must be equal"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, [p]))
    opt.param_groups[0]["betas"] = (0.9, 0.9)
    before = snapshot(opt, [p])
    adam = torch.optim.Adam([torch.zeros(6, requires_grad=True)])
    with pytest.raises(ValueError, match="load_state_dict: param group 0: betas must be equal"):
        opt.load_state_dict(adam.state_dict())
    assert_snapshot_equal(before, snapshot(opt, [p]))
    calls = []  # torch's step hooks run once (AdamTied does not override step, which torch wraps per class)
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    mf.Adam([torch.zeros(2, requires_grad=True)])  # an Adam instance: torch wraps Adam.step too
    opt.step()
    assert calls == [1]


def test_lowrank_from_dense_draws_nothing_from_the_global_rng():
    from momentum_fused import lowrank
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    want = torch.rand(3)
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    dense = copy.deepcopy(net)
    lowrank.convert(net, rank=2)
    assert torch.equal(torch.rand(3), want)
    layer = net[0]
    u, s, vh = torch.linalg.svd(dense[0].weight.detach().double())
    assert torch.allclose(layer.weight.double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-6)
    assert torch.equal(layer.bias, dense[0].bias)


def test_schedulefree_accepts_foreach_as_schedule_free_does():
    p = torch.zeros(3, requires_grad=True)
    for cls in (mf.SGDScheduleFree, mf.AdamWScheduleFree):
        opt = cls([p], lr=0.1, foreach=True)
        assert "foreach" not in opt.defaults


# ---------------------------------------------------------------- a backend that fails at launch
@pytest.mark.parametrize("make, dtype", [
    (lambda ps: mf.AdamW(ps, lr=1e-2), torch.float32), (lambda ps: mf.NAdam(ps, lr=1e-2), torch.float32),
    (lambda ps: mf.SGD(ps, lr=0.1, momentum=0.9), torch.float32),
    (lambda ps: mf.Lion(ps, lr=1e-3, layout="bf16_sr"), torch.bfloat16),
    (lambda ps: mf.SGDScheduleFree(ps, lr=0.3, warmup_steps=10), torch.float32),
    (lambda ps: mf.AdamWScheduleFree(ps, lr=0.02, warmup_steps=10), torch.float32),
    (lambda ps: mf.SGDScheduleFree(ps, lr="polyak", polyak_max_lr=1.0), torch.float32),
    (lambda ps: mf.FSGDM(ps, lr=0.1), torch.float32)])
def test_a_backend_failing_at_launch_changes_nothing(make, dtype, monkeypatch):
    """The first backend call raised after the host counters had advanced (a forced Triton backend with a bad
    knob did, 2026-12-05): the failed step left ``step`` (NAdam's mu_product, bf16_sr's sr_step) one ahead, or
    created state. Now undone: the failed step changes nothing, at the first step and later. The per-group host
    counters too (2026-12-06: schedule-free's k, lr_max, weight_sum, sf_c and its z created at a first step
    stayed, so a retry was a step ahead, or AdamWScheduleFree refused every later step; FSGDM's step)."""
    from momentum_fused import backends

    def boom(*a, **k):
        raise RuntimeError("launch failed")
    for first, subset in ((True, False), (False, False), (False, True)):  # subset: the counters re-stacked
        ps = [torch.randn(5, dtype=dtype, requires_grad=True), torch.randn(3, dtype=dtype, requires_grad=True)]
        opt = make(ps)
        closure = (lambda: torch.tensor(1.0)) if opt.param_groups[0]["lr"] == "polyak" else None
        for _ in range(0 if first else 2):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step(closure)
        backend = backends.resolve(None, opt.spec, ps[0].device, dtype,
                                   mf.layouts.get_layout(opt.param_groups[0]["layout"]))
        for p in ps:
            p.grad = torch.ones_like(p)
        if subset:
            ps[1].grad = None
        before = snapshot(opt, ps)
        monkeypatch.setattr(backend, "apply", boom)
        with pytest.raises(RuntimeError, match="launch failed"):
            opt.step(closure)
        assert_snapshot_equal(before, snapshot(opt, ps))
        assert len(opt.state) == (0 if first else 2)
        monkeypatch.undo()
        opt.step(closure)  # and the next step is the step that failed


# ---------------------------------------------------------------- configuration (a review of backends and install)
def test_an_isa_cap_that_is_no_isa_makes_the_cpu_backend_unavailable(monkeypatch):
    """MOMENTUM_FUSED_CPU_ISA=AVX2 (or any other value than baseline/avx2/avx512/avx512w) was taken as no cap by the C++
    side: the AVX-512 kernels ran, silently. The cpu backend now refuses to load, naming the value."""
    from momentum_fused import _backend_cpu
    monkeypatch.setenv("MOMENTUM_FUSED_CPU_ISA", "AVX2")
    assert "MOMENTUM_FUSED_CPU_ISA='AVX2' is not one of baseline, avx2, avx512, avx512w" in _backend_cpu._load()[1]
    for ok in ("avx2", "baseline", "avx512", "avx512w", ""):
        monkeypatch.setenv("MOMENTUM_FUSED_CPU_ISA", ok)
        assert _backend_cpu.isa_env_error() is None


def test_a_jit_switch_that_is_neither_on_nor_off_builds_nothing(tmp_path):
    """MOMENTUM_FUSED_JIT=disable used to count as on (only 0/false/no/off were off)."""
    from momentum_fused import _jit
    saved = dict(_jit.STATUS)
    try:
        mod, why = _jit.jit_build(str(tmp_path), env={"MOMENTUM_FUSED_JIT": "disable"})
        assert mod is None and "MOMENTUM_FUSED_JIT='disable' is neither on" in why
        assert _jit.STATUS["outcome"] == "disabled"
    finally:
        _jit.STATUS.clear()
        _jit.STATUS.update(saved)


@pytest.mark.parametrize("name, value, why", [
    ("MOMENTUM_FUSED_TRITON_BLOCK", "1000", "must be a power of two"), ("MOMENTUM_FUSED_TRITON_BLOCK", "0", ">= 32"),
    ("MOMENTUM_FUSED_TRITON_BLOCK", "abc", "is not an integer"), ("MOMENTUM_FUSED_TRITON_WARPS", "3", "power of two"),
    ("MOMENTUM_FUSED_TRITON_BLOCK", "64", "below 32 x MOMENTUM_FUSED_TRITON_WARPS=4"),
    ("MOMENTUM_FUSED_TRITON_INT8_MAXNREG", "abc", "must be an integer >= 0"),
    ("MOMENTUM_FUSED_TRITON_INT8_MAXNREG", "-8", "must be an integer >= 0")])
def test_triton_knobs_are_checked_before_anything_runs(name, value, why, monkeypatch):
    """A bad launcher knob raised inside the kernel launch (a bare ZeroDivisionError, or the interpreter's arange
    error) after the step counters had moved; now the backend names it when it is chosen."""
    from momentum_fused import _backend_triton
    monkeypatch.setenv(name, value)
    assert why in _backend_triton._knob_error()
    monkeypatch.delenv(name)
    assert _backend_triton._knob_error() is None


# ---------------------------------------------------------------- int8 checkpoints that are not
def _int8_checkpoint():
    p = torch.nn.Parameter(torch.randn(4096))
    opt = mf.Adam([p], lr=1e-2, layout="int8_state")
    p.grad = torch.randn(4096)
    opt.step()
    return p, opt.state_dict()


@pytest.mark.parametrize("edit", ["scale not a tensor", "int16 codes", "signed codes of an unsigned state",
                                  "unsigned codes of a signed state", "too few scales"])
@pytest.mark.parametrize("live", ["native", "int8_state"])
def test_codes_that_are_not_codes_refuse_the_checkpoint(edit, live):
    """A state with block scales beside it was loaded as the values when the scale was no tensor or the codes were
    int16 (code 127 -> 127.0), and decoded with the wrong sign for the wrong signedness (a negative second
    moment: NaN params at the next step)."""
    p, sd = _int8_checkpoint()
    st = sd["state"][0]
    if edit == "scale not a tensor":
        st["exp_avg_scale"] = 1.0
    elif edit == "int16 codes":
        st["exp_avg"] = {"codes": st["exp_avg"]["codes"].short()}
    elif edit == "signed codes of an unsigned state":
        st["exp_avg_sq"] = {"codes": st["exp_avg_sq"]["codes"].to(torch.int16).clamp(max=127).neg().to(torch.int8)}
    elif edit == "unsigned codes of a signed state":
        st["exp_avg"] = {"codes": st["exp_avg"]["codes"].abs().to(torch.uint8)}
    else:
        st["exp_avg_scale"] = st["exp_avg_scale"][:-1]
    q = torch.nn.Parameter(p.detach().clone())
    opt = mf.Adam([q], lr=1e-2, layout=live)
    with pytest.raises(ValueError, match="must be torch.u?int8 codes"):
        opt.load_state_dict(sd)
    assert not opt.state


@pytest.mark.parametrize("saved, live", [("master16", "master"), ("master", "master16")])
def test_a_reshaped_master_or_remainder_is_refused_whole(saved, live):
    """A checkpoint's master / remainder of the param's size but another shape: the conversion raised after the
    live group's master had been dropped (a half-loaded optimizer); then (2026-12-06) it was reshaped to the
    param, which loaded a checkpoint of other params with no error. The shape is checked before anything loads,
    as the step checks a state's shape."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = mf.AdamW([p], lr=1e-2, layout=saved)
    p.grad = torch.randn(8, 4).bfloat16()
    opt.step()
    sd = opt.state_dict()
    key = "master_lo" if saved == "master16" else "master"
    v = sd["state"][0][key]  # (the remainder's checkpoint form: (8, 4, 2) bytes)
    sd["state"][0][key] = v.reshape(4, 8, *v.shape[2:])
    q = torch.nn.Parameter(p.detach().clone())
    o2 = mf.AdamW([q], lr=1e-2, layout=live)
    q.grad = torch.randn(8, 4).bfloat16()
    o2.step()
    before = snapshot(o2, [q])
    with pytest.raises(ValueError, match=f"state '{key}' has shape \\(4, 8\\).*Nothing was loaded"):
        o2.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(o2, [q]))


@pytest.mark.parametrize("saved, live", [("int8_state", "int8_state"), ("native", "int8_state"),
                                         ("int8_state", "native"), ("native", "native")])
def test_a_checkpoint_of_params_of_another_shape_and_the_same_size_is_refused(saved, live):
    """(16, 256) params' state loaded into (256, 16) params: the int8 conversions reshaped it to the param's
    shape with no error (elements in the wrong places); the shape is checked with the size now."""
    p = torch.nn.Parameter(torch.randn(16, 256))
    opt = mf.AdamW([p], lr=1e-2, layout=saved)
    p.grad = torch.randn(16, 256)
    opt.step()
    q = torch.nn.Parameter(torch.randn(256, 16))
    o2 = mf.AdamW([q], lr=1e-2, layout=live)
    q.grad = torch.randn(256, 16)
    o2.step()
    before = snapshot(o2, [q])
    with pytest.raises(ValueError, match="state 'exp_avg' has shape \\(16, 256\\).*Nothing was loaded"):
        o2.load_state_dict(opt.state_dict())
    assert_snapshot_equal(before, snapshot(o2, [q]))


@pytest.mark.parametrize("layout", ["native", "master", "master16", "int8_state"])
def test_a_param_without_saved_state_gains_no_empty_entry_at_load(layout):
    """The load's conversions read ``self.state[p]`` (a defaultdict) for every param: a param with no saved state
    (frozen, or never given a gradient) came back as an empty entry, so load -> state_dict() was not the
    checkpoint (torch's is)."""
    dtype = torch.bfloat16 if layout in ("master", "master16") else torch.float32
    ps = [torch.nn.Parameter(torch.randn(4096).to(dtype)) for _ in range(2)]
    opt = mf.AdamW(ps, lr=1e-2, layout=layout)
    ps[0].grad = torch.randn(4096).to(dtype)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o2 = mf.AdamW(qs, lr=1e-2, layout=layout)
    o2.load_state_dict(sd)
    assert list(o2.state_dict()["state"]) == [0] and len(o2.state) == 1
