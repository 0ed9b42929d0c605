"""Layout ``master16_int8`` (docs/layouts.md, docs/algorithms.md §11): bf16 params with a 16-bit remainder (the fp32
master, as ``master16``) and the rule's moments as 8-bit block codes (as ``int8_state``), on the reference backend
(the compiled kernels against it: tests/test_compressed_cpu.py, tests/triton/test_compressed_triton.py).

The definition makes it the composition of the two, so the tests pin it to them bit for bit: from the same bf16
values and gradients, the decoded master follows ``int8_state``'s fp32 param exactly, and the codes and scales are
``int8_state``'s; the param is the master rounded to nearest with ties away. Plus the state bytes, checkpoints (its
own, and conversions from and to ``master``, ``master16`` and ``int8_state``) and the errors.
"""
from __future__ import annotations

import copy

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends, layouts

from backend_cases import CASES, takes_int8
from compressed_oracle import master_of

Q_SHAPES = [(64, 256), (4096,), (4097,), (17,), (3, 5, 7), ()]  # the first two are quantized (>= 4096, % 256)
INT8_CASES = [c for c in CASES if takes_int8(c)]


def _pair(case, steps=10):
    """(master16_int8 optimizer, its bf16 params), (int8_state optimizer, its fp32 params): same start, same grads."""
    cid, cls, kw0, _, sign, lp = case
    kw = {**kw0, **{k: v for k, v in lp.items() if k != "gscale"}}
    scale = lp.get("gscale", 1.0)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).bfloat16() for s in Q_SHAPES]
    ps = [x.clone().requires_grad_() for x in init]
    rs = [x.float().requires_grad_() for x in init]
    opt = cls(ps, backend="reference", layout="master16_int8", **kw)
    ref = cls(rs, backend="reference", layout="int8_state", **kw)
    signs = [torch.randn(s, generator=gen).sign() for s in Q_SHAPES]
    for _ in range(steps):
        for p, r, sg in zip(ps, rs, signs):
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad = (sg * (0.5 + g.abs()) if sign else g).bfloat16()
            r.grad = p.grad.float()
        opt.step()
        ref.step()
    return opt, ps, ref, rs


def test_the_rules_that_take_it():
    assert {c[0] for c in CASES} - {c[0] for c in INT8_CASES} == {"sgd_sf", "adamw_sf", "adamw_sf-inner",
                                                                  "rmsprop-centered", "rmsprop-momentum-centered"}
    with pytest.raises(ValueError, match="does not support dtype layout 'master16_int8'"):
        mf.SGDScheduleFree([torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True)], layout="master16_int8")


@pytest.mark.parametrize("case", INT8_CASES, ids=[c[0] for c in INT8_CASES])
def test_master16_int8_is_int8_state_on_the_decodedmaster_of(case):
    opt, ps, ref, rs = _pair(case)
    names = opt.spec.state_names(opt.param_groups[0])
    for i, (p, r) in enumerate(zip(ps, rs)):
        st, rst = opt.state[p], ref.state[r]
        m = master_of(opt, p)
        assert torch.equal(m.view(torch.int32), r.detach().view(torch.int32)), f"{case[0]} {i}: master"
        hi, _ = layouts.master16_encode(m)
        assert torch.equal(p.detach().view(torch.int16), hi.view(p.shape).view(torch.int16)), "ties-away param"
        assert st["master_lo"].dtype == torch.int16 and st["master_lo"].shape == p.shape
        assert set(st) == set(rst) | {"master_lo"}
        for k in rst:
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(rst[k])), f"{case[0]} {i} {k}"
        if layouts.int8_quantized(p):
            assert all(st[k].dtype in (torch.int8, torch.uint8) for k in names)


def test_state_bytes_per_param():
    opt, ps, _, _ = _pair(next(c for c in INT8_CASES if c[0].startswith("adamw")), steps=2)
    p = ps[0]
    st = opt.state[p]
    state = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step") / p.numel()
    assert state == 2 + 2 + 2 * 4 / 256 and state <= 4.1  # remainder, two 1-byte codes, two fp32 scales per 256
    assert state + p.element_size() == 6 + 2 * 4 / 256  # persistent, with the bf16 param
    assert layouts.roofline_bytes(2, torch.bfloat16, layout="master16_int8") == 2 * 2 + 2 * 2 + 2 + 2 * 2 * (1 + 4 / 256)


def _adamw(params, layout):
    return mf.AdamW(params, lr=1e-2, weight_decay=0.01, layout=layout, backend="reference")


def _steps(opt, ps, n=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _run16(steps=4):
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in Q_SHAPES]
    opt = _adamw(ps, "master16_int8")
    _steps(opt, ps, steps)
    return opt, ps


def test_checkpoint_round_trip_continues_bit_for_bit():
    opt, ps = _run16()
    sd = copy.deepcopy(opt.state_dict())  # (as from a file: torch.optim's loading aliases same-dtype tensors)
    lo = sd["state"][0]["master_lo"]  # the remainder's two bytes (layouts.remainder_bytes)
    assert sd["state"][0]["exp_avg"]["codes"].dtype == torch.int8 and lo.dtype == torch.uint8
    assert lo.shape == (*ps[0].shape, 2)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    o2 = _adamw(qs, "master16_int8")
    o2.load_state_dict(sd)
    _steps(opt, ps)
    _steps(o2, qs)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(o2.state[q][k]), torch.as_tensor(v)), k


@pytest.mark.parametrize("live", ["master", "master16", "int8_state"])
def test_checkpoints_convert_to_and_from_master16_int8(live):
    """master16_int8 -> ``live`` -> master16_int8: the optimizer keeps its own layout each time, the master and the
    decoded moments carry over, and the round trip gives the same codes, remainders and later steps."""
    opt, ps = _run16()
    masters = [master_of(opt, p).clone() for p in ps]
    fp32 = live == "int8_state"  # (fp32 params: the model's weights are the master itself)
    mids = [(m if fp32 else p.detach()).clone().requires_grad_() for p, m in zip(ps, masters)]
    mid = _adamw(mids, live)
    mid.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert mid.param_groups[0]["layout"] == live
    for p, x, m in zip(ps, mids, masters):
        st = mid.state[x]
        if live == "master":
            assert torch.equal(st["master"], m) and "master_lo" not in st
        elif live == "master16":
            assert torch.equal(st["master_lo"], opt.state[p]["master_lo"])
        else:
            assert "master_lo" not in st and "master" not in st
        for k in ("exp_avg", "exp_avg_sq"):
            q = layouts.int8_quantized(p)
            got = st[k] if live != "int8_state" or not q else layouts.int8_decode(st[k], st[k + "_scale"],
                                                                                    k == "exp_avg")
            want = opt.state[p][k] if not q else layouts.int8_decode(opt.state[p][k], opt.state[p][k + "_scale"],
                                                                     k == "exp_avg")
            assert torch.equal(got, want), k
    back = [p.detach().clone().requires_grad_() for p in ps]
    o3 = _adamw(back, "master16_int8")
    o3.load_state_dict(copy.deepcopy(mid.state_dict()))
    assert o3.param_groups[0]["layout"] == "master16_int8"
    if fp32:  # the fp32 weights were the master; the bf16 model has the params (a checkpoint holds no remainder)
        for p, b in zip(ps, back):
            o3.state[b]["master_lo"] = opt.state[p]["master_lo"].clone()
    for p, b in zip(ps, back):
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(o3.state[b][k]), torch.as_tensor(v)), k
    _steps(opt, ps)
    _steps(o3, back)
    for p, b in zip(ps, back):
        assert torch.equal(p, b)


def test_errors_change_nothing():
    with pytest.raises(TypeError, match="master16_int8"):
        _adamw([torch.zeros(4096, requires_grad=True)], "master16_int8")  # fp32 params: use int8_state
    opt, ps = _run16(steps=1)
    p = ps[0]
    opt.state[p]["master_lo"] = opt.state[p]["master_lo"].to(torch.int32)  # a remainder of the wrong dtype
    before = [x.detach().clone() for x in ps]
    states = {k: v.clone() for k, v in opt.state[ps[1]].items()}
    for x in ps:
        x.grad = torch.ones_like(x)
    with pytest.raises(ValueError, match="master_lo"):
        opt.step()
    assert all(torch.equal(x, b) for x, b in zip(ps, before))
    assert all(torch.equal(opt.state[ps[1]][k], v) for k, v in states.items())


# The backends with a kernel for it (tests/test_compressed_cpu.py, tests/triton/test_compressed_triton.py; cuda:
# compiled, its device tests in tests/test_cuda_backend.py); any other refuses it by name.
KERNEL_BACKENDS = {"reference", "cpu", "triton", "cuda"}


def test_the_backends_that_run_it():
    from momentum_fused import _backend_cpu, _backend_cuda, _backend_triton
    assert all("master16_int8" in x for x in (_backend_cpu.CPU_LAYOUTS, _backend_cuda.CUDA_LAYOUTS,
                                              _backend_triton.TRITON_LAYOUTS))
    lay = layouts.get_layout("master16_int8")
    for b in backends._REGISTRY.values():
        if not b.available:  # (an unbuilt backend declares no layout)
            continue
        if b.name in KERNEL_BACKENDS:
            assert "master16_int8" in b.layouts and backends._layout_reason(b, lay) is None
        else:
            assert "master16_int8" not in b.layouts
            assert "dtype layout 'master16_int8' is not implemented" in backends._layout_reason(b, lay)
