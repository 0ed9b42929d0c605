"""The shared base of every momentum_fused optimizer.

It does the grouping, the validation, the lazy state, the host scalars and the dispatch; the
optimizer files only declare their rule and constructor. One ``step()``:

1. runs the closure (under ``enable_grad``);
2. *plans*: validates every group's hyperparameters, every gradient (sparse, shape, dtype, device)
   and every existing state tensor, and resolves a backend per (device, dtype) bucket. Nothing has
   been modified yet, so any error leaves params and state exactly as they were;
3. honours the GradScaler protocol (``found_inf`` nonzero: nothing changes, not even step counts;
   ``grad_scale``: gradients are divided by it inside the update, and ``.grad`` is unscaled after it, as
   torch.optim leaves it);
4. calls the ``_prepare_step`` hook (per-group host scalars via ``spec.group_prepare``; reduction
   passes in subclasses), creates missing state, advances host counters, builds one scalar pack per tensor;
5. hands each bucket (device, dtype, flags) to its backend, once, across all groups.

The concerns live in mixins, one module each: ``checks`` (validation and the full plan), ``plan_cache`` (the
cached plan of the hot path), ``amp`` (GradScaler, with its rollback record), ``scalars`` (host counters,
scalar packs, capturable device tables, rounding keys), ``compile`` (torch.compile's traced step and its custom
op). This module keeps construction, param groups and the step's orchestration (its buckets and their launch:
buckets.py); checkpoints.py the state_dict side.
"""
from __future__ import annotations

import contextlib
import contextvars
import gc
from typing import Any, ClassVar

import torch

from .. import backends
from .. import layouts as _layouts
from .. import distributed as _dist  # DTensor (FSDP2): local shards, see momentum_fused/distributed.py
from ..hparams import as_pair
from ..specs import UpdateRuleSpec, get_spec
from .amp import AmpMixin, AmpRollback, _drop_amp_attrs, unscale_lists
from .checkpoints import CheckpointMixin
from .checks import STEPPABLE_DTYPES, STEPPABLE_NAMES, ValidationMixin
from .keys import FRONT_DEFAULTS, FRONT_GROUP_EXTRAS, check_torch_flags, instance_settings, torch_setstate
from .buckets import Bucket, launch
from .compile import CompileMixin, autocast_off, eager_step_checks, note_plain_groups
from .masters import MasterSyncMixin
from .phases import PhasesMixin
from .plan_cache import PlanCacheMixin
from .scalars import ScalarsMixin, group_sr_keys


# Dtype-layout keys of every param group (momentum_fused/layouts.py): the layout name, the stochastic
# rounding seed, and the group's count of applied steps (the rounding's counter; saved in state_dicts).
_ADOPTING = contextvars.ContextVar("momentum_fused_adopting_groups", default=False)


@contextlib.contextmanager
def adopting_groups():
    """While a wrapper rebuilds its inner optimizer from groups that exist already (LowRankSGD after a copy or a
    load, Muon): ``add_param_group`` skips the checks made when a group is created (``spec.init_check``), which
    the group passed then and which the step does not repeat (SGD's nesterov under a momentum scheduled to 0)."""
    token = _ADOPTING.set(True)
    try:
        yield
    finally:
        _ADOPTING.reset(token)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class FusedOptimizer(ValidationMixin, PlanCacheMixin, AmpMixin, ScalarsMixin, CompileMixin, PhasesMixin,
                     CheckpointMixin, MasterSyncMixin, torch.optim.Optimizer):
    """Base class. Subclasses set ``rule`` and call ``super().__init__(params, defaults, backend=)``.

    ``backend``: None (automatic, see momentum_fused.backends), or a registered backend name. The
    backend is an attribute of the optimizer, not part of its state_dict, so a checkpoint written
    with one backend loads with any other.

    Complex params are optimized as pairs of real numbers (``torch.view_as_real``), like torch.optim.

    ``layout``: the dtype layout of params and state (momentum_fused/layouts.py): "native" (default: state
    in the param dtype), "bf16_state" (fp32 params, bf16 state), "master" (bf16/fp16 params with an fp32
    master copy in ``state["master"]``), "bf16_sr" (bf16 params and state, stochastic rounding seeded by
    ``sr_seed``), "master16" (bf16 params holding the high half of an fp32 master, its low half in
    ``state["master_lo"]``), "int8_state" (fp32 params, moments as 8-bit block codes + fp32 scales),
    "master16_int8" (both, for bf16 params), "int8_sr" / "master16_int8_sr" (the same with the codes rounded
    stochastically, seeded by ``sr_seed``); docs/layouts.md says which backends run each. Both are param-group keys
    (per-group values allowed) and saved in state_dicts.
    """

    rule: ClassVar[str]
    # the torch.optim class this one is a drop-in for (None: none): a loaded group lacking a key its __setstate__
    # fills (a checkpoint of an older torch) gets torch's value, as there (ckpt_format._torch_setstate_defaults)
    torch_class: ClassVar[type | None] = None
    _step_supports_amp_scaling = True  # GradScaler sets .grad_scale / .found_inf, see step()

    # layouts this optimizer's front end supports (schedule-free narrows it: its train/eval swap)
    supported_layouts: ClassVar[tuple] = tuple(_layouts.LAYOUTS)
    unsupported_layout_reasons: ClassVar[dict] = {}  # layout name -> why this class refuses it (in the error)

    def __init__(self, params, defaults: dict[str, Any], *, backend: str | None = None, layout: str | None = None,
                 sr_seed: int = 0, capturable: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False):
        check_torch_flags(type(self).__name__, foreach=foreach, fused=fused, differentiable=differentiable)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        if backend is not None and backend not in backends.names():
            raise ValueError(f"unknown backend {backend!r}; registered backends: {sorted(backends.names())}")
        self.backend = backend
        self._seen_keys: set = set()  # group keys already checked against near-miss hyperparameter names
        self._step_views: dict = {}
        # What a step writes besides params, state and groups, kept in one dict written in place (a step traced by
        # torch.compile can do that; torch 2.11's dynamo refuses an attribute written on an optimizer, 2.13's takes
        # it): "grad_subst", the step's resolved gradients (``grad_of``; set by the full plan); "views_verified", the
        # host counters the cached plan checked (optim/scalars.py); "pending_amp" and "amp_flag", a device-side
        # GradScaler flag on its way to the host (optim/amp.py).
        self._step_attrs = {}
        self._fast = None
        self._called = {"step": False}
        if "betas" in defaults:  # (a tuple of plain numbers, as torch.optim.Adam keeps it: hparams.as_pair)
            defaults = {**defaults, "betas": as_pair(defaults["betas"])}
        self.spec.validate({**defaults, **self.spec.group_extras}, where=f"{type(self).__name__}: ", init=True)
        defaults = {**defaults, **FRONT_DEFAULTS, "layout": "native" if layout is None else layout,
                    "sr_seed": sr_seed, "capturable": capturable}
        self._check_layout_keys({**defaults, **FRONT_GROUP_EXTRAS}, f"{type(self).__name__}: ")
        super().__init__(params, defaults)


    @property
    def spec(self) -> UpdateRuleSpec:
        return get_spec(self.rule)

    @property
    def _group_extras(self) -> dict[str, Any]:
        """Keys every param group holds that are not in ``defaults``: the rule's host counters and the front's."""
        return {**self.spec.group_extras, **FRONT_GROUP_EXTRAS}


    def train(self, mode: bool = True):
        """For client code that switches optimizers with the model (schedule-free needs it): a no-op here,
        since this rule keeps no averaged iterate. Returns the optimizer."""
        return self

    def eval(self):
        """See :meth:`train`: a no-op for this rule. Returns the optimizer."""
        return self

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._step_attrs.get("pending_amp") is not None:
            self.sync_amp()
        if isinstance(param_group, dict):
            self._check_group_keys(param_group, f"{type(self).__name__} param group {len(self.param_groups)}")
            merged = {**self.defaults, **self._group_extras, **param_group}
            where = f"{type(self).__name__} param group {len(self.param_groups)}: "
            self.spec.validate(merged, where=where, init=not _ADOPTING.get())
            lay = self._check_layout_keys(merged, where)
            params = param_group["params"]
            if not isinstance(params, (torch.Tensor, set)):  # (torch refuses a set, with its message)
                params = list(params)  # a generator (model.parameters()) is read once, here
                param_group["params"] = params  # (the caller's dict itself, as torch: it is the group kept)
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if merged.get("capturable") is True and not _ADOPTING.get():
                name = self._host_scalar_backend(params, lay)  # (as the rule's and layout's reasons, above)
                if name:
                    raise RuntimeError(f"{where}capturable=True needs a compiled backend (cpu, cuda, triton); "
                                       f"backend {name!r} reads its scalars on the host")
            seen = {}
            for i, p in enumerate(params):
                q = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                j = seen.setdefault(id(q), i)
                if j != i:
                    raise ValueError(f"{type(self).__name__}: param {i} of the new param group is param {j} "
                                     "again; a param may appear once per optimizer (torch.optim would apply "
                                     "its update twice and count one step)")
            for p in params:
                if isinstance(p, tuple):  # named parameters
                    p = p[1]
                if getattr(p, "_momentum_fused_lowrank", False):  # tag of momentum_fused.lowrank factors
                    raise TypeError(f"{type(self).__name__}: a LowRankLinear factor (U, S or V) needs the manifold "
                                    f"update: use momentum_fused.lowrank.LowRankSGD / LowRankAdam for the model")
                if isinstance(p, torch.Tensor) and p.dtype not in STEPPABLE_DTYPES:
                    raise TypeError(f"{type(self).__name__} can only optimize floating point or complex "
                                    f"tensors of {STEPPABLE_NAMES}, got dtype {p.dtype}")
                if isinstance(p, torch.Tensor) and lay.name != "native" and p.dtype not in lay.param_dtypes:
                    raise TypeError(f"{type(self).__name__}: dtype layout {lay.describe()} cannot hold a "
                                    f"{p.dtype} param; supported layouts: {_layouts.supported()}")
        super().add_param_group(param_group)
        for k, v in self._group_extras.items():
            self.param_groups[-1].setdefault(k, v)
        note_plain_groups(self, self.param_groups[-1:])
        self.invalidate_caches()


    def __getstate__(self) -> dict[str, Any]:
        self.sync_amp()
        state = super().__getstate__()
        state.pop("_step_attrs", None)
        state["backend"] = self.backend
        return instance_settings(self, state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with {"state", "param_groups"} only: the live optimizer keeps
        # its forced backend (and its defaults: keys.torch_setstate)
        state.setdefault("backend", self.__dict__.get("backend"))
        torch_setstate(self, state, super().__setstate__)
        note_plain_groups(self, self.param_groups, reset=True)
        self.invalidate_caches()
        self._called = {"step": False}
        self.__dict__.setdefault("_step_attrs", {})  # (torch's load_state_dict: the live dict stays)
        if "defaults" in state:  # unpickled or deep-copied (not torch's load): the master marks were not copied
            self.__dict__["_adopt_all_masters"] = True

    def _init_state(self, items, state_names, layout=_layouts.NATIVE, created=None, group=None):
        """Create missing state (zeros in the layout's state dtype; the fp32 master copy of the param under the
        ``master`` layout; a rule's own shapes and dtypes under contract v2, ``spec.state_tensors``). Returns
        (state dicts, fresh flags): fresh is True for a tensor whose state was (partly) created in this step."""
        states, fresh = [], []
        n = len(state_names)
        native = layout.name == "native"
        spec = self.spec
        own = None if spec.plain_state else {t.name: t for t in spec.tensors(group)}
        keeps = n or layout.master or layout.remainder  # (no state to keep: no empty entry, as torch.optim)
        for p in items:
            st = self.state[p] if keeps or p in self.state else {}
            missing = [k for k in state_names if st.get(k) is None] if n else ([] if st else [None])
            for k in missing:
                if k is None:
                    continue
                if own is not None:
                    t = own[k]
                    if t.shape is None:  # param-shaped: zeros_like keeps a DTensor param's sharding
                        st[k] = torch.zeros_like(p, dtype=t.dtype_for(p, layout), memory_format=torch.contiguous_format)
                    else:
                        st[k] = torch.zeros(t.shape_for(p), dtype=t.dtype_for(p, layout), device=p.device)
                elif layout.int8 and _layouts.int8_quantized(p):  # codes of 0 (the value 0) and zero scales
                    st[k] = torch.zeros_like(p, dtype=_layouts.int8_code_dtype(k), memory_format=torch.contiguous_format)
                    sk = k + _layouts.INT8_SCALE_SUFFIX
                    st[sk] = _dist.zeros_like_placed(p, _layouts.int8_scale_shape(p), torch.float32)
                    if created is not None:
                        created.append((st, sk))
                else:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format, dtype=None if native else
                                             layout.state_dtype_for(p.dtype))
                if created is not None:
                    created.append((st, k))
            if layout.master and _layouts.MASTER_KEY not in st:
                st[_layouts.MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                if created is not None:
                    created.append((st, _layouts.MASTER_KEY))
            if layout.remainder and _layouts.REMAINDER_KEY not in st:  # master16: the master starts as the param
                st[_layouts.REMAINDER_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format, dtype=torch.int16)
                if created is not None:
                    created.append((st, _layouts.REMAINDER_KEY))
            states.append(st)
            fresh.append(bool(missing))
        return states, fresh


    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step.

        Under ``torch.compile`` the step is traced into the graph in its capturable form (dynamo reads
        every param group's ``capturable`` as True, as it does for torch's optimizers): step counters on
        the params' device, the scalar table computed by tensor ops, one ``momentum_fused::bucket_step``
        op per bucket. Rules that cannot be capturable (NAdam, FSGDM, schedule-free), the bf16_sr layout
        and backends without scalar tables (reference) run eagerly instead: one graph break at the call.
        docs/ecosystem.md."""
        self._called["step"] = True  # what an LR scheduler's step wrapper records (see below the class)
        if torch.compiler.is_compiling() and self._traceable() and self._amp_traceable():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            return self._update(loss)
        return self._eager_step(closure)

    @property
    def _opt_called(self) -> bool:
        """Read by LR schedulers (warning when ``scheduler.step()`` comes before the first ``step()``). Kept
        in a dict: dynamo replays the mutation of a dict from a traced step, not an attribute write."""
        return self.__dict__.get("_called", {}).get("step", False)

    @_opt_called.setter
    def _opt_called(self, value) -> None:
        self.__dict__.setdefault("_called", {})["step"] = bool(value)

    @torch._disable_dynamo
    def _eager_step(self, closure=None):
        with eager_step_checks(self, self._why_not_capturable, _drop_amp_attrs):  # (refused: GradScaler's scale
            paused = False  # not left for the next step, as by any step that raises, the closure too)
            try:
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                # The cyclic garbage collector is paused for the update (not for the closure): the step allocates
                # ~10 short-lived acyclic objects per tensor, enough to trigger collections that traverse the
                # whole heap (measured: up to 30 us per tensor on a model of 10k tensors). It resumes after it.
                paused = gc.isenabled()
                if paused:
                    gc.disable()
                with autocast_off():  # (the caller's autocast: not for the update's products, Muon's NS)
                    return self._update(loss)
            except BaseException:
                _drop_amp_attrs(self)
                raise
            finally:
                self._step_attrs["grad_subst"] = None  # (this step's resolved gradients, ``grad_of``: not kept)
                if paused:
                    gc.enable()

    def _step_plan(self):
        """This step's plan, ``(plan, cached)``: the cached plan of the last step re-validated (``_fast_plan``;
        ``cached`` its per-group entries), else the full plan (``_plan``; ``cached`` None). Modifies nothing but
        ``_step_attrs["views_verified"]`` (the host counters the cached plan checked, for this step only: optim/scalars.py
        ``_host_views``) and ``_step_attrs["grad_subst"]``.

        An optimizer that steps others (momentum_fused.Muon: its inner optimizers) validates them all with this
        before any changes anything, then hands each its own result for its step in the attribute ``_planned``
        = ``(plan, cached, views_verified)``, which ``_update`` takes (and drops) instead of planning again:
        valid as long as nothing but the other inner optimizers' steps ran in between (they touch other params
        and state)."""
        self._step_attrs["views_verified"] = ()
        self._step_attrs["grad_subst"] = None  # (set by _plan; the cached plan's gradients are plain tensors)
        fast = None if torch.compiler.is_compiling() else self._fast_plan()
        return (self._plan(), None) if fast is None else fast

    def _update(self, loss):
        """The step after the closure: plan, GradScaler, state, scalars, one backend call per bucket."""
        if self._step_attrs.get("pending_amp") is not None:  # the previous step's device-side GradScaler flag
            self.sync_amp()
        traced = torch.compiler.is_compiling()  # (dynamo's guards replace the cached plan there)
        if not traced and "_planned" in self.__dict__:  # validated by the caller just now (momentum_fused.Muon)
            plan, cached, self._step_attrs["views_verified"] = self.__dict__.pop("_planned")
        else:
            plan, cached = self._step_plan()
        amp = self._device_amp(plan)  # (found_inf, grad_scale) read by the kernels, or None: the host protocol
        if amp is None:
            skip, inv_scale = self._amp()
            if skip:
                return loss
            rollback = None
        else:
            inv_scale = 1.0
            rollback = AmpRollback()
        # the gradients divided in place after the update: gathered and checked before it
        unscale = unscale_lists(type(self).__name__, plan, traced) \
            if inv_scale != 1.0 or (amp is not None and amp[1] is not None) else None
        if not traced:  # (in a traced step a data-dependent check would break the graph mid-update)
            self._sync_written_params()  # master-layout params loaded or written since the last step (masters.py)
        if self.spec.phases:  # contract v2: passes and matrix phases (optim/phases.py)
            loss = self._update_phased(plan, loss, inv_scale, amp, rollback)
            self._unscale_grads(plan, amp, inv_scale, unscale)
            if cached is None and not traced:
                self._remember_plan(plan)
            if not traced:
                self._note_masters()
            return loss
        # what this step advances on the host, undone if the first backend call raises (nothing launched yet):
        # (buffer, its values before) per group counter, the state it created, the groups whose sr_step moved, and
        # the group dicts as they were (the per-group host counters: schedule-free's k and scalars, FSGDM's step)
        undo_bufs, created, sr_moved = [], [] if rollback is None else rollback.created, []
        undo_groups = [(g, dict(g)) for g, *_ in plan] if not traced and self._host_counters() else []
        self._prepare_step(plan, loss, inv_scale, created)
        spec = self.spec
        buckets: dict[tuple, Bucket] = {}

        def bucket(backend, device, dtype, flags, layout, cap) -> Bucket:
            key = (backend.name, device, dtype, flags, layout.name, cap)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(backend, layout)
            return b

        cap_steps = []  # the step counters of capturable groups (on the device; GradScaler undoes them there)

        try:  # (a raise while the packs are made, e.g. a counter written in place that an advance divides by:
            # the host counters already moved are undone, as when the first launch raises)
            for gi, (group, state_names, items, chosen) in enumerate(plan):
                flags = spec.make_flags(group)
                grad_mult = (-1.0 if group["maximize"] else 1.0) * inv_scale
                lay = _layouts.get_layout(group["layout"])
                cap = group["capturable"]
                members = None  # (the cached plan's members when only some have gradients: (their states, sel))
                if cached is None:
                    states, fresh = self._init_state(items, state_names, lay, created, group)
                else:  # the cached plan: every state tensor exists
                    e, _, sel = cached[gi]
                    states, fresh = e["states"], [False] * len(items)
                    if sel is not None:
                        members, states = (states, sel), [states[i] for i in sel]
                if rollback is not None:  # what the optimistic host-side advance must be able to undo
                    if spec.counts_steps:
                        rollback.created.extend([(st, "step") for st in states if "step" not in st])
                        if not cap:  # (capturable counters are undone on the device, below)
                            rollback.stepped.extend(states)
                    if spec.pack_reads_state:
                        rollback.mu_products.extend([(st, st["mu_product"].clone() if isinstance(
                            st.get("mu_product"), torch.Tensor) else None) for st in states])
                    if lay.stochastic:
                        rollback.sr_groups.append(group)
                if cap:
                    scalars = self._device_scalars(gi, group, states, fresh, grad_mult, next(iter(chosen))[0],
                                                   cap_steps) if items else []
                else:
                    if not traced and states and (spec.counts_steps or spec.pack_reads_state):
                        undo_bufs.extend(self._counter_snapshots(gi, states if members is None else members[0]))
                    scalars = self._group_scalars(gi, group, states, fresh, grad_mult, members)
                names = (*state_names, *lay.extra_keys)
                keys = None
                if lay.stochastic:  # one rounding key per tensor: (seed, the group's step, the param's position)
                    keys = group_sr_keys(gi, group, items)
                    group["sr_step"] += 1
                    sr_moved.append(group)
                if cached is not None and (len(chosen) == 1 or (not cap and "subs" in cached[gi][0])):
                    # the cached plan's lists (a DTensor group's local shards), one bucket per (device, dtype)
                    # (some: of a kind's members, those with gradients, None: all; sel: their packs among the
                    # step's, None: all of them)
                    e, gs, some = cached[gi]
                    for c, g, some, sel in [(e, gs, some, None)] if "subs" not in e else \
                            [(c, g, k, at) for c, (g, k, at) in zip(e["subs"], gs) if at]:
                        key = next(iter(chosen)) if sel is None else (c["device"], c["pdtype"])
                        b = bucket(chosen[key], *key, flags, lay, cap)
                        if some is None:
                            b.params.extend(c["bparams"])
                            b.states.extend(c["tuples"])
                        else:
                            b.params.extend([c["bparams"][i] for i in some])
                            b.states.extend([c["tuples"][i] for i in some])
                        b.grads.extend(g)
                        if cap:
                            b.scalars.append(scalars)  # a [n, k] device table
                        else:
                            b.scalars.extend(scalars if sel is None else [scalars[i] for i in sel])
                        if keys is not None:
                            b.sr_keys.extend(keys if sel is None else [keys[i] for i in sel])
                elif len(chosen) == 1 and not any([p.is_complex() for p in items]):  # one bucket, no per-tensor keys
                    (device, dtype), backend = next(iter(chosen.items()))
                    b = bucket(backend, device, dtype, flags, lay, cap)
                    b.params.extend(items)
                    b.grads.extend([p.grad for p in items] if not self._step_attrs.get("grad_subst") else map(self.grad_of, items))
                    if lay.int8:  # quantized tensors: the codes, then their scales (backends.Backend)
                        sfx = _layouts.INT8_SCALE_SUFFIX
                        b.states.extend([tuple([st[k] for k in names] + [st[k + sfx] for k in names
                                                                          if k + sfx in st]) for st in states])
                    else:
                        b.states.extend([tuple([st[k] for k in names]) for st in states])
                    if cap:
                        b.scalars.append(scalars)  # a [n, k] device table
                    else:
                        b.scalars.extend(scalars)
                    if keys is not None:
                        b.sr_keys.extend(keys)
                else:
                    for i, (p, st, sc) in enumerate(zip(items, states, scalars)):
                        rp = _real(p)
                        b = bucket(chosen[(rp.device, rp.dtype)], rp.device, rp.dtype, flags, lay, cap)
                        b.params.append(rp)
                        b.grads.append(_real(self.grad_of(p)))
                        b.states.append(tuple([_real(st[k]) for k in names]))
                        b.scalars.append(sc[None] if cap else sc)
                        if keys is not None:
                            b.sr_keys.append(keys[i])
                if spec.group_advance is not None:
                    spec.group_advance(group)  # per-group counters move after the packs used them
        except BaseException:
            if not traced:
                self._undo_host_advance(undo_bufs, cap_steps, created, sr_moved, undo_groups)
            raise
        started = []  # the buckets launched (a failure after the first cannot be undone on the host)
        try:
            self._launch(buckets, amp, traced, spec, started)
        except BaseException:
            if not started and not traced:
                self._undo_host_advance(undo_bufs, cap_steps, created, sr_moved, undo_groups)
            raise
        if amp is not None:
            for buf in cap_steps:  # an inf step did not happen: its count neither (no host read)
                buf.sub_(amp[0].to(buf.device, buf.dtype, non_blocking=True).reshape(()))
            if rollback:  # (capturable steps after the first have nothing to roll back on the host)
                self._defer_amp_flag(amp[0], rollback)
        self._unscale_grads(plan, amp, inv_scale, unscale)
        if cached is None and not traced:
            self._remember_plan(plan)
        if not traced:
            self._note_masters()
        return loss

    def _launch(self, buckets, amp, traced, spec, started: list) -> None:
        """One backend call per bucket, each appended to ``started`` once it has returned (optim/buckets.py)."""
        launch(buckets, amp, traced, spec, started)


# An LR scheduler wraps ``optimizer.step`` in a function of torch/optim/lr_scheduler.py (to warn when
# ``scheduler.step()`` comes first) unless the step is marked as already tracking its calls. That file is
# skipped by dynamo, so the wrapper would put a graph break at every compiled ``opt.step()``; our step
# records ``_opt_called`` itself and carries the mark.
FusedOptimizer.step._wrapped_by_lr_sched = True
