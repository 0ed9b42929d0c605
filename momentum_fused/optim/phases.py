"""Multi-phase rules (contract v2): a step of a rule whose ``spec.phases`` is not empty runs its elementwise
passes (each an ordinary rule with kernels in the backends: one backend call per (device, dtype) per pass) and
its matrix phases (torch ops on [b, *shape] stacks of the tensors of one shape) in order, on the state tensors
the rule declares in ``spec.state_tensors`` (persistent ones in ``optimizer.state``, work buffers made for the
step). Orthogonalized momentum is the case it is designed for: momentum pass, Newton-Schulz on the update,
apply pass (docs/architecture.md, "Contract v2").

Limits of this first version, each refused with a clear error before anything changes: the native layout only,
no capturable=True, no complex or DTensor params; GradScaler runs its host protocol (one read of found_inf)."""
from __future__ import annotations

import torch

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
        for p in items:
            if p.is_complex() or (cls is not None and isinstance(p, cls)):
                raise TypeError(f"{where}: a multi-phase rule does not take complex or DTensor params yet "
                                f"(got a {type(p).__name__} of dtype {p.dtype})")

    def _update_phased(self, plan, loss, inv_scale: float):
        spec = self.spec
        self._prepare_step(plan, loss, inv_scale)
        for gi, (group, state_names, items, chosen) in enumerate(plan):
            lay = _layouts.get_layout(group["layout"])
            states, fresh = self._init_state(items, state_names, lay, None, group)
            ts = self._advance_steps(gi, states) if spec.counts_steps else [None] * len(items)
            grad_mult = (-1.0 if group["maximize"] else 1.0) * inv_scale
            scratch = [t for t in spec.tensors(group) if not t.persistent]
            work = []
            for p, st in zip(items, states):
                w = dict(st)
                for t in scratch:
                    w[t.name] = torch.empty(t.shape_for(p), dtype=t.dtype_for(p, lay), device=p.device)
                work.append(w)
            for phase in spec.phases:
                if isinstance(phase, ElementwisePass):
                    self._elementwise_pass(get_spec(phase.rule), group, items, states, fresh, ts, work, chosen,
                                           grad_mult)
                elif isinstance(phase, MatrixPhase):
                    self._matrix_phase(phase, group, work)
                else:
                    raise TypeError(f"{spec.name}: unknown phase {phase!r}")
            if spec.group_advance is not None:
                spec.group_advance(group)
        return loss

    @staticmethod
    def _elementwise_pass(ps, group, items, states, fresh, ts, work, chosen, grad_mult) -> None:
        flags = ps.make_flags(group)
        names = ps.state_names(group)
        packs = [ps.Scalars(*ps.advance(group, st, f, t), grad_mult) for st, f, t in zip(states, fresh, ts)]
        for (device, dtype), backend in chosen.items():
            idx = [i for i, p in enumerate(items) if p.device == device and p.dtype == dtype]
            backend.apply(ps, flags, [items[i] for i in idx], [items[i].grad for i in idx],
                          [tuple([work[i][n] for n in names]) for i in idx], [packs[i] for i in idx])

    @staticmethod
    def _matrix_phase(phase, group, work) -> None:
        """``phase.fn`` on stacks of the tensors named ``phase.tensor`` that share a shape, dtype and device
        (at most ``phase.max_batch`` per call), written back in place."""
        by_shape: dict = {}
        for w in work:
            t = w[phase.tensor]
            by_shape.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
        for ts in by_shape.values():
            size = len(ts) if phase.max_batch is None else phase.max_batch
            for i in range(0, len(ts), size):
                chunk = ts[i:i + size]
                out = phase.fn(group, torch.stack(chunk))
                for t, o in zip(chunk, out.unbind(0)):
                    t.copy_(o)
