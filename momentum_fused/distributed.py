"""DTensor support (FSDP2 ``torch.distributed.fsdp.fully_shard``, tensor parallelism).

The optimizers keep params, grads and state as the user gave them: state created for a DTensor
param is a DTensor with the same mesh and placements (``torch.zeros_like`` / ``torch.clone`` of the
param, as torch.optim does), so ``get_optimizer_state_dict`` / ``torch.distributed.checkpoint`` see
sharded state exactly as they see torch.optim's. The backends receive the **local shards** only
(:func:`local_bucket`): an elementwise rule on the local shards equals the single-process update,
with no communication and no gathering.

Global reductions are the exception: the schedule-free Polyak inner products sum over local shards
and are then all-reduced over the mesh dimensions on which the tensor is sharded
(:func:`shard_groups`, :func:`all_reduce_sums`); replicated mesh dimensions are not summed twice.

Nothing here imports ``torch.distributed.tensor``: while that module has not been imported by
anyone, no DTensor can exist, and every helper is a no-op.
"""
from __future__ import annotations

import sys

import torch

__all__ = ["dtensor_class", "is_dtensor", "local", "locals_of", "local_bucket", "check_group", "shard_groups",
           "all_reduce_sums"]


def dtensor_class():
    """``torch.distributed.tensor.DTensor`` if that module is loaded, else None (then no DTensor
    exists in this process)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor (a view sharing its storage: writing into it updates the
    DTensor), or ``t`` itself."""
    cls = dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor  # = t.to_local() under no_grad, without the autograd wrapper
    return t


def zeros_like_placed(p, shape: tuple, dtype: torch.dtype):
    """Zeros of ``shape`` and ``dtype`` on ``p``'s device; a DTensor on ``p``'s mesh with ``p``'s placements when ``p`` is
    one (the int8 layouts' block scales of shape (rows, blocks per row) follow the param's row shards)."""
    if is_dtensor(p):
        from torch.distributed.tensor import zeros
        return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
    return torch.zeros(shape, dtype=dtype, device=p.device)


def view_placed(t, fn, shape: tuple):
    """``fn(t)`` for a plain tensor (a view); for a DTensor, a DTensor of global ``shape`` on ``t``'s mesh and
    placements whose local tensor is ``fn`` of ``t``'s (no copy, no communication: ``fn`` keeps dim 0, so the row
    shards stay the same)."""
    if not is_dtensor(t):
        return fn(t)
    from torch.distributed.tensor import DTensor
    stride = tuple(int(x) for x in torch.empty(shape, device="meta").stride())
    return DTensor.from_local(fn(t._local_tensor), t.device_mesh, t.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def placed_like(t, ref):
    """``t`` as a DTensor placed like the DTensor ``ref``: ``t`` itself if it is a DTensor; a plain tensor of
    ``ref``'s global shape (a checkpoint's full tensor, the same on every rank) cut to this rank's shard, without
    communication. ``t`` itself when ``ref`` is not a DTensor."""
    if not is_dtensor(ref) or is_dtensor(t):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.reshape(ref.shape), ref.device_mesh, ref.placements, src_data_rank=None)


def shardwise(fn):
    """``fn`` (an elementwise function of tensors of one shape, returning a tensor or a tuple of tensors of that
    shape) applied shard by shard when an argument is a DTensor: on the local shards, the results wrapped as
    DTensors placed like that argument. A plain argument of the global shape beside it (a checkpoint's full
    tensor, the same on every rank) is cut to its local shard first, without communication. torch's DTensor ops
    are not used: in torch 2.13 ``x << n`` and ``x >> n`` of a DTensor return ``x`` unchanged (pytorch#130671),
    which made the master16 bit codecs write NaNs into sharded params (found 2026-12-06)."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args):
        ref = next((a for a in args if is_dtensor(a)), None)
        if ref is None:
            return fn(*args)
        from torch.distributed.tensor import DTensor
        locs = [placed_like(a, ref)._local_tensor if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*locs)
        wrap = lambda t: DTensor.from_local(t.view(ref._local_tensor.shape), ref.device_mesh, ref.placements,
                                            run_check=False, shape=ref.shape, stride=ref.stride())
        return tuple(map(wrap, out)) if isinstance(out, tuple) else wrap(out)

    return wrapped


_SHARD_OFFSETS: dict = {}


def shard_offsets(t) -> tuple:
    """The global offsets of a DTensor's local shard, one per dim (its first element's position in the global
    tensor; all 0 for a replicated one), or () for a plain tensor. Cached by (mesh, shape, placements): the same
    in a process for every DTensor of that spec."""
    if not is_dtensor(t):
        return ()
    spec = (t.device_mesh, tuple(t.shape), tuple(t.placements))
    off = _SHARD_OFFSETS.get(spec)
    if off is None:
        if len(_SHARD_OFFSETS) > 4096:
            _SHARD_OFFSETS.clear()
        off = _SHARD_OFFSETS[spec] = tuple(int(o) for o in t.__create_chunk_list__()[0].offsets)
    return off


def locals_of(ts) -> list:
    """``[local(t) for t in ts]``, with one lookup of the DTensor class (a list of ``ts`` itself when no DTensor can
    exist)."""
    cls = dtensor_class()
    if cls is None:
        return list(ts)
    return [t._local_tensor if type(t) is cls or (type(t) not in _PLAIN and isinstance(t, cls)) else t for t in ts]


def local_bucket(params, grads, states):
    """A backend bucket with every DTensor replaced by its local shard (identity when no DTensor
    can exist)."""
    cls = dtensor_class()
    # check_group guarantees that grads and state are DTensors exactly where the params are
    if cls is None or set(map(type, params)) <= _PLAIN or not any([isinstance(p, cls) for p in params]):
        return params, grads, states
    return locals_of(params), locals_of(grads), [tuple(locals_of(st)) for st in states]


_PLAIN = {torch.Tensor, torch.nn.Parameter, int, float}


def _layout(t):
    return t.device_mesh, tuple(t.placements)


def check_group(opt_name: str, gi: int, items, state, state_names, grads: bool = True) -> None:
    """Validation for DTensors (called by ``FusedOptimizer._plan`` while nothing has been modified):
    a DTensor param needs a DTensor grad and DTensor state with the same mesh, placements and local
    shape, so that the local shards line up element by element; a plain param needs plain grad and
    state. Partial placements and complex DTensors are rejected. No-op when no DTensor can exist.
    ``grads=False``: params without a gradient (the cached plan's members, optim/checks.py), their state only."""
    cls = dtensor_class()
    if cls is None:
        return
    # the hot path of an unsharded model in a process that imported DTensor: exact type tests (a
    # DTensor isinstance check costs ~1 us through its metaclass)
    types = {type(p) for p in items} | {type(p.grad) for p in items}
    types |= {type(t) for p in items for t in (state.get(p) or {}).values()}
    if types <= _PLAIN:
        return
    for pi, p in enumerate(items):
        g = p.grad
        pd = isinstance(p, cls)
        where = f"{opt_name}: param {pi} of group {gi} (shape {tuple(p.shape)})"
        if not pd:
            if isinstance(g, cls):
                raise TypeError(f"{where}: the param is a plain tensor but its gradient is a DTensor; "
                                "shard the param and its gradient the same way")
            st = state.get(p) or {}
            for k in state_names:
                if isinstance(st.get(k), cls):
                    raise TypeError(f"{where}: state {k!r} is a DTensor but the param is a plain tensor; "
                                    "was a sharded state_dict loaded into an unsharded model?")
            continue
        layout = _layout(p)
        if any(pl.is_partial() for pl in layout[1]):
            raise NotImplementedError(f"{where}: DTensor params with Partial placements {layout[1]} are not "
                                      "supported; redistribute them to Shard or Replicate")
        if p.is_complex():
            raise NotImplementedError(f"{where}: complex DTensor params are not supported")
        pl_shape = p._local_tensor.shape
        if grads and (not isinstance(g, cls) or _layout(g) != layout or g._local_tensor.shape != pl_shape):
            got = (f"a DTensor with placements {tuple(g.placements)} and local shape "
                   f"{tuple(g._local_tensor.shape)}") if isinstance(g, cls) else "a plain tensor"
            raise RuntimeError(f"{where}: the param is a DTensor with placements {layout[1]} and local shape "
                               f"{tuple(pl_shape)} but its gradient is {got}")
        st = state.get(p) or {}
        for k in state_names:
            t = st.get(k)
            if t is None:
                continue
            if not isinstance(t, cls) or _layout(t) != layout or t._local_tensor.shape != pl_shape:
                got = (f"a DTensor with placements {tuple(t.placements)} and local shape "
                       f"{tuple(t._local_tensor.shape)}") if isinstance(t, cls) else "a plain tensor"
                raise ValueError(f"{where}: state {k!r} is {got}, but the param is a DTensor with placements "
                                 f"{layout[1]} and local shape {tuple(pl_shape)}; was a state_dict loaded "
                                 "into differently sharded params?")


def shard_groups(t) -> tuple:
    """The process groups over which a sum of ``t``'s local elements must be all-reduced to give the
    sum over the whole tensor: one per mesh dimension on which ``t`` is sharded (() for a plain
    tensor or a fully replicated DTensor). Every placement that is not Replicate shards: Shard, and also torch's
    _StridedShard (FSDP2 over tensor parallelism), whose ``is_shard()`` is False."""
    cls = dtensor_class()
    if cls is None or not isinstance(t, cls):
        return ()
    mesh = t.device_mesh
    groups = []
    for dim, pl in enumerate(t.placements):
        if pl.is_partial():
            raise NotImplementedError(f"a reduction over a DTensor with Partial placement {pl} is not supported")
        if not pl.is_replicate():
            groups.append(mesh.get_group(dim))
    return tuple(groups)


def shard_dim(p):
    """The mesh dim over which a DTensor is sharded on dim 0 (Shard(0)) over more than one rank, or None: a plain
    tensor, a replicated DTensor, or one sharded over a single rank (each holds the whole tensor locally). For the
    params of a matrix phase (optim/phases.py), which allows one such mesh dim, the others Replicate."""
    if not is_dtensor(p):
        return None
    for d, pl in enumerate(p.placements):
        if pl.is_shard():
            return d if p.device_mesh.size(d) > 1 else None
    return None


def row_counts(rows: int, world: int) -> list:
    """Rows of each rank under Shard(0) (torch.chunk's split: ceil(rows / world) each, the last ones short or
    empty)."""
    step = -(-rows // world) if rows else 0
    return [max(0, min(step, rows - r * step)) for r in range(world)]


def all_reduce_sums(values: torch.Tensor, groups) -> torch.Tensor:
    """Sum ``values`` (a 1-D tensor of partial sums, modified in place) over every group in
    ``groups``; one all-reduce per group. Returns ``values``."""
    if groups:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def zero_among_callers(obj, depth: int = 8):
    """The torch.distributed.optim.ZeroRedundancyOptimizer (or subclass) that may be building the optimizer ``obj``
    over this rank's partition of the params (``obj.__init__`` calls this), or None: the nearest ZeRO among the
    callers of ``obj``'s constructor (its own ``__init__`` chain skipped and not counted; factories and wrapper
    optimizers passed), within ``depth`` other frames, when that frame is ZeRO's ``_init_local_optimizer`` (the
    method that builds its local optimizer; not a step, a hook or a closure ZeRO runs). Only a candidate:
    ``zero_partition`` decides by the params. No import of torch.distributed."""
    f = sys._getframe(1)
    seen = 0
    while seen < depth:
        f = f.f_back
        if f is None:
            return None
        me = f.f_locals.get("self")
        if me is obj:
            continue
        seen += 1
        if any(c.__name__ == "ZeroRedundancyOptimizer" and c.__module__.startswith("torch.distributed.optim")
               for c in type(me).__mro__):
            return me if f.f_code.co_name == "_init_local_optimizer" else None
    return None


def listed_params(params):
    """(``params``, its groups as ``[[tensors], ...]``) for ``zero_partition`` before an optimizer is built, without
    changing what the constructor accepts: a top-level iterable becomes a list (as torch.optim lists it), a group's
    "params" is replaced only when it is an iterator (read here, it would be empty there); sets and other
    collections are read and left as they are (torch refuses a set). A tensor (torch refuses it) has no groups."""
    if isinstance(params, torch.Tensor):
        return params, []
    params = list(params)
    groups = []
    for item in params:
        if isinstance(item, dict):
            ps = item.get("params", [])
            if isinstance(ps, torch.Tensor):
                groups.append([ps])
                continue
            if iter(ps) is ps:
                item["params"] = ps = list(ps)
            groups.append(list(ps))
        else:
            groups.append([item])
    return params, groups


def zero_building(obj, params):
    """(the ZeroRedundancyOptimizer building the optimizer ``obj`` over this rank's partition, or None; ``params`` to
    build it with): ``zero_among_callers`` then ``zero_partition`` on ``listed_params(params)``. ``obj.__init__``
    calls it before building."""
    zero = zero_among_callers(obj)
    if zero is None:
        return None, params
    params, groups = listed_params(params)
    return zero_partition(zero, groups), params


def zero_partition(zero, groups):
    """``zero`` (``zero_among_callers``: not None) when it built the optimizer whose params are ``groups`` (lists of tensors)
    over this rank's partition: every one of them is in the partition, or both are empty; else None (an optimizer
    of other params or of the whole model is not ZeRO's). The partition is ZeRO's ``_partition_parameters()``
    for its ``rank`` (the groups it hands its local optimizer)."""
    mine = [p for g in groups for p in g]
    part = zero._partition_parameters()[zero.rank] if hasattr(zero, "_partition_parameters") else zero.param_groups
    own = {id(p) for g in part for p in g["params"]}
    if not mine:
        return zero if not own else None
    return zero if all(id(p) in own for p in mine) else None


def is_fsdp1_flat(p) -> bool:
    """A param that FSDP1 (``FullyShardedDataParallel``) manages in a world of more than one rank: its flat parameter
    or, with use_orig_params, a view of one rank's part of it (plain tensors: no placement says where the other parts
    are). In a world of one rank the part is the whole. (Under the NO_SHARD strategy the params are whole too, but
    nothing on them says so: they count as parts.)"""
    if not getattr(p, "_fsdp_flattened", False):
        return False
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() > 1
