"""Contract v2's parts of an update rule's spec (docs/architecture.md): its state tensors of their own shape and
dtype (``StateTensor``), the phases of a multi-phase rule (``ElementwisePass``, ``MatrixPhase``), and what a
kernel rule's math reads and writes (``Traffic``). ``momentum_fused.specs`` re-exports them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

__all__ = ["StateTensor", "ElementwisePass", "MatrixPhase", "Traffic"]


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of a rule.

    name:       its key in ``optimizer.state[p]`` (and in the tuple a backend receives, in declaration order).
    shape:      param -> shape; None: the param's shape (an elementwise state).
    dtype:      a fixed dtype (e.g. torch.int8 codes, torch.float32 block scales); None: the dtype layout's
                state dtype for the param (the param dtype under the native layout).
    persistent: False for a work buffer of one step (an update passed between phases): created by the
                optimizer for the step, never in ``state`` or the state_dict.
    work_dtype: a work buffer's dtype as a function (param dtype, device) -> dtype (Muon's update: bf16 when
                the Newton-Schulz phase computes in bf16 anyway); None: ``dtype``'s rule.
    """
    name: str
    shape: Callable[[torch.Tensor], tuple] | None = None
    dtype: torch.dtype | None = None
    persistent: bool = True
    work_dtype: Callable[[torch.dtype, torch.device], torch.dtype] | None = None

    def shape_for(self, p: torch.Tensor) -> tuple:
        return tuple(p.shape) if self.shape is None else tuple(self.shape(p))

    def dtype_for(self, p: torch.Tensor, layout) -> torch.dtype:
        if self.work_dtype is not None:
            return self.work_dtype(p.dtype, p.device)
        if self.dtype is not None:
            return self.dtype
        return p.dtype if layout.name == "native" else layout.state_dtype_for(p.dtype)


@dataclass(frozen=True)
class ElementwisePass:
    """A phase of a multi-phase rule: the elementwise rule ``rule`` (a registered spec with kernels in the
    backends) over every tensor of the group; its ``state_names`` name tensors of the main rule's
    ``state_tensors`` (persistent or work buffers). Its packs come from its own ``advance`` with the main
    rule's step count.

    ``param_slot``: None (the kernels get the params), or the name of a state tensor the pass updates in the
    kernels' param slot, for a pass that does not touch the param (Muon's momentum pass: the momentum buffer
    there, the update its one state). The pass's dtype layout follows from the tensors: "native" when its
    states have the slot's dtype, "bf16_state" for an fp32 slot with bf16 states (optim/phases.py)."""
    rule: str
    param_slot: str | None = None


@dataclass(frozen=True)
class MatrixPhase:
    """A phase between elementwise passes: ``fn(group, batch)`` transforms a [b, *shape] stack of the
    state tensor ``tensor`` of b params of one shape (and device, dtype) and returns the result, which
    is written back. The optimizer batches the group's tensors by shape, at most ``max_batch`` (None:
    all) matrices per call and at most ``max_batch_bytes`` bytes of stack per call (None: no bound; one matrix
    per call at least), and on CPU tensors at most ``cpu_batch_bytes`` too (a cache-sized bound: a chain of
    products over a stack that outgrows the caches runs slower than over one that stays in them); ``fn`` uses
    torch ops (cuBLAS on CUDA through torch). When ``tensor`` is a work buffer
    (a non-persistent StateTensor), the optimizer allocates it as one [b, *shape] buffer per shape, the
    tensors of the params being its rows: the stacks are then views of it (no copy in), and ``fn`` may
    return its batch itself (transformed in place: no copy back).

    ``compute_dtype`` (optional): (group, device) -> the dtype ``fn`` computes in on that device, a promise
    that ``fn`` converts its batch to it (``.to``, elementwise) as its first op and returns its result in it.
    The FSDP2 path, which moves the stacks between ranks (optim/phases.py, ``_sharded_matrix_phase``), then
    sends them in that dtype where it is narrower than the tensor's: the same rounding done before the
    collective instead of after it, so the same result for fewer bytes.

    ``stacked`` (optional): group -> whether ``fn`` takes a tensor of 3 or more dims as a stack of (shape[-2],
    shape[-1]) matrices, one per index of its leading dims. The optimizer then passes such a tensor as those
    matrices, batched (and chunked) with the 2-D tensors of their shape, and a DTensor sharded on dim 0 (whose
    local shard holds whole matrices) as its local shard's matrices, with no exchange."""
    name: str
    tensor: str
    fn: Callable[[Mapping, torch.Tensor], torch.Tensor]
    max_batch: int | None = None
    max_batch_bytes: int | None = None
    cpu_batch_bytes: int | None = None
    compute_dtype: Callable[[Mapping, torch.device], torch.dtype] | None = None
    stacked: Callable[[Mapping], bool] | None = None


@dataclass(frozen=True)
class Traffic:
    """What a kernel rule's math reads and writes per element (bit j of the masks: state j). A kernel loop may
    skip the loads and stores the rule does not need; one that does not skip them is still correct (it stores
    back what it loaded). Written into csrc/generated/tables.h (``RuleTraffic``) for the C++ loops;
    triton_kernels/rules.py makes it the kernels' per-rule constant ``WRITES``. Default: everything read and
    written."""
    reads_param: bool = True
    writes_param: bool = True
    reads_grad: bool = True
    states_read: int = 0b111
    states_written: int = 0b111
