"""The cached plan (the hot path of a step): the plan of the last step, re-validated by identity checks and one
loop over the tensors in C (``momentum_fused._C_cpu``: cached_grads, same_objects, same_dict, same_entries,
csrc/cpu/cpu_python.cpp). They read tensor metadata only, so they serve CUDA (or any device's) params as well:
tests/test_fast_path.py proves it on ``meta`` tensors, and bench/frontend.py times that path without a GPU.
Without the compiled extension (a pure-Python install) there is no cached plan: every step runs the full plan.
Measured on the cpu backend: 10,000 tiny tensors, AdamW 168 ms per step with per-tensor Python checks, 11 ms
with these (docs/architecture.md). DTensor params (FSDP2) are checked on their local shards, the int8 layouts with
per-tensor state signatures, and multi-phase rules whose persistent state is param-shaped (Muon) are cached too
(tests/test_dtensor_fast_path.py; 296 DTensor params under AdamW: 3.1-3.4 -> 0.35-0.39 ms a step)."""
from __future__ import annotations

import torch

from .. import backends
from .. import distributed as _dist
from .. import layouts as _layouts
from ..specs import step_tensor
from .checks import GroupPlan
from .members import sparse_ok

__all__ = ["PlanCacheMixin", "C_CHECKS"]


def _c_checks():
    try:
        from .. import _C_cpu
        return _C_cpu
    except Exception:  # not built, or not loadable: the pure-Python install takes the full plan
        return None


C_CHECKS = _c_checks()


class PlanCacheMixin:
    """``_fast_plan`` / ``_remember_plan`` / ``invalidate_caches`` of FusedOptimizer."""

    def invalidate_caches(self) -> None:
        """Forget the per-step caches (the grouped step counters and the plan of the last step). The
        optimizer detects by itself what it can see (new param groups, loaded state_dicts, replaced
        params, grads or state tensors, a param's or state tensor's ``.data`` or ``set_``, except on the grouped
        step counters, which must be replaced as objects (docs/conventions.md): other memory, see
        ``_fast_plan``); calling this is never wrong, only slower for one step. The cached plan holds the state
        tensors it checked: state dropped between steps (``opt.state.clear()``, ``del opt.state[p]``) is freed at
        the start of the next step, before new state is made, or right away by calling this."""
        self._step_views = {}
        self._fast = None
        self.__dict__.pop("_master_pairs_of", None)  # (optim/masters.py: the masters of the cached plan)
        self.__dict__.pop("_state_ptrs", None)  # (overlap.shared_state: the state found disjoint last)
        self.__dict__.pop("_known", None)
        self.__dict__.pop("_phase_memos", None)  # (optim/phases.py: derived from the cached plan's params)

    def _fast_plan(self):
        """``_checked_fast_plan``; when that is None, the stale cache is dropped at once, so that the state it held
        (replaced or dropped since the last step) is freed before this step's full plan makes new state (before
        2026-12-06 both lived until the end of the step: a reset of 50M params' AdamW state peaked ~400 MB higher
        than torch's)."""
        got = self._checked_fast_plan()
        if got is None and self._fast is not None:
            self._fast = None
            self.__dict__.pop("_master_pairs_of", None)
        return got

    def _checked_fast_plan(self):
        """The plan of the last step, re-validated cheaply, or None (then ``_plan`` runs).

        After a step, ``_remember_plan`` keeps, per group, the params that had gradients (and, where
        ``members.sparse_ok``, those without one whose state the full plan validated too: the members), their shapes,
        (dtype, device), state dicts and state tensors. The next step reuses that plan, and the state
        created by then (every tensor has all its state), when each of these still holds, checked with
        C-speed list comparisons of object identities and one C loop over the tensors (``_cached_grads``)
        instead of per-tensor Python checks: the same ``state`` mapping with the same per-param dicts (the
        same key and value objects, in order), the same group objects and param lists, the same params with
        gradients (or any subset of the members: that subset steps), every gradient a plain dense strided tensor (contiguous, or a permutation of it: channels_last)
        with the param's shape, dtype and device, params of the cached dtype and device (per kind in a group of
        several: ``subs``), the same state tensor objects with the cached
        dtypes and the param's shape (the int8 layouts: each tensor's own keys, dtypes and block-scale sizes), every
        param and state tensor at the memory address the full plan saw (so that weight tying written as
        ``b.data = a.data`` meets the full plan's overlap check), no gradient sharing memory with a state tensor of
        the plan (``_state_spans``), the same state names (flags) and layout. For a group of DTensors the checks read the local shards, and the
        params' specs and local shards and the state tensors' local shards must be the cached objects.
        Hyperparameters are validated on every step, exactly as ``_plan`` does. Anything else falls
        back to the full ``_plan``, which validates everything and raises the detailed errors."""
        fc = self._fast
        if fc is None or C_CHECKS is None:
            return None
        _same_dict, _same_objects, _cached_grads, _same_entries = (
            C_CHECKS.same_dict, C_CHECKS.same_objects, C_CHECKS.cached_grads, C_CHECKS.same_entries)
        state = self.state
        groups = self.param_groups
        if state is not fc["state"] or len(groups) != len(fc["groups"]):
            return None
        if not _same_dict(state, fc["state_keys"], fc["state_values"]):
            return None
        spec = self.spec
        name = type(self).__name__
        plan, cached = [], []
        for gi, (group, e) in enumerate(zip(groups, fc["groups"])):
            if group is not e["group"]:
                return None
            spec.validate(group, where=f"{name} param group {gi}: ")
            if len(group) != e["nkeys"]:  # a key added since the last step
                self._check_group_keys(group, f"{name} param group {gi}")
            lay = self._check_layout_keys(group, f"{name} param group {gi}: ")
            if lay.name != e["layout"] or spec.state_names(group) != e["state_names"]:
                return None
            params = group["params"]
            if not _same_objects(params, e["params"]):
                return None
            # (the cached list: the same objects, and a list even where the group now holds a tuple)
            subs = e.get("subs")
            sel = None  # (sparse: the positions of the members with a gradient, None when all have one)
            if subs is None:
                gs = _cached_grads(e["params"], e["mask"], e["states"], e["keys"], e["flat"], e["pdtype"], e["device"],
                                   e["sdtypes"], e["dtensor"], e["sigs"], e["ptrs"], e["sparse"], fc["spans"])
                if gs is None:
                    return None
                if e["sparse"]:
                    gs, sel = gs
            else:  # a group of several (device, dtype): one C check per kind, its gradients per kind
                gs, sel = _kinds_grads(subs, fc["spans"])
                if gs is None:
                    return None
            items = e["items"] if sel is None else [e["items"][i] for i in sel]
            for hk in e["host_keys"]:  # a host counter replaced since the last step: the full plan checks it
                cv = self._step_views.get(gi if group["capturable"] else (gi, hk))
                if cv is None or not _same_entries(e["states"], hk, cv[1]):
                    return None
            chosen = {key: backends.resolve(self.backend, spec, *key, lay) for key in e["chosen_keys"]}
            if group["capturable"]:
                self._check_capturable(gi, group, chosen)
            plan.append(GroupPlan(group, e["state_names"], items, chosen))
            cached.append((e, gs, sel))
        # the host counters' views were checked just now: _host_views need not check them again this step
        self._step_attrs["views_verified"] = {(gi, hk) for gi, (e, *_) in enumerate(cached) for hk in e["host_keys"]
                                              if not e["group"]["capturable"]}
        return plan, cached

    def _remember_plan(self, plan) -> None:
        """Cache this step's plan for ``_fast_plan`` when the hot path can serve it: params not complex, every state
        tensor present; in each group plain tensors only or DTensors only (FSDP2). A DTensor group's entry also
        keeps the local shards of its params and state, which its buckets get directly (``bparams``, ``tuples``),
        and the C checks return its gradients' local shards. A group of plain params of several (device, dtype)
        (a bf16 model's fp32 norms in its one group) keeps one set of C checks per kind (``subs``): such a group
        took the full plan every step before 2026-12-07 (2.9x torch's fused step on tiny tensors, a review)."""
        self._fast = None
        spare = self._step_attrs.pop("spare", None) or {}  # (the full plan's members without a gradient)
        if C_CHECKS is None:
            return
        cls = _dist.dtensor_class()
        entries = []
        for gi, (group, state_names, items, chosen) in enumerate(plan):
            if not self.spec.plain_state and any(t.persistent and (t.shape is not None or t.dtype is not None)
                                                 for t in self.spec.tensors(group)):
                return  # (contract v2: the C checks know param-shaped state of the layout's dtype only; a
                # multi-phase rule's work buffers are made by each step)
            lay = _layouts.get_layout(group["layout"])
            keys = (*state_names, *lay.extra_keys)
            # a group of DTensors (check_group has made sure that their grads and state are DTensors placed alike)
            dt = cls is not None and bool(items) and type(items[0]) is cls
            params = group["params"]
            sparse = sparse_ok(self.spec, group) and not (dt and len(chosen) > 1)
            extra = spare.get(gi) if sparse else None
            if extra:  # the members: the params with gradients and those validated without, in the group's order
                where = {id(q): i for i, q in enumerate(params)}
                items = [params[i] for i in sorted([where[id(p)] for p in items] + [pi for pi, _ in extra])]
            states = []
            for p in items:
                st = self.state.get(p)
                if st is None and not keys and not self.spec.counts_steps:
                    st = {}  # (a rule without state keeps no entry, as torch: optim/base.py _init_state)
                if st is None or p.is_complex() or (type(p) is cls) is not dt or (not dt and cls is not None and
                                                                                 isinstance(p, cls)) or \
                        any(k not in st for k in keys) or (self.spec.counts_steps and "step" not in st):
                    return
                states.append(st)
            if len(chosen) > 1 and (dt or self.spec.phases):  # (DTensor groups, multi-phase rules: one (device,
                return  # dtype) a group; any device type: the C checks read metadata only, never data)
            entry = {"sparse": sparse,
                "group": group, "nkeys": len(group), "layout": lay.name, "state_names": state_names,
                "params": list(params), "items": items, "states": states, "chosen_keys": tuple(chosen),
                # (capturable: its device counters, ``_step_views[gi]``; a counter replaced by hand re-plans, and the
                # full plan checks those on the host)
                "host_keys": () if not states else (("step",) if self.spec.counts_steps else ())
                + ((self.spec.host_state[0],) if self.spec.pack_reads_state and self.spec.advance_many
                   and not group["capturable"] else ()),
            }
            if len(chosen) <= 1:
                c = _c_checks(params, items, states, keys, lay, cls if dt else None)
                if c is None:
                    return
                entry.update(c)
            else:  # one check per kind of the group's params, those without gradients included (a param that gets
                # one at a later step is then seen by its kind's mask)
                entry["subs"] = subs = []
                for kind in dict.fromkeys((p.device, p.dtype) for p in params):
                    sel = [i for i, p in enumerate(items) if (p.device, p.dtype) == kind]
                    c = _c_checks([p for p in params if (p.device, p.dtype) == kind], [items[i] for i in sel],
                                  [states[i] for i in sel], keys, lay, None)
                    c["sel"] = sel  # (its items' positions in the group's: their scalars and rounding keys)
                    c["sparse"] = sparse
                    subs.append(c)
            if extra:  # the members' host counters: views of one tensor (the step stacked those with gradients)
                if self.spec.counts_steps:
                    self._host_views(gi, "step", states, step_tensor)
                if self.spec.pack_reads_state and self.spec.advance_many is not None:
                    self._pack_state_views(gi, states)
            entries.append(entry)
        # the objects themselves (not their ids, which a new object may reuse once one is freed)
        self._fast = {"state": self.state, "groups": entries, "state_values": list(self.state.values()),
                      "state_keys": list(self.state), "spans": _state_spans(entries)}


def _kinds_grads(subs, spans) -> tuple:
    """The C checks of a group of several (device, dtype), one per kind (``subs``): (per kind (its gradients, the
    positions of its members with one among its members or None for all, their positions among the step's items),
    the positions of the group's members that step or None for all), or (None, None) where a check fails."""
    got = []
    for c in subs:
        g = C_CHECKS.cached_grads(c["params"], c["mask"], c["states"], c["keys"], c["flat"], c["pdtype"], c["device"],
                                  c["sdtypes"], None, c["sigs"], c["ptrs"], c["sparse"], spans)
        if g is None:
            return None, None
        got.append(g if c["sparse"] else (g, None))
    if all(k is None for _, k in got):
        return [(g, None, c["sel"]) for c, (g, _) in zip(subs, got)], None
    stepping = [[c["sel"][j] for j in (range(len(c["sel"])) if k is None else k)] for c, (_, k) in zip(subs, got)]
    sel = sorted([m for ms in stepping for m in ms])
    at = {m: i for i, m in enumerate(sel)}
    return [(g, k, [at[m] for m in ms]) for (g, k), ms in zip(got, stepping)], sel


def _c_checks(params, items, states, keys, lay, cls) -> dict | None:
    """The arguments of ``_C_cpu.cached_grads`` for ``params`` (a group's, or those of one (device, dtype) of it),
    ``items`` (the members: those with gradients, and the full plan's members without one, optim/members.py) and
    their ``states``, with what the buckets take from a single-kind group:
    ``bparams`` and ``tuples`` (a DTensor group's local shards: ``cls`` the DTensor class), or None where the
    C checks cannot serve them."""
    member = set(map(id, items))
    mask = [id(p) in member for p in params]  # (the members: the params with gradients, and spare ones if sparse)
    sigs = None
    if lay.int8:  # per tensor: codes and block scales (quantized), or fp32 state (_state_signatures)
        sigs, seg_keys = _state_signatures(states, keys)
        flat = [st[k] for st, ks in zip(states, seg_keys) for k in ks]
    else:
        seg_keys = [keys] * len(states)
        flat = [st[k] for st in states for k in keys]
    if cls is not None:
        if any(type(t) is not cls for t in flat):
            return None
        bparams, flat_locals = [p._local_tensor for p in items], [t._local_tensor for t in flat]
        dtensor = (cls, bparams, [p._spec for p in items], flat_locals)
    else:
        bparams, flat_locals, dtensor = items, flat, None
    nk = len(keys)
    first = flat_locals[:nk]
    tuples, at = [], 0
    for ks in seg_keys:
        tuples.append(tuple(flat_locals[at:at + len(ks)]))
        at += len(ks)
    return {
        "slocals": flat_locals,  # (the state tensors whose memory a gradient must not share: _state_spans)
        "keys": () if sigs is not None else keys,  # (with per-tensor signatures, theirs)
        "params": list(params), "bparams": bparams, "dtensor": dtensor,
        "mask": None if all(mask) else mask, "flat": flat, "tuples": tuples, "sigs": sigs, "states": states,
        # the tensors' memory as the full plan checked it (its overlap check): a param given another's memory since
        # (``b.data = a.data``, weight tying) sends the next step to the full plan again
        "ptrs": torch.tensor([t.data_ptr() for t in (*bparams, *flat_locals)] +
                             [t.numel() for t in (*bparams, *flat_locals)], dtype=torch.int64),
        # what _cached_grads checks every tensor (a DTensor's local shard) against (no items: none)
        "pdtype": bparams[0].dtype if items else torch.float32,
        "device": bparams[0].device if items else torch.device("cpu"),
        "sdtypes": () if sigs is not None else tuple([t.dtype for t in first]) if states
        else tuple([torch.float32] * len(keys)),
    }


def _state_spans(entries) -> torch.Tensor:
    """The byte spans of the state tensors (local shards) of every group of a cached plan, for ``cached_grads``'
    ``spans``: [2, n] int64, starts in increasing order, then ends (disjoint: the full plan's overlap check). A
    gradient that shares memory with another param's state is refused by the full plan; the cached plan's checks
    compared each gradient with its own param's state only before 2026-12-07 (a review)."""
    spans = []
    for e in entries:
        for c in e.get("subs") or (e,):
            for t in c["slocals"]:
                a, n = t.data_ptr(), t.numel()
                if a and n:
                    spans.append((a, a + n * t.element_size()))
    spans.sort()
    return torch.tensor(spans, dtype=torch.int64).t().contiguous() if spans else torch.zeros(2, 0, dtype=torch.int64)


def _state_signatures(states, keys) -> tuple:
    """The int8 layouts' per-tensor state for ``_C_cpu.cached_grads``: per state dict, its signature (keys, dtypes,
    size divisors: the state tensors ``keys``, param-shaped, then the block scales ``key + INT8_SCALE_SUFFIX`` of the
    quantized ones, numel / INT8_BLOCK; and the dict's number of entries, so that an added scale is seen; one tuple
    object per distinct signature) and its keys in that order (the order of the bucket's state tuple, as the full
    plan builds it in ``FusedOptimizer._update``)."""
    sfx, block = _layouts.INT8_SCALE_SUFFIX, _layouts.INT8_BLOCK
    known: dict = {}
    sigs, seg_keys = [], []
    for st in states:
        ks = (*keys, *[k + sfx for k in keys if k + sfx in st])
        dts = tuple([st[k].dtype for k in ks])
        sig = known.get((ks, dts, len(st)))
        if sig is None:
            sig = known[ks, dts, len(st)] = (ks, dts, tuple([1] * len(keys) + [block] * (len(ks) - len(keys))),
                                             len(st))
        sigs.append(sig)
        seg_keys.append(ks)
    return sigs, seg_keys
