"""Every Triton kernel specialization compiles for a Hopper GPU (sm_90), on this CPU-only machine.

The interpreter (tests/triton/) runs kernels as Python and accepts things the compiler rejects: plain-int
module globals (only ``tl.constexpr`` globals may be read by a compiled kernel) and variables whose type
differs between the branches of an ``if`` (a scalar in one, a block in the other). Both broke the first
GPU run of these kernels. ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, and ptxas to a cubin) without a device, so these tests catch such errors in CI.
The front end (where both errors live) runs for every (rule, flags) in fp32 with the device
found_inf/grad_scale path, and for every rule's default flags in every other dtype layout, for each kernel path
the launcher can run (``launcher.compile_variants``' "mixed" kernel, which holds the full-block and the packed
paths); the full
pipeline to a cubin runs for the reduction kernels here and, for the update kernels (every rule in fp32 and bf16,
AdamW in every layout), in tests/test_kernel_report.py, which also checks what ptxas made of them.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET=1 (the main suite does)", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from backend_cases import CASES, MUON_CASES, _groups  # noqa: E402
from momentum_fused.specs import SPECS, ElementwisePass  # noqa: E402
from momentum_fused.triton_kernels import launcher, rules  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_SIG = {"ptr_tab": "*i64", "n_tensors": "i32", "scal_tab": "*fp64", "prog_tab": "*i64", "seg_tab": "*i64",
        "n_seg": "i32", "found_inf_ptr": "*fp32", "grad_scale_ptr": "*fp32", "out_ptr": "*fp32"}


def _source(fn, constexprs, sig=None):
    sig = {n: ("constexpr" if n in constexprs else (sig or _SIG)[n]) for n in fn.arg_names}
    return ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})


def _compile(fn, constexprs, full=False, sig=None):
    """full: the whole pipeline to a cubin (~1 s each); otherwise the front end only (Python AST to TTIR,
    where both errors above live; ~0.1 s), through the same calls triton.compile makes."""
    src = _source(fn, constexprs, sig)
    if full:
        out = triton.compile(src, target=TARGET)
        assert out.asm.get("cubin"), "no cubin produced"
        return
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend
    backend = make_backend(TARGET)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    assert "tt.func" in str(module)


def _specializations():
    """(id, rule name, flags, number of state tensors) for every (rule, flags) the case table reaches."""
    seen = {}
    for cid, cls, kw0, kw1, _, _ in CASES + MUON_CASES:
        opt = cls(_groups([torch.zeros(1, 1, requires_grad=True), torch.zeros(1, 1, requires_grad=True)], kw0, kw1),
                  backend="reference")
        opt = getattr(opt, "_core", opt)  # momentum_fused.Muon: the inner optimizer of its multi-phase rule
        for g in opt.param_groups:
            # a multi-phase rule: the rules of its elementwise passes
            for spec in [opt.spec] + [SPECS[ph.rule] for ph in opt.spec.phases if isinstance(ph, ElementwisePass)]:
                if spec.phases:
                    continue
                flags = tuple(spec.make_flags(g))
                seen.setdefault((spec.name, flags), len(spec.state_names(g)))
    return [(f"{r}-{'-'.join(map(str, map(int, f))) or 'noflags'}", r, f, n) for (r, f), n in sorted(seen.items())]


SPECIALIZATIONS = _specializations()


# dtype layouts (momentum_fused/layouts.py) as (param dtype, state dtype, master, stochastic rounding)
LAYOUTS = {"native-fp32": (torch.float32, torch.float32, False, False),
           "native-fp16": (torch.float16, torch.float16, False, False),
           "native-bf16": (torch.bfloat16, torch.bfloat16, False, False),
           "bf16_state": (torch.float32, torch.bfloat16, False, False),
           "master-bf16": (torch.bfloat16, torch.float32, True, False),
           "master-fp16": (torch.float16, torch.float32, True, False),
           "bf16_sr": (torch.bfloat16, torch.bfloat16, False, True),
           "master16": (torch.bfloat16, torch.float32, 2, False)}  # master 2: the int16 remainder


_TDT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _variants(rule, flags, nstate, layout="native-fp32", device_scalars=True):
    """The "mixed" kernel (full-block and packed paths in one): its front end covers both paths' code."""
    pdt, sdt, master, sr = LAYOUTS[layout]
    return [v for v in launcher.compile_variants(rule, flags, nstate, _TDT[pdt], _TDT[sdt], master, sr,
                                                 found_inf=device_scalars, grad_scale=device_scalars)
            if v[1] == "mixed"]


@pytest.mark.parametrize("rule,flags,nstate", [s[1:] for s in SPECIALIZATIONS], ids=[s[0] for s in SPECIALIZATIONS])
def test_rule_kernel_front_end_fp32(rule, flags, nstate):
    for _, _, fn, sig, constexprs, _, _ in _variants(rule, flags, nstate):
        _compile(fn, constexprs, sig=sig)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "native-fp32"])
@pytest.mark.parametrize("rule", sorted(rules.RULE_IDS))
def test_rule_kernel_front_end_layouts(rule, layout):
    _, _, flags, nstate = next(s for s in SPECIALIZATIONS if s[1] == rule)
    for _, _, fn, sig, constexprs, _, _ in _variants(rule, flags, nstate, layout, device_scalars=False):
        _compile(fn, constexprs, sig=sig)


@pytest.mark.parametrize("remainder,stochastic", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["int8_state", "master16_int8", "int8_sr", "master16_int8_sr"])
@pytest.mark.parametrize("rule", sorted(r for r in rules.RULE_IDS if r not in ("sgd_sf", "adamw_sf")))
def test_int8_state_kernel_front_end(rule, remainder, stochastic):
    """The int8_state kernel (launcher.compile_int8_variants: quantized and fp32-state programs in one kernel) for
    every rule's largest flags (the most state lists), with the device found_inf/grad_scale path; also in its
    master16_int8 form (bf16 params with the int16 remainder) and the stochastic codes of int8_sr and
    master16_int8_sr (SRQ; no GPU has run those yet)."""
    _, _, flags, nstate = [s for s in SPECIALIZATIONS if s[1] == rule][-1]
    for _, path, fn, sig, constexprs, _, _ in launcher.compile_int8_variants(rule, flags, nstate, True, True,
                                                                            remainder=remainder,
                                                                            stochastic=stochastic):
        if path == "mixed":
            _compile(fn, constexprs, sig=sig)
            if rule == "adam":  # a bucket with a pointer off 16 bytes, and the interpreter's variant
                _compile(fn, dict(constexprs, ALIGNED=False), sig=sig)
                _compile(fn, dict(constexprs, HW_BF16=False), sig=sig)


def test_update_kernels_compile_without_fp_contraction():
    """launcher.GPU_COMPILE_OPTIONS (enable_fp_fusion off) leaves no fused multiply-add in Adam's update kernel nor in
    its int8_state kernel (Adam's rule calls no tl.fma), where Triton's default fuses 68 and 160 of them (sm_90,
    Triton 3.6): so the compiled int8 kernel equals the uncompressed one bit for bit (the per-step oracle of
    tests/triton/test_compressed_triton.py, on a GPU), as the CUDA kernels do."""
    _, _, flags, nstate = [s for s in SPECIALIZATIONS if s[1] == "adam"][0]
    rule = _variants("adam", flags, nstate)[0]
    int8 = next(v for v in launcher.compile_int8_variants("adam", flags, nstate, True, True) if v[1] == "mixed")
    for _, _, fn, sig, constexprs, _, _ in (rule, int8):
        ptx = triton.compile(_source(fn, constexprs, sig), target=TARGET, options=launcher.GPU_COMPILE_OPTIONS).asm["ptx"]
        assert "fma.rn" not in ptx
        assert "fma.rn" in triton.compile(_source(fn, constexprs, sig), target=TARGET).asm["ptx"]  # the test can fail


def test_amsgrad_keeps_a_nan_second_moment_as_every_backend():
    """tl.maximum's default (propagate_nan NONE) compiles to max.f32, which returns the non-NaN operand: compiled
    AMSGrad kept max_exp_avg_sq finite where v turned NaN, unlike the CPU, CUDA, reference and the interpreter
    (numpy), which the interpreter tests could not see (a review, 2026-12-07). It must be max.NaN.f32."""
    _, _, flags, nstate = [s for s in SPECIALIZATIONS if s[1] == "adam" and s[2][1]][0]  # (amsgrad on)
    _, _, fn, sig, constexprs, _, _ = _variants("adam", flags, nstate)[0]
    ptx = triton.compile(_source(fn, constexprs, sig), target=TARGET, options=launcher.GPU_COMPILE_OPTIONS).asm["ptx"]
    assert "max.NaN.f32" in ptx and "max.f32" not in ptx


_IEEE_PTX = """
import sys, triton
sys.path.insert(0, "tests")
import test_triton_compile as t
_, _, flags, nstate = [s for s in t.SPECIALIZATIONS if s[1] == "adam"][0]
_, _, fn, sig, constexprs, _, _ = t._variants("adam", flags, nstate)[0]
ptx = triton.compile(t._source(fn, constexprs, sig), target=t.TARGET, options=t.launcher.GPU_COMPILE_OPTIONS).asm["ptx"]
print(sorted({w for w in ("sqrt.rn.f32", "sqrt.approx", "div.rn.f32", "div.full.f32") if w in ptx}))
"""


def test_the_ieee_knob_makes_the_rules_divide_and_take_roots_correctly_rounded():
    """MOMENTUM_FUSED_TRITON_IEEE=1 (triton_kernels/rules.py IEEE: an A/B for a GPU to time): div.rn / sqrt.rn, as
    the CUDA and CPU kernels; unset, Triton's div.full / sqrt.approx (read at import: a fresh process each)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    got = {}
    for knob in ("0", "1"):
        env = dict(os.environ, MOMENTUM_FUSED_TRITON_IEEE=knob)
        out = subprocess.run([sys.executable, "-c", _IEEE_PTX], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got[knob] = out.stdout.strip().splitlines()[-1]
    assert got == {"0": "['div.full.f32', 'sqrt.approx']", "1": "['div.rn.f32', 'sqrt.rn.f32']"}, got


def test_unaligned_and_interpreter_variants_front_end():
    """ALIGNED=False (a bucket with a pointer off 16 bytes) and HW_BF16=False (the interpreter's bit arithmetic,
    which the interpreter tests run) also pass the compiler's front end."""
    _, _, flags, nstate = next(s for s in SPECIALIZATIONS if s[1] == "adam")
    for layout in ("native-bf16", "bf16_sr", "master16"):
        for _, _, fn, sig, constexprs, _, _ in _variants("adam", flags, nstate, layout):
            _compile(fn, dict(constexprs, ALIGNED=False), sig=sig)
            _compile(fn, dict(constexprs, HW_BF16=False), sig=sig)


def test_every_rule_is_reached():
    assert {s[1] for s in SPECIALIZATIONS} == set(rules.RULE_IDS)


_SYMMM_SIG = {"Y": "*bf16", "Z": "*bf16", "C0": "*bf16", "OUT": "*bf16", "PAIRS": "*i32", "m": "i32", "k": "i32",
              **{n: "i64" for n in ("s_yb", "s_ym", "s_zb", "s_zm", "s_cb", "s_cm", "s_ob", "s_om")},
              "alpha": "fp32", "beta": "fp32"}


@pytest.mark.parametrize("has_c0", [False, True])
def test_symmetric_product_kernel_compiles(has_c0):
    """Muon's symmetric-product kernel (triton_kernels/symmm.py) to a cubin for sm_90, and its interpreter variant
    (int16 bits) through the front end."""
    from momentum_fused.triton_kernels import symmm
    constexprs = dict(HAS_C0=has_c0, BLOCK=symmm.BLOCK, BLOCK_K=symmm.BLOCK_K, HW_BF16=True)
    _compile(symmm.sym_mm_kernel, constexprs, full=True, sig=_SYMMM_SIG)
    bits = {k: ("*i16" if v == "*bf16" else v) for k, v in _SYMMM_SIG.items()}
    _compile(symmm.sym_mm_kernel, dict(constexprs, HW_BF16=False), sig=bits)
