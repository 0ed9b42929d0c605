"""The compiled CPU backend: csrc/cpu (C++17, OpenMP, SIMD), math from csrc/update_rules.h.

``make_backend()`` returns a ``backends.Backend`` named "cpu". When the extension ``momentum_fused._C_cpu``
was not built (or fails to load), the backend is registered as unavailable with the reason: the build
error stored by setup.py in ``_C_cpu.build-error.txt``, or the import error.

One call of ``apply`` runs one bucket through ONE op call (one OpenMP parallel region):
``cpu_step(params, grads, states_flat, scalars[n, k] float64, rule, flags, layout, sr_keys)``, called through
the extension module's pybind entry ``momentum_fused._C_cpu.cpu_step`` (the same C++ function as the
registered op ``torch.ops.momentum_fused.cpu_step``, whose TensorList conversion costs ~0.6 us per tensor
per list: most of a step over 10,000 small tensors). The registered op still runs under a TorchDispatchMode
and for tensor subclasses that dispatch to Python, so that modes and subclasses see it.

Dtype layouts (momentum_fused/layouts.py): all nine (native, bf16_state, master, bf16_sr, master16,
int8_state, master16_int8, int8_sr, master16_int8_sr), passed to the op as ``LAYOUT_CODES[layout.name]``
(``enum Layout`` of csrc/generated/tables.h);
with ``master`` the fp32 master copy is the last tensor of each state tuple, with ``master16`` the int16
remainder; with ``int8_state`` a quantized param's tuple is its codes then their fp32 block scales (one call
per bucket: the kernels tell quantized params by their state's dtype, the binding csrc/step_args.h); with
``master16_int8`` a quantized param's tuple is its codes, its remainder, then the scales, the others' their fp32
states then the remainder (as ``master16``); with
``bf16_sr`` ``sr_keys`` (one uint32 per tensor) go to the op as an int64 tensor. The op checks every dtype
against the layout table and raises before writing anything.

Rule ids (``specs.KERNEL_RULES``), flag bits (``spec.flag_names``), pack columns (``spec.scalar_names``) and
layout codes (``layouts.LAYOUTS``) are defined once in Python; csrc/generated/tables.h is generated from them
(momentum_fused/_codegen.py, checked by tests/test_codegen.py). ``make_backend`` compares the compiled library
(rule ids and scalar-pack sizes) with them and refuses a stale build.

Non-contiguous tensors (params, grads or state): copied in to contiguous buffers, updated, and copied
back (params and state) after the op. Correct for any strided layout, at the price of the copies.
"""
from __future__ import annotations

import os

import torch

from . import backends, layouts, specs

__all__ = ["make_backend", "RULE_IDS", "LAYOUT_CODES", "flags_to_int",
           "layout_args", "SUPPORTED_DTYPES"]

# ---- the ABI of the kernels, derived from the one definition of each fact (specs.KERNEL_RULES, spec.flag_names,
# layouts.LAYOUTS); csrc/generated/tables.h is generated from the same (momentum_fused/_codegen.py) ----------
RULE_IDS = {name: i for i, name in enumerate(specs.KERNEL_RULES)}
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# the layout codes of the ops (enum Layout in csrc/generated/tables.h; the CUDA op uses the same codes)
LAYOUT_CODES = {name: i for i, name in enumerate(layouts.LAYOUTS)}
# the layouts the CPU kernels implement (csrc/cpu/cpu_kernels_impl.inc, `dispatch`): all of layouts.LAYOUTS
CPU_LAYOUTS = (*layouts.BASE_KERNEL_LAYOUTS, "master16", "int8_state", "master16_int8", "int8_sr",
               "master16_int8_sr")



def flags_to_int(rule: str, flags) -> int:
    """Flags tuple (spec.Flags) -> the bit mask the kernels take (bit i = spec.flag_names[i])."""
    return sum(1 << i for i, f in enumerate(flags) if f)


CPU_ISAS = ("baseline", "avx2", "avx512", "avx512w")  # MOMENTUM_FUSED_CPU_ISA: caps the kernels' instruction set (csrc.md)


def isa_env_error() -> str | None:
    """Why MOMENTUM_FUSED_CPU_ISA cannot be honoured (the C++ side would take any other value as no cap), or None."""
    v = os.environ.get("MOMENTUM_FUSED_CPU_ISA")
    if v is None or v == "" or v in CPU_ISAS:
        return None
    return (f"MOMENTUM_FUSED_CPU_ISA={v!r} is not one of {', '.join(CPU_ISAS)} (exact, lower case; unset: the "
            "best this CPU has)")


def _load():
    """Import the extension; returns (ops namespace, None) or (None, reason)."""
    isa = isa_env_error()
    if isa is not None:
        return None, isa
    err = backends.import_extension("cpu", "CPU", "`pip install -e . --no-build-isolation` (needs a C++ compiler)")
    if err is not None:
        return None, err
    ops = torch.ops.momentum_fused
    # a stale build (compiled from an older csrc/generated/tables.h) is refused
    for name, rid in RULE_IDS.items():
        got = int(ops.rule_id(name))
        if got != rid:
            return None, f"rule id mismatch for {name!r}: Python {rid}, compiled {got} (rebuild the extension)"
        spec = specs.SPECS.get(name)
        if spec is None:
            continue
        if int(ops.num_scalars(rid)) != len(spec.scalar_names):
            return None, (f"scalar pack of {name!r} has {len(spec.scalar_names)} entries in specs.py but the "
                          f"kernels take {int(ops.num_scalars(rid))} (rebuild or update csrc/update_rules.h)")
    return ops, None


def layout_args(layout, sr_keys, n: int):
    """(layout code, sr_keys int64 tensor or None) for the ops; raises ValueError for an unknown layout or
    keys that do not match it (before anything is written)."""
    lay = layouts.get_layout(layout)
    if lay.name not in LAYOUT_CODES:
        raise ValueError(f"momentum_fused: the compiled kernels have no layout {lay.name!r} "
                         f"(they implement: {', '.join(LAYOUT_CODES)})")
    if not lay.stochastic:
        if sr_keys is not None:
            raise ValueError(f"momentum_fused: sr_keys given, but layout {lay.name!r} does not round stochastically")
        return LAYOUT_CODES[lay.name], None
    if sr_keys is None or len(sr_keys) != n:
        raise ValueError(f"momentum_fused: layout {lay.name!r} needs one sr_key per tensor ({n}), got "
                         f"{None if sr_keys is None else len(sr_keys)}")
    keys = [int(k) for k in sr_keys]
    bad = [k for k in keys if not 0 <= k <= layouts.M32]
    if bad:
        raise ValueError(f"momentum_fused: sr_keys must be uint32 values, got {bad[0]}")
    return LAYOUT_CODES[lay.name], torch.tensor(keys, dtype=torch.int64)


def make_backend() -> backends.Backend:
    ops, err = _load()
    if err is not None:
        return backends.Backend(name="cpu", apply=None, devices=("cpu",), load_error=err)
    backends.register_step_fake("momentum_fused::cpu_step")
    from . import _C_cpu

    def supports(spec, device, dtype):
        if device.type != "cpu":
            return f"the cpu backend runs on cpu tensors only, got {device.type}"
        if spec.name not in RULE_IDS:
            return (f"rule {spec.name!r} has no CPU kernel yet (csrc/update_rules.h implements: "
                    f"{', '.join(RULE_IDS)})")
        if dtype not in SUPPORTED_DTYPES:
            return (f"dtype {dtype} is not supported by the cpu kernels (supported: "
                    f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)})")
        return None

    def apply(spec, flags, params, grads, states, scalars, *, layout=layouts.NATIVE, sr_keys=None, found_inf=None,
              grad_scale=None):
        rule = RULE_IDS[spec.name]
        fl = flags_to_int(spec.name, flags)
        k = len(spec.scalar_names)
        code, keys = layout_args(layout, sr_keys, len(params))
        if found_inf is not None and float(found_inf) != 0.0:
            return  # GradScaler protocol: an inf/NaN gradient somewhere, no write at all
        packs = backends.pack_table(scalars, k)
        if grad_scale is not None:  # as the CUDA kernels: the pack's grad_mult (last entry) / grad_scale
            packs = packs.clone()
            packs[:, k - 1] /= float(grad_scale)
        # the op's fast entry (module docstring), or the registered op under a dispatch mode / for subclasses
        backends.run_step_op(_C_cpu, _C_cpu.cpu_step, ops.cpu_step, params, grads, states,
                             (packs, rule, fl, code, keys), bump=True,
                             memory_order=not layouts.get_layout(layout).by_element_index)

    return backends.Backend(name="cpu", apply=apply, supports=supports, devices=("cpu",), load_error=None,
                            layouts=CPU_LAYOUTS, scalar_tables=True, bumps_versions=True)


def symmetric_product():
    """The CPU kernel of the symmetric bf16 products of Newton-Schulz (csrc/cpu/cpu_symmm.cpp) as a drop-in for
    ``reference.symmetric_baddbmm`` on bf16 CPU stacks, or None where it does not run: the extension is not
    built, or the CPU has no AVX-512-BF16, has AMX (torch's GEMMs are faster there) or MOMENTUM_FUSED_CPU_ISA
    caps it below avx512 (or holds a value that is no ISA: the cpu backend then names it). It computes the tiles on and above the diagonal (~55% of the multiply-adds at m = 384)
    and mirrors them, with an fp32 accumulator and one rounding to bf16, as torch's bf16 GEMM does."""
    global _SYMMETRIC
    if _SYMMETRIC is None:  # (decided in a local, published once: a placeholder set first was read as "no
        found = (False,)  # kernel" by a second thread's first call, whose Muon step then took other bits)
        if isa_env_error() is None and backends.import_extension("cpu", "CPU", "") is None:
            from . import _C_cpu
            if getattr(_C_cpu, "sym_mm_bf16_available", lambda: False)():
                found = (True, _C_cpu)
        _SYMMETRIC = found
    return _symmetric_baddbmm if _SYMMETRIC[0] else None


_SYMMETRIC = None


def _symmetric_baddbmm(c0, a, b=None, beta=1.0, alpha=1.0):
    """``reference.symmetric_baddbmm`` for bf16 CPU stacks, on the kernel (``symmetric_product``), which
    computes y z^T from the rows of y and z: z = a for the Gram matrix, else b (symmetric: its rows are its
    columns)."""
    y = a.contiguous()
    z = y if b is None else b.contiguous()
    if y.shape[-1] % 2:  # the kernel takes bf16 pairs along k: a zero column changes no sum
        y, z = torch.nn.functional.pad(y, (0, 1)), torch.nn.functional.pad(z, (0, 1))
    if c0 is not None and beta == 0.0:
        c0 = None  # as torch: beta = 0 ignores c0 (its NaNs too)
    out = torch.empty(y.shape[0], y.shape[1], y.shape[1], dtype=torch.bfloat16)
    if not _SYMMETRIC[1].sym_mm_bf16(out, y, z, None if c0 is None else c0.contiguous(), float(alpha), float(beta)):
        raise RuntimeError("sym_mm_bf16 refused its arguments after sym_mm_bf16_available() said yes")
    return out
