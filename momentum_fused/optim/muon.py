"""momentum_fused.Muon: orthogonalized momentum (torch.optim.Muon's convention, docs/algorithms.md §10), with the
aux AdamW of the reference ``MuonWithAuxAdam`` for the param groups marked ``use_muon=False``.

One optimizer for the whole model, as momentum_fused.lowrank's: the Muon groups are stepped by an internal
FusedOptimizer of the multi-phase rule ``muon`` (contract v2, docs/architecture.md: momentum pass, Newton-Schulz
batched by shape, apply pass; specs in momentum_fused/specs_muon.py), the aux groups by an internal
``momentum_fused.AdamW``; both share this optimizer's ``state``, so ``state_dict()`` is torch's format (Muon
params: ``momentum_buffer``, torch's EMA form; aux params: AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``).
"""
from __future__ import annotations

import re
import warnings

import torch

from ..layouts import get_layout
from ..specs import get_spec
from ..specs_muon import DEFAULT_EPS, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS, MUON_DEFAULTS, MUON_SPEC
from .adam import AdamW
from .amp import _drop_amp_attrs, amp_scalar, unscale_lists
from .base import FusedOptimizer
from .checkpoints import with_load_hooks, with_post_hooks
from .compile import eager_step_checks, note_plain_groups
from .ckpt_format import muon_dtype_names, muon_ns_dtype_named, muon_without_saved_layout, refuse_missized_state
from .host_state import check_loaded_state
from .keys import GROUP_KEYS_ALWAYS_ALLOWED, instance_settings, near_miss, torch_setstate, user_stacklevel

__all__ = ["Muon", "AUX_DEFAULTS"]

# The hyperparameters of a use_muon=False group left unset: the reference MuonWithAuxAdam's (KellerJordan/Muon)
AUX_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, amsgrad=False, maximize=False)
_MUON_KEYS = (*MUON_DEFAULTS, "capturable")
_AUX_KEYS = (*AUX_DEFAULTS, "capturable")
_OWN_KEYS = {True: {*_MUON_KEYS, "use_muon"}, False: {*_AUX_KEYS, "use_muon"}}  # by use_muon
_RENAMED = (ValueError, TypeError, RuntimeError, NotImplementedError)  # inner errors reworded as Muon's (exact types)
_SHARED_KEYS = ("maximize", "capturable")  # the optimizer's setting for both kinds of group


class _MuonCore(FusedOptimizer):
    """The Muon groups of a momentum_fused.Muon (internal)."""
    rule = "muon"
    supported_layouts = ("native",)

    def __init__(self, params, defaults, *, backend=None):
        super().__init__(params, dict(defaults), backend=backend)


class Muon(torch.optim.Optimizer):
    """Muon with torch.optim.Muon's signature, defaults and state (``momentum_buffer``), plus:

    - params with more than 2 dims are orthogonalized as the matrix (shape[0], rest) (``flatten=True``, the
      default: a conv weight), or with ``flatten=False`` as a batch of (shape[-2], shape[-1]) matrices, one per
      index of the leading dims, each with its own lr factor (stacked experts [E, out, in]: each expert as its own
      2-D param; under FSDP2's Shard(0) each rank's shard holds whole matrices, which are orthogonalized where
      they are, with no exchange); a 0-d or 1-d param in a Muon group raises ValueError (put biases and gains in
      a ``use_muon=False`` group);
    - ``ns_coefficients``: one (a, b, c) triple (torch), a list of triples (one per step, the last repeated), or
      ``"polar_express"`` (the schedule of Amsel et al. 2025, momentum_fused/specs_muon.py);
    - ``ns_dtype``: the dtype of the Newton-Schulz iteration: None (bf16 on CUDA and on CPU, as torch; see
      docs/muon.md), torch.bfloat16, torch.float32 or torch.float64;
    - ``ns_algorithm``: "standard" (torch's iteration and ops, batched by shape: torch.optim.Muon's bits except
      where a batched bf16 product rounds an element at a midpoint the other way, docs/muon.md), "gram" (the Gram form of the
      same polynomial, on the small Gram matrix, with restarts) or "auto" (the Gram form on matrices at least
      ``specs_muon.GRAM_MIN_ASPECT`` times wider than tall, or taller than wide); accuracy and speed of each in
      docs/muon.md, "Gram form";
    - ``use_muon`` (default True): the kind of a group that does not say (``type(opt)(params, **opt.defaults)``
      rebuilds, as with torch.optim);
    - param groups with ``use_muon=False`` are stepped in the same ``step()`` by decoupled AdamW with that
      group's ``lr``, ``betas``, ``eps``, ``weight_decay`` (unset: the reference MuonWithAuxAdam's defaults,
      ``AUX_DEFAULTS``; ``maximize`` and ``capturable`` unset: this optimizer's), on the fused AdamW path;
    - ``backend``: as every momentum_fused optimizer (the two elementwise passes run on the cpu, triton or cuda
      kernels; the Newton-Schulz phase runs with batched torch ops);
    - FSDP2 (DTensor params sharded on dim 0; on a 2-D mesh with the other dim Replicate: HSDP): each matrix is
      gathered to an owner rank of the sharding dim, orthogonalized there and its rows sent back (docs/muon.md);
    - ``capturable=True`` (both kinds of group; a param-group key): no host read and no host-computed number per
      step on a compiled backend, as for the other rules: each pass's scalars (a tensor lr included) are computed on
      the params' device, the Newton-Schulz phase is torch ops there.

    GradScaler: a step with a nonzero ``found_inf`` changes nothing; ``grad_scale`` divides the gradients inside
    the update. On backends that read device scalars (triton, cuda) the flag is not read on the host: the passes
    of the Muon groups and the aux AdamW's kernels get found_inf and grad_scale and skip every write, and host
    counters (the aux ``step``, state created by a skipped first step) are rolled back by :meth:`sync_amp` (at
    the next step, ``state_dict``...), as for every momentum_fused optimizer; a ``capturable=True`` step with a
    GradScaler can then be captured in a CUDA graph. Elsewhere found_inf is read once on the host. Any invalid
    input raises before anything changes."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps=DEFAULT_EPS, ns_steps=DEFAULT_NS_STEPS, adjust_lr_fn=None,
                 *, ns_dtype=None, ns_algorithm="standard", maximize=False, flatten=True, capturable=False,
                 backend=None, use_muon=True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, ns_algorithm=ns_algorithm, maximize=maximize, flatten=flatten)
        MUON_SPEC.validate(defaults, where="Muon: ")
        if not isinstance(capturable, bool):
            raise TypeError(f"Muon: capturable must be a bool, got {type(capturable).__name__}: {capturable!r}")
        defaults["capturable"] = capturable
        if not isinstance(use_muon, bool):
            raise TypeError(f"Muon: use_muon must be a bool, got {type(use_muon).__name__}: {use_muon!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        self.backend = backend
        self._core = self._aux = None
        self._links: list = []  # per param group: (use_muon, index of its group in the inner optimizer)
        self._linked: list = []  # the _structure() the inner optimizers were built from
        self._keys_seen: dict = {}  # id(group) -> its keys when last checked (_sync: keys written since)
        super().__init__(params, {**defaults, "use_muon": use_muon})

    def train(self, mode: bool = True):
        """A no-op (no averaged iterate), so that client code can call it on any optimizer. Returns self."""
        return self

    def eval(self):
        """See :meth:`train`. Returns self."""
        return self

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"Muon: a param group must be a dict, got {type(param_group).__name__}")
        self.sync_amp()
        if self._linked:  # (edits of param_groups since the last build: the new group's inner index depends on them)
            self._relink()
        g = param_group  # (the caller's dict itself, as torch: it is the group kept)
        params = g["params"]
        if isinstance(params, set):
            raise TypeError("Muon: optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        g["params"] = params
        use = g.get("use_muon", self.defaults["use_muon"])
        if not isinstance(use, bool):
            raise TypeError(f"Muon: use_muon must be a bool, got {type(use).__name__}: {use!r}")
        where = f"Muon param group {len(self.param_groups)}: "
        self._refuse_layout(g, where)
        if use:
            MUON_SPEC.validate({**self.defaults, **g}, where=where)
            self._check_matrices(params, where)
        self._warn_foreign_keys(g, use, where)
        saved = self.defaults
        # (aux groups take no Muon keys; both kinds take the optimizer's maximize and capturable)
        self.defaults = saved if use else {**AUX_DEFAULTS, "use_muon": False, **{k: saved[k] for k in _SHARED_KEYS}}
        try:
            super().add_param_group(g)
        finally:
            self.defaults = saved
        try:
            self._add_inner(len(self.param_groups) - 1)
        except _RENAMED as e:
            self.param_groups.pop()
            inner = self._core if use else self._aux
            raise self._outer_error(inner, e, {len(inner.param_groups) if inner else 0: len(self.param_groups)},
                                    use) from None
        except BaseException:
            self.param_groups.pop()
            raise
        self._linked = self._structure()
        self._keys_seen[id(g)] = frozenset(g)
        note_plain_groups(self, [g])

    @staticmethod
    def _refuse_layout(group, where):
        """A ``layout`` key other than "native" (a per-group key of the other momentum_fused optimizers): Muon keeps
        native state in both kinds of group (its checkpoints are torch.optim.Muon's format), so a compressed or
        master layout would otherwise be kept in the group with no effect: ValueError, before any change."""
        lay = group.get("layout", "native")
        if lay != "native":
            raise ValueError(f"{where}layout {lay!r}: Muon keeps its state in the params' dtype (layout='native') "
                             "in both kinds of group, the AdamW of use_muon=False groups included; remove the key "
                             "or set it to 'native'")

    @staticmethod
    def _check_matrices(params, where):
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.dim() < 2:
                raise ValueError(f"{where}param {i} has shape {tuple(p.shape)}: Muon orthogonalizes matrices "
                                 "(params of 2 or more dims); put 0-d and 1-d params (biases, gains) in a param "
                                 "group with use_muon=False, stepped by AdamW")
            if isinstance(p, torch.Tensor) and p.is_complex():  # (torch.optim.Muon refuses them at its step)
                raise TypeError(f"{where}param {i} is complex ({p.dtype}): Muon does not support complex params "
                                "(nor does torch.optim.Muon); put it in a group with use_muon=False (AdamW takes "
                                "complex params as views of real pairs) or register its real view")

    def _structure(self):
        """What the inner optimizers were built from: each group (object, kind) and its params (objects)."""
        return [(id(g), g.get("use_muon", True), list(map(id, g["params"]))) for g in self.param_groups]

    @staticmethod
    def _warn_foreign_keys(keys, use, where, later=False):
        """Keys a group's kind does not read are kept and have no effect (torch carries extra keys), with a
        UserWarning when one is a hyperparameter of the other kind (``momentum`` in a use_muon=False group, where
        AdamW's first-moment decay is ``betas[0]``; ``betas`` in a Muon group) or a near miss of one of its own
        (``weight_decy``); the reference MuonWithAuxAdam refuses any key besides its own. ``later``: the keys were
        written after the group was added (found at a step: a scheduler's, typically)."""
        own = _OWN_KEYS[use]
        stacklevel = user_stacklevel()  # (the user's line: the constructor, add_param_group or step() call)
        hint = " (written after the group was added: a momentum scheduler such as OneCycleLR(cycle_momentum=True) " \
               "writes Muon's 'momentum' into every group, and cycles no betas)" if later and not use else \
               " (written after the group was added)" if later else ""
        for key in sorted(set(keys) - own - GROUP_KEYS_ALWAYS_ALLOWED, key=str):
            if key in _OWN_KEYS[not use]:
                kind = "a Muon hyperparameter; this use_muon=False group is stepped by AdamW, which does not read " \
                       "it (its momentum is betas[0])" if not use else \
                       "an AdamW hyperparameter of use_muon=False groups; Muon does not read it"
                warnings.warn(f"{where}key {key!r} is {kind}: it is kept in the group and has no effect{hint}",
                              UserWarning, stacklevel=stacklevel)
                continue
            hit = near_miss(key, own) if isinstance(key, str) else None
            if hit is not None:
                warnings.warn(f"{where}key {key!r} is not a hyperparameter of this "
                              f"{'Muon' if use else 'AdamW (use_muon=False)'} group (did you mean {hit!r}?); it is "
                              f"kept in the group and has no effect{hint}", UserWarning, stacklevel=stacklevel)

    def _outer_error(self, inner, e, new=None, use=None):
        """An error of an inner optimizer as this optimizer's: its name and its group index (``new``: the inner
        index -> this index of a group being added; ``use``: the group's kind, when its inner optimizer was being
        created, ``inner`` None)."""
        if inner is None and use is not None:
            name = (_MuonCore if use else AdamW).__name__
        else:
            name = type(inner).__name__ if inner is not None else None
            use = inner is self._core
        msg = str(e)
        if type(e) not in _RENAMED or name is None or not msg.startswith(name):
            return e
        outer = {igi: gi for gi, (u, igi) in enumerate(self._links) if u is use}
        outer.update(new or {})
        msg = ("Muon" if use else "Muon (use_muon=False group, AdamW)") + msg[len(name):]
        msg = re.sub(r"(param group |of group )(\d+)",
                     lambda m: m.group(1) + str(outer.get(int(m.group(2)), m.group(2))), msg)
        return type(e)(msg)

    def _inner_group(self, group):
        keys = _MUON_KEYS if group["use_muon"] else _AUX_KEYS
        return {k: group[k] for k in keys if k in group}

    def _add_inner(self, gi):
        group = self.param_groups[gi]
        use = group["use_muon"]
        ig = {"params": list(group["params"]), **self._inner_group(group)}
        inner = self._core if use else self._aux
        if inner is None:
            inner = _MuonCore([ig], MUON_DEFAULTS, backend=self.backend) if use else \
                AdamW([ig], backend=self.backend)
            inner.state = self.state
            if use:
                self._core = inner
            else:
                self._aux = inner
        else:
            inner.add_param_group(ig)
        self._links.append((use, len(inner.param_groups) - 1))

    def _rebuild(self):
        """Recreate the inner optimizers over the current param groups (after load_state_dict, unpickling, or
        edits of ``param_groups``: groups added, removed or reordered in the list, params added or removed); on
        an error the previous ones are kept."""
        old = {k: self.__dict__.get(k) for k in ("_core", "_aux", "_links", "_linked")}
        self._refuse_shared_params()
        self._core = self._aux = None
        self._links = []
        try:
            for gi, g in enumerate(self.param_groups):
                g.setdefault("use_muon", True)
                # a key the group lacks (a torch.optim.Muon checkpoint has no ns_dtype, ns_algorithm, maximize or
                # capturable): this optimizer's own setting (an aux group: its maximize and capturable), as
                # FusedOptimizer's load does, not the module's
                own = self.defaults if g["use_muon"] else {k: self.defaults[k] for k in _SHARED_KEYS}
                for k, v in (MUON_DEFAULTS if g["use_muon"] else AUX_DEFAULTS).items():
                    g.setdefault(k, own.get(k, v))
                g.setdefault("capturable", self.defaults["capturable"])
                self._refuse_layout(g, f"Muon param group {gi}: ")
                if g["use_muon"]:
                    self._check_matrices(g["params"], f"Muon param group {gi}: ")
                try:
                    self._add_inner(gi)
                except _RENAMED as e:
                    inner = self._core if g["use_muon"] else self._aux
                    raise self._outer_error(inner, e, {len(inner.param_groups) if inner else 0: gi},
                                            g["use_muon"]) from None
        except BaseException:
            self.__dict__.update(old)
            raise
        self._linked = self._structure()

    def _refuse_shared_params(self):
        """A param in two groups (or twice in one), e.g. appended to ``param_groups[i]["params"]`` of groups of
        both kinds, would be stepped twice: ValueError, as torch's constructor and add_param_group refuse it."""
        seen = {}
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) in seen:
                    gj, pj = seen[id(p)]
                    raise ValueError(f"Muon param group {gi}: param {pi} is param {pj} of "
                                     f"{'the same group' if gj == gi else f'param group {gj}'} too; a param belongs "
                                     "to one param group, once (torch: some parameters appear in more than one "
                                     "parameter group)")
                seen[id(p)] = (gi, pi)

    def load_state_dict(self, state_dict):
        """torch's, then the inner optimizers are rebuilt on the loaded groups and state. A state_dict of
        torch.optim.Muon loads (its groups get ns_dtype=None, use_muon=True), and torch.optim.Muon loads ours.
        A group's ``ns_dtype`` saved as its name (``state_dict``) is a torch.dtype again. The load hooks run where
        torch runs them (``checkpoints.with_load_hooks``): what a pre-hook returns is what is converted and
        checked. A refusal, or a raising hook (a post-hook included), restores all of it (the inner optimizers
        are rebuilt by the load)."""
        self.sync_amp()
        before = {k: self.__dict__.get(k) for k in ("param_groups", "state", "defaults", "_core", "_aux", "_links",
                                                    "_linked")}
        before["defaults"] = dict(self.defaults)  # (a copy: torch's __setstate__ edits the live dict in place)
        try:
            with_load_hooks(self, state_dict, self._load_state_dict)
        except BaseException:
            self.__dict__.update(before)
            raise

    def _load_state_dict(self, state_dict):
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and any(isinstance(g, dict) and "layout" in g for g in groups):
            groups = muon_without_saved_layout(groups, "load_state_dict")
            state_dict = {**state_dict, "param_groups": groups}
        if isinstance(groups, list) and any(isinstance(g, dict) and isinstance(g.get("ns_dtype"), str)
                                            for g in groups):
            state_dict = {**state_dict, "param_groups": [
                {**g, "ns_dtype": muon_ns_dtype_named(g["ns_dtype"])}
                if isinstance(g, dict) and isinstance(g.get("ns_dtype"), str) else g for g in groups]}
        aux_spec = get_spec(AdamW.rule)  # (a partial state or a bad counter: refused before anything is loaded)
        check_loaded_state("Muon", state_dict, lambda g: MUON_SPEC.required_state({**MUON_DEFAULTS, **g})
                           if g.get("use_muon", True) else aux_spec.required_state({**AUX_DEFAULTS, **g}))
        super().load_state_dict(state_dict)  # (torch's: replaces param_groups and state, __setstate__ rebuilds)

    def __getstate__(self):
        self.sync_amp()
        state = super().__getstate__()
        state["backend"] = self.backend
        return instance_settings(self, state)

    def __setstate__(self, state):
        """Unpickling, and torch's load_state_dict (which refuses no state tensor of another size: done here,
        before anything is set, as FusedOptimizer's load does)."""
        self.__dict__.setdefault("backend", state.pop("backend", None))
        self.__dict__.setdefault("_keys_seen", {})
        groups = state.get("param_groups")
        if isinstance(groups, list) and any(isinstance(g, dict) and g.get("layout", "native") != "native"
                                            for g in groups):
            state["param_groups"] = muon_without_saved_layout(groups, "unpickling")
        saved = state.get("state") or {}
        for gi, g in enumerate(state.get("param_groups") or ()):
            for pi, p in enumerate(g.get("params", ())):
                st = saved.get(p) if isinstance(p, torch.Tensor) else None
                if isinstance(st, dict):
                    use = g.get("use_muon", True)
                    keys = MUON_SPEC.state_names({**MUON_DEFAULTS, **g}) if use else \
                        get_spec(AdamW.rule).state_names({**AUX_DEFAULTS, **g})
                    refuse_missized_state("Muon", gi, pi, p, st, keys)
        torch_setstate(self, state, super().__setstate__)  # (Muon(**opt.defaults) refuses torch's differentiable)
        self._rebuild()
        note_plain_groups(self, self.param_groups, reset=True)  # (after _rebuild fills a missing capturable)

    # ------------------------------------------------------------------ step
    def _relink(self):
        """Rebuild the inner optimizers when ``param_groups`` or a group's params were edited since they were
        built (a group whose ``use_muon`` changed is refused: a group's kind is fixed)."""
        structure = self._structure()
        if structure == self._linked:
            return
        kinds = {gid: use for gid, use, _ in self._linked}
        for gi, (gid, use, _) in enumerate(structure):
            if kinds.get(gid, use) is not use:
                raise ValueError(f"Muon param group {gi}: use_muon changed from {kinds[gid]} after the group was "
                                 "added; a group's kind is fixed (add a new group instead)")
        self.sync_amp()
        self._rebuild()

    def _sync(self):
        """Copy the (possibly scheduled) hyperparameters of every group into its inner group; rebuild the inner
        optimizers when the groups or their params were edited, and hand them ``self.state`` when it was
        replaced (``opt.state = defaultdict(dict)``), as a torch optimizer reads both at every step."""
        self._relink()
        for inner in (self._core, self._aux):
            if inner is not None and inner.state is not self.state:
                inner.state = self.state
                inner.invalidate_caches()
        for gi, (group, (use, igi)) in enumerate(zip(self.param_groups, self._links)):
            if group.get("use_muon", True) is not use:
                raise ValueError(f"Muon param group {gi}: use_muon changed from {use} after the group was added; "
                                 "a group's kind is fixed (add a new group instead)")
            self._refuse_layout(group, f"Muon param group {gi}: ")
            if use:  # (a param's data replaced since, p.data = t: torch.optim.Muon refuses it at the step; the
                self._check_matrices(group["params"], f"Muon param group {gi}: ")  # NS reshape raised mid-step)
            known = self._keys_seen.get(id(group))
            if known is None or len(known) != len(group) or group.keys() != known:
                missing = [k for k in (_MUON_KEYS if use else _AUX_KEYS) if k not in group]
                if missing:  # (a key deleted from a live group: torch raises KeyError; the inner group kept it)
                    raise ValueError(f"Muon param group {gi}: missing hyperparameter {missing[0]!r} (deleted from "
                                     "the group since it was added?); nothing was changed")
                if known is not None:  # keys written since (a scheduler's): warned as add_param_group warns
                    self._warn_foreign_keys(group.keys() - known, use, f"Muon param group {gi}: ", later=True)
                self._keys_seen[id(group)] = frozenset(group)
            inner = self._core if use else self._aux
            inner.param_groups[igi].update(self._inner_group(group))

    @torch.no_grad()
    def step(self, closure=None):
        return self._eager_step(closure)

    @torch._disable_dynamo  # (a compiled region runs the step eagerly: one graph break at step())
    def _eager_step(self, closure=None):
        try:
            with eager_step_checks(self, self._why_not_capturable, _drop_amp_attrs):
                return self._steps(closure)
        except BaseException:
            _drop_amp_attrs(self)  # (GradScaler's attributes of a step that raised: not left for the next step)
            raise

    def _why_not_capturable(self, g) -> str | None:  # (native: Muon's only layout)
        """A Muon group's reason not to be capturable (compile.eager_step_checks): its inner optimizer's backend."""
        inner = self._core if g.get("use_muon", True) else self._aux
        name = inner._host_scalar_backend(g.get("params", ()), get_layout("native")) if inner is not None else None
        return f"backend {name!r} reads its scalars on the host" if name else None

    def _steps(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        self.sync_amp()  # (the last step's deferred GradScaler flags, before the plans read the state)
        inners = [inner for inner in (self._aux, self._core) if inner is not None]
        # both inner optimizers are validated (the aux groups first) before the Muon groups change anything;
        # each step then takes its plan from here (``_planned``) instead of validating again
        planned = []
        for inner in inners:
            try:
                plan, cached = inner._step_plan()
            except _RENAMED as e:
                raise self._outer_error(inner, e) from None
            planned.append((plan, cached, inner._step_attrs.get("views_verified", ())))
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        device = self._takes_device_amp(inners, [p[0] for p in planned], found_inf, grad_scale)
        if not device and found_inf is not None and amp_scalar("Muon", "found_inf", found_inf) != 0.0:  # (an inf/nan
            # step changes nothing)
            return loss
        if grad_scale is not None:  # (each inner step checks its own: the aux's after the Muon groups had stepped)
            for plan in planned:
                unscale_lists("Muon", plan[0], False)
        for inner, plan in zip(inners[::-1], planned[::-1]):  # (the Muon groups first, then the aux groups)
            inner.grad_scale = grad_scale
            if device:
                inner.found_inf = found_inf
            inner._planned = plan
            try:
                inner._eager_step()  # (not step(): torch's step hooks, global ones included, ran for this optimizer)
            except _RENAMED as e:
                raise self._outer_error(inner, e) from None
            finally:  # (pops: a raising inner step has dropped them itself, ``_drop_amp_attrs``)
                inner.__dict__.pop("grad_scale", None)
                inner.__dict__.pop("found_inf", None)
                inner.__dict__.pop("_planned", None)
        return loss

    @staticmethod
    def _takes_device_amp(inners, plans, found_inf, grad_scale) -> bool:
        """GradScaler's protocol of this step: True for the device protocol (optim/amp.py ``_device_amp``), taken
        when every inner optimizer would take it (a tensor found_inf, backends that read device scalars): both
        then hand found_inf and grad_scale to their kernels, which skip every write when found_inf != 0, and
        found_inf is never read on the host in this step (host counters, the aux AdamW's ``step``, are rolled
        back by ``sync_amp``). False: the host protocol, found_inf read once here."""
        if not isinstance(found_inf, torch.Tensor) or not inners:
            return False
        for inner, plan in zip(inners, plans):
            inner.found_inf, inner.grad_scale = found_inf, grad_scale
            try:
                if inner._device_amp(plan) is None:
                    return False
            finally:
                del inner.found_inf, inner.grad_scale
        return True

    def sync_amp(self) -> None:
        """Resolve the pending device-side GradScaler checks of the inner optimizers (FusedOptimizer.sync_amp):
        call it before reading ``state`` directly between steps when training with a GradScaler on the triton or
        cuda backends. state_dict(), load_state_dict(), add_param_group() and step() call it."""
        for inner in (self._aux, self._core):
            if inner is not None:
                inner.sync_amp()

    def state_dict(self):
        """torch's, with each group's ``ns_dtype`` saved as its name ("bfloat16"; the live group keeps the
        torch.dtype): torch.distributed.checkpoint's full and CPU-offloaded state dicts take only plain values
        (``get_optimizer_state_dict(..., full_state_dict=True)`` raised on a torch.dtype)."""
        self.sync_amp()
        return with_post_hooks(self, lambda o: super(Muon, o).state_dict(), muon_dtype_names)


Muon._step_supports_amp_scaling = True  # GradScaler sets .grad_scale / .found_inf, see step()
