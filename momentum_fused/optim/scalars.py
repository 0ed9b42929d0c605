"""Per-step scalars of FusedOptimizer: the host step counters (views of one tensor per group, advanced by one
vector op), NAdam's per-tensor ``mu_product`` the same way, the scalar packs of the rules on the host, and for
``capturable=True`` the step counters and the [n, k] scalar table on the params' device (no host read)."""
from __future__ import annotations

import operator
from itertools import repeat

import torch

from .. import distributed as _dist
from .. import layouts as _layouts
from ..specs import ElementwisePass, MatrixPhase, get_spec, step_tensor
from .plan_cache import C_CHECKS

__all__ = ["ScalarsMixin"]


def _same_entries_py(dicts: list, key, objs: list) -> bool:
    """Whether ``dicts`` is a list or tuple with ``dicts[i].get(key) is objs[i]`` for every i (False when an
    entry is not a dict). The C version (``_C_cpu.same_entries``) is used when the extension is built."""
    if not isinstance(dicts, (list, tuple)):
        return False
    try:
        return len(dicts) == len(objs) and all(map(operator.is_, map(dict.get, dicts, repeat(key)), objs))
    except TypeError:  # an entry that is not a dict
        return False


_same_entries = _same_entries_py if C_CHECKS is None else C_CHECKS.same_entries


def _host_scalar(state: dict, key: str, initial: float) -> torch.Tensor:
    """``state[key]`` as a float64 0-d CPU tensor (``initial`` when missing; a number or a tensor of another
    dtype, e.g. a float32 ``mu_product`` from a torch.optim checkpoint, is widened once)."""
    v = state.get(key)
    if isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.dim() == 0 and v.device.type == "cpu":
        return v
    return torch.tensor(initial if v is None else float(v), dtype=torch.float64)


def group_sr_keys(gi: int, group: dict, items: list) -> list:
    """The stochastic rounding's key of each of ``items`` (the group's params with gradients, in its order) at the
    group's ``sr_step``: layouts.sr_key of (the group's sr_seed, sr_step, (gi << 20) + the param's position in the
    group, a DTensor shard's offsets), the seed and step hashed once (``sr_step_key``)."""
    params = group["params"]
    if len(items) == len(params):
        pos = range(len(params))
    else:
        where = {id(q): i for i, q in enumerate(params)}
        pos = [where[id(p)] for p in items]
    sk, base = _layouts.sr_step_key(group["sr_seed"], group["sr_step"]), gi << 20
    if _dist.dtensor_class() is None:
        return [_layouts.sr_tensor_key(sk, base + i) for i in pos]
    return [_layouts.sr_tensor_key(sk, base + i, _dist.shard_offsets(p)) for i, p in zip(pos, items)]


class ScalarsMixin:
    """Host counters and scalar packs of FusedOptimizer."""

    def _keeps_group_counters(self) -> bool:
        """Whether the step computes per-group host numbers (FSGDM's u, schedule-free's c, the Polyak step), or
        runs phases the kernels cannot skip (a pass whose pack reads per-tensor host state, a matrix phase that
        transforms a persistent state tensor): GradScaler's flag is then read on the host. A multi-phase rule
        otherwise takes the device protocol as a single-pass one does (optim/phases.py ``_update_phased``)."""
        if self._host_counters():
            return True
        spec = self.spec
        if not spec.phases:
            return False
        if any(isinstance(ph, ElementwisePass) and get_spec(ph.rule).pack_reads_state for ph in spec.phases):
            return True
        stacked = {ph.tensor for ph in spec.phases if isinstance(ph, MatrixPhase)}
        return any(t.persistent for g in self.param_groups for t in spec.tensors(g) if t.name in stacked)

    def _host_counters(self) -> bool:
        """Whether the step computes per-group host numbers every step (not capturable)."""
        spec = self.spec
        return spec.group_advance is not None or spec.group_prepare is not None or \
            type(self)._prepare_step is not ScalarsMixin._prepare_step

    def _prepare_step(self, plan, loss, inv_scale: float, created=None) -> None:
        """Hook between validation (``_plan``, GradScaler check) and the update pass: everything is
        valid and nothing has been modified yet. Calls ``spec.group_prepare`` once per group (per-group
        host scalars such as the schedule-free c). Subclasses that need a reduction pass over all
        tensors (the schedule-free Polyak step) override it, raising here if the step must not
        happen, and then call ``super()._prepare_step``. State entries created here go to ``created``
        ((state dict, key) pairs: undone if the step's launch fails, or GradScaler skips it on the device)."""
        self._apply_group_prepare([group for group, *_ in plan])

    def _apply_group_prepare(self, groups, overrides=None) -> None:
        """``spec.group_prepare`` of every group (``overrides``: per-group values it reads instead of the
        group's, e.g. this step's Polyak lr), then the results written: all groups or none (it raises
        before the first write)."""
        prep = self.spec.group_prepare
        if prep is None:
            return
        name = type(self).__name__
        updates = []
        for gi, group in enumerate(groups):
            extra = overrides[gi] if overrides else None
            try:
                updates.append({**(extra or {}), **prep({**group, **extra} if extra else group)})
            except (ValueError, OverflowError) as e:
                raise ValueError(f"{name} param group {gi}: {e}") from None
        for group, upd in zip(groups, updates):
            group.update(upd)

    def _advance_steps(self, gi, states, members=None) -> list:
        """Increment every tensor's ``step`` (torch's float32 0-d CPU tensor) and return the new counts.
        ``members``: (the states of the cached plan's members, the positions of ``states`` among them), where only
        some members have gradients (optim/plan_cache.py): their counters are the views of one tensor, advanced
        at those positions only.

        The first time, the group's counters are re-created as views of one 1-D tensor; while the same
        tensors keep stepping together (checked by object identity against the views this cache keeps
        alive, so an id cannot be reused), later steps advance all of them with one add and read them
        with one ``tolist``. Anything else (a different set of params with gradients, a loaded
        state_dict) takes the general path once and re-caches."""
        if not states:
            return []
        if members is not None:
            every, sel = members
            buf = self._host_views(gi, "step", every, step_tensor)
            buf.index_add_(0, torch.tensor(sel), torch.ones(len(sel), dtype=buf.dtype))
            counts = buf.tolist()
            return [counts[i] for i in sel]
        buf = self._host_views(gi, "step", states, step_tensor)
        buf.add_(1.0)
        return buf.tolist()

    def _host_views(self, gi, key, states, current) -> torch.Tensor:
        """A 1-D CPU tensor whose element i is ``states[i][key]``, a 0-d tensor viewing it.

        The first time, ``current(state)`` gives each tensor's value as a 0-d tensor (normalized: created
        when missing) and the states' entries are replaced by views of one stacked tensor; while the same
        tensors keep stepping together (checked by object identity against the views this cache keeps
        alive, so an id cannot be reused), the same tensor is returned, to be advanced in place by one
        vector op. Anything else (a different set of params with gradients, a loaded state_dict) takes the
        general path once and re-caches."""
        cached = self._step_views.get((gi, key))
        if cached is not None:
            buf, views = cached
            if (gi, key) in self._step_attrs.get("views_verified", ()) or _same_entries(states, key, views):
                return buf
        buf = torch.stack([current(st) for st in states])
        views = list(buf.unbind(0))
        for st, v in zip(states, views):
            st[key] = v
        self._step_views[(gi, key)] = (buf, views)
        return buf

    def _pack_state_views(self, gi, states) -> torch.Tensor:
        """``_host_views`` of the per-tensor host state the packs read (``spec.host_state``: NAdam's ``mu_product``),
        float64 0-d tensors (``_host_scalar``)."""
        key, initial = self.spec.host_state
        return self._host_views(gi, key, states, lambda st: _host_scalar(st, key, initial))

    def _group_scalars(self, gi, group, states, fresh, grad_mult, members=None):
        """One scalar pack per tensor. Step counters of the whole group advance together, and tensors
        with equal (step, fresh) share one pack unless the rule's pack reads other per-tensor state.
        ``members``: ``_advance_steps``'s (a per-tensor host state of the packs, NAdam's ``mu_product``, likewise)."""
        spec = self.spec
        ts = self._advance_steps(gi, states, members) if spec.counts_steps else [None] * len(states)
        if spec.pack_reads_state:
            if spec.advance_many is None or not states:
                return [spec.Scalars(*spec.advance(group, st, f, t), grad_mult) for st, f, t in zip(states, fresh, ts)]
            if members is None:
                values = self._pack_state_views(gi, states)
                pks = spec.advance_many(group, values, fresh, ts)
            else:  # (the members' counters are views of one tensor: those with gradients advanced, written back)
                every = self._pack_state_views(gi, members[0])
                at = torch.tensor(members[1])
                values = every.index_select(0, at)
                pks = spec.advance_many(group, values, fresh, ts)
                every.index_copy_(0, at, values)
            ids = list(map(id, pks))  # (equal packs are one tuple: one Scalars object each)
            if ids.count(ids[0]) == len(ids):
                return [spec.Scalars(*pks[0], grad_mult)] * len(ids)
            made = {}
            return [made[i] if i in made else made.setdefault(i, spec.Scalars(*pk, grad_mult)) for i, pk in zip(ids, pks)]
        n = len(states)
        if n and fresh.count(fresh[0]) == n and ts.count(ts[0]) == n:  # the usual case: one pack for all
            return [spec.Scalars(*spec.advance(group, states[0], fresh[0], ts[0]), grad_mult)] * n
        cache, out = {}, []
        for st, f, t in zip(states, fresh, ts):
            sc = cache.get((t, f))
            if sc is None:
                sc = cache[(t, f)] = spec.Scalars(*spec.advance(group, st, f, t), grad_mult)
            out.append(sc)
        return out

    def _counter_snapshots(self, gi, states) -> list:
        """(buffer, copy) of the group's host counters that ``_group_scalars`` is about to advance in place (the
        views of one tensor per counter), when the advance will take that cached buffer; a counter it creates or
        re-stacks is undone through the states' own entries."""
        out = []
        for key in ("step", *(() if self.spec.host_state is None else (self.spec.host_state[0],))):
            cached = self._step_views.get((gi, key))
            # (the buffer the advance will take: _host_views' own test; else it re-stacks, undone per entry)
            if cached is not None and ((gi, key) in self._step_attrs.get("views_verified", ())
                                       or _same_entries(states, key, cached[1])):
                out.append((cached[0], cached[0].clone()))
            else:
                out.append((None, [(st, key, st[key].clone() if isinstance(st.get(key), torch.Tensor) else
                                    st.get(key)) for st in states]))
        return out

    def _undo_host_advance(self, undo_bufs, cap_steps, created, sr_moved, undo_groups=()) -> None:
        """The first backend call of a step raised (a backend that failed at launch: nothing was written): undo
        what the step advanced on the host, so that the failed step changes nothing (docs/conventions.md).
        ``undo_groups``: (group, its dict before the step) of optimizers with per-group host counters."""
        for g, before in undo_groups:
            g.clear()
            g.update(before)
        for buf, before in undo_bufs:
            if buf is not None:
                buf.copy_(before)
                continue
            for st, key, old in before:
                if old is None:
                    st.pop(key, None)
                elif isinstance(st.get(key), torch.Tensor) and isinstance(old, torch.Tensor):
                    st[key].copy_(old)
                else:
                    st[key] = old
        for buf in cap_steps:
            buf.sub_(1.0)
        for st, key in created:
            st.pop(key, None)
        for g in sr_moved:
            g["sr_step"] -= 1
        for p in [p for p, st in self.state.items() if not st]:  # a failed first step created nothing
            del self.state[p]
        self.invalidate_caches()

    def _advance_steps_device(self, gi, states, device) -> torch.Tensor:
        """capturable=True: the group's ``step`` counters are float32 0-d tensors on ``device``, views of one
        [n] tensor that one in-place add advances (captured as one kernel in a CUDA graph). Returns the
        counts as one [n] tensor and the tensors that hold them (to undo a skipped step).
        Traced by torch.compile: the counters are advanced where they are (a new buffer every call would
        fail dynamo's guards on the state's tensor identities and recompile every step)."""
        def on_device(s):  # a step count (None: not started) as the float32 0-d tensor on the device
            return torch.zeros((), dtype=torch.float32, device=device) if s is None else \
                torch.as_tensor(s).detach().to(device=device, dtype=torch.float32).reshape(())

        if torch.compiler.is_compiling():
            steps = []
            for st in states:
                s = st.get("step")
                if not (isinstance(s, torch.Tensor) and s.device == device and s.dtype == torch.float32 and s.dim() == 0):
                    s = st["step"] = on_device(s)
                steps.append(s)
            torch._foreach_add_(steps, 1.0)
            return torch.stack(steps), steps
        cached = self._step_views.get(gi)
        if cached is not None:
            buf, views = cached
            if buf.device == device and _same_entries(states, "step", views):
                buf.add_(1.0)
                return buf, [buf]
        # (first step, or re-planned: may copy counters to the device, never while capturing)
        steps = [on_device(st.get("step")) for st in states]
        buf = torch.stack(steps) + 1.0 if steps else torch.zeros(0, dtype=torch.float32, device=device)
        views = list(buf.unbind(0))
        for st, v in zip(states, views):
            st["step"] = v
        self._step_views[gi] = (buf, views)
        return buf, [buf]

    def _device_scalars(self, gi, group, states, fresh, grad_mult, device, undo: list) -> torch.Tensor:
        """capturable=True: the group's scalar packs as one float64 [n, k] table computed on ``device`` by
        tensor ops, from the same ``spec.advance`` as the host packs (``t`` is the [n] step vector, a tensor
        lr stays a tensor): no host read, no host-to-device copy of a per-step number, so the step can be
        captured in a CUDA graph and replayed with new gradients and an lr updated in place. Constant
        hyperparameters (betas, eps, weight decay) become fill kernels of the graph."""
        spec = self.spec
        n = len(states)
        t = None
        if spec.counts_steps:
            t, holders = self._advance_steps_device(gi, states, device)
            t = t.to(torch.float64)
            undo.extend(holders)
        tables = {}
        for f in sorted(set(fresh)):
            cols = []
            for v in (*spec.advance(group, {}, f, t), grad_mult):
                if isinstance(v, torch.Tensor):
                    cols.append(v.to(device=device, dtype=torch.float64).expand(n))
                elif torch.compiler.is_compiling():  # (a product, not a fill: dynamo keeps a float hyperparameter
                    # that changes between steps a graph input only through ops it can turn into tensor ops, and
                    # torch.full's fill value is not one: each new value recompiled; 1.0 * v is v, exactly)
                    cols.append(torch.ones((n,), dtype=torch.float64, device=device) * v)
                else:
                    cols.append(torch.full((n,), float(v), dtype=torch.float64, device=device))
            tables[f] = torch.stack(cols, 1)
        if len(tables) == 1:
            return tables[fresh[0]]
        # some tensors got their state in this step (never the case in a captured step)
        return torch.where(torch.tensor(fresh, device=device)[:, None], tables[True], tables[False])
