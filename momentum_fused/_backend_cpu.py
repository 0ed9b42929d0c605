"""The compiled CPU backend: csrc/cpu (C++17, OpenMP, SIMD), math from csrc/update_rules.h.

``make_backend()`` returns a ``backends.Backend`` named "cpu". When the extension ``momentum_fused._C_cpu``
was not built (or fails to load), the backend is registered as unavailable with the reason: the build
error stored by setup.py in ``_C_cpu.build-error.txt``, or the import error.

One call of ``apply`` runs one bucket through ONE op call (one OpenMP parallel region):
``torch.ops.momentum_fused.cpu_step(params, grads, states_flat, scalars[n, k] float64, rule, flags)``.

Rule ids and flag bits are defined here, once, and mirrored by ``enum Rule`` / the flag enums in
csrc/update_rules.h; ``make_backend`` checks the mirror against the compiled library (rule_id,
num_scalars, num_states) and refuses to load on any mismatch.

Non-contiguous tensors (params, grads or state): copied in to contiguous buffers, updated, and copied
back (params and state) after the op. Correct for any strided layout, at the price of the copies.
"""
from __future__ import annotations

import array
import importlib
import itertools
import os

import torch

from . import backends, specs

__all__ = ["make_backend", "RULE_IDS", "FLAG_NAMES", "flags_to_int", "scalars_tensor", "SUPPORTED_DTYPES"]

# ---- the ABI shared with csrc/update_rules.h (enum Rule and the per-rule flag enums) ----------------
RULE_IDS = {"sgd": 0, "qhm": 1, "adam": 2, "nadam": 3, "rmsprop": 4, "signum": 5, "lion": 6, "fsgdm": 7,
            "sgd_sf": 8, "adamw_sf": 9}
# flag bit i of the int passed to the kernels is FLAG_NAMES[rule][i]
FLAG_NAMES = {
    "sgd": ("momentum", "nesterov"),
    "qhm": ("direct_decay",),
    "adam": ("decoupled", "amsgrad"),
    "nadam": ("decoupled",),
    "rmsprop": ("momentum", "centered"),
    "signum": ("momentum",),
    "lion": (),
    "fsgdm": (),
    "sgd_sf": (),
    "adamw_sf": ("inner_momentum",),
}
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_ERROR_FILE = os.path.join(_HERE, "_C_cpu.build-error.txt")


def flags_to_int(rule: str, flags) -> int:
    """Flags tuple (spec.Flags) -> the bit mask the kernels take (bit i = FLAG_NAMES[rule][i])."""
    return sum(1 << i for i, f in enumerate(flags) if f)


def _load():
    """Import the extension; returns (ops namespace, None) or (None, reason)."""
    stored = None
    if os.path.exists(_BUILD_ERROR_FILE):
        try:
            with open(_BUILD_ERROR_FILE) as fh:
                stored = fh.read().strip()
        except OSError:
            stored = None
    try:
        importlib.import_module("momentum_fused._C_cpu")
    except ImportError as e:
        if stored:
            return None, f"the CPU extension was not built: {stored}"
        return None, (f"the CPU extension momentum_fused._C_cpu is not importable ({e}); build it with "
                      "`pip install -e . --no-build-isolation` (needs a C++ compiler)")
    except Exception as e:  # e.g. an undefined symbol after a torch upgrade
        return None, f"loading momentum_fused._C_cpu failed: {type(e).__name__}: {e}"
    ops = torch.ops.momentum_fused
    # check the ABI mirror against the compiled library
    for name, rid in RULE_IDS.items():
        got = int(ops.rule_id(name))
        if got != rid:
            return None, f"rule id mismatch for {name!r}: Python {rid}, compiled {got} (rebuild the extension)"
        spec = specs.SPECS.get(name)
        if spec is None:
            continue
        if tuple(spec.flag_names) != FLAG_NAMES[name]:
            return None, (f"flag names of {name!r} changed in specs.py ({spec.flag_names}) but the kernels "
                          f"use {FLAG_NAMES[name]}")
        if int(ops.num_scalars(rid)) != len(spec.scalar_names):
            return None, (f"scalar pack of {name!r} has {len(spec.scalar_names)} entries in specs.py but the "
                          f"kernels take {int(ops.num_scalars(rid))} (rebuild or update csrc/update_rules.h)")
    return ops, None


def scalars_tensor(scalars, k: int) -> torch.Tensor:
    """The per-tensor packs as one float64 [n, k] tensor (array.array: ~10x faster than torch.tensor)."""
    buf = array.array("d", itertools.chain.from_iterable(scalars))
    n = len(scalars)
    if n == 0:
        return torch.empty((0, k), dtype=torch.float64)
    return torch.frombuffer(buf, dtype=torch.float64).view(n, k)


def make_backend() -> backends.Backend:
    ops, err = _load()
    if err is not None:
        return backends.Backend(name="cpu", apply=None, devices=("cpu",), load_error=err)

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

    def apply(spec, flags, params, grads, states, scalars):
        rule = RULE_IDS[spec.name]
        fl = flags_to_int(spec.name, flags)
        k = len(spec.scalar_names)
        ps, gs, flat, writeback = backends.contiguous_lists(params, grads, states)
        ops.cpu_step(ps, gs, flat, scalars_tensor(scalars, k), rule, fl)
        for orig, work in writeback:
            orig.copy_(work)

    return backends.Backend(name="cpu", apply=apply, supports=supports, devices=("cpu",), load_error=None)
