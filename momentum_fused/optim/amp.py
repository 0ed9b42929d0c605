"""The GradScaler protocol of FusedOptimizer: on the host (``found_inf`` read once: a skipped step changes
nothing) or on the device (the kernels read ``found_inf`` and ``grad_scale``; the host side advances
optimistically and is rolled back from an ``AmpRollback`` record when the flag, copied without blocking, turns
out nonzero)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .. import distributed as _dist

__all__ = ["AmpMixin", "AmpRollback"]


@dataclass
class AmpRollback:
    """What an optimistic host-side advance must be able to undo if the device says the step was skipped."""
    stepped: list = field(default_factory=list)      # state dicts whose host ``step`` was advanced
    mu_products: list = field(default_factory=list)  # (state dict, the mu_product before, or None)
    created: list = field(default_factory=list)      # (state dict, key) created by this step
    sr_groups: list = field(default_factory=list)    # groups whose ``sr_step`` advanced

    def __bool__(self) -> bool:
        return bool(self.stepped or self.mu_products or self.created or self.sr_groups)


class PendingAmp(NamedTuple):
    flag: torch.Tensor         # found_inf, copied to the host (pinned memory on CUDA)
    event: Any                 # the CUDA event after the copy, or None
    rollback: AmpRollback


def amp_scalar(owner: str, name: str, value) -> float:
    """GradScaler's ``found_inf`` / ``grad_scale`` read on the host (the host protocol): a number or a one-element
    tensor with a value (a larger or meta tensor gave torch's message, which named neither)."""
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.device.type == "meta"):
        raise ValueError(f"{owner}: {name} must be a one-element tensor with a value (GradScaler's), got shape "
                         f"{tuple(value.shape)} on {value.device}; nothing changed")
    return float(value)


def unscale_lists(owner: str, plan, traced: bool) -> dict:
    """The gradients a step with a grad scale divides in place after its update (``_unscale_grads``), gathered
    before the update: {device: (plain gradients, complex ones as real views; lazy conjugate / negative views)}.
    Autograd's ZeroTensor gradients (no memory; zero either way) are left out, and a gradient whose elements
    share memory (an expanded tensor: the division raised after every param had been updated) is refused here,
    before anything changes. In a step traced by torch.compile nothing may break the graph: no tensor queries
    (a break mid-update ran the rest of the step in a resumed frame, with another update)."""
    cls = _dist.dtensor_class()
    by_device: dict = {}
    for gi, gp in enumerate(plan):
        for p in gp.items:
            g = p.grad
            if g is None:
                continue
            if cls is not None and isinstance(g, cls):
                g = g._local_tensor
            lists = by_device.get(g.device)
            if lists is None:
                lists = by_device[g.device] = ([], [])
            if not traced:
                if g._is_zerotensor():
                    continue
                if not g.is_contiguous() and torch._debug_has_internal_overlap(g) == 1:
                    raise ValueError(f"{owner}: the gradient of a param of group {gi} (shape {tuple(p.shape)}) has "
                                     f"elements that share memory (strides {tuple(g.stride())}, e.g. an expanded "
                                     "tensor), so grad_scale cannot unscale it in place after the step; pass a "
                                     "materialized gradient (g.contiguous()); nothing changed")
                if g.is_conj() or g.is_neg():  # (the foreach op writes plain memory only)
                    lists[1].append(g)
                    continue
            lists[0].append(torch.view_as_real(g) if g.is_complex() else g)
    return by_device


class AmpMixin:
    """``_amp`` (host protocol), ``_device_amp``, ``sync_amp`` and ``_defer_amp_flag`` of FusedOptimizer."""

    def _device_amp(self, plan):
        """(found_inf, grad_scale) to hand to the kernels, or None for the host protocol (``_amp``).

        The device protocol (no host sync) is used when GradScaler's ``found_inf`` is a tensor, every
        bucket's backend reads device scalars (triton, cuda), and the rule keeps no per-group host
        counters (FSGDM, schedule-free: they take the host path; see ``_keeps_group_counters`` for
        multi-phase rules, whose every elementwise pass gets the flag). The kernels then skip every write
        when found_inf != 0; the host side (step counts, NAdam's mu_product, state created by this step,
        ``sr_step``) advances optimistically and is rolled back when the flag, copied to the host
        without blocking, turns out nonzero: checked at the start of the next step, by ``state_dict``,
        ``load_state_dict``, ``add_param_group`` and ``sync_amp()``."""
        flags = self._amp_tensors()
        if flags is None:
            return None
        found_inf, grad_scale = flags
        for _, _, items, chosen in plan:
            if not all(getattr(b, "device_scalars", False) for b in chosen.values()):
                return None
        if found_inf.numel() != 1 or (grad_scale is not None and grad_scale.numel() != 1):
            raise ValueError(f"{type(self).__name__}: found_inf and grad_scale must be one-element tensors")
        return found_inf, grad_scale

    def _amp_tensors(self):
        """GradScaler's (found_inf, grad_scale) when the device protocol may take them (found_inf a tensor,
        grad_scale a tensor or None, no per-group host counters), else None; which backends read them is the
        caller's question (``_device_amp`` on a plan, ``CompileMixin._amp_traceable`` before one)."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if not isinstance(found_inf, torch.Tensor) or not (grad_scale is None or isinstance(grad_scale, torch.Tensor)):
            return None
        if self._keeps_group_counters():
            return None
        return found_inf, grad_scale

    def sync_amp(self) -> None:
        """Resolve a pending device-side GradScaler check: wait for the flag of the last step and, if it
        was nonzero (the kernels skipped that step), roll the host-side state back. Called by step(),
        state_dict(), load_state_dict() and add_param_group(); call it before reading ``state`` directly
        between steps when training with a GradScaler on the triton/cuda backends."""
        pending = self._step_attrs.pop("pending_amp", None)
        if pending is None:
            return
        if pending.event is not None:
            pending.event.synchronize()
        if float(pending.flag) == 0.0:
            return
        rb = pending.rollback
        for st in rb.stepped:
            st["step"].sub_(1.0)
        for st, old in rb.mu_products:
            if old is None:
                st.pop("mu_product", None)
            else:
                st["mu_product"].copy_(old)
        for st, key in rb.created:
            st.pop(key, None)
        for g in rb.sr_groups:
            g["sr_step"] -= 1
        for p in [p for p, st in self.state.items() if not st]:  # a skipped first step created nothing
            del self.state[p]
        self.invalidate_caches()

    def _defer_amp_flag(self, found_inf, record: AmpRollback):
        """Copy found_inf to the host without blocking; sync_amp() reads it later."""
        if found_inf.device.type == "cuda":
            buf = self._step_attrs.get("amp_flag")
            if buf is None:
                buf = self._step_attrs["amp_flag"] = torch.empty(1, dtype=torch.float32, pin_memory=True)
            buf.copy_(found_inf.reshape(1), non_blocking=True)  # (on found_inf's device's current stream)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(found_inf.device))  # (that stream: found_inf may live on a GPU
            # other than the current device, whose stream would not order the copy; a review, 2026-12-07)
        else:
            buf, event = found_inf.detach().reshape(1).clone(), None
        self._step_attrs["pending_amp"] = PendingAmp(buf, event, record)

    def _unscale_grads(self, plan, amp, inv_scale: float, lists=None) -> None:
        """After a GradScaler step, the stepped params' ``.grad`` hold unscaled values, as with torch.optim (its
        fused optimizers divide them in their kernels; for the others GradScaler unscales them before the step).
        One ``torch._amp_foreach_non_finite_check_and_unscale_`` per device, GradScaler's own unscale (a product
        with the fp32 reciprocal of the scale: the quotient itself for its powers of two), after the kernels, which
        read the scaled gradients. ``amp``: None for the host protocol (a skipped step returned before this;
        ``inv_scale`` 1.0: no scale), else the device protocol's (found_inf, grad_scale), the factor then 1 where
        found_inf says the kernels skipped (torch's fused kernels leave the gradients of a skipped step scaled).
        ``lists``: ``unscale_lists``'s, gathered and checked before the update (None: gathered here)."""
        if amp is None:
            if inv_scale == 1.0:
                return
        elif amp[1] is None:
            return
        if lists is None:
            lists = unscale_lists(type(self).__name__, plan, torch.compiler.is_compiling())
        for device, (plain, lazy) in lists.items():
            if amp is None:
                inv = torch.full((), inv_scale, dtype=torch.float32, device=device)
            else:
                found_inf, grad_scale = (t.to(device, non_blocking=True) for t in amp)
                inv = torch.where(found_inf.reshape(()) != 0, torch.ones((), dtype=torch.float32, device=device),
                                  grad_scale.reshape(()).double().reciprocal().float())
            if plain:
                torch._amp_foreach_non_finite_check_and_unscale_(
                    plain, torch.zeros(1, dtype=torch.float32, device=device), inv)
            for g in lazy:
                g.mul_(inv.to(g.dtype))

    def _amp(self):
        """GradScaler protocol: returns (skip, inv_scale)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and amp_scalar(type(self).__name__, "found_inf", found_inf) != 0.0:
            return True, 1.0
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return False, 1.0
        scale = amp_scalar(type(self).__name__, "grad_scale", grad_scale)
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"{type(self).__name__}: grad_scale must be finite and nonzero, got {scale}")
        return False, 1.0 / scale


def _drop_amp_attrs(opt) -> None:
    """After a step that raised: GradScaler sets ``grad_scale`` / ``found_inf`` on the optimizer before the step
    and deletes them after it returns, so a raising step (refused input, which the user may fix and go on from)
    left them set: the next step without the scaler divided its gradients by the stale scale (or skipped, with
    a stale flag), one with it by the scale squared. Dropped here (torch's fused optimizers keep them)."""
    opt.__dict__.pop("grad_scale", None)
    opt.__dict__.pop("found_inf", None)
