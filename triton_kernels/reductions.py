"""Multi-tensor global reductions in one launch each (for the schedule-free Polyak step):
``dot(a_list, b_list)`` = sum_i <a_i, b_i> and ``sum_sq(a_list)`` = sum_i ||a_i||^2.

Same block plan and pointer table as the update kernels (launcher.tables). Each program reduces its
block in fp32 and writes one fp32 partial; the partials are summed in float64 by torch (deterministic,
no atomics). The result is a 0-d float64 tensor on the tensors' device (no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launcher
from .kernels import full_block, load_fp32, locate


@triton.jit
def _reduce_body(ptr_tab, n_tensors, t, idx, mask, SQUARE: tl.constexpr, DTYPE: tl.constexpr):
    a = load_fp32(ptr_tab, 0, n_tensors, t, idx, mask, DTYPE)
    if SQUARE:
        prod = a * a
    else:
        prod = a * load_fp32(ptr_tab, 1, n_tensors, t, idx, mask, DTYPE)
    return tl.sum(tl.where(mask, prod, 0.0), axis=0)


@triton.jit
def reduce_kernel(ptr_tab, n_tensors, prog_tab, seg_tab, n_seg, out_ptr,
                  SQUARE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s0 = tl.load(prog_tab + pid)
    s1 = tl.load(prog_tab + pid + 1)
    if s1 - s0 == 1:
        t1, idx1, mask1 = full_block(seg_tab, n_seg, s0, BLOCK)
        acc = _reduce_body(ptr_tab, n_tensors, t1, idx1, mask1, SQUARE, DTYPE)
    else:
        t2, idx2, mask2 = locate(seg_tab, n_seg, s0, s1, BLOCK)
        acc = _reduce_body(ptr_tab, n_tensors, t2, idx2, mask2, SQUARE, DTYPE)
    tl.store(out_ptr + pid, acc)


def _reduce(lists, square: bool, block: int) -> torch.Tensor:
    if len(lists[0]) == 0:
        return torch.zeros((), dtype=torch.float64)
    launcher._check_lists(lists)
    ref = lists[0][0]
    ptr_tab, prog_tab, seg_tab, n_prog, n_seg = launcher.tables(lists, block, grad_list=None)
    if n_prog == 0:
        return torch.zeros((), dtype=torch.float64, device=ref.device)
    partial = torch.empty(n_prog, dtype=torch.float32, device=ref.device)
    reduce_kernel[(n_prog,)](ptr_tab, len(lists[0]), prog_tab, seg_tab, n_seg, partial,
                             SQUARE=square, DTYPE=launcher.DTYPE_CODES[ref.dtype], BLOCK=block)
    launcher._count_launch()
    return partial.double().sum()


def dot(a_list, b_list, *, block: int = launcher.BLOCK) -> torch.Tensor:
    """sum_i <a_i, b_i> over all tensors, one launch."""
    a_list, b_list = list(a_list), list(b_list)
    if len(a_list) != len(b_list):
        raise ValueError(f"dot needs lists of equal length, got {len(a_list)} and {len(b_list)}")
    return _reduce([a_list, b_list], False, block)


def sum_sq(a_list, *, block: int = launcher.BLOCK) -> torch.Tensor:
    """sum_i ||a_i||^2 over all tensors, one launch."""
    return _reduce([list(a_list)], True, block)
