"""The compiled CPU backend (csrc/cpu, momentum_fused/_backend_cpu.py) against the float64 reference.

Every rule x every flag combination x dtype (fp32, fp64, bf16, fp16; sign rules in fp64, and in fp32
with gradients of a fixed sign per element so that no sign is near a tie), >= 10 steps, params and every
state tensor, odd shapes (0-d, 0-numel, 1, 15, 17, 4097, 65537, a 3-d one), two param groups with
different hyperparameters merged into one bucket. Plus: 300 tensors, found_inf, grad_scale, a 0-d tensor
lr, non-contiguous params/grads/state (copied in and out), thread-count and ISA-variant bit-invariance,
the storage roundings bit-exact against torch, the ops in torch.ops.momentum_fused, argument errors
that leave everything unchanged. Run with MOMENTUM_FUSED_BACKEND unset.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends, layouts
from momentum_fused.specs import SPECS

from tolerances import tol

_STATUS = backends.status().get("cpu", "unavailable: momentum_fused._backend_cpu is not part of this tree")
if _STATUS != "available":
    pytest.skip(f"cpu backend not built: {_STATUS}", allow_module_level=True)

import momentum_fused._backend_cpu as bcpu  # noqa: E402

OPS = torch.ops.momentum_fused
from momentum_fused import _C_cpu  # noqa: E402  (the eager entry point of the same op)


def _fast_entry(*args):
    assert _C_cpu.cpu_step(*args) == _C_cpu.DONE, "the fast entry refused plain contiguous tensors"


# the op's two bindings: the registered op, and the pybind entry the backend calls in eager mode
ENTRIES = {"torch.ops": lambda *a: OPS.cpu_step(*a), "_C_cpu": _fast_entry}
from backend_cases import (CASES, DTYPES, ISA_RANK, MUON_CASES, MUON_SHAPES, SHAPES, STEPS, _M, _V,  # noqa: E402,F401
                           _case_params, _compare, _groups, _muon_case_params, _params, _run)

@pytest.mark.parametrize("cls,kw0,kw1,dtype,sign,lp", _case_params())
def test_parity_vs_float64_reference(cls, kw0, kw1, dtype, sign, lp):
    opt, ref, ps, rs = _run(cls, kw0, kw1, dtype, sign=sign, lp=lp)
    _compare(opt, ref, ps, rs, dtype)


@pytest.mark.parametrize("cls,kw0,kw1,dtype,sign,lp", _muon_case_params())
def test_muon_parity_vs_float64_reference(cls, kw0, kw1, dtype, sign, lp):
    """Muon's two elementwise passes on the cpu kernels (the NS phase in float64 on both sides)."""
    opt, ref, ps, rs = _run(cls, kw0, kw1, dtype, shapes=MUON_SHAPES, lp=lp)
    _compare(opt, ref, ps, rs, dtype)


def test_every_rule_and_flag_combination_is_covered():
    """The case table reaches every rule of specs.SPECS the backend claims, with every flags value (a
    multi-phase rule reaches the rules of its elementwise passes)."""
    seen = {}
    for _, cls, kw0, kw1, _, _ in CASES + MUON_CASES:
        p = torch.zeros(1, 1, requires_grad=True)
        opt = cls(_groups([p, torch.zeros(1, 1, requires_grad=True)], kw0, kw1), backend="cpu")
        inner = getattr(opt, "_core", opt)  # momentum_fused.Muon steps its Muon groups by an inner optimizer
        for g in inner.param_groups:
            for sp in [inner.spec] + [SPECS[ph.rule] for ph in inner.spec.phases if hasattr(ph, "rule")]:
                seen.setdefault(sp.name, set()).add(tuple(sp.make_flags(g)))
    for name, spec in SPECS.items():
        if name not in bcpu.RULE_IDS:
            continue
        assert name in seen, f"rule {name} has no case"
        n = len(spec.flag_names)
        expected = {tuple(bool(m >> i & 1) for i in range(n)) for m in range(1 << n)}
        if name == "sgd":  # nesterov without momentum is invalid
            expected.discard((False, True))
        assert expected <= seen[name], f"rule {name}: flags not covered: {expected - seen[name]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_300_tensors(dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 3000, (300,), generator=gen)]
    shapes[7] = ()
    opt, ref, ps, rs = _run(mf.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(lr=2e-2), dtype, shapes=shapes)
    _compare(opt, ref, ps, rs, dtype)
    opt, ref, ps, rs = _run(mf.SGD, dict(lr=0.05, momentum=0.9), dict(lr=0.02), dtype, shapes=shapes, lp=_M)
    _compare(opt, ref, ps, rs, dtype)


def test_300_tensors_sign_rule_float64():
    shapes = [(int(n),) for n in torch.randint(0, 2000, (300,), generator=torch.Generator().manual_seed(4))]
    opt, ref, ps, rs = _run(mf.Lion, dict(lr=1e-2, weight_decay=0.1), dict(lr=2e-2), torch.float64,
                            shapes=shapes, sign=True)
    _compare(opt, ref, ps, rs, torch.float64)


def _snapshot(opt, ps):
    out = [p.detach().clone() for p in ps]
    for p in ps:
        for k, v in opt.state[p].items():
            out.append(v.clone() if isinstance(v, torch.Tensor) else v)
    return out


@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2)), (mf.SGD, dict(lr=0.1, momentum=0.9)),
                                    (mf.Lion, dict(lr=1e-2))])
def test_found_inf_leaves_everything_bit_identical(cls, kw):
    ps, _, gen = _params([(17,), (4097,), ()], torch.float32, 1)
    opt = cls(ps, backend="cpu", **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before = _snapshot(opt, ps)
    opt.found_inf = torch.tensor(1.0)
    opt.grad_scale = torch.tensor(2.0)
    for p in ps:
        p.grad = torch.full(p.shape, float("inf"))
    opt.step()
    after = _snapshot(opt, ps)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.dtype == b.dtype
        else:
            assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_scale(dtype):
    """grad_scale = 1024 with gradients scaled by 1024 equals the unscaled run (powers of two: exact)."""
    shapes = [(15,), (4097,)]
    ps, _, gen = _params(shapes, dtype, 2)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = mf.Adam(ps, lr=1e-2, weight_decay=0.01, backend="cpu")
    b = mf.Adam(qs, lr=1e-2, weight_decay=0.01, backend="cpu")
    for _ in range(STEPS):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad = g * 1024
            q.grad = g
        a.grad_scale = torch.tensor(1024.0)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])


def test_tensor_lr():
    kw0 = dict(lr=torch.tensor(1e-2), weight_decay=0.1)
    opt, ref, ps, rs = _run(mf.AdamW, kw0, dict(lr=torch.tensor(5e-3)), torch.float32)
    _compare(opt, ref, ps, rs, torch.float32)
    opt, ref, ps, rs = _run(mf.SGD, dict(lr=torch.tensor(0.05), momentum=0.9), {}, torch.float64)
    _compare(opt, ref, ps, rs, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_copied_in_and_out(dtype):
    """Transposed params (state inherits the strides), strided-slice params (not dense) and
    non-contiguous grads: updated in place through copies, bytes outside the views untouched."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(12, 40, generator=gen, dtype=torch.float64).to(dtype)
    keep = base.clone()
    p_t = torch.randn(9, 7, generator=gen, dtype=torch.float64).to(dtype).t().detach().requires_grad_()
    p_s = base[:, ::3].detach().requires_grad_()  # a view into base with stride 3
    p_c = torch.randn(33, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    ps = [p_t, p_s, p_c]
    assert not p_t.is_contiguous() and not p_s.is_contiguous()
    rs = [p.detach().double().clone().requires_grad_() for p in ps]
    ptrs = [p.data_ptr() for p in ps]
    opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="cpu")
    ref = mf.AdamW(rs, lr=1e-2, weight_decay=0.1, backend="reference")
    for _ in range(STEPS):
        for p, r in zip(ps, rs):
            g = torch.randn(tuple(reversed(p.shape)), generator=gen, dtype=torch.float64).to(dtype).t()
            assert not g.is_contiguous() or g.dim() < 2
            p.grad = g
            r.grad = g.double()
        opt.step()
        ref.step()
    _compare(opt, ref, ps, rs, dtype)
    assert [p.data_ptr() for p in ps] == ptrs
    assert not opt.state[p_t]["exp_avg"].is_contiguous()  # the state kept its strides and was updated
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, ::3] = False
    assert torch.equal(base[mask], keep[mask])  # elements between the strided view's are untouched
    assert not torch.equal(base[:, ::3], keep[:, ::3])


def _run_adamw_bits():
    gen = torch.Generator().manual_seed(7)
    shapes = [(100_003,), (17,), (70_001,), (3,)]
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
        opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="cpu")
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        out += [p.detach().clone() for p in ps] + [opt.state[p]["exp_avg_sq"].clone() for p in ps]
    spec = mf.specs.SPECS["adam"]  # the dtype layouts, through the backend (bf16_sr: the hash vectorized too)
    for lay, dtype in (("bf16_state", torch.float32), ("master", torch.bfloat16), ("master", torch.float16),
                       ("bf16_sr", torch.bfloat16)):
        b = backends.resolve("cpu", spec, torch.device("cpu"), dtype)
        ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        sd = mf.layouts.get_layout(lay).state_dtype_for(dtype)
        sts = [tuple(torch.zeros(p.shape, dtype=sd) for _ in range(3)) + ((p.float(),) if lay == "master" else ())
               for p in ps]
        for t in (1, 2, 3):
            gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
            sc = spec.Scalars(1e-2, 0.1, 0.9, 0.999, 1e-8, 1e-2 / (1 - 0.9 ** t), (1 - 0.999 ** t) ** 0.5, 1.0)
            keys = [mf.layouts.sr_key(3, t, i) for i in range(len(ps))] if lay == "bf16_sr" else None
            b.apply(spec, spec.Flags(True, True), ps, gs, sts, [sc] * len(ps), layout=mf.layouts.get_layout(lay),
                    sr_keys=keys)
        out += ps + [x for st in sts for x in st]
    return out


def test_thread_count_does_not_change_bits(threads):
    threads(1)
    one = _run_adamw_bits()
    threads(2, at_least=True)
    two = _run_adamw_bits()
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _every_rule_bits():
    """Every CASES row in every layout whose kernels convert storage (native bf16/fp16, bf16_state, master
    bf16/fp16, bf16_sr, master16; the blocked form of cpu_kernels_impl.inc), 3 steps on one bucket of
    LAYOUT_SHAPES (two threads split it mid-tensor), and Muon's two passes in bf16; then AdamW of
    _run_adamw_bits. Every param and state tensor, as {name: tensor}."""
    out = {}
    runs = [("native", torch.bfloat16), ("native", torch.float16), ("bf16_state", torch.float32),
            ("master", torch.bfloat16), ("master", torch.float16), ("bf16_sr", torch.bfloat16)]
    for cid, cls, kw0, kw1, sign, lp in CASES:
        for lay, dt in runs:
            r = LayoutRun(cls, kw0, kw1, lay, dt, sign, lp)
            for _ in range(3):
                r.step()
            for i, (p, st) in enumerate(zip(r.ps, r.states)):
                out[f"{cid}/{lay}/{dt}/{i}/p"] = p.clone()
                out.update({f"{cid}/{lay}/{dt}/{i}/s{j}": s.clone() for j, s in enumerate(st)})
        if "master16" in cls.supported_layouts:
            gen = torch.Generator().manual_seed(3)
            ps = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in ((17,), (33_001,), (5, 7))]
            opt = cls([dict(params=ps[:1], **kw0), dict(params=ps[1:], **{**kw0, **kw1})], layout="master16",
                      backend="cpu")
            for _ in range(3):
                for p in ps:
                    p.grad = (0.5 + torch.rand(p.shape, generator=gen)).bfloat16() if sign else \
                        torch.randn(p.shape, generator=gen).bfloat16()
                opt.step()
            for i, p in enumerate(ps):
                out[f"{cid}/master16/{i}/p"] = p.detach().clone()
                out.update({f"{cid}/master16/{i}/{k}": v.clone() for k, v in opt.state[p].items()
                            if torch.is_tensor(v)})
    gen = torch.Generator().manual_seed(4)
    ps = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in ((65, 520), (33, 17))]
    opt = mf.Muon(ps, lr=0.02, backend="cpu")
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    for i, p in enumerate(ps):
        out[f"muon/{i}/p"] = p.detach().clone()
        out.update({f"muon/{i}/{k}": v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    out.update({f"adamw/{i}": t for i, t in enumerate(_run_adamw_bits())})
    out.update(_special_values_bits())
    return out


# fp32 values that every store form must round alike: NaNs of both signs with payloads, infinities, signed zeros,
# subnormals of fp32, bf16 and fp16, values just below the fp16 overflow, and exact ties of bf16 and fp16 rounding
_SPECIAL = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-39, 6e-8, -3e-5,
            65519.0, 65520.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 1.0 + 2.0 ** -11,
            1.0 + 3 * 2.0 ** -11, 3.0e38]
_PAYLOAD_NANS = [0x7FC01234, 0xFFA00001, 0x7F800001]  # quiet with a payload, negative signaling, signaling


def _special_values_bits():
    """Every CASES row, one bucket in native bf16/fp16, master bf16/fp16 and bf16_sr whose params (the master in the
    master layouts) and gradients hold _SPECIAL values among random ones (a param special where the gradient is
    finite and the reverse, so that no operation meets two NaNs, whose surviving payload IEEE leaves open), 2 steps:
    the NaN, infinity, zero-sign, subnormal and tie rules of every load and store form."""
    out = {}
    n = 4097  # and 1031: blocks and a tail
    sp = torch.tensor(_SPECIAL, dtype=torch.float32)
    nan_bits = torch.tensor(_PAYLOAD_NANS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    pvals = torch.cat([sp, nan_bits])
    for cid, cls, kw0, kw1, sign, lp in CASES:
        for lay, dt in (("native", torch.bfloat16), ("native", torch.float16), ("master", torch.bfloat16),
                        ("master", torch.float16), ("bf16_sr", torch.bfloat16)):
            r = LayoutRun(cls, kw0, kw1, lay, dt, sign, lp, shapes=[(n,), (1031,)])
            gen = torch.Generator().manual_seed(5)
            k = len(pvals)
            grad_at = []
            for i, p in enumerate(r.ps):
                at = torch.randperm(p.numel(), generator=gen)[:k + len(sp)]
                src = r.states[i][-1] if lay == "master" else p  # what the step reads as the param
                src.view(-1)[at[:k]] = pvals.to(src.dtype)
                grad_at.append(at[k:])
            for t in range(2):
                gs = [torch.randn(p.shape, generator=gen).to(dt) for p in r.ps]
                for g, at in zip(gs, grad_at):
                    g.view(-1)[at] = sp.to(dt)
                keys = [layouts.sr_key(7, t, i) for i in range(len(r.ps))] if r.lay.stochastic else None
                r.backend.apply(r.spec, r.flags, r.ps, gs, [tuple(s) for s in r.states], r.packs(), layout=r.lay,
                                sr_keys=keys)
            for i, (p, st) in enumerate(zip(r.ps, r.states)):
                out[f"special/{cid}/{lay}/{dt}/{i}/p"] = p.clone()
                out.update({f"special/{cid}/{lay}/{dt}/{i}/s{j}": s.clone() for j, s in enumerate(st)})
    return out


@pytest.mark.parametrize("isa", bcpu.CPU_ISAS)
def test_isa_variants_give_the_same_bits(tmp_path, isa):
    """Each variant this CPU can run (forced with MOMENTUM_FUSED_CPU_ISA, in a subprocess) and the variant it
    picks agree bit for bit on every rule and storage layout (no FMA contraction anywhere; the same rounding in
    every load and store form: baseline's portable loops, avx2's 256-bit blocks, avx512's, avx512w's 512-bit
    ones)."""
    have = OPS.cpu_isa()
    if isa == have:
        pytest.skip(f"{isa} is the variant this process runs (the other cases compare it)")
    if ISA_RANK[isa] > ISA_RANK[have]:
        pytest.skip(f"this CPU runs the {have} variant at most: {isa} needs instructions it lacks")
    out = tmp_path / "bits.pt"
    code = ("import sys, torch; sys.path.insert(0, %r); import test_cpu_backend as t; "
            "assert torch.ops.momentum_fused.cpu_isa() == %r; torch.save(t._every_rule_bits(), %r)"
            % (os.path.dirname(__file__), isa, str(out)))
    env = {**os.environ, "MOMENTUM_FUSED_CPU_ISA": isa}
    env.pop("MOMENTUM_FUSED_BACKEND", None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    theirs = torch.load(out)
    mine = _every_rule_bits()
    assert theirs.keys() == mine.keys()
    differ = [k for k in mine if not torch.equal(_bits(theirs[k]), _bits(mine[k]))]
    assert not differ, f"{len(differ)} of {len(mine)} tensors differ between {isa} and {have}: {differ[:8]}"


def test_the_variant_follows_the_cpu_and_the_setting(tmp_path):
    """With MOMENTUM_FUSED_CPU_ISA unset the kernels run avx512w on an AMD CPU of family 0x1A (Zen 5) or later
    with AVX-512 F/VL/BW/DQ, avx512 on other AVX-512 CPUs (cpu_kernels.cpp); avx512 and avx512w name the tuning
    on any AVX-512 CPU, and a cap never raises the instruction set."""
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "flags" not in info or sys.platform != "linux":
        pytest.skip("needs Linux /proc/cpuinfo to know what this CPU is")
    first = info.split("\n\n")[0]
    field = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in first.splitlines() if ":" in ln}
    flags = set(field.get("flags", "").split())
    avx512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma", "f16c", "bmi2"} <= flags
    zen5 = field.get("vendor_id") == "AuthenticAMD" and int(field.get("cpu family", "0")) >= 0x1A

    def isa_with(value):
        env = {k: v for k, v in os.environ.items() if k != "MOMENTUM_FUSED_CPU_ISA"}
        if value is not None:
            env["MOMENTUM_FUSED_CPU_ISA"] = value
        r = subprocess.run([sys.executable, "-c", "import torch, momentum_fused; "
                            "print(torch.ops.momentum_fused.cpu_isa())"], env=env, capture_output=True, text=True,
                           check=True, timeout=120)
        return r.stdout.strip()

    auto = isa_with(None)
    if avx512:
        assert auto == ("avx512w" if zen5 else "avx512")
        assert isa_with("avx512") == "avx512" and isa_with("avx512w") == "avx512w"
    else:
        assert auto in ("baseline", "avx2")
        assert isa_with("avx512w") == auto  # a cap, never a raise
    assert isa_with("baseline") == "baseline"


def test_storage_rounding_matches_torch_bit_for_bit():
    gen = torch.Generator().manual_seed(8)
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 2.0 ** -24,
                            2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -14, 6e-8, 1e-45, 3.4e38, 1.0 + 2.0 ** -8,
                            1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11])
    x = torch.cat([x, special, -special])
    finite = x[~torch.isnan(x)]
    for dt in (torch.bfloat16, torch.float16):
        mine = OPS.round_to(finite.contiguous(), dt)
        assert torch.equal(mine.view(torch.int16), finite.to(dt).view(torch.int16)), dt
        assert torch.equal(OPS.widen(mine), mine.float())
        nan = OPS.round_to(torch.tensor([float("nan")]), dt)
        assert torch.isnan(nan.float()).all()
    every_half = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    for dt in (torch.bfloat16, torch.float16):
        h = every_half.view(dt)
        w = OPS.widen(h)
        ok = torch.isnan(h.float())
        assert torch.equal(w[~ok], h.float()[~ok]) and torch.isnan(w[ok]).all()


def test_ops_registered_and_abi_mirror():
    for name in ("cpu_step", "rule_id", "num_states", "num_scalars", "cpu_isa", "round_to", "widen"):
        assert hasattr(OPS, name), name
    assert OPS.cpu_isa() in bcpu.CPU_ISAS
    for name, rid in bcpu.RULE_IDS.items():
        assert OPS.rule_id(name) == rid
        if name in SPECS:
            assert OPS.num_scalars(rid) == len(SPECS[name].scalar_names)
    assert OPS.rule_id("no_such_rule") == -1
    # rmsprop state counts follow the state_names order square_avg[, momentum_buffer][, grad_avg]
    spec = SPECS["rmsprop"]
    for mom in (0.0, 0.9):
        for centered in (False, True):
            g = dict(momentum=mom, centered=centered)
            assert OPS.num_states(bcpu.RULE_IDS["rmsprop"], bcpu.flags_to_int("rmsprop", spec.flags(g))) == \
                len(spec.state_names(g))


def test_default_choice_is_cpu_and_unsupported_reasons():
    if os.environ.get(backends.ENV_VAR):
        pytest.skip(f"{backends.ENV_VAR} is set, which overrides the automatic choice this test checks")
    spec = SPECS["adam"]
    assert backends.resolve(None, spec, torch.device("cpu"), torch.float32).name == "cpu"
    b = backends._REGISTRY["cpu"]
    assert b.supports(spec, torch.device("cpu"), torch.bfloat16) is None
    why = b.supports(spec, torch.device("cpu"), torch.float8_e4m3fn)
    assert why and "float8" in why and "supported" in why

    class Fake:
        name = "no_such_rule"

    why = b.supports(Fake(), torch.device("cpu"), torch.float32)
    assert why and "no_such_rule" in why and "no CPU kernel" in why
    # rules that exist but have no kernel are refused by name, never silently run elsewhere
    for name, sp in SPECS.items():
        if name not in bcpu.RULE_IDS:
            assert b.supports(sp, torch.device("cpu"), torch.float32) is not None


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_bad_arguments_raise_before_any_write(entry):
    ps = [torch.randn(10), torch.randn(10)]
    gs = [torch.randn(10), torch.randn(10)]
    st = [torch.zeros(10), torch.zeros(10), torch.zeros(10), torch.zeros(10)]
    sc = torch.tensor([[1e-3, 0.0, 0.9, 0.999, 1e-8, 1e-2, 0.03, 1.0]] * 2, dtype=torch.float64)
    before = [t.clone() for t in ps + st]
    rid = bcpu.RULE_IDS["adam"]
    bad = [
        (ps, gs, st[:3], sc, rid, 0, "state tensors"),
        (ps, [gs[0], gs[1].double()], st, sc, rid, 0, "dtype"),
        (ps, [gs[0], torch.randn(11)], st, sc, rid, 0, "elements"),
        # mixed devices: the registered op dispatches to its Meta (fake) kernel then, which checks devices too
        (ps, [gs[0], torch.randn(10, device="meta")], st, sc, rid, 0, r"grads\[1\] is on meta, expected cpu"),
        (ps, gs, st, sc[:, :5].contiguous(), rid, 0, "scalars"),
        (ps, gs, st, sc.float(), rid, 0, "scalars"),
        (ps, gs, st[:3] + [torch.zeros(20)[::2]], sc, rid, 0, "contiguous"),
        (ps, gs, st, sc, 99, 0, "rule"),
        (ps, gs, st, sc, rid, 8, "flags"),
        ([p.int() for p in ps], [g.int() for g in gs], [s.int() for s in st], sc, rid, 0, "dtype"),
    ]
    if entry == "_C_cpu":  # the dispatcher would answer these itself (no kernel for Meta-only / SparseCPU)
        bad += [
            ([p.to("meta") for p in ps], [g.to("meta") for g in gs], [s.to("meta") for s in st], sc, rid, 0,
             "params must be cpu tensors, got one on meta"),
            (ps, [gs[0], gs[1].to_sparse()], st, sc, rid, 0, r"grads\[1\] is not strided"),
        ]
    for p_, g_, s_, sc_, r_, f_, match in bad:
        if entry == "_C_cpu" and match == "contiguous":  # the fast entry hands it back for copies
            assert _C_cpu.cpu_step(p_, g_, s_, sc_, r_, f_) == _C_cpu.NOT_CONTIGUOUS
            continue
        with pytest.raises(RuntimeError, match=match):
            ENTRIES[entry](p_, g_, s_, sc_, r_, f_)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + st))


def test_fast_entry_argument_types_and_subclasses():
    """The pybind entry takes lists (or tuples) of tensors (states also per-param tuples), names a wrong
    element, and hands back to the caller, having done nothing: tensor subclasses that dispatch to Python
    (for the registered op) and non-contiguous tensors (for copies)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    p, g, m = torch.ones(4), torch.ones(4), torch.zeros(4)
    sc = torch.tensor([[0.1, 0.0, 0.9, 0.0, 1.0, 1.0]], dtype=torch.float64)
    rid = bcpu.RULE_IDS["sgd"]
    counts = [t._use_count() for t in (p, g, m)]  # the entry borrows: no reference may be gained or lost
    with pytest.raises(TypeError, match="params must be a list of tensors"):
        _C_cpu.cpu_step(p, [g], [m], sc, rid, 1)
    with pytest.raises(TypeError, match=r"states\[0\] is a float, expected a Tensor"):
        _C_cpu.cpu_step([p], [g], [1.0], sc, rid, 1)
    with pytest.raises(TypeError, match=r"states\[0\]\[1\] is a NoneType, expected a Tensor"):
        _C_cpu.cpu_step([p], [g], [(m, None)], sc, rid, 1)
    with FakeTensorMode():
        fake = torch.ones(4)
    assert _C_cpu.cpu_step([fake], [g], [m], sc, rid, 1) == _C_cpu.PYTHON_DISPATCH
    assert _C_cpu.cpu_step([p], [torch.ones(8)[::2]], [m], sc, rid, 1) == _C_cpu.NOT_CONTIGUOUS
    assert torch.equal(m, torch.zeros(4)) and torch.equal(p, torch.ones(4))
    assert _C_cpu.cpu_step((p,), (g,), [(m,)], sc, rid, 1) == _C_cpu.DONE  # momentum 0.9 x 0 + g, p -= 0.1 m
    assert torch.equal(m, g) and torch.allclose(p, torch.full((4,), 0.9))
    with pytest.raises(RuntimeError, match="rule"):
        _C_cpu.cpu_step([p], [g], [m], sc, 99, 1)
    assert [t._use_count() for t in (p, g, m)] == counts


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_direct_op_call_matches_reference(entry):
    """cpu_step called directly, on tensors that require grad (as an optimizer's params do)."""
    spec = SPECS["adam"]
    p = torch.randn(1000, requires_grad=True)
    g = torch.randn(1000)
    m, v = torch.zeros(1000), torch.zeros(1000)
    s = spec.Scalars(1e-2, 0.1, 0.9, 0.999, 1e-8, 1e-2 / 0.1, (1 - 0.999) ** 0.5, 1.0)
    pr, mr, vr = (t.detach().double().clone() for t in (p, m, v))
    flags = spec.Flags(True, False)
    with torch.no_grad():
        ENTRIES[entry]([p], [g], [m, v], torch.tensor([list(s)], dtype=torch.float64), bcpu.RULE_IDS["adam"],
                       bcpu.flags_to_int("adam", flags))
    mf.reference.RULES["adam"](pr, g.double(), (mr, vr), s, flags)
    for a, e in ((p, pr), (m, mr), (v, vr)):
        torch.testing.assert_close(a.detach().double(), e, **tol(torch.float32))


# ================================================================================== dtype layouts
# The backend itself (backends.resolve("cpu", ...).apply), every rule of CASES x every layout of
# momentum_fused/layouts.py, against the same layout run in float64 math (backend_cases.LayoutRun: each
# step computes in float64 from the STORED values and rounds with the layout's rounding).
from momentum_fused import layouts as LAY  # noqa: E402
from backend_cases import (ALL_LAYOUTS, LayoutRun, _adam_pack, _bits, _layout_case_params,  # noqa: E402
                           check_layout_stores_bit_exact)


def test_cpu_backend_declares_every_layout():
    assert tuple(LAY.LAYOUTS)[:len(ALL_LAYOUTS)] == ALL_LAYOUTS
    # the base four (tested here) and the compressed three (tests/test_compressed_cpu.py): all of them
    assert backends._REGISTRY["cpu"].layouts == tuple(LAY.LAYOUTS)
    assert tuple(bcpu.LAYOUT_CODES) == tuple(LAY.LAYOUTS)


@pytest.mark.parametrize("cls,kw0,kw1,lay,dtype,sign,lp", _layout_case_params())
def test_layout_parity_vs_rounded_float64(cls, kw0, kw1, lay, dtype, sign, lp):
    run = LayoutRun(cls, kw0, kw1, lay, dtype, sign, lp)
    for _ in range(STEPS):
        run.step()
    run.compare()


@pytest.mark.parametrize("lay,dtype", [("bf16_sr", torch.bfloat16), ("master", torch.bfloat16),
                                       ("master", torch.float16), ("bf16_state", torch.float32)])
def test_layout_stores_bit_exact(lay, dtype, threads):
    """backend_cases.check_layout_stores_bit_exact, with two threads (a 200,003-element tensor is split
    between them: the SR element index of the second half starts mid-tensor)."""
    threads(2)
    check_layout_stores_bit_exact(lay, dtype)


# ---- stochastic rounding: the hash, determinism, keys, unbiasedness
_SGD = SPECS["sgd"]
_SR = LAY.get_layout("bf16_sr")


def _sgd_sr_step(ps, gs, keys, lr):
    """Plain SGD (no momentum, no weight decay) under bf16_sr: p <- SR(p - lr g), one bucket."""
    b = backends.resolve("cpu", _SGD, torch.device("cpu"), torch.bfloat16)
    sc = _SGD.Scalars(lr, 0.0, 0.0, 0.0, 1.0, 1.0)
    b.apply(_SGD, _SGD.Flags(False, False), ps, gs, [() for _ in ps], [sc] * len(ps), layout=_SR, sr_keys=keys)


def test_sr_hash_matches_layouts_bit_for_bit():
    """storage.h's store_sr (through the sr_round op) against layouts.sr_round_bf16 on random fp32 bit
    patterns, the specials (inf, NaN, max finite, subnormals, ties), several keys and buffers; element
    indices >= 2^32 (the hi32 mix) against layouts.lowbias32 on Python ints."""
    gen = torch.Generator().manual_seed(21)
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 3.4028235e38, 1e-45,
                            1.0 + 2.0 ** -8, 1.0 - 2.0 ** -9, 1.0 + 2.0 ** -9 + 2.0 ** -20])
    x = torch.cat([bits.view(torch.float32), special, -special, torch.tensor([float("nan"), -float("nan")])])
    nan = torch.isnan(x)
    for key, buf in ((0, 0), (1, 1), (0xFFFFFFFF, 2), (0x9E3779B9, 3), (123456789, 7)):
        mine, ref = OPS.sr_round(x, key, buf), LAY.sr_round_bf16(x, key, buf)
        assert torch.equal(mine.view(torch.int16)[~nan], ref.view(torch.int16)[~nan]), (key, buf)
        assert torch.isnan(mine.float()[nan]).all()
    # indices beyond 2^32: r(i) by the docstring formula with Python ints
    off = (5 << 32) + 2 ** 32 - 7  # crosses a 2^32 boundary inside the tensor
    vals = torch.rand(64, generator=gen) + 1.0
    key, buf = 0xDEADBEEF, 2
    mine = OPS.sr_round(vals, key, buf, off).view(torch.int16).to(torch.int64) & 0xFFFF
    kb = (key + buf * LAY.GOLDEN) & LAY.M32
    u = vals.view(torch.int32).to(torch.int64) & LAY.M32
    for e in range(64):
        i = off + e
        r = LAY.lowbias32((i & LAY.M32) ^ kb ^ (((i >> 32) * LAY.HI_MULT) & LAY.M32)) & 0xFFFF
        assert int(mine[e]) == (int(u[e]) + r) >> 16, e
    assert not torch.equal(OPS.sr_round(vals, key, buf, 0), OPS.sr_round(vals, key, buf, off))


def _half_ulp_values(n, gen):
    """bf16 values p and gradients g with p - 2^-10 g exactly halfway between two bf16 values (fp32 exact)."""
    p = (torch.rand(n, generator=gen) + 1.0).to(torch.bfloat16)  # [1, 2): bf16 ulp 2^-7
    return p, torch.full((n,), -4.0, dtype=torch.bfloat16)  # -lr g = 2^-8 = half an ulp


def test_sr_deterministic_for_a_key_and_different_across_keys():
    gen = torch.Generator().manual_seed(22)
    p0, g = _half_ulp_values(100_000, gen)
    runs = {}
    for key in (7, 7, 8):
        p = p0.clone()
        _sgd_sr_step([p], [g], [key], 2.0 ** -10)
        runs.setdefault(key, []).append(p)
    a, b = runs[7]
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # same key: same bits
    up = a.float() > p0.float()
    assert torch.equal(up | (a.float() == p0.float()), torch.ones_like(up))  # either neighbour, never else
    frac = up.float().mean().item()
    assert 0.45 < frac < 0.55, frac  # a tie rounds up half the time
    differ = (runs[8][0].view(torch.int16) != a.view(torch.int16)).float().mean().item()
    assert 0.4 < differ < 0.6, differ  # another key: independent bits, about half differ


def test_sr_mean_over_many_keys_is_the_fp32_value():
    """K tensors, one key each, in ONE bucket: the mean of the K stochastic roundings of x = p - lr g (fp32
    exact, at 16 fractions of a bf16 ulp) is x within 5 standard deviations of the K-sample mean."""
    K, n = 400, 256
    f = (torch.arange(n) % 16).float() / 16  # the fraction of an ulp above p
    p0 = (1.0 + torch.arange(n).float() * 2.0 ** -7).to(torch.bfloat16)  # exact, ulp 2^-7 (or 2^-6 above 2)
    ulp = torch.where(p0.float() >= 2.0, 2.0 ** -6, 2.0 ** -7)
    lr = 2.0 ** -10
    g = (-(f * ulp) / lr).to(torch.bfloat16)
    x = p0.float() - lr * g.float()
    assert torch.equal(x, p0.float() + f * ulp)  # exact in fp32
    ps = [p0.clone() for _ in range(K)]
    _sgd_sr_step(ps, [g] * K, [LAY.sr_key(5, 0, k) for k in range(K)], lr)
    mean = torch.stack([p.float() for p in ps]).mean(0)
    sigma = ulp * torch.sqrt(f * (1 - f) / K)
    assert ((mean - x).abs() <= 5 * sigma + 1e-7).all(), ((mean - x).abs() / (sigma + 1e-12)).max()
    assert torch.equal(mean[f == 0], x[f == 0])  # representable values never move
    assert ((mean - x).abs() < 0.02 * ulp).float().mean() > 0.5  # and SR is not RNE (RNE: |err| up to ulp/2)


# ---- bad layouts: a clear error, nothing written
def _layout_bucket(lay, dtype, n=2, numel=10):
    sd = LAY.get_layout(lay).state_dtype_for(dtype)
    ps = [torch.randn(numel).to(dtype) for _ in range(n)]
    gs = [torch.randn(numel).to(dtype) for _ in range(n)]
    sts = [[torch.randn(numel).abs().to(sd) for _ in range(2)] + ([p.float()] if lay == "master" else [])
           for p in ps]
    return ps, gs, sts


def test_bad_layout_arguments_raise_before_any_write():
    spec, flags = SPECS["adam"], SPECS["adam"].Flags(True, False)
    sc = [_adam_pack(1)] * 2
    b = backends.resolve("cpu", spec, torch.device("cpu"), torch.float32)
    packs = backends.pack_table(sc, len(spec.scalar_names))
    rid, fl = bcpu.RULE_IDS["adam"], bcpu.flags_to_int("adam", flags)
    keys = torch.tensor([1, 2], dtype=torch.int64)
    everything = []

    def case(lay, dtype):
        ps, gs, sts = _layout_bucket(lay, dtype)
        everything.append([(t, t.clone()) for t in ps + gs + [x for st in sts for x in st]])
        return ps, gs, sts

    def flat(sts):
        return [x for st in sts for x in st]

    op_bad = []  # (args to OPS.cpu_step, match)
    ps, gs, sts = case("bf16_state", torch.bfloat16)
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 1, None), "layout bf16_state takes params of dtype float32"))
    ps, gs, sts = case("bf16_state", torch.float32)
    sts[1][0] = sts[1][0].float()  # one state in fp32 instead of bf16
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 1, None), r"states\[2\] has dtype Float, expected BFloat16"))
    ps, gs, sts = case("master", torch.float32)
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 2, None), "layout master takes params of dtype bfloat16, float16"))
    ps, gs, sts = case("master", torch.bfloat16)
    op_bad.append(((ps, gs, [x for st in sts for x in st[:2]], packs, rid, fl, 2, None), "the fp32 master"))
    ps, gs, sts = case("master", torch.bfloat16)
    sts[1][2] = sts[1][2].to(torch.bfloat16)  # a bf16 master
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 2, None), r"master\)\[5\] has dtype BFloat16, expected Float"))
    ps, gs, sts = case("bf16_sr", torch.bfloat16)
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 3, None), "bf16_sr needs sr_keys"))
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 3, keys[:1]), "sr_keys must be a contiguous int64"))
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 3, keys.int()), "sr_keys must be a contiguous int64"))
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 3, torch.tensor([1, 2 ** 32])), r"sr_keys\[1\].*not a uint32"))
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 0, keys), "sr_keys given, but layout native"))
    nlay = len(layouts.LAYOUTS)  # the first code past the table
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, nlay, None), f"unknown layout code {nlay}"))
    ps, gs, sts = case("bf16_sr", torch.float32)  # fp32 params, fp32 state: not bf16_sr
    op_bad.append(((ps, gs, flat(sts), packs, rid, fl, 3, keys), "layout bf16_sr takes params of dtype bfloat16"))
    for args, match in op_bad:
        for call in ENTRIES.values():
            with pytest.raises(RuntimeError, match=match):
                call(*args)

    # the backend's apply: the same checks (the op's), plus the Python-side key checks
    api_bad = []
    ps, gs, sts = case("native", torch.bfloat16)
    api_bad.append((ps, gs, sts, dict(layout=LAY.get_layout("bf16_state")), RuntimeError, "bf16_state takes params"))
    ps, gs, sts = case("bf16_sr", torch.bfloat16)
    api_bad.append((ps, gs, sts, dict(layout=_SR), ValueError, "needs one sr_key per tensor"))
    api_bad.append((ps, gs, sts, dict(layout=_SR, sr_keys=[1]), ValueError, "needs one sr_key per tensor"))
    api_bad.append((ps, gs, sts, dict(layout=_SR, sr_keys=[1, -1]), ValueError, "uint32"))
    api_bad.append((ps, gs, sts, dict(sr_keys=[1, 2]), ValueError, "does not round stochastically"))
    api_bad.append((ps, gs, sts, dict(layout="no_such_layout"), ValueError, "unknown dtype layout"))
    ps, gs, sts = case("master", torch.float16)
    api_bad.append((ps, gs, [st[:2] for st in sts], dict(layout=LAY.get_layout("master")), RuntimeError,
                    "the fp32 master"))
    for ps, gs, sts, kw, exc, match in api_bad:
        with pytest.raises(exc, match=match):
            b.apply(spec, flags, ps, gs, [tuple(s) for s in sts], sc, **kw)
    for pairs in everything:
        for t, before in pairs:
            assert t.dtype == before.dtype and torch.equal(_bits(t) if t.element_size() in (2, 4) else t,
                                                           _bits(before) if t.element_size() in (2, 4) else before)


@pytest.mark.parametrize("lay,dtype", [("master", torch.float16), ("bf16_sr", torch.bfloat16)])
def test_cpu_step_with_a_layout_passes_opcheck(lay, dtype):
    """The extended schema (int layout, Tensor? sr_keys) and its fake kernel (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(0)
    sd = LAY.get_layout(lay).state_dtype_for(dtype)
    ps = [torch.randn(7, generator=gen).to(dtype), torch.randn(3, 2, generator=gen).to(dtype)]
    gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
    flat = []
    for p in ps:
        flat += [torch.zeros(p.shape, dtype=sd), torch.zeros(p.shape, dtype=sd)] + ([p.float()] if lay == "master" else [])
    packs = backends.pack_table([_adam_pack(1)] * 2, 8)
    code, keys = bcpu.layout_args(LAY.get_layout(lay), [3, 4] if lay == "bf16_sr" else None, 2)
    args = (ps, gs, flat, packs, bcpu.RULE_IDS["adam"], 1, code, keys)
    result = torch.library.opcheck(OPS.cpu_step.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
