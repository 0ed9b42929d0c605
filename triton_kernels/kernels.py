"""Multi-tensor kernels: one kernel body per family, the rule chosen by the constexpr ``RULE``.

Families:
- ``one_buffer_kernel``: rules with zero or one state tensor (sgd, qhm, signum, lion, fsgdm, sgd_sf);
  ``NSTATE`` = 0 (plain SGD, signSGD) or 1.
- ``multi_buffer_kernel``: rules with one to three state tensors (adam, nadam, rmsprop, adamw_sf).
Scalar columns 0 (lr) and the last (grad_mult) are common; the others are read per rule
(rules.SCALARS gives the layout).

Addressing (built by launcher.py, rule-agnostic):
- ``ptr_tab``: int64 [n_lists, n_tensors] of data pointers; list 0 = params, 1 = grads, 2.. = state.
- ``scal_tab``: fp64 [n_tensors, NSCAL], one row of hyperparameters per tensor.
- ``prog_tab``: int64 [n_programs + 1]: program i owns segments prog_tab[i] .. prog_tab[i+1]-1.
- ``seg_tab``: int64 [4, n_seg]: (tensor, element offset in the tensor, first lane, length).
A program whose block lies inside one tensor (every full block of a large tensor) takes the fast path
with scalar pointers and scalar hyperparameters. A program packing several small tensors finds the
tensor of each lane and gathers pointers and hyperparameters per lane, so tiny tensors share programs.
All index math is int64.

Storage (the dtype layouts of momentum_fused/layouts.py): ``PDT`` is the param/grad storage and ``SDT``
the state storage, each 0 = fp32, 1 = fp16, 2 = bf16 (bf16 handled as uint16 bits: exact widening on
load, explicit round-to-nearest-even on store, since the interpreter's ``.to(tl.bfloat16)`` truncates).
``MASTER``: one more list after the states holds an fp32 master copy; the rule reads the param value from
it and writes it, and the param is written rounded from the same value. ``SR``: every bf16 store rounds
stochastically with the counter hash of layouts.py; the per-tensor key is the scalar table's extra last
column (the table then has NSCAL + 1 columns). Math is always fp32. ``HAS_FOUND_INF``: a device flag; when nonzero nothing is read or written.
``HAS_GRAD_SCALE``: gradients are divided by a device scalar (after grad_mult from the table).

Interpreter note: every call of a ``@triton.jit`` helper costs ~2 ms in the interpreter, so loads,
stores and scalar reads are grouped into few helpers.
"""
import triton
import triton.language as tl

from .rules import (ADAM, ADAMW_SF, FSGDM, LION, NADAM, QHM, RMSPROP, SGD, SGD_SF, SIGNUM, adam_math,
                    adamw_sf_math, fsgdm_math, lion_math, nadam_math, qhm_math, rmsprop_math, sgd_math,
                    sgd_sf_math, signum_math)


# ----------------------------------------------------------------------------------------- storage
@triton.jit
def load_fp32(ptr_tab, list_i, n_tensors, t, idx, mask, DTYPE: tl.constexpr):
    base = tl.load(ptr_tab + list_i * n_tensors + t)
    if DTYPE == 0:
        x = tl.load(base.to(tl.pointer_type(tl.float32)) + idx, mask=mask, other=0.0)
    elif DTYPE == 1:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        bits = tl.load(base.to(tl.pointer_type(tl.uint16)) + idx, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def load_lists(ptr_tab, n_tensors, t, idx, mask, NLISTS: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr,
               MASTER: tl.constexpr):
    """Up to 5 lists (p, g, s0, s1, s2) as fp32; missing ones alias the grad. With MASTER, p is read
    from the fp32 master list (list NLISTS)."""
    if MASTER:
        p = load_fp32(ptr_tab, NLISTS, n_tensors, t, idx, mask, 0)
    else:
        p = load_fp32(ptr_tab, 0, n_tensors, t, idx, mask, PDT)
    g = load_fp32(ptr_tab, 1, n_tensors, t, idx, mask, PDT)
    s_0 = g
    s_1 = g
    s_2 = g
    if NLISTS >= 3:
        s_0 = load_fp32(ptr_tab, 2, n_tensors, t, idx, mask, SDT)
    if NLISTS >= 4:
        s_1 = load_fp32(ptr_tab, 3, n_tensors, t, idx, mask, SDT)
    if NLISTS >= 5:
        s_2 = load_fp32(ptr_tab, 4, n_tensors, t, idx, mask, SDT)
    return p, g, s_0, s_1, s_2


@triton.jit
def _lowbias32(x):
    """The integer hash of layouts.lowbias32, on uint32 (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def sr_bf16_bits(x, idx, key_b):
    """fp32 -> bf16 bits with the stochastic rounding of layouts.sr_round_bf16 (key_b: uint32)."""
    bits = x.to(tl.uint32, bitcast=True)
    h = idx.to(tl.uint32) ^ key_b ^ ((idx >> 32).to(tl.uint32) * tl.full([], 0x85EBCA6B, tl.uint32))
    r = _lowbias32(h) & 0xFFFF
    up = (bits + r) >> 16
    rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rne = tl.where(x != x, (bits >> 16) | 0x40, rne)
    return tl.where((bits & 0x7F800000) == 0x7F800000, rne, up)


@triton.jit
def store_fp32(ptr_tab, list_i, n_tensors, t, idx, mask, x, DTYPE: tl.constexpr, SR: tl.constexpr, key):
    """Store fp32 values ``x`` as DTYPE; bf16 rounds to nearest even, or stochastically with SR (key: the
    uint32 key of this tensor and buffer)."""
    base = tl.load(ptr_tab + list_i * n_tensors + t)
    if DTYPE == 0:
        tl.store(base.to(tl.pointer_type(tl.float32)) + idx, x, mask=mask)
    elif DTYPE == 1:
        tl.store(base.to(tl.pointer_type(tl.float16)) + idx, x.to(tl.float16), mask=mask)
    else:
        if SR:
            rounded = sr_bf16_bits(x, idx, key)
        else:  # fp32 -> bf16 round-to-nearest-even on the bits; NaN stays a (quiet) NaN
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        tl.store(base.to(tl.pointer_type(tl.uint16)) + idx, rounded.to(tl.uint16), mask=mask)


@triton.jit
def store_lists(ptr_tab, n_tensors, t, idx, mask, p, s_0, s_1, s_2, key, NLISTS: tl.constexpr, PDT: tl.constexpr,
                SDT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr):
    """Write p (and the master copy) and the NLISTS - 2 state values (the grad, list 1, is never
    written). Buffer b of the stochastic rounding: 0 for p, 1 + j for state j (layouts.py)."""
    golden = tl.full([], 0x9E3779B9, tl.uint32)
    if MASTER:
        store_fp32(ptr_tab, NLISTS, n_tensors, t, idx, mask, p, 0, False, key)
    store_fp32(ptr_tab, 0, n_tensors, t, idx, mask, p, PDT, SR, key)
    if NLISTS >= 3:
        store_fp32(ptr_tab, 2, n_tensors, t, idx, mask, s_0, SDT, SR, key + golden)
    if NLISTS >= 4:
        store_fp32(ptr_tab, 3, n_tensors, t, idx, mask, s_1, SDT, SR, key + golden * 2)
    if NLISTS >= 5:
        store_fp32(ptr_tab, 4, n_tensors, t, idx, mask, s_2, SDT, SR, key + golden * 3)


@triton.jit
def full_block(seg_tab, n_seg, s0, BLOCK: tl.constexpr):
    """Fast path: the block is one segment inside one tensor: (tensor, element index, mask)."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    t = tl.load(seg_tab + s0)
    idx = tl.load(seg_tab + n_seg + s0) + lanes
    mask = lanes < tl.load(seg_tab + 3 * n_seg + s0)
    return t, idx, mask


@triton.jit
def locate(seg_tab, n_seg, s0, s1, BLOCK: tl.constexpr):
    """Packed path: per lane, (tensor, element index, mask) from the segments s0 .. s1-1."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    seg = tl.zeros([BLOCK], dtype=tl.int64) + s0
    for s in range(s0 + 1, s1):
        seg += (lanes >= tl.load(seg_tab + 2 * n_seg + s)).to(tl.int64)
    t = tl.load(seg_tab + seg)
    off = tl.load(seg_tab + n_seg + seg)
    rel = lanes - tl.load(seg_tab + 2 * n_seg + seg)
    length = tl.load(seg_tab + 3 * n_seg + seg)
    return t, off + rel, (rel >= 0) & (rel < length)


# ------------------------------------------------------------------------------------ the bodies
@triton.jit
def _prologue(scal_tab, t, mask, found_inf_ptr, grad_scale_ptr, NSCAL: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
              HAS_GRAD_SCALE: tl.constexpr, SR: tl.constexpr):
    """What every rule body starts with: found_inf masks all writes off; the tensor's scalar row; lr and
    weight_decay (entries 0 and 1 of every pack) and grad_mult (the last of the rule's NSCAL), divided by
    the device scale; the stochastic-rounding key (column NSCAL, only with SR: rows are NSCAL + SR wide)."""
    if HAS_FOUND_INF:
        mask = mask & ((tl.zeros(mask.shape, tl.float32) + tl.load(found_inf_ptr)) == 0)
    sp = scal_tab + t * (NSCAL + SR)
    lr = tl.load(sp)
    wd = tl.load(sp + 1)
    gm = tl.load(sp + NSCAL - 1)
    if HAS_GRAD_SCALE:
        gm = gm / tl.load(grad_scale_ptr).to(tl.float64)
    if SR:
        key = tl.load(sp + NSCAL).to(tl.int64).to(tl.uint32)
    else:
        key = tl.zeros(t.shape, tl.uint32)
    return mask, sp, lr, wd, gm, key


@triton.jit
def _one_buffer_body(ptr_tab, n_tensors, scal_tab, t, idx, mask, found_inf_ptr, grad_scale_ptr,
                     RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                     NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                     SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    mask, sp, lr, wd, gm, key = _prologue(scal_tab, t, mask, found_inf_ptr, grad_scale_ptr, NSCAL, HAS_FOUND_INF,
                                          HAS_GRAD_SCALE, SR)
    p, g, b, _s1, _s2 = load_lists(ptr_tab, n_tensors, t, idx, mask, 2 + NSTATE, PDT, SDT, MASTER)
    if RULE == SGD:
        p, b = sgd_math(p, g, b, lr, wd, tl.load(sp + 2), tl.load(sp + 3), tl.load(sp + 4), gm, F0, F1)
    elif RULE == QHM:
        p, b = qhm_math(p, g, b, lr, wd, tl.load(sp + 2), tl.load(sp + 3), gm, F0)
    elif RULE == SIGNUM:
        p, b = signum_math(p, g, b, lr, wd, tl.load(sp + 2), gm, F0)
    elif RULE == LION:
        p, b = lion_math(p, g, b, lr, wd, tl.load(sp + 2), tl.load(sp + 3), gm)
    elif RULE == SGD_SF:  # (lr, c, beta, y_coef, weight_decay, grad_mult)
        p, b = sgd_sf_math(p, g, b, lr, tl.load(sp + 1), tl.load(sp + 3), tl.load(sp + 4), gm)
    else:
        tl.static_assert(RULE == FSGDM, "rule not served by the one-buffer kernel")
        p, b = fsgdm_math(p, g, b, lr, wd, tl.load(sp + 2), tl.load(sp + 3), tl.load(sp + 4), gm)
    store_lists(ptr_tab, n_tensors, t, idx, mask, p, b, b, b, key, 2 + NSTATE, PDT, SDT, MASTER, SR)


@triton.jit
def _multi_buffer_body(ptr_tab, n_tensors, scal_tab, t, idx, mask, found_inf_ptr, grad_scale_ptr,
                       RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                       NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                       SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    mask, sp, lr, wd, gm, key = _prologue(scal_tab, t, mask, found_inf_ptr, grad_scale_ptr, NSCAL, HAS_FOUND_INF,
                                          HAS_GRAD_SCALE, SR)
    p, g, s_0, s_1, s_2 = load_lists(ptr_tab, n_tensors, t, idx, mask, 2 + NSTATE, PDT, SDT, MASTER)
    if RULE == ADAM:
        p, s_0, s_1, s_2 = adam_math(p, g, s_0, s_1, s_2, lr, wd, tl.load(sp + 2), tl.load(sp + 3),
                                     tl.load(sp + 4), tl.load(sp + 5), tl.load(sp + 6), gm, F0, F1)
    elif RULE == ADAMW_SF:  # (lr, c, beta, y_coef, wd, beta2, bc2, eps, inner_momentum, inner_bc, gm)
        p, s_0, s_1, s_2 = adamw_sf_math(p, g, s_0, s_1, s_2, lr, tl.load(sp + 1), tl.load(sp + 3),
                                         tl.load(sp + 4), tl.load(sp + 5), tl.load(sp + 6), tl.load(sp + 7),
                                         tl.load(sp + 8), tl.load(sp + 9), gm, F0)
    elif RULE == NADAM:
        p, s_0, s_1 = nadam_math(p, g, s_0, s_1, lr, wd, tl.load(sp + 2), tl.load(sp + 3), tl.load(sp + 4),
                                 tl.load(sp + 5), tl.load(sp + 6), tl.load(sp + 7), gm, F0)
    else:
        tl.static_assert(RULE == RMSPROP, "rule not served by the multi-buffer kernel")
        # state order: square_avg [, momentum_buffer] [, grad_avg]
        if F1 and not F0:  # centered only: (square_avg, grad_avg)
            p, s_0, s_2, s_1 = rmsprop_math(p, g, s_0, s_2, s_1, lr, wd, tl.load(sp + 2), tl.load(sp + 3),
                                            tl.load(sp + 4), gm, F0, F1)
        else:
            p, s_0, s_1, s_2 = rmsprop_math(p, g, s_0, s_1, s_2, lr, wd, tl.load(sp + 2), tl.load(sp + 3),
                                            tl.load(sp + 4), gm, F0, F1)
    store_lists(ptr_tab, n_tensors, t, idx, mask, p, s_0, s_1, s_2, key, 2 + NSTATE, PDT, SDT, MASTER, SR)


# ---------------------------------------------------------------------------------- the kernels
@triton.jit
def one_buffer_kernel(ptr_tab, n_tensors, scal_tab, prog_tab, seg_tab, n_seg, found_inf_ptr, grad_scale_ptr,
                      RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                      NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                      SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s0 = tl.load(prog_tab + pid)
    s1 = tl.load(prog_tab + pid + 1)
    # distinct names per branch: a compiled if/else must not merge a scalar t with a block t
    if s1 - s0 == 1:  # the block lies inside one tensor
        t1, idx1, mask1 = full_block(seg_tab, n_seg, s0, BLOCK)
        _one_buffer_body(ptr_tab, n_tensors, scal_tab, t1, idx1, mask1, found_inf_ptr, grad_scale_ptr,
                         RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE)
    else:  # several small tensors packed into this block
        t2, idx2, mask2 = locate(seg_tab, n_seg, s0, s1, BLOCK)
        _one_buffer_body(ptr_tab, n_tensors, scal_tab, t2, idx2, mask2, found_inf_ptr, grad_scale_ptr,
                         RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE)


@triton.jit
def multi_buffer_kernel(ptr_tab, n_tensors, scal_tab, prog_tab, seg_tab, n_seg, found_inf_ptr, grad_scale_ptr,
                        RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                        NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                        SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s0 = tl.load(prog_tab + pid)
    s1 = tl.load(prog_tab + pid + 1)
    if s1 - s0 == 1:
        t1, idx1, mask1 = full_block(seg_tab, n_seg, s0, BLOCK)
        _multi_buffer_body(ptr_tab, n_tensors, scal_tab, t1, idx1, mask1, found_inf_ptr, grad_scale_ptr,
                           RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE)
    else:
        t2, idx2, mask2 = locate(seg_tab, n_seg, s0, s1, BLOCK)
        _multi_buffer_body(ptr_tab, n_tensors, scal_tab, t2, idx2, mask2, found_inf_ptr, grad_scale_ptr,
                           RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE)


KERNELS = {"one": one_buffer_kernel, "multi": multi_buffer_kernel}
