"""Compressed optimizer state (docs/algorithms.md §11, docs/layouts.md): the ``master16`` layout on the
reference backend.

- The encode/decode pair (layouts.master16_encode / master16_decode) is exact on every finite fp32 bit pattern
  and on the infinities; the param is the master rounded to nearest with ties away from zero.
- Every rule over 10 steps: the fp32 master rebuilt from (param, remainder) equals layout "master"'s fp32
  master bit for bit, the rule's state tensors are equal, and the params differ only where RNE and
  ties-away differ (a remainder of exactly 0x8000).
- Checkpoints: the remainder round-trips; a "master" checkpoint loads into a "master16" optimizer and back,
  and the trajectories continue bit for bit.
- The compiled backends without it refuse the layout (forced: an error; automatic: the next backend, with a
  warning); the cpu backend runs both compressed layouts (tests/test_compressed_cpu.py).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends, layouts

from backend_cases import CASES, takes_int8
from compressed_oracle import master_of

SHAPES = [(), (1,), (17,), (4097,), (3, 5, 7)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _all_patterns(n=1 << 18, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 1 << 32, (n,), generator=gen, dtype=torch.int64)
    edge = torch.tensor([0, 0x80000000, 0x00008000, 0x80008000, 0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x0000FFFF, 0x0001FFFF])
    u = torch.cat([u, edge, u & 0xFFFF0000 | 0x8000])  # and every sampled high half at a tie
    return (u - ((u & 0x80000000) << 1)).to(torch.int32).view(torch.float32)


def test_master16_decode_of_a_written_param_rounds_back_to_it():
    """Every bf16 param beside any remainder (pairs no encode makes included: a param written between steps
    keeps its stale remainder) decodes to a master whose rounding is that param, NaN only for a NaN param. Before,
    +-0 beside a remainder >= 0x8000 decoded to NaN (the borrow wrapped the exponent), and an inf beside a small
    nonzero one."""
    hi = torch.arange(1 << 16, dtype=torch.int64).repeat_interleave(8)
    gen = torch.Generator().manual_seed(5)
    lo = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0, 0]).repeat(1 << 16)
    lo[6::8] = torch.randint(0, 1 << 16, (1 << 16,), generator=gen)
    lo[7::8] = torch.randint(0, 1 << 16, (1 << 16,), generator=gen)
    p = (hi - ((hi & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)
    r = (lo - ((lo & 0x8000) << 1)).to(torch.int16)
    master = layouts.master16_decode(p, r)
    nan = torch.isnan(p)
    assert torch.equal(torch.isnan(master), nan)
    back, _ = layouts.master16_encode(master)
    assert torch.equal(back.view(torch.int16)[~nan], p.view(torch.int16)[~nan])
    zero = (hi & 0x7FFF) == 0
    assert torch.equal(master[zero & (lo >= 0x8000)], p[zero & (lo >= 0x8000)].float())  # +-0 exactly


def test_master16_encoding_is_exact_and_rounds_ties_away():
    x = _all_patterns()
    p, lo = layouts.master16_encode(x)
    assert p.dtype == torch.bfloat16 and lo.dtype == torch.int16
    y = layouts.master16_decode(p, lo)
    ok = ~torch.isnan(x)
    assert torch.equal(_bits(y[ok]), _bits(x[ok])), "finite values and infinities decode exactly"
    assert torch.isnan(y[~ok]).all() and torch.isnan(p[~ok]).all(), "a NaN master stays NaN"
    # the param is the nearest bf16; at an exact tie it is the one of larger magnitude
    rne = x.to(torch.bfloat16)
    fin = torch.isfinite(x)
    d_p = (p.double() - x.double()).abs()[fin & torch.isfinite(p)]
    d_rne = (rne.double() - x.double()).abs()[fin & torch.isfinite(p)]
    assert torch.equal(d_p, d_rne), "the param is a nearest bf16"
    tie = fin & ((_bits(x).to(torch.int64) & 0xFFFF) == 0x8000)
    assert tie.sum() > 1000
    assert (p[tie].double().abs() > x[tie].double().abs()).all(), "ties round away from zero"
    assert torch.equal(p[~tie & ok], rne[~tie & ok]), "elsewhere the param is the RNE one"
    assert (p[tie] != rne[tie]).any(), "RNE and ties-away differ at some tie (else the test shows nothing)"


def _run(cls, kw, layout, steps=10, sign=False, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(torch.bfloat16).requires_grad_() for s in SHAPES]
    opt = cls(ps, backend="reference", layout=layout, **kw)
    gg = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in ps:
            g = torch.randn(p.shape, generator=gg, dtype=torch.float64) * scale
            p.grad = (g.sign() * (0.5 + g.abs()) if sign else g).to(torch.bfloat16)
        opt.step()
    return opt, ps


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_master16_trajectory_is_the_master_layouts_bit_for_bit(case):
    cid, cls, kw0, _, sign, lp = case
    assert "master16" in cls.supported_layouts
    kw, scale = dict(kw0), 1.0
    lp = dict(lp)
    scale = lp.pop("gscale", 1.0)
    kw.update(lp)
    a, pa = _run(cls, kw, "master", sign=sign, scale=scale)
    b, pb = _run(cls, kw, "master16", sign=sign, scale=scale)
    for i, (x, y) in enumerate(zip(pa, pb)):
        sa, sb = a.state[x], b.state[y]
        assert set(sb) == set(sa) - {"master"} | {"master_lo"}
        assert sb["master_lo"].dtype == torch.int16 and sb["master_lo"].shape == y.shape
        ma, mb = sa["master"], master_of(b, y)
        assert torch.equal(_bits(ma), _bits(mb)), f"{cid} tensor {i}: masters differ"
        hi, _ = layouts.master16_encode(ma)
        assert torch.equal(y.detach().view(torch.int16), hi.view(y.shape).view(torch.int16)), \
            "param = master rounded to nearest, ties away"
        assert torch.equal(x.detach(), ma.to(torch.bfloat16)), "layout master's param: RNE"
        for k, v in sa.items():
            if k in ("master",):
                continue
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k])), f"{cid} tensor {i} state {k}"


def test_master16_schedule_free_eval_train_swap_matches_master():
    kw = dict(lr=1e-2, weight_decay=0.01)
    a, pa = _run(mf.AdamWScheduleFree, kw, "master")
    b, pb = _run(mf.AdamWScheduleFree, kw, "master16")
    a.eval(), b.eval()
    for x, y in zip(pa, pb):
        assert torch.equal(_bits(a.state[x]["master"]), _bits(master_of(b, y)))
    a.train(), b.train()
    for x, y in zip(pa, pb):
        assert torch.equal(_bits(a.state[x]["master"]), _bits(master_of(b, y)))


def test_master16_state_bytes_and_checkpoint_round_trip():
    p = torch.randn(4096, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
    opt = mf.AdamW([p], lr=1e-2, layout="master16")
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the automatic choice falls back to the reference (tested below)
        opt.step()
    st = opt.state[p]
    per_elem = sum(t.element_size() for k, t in st.items() if k != "step")
    assert per_elem == 4 + 4 + 2, "fp32 m, v and an int16 remainder (the master's other half is the param)"
    sd = opt.state_dict()
    saved = sd["state"][0]["master_lo"]  # its two bytes (gathered where int16 is not: NCCL, gloo), low byte first
    assert sd["param_groups"][0]["layout"] == "master16" and saved.dtype == torch.uint8 and saved.shape == (4096, 2)
    lo = st["master_lo"].to(torch.int32) & 0xFFFF
    assert torch.equal(saved[:, 0].to(torch.int32), lo & 0xFF) and torch.equal(saved[:, 1].to(torch.int32), lo >> 8)
    assert saved.data_ptr() == st["master_lo"].data_ptr()  # a view: no copy of the remainder
    q = p.detach().clone().requires_grad_()
    opt2 = mf.AdamW([q], lr=1e-2, layout="master16", backend="reference")
    opt2.load_state_dict(sd)
    assert opt2.state[q]["master_lo"].dtype == torch.int16
    assert torch.equal(opt2.state[q]["master_lo"], st["master_lo"])
    # the bytes written into the live state directly (ZeroRedundancyOptimizer's load): int16 again at the step
    r = p.detach().clone().requires_grad_()
    opt3 = mf.AdamW([r], lr=1e-2, layout="master16", backend="reference")
    opt3.state[r] = {k: v.clone() for k, v in sd["state"][0].items()}
    for o, x in ((opt, p), (opt2, q), (opt3, r)):
        x.grad = torch.ones_like(x)
        o.backend = "reference"
        o.step()
    for o, x in ((opt2, q), (opt3, r)):
        assert torch.equal(p, x) and torch.equal(opt.state[p]["master_lo"], o.state[x]["master_lo"])


def _tie_master_run(layout):
    """One SGD step that puts every fp32 master on an exact tie: 1 + k 2^-7 (every bf16 of [1, 2)) plus 2^-8."""
    p = (1.0 + torch.arange(128) * 2.0 ** -7).to(torch.bfloat16).requires_grad_()
    opt = mf.SGD([p], lr=2.0 ** -8, layout=layout, backend="reference")
    p.grad = -torch.ones_like(p)
    opt.step()
    return opt, p


@pytest.mark.parametrize("src,dst", [("master", "master16"), ("master16", "master")])
def test_checkpoints_convert_between_master_and_master16(src, dst):
    a, p = _run(mf.AdamW, dict(lr=1e-2, weight_decay=0.1), src, steps=4)
    c, pc = _run(mf.AdamW, dict(lr=1e-2, weight_decay=0.1), dst, steps=4)  # the reference trajectory, dst layout
    sd = a.state_dict()
    qs = [x.detach().clone().requires_grad_() for x in p]  # the model's weights are loaded first
    b = mf.AdamW(qs, lr=1e-2, weight_decay=0.1, layout=dst, backend="reference")
    b.load_state_dict(sd)
    assert b.param_groups[0]["layout"] == dst
    for x, q, r in zip(p, qs, pc):
        assert torch.equal(_bits(master_of(a, x)), _bits(master_of(b, q))), "the master survives the conversion"
        if dst == "master16":
            assert torch.equal(q, r), "the param is the one dst's layout keeps"
        else:  # (into the master layout the param is not written: master16's rounding until the next step)
            assert torch.equal(q, x)
        assert set(b.state[q]) == set(c.state[r])
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for q, r in zip(qs, pc):
            q.grad = r.grad = torch.randn(q.shape, generator=gen).to(torch.bfloat16)
        b.step()
        c.step()
    for q, r in zip(qs, pc):
        assert torch.equal(_bits(master_of(b, q)), _bits(master_of(c, r)))


def test_a_master16_checkpoint_loads_twice_into_the_master_layout_as_once():
    """master16 -> master rebuilds the master from the live param and the saved remainder. The load rewrote the
    param to the master's nearest-even rounding, so a second load of the same checkpoint decoded every tie one
    bf16 spacing low (a review, 2026-12-07). The param is left as loaded now (master16's rounding, ties away),
    which the first step's check takes as the master's: loaded twice, the run continues as the master layout's."""
    a, p = _tie_master_run("master16")
    c, pc = _tie_master_run("master")
    assert torch.equal(_bits(master_of(a, p)), _bits(master_of(c, pc)))
    q = p.detach().clone().requires_grad_()
    b = mf.SGD([q], lr=2.0 ** -8, layout="master", backend="reference")
    sd = a.state_dict()
    b.load_state_dict(sd)
    b.load_state_dict(sd)
    b.sync_masters()  # (nothing written since the load: the masters stay, ties included; a review found them reset)
    assert torch.equal(_bits(master_of(b, q)), _bits(master_of(c, pc))) and torch.equal(q, p)
    for k in range(3):
        q.grad = pc.grad = torch.full_like(q, (-1.0) ** k)
        b.step()
        c.step()
        assert torch.equal(_bits(master_of(b, q)), _bits(master_of(c, pc))) and torch.equal(q, pc)


def test_master_to_master16_rewrites_tie_params():
    a, p = _tie_master_run("master")
    master = a.state[p]["master"]
    tie = (_bits(master).to(torch.int64) & 0xFFFF) == 0x8000
    assert tie.all() and (p != layouts.master16_encode(master)[0]).sum() == 64  # the even high halves
    q = p.detach().clone().requires_grad_()
    b = mf.SGD([q], lr=2.0 ** -8, layout="master16", backend="reference")
    b.load_state_dict(a.state_dict())
    assert torch.equal(_bits(master_of(b, q)), _bits(master))
    assert torch.equal(q[~tie], p[~tie]) and not torch.equal(q[tie], p[tie])


def test_compiled_backends_without_master16_refuse_it():
    """Every compiled backend implements master16 (cpu: tests/test_compressed_cpu.py; triton:
    tests/triton/test_compressed_triton.py; cuda: compiled, its tests in tests/test_cuda_backend.py). A backend
    that does not list a layout refuses it: a forced choice raises, before anything changes."""
    from momentum_fused._backend_cuda import CUDA_LAYOUTS
    from momentum_fused._backend_triton import TRITON_LAYOUTS
    from momentum_fused.specs import get_spec
    assert {"master16", "int8_state"} <= set(TRITON_LAYOUTS) and {"master16", "int8_state"} <= set(CUDA_LAYOUTS)
    lay, spec = layouts.get_layout("master16"), get_spec(mf.AdamW.rule)
    assert "master16" in backends._REGISTRY["reference"].layouts
    cpu = backends._REGISTRY.get("cpu")
    if cpu is not None and cpu.available:  # (the CPU extension is built in this checkout and in CI)
        assert "master16" in cpu.layouts and backends._layout_reason(cpu, lay) is None
    # a backend without the layout: a forced choice raises before any state exists
    fake = backends.Backend(name="no_master16", apply=None, devices=("cpu",))
    backends.register(fake)
    try:
        with pytest.raises(RuntimeError, match="dtype layout 'master16' is not implemented"):
            backends.resolve("no_master16", spec, torch.device("cpu"), torch.bfloat16, lay)
        p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.ones_like(p)
        opt = mf.AdamW([p], lr=0.1, layout="master16", backend="no_master16")
        before = p.detach().clone()
        with pytest.raises(RuntimeError, match="master16"):
            opt.step()
        assert torch.equal(p, before) and not opt.state[p]
    finally:
        backends._REGISTRY.pop("no_master16")


def test_master16_refuses_other_param_dtypes():
    for dt in (torch.float32, torch.float16):
        with pytest.raises(TypeError, match="master16"):
            mf.AdamW([torch.zeros(4, dtype=dt, requires_grad=True)], layout="master16")


# ------------------------------------------------------------- the int8 block code map (layouts.int8_*)
@pytest.mark.parametrize("signed", [True, False])
def test_int8_table_is_the_documented_power_map(signed):
    t = layouts.int8_table(signed)
    assert t.dtype == torch.float32 and (t[1:] > t[:-1]).all()
    if signed:
        assert t.numel() == 255 and t[127] == 0 and t[0] == -1 and t[-1] == 1
        c = torch.arange(-127, 128, dtype=torch.float64)
        assert torch.equal(t, (c.sign() * c * c / 127 ** 2).float())
        assert torch.equal(t, -t.flip(0)), "symmetric: a code and its negation decode to opposite values"
    else:
        assert t.numel() == 256 and t[0] == 0 and t[-1] == 1
        assert torch.equal(t, (torch.arange(256, dtype=torch.float64) ** 4 / 255 ** 4).float())


@pytest.mark.parametrize("signed", [True, False])
def test_int8_encode_is_nearest_with_ties_to_the_smaller_magnitude(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 256, generator=gen) * 10.0 ** torch.randn(64 * 256, generator=gen)
    x = x if signed else x * x
    x.view(64, 256)[5] = 0  # an all-zero block
    x.view(64, 256)[6] *= 1e-30  # a scale below 2^-64: the u = 2^64 form
    codes, scale = layouts.int8_encode(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert scale.dtype == torch.float32 and torch.equal(scale, x.view(64, 256).abs().amax(1))
    assert scale[6] < layouts.INT8_TINY
    y = layouts.int8_decode(codes, scale, signed)
    assert torch.equal(y.view(64, 256)[5], torch.zeros(256))
    # nearest in the integer space: no code value (c |c| or c^4) is closer to y' = (x u) k than the chosen one
    # (brute force in float64; the unsigned midpoints are rounded to fp32, so a y' within an ulp of one may take
    # either neighbour); unsigned, a y' > 0 takes the nearest of the codes >= 1 (the floor)
    u, k = layouts.int8_factors(scale, signed)
    yi = ((x.view(64, 256) * u[:, None]) * k[:, None]).double()
    c = torch.arange(-127, 128) if signed else torch.arange(256)
    vals = (c * c.abs() if signed else c ** 4).double()
    chosen = vals[codes.view(64, 256).long() + (127 if signed else 0)]
    dist = (yi[..., None] - vals).abs()
    if not signed:
        dist[..., 0] = torch.where(yi > 0, float("inf"), dist[..., 0])
        assert (codes.view(64, 256)[yi > 0] >= 1).all() and ((yi > 0) & (yi < 0.5)).sum() > 100
    best = dist.min(-1).values
    slack = 0.0 if signed else 2.0 ** -23
    assert ((yi - chosen).abs() <= best + slack * yi.abs()).all()
    # each block's absmax element decodes exactly; encode(decode(c)) == c (codes are stable)
    assert torch.equal(y.view(64, 256).abs().amax(1), scale)
    c2, s2 = layouts.int8_encode(y, signed)
    assert torch.equal(c2, codes) and torch.equal(s2, scale)
    # a y' exactly on a midpoint takes the smaller magnitude: a block of scale K has k = 1, y' = x
    mids = layouts.int8_midpoints(signed)
    big_k = layouts.INT8_K_SIGNED if signed else layouts.INT8_K_UNSIGNED
    v = torch.zeros(256)
    v[0], v[1:1 + mids.numel()] = big_k, mids
    c3, _ = layouts.int8_encode(v, signed)
    want = torch.arange(mids.numel())
    if not signed:
        want[0] = 1  # the midpoint between 0 and 1 is > 0: the floor
    assert torch.equal(c3[1:1 + mids.numel()].long(), want)
    if signed:
        c4, _ = layouts.int8_encode(-v, signed)
        assert torch.equal(c4[1:1 + mids.numel()].long(), -torch.arange(mids.numel()))
    up = torch.nextafter(v, torch.tensor(float("inf")))
    up[0] = big_k
    c5, _ = layouts.int8_encode(up, signed)
    assert torch.equal(c5[1:1 + mids.numel()].long(), torch.arange(1, mids.numel() + 1))


def test_int8_state_bytes_per_element():
    """AdamW's two moments as codes + one fp32 scale per 256 elements: 2 * (1 + 4 / 256) B/elem <= 2.1."""
    x = torch.randn(1 << 16)
    per = 0
    for signed, v in ((True, x), (False, x * x)):
        codes, scale = layouts.int8_encode(v, signed)
        per += (codes.numel() * codes.element_size() + scale.numel() * scale.element_size()) / x.numel()
    assert per == 2 * (1 + 4 / 256) and per <= 2.1


# ---------------------------------------------------------------- the int8_state layout (reference backend)
Q_SHAPES = [(64, 256), (4096,), (4097,), (17,), (3, 5, 7), ()]  # the first two are quantized (>= 4096, % 256)
INT8_CASES = [c for c in CASES if takes_int8(c)]


def _requantize(opt, names_of):
    """The emulation: after a plain fp32 step, every quantized state goes through encode + decode."""
    for p, st in opt.state.items():
        if not layouts.int8_quantized(p):
            continue
        for k in names_of(opt):
            signed = k not in layouts.INT8_UNSIGNED
            st[k].copy_(layouts.int8_decode(*layouts.int8_encode(st[k], signed), signed))


def test_int8_state_rules_and_schedule_free():
    assert {c[0] for c in CASES} - {c[0] for c in INT8_CASES} == {"sgd_sf", "adamw_sf", "adamw_sf-inner",
                                                                  "rmsprop-centered", "rmsprop-momentum-centered"}
    with pytest.raises(ValueError, match="does not support dtype layout 'int8_state'"):
        mf.AdamWScheduleFree([torch.zeros(4096, requires_grad=True)], layout="int8_state")


@pytest.mark.parametrize("layout", ["int8_state", "int8_sr", "master16_int8", "master16_int8_sr", "bf16_state",
                                    "bf16_sr"])
def test_centered_rmsprop_is_refused_by_the_reduced_state_layouts_before_any_change(layout):
    """RMSprop(centered=True) under 8-bit state computes v - a^2 from two moments coded apart: finite gradients
    spread over a few decades gave NaN params within 2 steps (a review, 2026-12-06). So does bf16 state: bf16_sr
    within ~240 steps of gradients 1 + 0.01 N(0, 1), bf16_state where fp32 state stays finite (a review,
    2026-12-07). Refused at construction, at add_param_group, and at a step after a scheduler or an edit turns
    centered on (nothing changes)."""
    dt = torch.bfloat16 if layout.startswith("master16") or layout == "bf16_sr" else torch.float32
    make = lambda: torch.randn(4096, dtype=torch.float32).to(dt).requires_grad_()
    with pytest.raises(ValueError, match=rf"RMSprop: dtype layout '{layout}' cannot hold .* centered=True"):
        mf.RMSprop([make()], lr=1e-2, centered=True, layout=layout, backend="reference")
    opt = mf.RMSprop([make()], lr=1e-2, momentum=0.9, layout=layout, backend="reference")
    with pytest.raises(ValueError, match=r"param group 1: dtype layout .* centered=True"):
        opt.add_param_group(dict(params=[make()], centered=True))
    ps = opt.param_groups[0]["params"]
    ps[0].grad = torch.randn(4096).to(dt)
    opt.step()
    opt.param_groups[0]["centered"] = True
    before = [ps[0].detach().clone()] + [v.clone() for v in opt.state[ps[0]].values()]
    with pytest.raises(ValueError, match=r"param group 0: dtype layout .* centered=True"):
        opt.step()
    after = [ps[0].detach()] + list(opt.state[ps[0]].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("layout", ["int8_state", "bf16_state"])
def test_a_centered_rmsprop_checkpoint_is_refused_at_load_by_a_reduced_state_layout(layout):
    # (a review, 2026-12-07: it loaded, and every later step refused the group; now the load refuses, unchanged)
    src = [torch.randn(4096).requires_grad_()]
    centered = mf.RMSprop(src, lr=1e-2, centered=True)
    src[0].grad = torch.randn(4096)
    centered.step()
    ps = [torch.randn(4096).requires_grad_()]
    opt = mf.RMSprop(ps, lr=1e-2, layout=layout)
    ps[0].grad = torch.randn(4096)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    with pytest.raises(ValueError, match=f"param group 0: dtype layout '{layout}' .* cannot hold the checkpoint's "
                                         "group: centered=True .* nothing was loaded"):
        opt.load_state_dict(centered.state_dict())
    assert not opt.param_groups[0]["centered"] and set(opt.state[ps[0]]) == set(before)
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in before.items())


@pytest.mark.parametrize("layout,dtype", [("native", torch.float32), ("native", torch.bfloat16),
                                          ("master", torch.bfloat16), ("master16", torch.bfloat16)])
def test_centered_rmsprop_runs_where_the_state_is_fp32_or_torchs_own(layout, dtype):
    # fp32 state (native fp32, the master layouts) keeps v - a^2 finite on the gradients that made bf16_sr's NaN
    # (1 + 0.01 N(0, 1)); native bf16 is torch.optim's own arithmetic in the params' dtype, kept as torch runs it
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4096, generator=g).to(dtype).requires_grad_()
    opt = mf.RMSprop([p], lr=1e-3, centered=True, layout=layout)
    for _ in range(300 if dtype == torch.float32 or layout != "native" else 3):
        p.grad = (1 + 0.01 * torch.randn(4096, generator=g)).to(dtype)
        opt.step()
    assert torch.isfinite(p.detach()).all()


@pytest.mark.parametrize("case", INT8_CASES, ids=[c[0] for c in INT8_CASES])
def test_int8_state_is_the_fp32_rule_on_decoded_state(case):
    """Bit for bit: the int8_state step == the fp32 rule on the decoded state, then encode (emulated with a
    native fp32 optimizer whose quantized states are re-quantized after every step)."""
    cid, cls, kw0, _, sign, lp = case
    kw = {**kw0, **{k: v for k, v in lp.items() if k != "gscale"}}
    scale = lp.get("gscale", 1.0)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in Q_SHAPES]
    ps = [x.clone().requires_grad_() for x in init]
    rs = [x.clone().requires_grad_() for x in init]
    opt = cls(ps, backend="reference", layout="int8_state", **kw)
    ref = cls(rs, backend="reference", **kw)
    names = lambda o: o.spec.state_names(o.param_groups[0])  # noqa: E731
    signs = [torch.randn(s, generator=gen).sign() for s in Q_SHAPES]
    for _ in range(10):
        for p, r, sg in zip(ps, rs, signs):
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad = sg * (0.5 + g.abs()) if sign else g
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
        _requantize(ref, names)
    for i, (p, r) in enumerate(zip(ps, rs)):
        assert torch.equal(p, r), f"{cid} param {i}"
        st, rst = opt.state[p], ref.state[r]
        q = layouts.int8_quantized(p)
        for k in names(opt):
            if q:
                signed = k not in layouts.INT8_UNSIGNED
                assert st[k].dtype == (torch.int8 if signed else torch.uint8) and st[k].shape == p.shape
                row = p.numel() // p.shape[0] if p.dim() >= 2 else 0  # rows of whole blocks: (rows, blocks per row)
                assert st[k + "_scale"].shape == ((p.shape[0], row // 256) if row and row % 256 == 0
                                                  else (p.numel() // 256,))
                assert torch.equal(layouts.int8_decode(st[k], st[k + "_scale"], signed), rst[k]), f"{cid} {i} {k}"
            else:
                assert st[k].dtype == torch.float32 and k + "_scale" not in st
                assert torch.equal(st[k], rst[k]), f"{cid} {i} {k}"


def _adamw_int8_run(steps=30, layout="int8_state"):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(1 << 14, generator=gen).requires_grad_()
    p0 = p.detach().clone()
    opt = mf.AdamW([p], lr=1e-2, weight_decay=0.01, layout=layout, backend="reference")
    for _ in range(steps):
        p.grad = (p.detach() - 1) * torch.linspace(0.1, 10, p.numel()) + 0.1 * torch.randn(p.numel(), generator=gen)
        opt.step()
    return opt, p, p0


def test_int8_state_bytes_and_accuracy_against_fp32_state():
    opt, p, p0 = _adamw_int8_run()
    ref, r, _ = _adamw_int8_run(layout="native")
    st = opt.state[p]
    per = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step") / p.numel()
    assert per == 2 + 2 * 4 / 256 and per <= 2.1
    err = float((p - r).detach().norm() / (r.detach() - p0).norm())
    assert err < 0.03, err  # measured 9.8e-3 (deterministic: seeded, reference backend)


def test_int8_state_checkpoints_round_trip_and_convert():
    opt, p, _ = _adamw_int8_run(steps=5)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"]["codes"].dtype == torch.int8
    assert sd["state"][0]["exp_avg_sq_scale"].dtype == torch.float32
    assert set(sd["state"][0]["exp_avg"]) == {"codes"}  # (not a tensor torch.optim would take as the values)
    # int8_state -> int8_state: the codes as saved, the next steps bit for bit
    q = p.detach().clone().requires_grad_()
    o2 = mf.AdamW([q], lr=1e-2, weight_decay=0.01, layout="int8_state", backend="reference")
    o2.load_state_dict(sd)
    for k, v in opt.state[p].items():
        assert torch.equal(o2.state[q][k], v), k
    # -> an fp32-state (native) optimizer: decoded, and the optimizer keeps its layout
    n = p.detach().clone().requires_grad_()
    o3 = mf.AdamW([n], lr=1e-2, weight_decay=0.01, backend="reference")
    o3.load_state_dict(sd)
    assert o3.param_groups[0]["layout"] == "native" and set(o3.state[n]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(o3.state[n]["exp_avg"], layouts.int8_decode(opt.state[p]["exp_avg"],
                                                                   opt.state[p]["exp_avg_scale"], True))
    # ... and back: encode(decode(codes)) == codes
    b = p.detach().clone().requires_grad_()
    o4 = mf.AdamW([b], lr=1e-2, weight_decay=0.01, layout="int8_state", backend="reference")
    o4.load_state_dict(o3.state_dict())
    assert o4.param_groups[0]["layout"] == "int8_state"
    for k, v in opt.state[p].items():
        assert torch.equal(o4.state[b][k], v), k
    for o, x in ((opt, p), (o2, q), (o4, b)):
        x.grad = torch.ones_like(x)
        o.step()
    assert torch.equal(p, q) and torch.equal(p, b)


def test_int8_state_errors():
    with pytest.raises(TypeError, match="int8_state"):
        mf.AdamW([torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True)], layout="int8_state")
    p = torch.ones(4096, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = mf.SGD([p], lr=0.1, momentum=0.9, layout="int8_state", backend="reference")
    opt.step()
    opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].float()  # a state of the wrong dtype
    before = p.detach().clone()
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.step()
    assert torch.equal(p, before)


def test_int8_checkpoint_with_the_unused_code_minus_128_is_refused():
    """-128 is no code of the signed map: a checkpoint holding it is refused before anything loads (the backends'
    decodes of it differ), and the optimizer keeps its state."""
    opt, p, _ = _adamw_int8_run(steps=2)
    sd = opt.state_dict()
    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg": {"codes": sd["state"][0]["exp_avg"]["codes"].clone()}}}}
    bad["state"][0]["exp_avg"]["codes"].view(-1)[17] = -128
    q = p.detach().clone().requires_grad_()
    o2 = mf.AdamW([q], lr=1e-2, weight_decay=0.01, layout="int8_state", backend="reference")
    q.grad = torch.ones_like(q)
    o2.step()
    before = {k: v.clone() for k, v in o2.state[q].items()}
    with pytest.raises(ValueError, match="-128"):
        o2.load_state_dict(bad)
    assert all(torch.equal(o2.state[q][k], v) for k, v in before.items())
    o2.load_state_dict(sd)  # the intact checkpoint loads
    assert torch.equal(o2.state[q]["exp_avg"], sd["state"][0]["exp_avg"]["codes"])


def test_int8_codes_are_saved_apart_from_the_values(tmp_path):
    """The codes are saved one level down, {name: {"codes": codes}}: a checkpoint read where they cannot be decoded
    fails loudly (torch.optim.AdamW and SGD at their step, torch.distributed.checkpoint's in-place load into a
    native optimizer by a missing key). Before 2026-12-05 they were saved as the state's tensor, and those loads
    took them as the moments (values up to 127, silently); 2026-12-05 to 12-06 as name + "_codes", which
    torch.optim.SGD took as a missing buffer (a silent restart of its momentum) and DCP's
    flatten_optimizer_state_dict dropped. momentum_fused still loads both old forms."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 16, bias=False)
    opt = mf.AdamW(model.parameters(), lr=1e-2, layout="int8_state", backend="reference")
    for _ in range(3):
        model.weight.grad = torch.randn(16, 256)
        opt.step()
    sd = opt.state_dict()
    assert all(isinstance(sd["state"][0][k], dict) for k in ("exp_avg", "exp_avg_sq"))
    assert set(opt.state[model.weight]) >= {"exp_avg", "exp_avg_scale"}  # the live state keeps its names
    w = torch.randn(16, 256, requires_grad=True)
    sgd = mf.SGD([w], lr=0.1, momentum=0.9, layout="int8_state", backend="reference")
    w.grad = torch.randn(16, 256)
    sgd.step()
    for twin, saved in ((torch.optim.AdamW([torch.zeros(16, 256, requires_grad=True)]), sd),
                        (torch.optim.SGD([torch.zeros(16, 256, requires_grad=True)], lr=0.1, momentum=0.9),
                         sgd.state_dict())):
        twin.load_state_dict(saved)
        twin.param_groups[0]["params"][0].grad = torch.ones(16, 256)
        with pytest.raises((TypeError, AttributeError, RuntimeError)):  # (a dict where a tensor belongs)
            twin.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    native = torch.nn.Linear(256, 16, bias=False)
    nopt = mf.AdamW(native.parameters(), lr=1e-2)
    msd2, osd2 = get_state_dict(native, nopt)
    with pytest.raises(BaseException) as err:  # (DCP's CheckpointException, a BaseException, carries each rank's error)
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=str(tmp_path))
    why = str(err.value) + repr(getattr(err.value, "failures", ""))
    assert "Missing key in checkpoint state_dict" in why and "exp_avg" in why, why
    st = sd["state"][0]
    for old in ({k: (v["codes"] if isinstance(v, dict) else v) for k, v in st.items()},  # the 12-04 form
                {(k + "_codes" if isinstance(v, dict) else k): (v["codes"] if isinstance(v, dict) else v)
                 for k, v in st.items()}):  # the form of 12-05 and 12-06
        q = model.weight.detach().clone().requires_grad_()
        o2 = mf.AdamW([q], lr=1e-2, layout="int8_state", backend="reference")
        o2.load_state_dict({**sd, "state": {0: old}})
        assert all(torch.equal(o2.state[q][k], v) for k, v in opt.state[model.weight].items())


@pytest.mark.parametrize("layout", ["int8_state", "int8_sr", "master16_int8"])
def test_int8_checkpoints_through_a_flattened_state_dict_resume_bit_for_bit(layout):
    """torch.distributed.checkpoint's flatten_optimizer_state_dict=True (torchtitan's format) rebuilds a param's
    state from the live keys; the codes, saved under their state's name one level down, come back (saved as
    name + "_codes" before, 2026-12-05 to 12-06, they were dropped and the load refused)."""
    pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    dt = torch.bfloat16 if layout.startswith("master16") else torch.float32
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 256, generator=gen).to(dt) for _ in range(6)]

    def build():
        torch.manual_seed(0)
        m = torch.nn.Linear(256, 16, bias=False).to(dt)
        return m, mf.AdamW(m.parameters(), lr=1e-2, layout=layout, backend="reference")

    def run(m, o, gs):
        for g in gs:
            m.weight.grad = g.clone()
            o.step()

    want, wopt = build()
    run(want, wopt, grads)
    m, o = build()
    run(m, o, grads[:3])
    flat = get_optimizer_state_dict(m, o, options=opts)
    assert "state.weight.exp_avg.codes" in flat and "state.weight.exp_avg_scale" in flat
    m2, o2 = build()
    with torch.no_grad():
        m2.weight.copy_(m.weight)
    set_optimizer_state_dict(m2, o2, copy.deepcopy(flat), options=opts)
    run(m2, o2, grads[3:])
    assert torch.equal(m2.weight, want.weight)
    assert all(torch.equal(o2.state[m2.weight][k], v) for k, v in wopt.state[want.weight].items())


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if backends.status().get("cpu") == "available" else []))
def test_block_scales_of_the_old_flat_shape_still_resume(backend):
    """The scales of a weight with rows of whole blocks are (rows, blocks per row) since 2026-12-06 (one shape in
    one process and under FSDP2, for DCP resharding); checkpoints before hold (blocks,). Loaded by our
    load_state_dict, or written into the live state directly (ZeroRedundancyOptimizer's load), they resume as
    the uninterrupted run, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    init, grads = torch.randn(24, 512, generator=gen), [torch.randn(24, 512, generator=gen) for _ in range(5)]

    def run(steps, p=None, opt=None):
        p = init.clone().requires_grad_() if p is None else p
        opt = mf.AdamW([p], lr=1e-2, layout="int8_state", backend=backend) if opt is None else opt
        for g in steps:
            p.grad = g.clone()
            opt.step()
        return p, opt

    want, wopt = run(grads)
    assert wopt.state[want]["exp_avg_scale"].shape == (24, 2)
    p, opt = run(grads[:2])
    sd = opt.state_dict()
    flat = {k: (v.reshape(-1) if k.endswith("_scale") else v) for k, v in sd["state"][0].items()}
    old = {**sd, "state": {0: flat}}
    for how in ("load_state_dict", "written"):
        q = p.detach().clone().requires_grad_()
        o2 = mf.AdamW([q], lr=1e-2, layout="int8_state", backend=backend)
        if how == "load_state_dict":
            o2.load_state_dict(old)
        else:
            o2.state[q] = {k: ({"codes": v["codes"].clone()} if isinstance(v, dict) else v.clone())
                           for k, v in flat.items()}  # (the saved form: the step puts the codes back)
        run(grads[2:], q, o2)
        assert torch.equal(q, want), how
        for k, v in wopt.state[want].items():
            assert o2.state[q][k].shape == v.shape and torch.equal(o2.state[q][k], v), (how, k)


# ---------------------------------------------------------------- the master through torch.optim, layout edits
_BACKENDS = ["reference"] + (["cpu"] if backends.status().get("cpu") == "available" else [])


def _bf16_run(cls, layout, backend, steps):
    """A bf16 param of 4352 elements stepped ``steps`` times by ``cls(lr=1e-2)`` in ``layout``: (param,
    optimizer, the generator that drew its init and gradients, to draw on)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4352, generator=gen).to(torch.bfloat16).requires_grad_()
    opt = cls([p], lr=1e-2, layout=layout, backend=backend)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt.step()
    return p, opt, gen


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("layout", ["master", "master16"])
def test_a_master_that_went_through_torch_optim_is_not_loaded_back(layout, backend):
    """torch.optim keeps the master (or remainder) it does not know, cast to the param dtype, and never updates
    it: loaded back, it reverted torch's training (into "master16", at load already). It is now left out with a
    warning and the master restarts from the params torch trained."""
    p, a, gen = _bf16_run(mf.AdamW, layout, backend, 3)
    t = torch.optim.AdamW([p], lr=1e-2)
    t.load_state_dict(a.state_dict())
    for _ in range(5):
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        t.step()
    trained = p.detach().clone()
    b = mf.AdamW([p], lr=0.0, layout=layout, backend=backend)
    with pytest.warns(UserWarning, match="went through an optimizer that does not keep a master"):
        b.load_state_dict(t.state_dict())
    assert torch.equal(p.detach(), trained)
    b.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros_like(p)
    b.step()
    assert torch.equal(p.detach(), trained) and torch.equal(master_of(b, p), trained.float())


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("src,dst", [("master", "master16"), ("master16", "master"), ("master", "native"),
                                     ("master16_int8", "native")])
def test_a_layout_edited_after_steps_is_refused_before_anything_changes(src, dst, backend):
    """A group's layout edited from "master" to "master16" (or back, or to native) stepped on: the missing copy
    was rebuilt from the rounded param (the master's low bits lost) and the other left stale in the state, where
    a switch back or a checkpoint took it (reverting the params)."""
    p, opt, _ = _bf16_run(mf.SignSGD, src, backend, 2)  # (no rule state: only the master keys tell)
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["layout"] = dst
    with pytest.raises(ValueError, match="was the group's layout changed after its first step"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items()) and set(opt.state[p]) == set(before[1])
    opt.param_groups[0]["layout"] = src
    opt.step()


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("src", ["master16", "master16_int8"])
def test_a_master16_checkpoint_into_fp16_params_of_the_master_layout(src, backend):
    """layout="master" takes fp16 params: a master16 checkpoint loaded there decoded the fp16 bits as a bf16
    high half (masters off by hundreds). The saved param's bf16 value is read from the fp16 param, which the
    load leaves as it is (loading twice gives the same master) and the first step's check takes as the
    master's rounding: that step's master is master16's bit for bit (grads exact in both half dtypes)."""
    p, a, _ = _bf16_run(mf.AdamW, src, backend, 3)
    q = p.detach().to(torch.float16).requires_grad_()  # (the model's weights, loaded first, in fp16)
    b = mf.AdamW([q], lr=1e-2, layout="master", backend=backend)
    b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict())
    b.sync_masters()  # (the fp16 param holds the bf16 value: the master's rounding after a load, kept)
    assert torch.equal(_bits(master_of(b, q)), _bits(master_of(a, p)))
    assert torch.equal(q.detach(), p.detach().to(torch.float16))
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    p.grad, q.grad = g, g.to(torch.float16)
    a.step()
    b.step()
    assert torch.equal(_bits(master_of(b, q)), _bits(master_of(a, p)))
    assert torch.equal(q.detach(), master_of(a, p).to(torch.float16))


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("order", ["optimizer first", "model first, now fp16"])
def test_a_master_loads_whatever_the_order_and_the_models_half_dtype(order, backend):
    """torch's ``set_state_dict`` loads the optimizer before the model, and a model may move between bf16 and
    fp16: a check that dropped a master not rounding to the live param at load dropped every valid master
    there (found by a review the same day; never released). The master is kept and the run continues as the
    uninterrupted one."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(4352, generator=gen)
    grads = [torch.randn(4352, generator=gen) for _ in range(6)]
    p = init.to(torch.bfloat16).requires_grad_()
    a = mf.AdamW([p], lr=1e-2, layout="master", backend=backend)
    for g in grads[:3]:
        p.grad = g.to(torch.bfloat16)
        a.step()
    sd = copy.deepcopy(a.state_dict())
    dt = torch.bfloat16 if order == "optimizer first" else torch.float16
    q = torch.zeros(4352, dtype=dt).requires_grad_()  # (a fresh model)
    b = mf.AdamW([q], lr=1e-2, layout="master", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if order == "optimizer first":
            b.load_state_dict(sd)
            with torch.no_grad():
                q.copy_(p)
        else:
            with torch.no_grad():
                q.copy_(p.to(dt))
            b.load_state_dict(sd)
    assert torch.equal(master_of(b, q), master_of(a, p))
    for g in grads[3:]:
        p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).to(dt)  # (the same values)
        a.step()
        b.step()
    assert torch.equal(master_of(b, q), master_of(a, p))


def _int8_sgd_with_a_reset_buffer(backend):
    """(param, its int8_state SGD after one step with ``state["momentum_buffer"] = None``, the generator)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4096, generator=gen).requires_grad_()
    opt = mf.SGD([p], lr=0.1, momentum=0.9, layout="int8_state", backend=backend)
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.state[p]["momentum_buffer"] = None
    return p, opt, gen


@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_reset_int8_momentum_buffer_saves_and_loads(backend):
    """``state[p]["momentum_buffer"] = None`` on an int8 layout left its block scales beside the None: the
    optimizer's own state_dict was then refused at load as corrupt codes."""
    p, opt, gen = _int8_sgd_with_a_reset_buffer(backend)
    sd = opt.state_dict()
    q = p.detach().clone().requires_grad_()
    o2 = mf.SGD([q], lr=0.1, momentum=0.9, layout="int8_state", backend=backend)
    o2.load_state_dict(sd)
    p.grad = q.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    o2.step()
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_reset_int8_momentum_buffer_loads_into_fp32_state_without_its_scales(backend):
    p, opt, _ = _int8_sgd_with_a_reset_buffer(backend)
    o2 = mf.SGD([p], lr=0.1, momentum=0.9, backend=backend)
    o2.load_state_dict(opt.state_dict())
    o2.step()
    assert set(o2.state[p]) == {"momentum_buffer"}
    o2.load_state_dict(o2.state_dict())


def test_a_stale_master_beside_a_loaded_checkpoint_starts_again_from_the_param():
    """torch.distributed.checkpoint's partial load of a torch.optim checkpoint starts from the fresh optimizer's
    state dict, whose ``master`` (made from the fresh params) stays beside the loaded moments: before 2026-12-06
    the first step wrote that master back into the params (the model near its initialization again). The first
    step after a load now restarts a master farther than a bf16 spacing from its param, with a warning."""
    gen = torch.Generator().manual_seed(0)
    trained = torch.randn(4352, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(4352, generator=gen).to(torch.bfloat16) for _ in range(3)]
    t = torch.nn.Parameter(trained.clone())
    topt = torch.optim.AdamW([t], lr=1e-3)
    t.grad = grads[0]
    topt.step()
    q = torch.nn.Parameter(torch.zeros(4352, dtype=torch.bfloat16))  # a fresh model
    b = mf.AdamW([q], lr=1e-3, layout="master")
    q.grad = torch.zeros_like(q)
    b.step()  # (the fresh state, as get_optimizer_state_dict makes it)
    sd = b.state_dict()
    sd["state"][0].update({k: v for k, v in topt.state_dict()["state"][0].items()})  # the partial load's result
    with torch.no_grad():
        q.copy_(t)  # the model's checkpoint
    b.load_state_dict(sd)
    assert torch.equal(b.state[q]["master"], torch.zeros(4352))  # (stale until the step)
    q.grad = grads[1]
    with pytest.warns(UserWarning, match="fp32 master of param 0 of group 0 does not round to its param"):
        b.step()
    assert (q.detach().float() - t.detach().float()).abs().max() < 0.01  # one step of lr 1e-3 from the loaded model


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("src,dst", [("int8_state", "int8_state"), ("int8_state", "native"),
                                     ("native", "int8_state"), ("int8_sr", "bf16_state")])
def test_a_buffer_kept_while_its_flag_is_off_loads_converted(backend, src, dst):
    """torch keeps a momentum buffer while a scheduler holds momentum at 0; a checkpoint saved then holds it (as
    codes under the int8 layouts) where the checkpoint's group says it has none. Before 2026-12-06 its codes
    were taken as values (an int8 checkpoint into a native optimizer: momentum [95., 23., ...]) or kept as fp32
    where codes were expected (a ValueError when momentum came back); for one commit of that day it was dropped.
    It now converts as every coded state does: the resumed run equals the uninterrupted one where both keep the
    same layout, and follows the decoded buffer otherwise."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 64, generator=g) for _ in range(6)]
    p = torch.nn.Parameter(torch.randn(64, 64, generator=g))
    momentum = [0.9, 0.9, 0.0, 0.0, 0.9, 0.9]
    make = lambda x, lay: mf.SGD([x], lr=1e-2, momentum=0.9, layout=lay, backend=backend)  # noqa: E731
    opt = make(p, src)
    for i in range(3):
        opt.param_groups[0]["momentum"] = momentum[i]
        p.grad = grads[i].clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    o2 = make(q, dst)
    o2.load_state_dict(sd)
    buf = o2.state[q]["momentum_buffer"]
    if layouts.get_layout(dst).int8:
        assert buf.dtype == torch.int8 and "momentum_buffer_scale" in o2.state[q]
        if layouts.get_layout(src).int8:
            assert torch.equal(buf, opt.state[p]["momentum_buffer"])
    else:
        assert "momentum_buffer_scale" not in o2.state[q]
        want = layouts.int8_decode(opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer_scale"], True)
        assert buf.dtype == layouts.get_layout(dst).state_dtype_for(torch.float32) and \
            torch.equal(buf.float(), want.to(buf.dtype).float())
    for i in range(3, 6):
        for o, x in ((opt, p), (o2, q)):
            o.param_groups[0]["momentum"] = momentum[i]
            x.grad = grads[i].clone()
            o.step()
    if src == dst:
        assert torch.equal(p, q)
    else:
        assert (p - q).abs().max() < 1e-2  # (one rounding of the buffer apart)


@pytest.mark.parametrize("chunk", [None, 96])
def test_the_masters_checks_run_in_bounded_slices(chunk, monkeypatch):
    """The master layout's element checks (a param written between steps; the first step after a load) made
    full-size temporaries of the largest param, up to ~30 bytes an element with master16's rounding: they run
    over slices of masters.CHUNK elements now. Here a slice of 96 elements (1000-element params) gives the
    unsliced results: a written element beyond the first slice is adopted, a far one beyond it makes the master
    restart from the param after a load."""
    from momentum_fused.optim import masters
    if chunk is not None:
        monkeypatch.setattr(masters, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(1000, generator=gen).to(torch.bfloat16).requires_grad_()
    opt = mf.AdamW([p], lr=1e-2, layout="master", backend="reference")
    for _ in range(2):
        p.grad = torch.randn(1000, generator=gen).to(torch.bfloat16)
        opt.step()
    with torch.no_grad():
        p[700] = 3.0  # (a write between steps, in the eighth slice)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert abs(float(opt.state[p]["master"][700]) - 3.0) < 0.1  # adopted 3.0 before the step moved it a little
    sd = copy.deepcopy(opt.state_dict())
    q = p.detach().clone().requires_grad_()
    with torch.no_grad():
        q[900] += 1.0  # (farther than a bf16 spacing from its master: not this model's master)
    b = mf.AdamW([q], lr=1e-2, layout="master", backend="reference")
    b.load_state_dict(sd)
    q.grad = torch.zeros_like(q)
    with pytest.warns(UserWarning, match="does not round to its param"):
        b.step()
