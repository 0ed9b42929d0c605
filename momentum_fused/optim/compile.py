"""torch.compile support of FusedOptimizer: a traced step runs in its capturable form and calls one opaque
custom op per bucket (``momentum_fused::bucket_step``, with its mutations and a fake kernel)."""
from __future__ import annotations

import contextlib
import itertools
import warnings

import torch

from .. import backends
from .. import distributed as _dist
from .._backend_cpu import flags_to_int  # (the kernels' flag bits: one definition)
from .. import layouts as _layouts
from ..specs import get_spec
from .checks import real_dtype
from .keys import user_stacklevel

__all__ = ["CompileMixin", "bucket_step", "bucket_op", "eager_step_checks", "note_plain_groups", "saved_groups",
           "autocast_off"]


class CompileMixin:
    """``_traceable`` of FusedOptimizer: can dynamo trace this step?"""

    def _traceable(self) -> bool:
        """Can dynamo trace this step (see ``step``)? Marked below as a constant of the trace (evaluated
        once when tracing, without guards on the lr values)."""
        spec = self.spec
        dtensor = _dist.dtensor_class()  # (a DTensor step runs eagerly: the bucket op takes local shards)
        for group in self.param_groups:
            lay = _layouts.get_layout(group["layout"])
            if self._not_capturable(lay) is not None or not isinstance(group["lr"], torch.Tensor):
                return False  # (a float lr would be specialized: one recompilation per value)
            seen = set()
            for p in group["params"]:
                if dtensor is not None and isinstance(p, dtensor):
                    return False
                g = p.grad
                if g is None or p.is_complex():
                    if g is not None:
                        return False
                    continue
                if g.is_conj() or g.is_neg() or g._is_zerotensor():  # (lazy bits: the eager step resolves them;
                    return False  # the bucket op has no kernel for a ZeroTensor: a review, 2026-12-07)
                key = (p.device, p.dtype)
                if key not in seen:
                    seen.add(key)
                    if not backends.resolve(self.backend, spec, p.device, p.dtype, lay).scalar_tables:
                        return False
        return True


    def _why_not_capturable(self, group) -> str | None:
        """Why a step of ``group`` cannot be capturable (``eager_step_checks``: the rule, the layout or the backend;
        each refuses capturable=True at construction); None where it can, or where its keys are for the
        step's checks to refuse. The backend its params would run on, when it reads its scalars on the host
        (reference: ``add_param_group`` refuses capturable=True on it too)."""
        try:
            lay = _layouts.get_layout(group["layout"])
            why = self._not_capturable(lay)
        except (KeyError, TypeError, ValueError):
            return None
        name = why is None and self._host_scalar_backend(group["params"], lay)
        return f"backend {name!r} reads its scalars on the host" if name else why

    def _host_scalar_backend(self, params, lay) -> str | None:
        """The name of the backend without scalar tables (reference) that a step of ``params`` would run on; None:
        none (or none resolvable now: the step says why). Meta params are left out: an optimizer built before the
        model is materialized (``to_empty``) steps them on their later device."""
        seen = set()
        for p in params:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            if not isinstance(p, torch.Tensor) or p.device.type == "meta":
                continue
            key = (p.device, real_dtype(p.dtype))
            if key in seen:
                continue
            seen.add(key)
            try:
                b = backends.resolve(self.backend, self.spec, *key, lay)
            except Exception:  # noqa: BLE001 (no backend for it: the step raises, naming them)
                continue
            if not b.scalar_tables:
                return b.name
        return None

    def _amp_traceable(self) -> bool:
        """With GradScaler's ``found_inf`` / ``grad_scale`` set: can the traced step take them as tensors (the
        device protocol, ``AmpMixin._device_amp``: every backend reads device scalars, no per-group host
        counters)? Else the step runs eagerly, where the host protocol reads the flag (reading it inside the
        trace broke the graph in the middle of the update: a crash, with the step counters advanced)."""
        if getattr(self, "found_inf", None) is None and getattr(self, "grad_scale", None) is None:
            return True
        if self._amp_tensors() is None:
            return False
        seen = set()
        for group in self.param_groups:
            lay = _layouts.get_layout(group["layout"])
            for p in group["params"]:
                key = (p.device, p.dtype, lay.name)
                if p.grad is None or key in seen:
                    continue
                seen.add(key)
                if not getattr(backends.resolve(self.backend, self.spec, p.device, p.dtype, lay), "device_scalars",
                               False):
                    return False
        return True


def note_plain_groups(opt, groups, reset: bool = False) -> None:
    """Remember the groups (dict identities) that were added with ``capturable=False``: given to the constructor or
    ``add_param_group``, or restored by ``load_state_dict`` or an unpickling (``reset``: all of ``groups`` then).
    ``eager_step_checks`` sets back only such a group's True (torch.compile's dynamo writes into the existing
    dicts); a True asked for there, or in a group dict put in ``param_groups`` by hand, is kept. The dicts are
    held, by identity (an id alone could be a freed dict's, reused by one put in by hand: a review)."""
    plain = {} if reset else opt.__dict__.get("_capturable_plain", {})
    plain.update((id(g), g) for g in groups if isinstance(g, dict) and g.get("capturable") is not True)
    if len(plain) > 2 * len(opt.param_groups) + 8:  # (groups replaced or removed since: not kept alive)
        plain = {id(g): g for g in opt.param_groups if plain.get(id(g)) is g}
    opt.__dict__["_capturable_plain"] = plain


@contextlib.contextmanager
def eager_step_checks(opt, not_capturable, refused):
    """Around an eager step (FusedOptimizer and Muon), two facts of CUDA graphs and torch.compile (``refused(opt)``
    is called when the first raises):

    1. CUDA-graph capture of a step with a group whose ``capturable`` is False raises, as torch's optimizers do
       (its host-side numbers would be constants of the graph: every replay would repeat them).
    2. Outside a capture: torch.compile's dynamo writes ``capturable=True`` into the real group dicts of an
       optimizer whose params are all on CUDA and have no state yet, when compiled code reads
       ``optimizer.param_groups`` (torch/_dynamo/variables/optimizer.py ``_set_capturable``: a scheduler's step,
       an lr logged inside the compiled function). For an optimizer that cannot be capturable
       (``not_capturable(group)``: a reason, else None) the next step raised, though nobody had asked for it (a
       review, 2026-12-07). Such a group (no state yet, as dynamo requires, and added with capturable=False:
       ``note_plain_groups``) runs the step with False, with a warning the first time; any other keeps the flag,
       and the step's checks refuse it as before. After the step, a group still without state (a rule without
       state: SGD without momentum, SignSGD) gets dynamo's True back: dynamo writes it again at every trace while
       the state is empty, and the False failed its guard, a recompile at every call until its limit (a review,
       2026-12-08). Its state dicts and copies save False (``saved_groups``)."""
    try:
        set_back = _set_back(opt, not_capturable)
    except BaseException:
        refused(opt)
        raise
    try:
        yield
    finally:
        for g in set_back:
            if not any(p in opt.state for p in g["params"]):
                g["capturable"] = True


def _set_back(opt, not_capturable) -> list:
    """``eager_step_checks``'s checks and set-backs before the step: the groups set back."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        if not all(g.get("capturable") is True for g in opt.param_groups):
            raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of {type(opt).__name__} "
                               "but param_groups' capturable is False: construct it with capturable=True "
                               "(docs/ecosystem.md, CUDA graphs)")
        return []
    plain = opt.__dict__.get("_capturable_plain", {})
    written = opt.__dict__.setdefault("_capturable_dynamo", {})
    if len(written) > 2 * len(opt.param_groups) + 8:  # (groups replaced or removed since: not kept alive)
        written = opt.__dict__["_capturable_dynamo"] = {id(g): g for g in opt.param_groups
                                                        if written.get(id(g)) is g}
    set_back = []
    for gi, g in enumerate(opt.param_groups):
        if g.get("capturable") is not True or plain.get(id(g)) is not g or \
                any(p in opt.state for p in g.get("params", ())):
            continue
        why = not_capturable(g)
        if why is None:
            continue
        g["capturable"] = False
        set_back.append(g)
        if written.get(id(g)) is not g:
            written[id(g)] = g
            warnings.warn(f"{type(opt).__name__} param group {gi}: capturable=True was set after construction "
                          "(torch.compile sets it on every group of an optimizer whose params are on CUDA and have "
                          "no state yet when compiled code reads optimizer.param_groups), but this optimizer cannot "
                          f"run capturable: {why}. Its steps run with False; state dicts save False",
                          RuntimeWarning, stacklevel=user_stacklevel())
    return set_back


@contextlib.contextmanager
def autocast_off():
    """The caller's ``torch.autocast`` regions (cpu, cuda) off: a training loop that steps inside one made Muon's
    Newton-Schulz products with ``ns_dtype=torch.float32`` and the low-rank steps' products run in bf16 (a review,
    2026-12-08). The elementwise kernels do not see autocast. Around the update only: a closure's forward keeps
    the caller's autocast, as in torch's optimizers."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def saved_groups(opt, groups: list) -> list:
    """``groups`` (a state dict's or a copy's, one per param group, in order) with capturable False where the live
    group holds the True that dynamo writes and the steps run with False (``eager_step_checks``)."""
    written = opt.__dict__.get("_capturable_dynamo")
    if not written:
        return groups
    return [dict(sg, capturable=False) if written.get(id(g)) is g and g.get("capturable") is True else sg
            for g, sg in zip(opt.param_groups, groups)]


# = torch.compiler.assume_constant_result(CompileMixin._traceable), without importing torch._dynamo (and
# triton with it) at import time; tests/test_ecosystem.py checks that the public decorator sets this mark.
CompileMixin._traceable._dynamo_marked_constant = True


@torch.library.custom_op("momentum_fused::bucket_step", mutates_args=("params", "states"))
def bucket_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
                counts: list[int], scalars: torch.Tensor, found_inf: torch.Tensor | None,
                grad_scale: torch.Tensor | None, rule: str, flags: int, backend: str, layout: str) -> None:
    """One bucket of a traced (``torch.compile``) step: ``backend.apply`` of ``rule`` on params, grads and the
    flat state list (tensor-major, ``counts[i]`` tensors for param i: the 8-bit layouts give a quantized param its
    codes and scales and a small one its fp32 state, so the counts differ within a bucket), with the float64
    [n, k] scalar table. Registered with its mutations (params and states are written in place) and a fake
    kernel, so that dynamo records it as one node instead of tracing the backend's Python."""
    spec = get_spec(rule)
    fl = spec.Flags(*[bool(flags >> i & 1) for i in range(len(spec.flag_names))])
    lay = _layouts.get_layout(layout)
    n = len(params)
    if n == 0:
        return
    ends = list(itertools.accumulate(counts))
    sts = [tuple(states[e - c:e]) for c, e in zip(counts, ends)]
    b = backends.resolve(backend, spec, params[0].device, real_dtype(params[0].dtype), lay)
    kw = {} if lay.name == "native" else {"layout": lay}
    if found_inf is not None:
        kw.update(found_inf=found_inf, grad_scale=grad_scale)
    b.apply(spec, fl, params, grads, sts, scalars, **kw)


@bucket_step.register_fake
def _bucket_step_fake(params, grads, states, counts, scalars, found_inf, grad_scale, rule, flags, backend, layout):
    return None


def bucket_op(backend, spec, flags, ps, gs, sts, scs, *, layout=None, sr_keys=None, found_inf=None, grad_scale=None):
    if sr_keys is not None:  # (capturable excludes the stochastic layouts; a traced step is capturable)
        raise NotImplementedError("momentum_fused: a traced step cannot use a stochastic layout (bf16_sr, int8_sr, "
                                  "master16_int8_sr)")
    bits = flags_to_int(spec.name, flags)
    bucket_step(list(ps), list(gs), [t for st in sts for t in st], [len(st) for st in sts], scs, found_inf,
                grad_scale, spec.name, bits, backend.name, "native" if layout is None else layout.name)
