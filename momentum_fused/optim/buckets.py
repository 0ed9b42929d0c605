"""The buckets of a step (optim/base.py ``_update``): one backend call per (backend, device, dtype, flags, layout,
capturable), across all param groups, and their launch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import increment_version

from .. import distributed as _dist
from .compile import bucket_op

__all__ = ["Bucket", "launch"]


@dataclass
class Bucket:
    """The tensors of one backend call: one (backend, device, dtype, flags, layout, capturable) of a step."""
    backend: Any
    layout: Any
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    states: list = field(default_factory=list)   # one tuple of state tensors per param
    scalars: list = field(default_factory=list)  # one pack per param (capturable: [n, k] device tables)
    sr_keys: list = field(default_factory=list)  # bf16_sr: one rounding key per param


def launch(buckets: dict, amp, traced: bool, spec, started: list) -> None:
    """One backend call per bucket, each appended to ``started`` once it has returned."""
    for (_, device, _, flags, _, cap), b in buckets.items():
        scs = b.scalars
        if cap:
            scs = scs[0] if len(scs) == 1 else torch.cat(scs)
        kw = {}
        if b.layout.name != "native":
            kw.update(layout=b.layout, sr_keys=b.sr_keys if b.layout.stochastic else None)
        if amp is not None:  # device-side GradScaler scalars (no host read)
            found_inf, grad_scale = amp
            kw.update(found_inf=found_inf.to(device, non_blocking=True),
                      grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True))
        if traced:  # one opaque op in the graph (it runs backend.apply)
            bucket_op(b.backend, spec, flags, b.params, b.grads, b.states, scs, **kw)
        else:  # DTensors: their local shards
            b.backend.apply(spec, flags, *_dist.local_bucket(b.params, b.grads, b.states), scs, **kw)
            if not b.backend.bumps_versions:  # (kernels that write memory: autograd's in-place check)
                increment_version(b.params)
        started.append(b)
