"""The saved format of FusedOptimizer's checkpoints (optim/checkpoints.py loads and saves through these): how int8
codes, their scales and master16's remainder appear in a state_dict (the current and older forms), the masters
torch.optim's load cast, the checks of saved tensors' sizes and codes, and torch's group defaults."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .. import distributed as _dist
from .. import layouts as _layouts
from .keys import user_stacklevel

__all__ = ["refuse_missized_state"]


def _check_int8_codes(state_dict: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, 8-bit codes that are not ones (a state with block scales beside it must
    be int8 codes for a signed state, uint8 for an unsigned one, with one floating-point scale per 256 codes:
    anything else would be taken as the values, or decoded with the wrong sign), and signed codes outside the map:
    -128 is no code of the signed map (-127..127, docs/algorithms.md §11), no encoder writes it, and the backends
    would decode it differently."""
    sfx = _layouts.INT8_SCALE_SUFFIX
    for idx, st in state_dict.get("state", {}).items():
        if not isinstance(st, dict):
            continue
        for key, v in st.items():
            if not (isinstance(key, str) and not key.endswith(sfx) and key + sfx in st) or v is None:
                continue  # (None: a state that may start at any step, reset; its scales are replaced then)
            sc = st[key + sfx]
            want = torch.uint8 if key in _layouts.INT8_UNSIGNED else torch.int8
            if not (isinstance(v, torch.Tensor) and v.dtype == want and isinstance(sc, torch.Tensor)
                    and sc.is_floating_point() and sc.numel() * _layouts.INT8_BLOCK == v.numel()):
                raise ValueError(
                    f"load_state_dict: state {idx!r} {key!r} has block scales {key + sfx!r} beside it, so it must be "
                    f"{want} codes ({'unsigned' if want == torch.uint8 else 'signed'} map) with one floating-point "
                    f"scale per {_layouts.INT8_BLOCK} codes; got {_describe(v)} and scales {_describe(sc)}. The "
                    "checkpoint is corrupt or was edited"
                    + (" (or rebuilt by torch.distributed.checkpoint without its codes: a checkpoint saved on "
                       f"2026-12-05 or 12-06 holds them as {key + '_codes'!r}, which a DCP load into this version "
                       "does not find; convert it with torch.distributed.checkpoint.format_utils.dcp_to_torch_save "
                       "and load that file with load_state_dict)" if isinstance(v, dict) else "")
                    + "; nothing was loaded")
            if v.dtype != torch.int8:
                continue
            if bool((_dist.local(v) == -128).any()):  # a DTensor (FSDP2): this rank's shard, no collective
                raise ValueError(f"load_state_dict: state {idx!r} {key!r} holds the int8 code -128, which is not a "
                                 "code of the signed map (-127..127); the checkpoint is corrupt or not an int8_state one")


def _describe(v) -> str:
    return f"a {v.dtype} tensor of {v.numel()} elements" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def refuse_missized_state(name: str, gi: int, pi: int, p: torch.Tensor, st: dict, keys, where: str = "") -> None:
    """ValueError (nothing loaded) when a saved tensor of param ``p``'s state (param ``pi`` of group ``gi``) that
    must be param-shaped is not: ``keys``, the optimizer's param-shaped state names for that group (a rule's
    moments, which an 8-bit checkpoint holds as codes, a master or its remainder). Other keys (a scalar that user
    code keeps beside the state) load as torch.optim loads them."""
    for key in keys:
        v = st.get(key)
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(p.shape):  # (the shape, not only the number of
            # elements: the conversions reshape a saved tensor to the param's, the step checks the shape; a
            # checkpoint of (3, 4) params loaded into (4, 3) ones went through the conversions with no error)
            raise ValueError(f"{name}.load_state_dict: param {pi} of group {gi} ({where}shape {tuple(p.shape)}): "
                             f"state {key!r} has shape {tuple(v.shape)}; was the checkpoint saved for other params? "
                             "Nothing was loaded")


def _is_codes(st: dict, key) -> bool:
    v = st[key]
    return isinstance(key, str) and key + _layouts.INT8_SCALE_SUFFIX in st and isinstance(v, torch.Tensor) \
        and v.dtype in (torch.int8, torch.uint8)


@functools.lru_cache(maxsize=None)
def _torch_setstate_defaults(torch_cls) -> dict:
    """The group keys ``torch_cls.__setstate__`` fills in a loaded group that lacks them (keys added to torch
    later: ``maximize``, ``decoupled_weight_decay``, ``nesterov``...), with its values (read from torch itself,
    on an empty group): a checkpoint of an older torch resumes as in torch, not with this optimizer's own
    constructor arguments."""
    if torch_cls is None:
        return {}
    obj = torch_cls.__new__(torch_cls)
    try:
        obj.__setstate__({"defaults": {}, "state": {}, "param_groups": [{"params": []}]})
    except Exception:  # (a torch whose __setstate__ needs more: fall back to this optimizer's defaults)
        return {}
    return {k: v for k, v in obj.param_groups[0].items() if k != "params"}


def _drop_cast_masters(state_dict, name):
    """A saved fp32 master that is not fp32, or a master remainder that is not int16, went through an optimizer
    that does not keep one: torch.optim casts state it does not know to the param dtype on load, keeps it, and
    never updates it, so after training there it is stale (loading it would revert that training). Such entries
    are left out (in new dicts), with a warning: the master restarts from the loaded params, as when the
    checkpoint holds none. (A master is not compared with the live param here: torch's ``set_state_dict`` loads
    the optimizer before the model, and a model whose dtype changed between bf16 and fp16 rounds it otherwise;
    a master that torch.optim kept in fp32, training fp32 params, is therefore not detected: docs/layouts.md.)"""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict):
        return state_dict
    want = {_layouts.MASTER_KEY: torch.float32, _layouts.REMAINDER_KEY: torch.int16}
    out, dropped = None, {}
    for idx, st in states.items():
        if not isinstance(st, dict):
            continue
        cast = [k for k, dt in want.items() if isinstance(st.get(k), torch.Tensor) and st[k].dtype != dt]
        if cast:
            if out is None:
                out = dict(states)
            out[idx] = {k: v for k, v in st.items() if k not in cast}
            for k in cast:
                dropped.setdefault((k, st[k].dtype), []).append(idx)
    for (k, dt), idx in dropped.items():
        warnings.warn(f"{name}.load_state_dict: state {k!r} of {len(idx)} param(s) (state_dict indices "
                      f"{idx[:5]}{'...' if len(idx) > 5 else ''}) was saved as {dt}, not {want[k]}: the checkpoint "
                      "went through an optimizer that does not keep a master (torch.optim casts it to the param "
                      "dtype and never updates it), so it is stale and is not loaded; the master restarts from the "
                      "params at the next step", UserWarning, stacklevel=user_stacklevel())
    return state_dict if out is None else {**state_dict, "state": out}


def _coded_names(names, saved: dict, live_names=()) -> list:
    """The state names the int8 conversion takes: the rule's under the checkpoint's flags, then those of the live
    group's flags and any other state the checkpoint holds as 8-bit codes with block scales, where it holds them
    (a buffer torch keeps after its flag was turned off, momentum 0 or amsgrad False, saved then): converted as
    the others are, not taken by torch's load as values (before 2026-12-06 codes were kept as numbers, or fp32
    state where codes were expected raised at a later step)."""
    sfx = _layouts.INT8_SCALE_SUFFIX
    out = list(names)
    coded = [k[:-len(sfx)] for k in saved if isinstance(k, str) and k.endswith(sfx)]
    for k in [*live_names, *coded]:
        if k not in out and isinstance(saved.get(k), torch.Tensor):
            out.append(k)
    return out


def _without_retaken(state_dict, retaken: dict):
    """``state_dict`` for torch's load: the ``retaken`` keys left out of their states (new dicts; the caller's
    are not modified)."""
    if not retaken:
        return state_dict
    states = {idx: {k: v for k, v in st.items() if k not in retaken[idx]} if idx in retaken else st
              for idx, st in state_dict["state"].items()}
    return {**state_dict, "state": states}


def _saved_codes(st: dict, key):
    """The codes a checkpoint's state ``st`` holds for ``key`` beside ``key + "_scale"``, and the entry they are
    under: ``{key: {"codes": codes}}`` (``state_dict`` since 2026-12-06, second form) or ``key + "_codes"``
    (2026-12-05 and 12-06); (None, None) for neither (codes under ``key`` itself: 2026-12-04 and before)."""
    if not (isinstance(key, str) and key + _layouts.INT8_SCALE_SUFFIX in st):
        return None, None
    v = st.get(key)
    if isinstance(v, dict) and set(v) == {_layouts.INT8_CODES_KEY}:
        return v[_layouts.INT8_CODES_KEY], key
    if key not in st and key + _layouts.INT8_CODES_SUFFIX in st:
        return st[key + _layouts.INT8_CODES_SUFFIX], key + _layouts.INT8_CODES_SUFFIX
    return None, None


def _codes_under_live_names(st: dict, names) -> None:
    """A checkpoint's codes (as ``state_dict`` saves them, ``_saved_codes``) put into the live state without our
    ``load_state_dict`` (ZeroRedundancyOptimizer writes ``optim.state[p]`` itself): back under ``name`` as the
    tensor, as ``load_state_dict`` would have put them."""
    for key in names:
        codes, entry = _saved_codes(st, key)
        if codes is not None:
            st.pop(entry)
            st[key] = codes


def _remainders_from_bytes(state_dict):
    """A checkpoint's master remainders saved as bytes (``state_dict``) back to int16 views, in new dicts;
    checkpoints saved before 2026-12-06 hold them as int16 already."""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict):
        return state_dict
    rk, out = _layouts.REMAINDER_KEY, None
    for idx, st in states.items():
        if isinstance(st, dict) and _layouts.is_remainder_bytes(st.get(rk)):
            if out is None:
                out = dict(states)
            out[idx] = {**st, rk: _layouts.remainder_from_bytes(st[rk])}
    return state_dict if out is None else {**state_dict, "state": out}


def _codes_to_live_names(state_dict):
    """A checkpoint's codes (``_saved_codes``: ``{name: {"codes": t}}`` or ``name + "_codes"``) back under ``name``
    as the tensor, in new dicts (the caller's are not modified); checkpoints saved before 2026-12-05 hold the codes
    under ``name`` already."""
    sfx = _layouts.INT8_SCALE_SUFFIX
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict):
        return state_dict
    out = None
    for idx, st in states.items():
        if not isinstance(st, dict):
            continue
        found = {}
        for k in st:
            if isinstance(k, str) and k.endswith(sfx):
                codes, entry = _saved_codes(st, k[:-len(sfx)])
                if codes is not None:
                    found[entry] = (k[:-len(sfx)], codes)
        if found:
            if out is None:
                out = dict(states)
            new = {k: v for k, v in st.items() if k not in found}
            new.update(dict(found.values()))
            out[idx] = new
    return state_dict if out is None else {**state_dict, "state": out}


# ------------------------------------------------------------------ Muon's group keys (optim/muon.py)
def muon_without_saved_layout(groups: list, where: str) -> list:
    """A checkpoint's (or pickle's) groups without a ``layout`` other than "native": Muon kept such a key with no
    effect before 2026-12-06 (its state is native whatever the key said), so the state loads; a UserWarning says
    the key is dropped. New dicts; the caller's are not modified."""
    bad = [i for i, g in enumerate(groups) if isinstance(g, dict) and g.get("layout", "native") != "native"]
    if bad:
        warnings.warn(f"Muon {where}: param group(s) {bad} hold layout "
                      f"{', '.join(sorted({repr(groups[i]['layout']) for i in bad}))}, which Muon never applied (its state is "
                      "native); the key is dropped and the state loads as it is", UserWarning,
                      stacklevel=user_stacklevel())
    return [{k: v for k, v in g.items() if k != "layout"} if i in bad else g for i, g in enumerate(groups)]


def muon_dtype_names(sd: dict) -> dict:
    """torch's state_dict ``sd`` with each group's ``ns_dtype`` saved as its name (torch's packed groups are new
    dicts: the live groups keep the torch.dtype)."""
    for g in sd["param_groups"]:
        if isinstance(g.get("ns_dtype"), torch.dtype):
            g["ns_dtype"] = str(g["ns_dtype"]).removeprefix("torch.")
    return sd


def muon_ns_dtype_named(name: str):
    """A checkpoint's ns_dtype name ("bfloat16", "torch.float32") -> the torch.dtype (an unknown name: ValueError)."""
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"Muon.load_state_dict: ns_dtype {name!r} in a param group is not a torch dtype; nothing "
                         "was loaded")
    return dt
