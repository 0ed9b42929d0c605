"""The Triton backend: hands each bucket to ``momentum_fused.triton_kernels.launcher`` in ONE launch.

Loading is cheap: triton and the kernels are imported on first use. ``load_error`` is set when triton
is not installed. The kernels install under this package's namespace (setup.py maps the repository's
``triton_kernels/`` folder to ``momentum_fused.triton_kernels``) and read the rule tables from the specs.

CPU tensors run in the Triton interpreter, which only works when ``TRITON_INTERPRET=1`` was set
before the kernels were defined (before ``momentum_fused.triton_kernels.kernels`` is imported).
"""
from __future__ import annotations

import collections.abc
import importlib
import importlib.util
import os
import sys

import torch

from . import backends, layouts

__all__ = ["make_backend"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the dtype layouts the kernels implement (triton_kernels/kernels.py): every layout of layouts.LAYOUTS
TRITON_LAYOUTS = layouts.BASE_KERNEL_LAYOUTS + ("master16", "int8_state", "master16_int8", "int8_sr",
                                                "master16_int8_sr")
_CPU_REASON = "the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"


def _load_error() -> str | None:
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
    except (ImportError, ValueError) as e:
        return f"triton cannot be located: {e}"
    try:
        importlib.import_module("momentum_fused.triton_kernels")
    except Exception as e:  # pragma: no cover - broken install
        return f"import of momentum_fused.triton_kernels failed: {type(e).__name__}: {e}"
    return None


def _kernel_modules():
    """(rules, launcher), imported on first use."""
    from .triton_kernels import launcher, rules  # noqa: WPS433 (lazy on purpose)
    return rules, launcher


def _interpreting() -> bool:
    """True when the kernels are (or will be) defined in interpreter mode."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    kern = sys.modules.get("momentum_fused.triton_kernels.kernels")
    if kern is not None:  # already defined: check how
        return type(kern.one_buffer_kernel).__name__ == "InterpretedFunction"
    return True


# the launcher's tuning knobs (triton_kernels/launcher.py, for bench/device_check.sh's A/B): name -> (default, the
# smallest value); each a power of two (tl.arange needs one)
_KNOBS = {"MOMENTUM_FUSED_TRITON_BLOCK": (2048, 32), "MOMENTUM_FUSED_TRITON_WARPS": (4, 1),
          "MOMENTUM_FUSED_TRITON_INT8_ROWS": (8, 1), "MOMENTUM_FUSED_TRITON_INT8_WARPS": (8, 1)}


def _knob_error() -> str | None:
    """Why the environment's launcher knobs cannot run (before anything is launched), or None."""
    vals = {}
    for name, (default, low) in _KNOBS.items():
        raw = os.environ.get(name)
        try:
            v = default if raw is None else int(raw)
        except ValueError:
            return f"{name}={raw!r} is not an integer"
        if v < low or v & (v - 1):
            return f"{name}={v} must be a power of two >= {low} (tl.arange needs one)"
        vals[name] = v
    raw = os.environ.get("MOMENTUM_FUSED_TRITON_INT8_MAXNREG")  # (a register cap; 0 or unset: none)
    if raw is not None and not (raw.strip().isdigit()):
        return f"MOMENTUM_FUSED_TRITON_INT8_MAXNREG={raw!r} must be an integer >= 0 (0: no register cap)"
    block, warps = vals["MOMENTUM_FUSED_TRITON_BLOCK"], vals["MOMENTUM_FUSED_TRITON_WARPS"]
    if block < 32 * warps:
        return (f"MOMENTUM_FUSED_TRITON_BLOCK={block} is below 32 x MOMENTUM_FUSED_TRITON_WARPS={warps} (the packed "
                "path's lanes)")
    return None


def _layout_mismatch(spec) -> str | None:
    rules, _ = _kernel_modules()
    if spec.name not in rules.FAMILY:  # (RULE_IDS holds every kernel rule, with or without Triton math)
        return (f"rule {spec.name!r} has no Triton kernel yet (Triton rules: {sorted(rules.FAMILY)})")
    return None


def supports(spec, device, dtype) -> str | None:
    device = torch.device(device)
    if device.type == "cpu" and not _interpreting():
        return _CPU_REASON
    if device.type not in ("cpu", "cuda"):
        return f"the Triton backend runs on cuda (or cpu in the interpreter), not {device.type}"
    knobs = _knob_error()
    if knobs is not None:
        return knobs
    if dtype not in SUPPORTED_DTYPES:
        return (f"storage dtype {dtype} is not supported by the Triton backend (supported: float32, "
                "float16, bfloat16; use the reference backend for float64)")
    try:
        return _layout_mismatch(spec)
    except Exception as e:  # triton present but broken
        return f"the Triton kernels failed to load: {type(e).__name__}: {e}"


def apply(spec, flags, params, grads, states, scalars, *, layout=None, sr_keys=None, found_inf=None,
          grad_scale=None) -> int:
    """Run ``spec``'s rule on one bucket in one kernel launch (any dtype layout of ``TRITON_LAYOUTS``: states[i]
    ends with the fp32 master copy under ``master``, with the int16 remainder under ``master16``; ``sr_keys`` under
    ``bf16_sr``, ``int8_sr`` and ``master16_int8_sr``; ``int8_state`` runs launcher.int8_state_apply, codes then
    scales for a quantized tensor, and ``master16_int8`` (and their stochastic forms) too, the int16 remainder
    between them, or after the fp32 states). Returns the number of launches."""
    rules, launcher = _kernel_modules()
    if not params:
        return 0
    if layout is not None and layout.int8:  # codes and block scales: a kernel of its own (launcher.int8_state_apply)
        width = launcher.int8_width(states, layout.remainder)
        rows = _POINTER_ROWS(params, grads, states, width, True) if _POINTER_ROWS is not None else None
        if rows is not None:  # every tensor contiguous (and plain): the pointers read at C speed
            return launcher.int8_state_apply(rules.FAMILY[spec.name], rules.RULE_IDS[spec.name], tuple(flags),
                                             params, grads, states,
                                             backends.pack_table(scalars, len(spec.scalar_names)),
                                             found_inf=found_inf, grad_scale=grad_scale, remainder=layout.remainder,
                                             checked=True, ptr_rows=rows,
                                             sr_keys=sr_keys if layout.stochastic else None)
        ps, gs, flat, writeback = backends.contiguous_lists(params, grads, states)
        sts, k = [], 0
        for st in states:
            sts.append(flat[k:k + len(st)])
            k += len(st)
        n = launcher.int8_state_apply(rules.FAMILY[spec.name], rules.RULE_IDS[spec.name], tuple(flags), ps, gs, sts,
                                      backends.pack_table(scalars, len(spec.scalar_names)), found_inf=found_inf,
                                      grad_scale=grad_scale, remainder=layout.remainder,
                                      sr_keys=sr_keys if layout.stochastic else None)
        for orig, work in writeback:
            orig.copy_(work)
        return n
    nstate = len(states[0]) if states else 0
    rows = _POINTER_ROWS(params, grads, states, nstate) if _POINTER_ROWS is not None else None
    if rows is not None:  # every tensor contiguous (and plain): the usual case, read at C speed; the state lists
        # are columns of the per-param tuples, read only on a table miss (their checks)
        lists = [params, grads] + [_Column(states, j) for j in range(nstate)]
        writeback = ()
    else:  # non-contiguous tensors (rare: e.g. a transposed param) run on contiguous copies, written back after
        ps, gs, flat, writeback = backends.contiguous_lists(params, grads, states,
                                                            memory_order=not (layout is not None and layout.by_element_index))
        lists = [ps, gs] + [flat[i::nstate] for i in range(nstate)]
    n = launcher.multi_tensor_apply(rules.FAMILY[spec.name], rules.RULE_IDS[spec.name], tuple(flags), lists,
                                    backends.pack_table(scalars, len(spec.scalar_names)), found_inf=found_inf,
                                    grad_scale=grad_scale, master=bool(layout is not None and layout.master),
                                    remainder=bool(layout is not None and layout.remainder),
                                    sr_keys=sr_keys if layout is not None and layout.stochastic else None,
                                    checked=True, rows=rows)  # the optimizer's plan checked them
    for orig, work in writeback:
        orig.copy_(work)
    return n


class _Column(collections.abc.Sequence):
    """State ``j`` of every per-param state tuple, as a sequence the launcher can index (no list built)."""
    __slots__ = ("_states", "_j")

    def __init__(self, states, j):
        self._states, self._j = states, j

    def __len__(self):
        return len(self._states)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [st[self._j] for st in self._states[i]]
        return self._states[i][self._j]


def _pointer_rows():
    """``_C_cpu.pointer_rows`` (the lists' data pointers and sizes as one int64 host tensor, read at C speed), or
    None without the compiled cpu extension (the launcher then reads them in Python)."""
    try:
        from . import _C_cpu
    except Exception:  # not built, or not loadable
        return None
    return getattr(_C_cpu, "pointer_rows", None)  # (None from a build older than it)


_POINTER_ROWS = _pointer_rows()


def _caveat() -> str | None:
    """backends.status()'s note: loaded, but no tensor here that it could step."""
    if _interpreting() or torch.cuda.is_available():
        return None
    return ("no CUDA device here, and CPU tensors need TRITON_INTERPRET=1 set before triton is imported: nothing it "
            "can step")


def make_backend() -> backends.Backend:
    err = _load_error()
    return backends.Backend(name="triton", apply=apply if err is None else None, supports=supports,
                            devices=("cuda", "cpu"), load_error=err, layouts=TRITON_LAYOUTS,
                            device_scalars=True, scalar_tables=True, caveat=_caveat)
