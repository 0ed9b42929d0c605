"""The param groups of LowRankSGD / LowRankAdam (optim.py): the LowRankLinear layers of each group, the inner
fused optimizer of the dense params (biases, norms, embeddings) and the rebuild of both after edits of the
groups, a load, a copy or a pickle."""
from __future__ import annotations

import torch

from ..optim.base import adopting_groups
from ..specs import get_spec

__all__ = ["GroupsMixin"]


def _is_factor(p) -> bool:
    return bool(getattr(p, "_momentum_fused_lowrank", False))


class GroupsMixin:
    """Groups of ``_LowRankOptimizer`` (before torch.optim.Optimizer in its bases; ``_rule``, ``_dense_cls`` and
    ``backend`` are the optimizer's), and its copies and pickles (``_SETTINGS``: the constructor settings kept)."""

    def add_param_group(self, param_group):
        name = type(self).__name__
        params = param_group["params"]  # (the caller's dict is the group kept, as torch)
        if isinstance(params, set):
            raise TypeError(f"{name}: optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        for k in ("amsgrad",):
            if param_group.get(k, self.defaults.get(k, False)):
                raise ValueError(f"{name}: {k}=True is not supported on the low-rank core")
        spec = get_spec(self._rule)
        if spec.init_check is not None:  # (a group's creation, also for a group of factors only: the dense rule's)
            try:
                spec.init_check({**spec.defaults, **self.defaults, **param_group})
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name} param group {len(self.param_groups)}: {e}") from None
        self._relink()
        layers = self._group_layers(params)
        self._check_budget(self._layers + [layers], " with this group" if self._layers else "")
        super().add_param_group(param_group)
        self._layers.append(layers)
        try:
            self._add_inner_group(len(self.param_groups) - 1)
        except BaseException:  # (the dense params refused by the inner optimizer: the group is not added)
            self.param_groups.pop()
            self._layers.pop()
            raise
        self._linked = self._structure()

    def _group_layers(self, params):
        """The LowRankLinear layers of a group's params, checked (U, S and V together, a valid rank)."""
        name = type(self).__name__
        layers, seen = [], set()
        for p in params:
            if isinstance(p, tuple):
                raise TypeError(f"{name}: named parameters are not supported; pass model.parameters()")
            if _is_factor(p):
                layer = p.layer()
                if layer is None or getattr(layer, getattr(p, "role", "?"), None) is not p:
                    raise ValueError(f"{name}: a LowRankFactor (role {getattr(p, 'role', '?')}) is not attached "
                                     f"to a LowRankLinear (a factor copied on its own?)")
                if id(layer) not in seen:
                    seen.add(id(layer))
                    layers.append(layer)
        ids = {id(p) for p in params}
        for layer in layers:
            if not all(id(getattr(layer, r)) in ids for r in ("U", "S", "V")):
                raise ValueError(f"{name}: U, S and V of a LowRankLinear must be in the same param group")
            if layer.r > layer.max_rank:
                raise ValueError(f"{name}: layer rank {layer.r} > max_rank {layer.max_rank}")
        return layers

    def _check_budget(self, layer_lists, what=""):
        """param_budget's floor: every layer at min(r_min, max_rank) must fit (the constructor's groups, groups added
        later, and ``param_groups`` edited by hand, found by the next step's rebuild)."""
        budget = getattr(self, "param_budget", None)
        if budget is None:
            return
        need = sum(self._cost(layer, min(self.r_min, layer.max_rank)) for ls in layer_lists for layer in ls)
        if need > budget:
            raise ValueError(f"{type(self).__name__}: param_budget={budget} is below the r_min floor of the low-rank "
                             f"layers ({need} params{what})")

    def _structure(self):
        """What ``_layers`` and the inner optimizer were built from: the groups and their params (objects)."""
        return [(id(g), list(map(id, g["params"]))) for g in self.param_groups]

    def _rebuild(self):
        """Recreate ``_layers`` and the inner optimizer of the dense params over the current param groups (after
        unpickling or a deep copy, or edits of ``param_groups``); on an error the previous ones are kept."""
        old = {k: self.__dict__.get(k) for k in ("_layers", "_inner", "_inner_index", "_linked")}
        self._layers, self._inner, self._inner_index = [], None, {}
        try:
            with adopting_groups():  # (groups that exist: not checked as created, ``init_check``)
                for gi, g in enumerate(self.param_groups):
                    self._layers.append(self._group_layers(g["params"]))
                    self._add_inner_group(gi)
            self._check_budget(self._layers, " in the edited param groups")
        except BaseException:
            self.__dict__.update(old)
            raise
        self._linked = self._structure()

    def _relink(self):
        """Before a step: rebuild after edits of the groups; hand the inner optimizer a replaced ``state``."""
        if self._structure() != self._linked:
            self._rebuild()
        if self._inner is not None and self._inner.state is not self.state:
            self._inner.state = self.state
            self._inner.invalidate_caches()

    def _dense_hparams(self, group):
        return {k: group[k] for k in get_spec(self._rule).defaults if k in group}

    def _add_inner_group(self, gi):
        dense = [p for p in self.param_groups[gi]["params"] if not _is_factor(p)]
        if not dense:
            return
        g = {"params": dense, **self._dense_hparams(self.param_groups[gi])}
        inner_gi = len(self._inner.param_groups) if self._inner is not None else 0
        try:
            if self._inner is None:
                self._inner = self._dense_cls([g], backend=self.backend)
                self._inner.state = self.state
            else:
                self._inner.add_param_group(g)
        except (TypeError, ValueError) as e:  # (the dense optimizer's message, with this optimizer's name and index)
            prefix = f"{self._dense_cls.__name__} param group {inner_gi}"
            msg = str(e)
            if not msg.startswith(prefix):
                raise
            raise type(e)(f"{type(self).__name__} param group {gi}" + msg[len(prefix):]) from None
        self._inner_index[gi] = len(self._inner.param_groups) - 1

    _SETTINGS = ("tau", "r_min", "fixed_rank", "augment_every", "truncate_every", "param_budget", "backend",
                 "retraction")

    def __getstate__(self):  # (torch's keeps defaults, state and param_groups: a copy or pickle also needs these)
        state = super().__getstate__()
        state["lowrank_settings"] = {k: getattr(self, k) for k in self._SETTINGS}
        return state

    def __setstate__(self, state):
        # (torch's load_state_dict calls this with {"state", "param_groups"}: the live settings stay)
        settings = state.pop("lowrank_settings", None)
        super().__setstate__(state)
        if settings is not None:
            self.__dict__.update(settings)
            self.profile = None
        # rebuilt by the next step or add_param_group (_relink): when unpickling, the layers of the factors may
        # not be rebuilt yet
        self._layers, self._inner, self._inner_index, self._linked = [], None, {}, None
