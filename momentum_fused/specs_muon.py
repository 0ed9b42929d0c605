"""The update-rule specs of Muon (torch.optim.Muon's convention; docs/algorithms.md §10), a multi-phase rule of
contract v2 (docs/architecture.md): ``muon_momentum`` (elementwise: the momentum buffer and the update into a
work buffer), ``newton_schulz`` (a matrix phase on the update, batched by shape: reference.newton_schulz) and
``muon_apply`` (elementwise: decoupled decay and the shape-scaled step). Registered in
``momentum_fused.specs.SPECS`` by that module; the two passes are kernel rules (``specs.KERNEL_RULES``, math in
csrc/update_rules.h and triton_kernels/rules.py)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .reference import newton_schulz
from .specs import (LR, NONNEG, SPECS, UNIT_OPEN, Choice, ElementwisePass, Flag, MatrixPhase, StateTensor, Traffic,
                    UpdateRuleSpec, lr_value)

# torch.optim.Muon's defaults (Keller Jordan's quintic coefficients)
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_NS_STEPS = 5
DEFAULT_EPS = 1e-7
MAX_NS_STEPS = 99  # torch.optim.Muon refuses ns_steps >= 100

# Named per-step coefficient schedules. "polar_express": the Polar Express schedule of Amsel et al. 2025
# (arXiv:2505.16932), safety 1e-2, as published in pytorch_optimizer's NS_COEFFICIENTS["polar_express"]; the
# schedule is greedy (step i is optimal given steps < i), so k steps take its first k triples (the last one
# repeats beyond 8).
NS_SCHEDULES = {
    "polar_express": (
        (8.237312490495555, -23.157747414558198, 16.680568411445915),
        (4.082441999064835, -2.893047735332586, 0.5252849256975648),
        (3.9263479922546582, -2.8547468034765298, 0.5318022422894988),
        (3.2982187133085143, -2.424541981026706, 0.48632008358844075),
        (2.2970369434552573, -1.63662558125903, 0.4002628455953627),
        (1.8763805351440397, -1.2347896577722228, 0.35891887501668385),
        (1.8564423485617974, -1.2132449880935525, 0.3568003487825883),
        (1.8749994008682747, -1.2499988017229169, 0.3749994008546422),
    ),
}

NS_DTYPES = (None, torch.bfloat16, torch.float32, torch.float64)

# ns_algorithm: "standard" (torch's iteration, the default: bitwise torch.optim.Muon), "gram" (the Gram form,
# reference.gram_newton_schulz, on every matrix) or "auto" (the Gram form where the long side is at least
# GRAM_MIN_ASPECT times the short one, the standard form elsewhere). The Gram form restarts (forms X and X X^T
# afresh) before step GRAM_FIRST_RESTART and then every GRAM_RESTART_PERIOD steps. Both constants were chosen
# by measurement (docs/muon.md, "Gram form"; bench/muon_gram_accuracy.py).
NS_ALGORITHMS = ("standard", "gram", "auto")
GRAM_MIN_ASPECT = 2.5
GRAM_FIRST_RESTART = 2
GRAM_RESTART_PERIOD = 2

# The Newton-Schulz phase runs on stacks of at most this many bytes of updates (the param dtype): its
# temporaries (X, X X^T, the polynomial, the new X, in ns_dtype) stay a small multiple of it. A shape bucket
# larger than this is split into chunks (at least one matrix each).
NS_MAX_BATCH_BYTES = 256 << 20
# On CPU tensors without AMX the stacks are cut smaller, to about one core's L2 (the update work buffer's bytes:
# bf16 by default): the NS is a chain of 15 products over the stack, and there that chain runs faster over stacks
# that stay in the caches than over one large stack (2026-12-07, 2-core AMD EPYC Zen 5, GPT stack d = 384: "auto"
# 1.24-1.45x -> 1.51-1.55x torch.optim.Muon, "standard" 0.87-1.14x -> 1.01-1.08x; d = 768 within the noise;
# bench/results/muon-cpu-20261207-zen5-chunks.txt). With AMX the whole buckets stay: there a step of torch's
# iteration on batched products ran 1.58-1.67x torch.optim.Muon's per-matrix loop (2026-12-06, Xeon), which one
# matrix per call might give up, and no cut was measured on such a CPU. On CUDA a larger batch fills the device: only
# NS_MAX_BATCH_BYTES applies there.
NS_CPU_BATCH_BYTES = 2 << 20


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which torch's bf16 GEMMs use (torch's own check; False where torch has none)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_triple(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_real(x) for x in v)


@dataclass(frozen=True)
class NSCoefficients:
    """One (a, b, c) triple of finite numbers, a non-empty list of triples (one per Newton-Schulz step, the
    last repeated), or the name of a schedule in NS_SCHEDULES."""

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, str):
            if value not in NS_SCHEDULES:
                raise ValueError(f"Invalid {name}: {value!r} (a named schedule must be one of {sorted(NS_SCHEDULES)})")
            return
        if _is_triple(value):
            return
        if isinstance(value, (tuple, list)) and value and all(_is_triple(t) for t in value):
            return
        raise ValueError(f"Invalid {name}: {value!r} (must be one (a, b, c) triple of finite numbers, a non-empty "
                         f"list of such triples, one per step, or one of {sorted(NS_SCHEDULES)})")


@dataclass(frozen=True)
class NSSteps:
    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        if not 0 <= value <= MAX_NS_STEPS:
            raise ValueError(f"Invalid {name}: {value} (must be in [0, {MAX_NS_STEPS}]: torch.optim.Muon refuses "
                             f"{MAX_NS_STEPS + 1} and more, and a negative count is refused here too)")


@dataclass(frozen=True)
class NSDtype:
    def check(self, name: str, value: Any) -> None:
        if value not in NS_DTYPES:
            raise ValueError(f"Invalid {name}: {value!r} (must be None, torch.bfloat16, torch.float32 or "
                             "torch.float64)")


def ns_schedule(group: Mapping) -> list:
    """The (a, b, c) triple of each of the group's ns_steps Newton-Schulz steps."""
    coef, k = group["ns_coefficients"], int(group["ns_steps"])
    if isinstance(coef, str):
        coef = NS_SCHEDULES[coef]
    if _is_triple(coef):
        coef = (coef,)
    coef = [tuple(float(x) for x in t) for t in coef]
    return [coef[min(i, len(coef) - 1)] for i in range(k)]


# Newton-Schulz dtype when ns_dtype=None: bf16 on CUDA and CPU (torch.optim.Muon's on every device; on an
# AMX / AVX-512-BF16 Xeon a step with fp32 NS measured 3.9x slower, docs/muon.md); fp32 on other devices.
DEFAULT_NS_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.bfloat16}


def ns_dtype_for(group: Mapping, device: torch.device) -> torch.dtype:
    dt = group["ns_dtype"]
    return DEFAULT_NS_DTYPE.get(device.type, torch.float32) if dt is None else dt


def update_dtype(group: Mapping, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the update work buffer of a param of ``dtype`` on ``device``: bf16 for fp32 params when the
    group's Newton-Schulz runs in bf16 (its first op would round the update to bf16: the momentum pass's kernels
    round it once, to nearest even, as that op does, so the same bits, with 2 bytes less per element written,
    read and kept, and no conversion pass); else the param dtype (fp64 and fp16 params keep torch's two
    roundings, param dtype then NS dtype)."""
    if dtype == torch.float32 and ns_dtype_for(group, device) == torch.bfloat16:
        return torch.bfloat16
    return dtype


def matrix_view(shape, flatten: bool = True) -> tuple:
    """(A, B), the shape of one matrix of a param of ``shape``: with ``flatten`` (the default), a param of shape
    (A, *rest) is the one matrix (A, prod(rest)) (the reference Muon's view of a conv weight); without it, a param
    of 3 or more dims is a batch of (shape[-2], shape[-1]) matrices, one per index of its leading dims (stacked
    experts [E, out, in]: each expert its own matrix). A 2-D param is itself either way."""
    if not flatten and len(shape) > 2:
        return int(shape[-2]), int(shape[-1])
    a = int(shape[0])
    b = 1
    for s in shape[1:]:
        b *= int(s)
    return a, b


def batched_view(shape, flatten: bool) -> tuple:
    """For ``shape`` = (n, *param shape), the shape of a stack of n params: the [N, A, B] view of the stack as the
    matrices the Newton-Schulz phase orthogonalizes (``matrix_view``): N = n, or without ``flatten`` n times the
    product of the param's leading dims. Explicit sizes: an empty matrix has no -1."""
    a, b = matrix_view(shape[1:], flatten)
    per = math.prod(shape[1:-2]) if not flatten and len(shape) > 3 else 1
    return int(shape[0]) * per, a, b


def lr_ratio(adjust_lr_fn, shape, flatten: bool = True) -> float:
    """torch.optim.Muon's ``_adjust_lr`` factor for a matrix of ``shape`` (``matrix_view``: the one matrix of the
    param, or, without ``flatten``, each matrix of its batch)."""
    a, b = matrix_view(shape, flatten)
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return math.sqrt(max(1, a / b)) if b else 1.0  # (None or "original"; an empty matrix moves nothing)


def gram_restarts(steps: int) -> tuple:
    """The steps before which the Gram form restarts (reference.gram_newton_schulz)."""
    return tuple(range(GRAM_FIRST_RESTART, steps, GRAM_RESTART_PERIOD))


def uses_gram(algorithm: str, shape) -> bool:
    """Whether ``ns_algorithm`` runs the Gram form on a matrix of (matrix view) ``shape``."""
    if algorithm == "gram":
        return True
    if algorithm == "auto":
        short, long = sorted(matrix_view(shape))
        return short > 0 and long >= GRAM_MIN_ASPECT * short
    return False


TRITON_SYMMM_ENV = "MOMENTUM_FUSED_TRITON_SYMMM"


def _triton_symmm_requested() -> bool:
    value = os.environ.get(TRITON_SYMMM_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{TRITON_SYMMM_ENV}={value!r}: expected 1 (the Triton symmetric products of Muon's "
                         "Newton-Schulz on CUDA, ns_algorithm 'gram' or 'auto') or 0 / unset (cuBLAS through torch)")
    return value == "1"


def _check_symmm_env(group: Mapping) -> None:
    """MUON_SPEC's cross-check (every step, before anything changes): a bad MOMENTUM_FUSED_TRITON_SYMMM, or 1
    without triton, raises here rather than inside the step's matrix phase."""
    if group.get("ns_algorithm") != "standard" and _triton_symmm_requested():
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"{TRITON_SYMMM_ENV}=1 needs triton, which is not installed")


def symmetric_products(algorithm: str, device: torch.device, dtype: torch.dtype):
    """How the Newton-Schulz phase computes its symmetric products (``reference.symmetric_baddbmm``'s
    signature): with ``"gram"`` and ``"auto"`` in bf16 on a CPU where the half-product kernel runs
    (``_backend_cpu.symmetric_product``: AVX-512-BF16, no AMX), that kernel; on CUDA, the Triton kernel
    (triton_kernels/symmm.py) when ``MOMENTUM_FUSED_TRITON_SYMMM=1`` (opt-in until a GPU measures it against cuBLAS;
    without triton that raises); else None (torch's bmm/baddbmm). ``"standard"`` always uses torch's ops: it is
    torch.optim.Muon's iteration bit for bit."""
    if algorithm == "standard" or dtype != torch.bfloat16:
        return None
    if device.type == "cuda":
        if not _triton_symmm_requested():
            return None
        try:
            from .triton_kernels.symmm import symmetric_baddbmm
        except ImportError as e:
            raise RuntimeError(f"{TRITON_SYMMM_ENV}=1 needs triton, which cannot be imported: {e}") from None
        return symmetric_baddbmm
    if device.type != "cpu":
        return None
    from ._backend_cpu import symmetric_product
    return symmetric_product()


def _ns_phase(group: Mapping, batch: torch.Tensor) -> torch.Tensor:
    """The matrix phase: Newton-Schulz of a [n, *shape] stack of updates, viewed as the batch of its matrices
    (``batched_view``: [n, A, B], or with ``flatten=False`` one matrix per leading index of each param). Its first
    op converts the stack to ns_dtype_for(group, device) and its result is in that dtype (reference.
    newton_schulz): the phase's ``compute_dtype``, which the FSDP2 collectives carry."""
    x = batch.reshape(batched_view(batch.shape, bool(group["flatten"])))
    schedule = ns_schedule(group)
    algorithm, dtype = group["ns_algorithm"], ns_dtype_for(group, batch.device)
    args = (x, schedule, float(group["eps"]), dtype)
    sym = symmetric_products(algorithm, batch.device, dtype)
    if uses_gram(algorithm, x.shape[1:]):
        out = newton_schulz(*args, gram=True, restarts=gram_restarts(len(schedule)), sym=sym)
    else:
        out = newton_schulz(*args, sym=sym)
    return out.reshape(batch.shape)


def _apply_advance(g, st, fresh, t):
    ratio = lr_ratio(g["adjust_lr_fn"], st["momentum_buffer"].shape, bool(g["flatten"]))
    raw, wd = g["lr"], float(g["weight_decay"])
    if isinstance(raw, torch.Tensor) and not g.get("capturable"):
        # torch.optim.Muon keeps a tensor lr a tensor (torch 2.13's _to_scalar only squeezes it): lr * factor and
        # 1 - lr * wd are products in the tensor's dtype. The same here, bit for bit: every backend computes the
        # decay as 1 - lr * wd in float64 from the pack, so it carries (1 - decay, 1) wherever 1 - (1 - decay)
        # is decay again in float64 (any fp32 decay from 2^-29 to 2^24 in magnitude, and 0). One host read:
        # the products are the same single IEEE operations on a host copy (a device lr: one sync, not three).
        t32 = raw.detach().reshape(()).cpu()
        lr = float(t32)
        adjusted, decay = float(t32 * ratio), float(1 - t32 * wd)
        if wd != 0 and 1.0 - (1.0 - decay) == decay:
            lr, wd = 1.0 - decay, 1.0
        return (lr, wd, adjusted)
    lr = lr_value(g)
    return (lr, wd, lr * ratio)


# Groups that can be stepped by the Muon rule; the aux AdamW groups of momentum_fused.Muon are not.
MUON_HPARAMS = dict(lr=LR, weight_decay=NONNEG, momentum=UNIT_OPEN, nesterov=Flag(), ns_coefficients=NSCoefficients(),
                    eps=NONNEG, ns_steps=NSSteps(), adjust_lr_fn=Choice((None, "original", "match_rms_adamw")),
                    ns_dtype=NSDtype(), ns_algorithm=Choice(NS_ALGORITHMS), maximize=Flag(), flatten=Flag())
MUON_DEFAULTS = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=DEFAULT_NS_COEFFICIENTS,
                     eps=DEFAULT_EPS, ns_steps=DEFAULT_NS_STEPS, adjust_lr_fn=None, ns_dtype=None,
                     ns_algorithm="standard", maximize=False, flatten=True)

# (the momentum pass runs with the momentum buffer in the kernels' param slot: ElementwisePass.param_slot)
MUON_MOMENTUM_SPEC = UpdateRuleSpec(
    name="muon_momentum", family="muon", hparams=MUON_HPARAMS, defaults=MUON_DEFAULTS,
    state_names=lambda g: ("update",), flag_names=("nesterov",),
    flags=lambda g: (bool(g["nesterov"]),), scalar_names=("lr", "momentum", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["momentum"])),  # (lr unused: every pack starts with lr)
    traffic=Traffic(states_read=0, states_written=0b1))  # the update: written, never read
# (the pack of the apply pass reads the param's shape from its momentum buffer: the pass gets no param)
MUON_APPLY_SPEC = UpdateRuleSpec(
    name="muon_apply", family="muon", hparams=MUON_HPARAMS, defaults=MUON_DEFAULTS,
    state_names=lambda g: ("update",), flag_names=(), flags=lambda g: (),
    scalar_names=("lr", "weight_decay", "adjusted_lr", "grad_mult"), advance=_apply_advance,
    traffic=Traffic(reads_grad=False, states_written=0))  # the update: read, never written
MUON_SPEC = UpdateRuleSpec(
    name="muon", family="muon", hparams=MUON_HPARAMS, defaults=MUON_DEFAULTS,
    state_names=lambda g: ("momentum_buffer",), flag_names=(), flags=lambda g: (), scalar_names=("grad_mult",),
    advance=lambda g, st, fresh, t: (), cross_check=_check_symmm_env,
    state_tensors=lambda g: (StateTensor("momentum_buffer"), StateTensor(
        "update", persistent=False, work_dtype=lambda dtype, device: update_dtype(g, dtype, device))),
    phases=(ElementwisePass("muon_momentum", param_slot="momentum_buffer"),
            MatrixPhase("newton_schulz", "update", _ns_phase, max_batch=None, max_batch_bytes=NS_MAX_BATCH_BYTES,
                        cpu_batch_bytes=None if cpu_has_amx() else NS_CPU_BATCH_BYTES, compute_dtype=ns_dtype_for,
                        stacked=lambda g: not g["flatten"]),
            ElementwisePass("muon_apply")))

for _s in (MUON_MOMENTUM_SPEC, MUON_APPLY_SPEC, MUON_SPEC):
    SPECS[_s.name] = _s
