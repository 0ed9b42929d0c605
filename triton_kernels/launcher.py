"""The multi-tensor launcher. It knows no rule: it takes a kernel family, a rule id, flags, tensor
lists and a per-tensor scalar table, and launches ONE kernel for the whole bucket.

Tables (int64, on the tensors' device):
- pointer table [n_lists, n_tensors] of ``data_ptr()``s (list 0 params, 1 grads, 2.. state);
- block plan: ``prog_tab`` [n_programs + 1] and ``seg_tab`` [4, n_seg] (tensor, offset, lane, length).
  Tensors of >= BLOCK elements get whole blocks of their own (the kernels' fast path); smaller
  tensors and the tails of large ones are packed into shared blocks, at most ``MAX_SEGS`` per block,
  so a tiny tensor never costs a program of its own.
Pointer table and plan are cached, keyed by the device, the storage dtype, BLOCK, the sizes and the
tuple of data_ptr()s of every list but the grads: a table is only reused when every pointer and size
in it is what it would be rebuilt to, so replaced tensors (``p.data = ...``), new param groups or
loaded state can never hit a stale entry. Gradients are usually fresh tensors every step, so the
grads row of a cached table is rewritten in place when it changed. The plan is cached by sizes. The scalar table is rebuilt on every call (fp64 [n_tensors, n_scalars]).

All element offsets are int64 (tensors of more than 2**31 elements are addressed correctly).
``LAUNCHES`` counts kernel launches (tests read it).
"""
from __future__ import annotations

import functools
import operator
import os
from collections import OrderedDict
from typing import Sequence

import torch

from .kernels import INTERPRETED, KERNELS, int8_state_kernel

# Elements per program and warps per program of the update kernels (bench/kernel_report.py: 2048 x 4 warps
# compile to 128-bit accesses without spills); the environment overrides them for A/B timings on a GPU
# (bench/device_check.sh). The packed path handles SUB = 32 x NUM_WARPS lanes at a time (compiled).
# The master layouts (an fp32 master list besides 16-bit params and fp32 state) take 8 warps (8 elements per
# thread) and at most 96 registers: left to itself, ptxas spilled 4-8 bytes in a few of their kernels (with 4
# warps: rmsprop and signum with momentum; with 8: adam, adamw_sf), and none with this cap (bench.kernel_report).
BLOCK = int(os.environ.get("MOMENTUM_FUSED_TRITON_BLOCK", "2048"))
NUM_WARPS = int(os.environ.get("MOMENTUM_FUSED_TRITON_WARPS", "4"))
NUM_WARPS_MASTER = int(os.environ.get("MOMENTUM_FUSED_TRITON_WARPS", "8"))
MAXNREG_MASTER = 96
# No fp contraction in the update kernels (ptxas --fmad=false), as in the CUDA kernels (--fmad=false) and the CPU
# build (-ffp-contract=off): an expression rounds the same whatever code surrounds it, so the int8 layouts' kernel
# equals the uncompressed kernel bit for bit. With Triton's default (contraction on), the H200 run of 2026-12-04
# found up to 22 of 4,352 elements one rounding apart. Explicit tl.fma calls (the rules that follow torch's
# one-rounding formulas) stay fused. The interpreter takes no compile options (and computes in numpy, uncontracted).
GPU_COMPILE_OPTIONS = {"enable_fp_fusion": False}
COMPILE_OPTIONS = {} if INTERPRETED else GPU_COMPILE_OPTIONS
# MOMENTUM_FUSED_TRITON_SPLIT=1: a bucket with full and packed blocks takes two launches, one kernel per path (each
# with its own register count) instead of one kernel holding both: the A/B of bench/device_check.sh kernels-triton.
SPLIT = os.environ.get("MOMENTUM_FUSED_TRITON_SPLIT") == "1"
MAX_SEGS = 64
CACHE_SIZE = 64
LAUNCHES = 0  # kernel launches since import (all kernels of this package)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_STATS = {"hits": 0, "misses": 0, "grad_row_updates": 0}


def launch_count() -> int:
    return LAUNCHES


def _count_launch() -> None:
    global LAUNCHES
    LAUNCHES += 1


def clear_cache() -> None:
    _cache.clear()
    _int8_cache.clear()
    _plan_split_tensors.cache_clear()


def cache_stats() -> dict:
    return dict(_CACHE_STATS, entries=len(_cache))


def plan_blocks(numels: Sequence[int], block: int = BLOCK, max_segs: int = MAX_SEGS):
    """Return (prog, segs): program i owns segs[prog[i]:prog[i+1]]; a seg is (tensor, offset in the
    tensor, first lane, length). Full blocks of large tensors are programs of their own; small
    tensors and tails are packed greedily into one open shared block (never split across blocks),
    at most ``max_segs`` per block. Empty tensors get no segment."""
    blocks: list[list[tuple[int, int, int, int]]] = []
    open_block: list | None = None
    fill = 0
    for t, n in enumerate(numels):
        n = int(n)
        off = 0
        while n - off >= block:
            blocks.append([(t, off, 0, block)])
            off += block
        rest = n - off
        if rest == 0:
            continue
        if open_block is None or fill + rest > block or len(open_block) >= max_segs:
            open_block, fill = [], 0
            blocks.append(open_block)
        open_block.append((t, off, fill, rest))
        fill += rest
    segs = [s for b in blocks for s in b]
    prog = [0]
    for b in blocks:
        prog.append(prog[-1] + len(b))
    return prog, segs


_DTYPE = operator.attrgetter("dtype")
_CPU_CUDA = operator.attrgetter("is_cpu", "is_cuda")


def _check_lists(lists: Sequence[Sequence[torch.Tensor]], dtypes: Sequence[torch.dtype] | None = None):
    """Equal lengths and numels, contiguous, one device; list i holds dtypes[i] (default: list 0's).
    Checked list by list at C speed (map over the tensors); the per-tensor loop below only runs to name
    the first offending tensor."""
    n = len(lists[0])
    ref = lists[0][0]
    numels = list(map(torch.Tensor.numel, lists[0]))
    dev = ({ref.get_device()}, {(ref.is_cpu, ref.is_cuda)})  # (a .device is slow to build: index and type)
    if ref.dtype in DTYPE_CODES and ref.device.type in ("cpu", "cuda") and all([
            len(lst) == n and set(map(_DTYPE, lst)) == {ref.dtype if dtypes is None else dtypes[li]}
            and (set(map(torch.Tensor.get_device, lst)), set(map(_CPU_CUDA, lst))) == dev
            and list(map(torch.Tensor.numel, lst)) == numels and all(map(torch.Tensor.is_contiguous, lst))
            for li, lst in enumerate(lists)]):
        return
    for li, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"tensor list {li} has {len(lst)} tensors, list 0 has {n}")
        want = ref.dtype if dtypes is None else dtypes[li]
        for ti, x in enumerate(lst):
            if x.dtype != want or x.device != ref.device:
                raise TypeError(f"tensor {ti} of list {li} is {x.dtype} on {x.device}; the bucket holds "
                                f"{want} there, on {ref.device} (one dtype layout and device per launch)")
            if x.numel() != lists[0][ti].numel():
                raise ValueError(f"tensor {ti} of list {li} has {x.numel()} elements, the param has "
                                 f"{lists[0][ti].numel()}")
            if not x.is_contiguous():
                raise ValueError(f"tensor {ti} of list {li} is not contiguous (strides {x.stride()}); "
                                 "the launcher needs contiguous tensors")
    if ref.dtype not in DTYPE_CODES:
        raise TypeError(f"storage dtype {ref.dtype} is not supported; supported: "
                        f"{[str(d) for d in DTYPE_CODES]}")


def plan_split(numels: Sequence[int], block: int = BLOCK, max_segs: int = MAX_SEGS):
    """The update kernels' plan: (full_t, full_b, prog, segs). Full blocks (``block`` elements inside one tensor)
    are listed as (tensor, block index) pairs, in tensor order: the kernels' first programs; small tensors and
    the tails of large ones are packed as in ``plan_blocks`` (the same greedy order): prog / segs describe
    those packed programs only. Empty tensors get nothing."""
    n = torch.tensor([int(x) for x in numels], dtype=torch.int64)
    nfull = torch.div(n, block, rounding_mode="floor")
    full_t = torch.repeat_interleave(torch.arange(len(n), dtype=torch.int64), nfull)
    starts = torch.cumsum(nfull, 0) - nfull
    full_b = torch.arange(int(nfull.sum()), dtype=torch.int64) - torch.repeat_interleave(starts, nfull)
    blocks: list[list[tuple[int, int, int, int]]] = []
    open_block: list | None = None
    fill = 0
    for t, (x, k) in enumerate(zip(n.tolist(), nfull.tolist())):
        rest = x - k * block
        if rest == 0:
            continue
        if open_block is None or fill + rest > block or len(open_block) >= max_segs:
            open_block, fill = [], 0
            blocks.append(open_block)
        open_block.append((t, k * block, fill, rest))
        fill += rest
    segs = [sg for b in blocks for sg in b]
    prog = [0]
    for b in blocks:
        prog.append(prog[-1] + len(b))
    return full_t, full_b, prog, segs


@functools.lru_cache(maxsize=CACHE_SIZE)
def _plan_split_tensors(numels: tuple, block: int, device) -> tuple:
    """(full_tab int32 [2, n_full], prog_tab, seg_tab, n_full, n_packed, n_seg) on ``device``, cached by sizes."""
    full_t, full_b, prog, segs = plan_split(numels, block)
    full_tab = torch.stack([full_t, full_b]).to(torch.int32).reshape(-1)
    seg_tab = torch.tensor([list(c) for c in zip(*segs)] if segs else [[], [], [], []], dtype=torch.int64)
    flat = torch.cat([torch.tensor(prog, dtype=torch.int64), seg_tab.reshape(-1)]).to(device)
    return (full_tab.to(device), flat[:len(prog)], flat[len(prog):], len(full_t), len(prog) - 1, len(segs))


def _aligned(ptrs) -> bool:
    """Every pointer 16-byte aligned: ``ptrs`` an int64 tensor of them, or a sequence of ints."""
    if isinstance(ptrs, torch.Tensor):
        return not bool((ptrs & 15).any())
    return not any(map((15).__and__, ptrs))


def _refuse_during_capture(ref: torch.Tensor) -> None:
    """A launch table is built on the host and copied to the device: refused during CUDA graph capture (torch
    refuses the pageable copy with a message that names no cause). The tables of the tensors of the eager warm-up
    steps are cached, so a captured step finds them; a new tensor (address) in the captured step has none."""
    if ref.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "momentum_fused (triton): a launch table must be built for tensors first seen during CUDA graph capture; "
            "run the step eagerly with the same params, grads and state (warm-up steps on a side stream) before "
            "capturing it (the tables of those tensors are then cached)")


def pointer_rows(lists: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The lists' data pointers (one row per list) and, last, the first list's numels: an int64 host tensor, as
    the Triton backend reads it at C speed (``_C_cpu.pointer_rows``)."""
    return torch.tensor([[t.data_ptr() for t in lst] for lst in lists] + [[t.numel() for t in lists[0]]],
                        dtype=torch.int64)


def step_tables(lists: Sequence[Sequence[torch.Tensor]], block: int = BLOCK, grad_list: int = 1, check=None,
                trusted: bool = False, rows: torch.Tensor | None = None):
    """(ptr_tab, full_tab, prog_tab, seg_tab, n_full, n_packed, n_seg, aligned) for the update kernels; cached
    (``CACHE_SIZE`` entries) by every list's data pointers and the sizes, the grads' row excepted: a hit whose grads
    moved gets that row refreshed in place. ``aligned``: every data pointer is 16-byte aligned (the full-block
    path may then use 128-bit accesses). ``check()``: the lists' checks, run before a table is built, and on a
    cache hit unless ``trusted`` (the caller has checked every tensor: the optimizer's plan, optim/checks.py; a hit
    then means the params and states are at the addresses, with the sizes, that were checked when the entry was
    made). ``rows``: ``pointer_rows(lists)``, when the caller has it (the Triton backend reads it at C speed).
    An entry is found by its first and last param pointers and confirmed by comparing every row but the grads'
    (two int64 comparisons of host tensors, no Python int per tensor)."""
    ref = lists[0][0]
    if rows is None:
        rows = pointer_rows(lists)
    n, nl = rows.shape[1], len(lists)
    ends = rows[0, [0, n - 1]].tolist()
    key = ("split", ref.device, ref.dtype, block, nl, grad_list, n, *ends)
    entry = _cache.get(key)
    hit = entry is not None and torch.equal(entry[2][:grad_list], rows[:grad_list]) \
        and torch.equal(entry[2][grad_list + 1:], rows[grad_list + 1:])
    if check is not None and (not hit or not trusted):
        check()
    if hit:
        _cache.move_to_end(key)
        _CACHE_STATS["hits"] += 1
        ptr_tab, plan, host, aligned_rest, aligned_grads = entry
        if not torch.equal(host[grad_list], rows[grad_list]):
            _refuse_during_capture(ref)
            ptr_tab[grad_list].copy_(rows[grad_list], non_blocking=True)
            host[grad_list] = rows[grad_list]
            entry[4] = aligned_grads = _aligned(rows[grad_list])
            _CACHE_STATS["grad_row_updates"] += 1
        return (ptr_tab.view(-1),) + plan + (aligned_rest and aligned_grads,)
    _CACHE_STATS["misses"] += 1
    _refuse_during_capture(ref)
    plan = _plan_split_tensors(tuple(rows[nl].tolist()), block, ref.device)
    ptr_tab = rows[:nl].to(ref.device, copy=True)
    rest = torch.cat([rows[:grad_list], rows[grad_list + 1:nl]])
    aligned_rest, aligned_grads = _aligned(rest), _aligned(rows[grad_list])
    _cache[key] = [ptr_tab, plan, rows.clone(), aligned_rest, aligned_grads]
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return (ptr_tab.view(-1),) + plan + (aligned_rest and aligned_grads,)


def _amp_scalars(found_inf, grad_scale, device):
    """GradScaler's device scalars as the kernels read them: each a one-element tensor on ``device`` (else
    ValueError), as fp32."""
    for name, x in (("found_inf", found_inf), ("grad_scale", grad_scale)):
        if x is not None and (x.device != device or x.numel() != 1):
            raise ValueError(f"{name} must be a one-element tensor on {device}, got {tuple(x.shape)} "
                             f"on {x.device}")
    return tuple(x.to(torch.float32) if x is not None and x.dtype != torch.float32 else x
                 for x in (found_inf, grad_scale))


def scalar_table(scalars, n: int, device) -> torch.Tensor:
    """fp64 [n, k] from a list of n packs, or a ready tensor ([n, k]). fp64 so that the kernels derive
    coefficients such as 1 - beta2 without fp32 cancellation (they round them to fp32 once)."""
    if isinstance(scalars, torch.Tensor):
        tab = scalars.to(device=device, dtype=torch.float64, non_blocking=True)
    else:
        tab = torch.tensor([tuple(s) for s in scalars], dtype=torch.float64)
        tab = tab.to(device, non_blocking=True) if tab.device != torch.device(device) else tab
    if tab.dim() != 2 or tab.shape[0] != n:
        raise ValueError(f"scalar table must be [{n}, k], got {tuple(tab.shape)}")
    return tab.contiguous()


def _sr_key_column(sr_keys, device) -> torch.Tensor:
    """The uint32 stochastic-rounding keys as an fp64 [n, 1] column on ``device``, made as the scalar table is
    (on the host, one non-blocking copy: ``torch.tensor(..., device=cuda)`` copies with non_blocking=False, which
    waits for the stream: a host stall every step of the stochastic layouts; a review, 2026-12-07)."""
    return scalar_table([(int(k) & 0xFFFFFFFF,) for k in sr_keys], len(sr_keys), device)


def multi_tensor_apply(family: str, rule_id: int, flags: Sequence[bool], lists, scalars, *,
                       found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                       block: int = BLOCK, master: bool = False, sr_keys: Sequence[int] | None = None,
                       sub: int | None = None, num_warps: int | None = None, remainder: bool = False,
                       checked: bool = False, rows: torch.Tensor | None = None) -> int:
    """Run one kernel over every tensor of ``lists`` = [params, grads, *state lists (, masters)].

    family: "one" or "multi" (see kernels.py); rule_id: rules.RULE_IDS[name]; flags: up to two
    bools (the rule's compile-time flags, in spec order). scalars: one pack per tensor.
    found_inf / grad_scale: optional one-element device tensors; when found_inf != 0 the kernel
    writes nothing; gradients are divided by grad_scale. Dtype layouts (momentum_fused/layouts.py):
    params and grads share one storage dtype, the state lists another; ``master``: the last list holds
    fp32 master copies; ``remainder`` (layout master16): bf16 params, fp32 states and, last, the int16 low halves of
    the masters (the kernel decodes the master from param and remainder, and encodes it back: kernels.py);
    ``sr_keys``: one uint32 per tensor turns on stochastic rounding of bf16 stores.
    Returns the number of launches (0 or 1; 2 with MOMENTUM_FUSED_TRITON_SPLIT=1): one kernel whose first programs are the full blocks (unmasked,
    128-bit accesses when every pointer is 16-byte aligned) and the others the packed blocks (small tensors and
    tails, ``sub`` lanes at a time: 32 x num_warps compiled, the whole block in the interpreter by default).
    ``checked``: the caller has checked every tensor (dtypes, one device, equal numels, contiguous: the Triton
    backend, behind the optimizer's plan); the lists are then checked here only when their tables are not cached
    (new tensors), which is most of the host time of a step of many small tensors otherwise. ``rows``: the lists'
    ``pointer_rows``, if the caller has read them.
    """
    if family not in KERNELS:
        raise ValueError(f"unknown kernel family {family!r}; known: {sorted(KERNELS)}")
    if len(lists) < 2 or len(lists[0]) == 0:
        return 0
    if master and remainder:
        raise ValueError("master and remainder are two layouts (master, master16): at most one")
    extra = bool(master) or bool(remainder)
    nstate = len(lists) - 2 - extra
    if family == "one" and not 0 <= nstate <= 1 or family == "multi" and not 1 <= nstate <= 3:
        raise ValueError(f"kernel family {family!r} cannot take {nstate} state lists")
    pdt = lists[0][0].dtype
    sdt = lists[2][0].dtype if nstate else (torch.float32 if remainder else pdt)
    dtypes = [pdt, pdt] + [sdt] * nstate + ([torch.float32] if master else [torch.int16] if remainder else [])
    tables = step_tables(lists, block, check=lambda: _check_lists(lists, dtypes), trusted=checked, rows=rows)
    if master and pdt not in (torch.float16, torch.bfloat16):
        raise TypeError(f"a master copy is kept for fp16/bf16 params, not {pdt}")
    if remainder and (pdt != torch.bfloat16 or sdt != torch.float32):
        raise TypeError(f"master16 takes bf16 params and fp32 state, not {pdt} / {sdt}")
    sr = sr_keys is not None
    if sr and (pdt != torch.bfloat16 or sdt != torch.bfloat16 or master):
        raise TypeError("stochastic rounding is the bf16_sr layout: bf16 params and state, no master copy")
    flags = tuple(bool(f) for f in flags)
    if len(flags) > 2:
        raise ValueError(f"at most two flags, got {flags}")
    flags = flags + (False,) * (2 - len(flags))
    ref = lists[0][0]
    n = len(lists[0])
    scal = scalar_table(scalars, n, ref.device)
    if sr:
        if len(sr_keys) != n:
            raise ValueError(f"{len(sr_keys)} stochastic-rounding keys for {n} tensors")
        keys = _sr_key_column(sr_keys, ref.device)
        scal = torch.cat([scal, keys], dim=1).contiguous()
    ptr_tab, full_tab, prog_tab, seg_tab, n_full, n_packed, n_seg, aligned = tables
    if n_full + n_packed == 0:
        return 0  # every tensor is empty
    dummy = scal  # any device pointer; never read when the flag is off
    fi, gs = _amp_scalars(found_inf, grad_scale, ref.device)
    if num_warps is None:
        num_warps = NUM_WARPS_MASTER if extra else NUM_WARPS
    if sub is None:
        sub = block if INTERPRETED else min(block, 32 * num_warps)
    kernel = KERNELS[family]
    args = (ptr_tab, n, scal, full_tab if n_full else prog_tab, n_full, prog_tab, seg_tab if n_seg else prog_tab,
            n_seg, fi if fi is not None else dummy, gs if gs is not None else dummy)
    meta = dict(RULE=rule_id, F0=flags[0], F1=flags[1], NSTATE=nstate, NSCAL=scal.shape[1] - sr,
                PDT=DTYPE_CODES[pdt], SDT=DTYPE_CODES[sdt], MASTER=master_mode(master, remainder), SR=sr,
                HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, BLOCK=block, SUB=sub,
                ALIGNED=aligned, HW_BF16=not INTERPRETED, num_warps=num_warps, **COMPILE_OPTIONS,
                **({"maxnreg": MAXNREG_MASTER} if extra and not INTERPRETED else {}))
    if SPLIT and n_full and n_packed:
        kernel[(n_full,)](*args, PATHS=1, **meta)
        kernel[(n_packed,)](*args, PATHS=2, **meta)
        _count_launch()
        _count_launch()
        return 2
    kernel[(n_full + n_packed,)](*args, PATHS=(1 if n_full else 0) + (2 if n_packed else 0), **meta)
    _count_launch()
    return 1


def master_mode(master: bool, remainder: bool) -> int:
    """The kernels' MASTER constexpr: 0 none, 1 an fp32 master copy (master), 2 the int16 remainder (master16)."""
    return 2 if remainder else 1 if master else 0


# ------------------------------------------------------------------------------------------ int8_state
# blocks of layouts.INT8_BLOCK elements per program of the int8_state kernel (8: 2048 elements) and its warps (8: 8
# elements per thread; 4 warps held 16 and ~250 registers: bench.kernel_report); MAXNREG_INT8, a register cap (none:
# ptxas' choice, ~100-128). The environment overrides them for the A/B of bench/device_check.sh kernels-triton-int8
# (on the H200 the CUDA int8 kernel ran 1.30x faster at 64 registers and twice the occupancy, spills and all).
INT8_ROWS = int(os.environ.get("MOMENTUM_FUSED_TRITON_INT8_ROWS", "8"))
NUM_WARPS_INT8 = int(os.environ.get("MOMENTUM_FUSED_TRITON_INT8_WARPS", "8"))
MAXNREG_INT8 = int(os.environ.get("MOMENTUM_FUSED_TRITON_INT8_MAXNREG", "0")) or None
_int8_tables: dict = {}


def int8_code_table(device) -> torch.Tensor:
    """The code map of layouts.py on ``device``, one fp32 tensor: [signed values | unsigned values | unsigned
    integer-space midpoints] (the offsets kernels.py derives from the same functions)."""
    key = torch.device(device)
    tab = _int8_tables.get(key)
    if tab is None:
        from ..layouts import int8_midpoints, int8_table
        tab = torch.cat([int8_table(True), int8_table(False), int8_midpoints(False)]).to(key)
        _int8_tables[key] = tab
    return tab


@functools.lru_cache(maxsize=CACHE_SIZE)
def _int8_plan(numels: tuple, quantized: tuple, chunk: int, device) -> tuple:
    """(prog_tab int64 [3, n_prog] = (tensor, chunk index, quantized), numel_tab int64 [n], n_prog)."""
    t, c, q = [], [], []
    for i, (n, qi) in enumerate(zip(numels, quantized)):
        k = -(-n // chunk)
        t += [i] * k
        c += range(k)
        q += [int(qi)] * k
    tab = torch.tensor([t, c, q], dtype=torch.int64).reshape(-1)
    return torch.cat([tab, torch.tensor(numels, dtype=torch.int64)]).to(device), len(t)


_int8_cache: "OrderedDict[tuple, list]" = OrderedDict()


def int8_width(states, remainder: bool = False) -> int:
    """2 * nstate + r: the length of a quantized state tuple (codes, the remainder under master16_int8, scales),
    nstate told by the first tuple."""
    st0, r = states[0], int(remainder)
    q0 = bool(st0) and st0[0].dtype in (torch.int8, torch.uint8)
    nstate = (len(st0) - r) // 2 if q0 else len(st0) - r
    return 2 * nstate + r


def int8_pointer_rows(params, grads, states, width: int) -> torch.Tensor:
    """The int8 bucket's pointer rows, as ``_C_cpu.pointer_rows(..., ragged=True)`` reads them: params, grads,
    ``width`` state slots (a tuple's j-th tensor, 0 where it is shorter), the params' numels, the tuples' lengths."""
    return torch.tensor([[t.data_ptr() for t in params], [t.data_ptr() for t in grads]]
                        + [[st[j].data_ptr() if j < len(st) else 0 for st in states] for j in range(width)]
                        + [[t.numel() for t in params], [len(st) for st in states]], dtype=torch.int64)


def _check_int8_bucket(params, grads, states, quant, nstate, remainder=False) -> None:
    """int8_state_apply's argument checks: raises naming the first offending tensor."""
    from ..layouts import INT8_BLOCK
    ref = params[0]
    unsigned = None
    r = int(remainder)
    pdt, pname, name = (torch.bfloat16, "bf16", "master16_int8") if r else (torch.float32, "fp32", "int8_state")
    for i, (p, g, st, q) in enumerate(zip(params, grads, states, quant)):
        want = [torch.float32] * nstate + [torch.int16] * r
        if q and p.numel() % INT8_BLOCK:
            raise ValueError(f"tensor {i}: quantized {name} (codes) needs a size that is a multiple of "
                             f"{INT8_BLOCK}, got {p.numel()}")
        if q:
            want = [c.dtype for c in st[:nstate]] + [torch.int16] * r + [torch.float32] * nstate
            if any(d not in (torch.int8, torch.uint8) for d in want[:nstate]):
                raise TypeError(f"tensor {i}: {name} codes are int8 or uint8, got {want[:nstate]}")
            mask = sum(1 << j for j, d in enumerate(want[:nstate]) if d == torch.uint8)
            if unsigned is not None and mask != unsigned:
                raise TypeError(f"tensor {i}: code dtypes {want[:nstate]} differ from the bucket's")
            unsigned = mask
        if len(st) != len(want) or p.dtype != pdt or g.dtype != pdt or [x.dtype for x in st] != want:
            raise TypeError(f"tensor {i}: {name} takes {pname} params and grads with states {want}, got "
                            f"{p.dtype}, {g.dtype}, {[x.dtype for x in st]}")
        for what, x, numel in [("param", p, p.numel()), ("grad", g, p.numel())] + \
                [("state", x, p.numel() if j < nstate + r or not q else p.numel() // INT8_BLOCK)
                 for j, x in enumerate(st)]:
            if x.numel() != numel or x.device != ref.device or not x.is_contiguous():
                raise ValueError(f"tensor {i}: its {what} must be a contiguous tensor of {numel} elements on "
                                 f"{ref.device}, got {tuple(x.shape)} on {x.device}")


def int8_state_apply(family: str, rule_id: int, flags: Sequence[bool], params, grads, states, scalars, *,
                     found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                     rows: int = INT8_ROWS, num_warps: int | None = None, remainder: bool = False,
                     checked: bool = False, ptr_rows: torch.Tensor | None = None,
                     sr_keys: Sequence[int] | None = None) -> int:
    """Layout int8_state: ONE launch over a bucket of fp32 params whose per-tensor state tuples (``states[i]``) are
    either ``nstate`` fp32 tensors, or, for a tensor that layouts.int8_quantized keeps as codes (told by the states'
    dtype), ``nstate`` code tensors (int8 signed / uint8 non-negative, param-shaped) followed by their ``nstate``
    fp32 block scales (numel / INT8_BLOCK elements each). Each program takes ``rows`` blocks of one tensor (no packing of tiny tensors: a
    quantized tensor's blocks must not share a program with other tensors, and the fp32 ones ride along in the
    same kernel). ``remainder`` (layout master16_int8): bf16 params and grads, and every tuple holds the param's
    int16 remainder after the codes (or the fp32 states), before the scales. ``checked``: the caller has checked
    every tensor (the Triton backend, behind the optimizer's plan): the grads are then not re-checked on a table
    hit. ``ptr_rows``: ``int8_pointer_rows(params, grads, states, 2 * nstate + r)`` when the caller has it (read at C
    speed by the backend). ``sr_keys`` (layouts int8_sr, master16_int8_sr): one uint32 key per tensor, the codes
    rounded stochastically. Returns the number of launches (0 or 1)."""
    from ..layouts import INT8_BLOCK
    if family not in KERNELS:
        raise ValueError(f"unknown kernel family {family!r}; known: {sorted(KERNELS)}")
    n = len(params)
    if n == 0:
        return 0
    if len(grads) != n or len(states) != n:
        raise ValueError(f"{n} params, {len(grads)} grads, {len(states)} state tuples")
    # quantized: by its states (codes), as the reference backend decides; layouts.int8_quantized made them so (for
    # a shard of an FSDP2 param, from the global tensor: the local sizes cannot tell). Its size must then be a
    # multiple of INT8_BLOCK (checked). A quantized tuple holds 2 * nstate + r tensors, an fp32-state one nstate + r.
    r = int(remainder)
    width = int8_width(states, remainder)
    nstate = (width - r) // 2
    if family == "one" and not 0 <= nstate <= 1 or family == "multi" and not 1 <= nstate <= 3:
        raise ValueError(f"kernel family {family!r} cannot take {nstate} state lists")
    ref = params[0]
    quant_list = None
    if ptr_rows is None:
        quant_list = [bool(st) and st[0].dtype in (torch.int8, torch.uint8) for st in states]
        ptr_rows = int8_pointer_rows(params, grads, states, width)
        quant = torch.tensor(quant_list, dtype=torch.bool)
    elif nstate:  # (the Triton backend, behind the optimizer's plan: every tuple is one of the two kinds)
        quant = ptr_rows[3 + width] == width
    else:  # no state to quantize (signSGD): nothing is codes
        quant = torch.zeros(n, dtype=torch.bool)
    iq = int(quant.nonzero()[0]) if bool(quant.any()) else None
    code_dtypes = () if iq is None else tuple(c.dtype for c in states[iq][:nstate])
    # Cached by every pointer, size and tuple length but the grads' (as step_tables: found by the first and last
    # param pointers, confirmed by comparing the rows): a hit skips the checks of params and states, which were
    # checked when the entry was made; the grads are checked every call unless ``checked`` (the optimizer's plan).
    key = (ref.device, rows, nstate, r, n, code_dtypes, *ptr_rows[0, [0, n - 1]].tolist())
    entry = _int8_cache.get(key)
    hit = entry is not None and torch.equal(entry[7][:1], ptr_rows[:1]) and torch.equal(entry[7][2:], ptr_rows[2:])
    if not hit:
        _refuse_during_capture(ref)
        if quant_list is None:
            quant_list = [bool(st) and st[0].dtype in (torch.int8, torch.uint8) for st in states]
            if quant_list != quant.tolist():
                raise TypeError("int8_state: a state tuple's length does not match its kind (codes and scales, or "
                                "fp32 states)")
        _check_int8_bucket(params, grads, states, quant_list, nstate, r)
        unsigned = 0 if iq is None else sum(1 << j for j, c in enumerate(code_dtypes) if c == torch.uint8)
        plan, n_prog = _int8_plan(tuple(ptr_rows[2 + width].tolist()), tuple(quant_list), rows * INT8_BLOCK,
                                  ref.device)
        tab = ptr_rows[:2 + width].clone()
        scales = tab[2 + nstate + r:]  # an fp32-state tensor's scale pointers: never dereferenced
        scales.copy_(torch.where(quant, scales, torch.full_like(scales, ref.data_ptr())))
        rest = torch.cat([tab[:1], tab[2:]])
        kinds = (2 if iq is not None else 0) + (1 if not bool(quant.all()) else 0)
        entry = [tab.to(ref.device, copy=True), plan, n_prog, unsigned, _aligned(rest), kinds, _aligned(tab[1]),
                 ptr_rows.clone()]
        _int8_cache[key] = entry
        while len(_int8_cache) > CACHE_SIZE:
            _int8_cache.popitem(last=False)
    else:
        _int8_cache.move_to_end(key)
        if not checked and (set(map(_DTYPE, grads)) != {ref.dtype}
                            or not torch.equal(torch.tensor(list(map(torch.Tensor.numel, grads))),
                                               ptr_rows[2 + width])
                            or not all(map(torch.Tensor.is_contiguous, grads))
                            or set(map(torch.Tensor.get_device, grads)) != {ref.get_device()}):
            _check_int8_bucket(params, grads, states, quant.tolist(), nstate, r)  # raises, naming the grad
    ptr_tab, plan, n_prog, unsigned, aligned_rest, kinds, aligned_grads, host = entry
    if not torch.equal(host[1], ptr_rows[1]):
        _refuse_during_capture(ref)
        ptr_tab[1].copy_(ptr_rows[1], non_blocking=True)
        host[1] = ptr_rows[1]
        entry[6] = aligned_grads = _aligned(ptr_rows[1])
    if n_prog == 0:
        return 0
    aligned = aligned_rest and aligned_grads
    scal = scalar_table(scalars, n, ref.device)
    nscal = scal.shape[1]
    if sr_keys is not None:  # the key as the scalar rows' last column (kernels._prologue)
        if len(sr_keys) != n:
            raise ValueError(f"{len(sr_keys)} stochastic-rounding keys for {n} tensors")
        keys = _sr_key_column(sr_keys, ref.device)
        scal = torch.cat([scal, keys], dim=1).contiguous()
    fi, gs = _amp_scalars(found_inf, grad_scale, ref.device)
    flags = tuple(bool(f) for f in flags) + (False,) * (2 - len(flags))
    int8_state_kernel[(n_prog,)](
        ptr_tab.view(-1), n, scal, plan, n_prog, plan[3 * n_prog:], int8_code_table(ref.device),
        fi if fi is not None else scal, gs if gs is not None else scal,
        MULTI=family == "multi", RULE=rule_id, F0=flags[0], F1=flags[1], NSTATE=nstate, NSCAL=nscal,
        SRQ=sr_keys is not None,
        UNSIGNED=unsigned, HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
        ROWS=rows, KINDS=kinds, ALIGNED=aligned, HW_BF16=not INTERPRETED, PDT=2 * r, MASTER=2 * r,
        num_warps=num_warps or NUM_WARPS_INT8, **COMPILE_OPTIONS,
        **({"maxnreg": MAXNREG_INT8} if MAXNREG_INT8 and not INTERPRETED else {}))
    _count_launch()
    return 1


# ------------------------------------------------------------------------------- static compile (no GPU)
_SIGNATURE = {"ptr_tab": "*i64", "n_tensors": "i32", "scal_tab": "*fp64", "full_tab": "*i32", "n_full": "i32",
              "prog_tab": "*i64", "seg_tab": "*i64", "n_seg": "i32", "found_inf_ptr": "*fp32",
              "grad_scale_ptr": "*fp32"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compile_variants(rule: str, flags, nstate: int, pdt: str, sdt: str, master: bool | int = False, sr: bool = False,
                     found_inf: bool = False, grad_scale: bool = False, block: int = BLOCK,
                     num_warps: int | None = None, aligned: bool = True):
    """The kernels a launch of this specialization runs, for compiling them without a GPU (bench/kernel_report.py,
    tests/test_triton_compile.py): a list of (name, path, jit function, signature, constexprs, compile options,
    elements per thread). Paths: "full" (a bucket of whole blocks only), "packed" (small tensors only) and "mixed"
    (both: what most buckets run); compiled code (HW_BF16). ``master``: the kernels' MASTER mode (``master_mode``:
    True or 1 an fp32 master copy, 2 the master16 remainder). ``sdt="int8"``: the int8_state kernel
    (``compile_int8_variants``; with ``master`` 2 its master16_int8 form, with ``sr`` their stochastic codes)."""
    from .rules import FAMILY, RULE_IDS, SCALARS
    if sdt == "int8":
        return compile_int8_variants(rule, flags, nstate, found_inf=found_inf, grad_scale=grad_scale,
                                     num_warps=num_warps, remainder=int(master) == 2, stochastic=sr)
    flags = tuple(bool(f) for f in flags) + (False,) * (2 - len(flags))
    fn = KERNELS[FAMILY[rule]]
    master = int(master)
    if num_warps is None:
        num_warps = NUM_WARPS_MASTER if master else NUM_WARPS
    sub = min(block, 32 * num_warps)
    out = []
    for path, paths in (("full", 1), ("packed", 2), ("mixed", 3)):
        constexprs = dict(RULE=RULE_IDS[rule], F0=flags[0], F1=flags[1], NSTATE=nstate, NSCAL=len(SCALARS[rule]),
                          PDT=DTYPE_CODES[_TORCH_DTYPES[pdt]], SDT=DTYPE_CODES[_TORCH_DTYPES[sdt]], MASTER=master,
                          SR=sr, HAS_FOUND_INF=found_inf, HAS_GRAD_SCALE=grad_scale, BLOCK=block, SUB=sub,
                          PATHS=paths, ALIGNED=aligned, HW_BF16=True)
        # elements per thread in one pass: a full block's (also for the mixed kernel, to compare with the whole
        # kernel before issue 20), one sub-block's for the packed path
        elems = sub // (32 * num_warps) if paths == 2 else block // (32 * num_warps)
        options = {"num_warps": num_warps, **({"maxnreg": MAXNREG_MASTER} if master else {})}
        out.append((fn.__name__, path, fn, dict(_SIGNATURE), constexprs, options, elems))
    return out


_INT8_SIGNATURE = {"ptr_tab": "*i64", "n_tensors": "i32", "scal_tab": "*fp64", "prog_tab": "*i64", "n_prog": "i32",
                   "numel_tab": "*i64", "tab_ptr": "*fp32", "found_inf_ptr": "*fp32", "grad_scale_ptr": "*fp32"}


def int8_unsigned_mask(rule: str, nstate: int) -> int:
    """The UNSIGNED constexpr of a rule's int8_state kernel with ``nstate`` states, for compiling without tensors
    (a launch reads it from the code dtypes): bit j when state j of the rule's default group is one of
    layouts.INT8_UNSIGNED (the optional states beyond the defaults' are taken as signed)."""
    from ..layouts import INT8_UNSIGNED
    from ..specs import get_spec
    spec = get_spec(rule)
    names = spec.state_names({**spec.defaults, **spec.group_extras})
    return sum(1 << j for j, name in enumerate(names[:nstate]) if name in INT8_UNSIGNED)


def compile_int8_variants(rule: str, flags, nstate: int, found_inf: bool = False, grad_scale: bool = False,
                          rows: int = INT8_ROWS, num_warps: int | None = None, remainder: bool = False,
                          maxnreg: int | None = MAXNREG_INT8, stochastic: bool = False):
    """As ``compile_variants``, for the int8_state kernel: paths "int8" (quantized tensors only), "fp32" (fp32-state
    tensors only), "mixed" (both: ``KINDS`` 2, 1, 3). ``remainder``: layout master16_int8 (bf16 params, the
    master16 remainder: PDT and MASTER 2). ``stochastic``: the codes rounded stochastically (int8_sr,
    master16_int8_sr: SRQ)."""
    from ..layouts import INT8_BLOCK
    from .rules import FAMILY, RULE_IDS, SCALARS
    flags = tuple(bool(f) for f in flags) + (False,) * (2 - len(flags))
    num_warps = num_warps or NUM_WARPS_INT8
    out = []
    for path, kinds in (("int8", 2), ("fp32", 1), ("mixed", 3)):
        constexprs = dict(MULTI=FAMILY[rule] == "multi", RULE=RULE_IDS[rule], F0=flags[0], F1=flags[1], NSTATE=nstate,
                          NSCAL=len(SCALARS[rule]), UNSIGNED=int8_unsigned_mask(rule, nstate),
                          HAS_FOUND_INF=found_inf, HAS_GRAD_SCALE=grad_scale, ROWS=rows, KINDS=kinds, ALIGNED=True,
                          HW_BF16=True, PDT=2 * int(remainder), MASTER=2 * int(remainder), SRQ=stochastic)
        elems = rows * INT8_BLOCK // (32 * num_warps)
        out.append((int8_state_kernel.__name__, path, int8_state_kernel, dict(_INT8_SIGNATURE), constexprs,
                    {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}, elems))
    return out
