"""The cached plan's members without a gradient (optim/plan_cache.py): a group's params whose state the full plan
validated with or without a gradient at that step, so that a step where a different subset of them has gradients
(a mixture of experts, FSDP2's unused experts, ``zero_grad(set_to_none=True)`` with unused params) takes the cached
plan. ``ValidationMixin._plan`` (optim/checks.py) runs its per-param checks on the candidates, where a failure only
leaves the param out; this module holds what decides membership beyond them."""
from __future__ import annotations

import torch

from .. import distributed as _dist
from . import overlap as _overlap

__all__ = ["MembersMixin", "sparse_ok"]


class _LeftOut(Exception):
    """A param without a gradient left out of the cached plan's members (``_plan``): its state is in a form the
    step that gives it a gradient converts first (a checkpoint's), which the full plan leaves as it is until then."""


def _host_form(v, dtype) -> bool:
    """Whether a host counter is the 0-d CPU tensor of ``dtype`` that the views of one tensor keep (optim/scalars.py
    ``_host_views``): a member's counter in another form (a number, say) would be converted by ``_remember_plan``."""
    return isinstance(v, torch.Tensor) and v.dtype == dtype and v.dim() == 0 and v.device.type == "cpu"


def sparse_ok(spec, group) -> bool:
    """Whether the cached plan of a group may keep params without a gradient as members (optim/plan_cache.py), so
    that a step where a different subset of them has gradients (a mixture of experts, multi-task heads,
    ``zero_grad(set_to_none=True)``) takes the cached plan: a single-pass rule with its state of the param's
    shape, not capturable (whose counters advance on the device, all together)."""
    return not spec.phases and spec.plain_state and not group["capturable"]


class MembersMixin:
    """``_spare_members`` and ``_checked_spares`` of the full plan (ValidationMixin)."""

    def _spare_members(self, gi, group, state_names, items, spare, keys, dtensor_cls) -> list:
        """The params of a group without a gradient at this step whose state the full plan validated as a stepped
        param's (``spare``: (pi, p, kind, state tensors, their owners)) that the cached plan may keep as members
        (plan_cache.py, ``sparse_ok``): of a (device, dtype) the group steps, DTensors where the params with
        gradients are (their state placed as the param), their host counters valid. None of this raises: a param
        left out is validated in full at the step that gives it a gradient."""
        if not keys:
            return []
        dt = dtensor_cls is not None and type(items[0]) is dtensor_cls
        spare = [s for s in spare if s[2] in keys and (type(s[1]) is dtensor_cls if dt else
                                                       dtensor_cls is None or not isinstance(s[1], dtensor_cls))]
        if spare:
            try:
                ps = [s[1] for s in spare]
                _dist.check_group(type(self).__name__, gi, ps, self.state, state_names, grads=False)
                self._check_host_state(gi, group, ps)
            except (ValueError, TypeError, RuntimeError, NotImplementedError):
                return []
        return spare

    def _checked_spares(self, plan, spares, states, owners, dtensor_cls) -> dict:
        """After the full plan's checks passed: the members without a gradient (``_spare_members``) when the checks
        across params hold with them too (each param listed once, no two params sharing an element, no state
        tensor sharing memory with another tensor of the union), as {gi: [(pi, p), ...]}; else {} (the cached
        plan then keeps the params with gradients only, as before). Raises nothing."""
        union = [gp._replace(items=gp.items + [s[1] for s in spares.get(gi, ())]) for gi, gp in enumerate(plan)]
        try:
            self._check_listed_once(union)
            self._check_param_memory(union, [], dtensor_cls)
        except ValueError:
            return {}
        extra = [s for sp in spares.values() for s in sp]
        if _overlap.shared_state(states + [t for s in extra for t in s[3]], owners + [o for s in extra for o in s[4]],
                                 {}) is not None:
            return {}
        return {gi: [(s[0], s[1]) for s in sp] for gi, sp in spares.items() if sp}
