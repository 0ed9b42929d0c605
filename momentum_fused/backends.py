"""Backend registry. ``resolve()`` is the only place that chooses which implementation runs.

A backend receives one *bucket*: tensors that share a device, a dtype layout, a rule and its flags,
with one scalar pack per tensor. It knows nothing of param groups or optimizers.

Choice order for ``requested=None``: the environment variable ``MOMENTUM_FUSED_BACKEND``, then the
first available entry of ``AUTO_ORDER[device.type]``. An explicit request (argument or environment)
that is unknown or unavailable raises, with the stored reason; it never falls back silently. An
automatic choice that passes over a preferred-but-unavailable backend warns once.
"""
from __future__ import annotations

import array
import itertools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.autograd.graph import increment_version

from . import layouts as _layouts
from . import reference

__all__ = ["Backend", "register", "resolve", "status", "available", "ENV_VAR", "AUTO_ORDER"]

ENV_VAR = "MOMENTUM_FUSED_BACKEND"

# Preferred order per device type. Entries not (yet) registered are ignored.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
DEFAULT_ORDER = ("reference",)


@dataclass
class Backend:
    """One implementation of the update rules.

    apply(spec, flags, params, grads, states, scalars, *, layout=layouts.NATIVE, sr_keys=None): run
    ``spec``'s rule on a bucket.
      params/grads: lists of real tensors (complex params arrive as view_as_real views).
      states: list (one per tensor) of tuples of state tensors, ordered as spec.state_names, in
        layout.state_dtype_for(param dtype), followed by the layout's ``extra_keys`` (the fp32 master copy
        when layout.master, the int16 remainder when layout.remainder). layout.int8: a tensor with
        layouts.int8_quantized(param) has its states as codes (int8 signed / uint8 unsigned), then the
        layout's extra keys (master16_int8: the remainder), then the codes' fp32 block scales (2n tensors, or
        2n + 1); the others have fp32 states (and the extra keys).
      scalars: list (one per tensor) of spec.Scalars packs, or (backends with ``scalar_tables``) one
        float64 [n, k] tensor on the tensors' device (capturable groups).
      layout: the dtype layout (momentum_fused.layouts); only "native" is passed unless listed in
        ``layouts``. sr_keys: one uint32 key per tensor when layout.stochastic, else None.
      found_inf, grad_scale: GradScaler's one-element tensors, or None (the built-in backends all take
        them: found_inf != 0 writes nothing, grad_scale divides the packs' grad_mult); the optimizer passes
        them only to backends marked ``device_scalars`` (the others get the host protocol, optim/amp.py).
    supports(spec, device, dtype) -> str | None: None if supported, else the reason it is not.
    """

    name: str
    apply: Callable
    supports: Callable = lambda spec, device, dtype: None
    load_error: str | None = None  # why the backend could not be loaded (None: available)
    devices: tuple = ("cpu", "cuda")
    layouts: tuple = ("native",)  # dtype layouts (momentum_fused.layouts) that apply() implements
    # apply() takes found_inf= / grad_scale= device tensors and reads them in the kernels (GradScaler
    # without a host sync, see FusedOptimizer._device_amp)
    device_scalars: bool = False
    # apply() bumps the autograd version counters of the params it writes (as in-place ATen ops do: the
    # reference backend's ops, the cpu backend's entry); for the others the optimizer bumps them after apply()
    bumps_versions: bool = False
    # apply() also takes ``scalars`` as a float64 [n, k] tensor on the tensors' device (capturable=True)
    scalar_tables: bool = False
    # () -> None, or why an available backend can run nothing on this machine as it is (status() shows it)
    caveat: Callable | None = None
    _warned: set = field(default_factory=set)

    @property
    def available(self) -> bool:
        return self.load_error is None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


_HALF = (torch.float16, torch.bfloat16)


def _lazy(g: torch.Tensor) -> bool:
    return g.is_conj() or g.is_neg() or g._is_zerotensor()


def _resolved(g: torch.Tensor) -> torch.Tensor:
    """A gradient as memory a kernel can read: a lazy conjugate / negative view resolved, autograd's ZeroTensor
    (no memory; the dispatcher would hand the op an expanded zero) as zeros."""
    if g._is_zerotensor():
        return torch.zeros(g.shape, dtype=g.dtype, device=g.device)
    return g.resolve_conj().resolve_neg()


def contiguous_lists(params, grads, states, memory_order: bool = False):
    """The bucket as contiguous tensors for a compiled kernel: returns (params, grads, flat states
    (tensor-major), writeback), where writeback lists (original, contiguous working copy) pairs of
    params/state to copy back after the kernel ran. Contiguous tensors pass through without a copy; gradients
    with a lazy bit or without memory are resolved (``_resolved``). ``memory_order`` (an elementwise layout:
    ``not Layout.by_element_index``): a dense non-contiguous param (channels_last, a transposed leaf) whose state
    tensors have its strides is stepped in place through flat views of its memory, its gradient too when it has
    those strides (else a copy in the param's memory format): copying params and state to contiguous buffers
    and back made a channels_last ResNet's step 3.2x torch's fused one (a review, 2026-12-07)."""
    is_contiguous = torch.Tensor.is_contiguous
    flat = [s for st in states for s in st]
    if any(map(_lazy, grads)):
        grads = [_resolved(g) for g in grads]
    if all(map(is_contiguous, params)) and all(map(is_contiguous, grads)) and all(map(is_contiguous, flat)):
        return params, grads, flat, []  # the usual case, checked at C speed
    writeback = []

    def inout(t):
        if t.is_contiguous():
            return t
        c = t.contiguous()
        writeback.append((t, c))
        return c

    ps, gs, flat = [], [], []
    for p, g, st in zip(params, grads, states):
        if memory_order and _steps_in_memory_order(p, st):
            ps.append(_memory_view(p))
            gs.append(_memory_view(g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)))
            flat.extend(_memory_view(s) for s in st)
        else:
            ps.append(inout(p))
            gs.append(g if g.is_contiguous() else g.contiguous())
            flat.extend(inout(s) for s in st)
    return ps, gs, flat, writeback


def _steps_in_memory_order(p: torch.Tensor, st) -> bool:
    """A non-contiguous param whose memory is one dense block (every element once, no gap) and whose state tensors
    are laid out as it is (``torch.empty_like``'s preserve_format gives them its strides)."""
    return (not p.is_contiguous() and _dense(p)
            and all(s.shape == p.shape and s.stride() == p.stride() for s in st))


def _dense(t: torch.Tensor) -> bool:
    """Its dims ordered by stride have the strides of a contiguous tensor (size-1 dims aside): a permutation of a
    contiguous block (channels_last, a transposed leaf), every element once, no gap."""
    expect = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _memory_view(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's memory as a contiguous 1-D view, in memory order (its version counter is the tensor's)."""
    return t.detach().as_strided((t.numel(),), (1,))


def _dispatch_mode_check():
    """A function telling whether a TorchDispatchMode is active (its op calls must go through the dispatcher)."""
    count = getattr(torch._C, "_len_torch_dispatch_stack", None)  # private: a public fallback if it moves
    if count is not None:
        return count
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return lambda: _get_current_dispatch_mode() is not None


dispatch_mode_active = _dispatch_mode_check()


def run_step_op(module, fast, op, params, grads, states, args, bump=False, memory_order=False) -> None:
    """One bucket through a compiled op, by its eager entry when it can (csrc/py_borrow.h).

    ``fast(params, grads, states, *args)`` is the extension module's pybind entry (``_C_cpu.cpu_step``,
    ``_C_cuda.cuda_step``): it reads the lists directly and returns ``module.DONE``, or, having done nothing,
    ``module.PYTHON_DISPATCH`` (a tensor subclass that dispatches to Python) or ``module.NOT_CONTIGUOUS``.
    ``op`` is the registered op (``torch.ops.momentum_fused.*``), the same C++ function behind the dispatcher:
    it runs under a TorchDispatchMode (so modes, ``opcheck`` and torch.compile see it) and for subclasses.
    Non-contiguous tensors run on contiguous copies, copied back after the op. ``states`` is the per-param
    list of state tuples. ``bump``: the fast entry bumps the params' autograd version counters (``_C_cpu``), and
    so does this function on the other paths (the registered op does not; a written-back copy does).
    ``memory_order``: ``contiguous_lists``'s (the layout is elementwise)."""
    status = module.PYTHON_DISPATCH if dispatch_mode_active() else fast(params, grads, states, *args)
    if status == module.DONE:
        return
    ps, gs, flat, writeback = contiguous_lists(params, grads, states, memory_order)
    if status != module.NOT_CONTIGUOUS or fast(ps, gs, flat, *args) != module.DONE:
        op(ps, gs, flat, *args)
        if bump and not torch.compiler.is_compiling():
            increment_version(ps)
    for orig, work in writeback:
        orig.copy_(work)


_FAKES: set = set()


def register_step_fake(qualname: str) -> None:
    """Register, once, the fake (meta) kernel of the compiled step op ``qualname`` (``momentum_fused::cpu_step``
    / ``::cuda_step``) for FakeTensor / torch.compile tracing. The step ops only mutate their ``Tensor(a!)`` /
    ``Tensor(b!)`` lists in place and return nothing. The fake also runs as the op's Meta kernel, which the
    dispatcher picks when a meta tensor is among the lists: it raises, as the real kernels' argument checks
    (csrc/step_args.h) do, when a tensor of the lists is not on the first param's device, instead of returning
    having done nothing."""
    if qualname in _FAKES:
        return

    def fake(params, grads, states, *args, **kwargs):
        if params:
            device = params[0].device
            for what, tensors in (("params", params), ("grads", grads), ("states", states)):
                for i, t in enumerate(tensors):
                    if t.device != device:
                        raise RuntimeError(f"{qualname}: {what}[{i}] is on {t.device}, expected {device} "
                                           "(the params' device)")
        return None

    torch.library.register_fake(qualname)(fake)
    _FAKES.add(qualname)


def pack_table(scalars, k: int) -> torch.Tensor:
    """The per-tensor scalar packs (``spec.Scalars``, one per tensor) as one float64 [n, k] host tensor
    for the compiled backends. Tensors of one group usually share one pack object (see
    ``FusedOptimizer._group_scalars``); each distinct object is converted once."""
    if isinstance(scalars, torch.Tensor):  # already a table (capturable groups compute it on the device)
        return scalars
    n = len(scalars)
    if n == 0:
        return torch.empty((0, k), dtype=torch.float64)
    ids = list(map(id, scalars))
    if ids.count(ids[0]) == n:
        return torch.tensor([tuple(scalars[0])], dtype=torch.float64).expand(n, k).contiguous()
    rows: dict = {}
    index = [rows.setdefault(i, len(rows)) for i in ids]
    if len(rows) * 4 > n:  # mostly distinct packs: one conversion of everything
        buf = array.array("d", itertools.chain.from_iterable(scalars))
        return torch.frombuffer(buf, dtype=torch.float64).view(n, k).clone()
    firsts = {}
    for pos, i in enumerate(ids):
        firsts.setdefault(i, pos)
    uniq = torch.tensor([tuple(scalars[pos]) for pos in firsts.values()], dtype=torch.float64)
    return uniq[torch.tensor(index, dtype=torch.int64)]


_CODES = (torch.int8, torch.uint8)


def _reference_apply(spec, flags, params, grads, states, scalars, *, layout=_layouts.NATIVE, sr_keys=None,
                     found_inf=None, grad_scale=None):
    """The reference rules, tensor by tensor. Half-precision storage (fp16/bf16) is computed in float32
    and rounded once when written back, as the kernels do: computing in fp16 itself would underflow
    (1 - beta2) g^2 and round eps = 1e-8 to zero. Layouts: the value the rule reads is the master copy's
    (``master``) or the one the param and its remainder decode to (``master16``, layouts.master16_decode);
    bf16 writes round stochastically under ``bf16_sr`` (layouts.sr_round_bf16), 8-bit codes under ``int8_sr`` and
    ``master16_int8_sr`` (layouts.int8_encode with the tensor's key). found_inf / grad_scale as
    the kernels take them (read on the host here: this backend is not ``device_scalars``): found_inf != 0
    writes nothing, grad_scale divides each pack's grad_mult."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    if grad_scale is not None:
        scale = float(grad_scale)
        scalars = [sc._replace(grad_mult=sc.grad_mult / scale) for sc in scalars]
    fn = reference.RULES[spec.name]
    for i, (p, g, st, sc) in enumerate(zip(params, grads, states, scalars)):
        if layout.master:
            *st, master = st
            p32, st32 = master.clone(), tuple(st)  # fp32 state: updated in place
            fn(p32, g.float(), st32, sc, flags)
            master.copy_(p32)
            p.copy_(p32)  # rounds to nearest even
        elif layout.int8 and st and st[0].dtype in _CODES:  # quantized (by its state: a shard cannot tell): decode
            r = 1 if layout.remainder else 0  # master16_int8: (codes..., remainder, scales...)
            n = (len(st) - r) // 2
            codes, scales = st[:n], st[n + r:]
            signed = [c.dtype == torch.int8 for c in codes]
            st32 = tuple(_layouts.int8_decode(c, s.reshape(-1), sg) for c, s, sg in zip(codes, scales, signed))
            p32 = _layouts.master16_decode(p, st[n]).view(p.shape) if r else p
            fn(p32, g.float() if r else g, st32, sc, flags)
            if r:
                hi, low = _layouts.master16_encode(p32)
                p.copy_(hi.view(p.shape))
                st[n].copy_(low.view(p.shape))
            key = sr_keys[i] if layout.stochastic else None  # int8_sr, master16_int8_sr: stochastic codes
            for j, (c, s, t, sg) in enumerate(zip(codes, scales, st32, signed)):
                code, scale = _layouts.int8_encode(t, sg, key, 1 + j)
                c.copy_(code)
                s.copy_(scale.view(s.shape))
        elif layout.remainder:  # master16: the same fp32 master, stored as the param and its low half
            *st, lo = st
            p32 = _layouts.master16_decode(p, lo).view(p.shape)
            fn(p32, g.float(), tuple(st), sc, flags)
            hi, low = _layouts.master16_encode(p32)
            p.copy_(hi.view(p.shape))
            lo.copy_(low.view(lo.shape))
        elif p.dtype in _HALF or any(t.dtype in _HALF for t in st):
            p32, st32 = p.float(), tuple(t.float() for t in st)
            fn(p32, g.float(), st32, sc, flags)
            if layout.stochastic:
                key = sr_keys[i]
                p.copy_(_layouts.sr_round_bf16(p32, key, 0).view(p.shape))
                for j, (t, t32) in enumerate(zip(st, st32)):
                    t.copy_(_layouts.sr_round_bf16(t32, key, 1 + j).view(t.shape))
            else:
                p.copy_(p32)
                for t, t32 in zip(st, st32):
                    t.copy_(t32)
        else:
            fn(p, g, st, sc, flags)


register(Backend(name="reference", apply=_reference_apply, devices=("cpu", "cuda", "mps", "xpu", "meta"),
                 layouts=tuple(_layouts.LAYOUTS), bumps_versions=True))  # (torch's in-place ops)


def available() -> list[str]:
    return [n for n, b in _REGISTRY.items() if b.available]


def status() -> dict[str, str]:
    """Every registered backend with 'available' or the reason it is not; 'available (...)' where it loaded but
    can run nothing here as things are (triton with no CUDA device and no TRITON_INTERPRET=1)."""
    out = {}
    for n, b in _REGISTRY.items():
        why = b.caveat() if b.available and b.caveat is not None else None
        out[n] = f"unavailable: {b.load_error}" if not b.available else "available" if why is None else \
            f"available ({why})"
    return out


def _layout_reason(b: Backend, layout) -> str | None:
    if layout is None or layout.name in b.layouts:
        return None
    return f"dtype layout {layout.name!r} is not implemented by it (it implements: {', '.join(b.layouts)})"


def _rule_reason(b: Backend, spec, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``b`` cannot run rule ``spec`` (None: it can). A multi-phase rule (contract v2) runs on a
    backend that implements every one of its elementwise passes (its matrix phases are torch ops)."""
    if not spec.phases:
        return b.supports(spec, device, dtype)
    from .specs import ElementwisePass, get_spec
    for phase in spec.phases:
        if isinstance(phase, ElementwisePass):
            why = b.supports(get_spec(phase.rule), device, dtype)
            if why is not None:
                return f"its pass {phase.rule!r}: {why}"
    return None


def _explicit(name: str, spec, device: torch.device, dtype: torch.dtype, source: str, layout=None) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} ({source}); registered backends: {sorted(_REGISTRY)}")
    b = _REGISTRY[name]
    if not b.available:
        raise RuntimeError(f"backend {name!r} ({source}) is unavailable: {b.load_error}")
    if device.type not in b.devices:
        raise RuntimeError(f"backend {name!r} ({source}) does not run on {device.type} tensors "
                           f"(it runs on: {', '.join(b.devices)})")
    why = _rule_reason(b, spec, device, dtype) or _layout_reason(b, layout)
    if why is not None:
        raise RuntimeError(f"backend {name!r} ({source}) cannot run rule {spec.name!r} on "
                           f"{device.type}/{dtype}: {why}")
    return b


def resolve(requested: str | None, spec, device: torch.device, dtype: torch.dtype, layout=None) -> Backend:
    """Pick the backend for one bucket (rule ``spec`` on ``device`` with param dtype ``dtype`` in dtype
    layout ``layout``, a momentum_fused.layouts.Layout; None: native)."""
    if requested is not None:
        return _explicit(requested, spec, device, dtype, "requested with backend=", layout)
    env = os.environ.get(ENV_VAR)
    if env:
        return _explicit(env, spec, device, dtype, f"from the environment variable {ENV_VAR}", layout)
    order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    skipped = []
    for name in order:
        b = _REGISTRY.get(name)
        if b is None:
            continue  # not part of this build at all: nothing to report
        why = b.load_error or (None if device.type in b.devices else f"does not run on {device.type}") \
            or _rule_reason(b, spec, device, dtype) or _layout_reason(b, layout)
        if why is None:
            if skipped:
                key = (spec.name, device.type, dtype, tuple(skipped))
                if key not in b._warned:
                    b._warned.add(key)
                    from .optim.keys import user_stacklevel  # (optim imports this module)
                    warnings.warn(f"momentum_fused: using backend {name!r} for rule {spec.name!r} on "
                                  f"{device.type}/{dtype}; skipped: " + "; ".join(skipped),
                                  stacklevel=user_stacklevel())
            return b
        skipped.append(f"{name} ({why})")
    raise RuntimeError(f"no backend can run rule {spec.name!r} on {device.type}/{dtype}: " + "; ".join(skipped))


def import_extension(short: str, what: str, how_to_build: str) -> str | None:
    """Import the compiled extension ``momentum_fused._C_<short>``; None, or why it is unavailable: the
    build error setup.py stored in ``_C_<short>.build-error.txt``, or the import error."""
    import importlib

    module = f"momentum_fused._C_{short}"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"_C_{short}.build-error.txt")
    stored = None
    if os.path.exists(path):
        try:
            with open(path) as fh:
                stored = fh.read().strip()
        except OSError:
            stored = None
    try:
        importlib.import_module(module)
    except ImportError as e:
        if stored:
            return f"the {what} extension was not built: {stored}"
        from . import _jit
        if short == "cpu" and _jit.STATUS.get("reason") and str(e) == _jit.STATUS["reason"]:
            return f"the {what} extension is not available: {e}"  # (the build at first import said why and how)
        return f"the {what} extension {module} is not importable ({e}); build it with {how_to_build}"
    except Exception as e:  # e.g. an undefined symbol after a torch upgrade
        return f"loading {module} failed: {type(e).__name__}: {e}"
    return None


def names() -> Sequence[str]:
    return tuple(_REGISTRY)


# Optional compiled/JIT backends. Each module defines ``make_backend() -> Backend``; it must not raise
# for a missing toolchain or device but return a Backend whose ``load_error`` says why. A module that is
# absent from this build registers nothing; one that fails to import registers an unavailable entry
# carrying the import error, so that an explicit request reports it.
_OPTIONAL = {
    "cpu": "momentum_fused._backend_cpu",
    "triton": "momentum_fused._backend_triton",
    "cuda": "momentum_fused._backend_cuda",
}


def _register_optional() -> None:
    import importlib

    for name, module in _OPTIONAL.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            register(Backend(name=name, apply=None, load_error=f"import of {module} failed: {e}"))
            continue
        except Exception as e:  # a broken optional backend must not break the package
            register(Backend(name=name, apply=None, load_error=f"import of {module} failed: {type(e).__name__}: {e}"))
            continue
        register(mod.make_backend())


_register_optional()
