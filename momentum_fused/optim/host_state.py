"""Host-side optimizer state: the values a host counter (``step``, ``mu_product``) may take, and the check of a
state_dict's per-param state before anything is loaded, shared by FusedOptimizer's load (optim/checks.py) and
Muon's (optim/muon.py)."""
from __future__ import annotations

import math

import torch

from .. import layouts as _layouts
from ..specs import HOST_STATE_KEYS

__all__ = ["HostStateChecksMixin", "check_loaded_state", "holds_rule_state", "host_value_error",
           "raise_partial_state"]

_LAYOUT_ONLY_KEYS = frozenset((_layouts.MASTER_KEY, _layouts.REMAINDER_KEY))


def holds_rule_state(st) -> bool:
    """Whether a param's state holds any of the rule's state, not only a master layout's copy of the param
    (``master``, ``master16``'s ``master_lo``), which a step keeps where the rule keeps none (Signum at momentum
    0): its rule state then starts whole at the step that needs it, as under a layout that keeps no master (a
    review, 2026-12-07: turning Signum's momentum on under ``master`` was refused as a partial state)."""
    return any(k not in _LAYOUT_ONLY_KEYS for k in st)


def host_value_error(key: str, value) -> str | None:
    """Why ``value`` is not a valid host counter ``key`` ("step": a finite non-negative whole number;
    "mu_product": a finite number in [0, 1]; a number or a one-element tensor), or None. Reads a CUDA
    tensor's value (a host sync): used when loading a state_dict and on the full plan, not per step."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or not (value.is_floating_point() or value.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            return f"a {value.dtype} tensor of shape {tuple(value.shape)}, not a one-element real tensor"
        v = float(value.detach().reshape(()).cpu())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        return f"a {type(value).__name__}, not a number"
    if key == "step":
        if not math.isfinite(v) or v < 0 or v != math.floor(v):
            return f"{v}; a step count must be a finite non-negative whole number"
    elif key == "mu_product" and not (math.isfinite(v) and 0.0 <= v <= 1.0):
        return f"{v}; NAdam's mu_product (a product of momentum coefficients) must be in [0, 1]"
    return None


def check_loaded_state(name: str, state_dict, required_of) -> None:
    """A state_dict's groups and per-param state, before anything is loaded (FusedOptimizer's and Muon's loads):
    no ``differentiable=True`` group; each saved state that holds anything holds ``required_of(group)`` (its
    group as saved); host counters (``step``, ``mu_product``) valid. A clear error naming the param and the key."""
    try:
        groups, states = state_dict["param_groups"], state_dict["state"]
        where = {}
        for gi, g in enumerate(groups):
            if isinstance(g, dict) and g.get("differentiable"):
                raise ValueError(f"{name}.load_state_dict: param group {gi} has differentiable=True, which is "
                                 "not supported (the fused kernels update in place outside autograd)")
            for pi, idx in enumerate(g["params"]):
                where[idx] = (gi, pi)
        items = list(states.items())
    except (KeyError, TypeError, AttributeError):
        return  # (torch's load_state_dict names what is malformed)
    for idx, st in items:
        if not isinstance(st, dict):
            continue
        if st and idx in where and holds_rule_state(st):
            gi, pi = where[idx]
            try:
                required = required_of(groups[gi])
            except (KeyError, TypeError, ValueError):  # (a malformed group: torch's load names it)
                required = ()
            if not all(k in st for k in required):
                raise_partial_state(st, required, f"{name}.load_state_dict: param {pi} of group "
                                                     f"{gi} (state_dict index {idx})")
        for key in HOST_STATE_KEYS:
            if key in st:
                why = host_value_error(key, st[key])
                if why is not None:
                    gi, pi = where.get(idx, ("?", "?"))
                    raise ValueError(f"{name}.load_state_dict: param {pi} of group {gi} (state_dict index "
                                     f"{idx}): state {key!r} is {why}; nothing was loaded")


def raise_partial_state(st, required, where):
    missing = [k for k in required if k not in st]
    raise ValueError(f"{where}: its state has {sorted(map(str, st))} but lacks {missing}; a param's state is "
                     "created whole at its first step (torch.optim's step raises KeyError): was a state_dict of "
                     "another optimizer loaded, or a key deleted? To restart this param's state, delete all "
                     "of it (optimizer.state.pop(param))")


class HostStateChecksMixin:
    """The optimizer's checks of its host counters (``step``, ``mu_product``): a state_dict's before it loads, the
    live state's in the full plan (ValidationMixin, optim/checks.py)."""

    def _check_loaded_host_state(self, state_dict) -> None:
        """Host counters (``step``, ``mu_product``) and group keys of a state_dict, checked before anything is
        loaded: a clear error naming the param and the key, and the optimizer unchanged."""
        spec, base = self.spec, {**self.defaults, **self._group_extras}
        check_loaded_state(type(self).__name__, state_dict, lambda g: spec.required_state({**base, **g}))
        if spec.state_refusal is None:
            return
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        for gi, (saved, live) in enumerate(zip(groups if isinstance(groups, list) else [], self.param_groups)):
            lay = _layouts.get_layout(live.get("layout")) if isinstance(live.get("layout"), str) else None
            if not isinstance(saved, dict) or lay is None or not lay.reduced_state:  # (the group keeps its layout)
                continue
            try:
                why = spec.state_refusal({**base, **saved})
            except (KeyError, TypeError, ValueError):  # (a malformed group: the load names it)
                continue
            if why is not None:  # (RMSprop's centered: every later step would refuse it)
                raise ValueError(f"{type(self).__name__}.load_state_dict: param group {gi}: dtype layout "
                                 f"{lay.name!r} (this optimizer's; a load keeps it) cannot hold the checkpoint's "
                                 f"group: {why}; nothing was loaded")

    def _check_host_state(self, gi, group, items) -> None:
        """The full plan's check of host counters that did not come from this optimizer's own stepping (a loaded
        or assigned ``step`` / ``mu_product``): clear error naming param and key, before anything changes."""
        spec = self.spec
        keys = (("step",) if spec.counts_steps else ()) + ((spec.host_state[0],) if spec.pack_reads_state else ())
        cap = group.get("capturable")  # (its counters live on the params' device: read only where that is the host)
        if not keys or (cap and torch.compiler.is_compiling()):  # (traced: no host read in the graph, docs)
            return
        state = self.state
        for key in keys:
            cached = self._step_views.get(gi if cap else (gi, key))  # (capturable: its device counters' views)
            ours = set(map(id, cached[1])) if cached is not None else ()
            for p in items:
                st = state.get(p)
                v = None if st is None else st.get(key)
                if cap and isinstance(v, torch.Tensor) and v.device.type != "cpu":
                    continue  # (a device counter: not read, no host sync; a CPU tensor or a number is free to read)
                if v is not None and id(v) not in ours:
                    why = host_value_error(key, v)
                    if why is not None:
                        pi = next(i for i, q in enumerate(group["params"]) if q is p)
                        raise ValueError(f"{self._where(p, pi, gi)}: state {key!r} is {why}")
