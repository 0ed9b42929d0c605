"""Validation of the optimizers' input, before anything changes: hyperparameters and group keys, gradients,
state tensors, host counters (their checks: optim/host_state.py), torch.optim's implementation switches.
``ValidationMixin._plan`` is the full plan of a step (validate everything, pick the backends; modify nothing; the
params without a gradient it validates for the cached plan: optim/members.py)."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .. import backends
from .. import distributed as _dist
from .. import layouts as _layouts
from ..specs import HOST_STATE_KEYS
from . import overlap as _overlap
from .ckpt_format import _codes_under_live_names, _saved_codes
from .host_state import HostStateChecksMixin, holds_rule_state, raise_partial_state
from .members import MembersMixin, _LeftOut, _host_form, sparse_ok
from .keys import FRONT_DEFAULTS, FRONT_GROUP_EXTRAS, GROUP_KEYS_ALWAYS_ALLOWED, near_miss, user_stacklevel

_MASTER, _REMAINDER = _layouts.MASTER_KEY, _layouts.REMAINDER_KEY

__all__ = ["GroupPlan", "ValidationMixin"]



class GroupPlan(NamedTuple):
    """One param group's plan for a step: the group, its state names (flags), the params that have a
    gradient, and the backend chosen per (device, real dtype)."""
    group: dict
    state_names: tuple
    items: list
    chosen: dict


# the param dtypes a step can update (add_param_group refuses other dtypes; the full plan, a dtype changed since)
STEPPABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
# state keys a step writes besides the rule's own names: host counters, a master or its remainder
_WRITTEN_EXTRA = (*HOST_STATE_KEYS, _layouts.MASTER_KEY, _layouts.REMAINDER_KEY)
STEPPABLE_NAMES = ", ".join(str(d).replace("torch.", "") for d in STEPPABLE_DTYPES)  # (for the error messages)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def chosen_backend(gp: GroupPlan, p: torch.Tensor):
    return gp.chosen[(p.device, real_dtype(p.dtype))]


_FRONT_KEYS = {**FRONT_DEFAULTS, **FRONT_GROUP_EXTRAS}  # (every group holds them)


class ValidationMixin(HostStateChecksMixin, MembersMixin):
    """The checks of FusedOptimizer (a mixin: it uses ``self.spec``, ``self.state``, ``self.param_groups``)."""

    def _check_layout_keys(self, group, where) -> _layouts.Layout:
        for key, default in _FRONT_KEYS.items():
            if key not in group:
                raise ValueError(f"{where}missing key {key!r} (deleted from the group?): every param group of "
                                 f"{type(self).__name__} keeps it; put it back (its default is {default!r})")
        lay = _layouts.get_layout(group["layout"]) if isinstance(group["layout"], str) else None
        if lay is None:
            raise ValueError(f"{where}layout must be a layout name; supported layouts: {_layouts.supported()}")
        if lay.name not in self.supported_layouts:
            why = self.unsupported_layout_reasons.get(lay.name)
            raise ValueError(f"{where}{type(self).__name__} does not support dtype layout {lay.name!r} "
                             f"({why + '; ' if why else ''}it supports: {', '.join(self.supported_layouts)})")
        if lay.int8 and not self.spec.plain_state:
            raise ValueError(f"{where}{type(self).__name__}: dtype layout {lay.name!r} needs param-shaped moment "
                             "state; this rule declares state tensors of its own")
        why = self.spec.state_refusal(group) if lay.reduced_state and self.spec.state_refusal is not None else None
        if why is not None:
            raise ValueError(f"{where}dtype layout {lay.name!r} cannot hold this group's state: {why}")
        for key in ("sr_seed", "sr_step"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}{key} must be a non-negative int, got {v!r}")
        cap = group.get("capturable", False)
        if not isinstance(cap, bool):
            raise TypeError(f"{where}capturable must be a bool, got {type(cap).__name__}: {cap!r}")
        if cap:
            why = self._not_capturable(lay)
            if why is not None:
                raise ValueError(f"{where}{type(self).__name__} cannot run with capturable=True: {why}")
        return lay

    def _not_capturable(self, lay) -> str | None:
        """Why this optimizer's step cannot avoid host-side per-step numbers (None: it can)."""
        spec = self.spec
        if spec.phases:  # each elementwise pass has its own pack; the matrix phases are torch ops on the device
            from ..specs import ElementwisePass, get_spec
            for ph in spec.phases:
                if isinstance(ph, ElementwisePass) and (get_spec(ph.rule).pack_reads_state
                                                        or get_spec(ph.rule).counts_steps):
                    return f"its pass {ph.rule!r} reads per-tensor host state or counters every step"
        if spec.pack_reads_state:
            return "its scalar pack reads per-tensor host state (NAdam's mu_product) every step"
        if self._host_counters():
            return "it keeps per-group host counters that change every step (FSGDM's u, schedule-free's c)"
        if lay.stochastic:
            return f"the {lay.name} layout derives its rounding keys from a host counter (sr_step)"
        return None

    def _check_capturable(self, gi, group, chosen) -> None:
        """A capturable group needs backends that take the scalar table as a tensor and a tensor lr on the
        params' device (a float lr is fine: it is a constant of the captured graph)."""
        for (device, _), b in chosen.items():
            if not b.scalar_tables:
                raise RuntimeError(f"{type(self).__name__} param group {gi}: capturable=True needs a compiled "
                                   f"backend (cpu, cuda, triton); backend {b.name!r} reads its scalars on the host")
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device != device:
                raise ValueError(f"{type(self).__name__} param group {gi}: with capturable=True a tensor lr must "
                                 f"be on the params' device ({device}), got {lr.device}")

    def _known_keys(self) -> set:
        return {*self.defaults, *self._group_extras, *GROUP_KEYS_ALWAYS_ALLOWED}

    def _check_group_keys(self, group, where) -> None:
        """Keys that are not hyperparameters are carried (torch does; HF and layer-wise recipes add ``name``,
        ``layer_id``, ``lr_scale``), with a warning when one is a near miss of a hyperparameter's name
        (``weight_decy``); a true ``differentiable`` (from a torch.optim checkpoint) is refused. Checked when
        a group is added and, for keys added to a group later, at the next step (once per key)."""
        known = self.__dict__.get("_known")
        if known is None:
            known = self._known = frozenset(self._known_keys())
        extra = group.keys() - known
        if not extra:
            return
        if group.get("differentiable"):
            raise ValueError(f"{where}: differentiable=True is not supported (the fused kernels update in place "
                             "outside autograd)")
        seen = self.__dict__.setdefault("_seen_keys", set())
        for key in extra:
            if key in seen:
                continue
            seen.add(key)
            hit = near_miss(key, known - GROUP_KEYS_ALWAYS_ALLOWED)
            if hit is not None:
                warnings.warn(f"{where}: key {key!r} is not a hyperparameter of {type(self).__name__} (did you mean "
                              f"{hit!r}?); it is kept in the group and has no effect", UserWarning,
                              stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ step
    def _plan(self):
        """Validate everything and pick backends. Modifies nothing. (The per-tensor checks are one
        combined test on the hot path; the detailed message is built only when one fails.)"""
        spec = self.spec
        name = type(self).__name__
        state = self.state
        strided = torch.strided
        plan = []
        traced = torch.compiler.is_compiling()
        dtensor_cls = _dist.dtensor_class()  # (None: no DTensor exists in this process)
        self._step_attrs["grad_subst"] = subst = {}  # gradients the backends read resolved (``grad_of``), by id(param)
        self._step_attrs["spare"] = {}  # the cached plan's members without a gradient (``_checked_spares``)
        from .plan_cache import C_CHECKS
        spares = {}  # gi -> the group's params without a gradient validated for the cached plan (``_spare_members``)
        counts = spec.counts_steps

        def collect_spare(group) -> bool:
            return C_CHECKS is not None and not traced and sparse_ok(spec, group)

        host_key = spec.host_state[0] if spec.pack_reads_state and spec.advance_many is not None else None

        def complete_state(st, names) -> bool:  # (a rule without state: every param, as optim/base.py keeps none)
            if not names and not counts:
                return True
            # (and host counters in the form the views keep, which a param without a gradient keeps as it is)
            return bool(st) and all([k in st for k in names]) and (
                not counts or _host_form(st.get("step"), torch.float32)) and (
                host_key is None or _host_form(st.get(host_key), torch.float64))

        strided_params = []  # (gi, pi, p): non-contiguous params, whose memory ``_check_param_memory`` checks
        states, owners = [], []  # the state tensors a step writes, and the params and grads of their owners: no
        # written state may overlap another tensor of the list; (gi, pi, key), key overlap.PARAM / GRAD for those
        for gi, group in enumerate(self.param_groups):
            if not traced:  # (traced: hyperparameters are graph inputs; validated by every eager step only)
                spec.validate(group, where=f"{name} param group {gi}: ")
                self._check_group_keys(group, f"{name} param group {gi}")
            lay = self._check_layout_keys(group, f"{name} param group {gi}: ")
            state_names = spec.state_names(group)
            required = spec.required_state(group)
            lazy = tuple(k for k in state_names if k not in required)  # states that may start at any step
            check_names = (*state_names, *lay.extra_keys)
            written = (*check_names, *(k + _layouts.INT8_SCALE_SUFFIX for k in state_names)) if lay.int8 else \
                check_names
            native = lay.name == "native"
            own = None if spec.plain_state else {t.name: t for t in spec.tensors(group) if t.persistent}
            items, keys = [], set()
            # (the params without a gradient whose state is complete: validated as the others, for the cached plan's
            # members only (``_spare_members``); what fails here is just left out, never raised)
            spare = [] if collect_spare(group) else None
            for pi, p in enumerate(group["params"]):
                g = p.grad
                gradless = g is None
                if gradless and (spare is None or not complete_state(state.get(p), check_names)):
                    continue
                try:
                    shape, dtype, device = p.shape, p.dtype, p.device
                    if gradless:  # (a member of the cached plan only as it is: contiguous, real, no lazy bits)
                        if not p.is_contiguous() or p.is_complex() or p.is_conj() or p.is_neg():
                            continue
                    elif g.layout is not strided or g.shape != shape or g.dtype != dtype or g.device != device:
                        self._raise_bad_grad(p, g, pi, gi)
                    elif not traced:
                        if g.is_conj() or g.is_neg() or g._is_zerotensor() or p.is_conj() or p.is_neg():
                            self._resolve_grad(p, g, pi, gi, subst)
                        if not p.is_contiguous():
                            strided_params.append((gi, pi, p))
                    if dtype not in STEPPABLE_DTYPES:  # (float8, complex32: no arithmetic for the rules in torch)
                        raise TypeError(f"{self._where(p, pi, gi)}: a {dtype} param cannot be stepped; the update "
                                        f"rules run in {STEPPABLE_NAMES}")
                    if not traced and p.is_inference() and not torch.is_inference_mode_enabled():
                        raise RuntimeError(f"{self._where(p, pi, gi)} is an inference tensor (made under "
                                           "torch.inference_mode()): it cannot be updated in place outside inference "
                                           "mode (torch.optim raises too, after updating the params before it)")
                    if native:
                        sdt = dtype
                    elif dtype in lay.param_dtypes:
                        sdt = lay.state_dtype_for(dtype)
                    else:
                        raise TypeError(f"{self._where(p, pi, gi)}: dtype layout {lay.describe()} cannot hold a "
                                        f"{dtype} param; supported layouts: {_layouts.supported()}")
                    st = state.get(p)
                    if st and lay.int8:
                        if gradless and any(_saved_codes(st, k)[0] is not None for k in state_names):
                            raise _LeftOut  # (a checkpoint's form: moved at the step that gives it a gradient)
                        _codes_under_live_names(st, state_names)
                    if st and required and not all(k in st for k in required) and holds_rule_state(st):
                        self._raise_partial_state(st, required, self._where(p, pi, gi))
                    if st and (_MASTER in st or _REMAINDER in st):
                        if _layouts.is_remainder_bytes(st.get(_REMAINDER)):  # a checkpoint's form, written here by
                            if gradless:
                                raise _LeftOut
                            st[_REMAINDER] = _layouts.remainder_from_bytes(st[_REMAINDER])  # ZeRO's load: back to int16
                        self._check_master_keys(st, lay, p, pi, gi)
                    if st and lay.int8:  # codes + block scales (layouts.int8_quantized tensors), else fp32
                        q = _layouts.int8_quantized(p)
                        p_dt = q and dtensor_cls is not None and isinstance(p, dtensor_cls)
                        want_shape = _layouts.int8_scale_shape(p) if q else None  # (once per param: host time)
                        for key in state_names:
                            t = st.get(key)
                            want = _layouts.int8_code_dtype(key) if q else torch.float32
                            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != want
                                                  or t.device != device):
                                self._raise_bad_state(p, key, t, pi, gi, want)
                            sk = key + _layouts.INT8_SCALE_SUFFIX
                            if not q and sk in st:  # (the backends would take it for a quantized tensor's scales)
                                raise ValueError(f"{self._where(p, pi, gi)}: state {sk!r} is block scales, but this "
                                                 "param keeps fp32 state (int8 layouts quantize tensors of at least "
                                                 f"{_layouts.INT8_MIN_NUMEL} elements, a multiple of "
                                                 f"{_layouts.INT8_BLOCK}); was a state_dict loaded into other params?")
                            if not q or t is None:
                                continue
                            s = st.get(sk)
                            if (isinstance(s, torch.Tensor) and not p_dt and tuple(s.shape) != want_shape
                                    and s.dim() == 1 and s.numel() == t.numel() // _layouts.INT8_BLOCK):
                                if gradless:
                                    raise _LeftOut
                                s = st[sk] = s.view(want_shape)  # (blocks,) scales of 2026-12-05 or before
                            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 \
                                    or tuple(s.shape) != want_shape or s.device != device:
                                self._raise_bad_state(p, sk, s, pi, gi, torch.float32, want_shape)
                            s_dt = dtensor_cls is not None and isinstance(s, dtensor_cls)
                            if s_dt != p_dt or (p_dt and (tuple(s.placements) != tuple(p.placements)
                                                          or _dist.local(s).shape[0] != _dist.local(p).shape[0])):
                                raise ValueError(f"{self._where(p, pi, gi)}: state {sk!r} must be "
                                                 + (f"a DTensor placed as the param ({tuple(p.placements)}), its rows "
                                                    "sharded with the param's rows" if p_dt else
                                                    "a plain tensor, as the param")
                                                 + "; was a state_dict loaded into differently sharded params?")
                        for key in lay.extra_keys:  # master16_int8: the remainder, param-shaped
                            t = st.get(key)
                            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape
                                                  or t.dtype != lay.dtype_of(key, dtype) or t.device != device):
                                self._raise_bad_state(p, key, t, pi, gi, lay.dtype_of(key, dtype))
                    elif st and own is not None:  # contract v2: each state tensor's own shape and dtype
                        for key, ts in own.items():
                            t = st.get(key)
                            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ts.shape_for(p)
                                                  or t.dtype != ts.dtype_for(p, lay) or t.device != device):
                                self._raise_bad_state(p, key, t, pi, gi, ts.dtype_for(p, lay), ts.shape_for(p))
                    elif st:
                        for key in check_names:
                            t = st.get(key)
                            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape
                                                  or t.dtype != (sdt if native else lay.dtype_of(key, dtype))
                                                  or t.device != device):
                                self._raise_bad_state(p, key, t, pi, gi, sdt if native else lay.dtype_of(key, dtype))
                    ts, ows = (states, owners) if not gradless else ([], [])
                    if st and not traced:
                        self._check_state_objects(p, st, pi, gi, check_names, lazy)
                        n_before = len(ts)
                        for k in written:
                            t = st.get(k)
                            if isinstance(t, torch.Tensor):
                                ts.append(t if dtensor_cls is None else _dist.local(t))
                                ows.append((gi, pi, k))
                        if len(ts) > n_before:  # (the param and its gradient: no written state may overlap them)
                            for t, k in ((p, _overlap.PARAM), (p.grad, _overlap.GRAD)):
                                if isinstance(t, torch.Tensor):
                                    ts.append(t.detach() if dtensor_cls is None else _dist.local(t.detach()))
                                    ows.append((gi, pi, k))
                    if gradless:
                        spare.append((pi, p, (device, dtype), ts, ows))
                        continue
                    items.append(p)
                    keys.add((device, dtype))
                except Exception:
                    if not gradless:
                        raise
            keys = {(dev, real_dtype(dt)) for dev, dt in keys}
            if spare:
                spares[gi] = self._spare_members(gi, group, state_names, items, spare, keys, dtensor_cls)
            chosen = {key: backends.resolve(self.backend, spec, *key, lay) for key in keys}
            if not native and any(dev.type == "meta" and b.name == "reference" for (dev, _), b in chosen.items()):
                # (its 8-bit and master codecs read values: it failed mid-step, after the other buckets; native meta
                # tensors step shape-only, as torch's ops do; a backend registered for meta, e.g. the front-end
                # bench's, decides for itself)
                pi = next(i for i, q in enumerate(group["params"]) if q.grad is not None and q.device.type == "meta")
                raise RuntimeError(f"{self._where(group['params'][pi], pi, gi)} is on the meta device, which the "
                                   f"reference backend cannot step in layout {lay.name!r} (it reads the values); "
                                   "materialize the model, e.g. to_empty() then load, before stepping")
            if spec.phases:
                self._phase_limits(gi, group, lay, items)
            _dist.check_group(name, gi, items, state, state_names)  # DTensor layouts line up (no-op without DTensors)
            self._check_host_state(gi, group, items)
            if group["capturable"]:
                self._check_capturable(gi, group, chosen)
            plan.append(GroupPlan(group, state_names, items, chosen))
        self._check_listed_once(plan)  # (object identities: a traced step checks them too)
        if not traced:
            self._check_param_memory(plan, strided_params, dtensor_cls)
            # (one dict or tensor given to two params: torch updates it once per param, the cpu kernels raced)
            why = _overlap.shared_state(states, owners, self.__dict__,
                                        C_CHECKS and (lambda ts: C_CHECKS.version_marks(ts)[1]))
            if why is not None:
                raise ValueError(f"{name}: {why}")
            if any(spares.values()):
                self._step_attrs["spare"] = self._checked_spares(plan, spares, states, owners, dtensor_cls)
        return plan

    def _check_master_keys(self, st, lay, p, pi, gi) -> None:
        """A master or remainder in the state of a group whose layout does not keep it: the group's ``layout`` was
        changed after its first step ("master" <-> "master16", or to "native"). Stepping on would rebuild the
        missing copy from the rounded param (the master's low bits lost) and leave the other one stale (a later
        switch back, or a checkpoint, would revert the params to it)."""
        for key in (_MASTER, _REMAINDER):
            if key in st and key not in lay.extra_keys:
                raise ValueError(
                    f"{self._where(p, pi, gi)}: state {key!r} (the "
                    f"{'fp32 master copy' if key == _MASTER else '16-bit remainder of the fp32 master'}) is not "
                    f"kept by this group's layout {lay.name!r}: was the group's layout changed after its first step? "
                    f"It cannot change then (the fp32 master would be "
                    f"lost or left stale). Restore the group's layout, or save a state_dict and load it into an "
                    f"optimizer built with layout={lay.name!r} (load_state_dict converts the master); nothing changed")

    def _check_state_objects(self, p, st, pi, gi, names, lazy) -> None:
        """A state entry the rule reads set to None (the backends would get no tensor), or a state tensor whose
        elements share memory (an expanded tensor: written on a copy whose write-back raises after the kernels
        ran): refused before anything changes. None for a state that may start at any step (not in
        ``spec.required_state``, ``lazy``: SGD's momentum_buffer, as torch.optim.SGD reads ``state.get``; torch
        <= 2.0 saved ``momentum_buffer: None`` with momentum 0) is no state yet: ``_init_state`` creates it, as at a
        first step."""
        for key in names:
            if key in st and st[key] is None and key not in lazy:
                self._raise_bad_state(p, key, None, pi, gi)
        for key, t in st.items():
            if (isinstance(t, torch.Tensor) and t.is_inference() and not torch.is_inference_mode_enabled()
                    and (key in names or key in _WRITTEN_EXTRA)):
                raise RuntimeError(f"{self._where(p, pi, gi)}: state {key!r} is an inference tensor (made or loaded "
                                   "under torch.inference_mode()): it cannot be updated in place outside inference "
                                   "mode; clone it outside inference mode (torch.optim raises too, after updating "
                                   "the params before it)")
            if isinstance(t, torch.Tensor) and not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
                raise ValueError(f"{self._where(p, pi, gi)}: state {key!r} has elements that share memory (strides "
                                 f"{t.stride()}, e.g. an expanded tensor); it cannot be updated in place")

    def _resolve_grad(self, p, g, pi, gi, subst) -> None:
        """A gradient with a lazy bit (a conjugate or negative view: ``p.conj()`` / ``_neg_view`` in the loss) or
        autograd's ZeroTensor (no memory: a param used only through ops whose derivative is 0, e.g. ``sgn``) is
        read resolved by the backends, which read memory directly (``.grad`` itself is not modified). A param with
        such a bit would be written through its raw memory: refused."""
        if p.is_conj() or p.is_neg():
            raise ValueError(f"{self._where(p, pi, gi)}: the param is a lazy {'conjugate' if p.is_conj() else 'negative'}"
                             " view (is_conj() / is_neg()); the kernels write params in memory: pass a resolved "
                             "tensor (p.resolve_conj() / p.resolve_neg())")
        subst[id(p)] = torch.zeros_like(p, memory_format=torch.contiguous_format) if g._is_zerotensor() \
            else g.resolve_conj().resolve_neg()

    def grad_of(self, p):
        """``p``'s gradient as the backends read it this step: ``p.grad``, or its resolved copy (``_resolve_grad``)."""
        sub = self._step_attrs.get("grad_subst")
        return sub.get(id(p), p.grad) if sub else p.grad

    def _check_listed_once(self, plan) -> None:
        """The same param twice, by editing param_groups (torch.optim steps it twice): refused, in eager and traced
        steps alike (before 2026-12-06 a step under torch.compile applied the update twice)."""
        seen: dict = {}
        for gi, gp in enumerate(plan):
            for q in gp.items:
                prev = seen.get(id(q))
                if prev is not None:
                    twice = f"listed twice in param group {gi}" if prev == gi else f"in param groups {prev} and {gi}"
                    raise ValueError(f"{type(self).__name__}: a param (shape {tuple(q.shape)}) is {twice}; a param "
                                     "belongs to one group, once (torch.optim applies its update twice); nothing "
                                     "changed")
                seen[id(q)] = gi

    def _check_param_memory(self, plan, strided_params, dtensor_cls) -> None:
        """Params whose memory the kernels cannot update as torch does: a param whose elements overlap each other
        (an expanded tensor; torch raises too), and, on a compiled backend, two distinct params that share an
        element (two Parameters over one memory: the kernels update a bucket's tensors in parallel, and a
        non-contiguous one on a copy written back afterwards, where torch and the reference backend update them
        one after the other). Params that share a storage without sharing an element (views of one flat buffer,
        column halves of a matrix) pass. One storage pointer per param, a sort per shared storage."""
        for gi, pi, p in strided_params:
            status = torch._debug_has_internal_overlap(p)  # 0 no, 1 yes, 2 too hard to tell from the strides
            if status == 1 or (status == 2 and _overlap.self_overlap(tuple(p.shape), p.stride(), p)):
                raise ValueError(f"{self._where(p, pi, gi)}: the param has elements that share memory (strides "
                                 f"{p.stride()}, e.g. an expanded tensor); it cannot be updated in place")
        by_storage: dict = {}
        for gi, gp in enumerate(plan):
            for q in gp.items:
                if q.numel() and (dtensor_cls is None or not isinstance(q, dtensor_cls)):
                    try:
                        ptr = q.untyped_storage().data_ptr()
                    except RuntimeError:  # (a wrapper subclass without a storage of its own)
                        continue
                    if ptr:  # (0: meta or fake tensors)
                        by_storage.setdefault((q.device, ptr), []).append((gi, q))
        memo = self.__dict__.setdefault("_disjoint_params", {})  # shared storages found disjoint (the full plan
        for shared in by_storage.values():                       # runs every step for some groups)
            if len(shared) < 2:
                continue
            key = tuple((id(q), q.data_ptr(), q.dtype, tuple(q.shape), q.stride(), chosen_backend(plan[gi], q).name)
                        for gi, q in shared)
            if key in memo:
                continue
            spans = sorted(((_overlap.span_bytes(q), gi, q) for gi, q in shared), key=lambda x: x[0][0])
            active = []  # spans that reach past the current start
            for (lo, hi), gi, q in spans:
                active = [a for a in active if a[0][1] > lo]
                for _, gj, r in active:
                    if "reference" == chosen_backend(plan[gi], q).name == chosen_backend(plan[gj], r).name:
                        continue
                    if (q.is_contiguous() and r.is_contiguous()) or _overlap.elements_overlap(q, r):
                        self._raise_shared_elements(plan, gi, q, gj, r)
                active.append(((lo, hi), gi, q))
            if len(memo) > 64:
                memo.clear()
            memo[key] = True

    def _raise_shared_elements(self, plan, gi, q, gj, r):
        def where(g, t):
            i = next(k for k, x in enumerate(self.param_groups[g]["params"]) if x is t)
            return (g, i), f"param {i} of group {g} (shape {tuple(t.shape)})"
        names = sorted({chosen_backend(plan[gi], q).name, chosen_backend(plan[gj], r).name} - {"reference"})
        (_, first), (_, second) = sorted([where(gi, q), where(gj, r)])
        raise ValueError(f"{type(self).__name__}: {first} and {second} are distinct params whose "
                         f"elements overlap in memory; the {' and '.join(names)} backend updates a bucket's tensors in "
                         "parallel (a non-contiguous one on a copy written back afterwards), so one update would be "
                         "lost or mixed. Tie them as one Parameter, give each its own memory, or use "
                         "backend='reference' (torch's order: one after the other)")

    def _where(self, p, pi, gi):
        return f"{type(self).__name__}: param {pi} of group {gi} (shape {tuple(p.shape)})"

    _raise_partial_state = staticmethod(raise_partial_state)

    def _raise_bad_grad(self, p, g, pi, gi):
        where = self._where(p, pi, gi)
        if g.layout != torch.strided:
            raise RuntimeError(f"{where}: sparse gradients are not supported (layout {g.layout})")
        if g.shape != p.shape:
            raise RuntimeError(f"{where}: gradient shape {tuple(g.shape)} does not match the param")
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: gradient dtype {g.dtype} does not match the param dtype {p.dtype}")
        raise RuntimeError(f"{where}: gradient is on {g.device} but the param is on {p.device}")

    def _raise_bad_state(self, p, key, t, pi, gi, want_dtype=None, want_shape=None):
        where = self._where(p, pi, gi)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: state {key!r} is a {type(t).__name__}, expected a Tensor")
        if want_shape is not None and tuple(t.shape) != tuple(want_shape):
            raise ValueError(f"{where}: state {key!r} has shape {tuple(t.shape)}, expected {tuple(want_shape)} for "
                             f"this param; was a state_dict loaded into other params?")
        if want_shape is None and t.shape != p.shape:
            raise ValueError(f"{where}: state {key!r} has shape {tuple(t.shape)}, which does not "
                             f"match the param; was a state_dict loaded into other params?")
        want = p.dtype if want_dtype is None else want_dtype
        raise ValueError(f"{where}: state {key!r} is {t.dtype} on {t.device}, expected {want} on {p.device} "
                         "(the group's dtype layout decides the state dtype; if the params' dtype or the group's "
                         "layout changed after the state was made, opt.load_state_dict(opt.state_dict()) converts it)")
