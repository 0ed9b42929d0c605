"""Multi-phase rules (contract v2): a step of a rule whose ``spec.phases`` is not empty runs its elementwise
passes (each an ordinary rule with kernels in the backends: one backend call per (device, dtype) per pass) and
its matrix phases (torch ops on [b, *shape] stacks of the tensors of one shape) in order, on the state tensors
the rule declares in ``spec.state_tensors`` (persistent ones in ``optimizer.state``, work buffers made for the
step). Orthogonalized momentum is the case it is designed for: momentum pass, Newton-Schulz on the update,
apply pass (docs/architecture.md, "Contract v2").

DTensor params sharded on dim 0 (FSDP2) or replicated, on one mesh dim with every other one Replicate (HSDP's
(Replicate, Shard(0)) included): the passes run on local shards, the matrix phases on whole matrices, each sent to
an owner rank of the sharding mesh dim (``_sharded_matrix_phase``: one all-to-all each way, every owner computing
at the same time; replicas do the same in their own shard groups). Limits, each refused with a clear error before
anything changes: the native layout only, no complex params or other DTensor placements (a param sharded on two
mesh dims, torch's _StridedShard of tensor parallelism), Shard(0) rows in torch.chunk's split (FSDP2's).
capturable=True: each pass gets its scalars as a float64 [n, k] table computed on the params' device by tensor ops
(a tensor lr is read there, never on the host).

GradScaler: the host protocol (found_inf read once, a skipped step changes nothing) or, under the conditions of
the single-pass rules (optim/amp.py ``_device_amp``: backends that read device scalars, plus: no pass whose pack
reads per-tensor host state, no matrix phase on a persistent tensor), the device protocol: every elementwise pass
gets found_inf and grad_scale, so on found_inf != 0 the momentum pass leaves the state and the apply pass the
params unchanged; the matrix phase between them runs anyway, on the step's work buffers only (their contents are
then garbage, possibly NaN, and nothing reads them: the apply pass skips). State created by the step and host step
counts are rolled back from the AmpRollback record. No host read of found_inf: a capturable step with a GradScaler
can be captured in a CUDA graph."""
from __future__ import annotations

import math
import os

import torch
from torch.autograd.graph import increment_version

from .. import distributed as _dist
from .. import layouts as _layouts
from ..specs import ElementwisePass, MatrixPhase, get_spec

__all__ = ["PhasesMixin"]


class PhasesMixin:
    """``_phase_limits`` (checked by the full plan) and ``_update_phased`` of FusedOptimizer."""

    def _phase_limits(self, gi, group, lay, items) -> None:
        where = f"{type(self).__name__} param group {gi}"
        if lay.name != "native":
            raise ValueError(f"{where}: a multi-phase rule runs with layout='native' only, got {lay.name!r}")
        cls = _dist.dtensor_class()
        meshes: dict = {}  # (id(mesh), dim) -> (size, this rank's index) on that dim (get_local_rank: ~10 us a call)
        for i, p in enumerate(items):
            if p.is_complex():
                raise TypeError(f"{where}: a multi-phase rule does not take complex params (param {i} has dtype "
                                f"{p.dtype})")
            if cls is not None and isinstance(p, cls):
                mesh, pl = p.device_mesh, p.placements
                dims = [d for d, x in enumerate(pl) if not x.is_replicate()]
                if len(dims) > 1 or dims and not (pl[dims[0]].is_shard() and pl[dims[0]].dim == 0):
                    raise NotImplementedError(
                        f"{where}: param {i} is a DTensor with placements {tuple(pl)} on a {mesh.ndim}-D mesh; a "
                        "multi-phase rule takes DTensors sharded on dim 0 (FSDP2's Shard(0)) on at most one mesh "
                        "dim, the others Replicate (FSDP2, HSDP), or replicated")
                if not dims:
                    continue
                info = meshes.get((id(mesh), dims[0]))
                if info is None:
                    info = meshes[(id(mesh), dims[0])] = (mesh.size(dims[0]), mesh.get_local_rank(dims[0]))
                if info[0] > 1:  # (sharded: the rows _sharded_matrix_phase exchanges are torch.chunk's split,
                    want = _dist.row_counts(p.shape[0], info[0])[info[1]]  # as FSDP2's)
                    if p._local_tensor.shape[0] != want:
                        raise NotImplementedError(
                            f"{where}: param {i} is a DTensor of {p.shape[0]} rows whose shard on this rank has "
                            f"{p._local_tensor.shape[0]} rows, expected {want} (torch.chunk's split, as FSDP2's); "
                            "the matrix phase exchanges rows in that split")

    def _update_phased(self, plan, loss, inv_scale: float, amp=None, rollback=None):
        """The step of a multi-phase rule. ``amp``: None (the host protocol ran: ``inv_scale`` is folded into
        the packs), or GradScaler's (found_inf, grad_scale) tensors for the device protocol with its
        ``rollback`` record (optim/amp.py): every elementwise pass gets them, so on found_inf != 0 the passes
        write nothing (the momentum pass leaves the state, the apply pass the params); the matrix phases between
        them run on the step's work buffers only, whatever those hold then (garbage, NaN: nothing reads them
        after a skipped apply pass); state created by this step and host step counts are rolled back by
        ``sync_amp`` when the flag, copied without blocking, turns out nonzero."""
        spec = self.spec
        self._prepare_step(plan, loss, inv_scale)
        flag = {}  # device -> (found_inf, grad_scale) there: one copy per device per step
        for gi, (group, state_names, items, chosen) in enumerate(plan):
            lay = _layouts.get_layout(group["layout"])
            states, fresh = self._init_state(items, state_names, lay, None if rollback is None else rollback.created,
                                             group)
            if rollback is not None and spec.counts_steps:
                rollback.created.extend([(st, "step") for st in states if "step" not in st])
                rollback.stepped.extend(states)
            ts = self._advance_steps(gi, states) if spec.counts_steps else [None] * len(items)
            grad_mult = (-1.0 if group["maximize"] else 1.0) * inv_scale
            memo = self._phase_memo(gi, items)
            work = self._work_buffers(spec, group, memo, states, lay, chosen)
            if amp is not None:
                for device, _ in chosen:
                    if device not in flag:
                        flag[device] = tuple(None if t is None else t.to(device, non_blocking=True) for t in amp)
            for phase in spec.phases:
                if isinstance(phase, ElementwisePass):
                    self._elementwise_pass(phase, group, items, memo, states, fresh, ts, work, chosen, grad_mult,
                                           flag, self.grad_of)
                elif isinstance(phase, MatrixPhase):
                    self._matrix_phase(phase, group, items, work, memo)
                else:
                    raise TypeError(f"{spec.name}: unknown phase {phase!r}")
            if spec.group_advance is not None:
                spec.group_advance(group)
        if rollback:  # (nothing to undo on the host once the state exists: no deferred read at all)
            self._defer_amp_flag(amp[0], rollback)
        return loss

    def _phase_memo(self, gi: int, items: list) -> dict:
        """What the phases of group ``gi`` derive from its params alone (their local shards, which of them are
        sharded, the index lists per (device, dtype), the owners and row splits of the exchange), kept while the
        step's ``items`` is the same list object: the cached plan's (optim/plan_cache.py), whose checks have made
        sure that the params, their local shards and placements are those of the step that filled it. A full
        plan makes a new list: then everything is derived again. Dropped by ``invalidate_caches``."""
        memos = self.__dict__.setdefault("_phase_memos", {})
        got = memos.get(gi)
        if got is not None and got[0] is items:
            return got[1]
        memo = {"locals": _dist.locals_of(items)}
        memos[gi] = (items, memo)
        return memo

    @staticmethod
    def _work_buffers(spec, group, memo, states, lay, chosen) -> list:
        """Per param: its state tensors (a DTensor's: its local shard) and the step's work buffers (non-persistent
        StateTensors, the local shard's shape, ``dtype_for``'s dtype: a ``work_dtype`` may follow the group's
        hyperparameters, so the memo is keyed by its value for each (device, param dtype) of ``chosen``). A work
        buffer a matrix phase transforms is one [b, *shape] buffer per (shape, dtype, device), each param's
        tensor a row of it, so that the phase's stacks are views (no copy in; docs/architecture.md).

        A capturable group keeps its work buffers in ``memo`` (while the cached plan holds): a step captured into a
        CUDA graph then writes the buffers of its eager warm-up steps, whose launch tables the Triton launcher has
        cached (it cannot build new ones during capture). Otherwise they are the step's own (freed after it)."""
        stacked = {ph.tensor for ph in spec.phases if isinstance(ph, MatrixPhase)}
        locs = memo["locals"]
        work = [dict(zip(st, _dist.locals_of(st.values()))) for st in states]
        keep = group["capturable"]
        for t in spec.tensors(group):
            if t.persistent:
                continue
            wkey = None if t.work_dtype is None else tuple(t.work_dtype(dt, dev) for dev, dt in chosen)
            if t.name not in stacked:
                bufs = _buffers(memo, ("work", t.name, lay.name, wkey), keep, lambda: [
                    torch.empty(t.shape_for(loc), dtype=t.dtype_for(loc, lay), device=loc.device) for loc in locs])
                for w, b in zip(work, bufs):
                    w[t.name] = b
                continue
            key = ("rows", t.name, lay.name, wkey)
            rows = memo.get(key)
            if rows is None:
                rows = {}
                for i, loc in enumerate(locs):
                    rows.setdefault((t.shape_for(loc), t.dtype_for(loc, lay), loc.device), []).append(i)
                memo[key] = rows
            kept = _buffers(memo, ("rows_bufs", t.name, lay.name, wkey), keep, lambda: [
                torch.empty((len(idx), *shape), dtype=dtype, device=device)
                for (shape, dtype, device), idx in rows.items()])
            for buf, idx in zip(kept, rows.values()):
                for j, i in enumerate(idx):
                    work[i][t.name] = buf[j]
        return work

    @staticmethod
    def _elementwise_pass(phase, group, items, memo, states, fresh, ts, work, chosen, grad_mult, flag=None,
                          grad_of=None) -> None:
        """One backend call per (device, dtype) of the pass ``phase`` on the local shards (or, with
        ``phase.param_slot``, on that state tensor in the param slot), in the dtype layout its tensors have
        (``_pass_layout``); ``flag``: device -> (found_inf, grad_scale) under GradScaler's device protocol (the
        kernels skip every write when found_inf != 0), else empty; ``grad_of``: the gradient of a param as the
        backends read it (``ValidationMixin.grad_of``; None: ``.grad``)."""
        ps = get_spec(phase.rule)
        flags = ps.make_flags(group)
        names = ps.state_names(group)
        rows = [(*ps.advance(group, st, f, t), grad_mult) for st, f, t in zip(states, fresh, ts)]
        locs = memo["locals"]
        for (device, dtype), backend in chosen.items():
            idx = memo.get(("idx", device, dtype))
            if idx is None:
                idx = memo["idx", device, dtype] = [i for i, p in enumerate(locs) if p.device == device
                                                    and p.dtype == dtype]
            sel = [rows[i] for i in idx]
            packs = _device_table(sel, device) if group["capturable"] else [ps.Scalars(*r) for r in sel]
            kw = {}
            if flag:
                kw["found_inf"], kw["grad_scale"] = flag[device]
            slot = [locs[i] if phase.param_slot is None else work[i][phase.param_slot] for i in idx]
            sts = [tuple([work[i][n] for n in names]) for i in idx]
            if slot and sts[0]:
                lay = _pass_layout(slot[0].dtype, sts[0][0].dtype, ps.name)
                if lay is not _layouts.NATIVE:
                    kw["layout"] = lay
            grads = [items[i].grad if grad_of is None else grad_of(items[i]) for i in idx]
            backend.apply(ps, flags, slot, _dist.locals_of(grads), sts, packs, **kw)
            if not backend.bumps_versions and phase.param_slot is None:  # (autograd's in-place check)
                increment_version([items[i] for i in idx])

    @staticmethod
    def _matrix_phase(phase, group, items, work, memo) -> None:
        """``phase.fn`` on stacks of the tensors named ``phase.tensor`` that share a shape, dtype and device (at
        most ``phase.max_batch`` and ``phase.max_batch_bytes`` per call), written back in place. Tensors that
        are consecutive rows of one buffer (``_work_buffers``) are passed as a view of it. The tensors of
        DTensor params sharded on dim 0 (FSDP2) are local shards: ``_sharded_matrix_phase`` gathers them. Where the
        phase takes a tensor of 3 or more dims as a stack of matrices (``phase.stacked``: Muon's ``flatten=False``),
        such a tensor is passed as its matrices (views), batched and chunked with the 2-D tensors of their shape,
        and a sharded one is not gathered: its local shard holds whole matrices."""
        stacked = phase.stacked is not None and phase.stacked(group)
        split = memo.get(("sharded", stacked))
        if split is None:
            flags = [_dist.shard_dim(p) is not None and not (stacked and p.dim() > 2) for p in items]
            split = memo[("sharded", stacked)] = ([i for i, f in enumerate(flags) if f],
                                                  [i for i, f in enumerate(flags) if not f])
        if split[0]:
            _sharded_matrix_phase(phase, group, [(items[i], work[i][phase.tensor]) for i in split[0]], memo,
                                  ("exchange", phase.tensor, stacked))  # (its pairs depend on the flag)
        plain = [work[i][phase.tensor] for i in split[1]]
        if stacked:
            plain = [m for t in plain for m in (_matrices(t) if t.dim() > 2 else (t,))]
        by_shape: dict = {}
        for t in plain:
            by_shape.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
        for ts in by_shape.values():
            size = _chunk_size(phase, len(ts), ts[0].numel() * ts[0].element_size(), ts[0].device.type)
            for i in range(0, len(ts), size):
                chunk = ts[i:i + size]
                batch = _rows_view(chunk)
                if batch is None:
                    batch = torch.stack(chunk)
                    out = phase.fn(group, batch)
                    for t, o in zip(chunk, out.unbind(0)):
                        t.copy_(o)
                    continue
                out = phase.fn(group, batch)
                if out is not batch:
                    batch.copy_(out)


def _matrices(t: torch.Tensor) -> tuple:
    """The (shape[-2], shape[-1]) matrices of ``t``, one per index of its leading dims: views (a work buffer is
    contiguous), so that the phase's results written into them land in ``t``."""
    return t.view(math.prod(t.shape[:-2]), *t.shape[-2:]).unbind(0)


def _pass_layout(slot_dtype: torch.dtype, state_dtype: torch.dtype, rule: str):
    """The dtype layout of an elementwise pass whose param slot holds ``slot_dtype`` and whose states
    ``state_dtype`` (every state of a pass has one dtype: the work buffers' ``work_dtype`` and the persistent
    states' follow the same param): native, or bf16_state for fp32 with bf16 states."""
    if state_dtype == slot_dtype:
        return _layouts.NATIVE
    if slot_dtype == torch.float32 and state_dtype == torch.bfloat16:
        return _layouts.get_layout("bf16_state")
    raise TypeError(f"pass {rule!r}: no dtype layout has {slot_dtype} in the param slot with {state_dtype} states")


def _buffers(memo, key, keep: bool, make) -> list:
    """``make()``'s buffers, kept in ``memo`` under ``key`` when ``keep`` (a capturable group), else new ones.
    Keeping new ones drops those kept for the same buffers in another work dtype (``key[-1]``: the group's
    ns_dtype changed), so that a group never holds two sets."""
    bufs = memo.get(key) if keep else None
    if bufs is None:
        bufs = make()
        if keep:
            for old in [k for k in memo if isinstance(k, tuple) and k[:-1] == key[:-1] and k != key]:
                del memo[old]
            memo[key] = bufs
    return bufs


def _device_table(rows, device) -> torch.Tensor:
    """capturable=True: the packs ``rows`` (one tuple of floats and 0-d tensors per tensor) as one float64 [n, k]
    table made on ``device`` by fill and stack kernels: no host read of a tensor value, no host-to-device copy."""
    n = len(rows)
    cols = []
    for vals in zip(*rows):
        if not any(isinstance(v, torch.Tensor) for v in vals) and len(set(vals)) == 1:
            cols.append(torch.full((n,), float(vals[0]), dtype=torch.float64, device=device))
        else:
            cols.append(torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                                     else torch.full((), float(v), dtype=torch.float64, device=device) for v in vals]))
    return torch.stack(cols, 1)


def _rows_view(ts):
    """A [len(ts), *shape] view when ``ts`` are consecutive rows of one contiguous buffer, else None."""
    first = ts[0]
    base = first._base
    if base is None or not base.is_contiguous() or not first.is_contiguous():
        return None
    n = first.numel()
    off = first.storage_offset()
    for j, t in enumerate(ts):
        if t._base is not base or t.storage_offset() != off + j * n or not t.is_contiguous():
            return None
    return base.view(-1)[off - base.storage_offset():off - base.storage_offset() + len(ts) * n].view(len(ts), *first.shape)



def _chunk_size(phase, n: int, nbytes: int, device_type: str) -> int:
    """Matrices per call of ``phase`` for ``n`` matrices of ``nbytes`` bytes each on a ``device_type`` device."""
    size = n if phase.max_batch is None else phase.max_batch
    for bound in (phase.max_batch_bytes, phase.cpu_batch_bytes if device_type == "cpu" else None):
        if bound is not None:
            size = min(size, max(1, bound // max(1, nbytes)))
    return max(1, size)


def _wire_dtype(phase, group, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which ``_sharded_matrix_phase`` moves tensors of ``dtype``: the phase's ``compute_dtype``
    where it is narrower (fewer bytes: bf16 Newton-Schulz on fp32 updates), else ``dtype``. The same result as
    sending ``dtype``: ``fn`` would round its input to ``compute_dtype`` first thing (rounding is elementwise,
    so rounding each shard before it is sent gives the same bits), and its result is in ``compute_dtype``,
    which the copy into the tensor on the way back widens exactly."""
    if phase.compute_dtype is None:
        return dtype
    want = phase.compute_dtype(group, device)
    if want.is_floating_point and dtype.is_floating_point and want.itemsize < dtype.itemsize:
        return want
    return dtype


# The exchange of a sharded matrix phase runs in rounds when there is enough to overlap: round r holds the r-th NS
# call of every owner (consecutive positions merged until a round moves ROUND_ELEMS elements), each round with its
# own all-to-all each way, asynchronous, so that the next rounds' rows travel while an owner computes. A small
# model is one round: 2 collectives a step, as before. The environment sets it (MOMENTUM_FUSED_NS_ROUND_ELEMS: 1
# makes every NS call a round; 0, one round whatever the size).
def _round_elems(default: int = 8 << 20) -> int:
    """MOMENTUM_FUSED_NS_ROUND_ELEMS: an int >= 0, with an optional K, M or G (x 2^10, 2^20, 2^30: "8M" is the
    default); unset or empty: the default. Another value warns and keeps the default (it tunes the overlap only:
    the exchange's results are the same for every value), instead of failing ``import momentum_fused``."""
    raw = os.environ.get("MOMENTUM_FUSED_NS_ROUND_ELEMS", "").strip()
    if not raw:
        return default
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1].upper(), 1)
    try:
        value = int(raw[:-1] if mult > 1 else raw) * mult
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        import warnings
        warnings.warn(f"momentum_fused: MOMENTUM_FUSED_NS_ROUND_ELEMS={raw!r} is not an int >= 0 (optionally with "
                      f"K, M or G); using the default {default >> 20}M", RuntimeWarning, stacklevel=2)
        return default


ROUND_ELEMS = _round_elems()


def _exchange_layout(prs, mesh, dim: int, phase, itemsize: int) -> dict:
    """The exchange of ``_sharded_matrix_phase`` for the (DTensor param, local tensor) pairs ``prs`` sharded over
    ``mesh``'s dim ``dim`` (its process group: the ranks that hold this rank's replica's shards):
    owners (largest first to the least loaded rank, ties to the lowest rank: the same on every rank), each owner's
    NS calls (its matrices by global shape, in param order, chunked by ``_chunk_size`` on ``itemsize`` bytes per
    element), the rounds (``ROUND_ELEMS``), and per round the send and receive order and splits. It depends on the
    params' shapes and the mesh only."""
    world, me = mesh.size(dim), mesh.get_local_rank(dim)
    load = [0] * world
    owner = [0] * len(prs)
    for i in sorted(range(len(prs)), key=lambda i: -prs[i][0].numel()):
        o = min(range(world), key=lambda r: (load[r], r))
        owner[i] = o
        load[o] += prs[i][0].numel()
    batches = [{} for _ in range(world)]
    for i, (p, _) in enumerate(prs):
        batches[owner[i]].setdefault(tuple(p.shape), []).append(i)
    calls = []  # per owner: its NS calls, (shape, matrix indices)
    for o in range(world):
        cs = []
        for shape, idx in batches[o].items():
            size = _chunk_size(phase, len(idx), prs[idx[0]][0].numel() * itemsize, prs[idx[0]][1].device.type)
            cs.extend((shape, idx[j:j + size]) for j in range(0, len(idx), size))
        calls.append(cs)
    positions = max(map(len, calls), default=0)
    rounds, cur, elems = [], [], 0
    for q in range(positions):
        cur.append(q)
        elems += sum(prs[i][0].numel() for cs in calls if q < len(cs) for i in cs[q][1])
        if ROUND_ELEMS and elems >= ROUND_ELEMS and q < positions - 1:
            rounds.append(cur)
            cur, elems = [], 0
    if cur or not rounds:
        rounds.append(cur)
    counts = [_dist.row_counts(p.shape[0], world) for p, _ in prs]
    row = [p.numel() // p.shape[0] if p.shape[0] else 0 for p, _ in prs]
    out = []
    for qs in rounds:
        of = [[calls[o][q] for q in qs if q < len(calls[o])] for o in range(world)]  # per owner: its calls
        order = [i for o in range(world) for _, idx in of[o] for i in idx]  # send and receive order
        mine = [i for _, idx in of[me] for i in idx]
        out.append(dict(calls=of[me], order=order,
                        send_splits=[sum(counts[i][me] * row[i] for _, idx in of[o] for i in idx) for o in range(world)],
                        recv_splits=[sum(counts[i][r] * row[i] for i in mine) for r in range(world)],
                        back_splits=[counts[i][me] * row[i] for i in order]))
    return dict(pg=mesh.get_group(dim), world=world, me=me, counts=counts, row=row, rounds=out)


def _sharded_matrix_phase(phase, group, pairs, memo, key) -> None:
    """The matrix phase for (DTensor param, local shard of its work tensor) pairs sharded on dim 0 (FSDP2), per
    (mesh, sharding mesh dim, dtype): HSDP's replicas each exchange in their own shard group (the same computation
    in every replica). Each matrix gets an owner rank (round-robin by size: largest first, to the least loaded rank;
    the same on every rank, the params of a group being the same everywhere). Then, per round
    (``_exchange_layout``; one round unless the matrices are large):

    1. the way in, ONE ``all_to_all_single``: every rank sends each owner its rows of the matrices that owner
       computes in this round (one flat buffer, the owners' segments in rank order, no padding) and receives the
       rows of its own;
    2. every owner assembles its matrices, batched by shape (one ``torch.cat`` per NS call: the ranks' row blocks
       side by side), and runs ``phase.fn`` on them: all owners at the same time;
    3. the way back, ONE ``all_to_all_single``: each owner sends every rank its rows of the results, which are
       copied into the local shards (one ``torch._foreach_copy_``).

    With several rounds every way in is issued first, asynchronously, and each way back as soon as its round is
    computed: round r's Newton-Schulz runs while the rows of the later rounds (and the results of the earlier ones)
    travel. One round: 2 collectives per (mesh, shard mesh dim, dtype) per step, whatever the world size. The
    collectives carry ``_wire_dtype`` (bf16 for bf16 Newton-Schulz on fp32 updates: half the bytes, the same bits).
    An owner's NS calls are its matrices of one shape, in param order, chunked by ``_chunk_size`` on the bytes of
    the tensors' dtype (as for unsharded params), whatever the rounds; tests/test_distributed.py checks the results
    equal a single process's bit for bit, in one round and in one per call. Shard rows are torch.chunk's split
    (checked by the plan, ``PhasesMixin._phase_limits``). ``memo``: the group's ``PhasesMixin._phase_memo``, which keeps
    the grouping by mesh and the ``_exchange_layout``s under ``key``, which names the set of ``pairs`` (it
    changes with ``MatrixPhase.stacked``: a layout kept for another set would exchange the wrong rows)."""
    import torch.distributed as dist

    groups = memo.get(key)
    if groups is None:
        by_mesh: dict = {}
        for j, (p, t) in enumerate(pairs):  # (by dtype too: one send buffer holds one dtype, as the stacks do)
            by_mesh.setdefault((p.device_mesh, _dist.shard_dim(p), t.dtype), []).append(j)
        groups = memo[key] = [(mesh, dtype, idx, _exchange_layout([pairs[j] for j in idx], mesh, dim, phase,
                                                                   dtype.itemsize))
                              for (mesh, dim, dtype), idx in by_mesh.items()]
    for mesh, dtype, idx, lay in groups:
        prs = [pairs[j] for j in idx]
        pg, world, counts, row, rounds = (lay[k] for k in ("pg", "world", "counts", "row", "rounds"))
        device = prs[0][1].device
        wire = _wire_dtype(phase, group, dtype, device)
        overlap = len(rounds) > 1
        # 1. the ways in, all issued first (cat rounds to the wire dtype as it copies: the bits of a .to(wire))
        ins = []
        for rl in rounds:
            send = torch.empty(sum(rl["send_splits"]), dtype=wire, device=device)
            if rl["order"]:
                torch.cat([prs[i][1].reshape(-1) for i in rl["order"]], out=send)
            recv = torch.empty(sum(rl["recv_splits"]), dtype=wire, device=device)
            work = dist.all_to_all_single(recv, send, rl["recv_splits"], rl["send_splits"], group=pg,
                                          async_op=overlap)
            ins.append((recv, send, work))
        outs = []
        for rl, (recv, send, work) in zip(rounds, ins):
            if work is not None:
                work.wait()
            # 2. the owner's NS calls of this round
            segs = recv.split(rl["recv_splits"])
            at = [0] * world
            back = []  # per NS call: its results as [b, rows, row], and the rows per rank
            for shape, ids in rl["calls"]:
                k, c, n = len(ids), counts[ids[0]], row[ids[0]]
                parts = []
                for r in range(world):
                    parts.append(segs[r][at[r]:at[r] + k * c[r] * n].view(k, c[r], n))
                    at[r] += k * c[r] * n
                full = torch.cat(parts, 1).view(k, *shape)
                back.append((phase.fn(group, full).reshape(k, shape[0], n), c))  # (k: also for 0 elements)
            # 3. the way back: to each rank its rows of every result, in the order it sent them
            back_send = torch.empty(sum(rl["recv_splits"]), dtype=wire, device=device)
            if back:
                torch.cat([out[:, sum(c[:r]):sum(c[:r]) + c[r]].reshape(-1) for r in range(world) for out, c in back],
                          out=back_send)
            back_recv = torch.empty(sum(rl["send_splits"]), dtype=wire, device=device)
            work = dist.all_to_all_single(back_recv, back_send, rl["send_splits"], rl["recv_splits"], group=pg,
                                          async_op=overlap)
            outs.append((rl, back_recv, back_send, work))
        for rl, back_recv, _, work in outs:
            if work is not None:
                work.wait()
            if rl["order"]:
                dst = [prs[i][1] for i in rl["order"]]
                torch._foreach_copy_(dst, [x.view(t.shape)
                                           for x, t in zip(back_recv.split(rl["back_splits"]), dst)])
