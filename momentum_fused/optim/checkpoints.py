"""Checkpoints of FusedOptimizer: ``load_state_dict`` (host counters keep their own dtype on the CPU, layouts
keep their state dtypes, contract-v2 state keeps its declared dtype, torch.optim checkpoints of the same rule
load, and the conversions between the master / master16 and fp32 / int8_state layouts) and ``state_dict``."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import distributed as _dist
from .. import layouts as _layouts
from ..specs import HOST_STATE_KEYS, step_dtype
from .ckpt_format import (_check_int8_codes, _coded_names, _codes_to_live_names, _drop_cast_masters, _is_codes, _remainders_from_bytes, _torch_setstate_defaults, _without_retaken, refuse_missized_state)
from .compile import note_plain_groups, saved_groups
from .keys import user_stacklevel

__all__ = ["CheckpointMixin"]

_CONVERTED = (_layouts.MASTER_KEY, _layouts.REMAINDER_KEY)  # load_state_dict converts one into the other


def with_load_hooks(opt, state_dict, load) -> None:
    """``load(state_dict)`` between ``opt``'s load-state-dict hooks, where torch runs them: the pre-hooks first (the
    checkpoint ``load`` converts and checks is the one they return or edit: a hook may migrate an old format), the
    post-hooks after it succeeded; torch's own load inside ``load`` runs with them held back, so none runs twice."""
    state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict  # (shallow, as torch)
    for hook in list(opt._optimizer_load_state_dict_pre_hooks.values()):
        out = hook(opt, state_dict)
        if out is not None:
            state_dict = out
    pre, post = opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks
    opt._optimizer_load_state_dict_pre_hooks = type(pre)()
    opt._optimizer_load_state_dict_post_hooks = type(post)()
    try:
        load(state_dict)
    finally:
        opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = pre, post
    for hook in list(post.values()):
        hook(opt)


class CheckpointMixin:
    """``load_state_dict`` / ``state_dict`` of FusedOptimizer (before torch.optim.Optimizer in its bases)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim.Optimizer.load_state_dict, except that host-side state (``step``,
        ``mu_product``) keeps its own dtype on the CPU instead of being cast to the param dtype, and
        groups saved by torch.optim (or an older version) get missing hyperparameters from the
        defaults. Loading a torch.optim state_dict of the same rule works, and vice versa. A checkpoint of
        layout "master" loaded into a group of layout "master16", or the reverse, is converted and the group
        keeps its own layout (``_convert_master``; load the model's weights first). So do checkpoints loaded into
        or from a group of layout "int8_state" or "master16_int8": moments are encoded to, or decoded from, 8-bit
        block codes (``_convert_int8``), and master16_int8's master converts as master16's.

        The load hooks run where torch runs them: the pre-hooks first (the checkpoint this method reads and
        checks is the one they return or edit), the post-hooks last (after the host counters and layouts are
        written, so that what a post-hook sets stays; ``with_load_hooks``)."""
        self.sync_amp()
        with_load_hooks(self, state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        given = state_dict.get("state") if isinstance(state_dict, dict) else None  # (its key order, kept below)
        state_dict = _codes_to_live_names(state_dict)
        state_dict = _remainders_from_bytes(state_dict)
        state_dict = _drop_cast_masters(state_dict, type(self).__name__)
        self._check_loaded_host_state(state_dict)
        _check_int8_codes(state_dict)
        self._check_loaded_tensors(state_dict)
        self.invalidate_caches()
        host, saved = {}, {}
        for idx, st in state_dict["state"].items():
            host[idx] = {k: v for k, v in st.items() if k in HOST_STATE_KEYS}
            saved[idx] = {k: v for k, v in st.items() if k not in HOST_STATE_KEYS and isinstance(v, torch.Tensor)}
        live_layouts = [(g["layout"], g.get("sr_seed"), g.get("sr_step")) for g in self.param_groups]
        saved_stochastic = [isinstance(g.get("layout"), str) and _layouts.LAYOUTS.get(g["layout"], _layouts.NATIVE)
                            .stochastic for g in state_dict["param_groups"]]
        src_of = {i: _layouts.LAYOUTS.get(g.get("layout")) if isinstance(g.get("layout"), str) else None
                  for g in state_dict["param_groups"] for i in g["params"]}  # the checkpoint's layout (None: unknown)
        retaken, int8_names = self._retaken_keys(state_dict, saved)
        super().load_state_dict(_without_retaken(state_dict, retaken))
        loaded = {id(p) for p in self.state}  # (the conversions below read self.state[p], a defaultdict: a param
        # without saved state must not gain an empty entry, which state_dict() would then save)
        for g, (live, seed, step), was_sr in zip(self.param_groups, live_layouts, saved_stochastic):
            g["layout"] = live  # the layout is the live optimizer's, never the checkpoint's: its state converts
            if not was_sr and seed is not None:  # a checkpoint that drew no rounding bits (another layout, or
                g["sr_seed"], g["sr_step"] = seed, step  # torch.optim's) keeps the live seed and counter
        torch_fill = _torch_setstate_defaults(getattr(self, "torch_class", None))
        for g in self.param_groups:  # a key the checkpoint lacks (an older torch's): torch's class default where
            for k, v in torch_fill.items():  # torch fills it (its __setstate__), else this optimizer's own
                if k in self.defaults:
                    g.setdefault(k, v)
            for k, v in {**self.defaults, **self._group_extras}.items():
                g.setdefault(k, v)
        # (a capturable filled here, not saved: this optimizer's own setting, as asked for; compile.py)
        note_plain_groups(self, self.param_groups, reset=True)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        cap = {p for g in self.param_groups if g.get("capturable") for p in g["params"]}
        for idx, p in zip(saved_ids, params):
            for key, value in host.get(idx, {}).items():
                on_device = key == "step" and p in cap  # capturable: float32 steps on the device
                dtype = torch.float64 if key != "step" else torch.float32 if on_device else step_dtype(value)
                device = p.device if on_device else "cpu"
                self.state[p][key] = torch.as_tensor(value).detach().to(device, dtype).clone()
        # torch casts floating state to the param dtype; layouts keep their own state dtypes (bf16 state,
        # fp32 master): re-take those from the saved tensors, so that no value goes through a narrower type
        layout_of, own_of, group_of = {}, {}, {}
        for g in self.param_groups:
            lay = _layouts.get_layout(g["layout"])
            own = None if self.spec.plain_state else {t.name: t for t in self.spec.tensors(g) if t.persistent}
            for p in g["params"]:
                layout_of[p], own_of[p], group_of[p] = lay, own, g
        for idx, p in zip(saved_ids, params):
            lay, own = layout_of[p], own_of[p]
            if lay.int8 or any(k.endswith(_layouts.INT8_SCALE_SUFFIX) for k in saved.get(idx, {})):
                self._convert_int8(p, lay, saved.get(idx, {}), int8_names.get(idx) or self.spec.state_names(
                    group_of[p]))
                if lay.master or lay.remainder:  # the master layouts' own keys, then their conversion
                    for key in lay.extra_keys:
                        v = saved.get(idx, {}).get(key)
                        if v is not None:
                            self.state[p][key] = v.detach().to(p.device, lay.dtype_of(key, p.dtype), copy=True)
                    self._convert_master(p, lay, saved.get(idx, {}), src_of.get(idx))
                for key in _CONVERTED:  # a master layout's key that this layout does not keep
                    if key not in lay.extra_keys:
                        self.state[p].pop(key, None)
                continue
            for key in _CONVERTED:  # a master layout's key that this layout does not keep (the master is dropped,
                if key not in lay.extra_keys and key in saved.get(idx, {}):  # the param stays the model's)
                    self.state[p].pop(key, None)
            if lay.name == "native" and own is None:
                continue
            known = {*self.spec.every_state_name(group_of[p]), *lay.extra_keys}
            for key, value in saved.get(idx, {}).items():
                if own is not None and key in own:  # contract v2: the rule's own dtype (int8 codes, fp32 scales)
                    want = own[key].dtype_for(p, lay)
                elif lay.name == "native" or key not in known:  # (a key of neither the rule nor the layout, as
                    continue  # timm's Lookahead keeps in its base optimizer's state: torch's load cast it, as
                    # torch.optim does; the layout's state dtype had cut an fp32 one to bf16: a review, 2026-12-08)
                else:  # (a master layout's key this layout drops is not known: converted below)
                    want = lay.dtype_of(key, p.dtype)
                self.state[p][key] = value.detach().to(device=p.device, dtype=want, copy=True)
            if lay.master or lay.remainder:
                self._convert_master(p, lay, saved.get(idx, {}), src_of.get(idx))
        for idx, p in zip(saved_ids, params):  # (keys taken after torch's load: back in the checkpoint's order)
            if idx in retaken:
                st = self.state[p]
                order = {k: i for i, k in enumerate(given[idx])}
                items = sorted(st.items(), key=lambda kv: order.get(kv[0], len(order)))
                st.clear()
                st.update(items)
        for p in params:
            if id(p) not in loaded and p in self.state and not self.state[p]:
                del self.state[p]
        if any(lay.master for lay in layout_of.values()):  # the first step checks the masters against the params
            self._verify_masters = True  # (FusedOptimizer._repair_stale_masters: both are loaded by then)

    def _retaken_keys(self, state_dict, saved) -> tuple[dict, dict]:
        """{saved index: the state keys that the loop after torch's load writes from the saved tensors} (the
        layouts' own dtypes: 8-bit codes, bf16 state, masters, remainders; contract-v2 tensors): torch's load
        need not see them. It casts every floating-point state to the param's dtype: 8-bit codes of an fp32
        param briefly took 4x their size in fp32 copies that were then thrown away (a memory review measured a
        load's peak at +4x the checkpoint's state on int8_state, +2x on bf16_state, 2026-12-06). This mirrors
        that loop: a key it might not write (block scales, a master that another layout drops) stays torch's.
        Also {saved index: the state names the int8 conversion takes} (``_coded_names``: the checkpoint's flags'
        names, the live group's, and any other coded state)."""
        out, names_of = {}, {}
        try:
            saved_groups = list(state_dict["param_groups"])
            saved_ids = [(i, sg) for sg in saved_groups for i in sg["params"]]
        except (KeyError, TypeError):
            return out, names_of
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params) or not all(isinstance(sg, dict) for sg in saved_groups):
            return out, names_of  # (torch's load refuses it)
        sfx = _layouts.INT8_SCALE_SUFFIX
        for (idx, sg), (p, live) in zip(saved_ids, params):
            sv = saved.get(idx)
            if not sv:
                continue
            # the groups as the loop after torch's load sees them: the checkpoint's hyperparameters (a flag such
            # as momentum or amsgrad decides the state names), the live layout
            g = {**live, **sg, "layout": live["layout"]}
            lay = _layouts.get_layout(g["layout"])
            if lay.int8 or any(k.endswith(sfx) for k in sv):
                names = names_of[idx] = _coded_names(self.spec.state_names(g), sv, self.spec.every_state_name(live))
                keys = set(names) | (set(lay.extra_keys) if lay.master or lay.remainder else set())
            elif lay.name == "native" and self.spec.plain_state:
                continue
            else:
                own = set() if self.spec.plain_state else {t.name for t in self.spec.tensors(g) if t.persistent}
                known = {*self.spec.every_state_name(g), *lay.extra_keys}  # (another key: a wrapper's, torch's)
                keys = {k for k in sv if k in own or (k in known and lay.name != "native")}
            keys &= set(sv)
            if keys:
                out[idx] = keys
        return out, names_of

    @torch.no_grad()
    def _repair_stale_masters(self) -> None:
        """At the first step after a load: a ``master`` layout's fp32 copy lies within a bf16 spacing of its param,
        which the model's checkpoint restored (the param is the master rounded; a model moved between bf16 and fp16
        since rounds twice: still within one bf16 spacing; a check of exact rounding dropped those valid masters
        once, tests/test_compressed_state.py). One with an element farther off was not this param's master: a
        fresh optimizer's that torch.distributed.checkpoint's partial load kept beside a torch.optim checkpoint
        (allow_partial_load, docs/ecosystem.md: before 2026-12-06 its first step put the model back near its
        initialization), or weights loaded from elsewhere since. It starts again from the param, shard by shard,
        with a warning. Non-finite param elements (an fp16 overflow) are not compared. Otherwise each element that
        is not its master's rounding (a param written after the load: a review found small writes undone) takes the
        param's value, as between any two steps (optim/masters.py). A step traced by
        torch.compile does not check (the check reads a value: a graph break in the middle of the update); the
        next eager step does."""
        from .masters import _adopt, _chunks, in_memory  # (masters.py imports plan_cache, which imports checks, which
        # imports this)
        stale = []
        for gi, g in enumerate(self.param_groups):
            if not _layouts.get_layout(g["layout"]).master:
                continue
            for pi, p in enumerate(g["params"]):
                m = self.state.get(p, {}).get(_layouts.MASTER_KEY)
                if m is None:
                    continue
                ml, pl = _dist.local(m), _dist.local(p.detach())
                if not in_memory(pl):  # (its memory freed: compared when it comes back, as a moved param)
                    continue
                if any(_far(mc, pc.float()) for pc, mc in _chunks(pl, ml)):
                    ml.copy_(pl)
                    stale.append(f"param {pi} of group {gi}")
                else:  # (elements written since the load, or rounded twice: the param's value, exactly; the others
                    _adopt(pl, ml, twice=True)  # keep the master's bits: optim/masters.py)
        if stale:
            warnings.warn(f"{type(self).__name__}: the fp32 master of {', '.join(stale[:5])}"
                          f"{f' and {len(stale) - 5} more' if len(stale) > 5 else ''} does not round to its param "
                          "(a master that is not the loaded model's: e.g. a fresh optimizer's, kept by a partial "
                          "checkpoint load); it starts again from the param", UserWarning, stacklevel=user_stacklevel())

    def _check_loaded_tensors(self, state_dict: dict[str, Any]) -> None:
        """Before anything is loaded, per saved param state: every param-shaped tensor (the rule's moments, int8
        codes, a master or its remainder; not block scales, host counters, a contract-v2 tensor of its own
        shape or a key the optimizer does not know) has its param's shape, so that a checkpoint of
        other params is refused whole rather than failing halfway through a conversion; and a DTensor (FSDP2)
        param whose checkpoint holds 8-bit codes where its layout keeps fp32 state, or the reverse, converts shard
        by shard (_convert_int8) when the saved tensors are placed as the param or plain, and is refused otherwise
        (until 2026-12-06 every such conversion was refused; it had crashed inside torch's DTensor ops)."""
        try:
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            states = state_dict["state"]
        except (KeyError, TypeError):
            return  # (torch's load_state_dict names what is malformed)
        params = [(gi, pi, p, g) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])]
        if len(saved_ids) != len(params):
            return  # (torch's load_state_dict refuses it, naming the group sizes)
        own_shaped = set() if self.spec.plain_state else {
            t.name for g in self.param_groups for t in self.spec.tensors(g) if t.shape is not None}
        from .masters import in_memory  # (masters.py imports, through plan_cache and checks, this module)
        sfx, name = _layouts.INT8_SCALE_SUFFIX, type(self).__name__
        saved_group = {i: sg for sg in state_dict["param_groups"] for i in sg["params"]}
        for idx, (gi, pi, p, g) in zip(saved_ids, params):
            st = states.get(idx)
            if not isinstance(st, dict):
                continue
            # the names the load converts: the live group's (under any flags: a state kept while its flag is off
            # converts too, so its shape is checked: a review, 2026-12-08), the checkpoint group's (its flags: e.g.
            # AMSGrad's max_exp_avg_sq, which the load then takes) and every saved state with block scales
            names = list(self.spec.every_state_name(g))
            try:
                names += [k for k in self.spec.state_names({**g, **{k: v for k, v in saved_group[idx].items()
                                                                     if k != "params"}}) if k not in names]
            except Exception:  # (a malformed saved group: torch's load, or the checks after it, name it)
                pass
            names += [k for k in st if isinstance(k, str) and k + sfx in st and k not in names]
            keys = [k for k in names if k not in own_shaped] + [_layouts.MASTER_KEY, _layouts.REMAINDER_KEY]
            refuse_missized_state(name, gi, pi, p, st, keys, f"state_dict index {idx}, ")
            lay, src = _layouts.get_layout(g["layout"]), saved_group[idx].get("layout")
            from_lo, from_master = _master_source(st, _layouts.LAYOUTS.get(src) if isinstance(src, str) else None)
            if (lay.master and from_lo or lay.remainder and from_master) and not in_memory(_dist.local(p)):
                raise ValueError(f"{name}.load_state_dict: param {pi} of group {gi} has no memory (freed, as an "
                                 "offload frees it) and the checkpoint's master converts through its values "
                                 f"(between the master and master16 layouts): bring its memory back first, as "
                                 "the model's weights are loaded before the optimizer's; nothing was loaded")
            if not _dist.is_dtensor(p):
                continue
            live_codes = _layouts.get_layout(g["layout"]).int8 and _layouts.int8_quantized(p)
            for key in names:
                v = st.get(key)
                coded = isinstance(v, torch.Tensor) and v.dtype in (torch.int8, torch.uint8) and key + sfx in st
                if not isinstance(v, torch.Tensor) or coded == live_codes:
                    continue  # (codes into codes, values into values: loaded as they are)
                parts = [v, st[key + sfx]] if coded else [v]
                placed = [_dist.is_dtensor(t) and t.device_mesh == p.device_mesh
                          and tuple(t.placements) == tuple(p.placements) for t in parts]
                plain = [isinstance(t, torch.Tensor) and not _dist.is_dtensor(t) for t in parts]
                ok = all(placed) or all(plain)
                if ok and all(placed):  # (shard by shard: the param's rows; for codes whole blocks in each, and
                    ok = tuple(v.shape) == tuple(p.shape) and (not coded or (  # their (rows, blocks per row) scales)
                        _layouts.int8_quantized(v) and tuple(parts[1].shape) == _layouts.int8_scale_shape(v)))
                if not ok:
                    raise ValueError(
                        f"{name}.load_state_dict: param {pi} of group {gi} is a DTensor (FSDP2) whose layout keeps "
                        f"{'8-bit codes' if live_codes else 'fp32 state'}, and the checkpoint's "
                        f"{'codes and scales' if coded else 'values'} for {key!r} are neither DTensors of its shape "
                        f"{tuple(p.shape)} placed as the param (as DCP and set_optimizer_state_dict load them; codes "
                        "with rows of whole blocks and their (rows, blocks per row) scales) nor plain tensors: "
                        "cannot convert them shard by shard; nothing was loaded")

    def _convert_int8(self, p, lay, saved, names) -> None:
        """int8_state checkpoints (docs/layouts.md): into an int8_state group the saved codes and scales are kept
        and fp32 moments (a checkpoint of another layout) are encoded; into a group of any other layout, saved
        codes are decoded (to the layout's state dtype). Tensors the layout keeps in fp32 are loaded as fp32.
        A DTensor (FSDP2) param converts shard by shard (_int8_to_values, _int8_to_codes): its blocks lie inside
        its row shards, no communication."""
        st, sfx = self.state[p], _layouts.INT8_SCALE_SUFFIX
        quantized = lay.int8 and _layouts.int8_quantized(p)
        for key in names:
            v = saved.get(key)
            if not isinstance(v, torch.Tensor):
                if not quantized:  # (a reset state, None, of a checkpoint with codes: no scales without codes)
                    st.pop(key + sfx, None)
                continue
            sc = saved.get(key + sfx) if v.dtype in (torch.int8, torch.uint8) else None
            if sc is not None and quantized:
                st[key] = v.detach().to(p.device, copy=True)
                sc = sc.detach().to(p.device, torch.float32, copy=True)
                want = _layouts.int8_scale_shape(p)
                if tuple(sc.shape) != tuple(want) and sc.numel() == p.numel() // _layouts.INT8_BLOCK:
                    sc = sc.reshape(want)  # FSDP2's (rows, blocks per row) <-> one process's (blocks,): same order
                st[key + sfx] = sc
                continue
            x = _int8_to_values(v, sc, p) if sc is not None else v.detach()
            st.pop(key + sfx, None)
            if quantized:
                st[key], st[key + sfx] = _int8_to_codes(x, p, key not in _layouts.INT8_UNSIGNED)
            else:
                want = p.dtype if lay.name == "native" else lay.dtype_of(key, p.dtype)
                st[key] = _dist.shardwise(lambda t: t.to(want, copy=True))(_placed_as(x, p))

    def _convert_master(self, p, lay, saved, src=None) -> None:
        """A checkpoint of layout "master" loaded into a "master16" group, or the reverse (docs/layouts.md): the
        fp32 master is rebuilt from the live param (load the model's weights first) and its saved remainder (the
        param is not written: loading the same checkpoint twice gives the same master), or split into the param
        (rounded to nearest, ties away) and the remainder; the param is written then, and differs from the saved
        one only where the master's low half is exactly 0x8000 (an RNE tie). ``src``: the
        checkpoint's layout where its group names one: its key decides, whatever else ``saved`` holds (a
        torch.distributed.checkpoint load starts from the live state dict, so the live master or remainder sits
        beside the checkpoint's other key: before 2026-12-06 that skipped the conversion); else the keys do."""
        st = self.state[p]
        from_lo, from_master = _master_source(saved, src)
        if lay.master and from_lo:
            st.pop(_layouts.REMAINDER_KEY, None)
            lo = _dist.placed_like(saved[_layouts.REMAINDER_KEY].to(p.device).reshape(p.shape), p)  # (numel checked)
            hi = p.detach().to(torch.bfloat16)  # (an fp16 param of the "master" layout: the saved bf16 param's
            st[_layouts.MASTER_KEY] = _layouts.master16_decode(hi, lo).view(p.shape).clone()  # value)
            # the param stays as loaded: master16's rounding of the master (ties away from zero), which the first
            # step's check (_repair_stale_masters) takes as the master's; rewriting it to the nearest even made a
            # second load of the same checkpoint decode a tie one bf16 spacing low (a review, 2026-12-07)
        elif lay.remainder and from_master:
            st.pop(_layouts.MASTER_KEY, None)
            hi, lo = _layouts.master16_encode(_dist.placed_like(saved[_layouts.MASTER_KEY].to(p.device).reshape(p.shape),
                                                                p))
            with torch.no_grad():
                p.copy_(hi.view(p.shape))
            st[_layouts.REMAINDER_KEY] = lo.view(p.shape)


    def state_dict(self):
        """torch's, except that a quantized tensor's 8-bit codes are saved one level down, ``{name: {"codes":
        codes}}`` (beside ``name + "_scale"``), not as the state's tensor: a checkpoint loaded where the codes cannot
        be decoded (torch.optim, or torch.distributed.checkpoint's in-place load into a native optimizer, whose key
        ``name`` is a tensor) then fails loudly instead of taking the codes as the moments, while a load that
        rebuilds the state from the live keys (DCP's ``flatten_optimizer_state_dict=True``, torchtitan's) finds
        them (2026-12-05 to 12-06 they were saved as ``name + "_codes"``, which that load dropped; both older
        forms still load); and that the master remainder (``master_lo``,
        int16) is saved as its two bytes (``layouts.remainder_bytes``: uint8 of shape (*param shape, 2), a view),
        which NCCL and gloo gather for a full state dict (neither has an int16 collective). ``load_state_dict``
        takes both forms of each. The state-dict hooks run where torch runs them: the post-hooks last, on the
        saved forms (what they return is returned, whatever its shape)."""
        self.sync_amp()
        return with_post_hooks(self, lambda o: super(CheckpointMixin, o).state_dict(), _saved_forms)


def _master_source(saved: dict, src) -> tuple[bool, bool]:
    """(from the remainder, from the master): which saved key a master-layout load converts from (_convert_master's
    rule: the checkpoint group's layout ``src`` decides where it names one, else the key present alone)."""
    has_lo, has_master = _layouts.REMAINDER_KEY in saved, _layouts.MASTER_KEY in saved
    return (has_lo and (src.remainder if src is not None else not has_master),
            has_master and (src.master if src is not None else not has_lo))


def with_post_hooks(opt, build, convert):
    """``convert(build(opt))`` with ``opt``'s state-dict post-hooks run after it, as torch runs them after its
    own state_dict (each may edit the dict or return another, which is then the result): torch's ``build`` runs
    with them held back (its pre-hooks run inside it), so that they see, and may reshape, the converted dict."""
    post = opt._optimizer_state_dict_post_hooks
    opt._optimizer_state_dict_post_hooks = type(post)()
    try:
        sd = convert(build(opt))
    finally:
        opt._optimizer_state_dict_post_hooks = post
    if isinstance(sd, dict) and isinstance(sd.get("param_groups"), list):  # (a pre-hook may reshape it)
        sd["param_groups"] = saved_groups(opt, sd["param_groups"])
    for hook in list(post.values()):
        out = hook(opt, sd)
        if out is not None:
            sd = out
    return sd


def _saved_forms(sd: dict) -> dict:
    """torch's state_dict ``sd`` with the 8-bit codes one level down and the remainders as bytes (``state_dict``)."""
    state, sfx, ck = sd["state"], _layouts.INT8_SCALE_SUFFIX, _layouts.INT8_CODES_KEY
    rk = _layouts.REMAINDER_KEY
    for idx, st in list(state.items()):
        if isinstance(st, dict) and any(isinstance(k, str) and k.endswith(sfx) for k in st):
            st = state[idx] = {k: ({ck: v} if _is_codes(st, k) else v) for k, v in st.items()}  # (new dicts)
        if isinstance(st, dict) and isinstance(st.get(rk), torch.Tensor) and st[rk].dtype == torch.int16:
            state[idx] = {**st, rk: _layouts.remainder_bytes(st[rk])}
    return sd


def _placed_as(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A loaded tensor of ``p``'s number of elements on ``p``'s device, in ``p``'s shape: a DTensor as it is
    (_check_loaded_tensors: placed as ``p``), a plain one of a DTensor ``p`` cut to this rank's shard."""
    if _dist.is_dtensor(x):
        return x
    return _dist.placed_like(x.detach().to(p.device).reshape(p.shape), p)


def _int8_to_values(codes: torch.Tensor, scales: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A saved state's codes and block scales decoded to fp32 values of ``p``'s shape (a DTensor placed as ``p``
    when ``p`` is one). Codes saved by FSDP2 (DTensors, their rows of whole blocks, the scales placed as them)
    decode shard by shard, with no communication; plain codes decode whole, then are cut to this rank's shard."""
    signed = codes.dtype == torch.int8
    if not _dist.is_dtensor(codes):
        x = _layouts.int8_decode(codes.detach().to(p.device), scales.detach().to(p.device, torch.float32), signed)
        return _placed_as(x, p)
    local = _layouts.int8_decode(codes._local_tensor, scales._local_tensor.float(), signed)
    return _dist.view_placed(codes, lambda _: local, tuple(codes.shape))


def _int8_to_codes(x: torch.Tensor, p: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values (a checkpoint of another layout) encoded as a quantized ``p``'s codes and block scales, placed
    as its live state: for a DTensor ``p`` this rank's rows alone (layouts.int8_quantized: its rows hold whole
    blocks, so a shard's blocks, and their codes, are those of the plain tensor)."""
    x = _placed_as(x, p)
    if not _dist.is_dtensor(p):
        return _layouts.int8_encode(x.float().contiguous(), signed)
    shape = _layouts.int8_scale_shape(p)
    codes, scales = _layouts.int8_encode(x._local_tensor.float().contiguous().view(-1, _layouts.INT8_BLOCK), signed)
    return (_dist.view_placed(p, lambda t: codes.view(t.shape), tuple(p.shape)),
            _dist.view_placed(_dist.zeros_like_placed(p, shape, torch.float32),
                              lambda t: scales.view(t.shape), tuple(shape)))


def _far(m: torch.Tensor, pf: torch.Tensor) -> bool:
    """Whether a finite param element lies farther than a bf16 spacing (fp16's near zero) from its master's."""
    far = (m - pf).abs() > pf.abs() * 2.0 ** -7 + 2.0 ** -24
    return bool((far & torch.isfinite(pf)).any())
