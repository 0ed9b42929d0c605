"""The ``master`` layout's params edited between steps. The fp32 master in ``state["master"]`` is the truth a step
reads; the bf16/fp16 param is its rounding. A param written outside the optimizer since the last step (a model
checkpoint loaded into the live model, ``p.clamp_()`` or ``p.copy_()`` under no_grad, ``p.data = t``) would be
overwritten by the next step's rounding of the stale master: the edit silently undone (a review found this on
2026-12-06; ``master16`` follows such an edit, since its master is rebuilt from the param). torch.optim, which has no
master, steps from the edited value. So does this: at the start of an eager step, each master-layout param whose
autograd version or memory moved since the last step has every element that no longer equals the rounding of its
master restarted from the param (elements still equal to it keep their master's extra bits).

What it cannot see: an in-place write through ``p.data`` (``p.data.mul_(2)``), which bumps the version counter of
``p.data``'s new tensor object, not ``p``'s; collectives writing params in place (``dist.broadcast(p)``,
``all_reduce``: no version bump); under FSDP2, ``dcp.load`` into ``get_model_state_dict(model)``'s tensors without
the ``set_model_state_dict`` torch's DCP docs call after it (other tensor objects over the params' memory: no
version bump of the params); and any write while the steps are compiled (a step traced by torch.compile neither
checks nor records). Call ``optimizer.sync_masters()`` after such a write. Schedule-free ``eval()`` /
``train()`` check before moving the masters. The first step after ``load_state_dict`` compares every element
(``_repair_stale_masters``, optim/checkpoints.py).
docs/layouts.md, "The master layout and params written outside the optimizer"."""
from __future__ import annotations

import torch

from .. import distributed as _dist
from .. import layouts as _layouts
from .plan_cache import C_CHECKS

__all__ = ["MasterSyncMixin"]


def _marks(vs: list, ps: list) -> tuple[torch.Tensor, list]:
    """([2, n] int64: the params' versions (-1: an inference tensor) and data pointers, the tensors compared). ``vs``
    is ``ps`` for plain tensors. For DTensor params (``vs`` the DTensors, ``ps`` their local shards when the marks
    were last taken) the local shards are read again and a version is the DTensor's plus its shard's: the DTensor's in-place ops (``p.copy_``, ``load_state_dict``) bump the DTensor's
    counter, not the shard's (a review found FSDP2 writes missed), writes through ``p.to_local()`` the shard's."""
    if vs is ps:
        if C_CHECKS is not None:
            return C_CHECKS.version_marks(ps), ps
        return torch.tensor([[-1 if t.is_inference() else t._version for t in ps], [t.data_ptr() for t in ps]],
                            dtype=torch.int64).reshape(2, len(ps)), ps
    locs = [_dist.local(v) for v in vs]
    vers = [-1 if t.is_inference() else v._version + t._version for v, t in zip(vs, locs)]
    return torch.tensor([vers, [t.data_ptr() for t in locs]], dtype=torch.int64).reshape(2, len(locs)), locs


@torch.no_grad()
def _adopt(p: torch.Tensor, m: torch.Tensor, twice: bool = False) -> None:
    """Elements of the param ``p`` (local shard) that are not the rounding of their fp32 master ``m``: the master
    takes the param's value. NaN params stay NaN in the master as well. ``twice`` (after a load: the model may have
    moved between bf16 and fp16 since the master was written): the rounding through the other half dtype counts
    as the master's rounding too, and so does master16's rounding to bf16 (ties away from zero: a master16
    checkpoint's param, which the load into the master layout leaves as it is)."""
    if p.shape != m.shape or p.numel() == 0 or not in_memory(p):
        return
    for pc, mc in _chunks(p, m):
        keep = pc == mc.to(pc.dtype)
        if twice and pc.dtype in (torch.float16, torch.bfloat16):
            other = torch.bfloat16 if pc.dtype == torch.float16 else torch.float16
            keep |= pc == mc.to(other).to(pc.dtype)
            keep |= pc == _layouts.master16_encode(mc)[0].view(mc.shape).to(pc.dtype)
        torch.where(keep, mc, pc.to(torch.float32), out=mc)


def in_memory(t: torch.Tensor) -> bool:
    """Do ``t``'s elements lie within its storage? Not for a param whose memory was freed between steps (an offload:
    ``p.untyped_storage().resize_(0)``, its shape kept): reading it crashed the process (a review, 2026-12-07). Such
    a param is not compared; a step while it is freed records no data pointer, so when its memory comes back the
    next step adopts it (memory back at the old address with no step between: as any write through ``p.data``)."""
    if t.numel() == 0:
        return True
    end = t.storage_offset() + sum((n - 1) * abs(d) for n, d in zip(t.shape, t.stride())) + 1
    return end * t.element_size() <= t.untyped_storage().nbytes()


CHUNK = 1 << 24  # elements per pass of the masters' element checks


def _chunks(*ts: torch.Tensor, chunk: int | None = None):
    """Tensors of one numel (a param and its master, ...) in slices of ``chunk`` (default CHUNK) elements (flat views;
    one slice when one is not contiguous or the tensors are smaller): the checks' temporaries (masks, casts,
    master16's int64 words: up to ~30 bytes an element) stay bounded instead of growing with the largest param (an
    embedding of 5e8 elements: ~15 GB at the first step after a load, on the device)."""
    n, chunk = ts[0].numel(), CHUNK if chunk is None else chunk
    if n <= chunk or not all(t.is_contiguous() for t in ts):
        yield ts
        return
    flat = [t.view(-1) for t in ts]
    for i in range(0, n, chunk):
        yield tuple(f[i:i + chunk] for f in flat)


class MasterSyncMixin:
    """``_note_masters`` (after an eager step), ``_adopt_edited_params`` (before the next one) and the public
    ``sync_masters`` of FusedOptimizer."""

    def _master_pairs(self) -> tuple[list, list, list]:
        """(the params whose versions count: the params themselves, DTensors included; their local shards; their
        masters' local shards) of every master-layout param with a master, in group order (the first list is the
        second when no param is a DTensor); reused while the cached plan of the last step is the same object (its
        checks make sure the params and state tensors are the same)."""
        fast = self.__dict__.get("_fast")
        got = self.__dict__.get("_master_pairs_of")
        if got is not None and fast is not None and got[0] is fast:
            return got[1], got[2], got[3]
        vs, ps, ms = [], [], []
        for g in self.param_groups:
            if not _layouts.get_layout(g.get("layout", "native")).master:
                continue
            for p in g["params"]:
                m = self.state.get(p, {}).get(_layouts.MASTER_KEY)
                if isinstance(m, torch.Tensor):
                    vs.append(p)
                    ps.append(_dist.local(p))
                    ms.append(_dist.local(m))
        if all(v is p for v, p in zip(vs, ps)):
            vs = ps
        self.__dict__["_master_pairs_of"] = (fast, vs, ps, ms)
        return vs, ps, ms

    def _note_masters(self) -> None:
        """After an eager step: the versions and memory of the master-layout params, as the step left them."""
        if not any(_layouts.get_layout(g.get("layout", "native")).master for g in self.param_groups):
            self.__dict__.pop("_master_marks", None)
            return
        vs, ps, _ = self._master_pairs()
        # (the masters are looked up again when a param moved: marks holding them kept a replaced or reloaded
        # state alive until the next step)
        self.__dict__["_master_marks"] = (vs, ps, _marks(vs, ps)[0]) if ps else None

    def _sync_written_params(self) -> None:
        """Before an eager step or a schedule-free eval()/train() (which moves the masters): the check after a load
        (``_repair_stale_masters``), else the adoption of the params written since the last step."""
        adopt_all = self.__dict__.pop("_adopt_all_masters", False)  # (set when unpickled or deep-copied)
        if self.__dict__.pop("_verify_masters", False):
            self._repair_stale_masters()
        elif adopt_all:  # (a copy has no marks: the writes since it was made are found element by element)
            self.sync_masters()
        else:
            self._adopt_edited_params()

    def _adopt_edited_params(self) -> None:
        """Before an eager step (its plan validated, nothing changed yet): the params written since the last step
        restart their masters from the written elements."""
        seen = self.__dict__.get("_master_marks")
        if not seen:
            return
        vs, ps, before = seen
        cur_vs, cur_ps, cur_ms = self._master_pairs()
        if cur_vs is not vs:  # (the master-layout params changed: one replaced in its group, keeping the old one's
            known = {id(v) for v in vs}  # state, or a group added): the params the marks do not know adopt
            for v, p, m in zip(cur_vs, cur_ps, cur_ms):
                if id(v) not in known:
                    _adopt(p, m)
        now, locs = _marks(vs, ps)
        if torch.equal(now, before):
            return
        moved = (now != before).any(dim=0).nonzero().flatten().tolist()
        for i in moved:
            m = self.state.get(vs[i], {}).get(_layouts.MASTER_KEY)
            if isinstance(m, torch.Tensor):  # (a param whose state was dropped since: its new master is its value)
                _adopt(locs[i], _dist.local(m))

    @torch.no_grad()
    def sync_masters(self) -> None:
        """``layout="master"``: every param element that is not the rounding of its fp32 master (a param written
        outside the optimizer) becomes the master's value, so the next step continues from the param, as
        torch.optim would. Steps do this by themselves for params whose autograd version or memory changed
        (``load_state_dict`` of the model, in-place ops under no_grad, ``p.data = t``); call this after a write
        they cannot see: an in-place op on ``p.data``, a collective writing params in place (``dist.broadcast``,
        ``all_reduce``), or any write while the steps are compiled (a traced step neither checks nor records).
        Other layouts: nothing to do (``master16`` rebuilds its master from the param)."""
        self.__dict__.pop("_master_pairs_of", None)  # (the groups as they are now, not as the last step's plan)
        _, ps, ms = self._master_pairs()
        loaded = bool(self.__dict__.get("_verify_masters"))  # (a load since the last step: the params may hold
        for p, m in zip(ps, ms):  # the master rounded otherwise, as the first step's check accepts: master16's
            _adopt(p, m, twice=loaded)  # ties away, or the other half dtype; they kept their masters then)
