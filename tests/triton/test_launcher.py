"""Launcher: block plan, pointer-table cache (and its invalidation through the optimizers),
found_inf / grad_scale on device, bf16 round-to-nearest-even, backend registration."""
import importlib
import sys

import pytest
import torch

import momentum_fused as mf
from helpers import assert_parity, grads_for, make_params
from momentum_fused import _backend_triton as bt
from momentum_fused.specs import SPECS
from momentum_fused.triton_kernels import launcher, rules


# ------------------------------------------------------------------------------------ block plan
@pytest.mark.parametrize("numels", [[1, 0, 1, 4097, 105, 0], [5000] * 3, [1] * 300, [0, 0], [4096, 8192, 1],
                                    [4095, 2, 4095, 4096]])
def test_plan_covers_every_element_once(numels):
    block = 4096
    prog, segs = launcher.plan_blocks(numels, block)
    seen = {t: torch.zeros(n, dtype=torch.int64) for t, n in enumerate(numels)}
    for i in range(len(prog) - 1):
        own = segs[prog[i]:prog[i + 1]]
        assert 1 <= len(own) <= launcher.MAX_SEGS
        lanes = sorted((lane, lane + n) for _, _, lane, n in own)
        assert lanes[0][0] >= 0 and lanes[-1][1] <= block
        assert all(a[1] <= b[0] for a, b in zip(lanes, lanes[1:]))  # lanes do not overlap
        if len(own) == 1 and own[0][3] == block:
            assert own[0][1] % block == 0  # full blocks of large tensors are aligned
        for t, off, _, n in own:
            seen[t][off:off + n] += 1
    for t, n in enumerate(numels):
        assert bool((seen[t] == 1).all())
    # tiny tensors share programs
    if numels == [1] * 300:
        assert len(prog) - 1 == -(-300 // launcher.MAX_SEGS)


# ---------------------------------------------------------------------------------------- cache
def _sgd_pair(shapes, **kw):
    init = make_params(shapes, 3)
    tp = [x.float().requires_grad_() for x in init]
    rp = [x.float().double().requires_grad_() for x in init]
    return tp, rp, mf.SGD(tp, backend="triton", **kw), mf.SGD(rp, backend="reference", **kw)


def _step_both(tp, rp, topt, ropt, k):
    for a, b, g in zip(tp, rp, grads_for([tuple(p.shape) for p in tp], k, 5)):
        a.grad = g.float()
        b.grad = a.grad.double()
    topt.step()
    ropt.step()


def test_cache_hits_every_step_and_misses_on_replaced_param():
    shapes = [(10,), (4097,), (3, 3)]
    tp, rp, topt, ropt = _sgd_pair(shapes, lr=0.05, momentum=0.9)
    _step_both(tp, rp, topt, ropt, 0)
    st = launcher.cache_stats()
    for k in range(1, 4):
        _step_both(tp, rp, topt, ropt, k)
    after = launcher.cache_stats()
    assert after["misses"] == st["misses"] and after["hits"] == st["hits"] + 3
    # replace a param's storage: p.data = new tensor (the old one is freed; pointers change)
    new = torch.randn(4097)
    tp[1].data = new.clone()
    rp[1].data = new.double()
    for k in range(4, 10):
        _step_both(tp, rp, topt, ropt, k)
    assert launcher.cache_stats()["misses"] > after["misses"]
    assert_parity(topt, ropt, tp, rp, torch.float32)


def test_add_param_group_and_load_state_dict_use_fresh_pointers():
    tp, rp, topt, ropt = _sgd_pair([(7,), (300,)], lr=0.05, momentum=0.9)
    for k in range(3):
        _step_both(tp, rp, topt, ropt, k)
    extra = make_params([(4097,), (2,)], 9)
    tx = [x.float().requires_grad_() for x in extra]
    rx = [x.float().double().requires_grad_() for x in extra]
    topt.add_param_group(dict(params=tx, lr=0.01))
    ropt.add_param_group(dict(params=rx, lr=0.01))
    tp, rp = tp + tx, rp + rx
    for k in range(3, 6):
        before = launcher.LAUNCHES
        _step_both(tp, rp, topt, ropt, k)
        assert launcher.LAUNCHES - before == 1  # two groups, one launch
    # load_state_dict replaces every state tensor (new storage): results must stay right
    sd = topt.state_dict()
    topt2 = mf.SGD([dict(params=tp[:2]), dict(params=tp[2:], lr=0.01)], lr=0.05, momentum=0.9, backend="triton")
    topt2.load_state_dict(sd)
    for k in range(6, 12):
        _step_both(tp, rp, topt2, ropt, k)
    assert_parity(topt2, ropt, tp, rp, torch.float32)


# ------------------------------------------------------------------------- found_inf / grad_scale
def _adam_lists(dtype, seed=0):
    shapes = [(3,), (4097,), (), (50,)]
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(s, generator=gen).to(dtype) for s in shapes]  # noqa: E731
    p, g, m = mk(), mk(), mk()
    v = [x.abs() for x in mk()]
    return [p, g, m, v]


def _adam_scalars(n, grad_mult):
    spec = SPECS["adam"]
    return [spec.make_scalars(dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1), {}, True, grad_mult)
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_on_device_skips_every_write(dtype):
    lists = _adam_lists(dtype)
    before = [[x.clone() for x in lst] for lst in lists]
    found_inf = torch.ones(1)
    scale = torch.full((1,), 1024.0)
    n = launcher.multi_tensor_apply("multi", rules.RULE_IDS["adam"], (True, False), lists,
                                    _adam_scalars(4, 1.0), found_inf=found_inf, grad_scale=scale)
    assert n == 1
    for lst, old in zip(lists, before):
        for x, y in zip(lst, old):
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))  # bit-identical


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scale_on_device_equals_host_grad_mult(dtype):
    a = _adam_lists(dtype)
    b = [[x.clone() for x in lst] for lst in a]
    launcher.multi_tensor_apply("multi", rules.RULE_IDS["adam"], (True, False), a, _adam_scalars(4, -1.0),
                                found_inf=torch.zeros(1), grad_scale=torch.full((1,), 1024.0))
    launcher.multi_tensor_apply("multi", rules.RULE_IDS["adam"], (True, False), b, _adam_scalars(4, -1.0 / 1024))
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)
    assert not torch.equal(a[0][1], _adam_lists(dtype)[0][1])  # something was written


# ------------------------------------------------------------------------------- bf16 rounding
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_bf16_store_rounds_to_nearest_even():
    """p - lr * g computed in fp32 and stored as bf16 must equal torch's RNE conversion, ties included
    (the interpreter's own .to(tl.bfloat16) truncates)."""
    k = torch.arange(-64, 64, dtype=torch.float64)
    g = (-(k * 2.0 ** -8)).to(torch.bfloat16)  # 1 + k/256: every other value is an exact tie
    g = torch.cat([g, torch.tensor([3.0e38, -3.0e38, 1e-3, float("inf")]).to(torch.bfloat16)])
    lr = 1.0 / 3.0
    for lr in (1.0, 1.0 / 3.0):
        p = torch.ones_like(g)
        p[-3] = 3.0e38  # overflow to inf rounds correctly
        expect = (p.float() - torch.tensor(lr, dtype=torch.float32) * g.float()).to(torch.bfloat16)
        spec = SPECS["sgd"]
        sc = [spec.make_scalars(dict(lr=lr, weight_decay=0.0, momentum=0.0, dampening=0.0), {}, True)]
        launcher.multi_tensor_apply("one", rules.RULE_IDS["sgd"], (False, False), [[p], [g]], sc)
        assert torch.equal(p.view(torch.int16), expect.view(torch.int16))


# ------------------------------------------------------------------------------------ backend
def test_backend_registered_and_supports_exactly_the_rules_with_triton_math():
    """supports() accepts the rules the kernels serve (rules.FAMILY, each with its <rule>_math) and names every
    other spec, so that the automatic choice skips Triton for it; before 2026-12-06 it accepted every kernel rule
    (a rule added to specs without Triton math then failed at step time: KeyError, a review)."""
    assert mf.backends.status()["triton"] == "available"
    for name, spec in SPECS.items():
        why = bt.supports(spec, torch.device("cpu"), torch.float32)
        if name in rules.FAMILY:
            assert why is None, why
            assert callable(getattr(rules, f"{name}_math", None)), name
        else:
            assert "no Triton kernel" in why, (name, why)
    assert set(rules.FAMILY) <= set(rules.RULE_IDS)


def test_a_kernel_rule_without_triton_math_is_refused_by_supports(monkeypatch):
    spec = SPECS["lion"]
    monkeypatch.delitem(rules.FAMILY, "lion")
    assert "rule 'lion' has no Triton kernel yet" in bt.supports(spec, torch.device("cpu"), torch.float32)


def test_supports_reasons(monkeypatch):
    spec = SPECS["adam"]
    assert "float64" in bt.supports(spec, torch.device("cpu"), torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        mf.backends.resolve("triton", spec, torch.device("cpu"), torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert bt.supports(spec, torch.device("cpu"), torch.float32) == (
        "the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")


def test_load_error_for_missing_triton_and_no_top_level_triton_kernels(monkeypatch):
    import momentum_fused.triton_kernels as tk
    assert tk.__name__ == "momentum_fused.triton_kernels" and "triton_kernels" not in sys.modules
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert "triton is not installed" in bt._load_error()
    b = bt.make_backend()
    assert not b.available and "triton is not installed" in b.load_error
    monkeypatch.undo()
    assert bt._load_error() is None


def test_zero_numel_bucket_launches_nothing():
    p = torch.zeros(0, requires_grad=True)
    opt = mf.Adam([p], backend="triton")
    p.grad = torch.zeros(0)
    before = launcher.LAUNCHES
    opt.step()
    assert launcher.LAUNCHES == before


def test_pointer_rows_from_c_equal_the_python_path_bit_for_bit(monkeypatch):
    """The Triton backend reads the data pointers and sizes with _C_cpu.pointer_rows (when built): equal to the
    launcher's Python rows, None for a transposed param (the bucket then takes contiguous_lists' copies); 10 AdamW
    steps equal those of the Python path bit for bit."""
    from momentum_fused import _backend_triton as bt
    if bt._POINTER_ROWS is None:
        pytest.skip("needs the compiled cpu extension (_C_cpu.pointer_rows)")
    ps, gs = [torch.randn(7), torch.randn(0), torch.randn(4, 3)], [torch.randn(7), torch.randn(0), torch.randn(4, 3)]
    sts = [(torch.randn(t.shape), torch.randn(t.shape)) for t in ps]
    rows = bt._POINTER_ROWS(ps, gs, sts, 2)
    assert torch.equal(rows, launcher.pointer_rows([ps, gs, [s[0] for s in sts], [s[1] for s in sts]]))
    assert rows[-1].tolist() == [7, 0, 12] and rows.dtype == torch.int64
    assert bt._POINTER_ROWS(ps, gs, [()] * 3, 0).shape == (3, 3)
    assert bt._POINTER_ROWS(ps[:2] + [torch.randn(3, 4).t()], gs, sts, 2) is None
    with pytest.raises(RuntimeError, match=r"states\[1\] must be a tuple of 2 tensors"):
        bt._POINTER_ROWS(ps, gs, [sts[0], sts[1][:1], sts[2]], 2)
    with pytest.raises(RuntimeError, match="2 state tuples"):
        bt._POINTER_ROWS(ps, gs, sts[:2], 2)
    col = bt._Column(sts, 1)
    assert len(col) == 3 and col[2] is sts[2][1] and col[1:] == [sts[1][1], sts[2][1]] and list(col)[0] is sts[0][1]

    def run(fast):
        monkeypatch.setattr(bt, "_POINTER_ROWS", bt._POINTER_ROWS if fast else None)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(10,), (4097,), (3, 3), (0,)]]
        ps.append(torch.randn(7, 5, generator=gen).t().requires_grad_())  # not contiguous
        opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton")
        for k in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps, opt
    a, oa = run(True)
    b, ob = run(False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert all(torch.equal(oa.state[x][k], ob.state[y][k]) for k in oa.state[x])


def test_checked_lists_skip_the_checks_only_on_a_cache_hit(monkeypatch):
    """multi_tensor_apply(checked=True) (the backend behind the optimizer's plan) checks the lists when their tables
    are new and skips the checks on a hit; unchecked callers are checked every call."""
    calls = []
    real = launcher._check_lists
    monkeypatch.setattr(launcher, "_check_lists", lambda *a: calls.append(1) or real(*a))
    ps, gs, ms = ([torch.randn(300) for _ in range(3)] for _ in range(3))
    sc = [(0.1, 0.0, 0.9, 0.0, 0.0, 1.0)] * 3  # lr, weight_decay, momentum, dampening, first, grad_mult
    fam, rid = rules.FAMILY["sgd"], rules.RULE_IDS["sgd"]
    for checked, want in ((True, [1]), (True, [1]), (False, [1, 1]), (False, [1, 1, 1])):
        launcher.multi_tensor_apply(fam, rid, (False, False), [ps, gs, ms], sc, checked=checked)
        assert calls == want
    with pytest.raises(TypeError, match="tensor 1 of list 1"):  # new tables: checked even when trusted
        bad = [ps[:2] + [ps[2].clone()], [gs[0], gs[1].double(), gs[2]], ms]
        launcher.multi_tensor_apply(fam, rid, (False, False), bad, sc, checked=True)


def test_int8_pointer_rows_from_c_equal_the_python_rows_and_the_bits(monkeypatch):
    """The int8 layouts' bucket: _C_cpu.pointer_rows(..., ragged=True) equals launcher.int8_pointer_rows (a shorter
    tuple's missing slots 0, the tuples' lengths last) and refuses a tuple longer than the width; 10 AdamW steps of
    int8_state and master16_int8 through it (a quantized tensor, fp32-state ones, fresh grads every step) equal
    those of the Python rows bit for bit, codes and scales included."""
    from momentum_fused import _backend_triton as bt
    if bt._POINTER_ROWS is None:
        pytest.skip("needs the compiled cpu extension (_C_cpu.pointer_rows)")
    ps, gs = [torch.randn(512), torch.randn(7)], [torch.randn(512), torch.randn(7)]
    sts = [(torch.zeros(512, dtype=torch.int8), torch.zeros(512, dtype=torch.uint8), torch.ones(2), torch.ones(2)),
           (torch.randn(7), torch.rand(7))]
    assert launcher.int8_width(sts) == 4 and launcher.int8_width(sts[::-1]) == 4
    rows = bt._POINTER_ROWS(ps, gs, sts, 4, True)
    assert torch.equal(rows, launcher.int8_pointer_rows(ps, gs, sts, 4))
    assert rows[-1].tolist() == [4, 2] and rows[-2].tolist() == [512, 7] and rows[4:6, 1].tolist() == [0, 0]
    with pytest.raises(RuntimeError, match=r"states\[0\] must be a tuple of at most 3 tensors"):
        bt._POINTER_ROWS(ps, gs, sts, 3, True)

    def run(fast, layout):
        monkeypatch.setattr(bt, "_POINTER_ROWS", bt._POINTER_ROWS if fast else None)
        gen = torch.Generator().manual_seed(0)
        dt = torch.bfloat16 if layout == "master16_int8" else torch.float32
        ps = [torch.randn(s, generator=gen).to(dt).requires_grad_() for s in [(4096,), (10,), (64, 64), (0,)]]
        opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, layout=layout, backend="triton")
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dt)
            opt.step()
        return ps, opt
    for layout in ("int8_state", "master16_int8"):
        a, oa = run(True, layout)
        b, ob = run(False, layout)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
            sa, sb = oa.state[x], ob.state[y]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), layout
