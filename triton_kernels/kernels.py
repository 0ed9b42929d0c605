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

from .rules import WRITES, multi_buffer_math, one_buffer_math

# Storage codes of ``_addr`` beyond the param/state dtypes (0 fp32, 1 fp16, 2 bf16): raw 16-bit words, and the
# int8_state codes (int8 for signed states, uint8 for non-negative ones). MASTER modes (the extra list after the
# states): 1 an fp32 master copy (layout master), 2 the int16 low half of the master (layout master16).
BITS16 = tl.constexpr(3)
CODES_S8 = tl.constexpr(4)
CODES_U8 = tl.constexpr(5)
MASTER_COPY = tl.constexpr(1)
MASTER_REMAINDER = tl.constexpr(2)


# ----------------------------------------------------------------------------------------- storage
@triton.jit
def _addr(ptr_tab, list_i, n_tensors, t, off, idx, DTYPE: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr,
          HW_BF16: tl.constexpr):
    """Element pointers of list ``list_i``. FULL: ``t`` and ``off`` are scalars (the tensor, the block's first
    element) and ``idx`` the int32 lanes, so the 64-bit arithmetic is done once per block, and with ALIGNED (the
    launcher checked every pointer for 16-byte alignment) the compiler may use 128-bit accesses. Otherwise ``t``
    and ``idx`` are per lane (int64 element index in the tensor). bf16 is a bf16 pointer with HW_BF16 (compiled),
    uint16 bits under the interpreter."""
    base = tl.load(ptr_tab + list_i * n_tensors + t)
    if DTYPE == 0:
        ptr = base.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        ptr = base.to(tl.pointer_type(tl.float16))
    elif DTYPE == BITS16:  # raw 16 bits (master16: the bf16 param's bits and the int16 remainder)
        ptr = base.to(tl.pointer_type(tl.uint16))
    elif DTYPE == CODES_S8:  # int8_state codes of a signed state
        ptr = base.to(tl.pointer_type(tl.int8))
    elif DTYPE == CODES_U8:  # int8_state codes of a non-negative state
        ptr = base.to(tl.pointer_type(tl.uint8))
    elif HW_BF16:
        ptr = base.to(tl.pointer_type(tl.bfloat16))
    else:
        ptr = base.to(tl.pointer_type(tl.uint16))
    if FULL:
        ptr = ptr + off
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
    return ptr + idx


@triton.jit
def _load(ptr_tab, list_i, n_tensors, t, off, idx, mask, DTYPE: tl.constexpr, FULL: tl.constexpr,
          ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    ptr = _addr(ptr_tab, list_i, n_tensors, t, off, idx, DTYPE, FULL, ALIGNED, HW_BF16)
    if FULL:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0)
    if DTYPE == 2 and not HW_BF16:
        x = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_bits16(ptr_tab, list_i, n_tensors, t, off, idx, mask, FULL: tl.constexpr, ALIGNED: tl.constexpr,
                 HW_BF16: tl.constexpr):
    """A 16-bit list's raw bits as uint32."""
    ptr = _addr(ptr_tab, list_i, n_tensors, t, off, idx, BITS16, FULL, ALIGNED, HW_BF16)
    if FULL:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0)
    return x.to(tl.uint32)


@triton.jit
def master16_decode(hi, lo):
    """(bf16 param bits, remainder bits), uint32 holding 16 bits each -> the fp32 master (layouts.master16_decode):
    u = ((hi - (lo >> 15)) << 16) | lo on 16-bit halves; a NaN from a param that is not NaN (a +-0 or +-inf
    written beside a stale remainder) decodes to the param."""
    u = (((hi - (lo >> 15)) & 0xFFFF) << 16) | lo
    stale = ((u & 0x7FFFFFFF) > 0x7F800000) & ((hi & 0x7FFF) <= 0x7F80)
    u = tl.where(stale, hi << 16, u)
    return u.to(tl.float32, bitcast=True)


@triton.jit
def master16_encode(x):
    """fp32 master -> (param bits, remainder bits) as uint16 (layouts.master16_encode): the param rounds to
    nearest with ties away from zero, (u + 0x8000) >> 16; a NaN gives a quiet NaN with its sign; the remainder is
    the low half."""
    u = x.to(tl.uint32, bitcast=True)
    hi = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, (u + 0x8000) >> 16) & 0xFFFF
    return hi.to(tl.uint16), (u & 0xFFFF).to(tl.uint16)


@triton.jit
def load_lists(ptr_tab, n_tensors, t, off, idx, mask, NLISTS: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr,
               MASTER: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    """Up to 5 lists (p, g, s0, s1, s2) as fp32; missing ones alias the grad. With MASTER == 1, p is read
    from the fp32 master list (list NLISTS); with MASTER == 2 it is the master decoded from the bf16 param's bits
    and the int16 remainder (list NLISTS)."""
    if MASTER == MASTER_COPY:
        p = _load(ptr_tab, NLISTS, n_tensors, t, off, idx, mask, 0, FULL, ALIGNED, HW_BF16)
    elif MASTER == MASTER_REMAINDER:
        p = master16_decode(_load_bits16(ptr_tab, 0, n_tensors, t, off, idx, mask, FULL, ALIGNED, HW_BF16),
                            _load_bits16(ptr_tab, NLISTS, n_tensors, t, off, idx, mask, FULL, ALIGNED, HW_BF16))
    else:
        p = _load(ptr_tab, 0, n_tensors, t, off, idx, mask, PDT, FULL, ALIGNED, HW_BF16)
    g = _load(ptr_tab, 1, n_tensors, t, off, idx, mask, PDT, FULL, ALIGNED, HW_BF16)
    s_0 = g
    s_1 = g
    s_2 = g
    if NLISTS >= 3:
        s_0 = _load(ptr_tab, 2, n_tensors, t, off, idx, mask, SDT, FULL, ALIGNED, HW_BF16)
    if NLISTS >= 4:
        s_1 = _load(ptr_tab, 3, n_tensors, t, off, idx, mask, SDT, FULL, ALIGNED, HW_BF16)
    if NLISTS >= 5:
        s_2 = _load(ptr_tab, 4, n_tensors, t, off, idx, mask, SDT, FULL, ALIGNED, HW_BF16)
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
def sr_bf16_bits_lohi(x, lo, hi, key_b):
    """fp32 -> bf16 bits with the stochastic rounding of layouts.sr_round_bf16; the element index given as its
    low and high 32 bits (uint32)."""
    bits = x.to(tl.uint32, bitcast=True)
    h = lo ^ key_b ^ (hi * tl.full([], 0x85EBCA6B, tl.uint32))
    r = _lowbias32(h) & 0xFFFF
    up = (bits + r) >> 16
    rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rne = tl.where(x != x, (bits >> 16) | 0x40, rne)
    return tl.where((bits & 0x7F800000) == 0x7F800000, rne, up)


@triton.jit
def sr_bf16_bits(x, idx, key_b):
    """fp32 -> bf16 bits with the stochastic rounding of layouts.sr_round_bf16 (idx: int64 element index in the
    tensor, key_b: uint32)."""
    return sr_bf16_bits_lohi(x, idx.to(tl.uint32), (idx >> 32).to(tl.uint32), key_b)


@triton.jit
def store_fp32(ptr_tab, list_i, n_tensors, t, off, idx, mask, x, DTYPE: tl.constexpr, SR: tl.constexpr, key,
               FULL: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    """Store fp32 values ``x`` as DTYPE. bf16: round to nearest even (compiled: the hardware conversion; under the
    interpreter, whose ``.to(tl.bfloat16)`` truncates, on the bits; both give the same bits for every non-NaN
    value, and a NaN stays a quiet NaN whose payload is not specified: docs/triton.md), or stochastically with SR
    (key: the uint32 key of this tensor and buffer)."""
    ptr = _addr(ptr_tab, list_i, n_tensors, t, off, idx, DTYPE, FULL, ALIGNED, HW_BF16)
    if DTYPE == 0:
        y = x
    elif DTYPE == 1:
        y = x.to(tl.float16)
    elif SR:
        if FULL:  # element index off + lane; off is a multiple of BLOCK, so no carry out of the low 32 bits
            lo = off.to(tl.uint32) + idx.to(tl.uint32)
            hi = (off >> 32).to(tl.uint32)
        else:
            lo = idx.to(tl.uint32)
            hi = (idx >> 32).to(tl.uint32)
        y = sr_bf16_bits_lohi(x, lo, hi, key).to(tl.uint16)
        if HW_BF16:
            y = y.to(tl.bfloat16, bitcast=True)
    elif HW_BF16:
        y = x.to(tl.bfloat16)
    else:  # fp32 -> bf16 round-to-nearest-even on the bits; NaN stays a (quiet) NaN
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = tl.where(x != x, (bits >> 16) | 0x40, rounded).to(tl.uint16)
    if FULL:
        tl.store(ptr, y)
    else:
        tl.store(ptr, y, mask=mask)


@triton.jit
def store_lists(ptr_tab, n_tensors, t, off, idx, mask, p, s_0, s_1, s_2, key, NLISTS: tl.constexpr,
                PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, FULL: tl.constexpr,
                ALIGNED: tl.constexpr, HW_BF16: tl.constexpr, WR: tl.constexpr):
    """Write p (and the master copy, or p as the master16 pair) and the NLISTS - 2 state values (the grad, list 1, is never
    written), those the rule writes (WR, rules.WRITES: bit 0 p, which the master layouts always write, bit 1 + j
    state j). Buffer b of the stochastic rounding: 0 for p, 1 + j for state j (layouts.py)."""
    golden = tl.full([], 0x9E3779B9, tl.uint32)
    if MASTER == MASTER_REMAINDER:
        hi, lo = master16_encode(p)
        ptr_hi = _addr(ptr_tab, 0, n_tensors, t, off, idx, BITS16, FULL, ALIGNED, HW_BF16)
        ptr_lo = _addr(ptr_tab, NLISTS, n_tensors, t, off, idx, BITS16, FULL, ALIGNED, HW_BF16)
        if FULL:
            tl.store(ptr_hi, hi)
            tl.store(ptr_lo, lo)
        else:
            tl.store(ptr_hi, hi, mask=mask)
            tl.store(ptr_lo, lo, mask=mask)
    else:
        if MASTER == MASTER_COPY:
            store_fp32(ptr_tab, NLISTS, n_tensors, t, off, idx, mask, p, 0, False, key, FULL, ALIGNED, HW_BF16)
            store_fp32(ptr_tab, 0, n_tensors, t, off, idx, mask, p, PDT, SR, key, FULL, ALIGNED, HW_BF16)
        elif (WR & 1) != 0:
            store_fp32(ptr_tab, 0, n_tensors, t, off, idx, mask, p, PDT, SR, key, FULL, ALIGNED, HW_BF16)
    if NLISTS >= 3:
        if (WR & 2) != 0:
            store_fp32(ptr_tab, 2, n_tensors, t, off, idx, mask, s_0, SDT, SR, key + golden, FULL, ALIGNED, HW_BF16)
    if NLISTS >= 4:
        if (WR & 4) != 0:
            store_fp32(ptr_tab, 3, n_tensors, t, off, idx, mask, s_1, SDT, SR, key + golden * 2, FULL, ALIGNED,
                       HW_BF16)
    if NLISTS >= 5:
        if (WR & 8) != 0:
            store_fp32(ptr_tab, 4, n_tensors, t, off, idx, mask, s_2, SDT, SR, key + golden * 3, FULL, ALIGNED,
                       HW_BF16)


@triton.jit
def locate_sub(seg_tab, n_seg, s0, s1, first, SUB: tl.constexpr):
    """Packed path, lanes first .. first + SUB - 1 of the block: per lane (tensor, element index, mask) from the
    segments s0 .. s1-1 (int64: a tail of a large tensor may lie beyond element 2**31)."""
    lanes = first + tl.arange(0, SUB).to(tl.int64)
    seg = tl.zeros([SUB], dtype=tl.int64) + s0
    for s in range(s0 + 1, s1):
        seg += (lanes >= tl.load(seg_tab + 2 * n_seg + s)).to(tl.int64)
    t = tl.load(seg_tab + seg)
    off = tl.load(seg_tab + n_seg + seg)
    rel = lanes - tl.load(seg_tab + 2 * n_seg + seg)
    length = tl.load(seg_tab + 3 * n_seg + seg)
    return t, off + rel, (rel >= 0) & (rel < length)


# ------------------------------------------------------------------------------------ the bodies
@triton.jit
def _prologue(scal_tab, t, grad_scale_ptr, NSCAL: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, SR: tl.constexpr):
    """What every rule body starts with: the tensor's scalar row; lr (entry 0 of every pack), entry 1 (the
    weight_decay of every rule but those of rules._NO_PROLOGUE_WD, whose branches read theirs by name) and
    grad_mult (the last of the rule's NSCAL; rules.py asserts all three), divided by the device scale; the stochastic-rounding key
    (column NSCAL, only with SR: rows are NSCAL + SR wide). ``t`` is a scalar (full block) or per lane."""
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
    return sp, lr, wd, gm, key


@triton.jit
def _one_buffer_body(ptr_tab, n_tensors, scal_tab, t, off, idx, mask, grad_scale_ptr,
                     RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                     NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                     SR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr,
                     HW_BF16: tl.constexpr):
    sp, lr, wd, gm, key = _prologue(scal_tab, t, grad_scale_ptr, NSCAL, HAS_GRAD_SCALE, SR)
    p, g, b, _s1, _s2 = load_lists(ptr_tab, n_tensors, t, off, idx, mask, 2 + NSTATE, PDT, SDT, MASTER, FULL, ALIGNED,
                                   HW_BF16)
    p, b = one_buffer_math(p, g, b, sp, lr, wd, gm, RULE, F0, F1)
    store_lists(ptr_tab, n_tensors, t, off, idx, mask, p, b, b, b, key, 2 + NSTATE, PDT, SDT, MASTER, SR, FULL,
                ALIGNED, HW_BF16, WRITES[RULE])


@triton.jit
def _multi_buffer_body(ptr_tab, n_tensors, scal_tab, t, off, idx, mask, grad_scale_ptr,
                       RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                       NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                       SR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr,
                       HW_BF16: tl.constexpr):
    sp, lr, wd, gm, key = _prologue(scal_tab, t, grad_scale_ptr, NSCAL, HAS_GRAD_SCALE, SR)
    p, g, s_0, s_1, s_2 = load_lists(ptr_tab, n_tensors, t, off, idx, mask, 2 + NSTATE, PDT, SDT, MASTER, FULL,
                                     ALIGNED, HW_BF16)
    p, s_0, s_1, s_2 = multi_buffer_math(p, g, s_0, s_1, s_2, sp, lr, wd, gm, RULE, F0, F1)
    store_lists(ptr_tab, n_tensors, t, off, idx, mask, p, s_0, s_1, s_2, key, 2 + NSTATE, PDT, SDT, MASTER, SR, FULL,
                ALIGNED, HW_BF16, WRITES[RULE])


@triton.jit
def _body(ptr_tab, n_tensors, scal_tab, t, off, idx, mask, grad_scale_ptr, MULTI: tl.constexpr,
          RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr, NSCAL: tl.constexpr,
          PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
          FULL: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    if MULTI:
        _multi_buffer_body(ptr_tab, n_tensors, scal_tab, t, off, idx, mask, grad_scale_ptr, RULE, F0, F1, NSTATE,
                           NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, FULL, ALIGNED, HW_BF16)
    else:
        _one_buffer_body(ptr_tab, n_tensors, scal_tab, t, off, idx, mask, grad_scale_ptr, RULE, F0, F1, NSTATE,
                         NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, FULL, ALIGNED, HW_BF16)


@triton.jit
def _full_program(ptr_tab, n_tensors, scal_tab, full_tab, n_full, pid, grad_scale_ptr, MULTI: tl.constexpr,
                  RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                  NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    """A block inside one tensor: two independent int32 loads (tensor, block index), then the pointers; no mask,
    scalar base + int32 lanes."""
    t = tl.load(full_tab + pid).to(tl.int64)
    off = tl.load(full_tab + n_full + pid).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    _body(ptr_tab, n_tensors, scal_tab, t, off, lanes, None, grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE, NSCAL,
          PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, True, ALIGNED, HW_BF16)


@triton.jit
def _packed_program(ptr_tab, n_tensors, scal_tab, prog_tab, seg_tab, n_seg, q, grad_scale_ptr, MULTI: tl.constexpr,
                    RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                    NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                    SR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, SUB: tl.constexpr, HW_BF16: tl.constexpr):
    """Packed block q (small tensors and the tails of large ones), SUB lanes at a time: the per-lane gathers of
    pointers and hyperparameters then hold few registers (SUB = 32 x num_warps: one element per thread)."""
    s0 = tl.load(prog_tab + q)
    s1 = tl.load(prog_tab + q + 1)
    fill = tl.load(seg_tab + 2 * n_seg + s1 - 1) + tl.load(seg_tab + 3 * n_seg + s1 - 1)
    for first in range(0, fill, SUB):
        t, idx, mask = locate_sub(seg_tab, n_seg, s0, s1, first, SUB)
        _body(ptr_tab, n_tensors, scal_tab, t, 0, idx, mask, grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE, NSCAL,
              PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, False, False, HW_BF16)


@triton.jit
def _step(ptr_tab, n_tensors, scal_tab, full_tab, n_full, prog_tab, seg_tab, n_seg, found_inf_ptr, grad_scale_ptr,
          MULTI: tl.constexpr, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
          NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
          HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
          PATHS: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    """Programs 0 .. n_full-1 are full blocks, the others packed blocks. PATHS: 1 full blocks only, 2 packed only,
    3 both (the launcher compiles only the paths a bucket needs)."""
    pid = tl.program_id(0)
    go = True
    if HAS_FOUND_INF:  # GradScaler on the device: found_inf != 0 -> nothing is read or written
        go = tl.load(found_inf_ptr) == 0
    if go:
        if PATHS == 1:
            _full_program(ptr_tab, n_tensors, scal_tab, full_tab, n_full, pid, grad_scale_ptr, MULTI, RULE, F0, F1,
                          NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, BLOCK, ALIGNED, HW_BF16)
        elif PATHS == 2:
            _packed_program(ptr_tab, n_tensors, scal_tab, prog_tab, seg_tab, n_seg, pid, grad_scale_ptr, MULTI, RULE,
                            F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, SUB, HW_BF16)
        else:
            if pid < n_full:
                _full_program(ptr_tab, n_tensors, scal_tab, full_tab, n_full, pid, grad_scale_ptr, MULTI, RULE, F0,
                              F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, BLOCK, ALIGNED, HW_BF16)
            else:
                _packed_program(ptr_tab, n_tensors, scal_tab, prog_tab, seg_tab, n_seg, pid - n_full, grad_scale_ptr,
                                MULTI, RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_GRAD_SCALE, SUB, HW_BF16)


# ---------------------------------------------------------------------------------- the kernels
@triton.jit
def one_buffer_kernel(ptr_tab, n_tensors, scal_tab, full_tab, n_full, prog_tab, seg_tab, n_seg, found_inf_ptr,
                      grad_scale_ptr, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                      NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                      SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr, SUB: tl.constexpr, PATHS: tl.constexpr, ALIGNED: tl.constexpr,
                      HW_BF16: tl.constexpr):
    _step(ptr_tab, n_tensors, scal_tab, full_tab, n_full, prog_tab, seg_tab, n_seg, found_inf_ptr, grad_scale_ptr,
          False, RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE, BLOCK, SUB, PATHS,
          ALIGNED, HW_BF16)


@triton.jit
def multi_buffer_kernel(ptr_tab, n_tensors, scal_tab, full_tab, n_full, prog_tab, seg_tab, n_seg, found_inf_ptr,
                        grad_scale_ptr, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
                        NSCAL: tl.constexpr, PDT: tl.constexpr, SDT: tl.constexpr, MASTER: tl.constexpr,
                        SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        BLOCK: tl.constexpr, SUB: tl.constexpr, PATHS: tl.constexpr, ALIGNED: tl.constexpr,
                        HW_BF16: tl.constexpr):
    _step(ptr_tab, n_tensors, scal_tab, full_tab, n_full, prog_tab, seg_tab, n_seg, found_inf_ptr, grad_scale_ptr,
          True, RULE, F0, F1, NSTATE, NSCAL, PDT, SDT, MASTER, SR, HAS_FOUND_INF, HAS_GRAD_SCALE, BLOCK, SUB, PATHS,
          ALIGNED, HW_BF16)


KERNELS = {"one": one_buffer_kernel, "multi": multi_buffer_kernel}
# compiled (HW_BF16: bf16 through the hardware conversion) or the interpreter (bf16 as bits)
INTERPRETED = type(one_buffer_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------ int8_state (block codes)
# layouts.py defines the code map (int8_table, int8_factors, int8_midpoints, INT8_BLOCK): the launcher uploads one
# fp32 tensor [signed values | unsigned values | unsigned midpoints] (int8_code_table); the sizes, offsets and the
# encode's constants are derived here from the same module.
def _int8_facts():
    from ..layouts import INT8_BLOCK, INT8_K_SIGNED, INT8_K_UNSIGNED, INT8_TINY, int8_table
    return INT8_BLOCK, int8_table(True).numel(), int8_table(False).numel(), INT8_K_SIGNED, INT8_K_UNSIGNED, INT8_TINY


_G, _NS, _NU, _KS, _KU, _TINY = _int8_facts()
INT8_GROUP = tl.constexpr(_G)  # elements per fp32 scale
INT8_S_TAB, INT8_U_TAB, INT8_U_MID = tl.constexpr(0), tl.constexpr(_NS), tl.constexpr(_NS + _NU)
INT8_S_ZERO = tl.constexpr((_NS - 1) // 2)  # table index of the signed code 0 (= the largest signed code, 127)
INT8_U_TOP = tl.constexpr(_NU - 1)  # the largest unsigned code, 255
INT8_K_S, INT8_K_U, INT8_TINY, INT8_UNTINY = (tl.constexpr(x) for x in (_KS, _KU, _TINY, 1.0 / _TINY))


@triton.jit
def int8_encode_index(y, tab_ptr, UNSIGNED: tl.constexpr):
    """The integer-space value y' = (x u) k of layouts.int8_encode -> the table index (the code + 127 signed, the
    code unsigned), in csrc/compressed.h's form (int8_code_signed / _unsigned): a guess from the map's shape (signed
    sqrt|y'|, unsigned y'^(1/4)) plus 1/2 + 1/8, truncated and clamped to the top code, is the magnitude code c* or
    c* + 1 (compressed.h); one comparison with the midpoint between c - 1 and c fixes it: signed c (c - 1) + 1/2,
    exact in fp32 arithmetic; unsigned ((c - 1)^4 + c^4) / 2 rounded once, read from the uploaded table (computing
    it needs an fma, which the interpreter rounds twice, or float64, slow on most GPUs). A value on a midpoint takes
    the smaller magnitude; a NaN the top code; an unsigned y' > 0 code 1 at least (layouts.int8_codes_of's floor)
    (tests/triton/test_compressed_triton.py checks every midpoint and its fp32 neighbours)."""
    if UNSIGNED:
        t = tl.sqrt(tl.sqrt(tl.where(y <= 0, 0.0, y))) + (0.5 + 0.125)  # NaN stays NaN: the top
        k = tl.where(t < INT8_U_TOP, t, INT8_U_TOP).to(tl.int32)
        m = tl.load(tab_ptr + INT8_U_MID + tl.maximum(k - 1, 0))
        k = k - ((k > 0) & (y <= m)).to(tl.int32)
        return tl.where(y > 0, tl.maximum(k, 1), k)  # the floor: y' > 0 takes code 1 at least
    else:
        a = tl.abs(y)
        t = tl.sqrt(a) + (0.5 + 0.125)
        c = tl.where(t < INT8_S_ZERO, t, INT8_S_ZERO).to(tl.int32)
        cf = c.to(tl.float32)
        c = c - ((c > 0) & (a <= cf * (cf - 1.0) + 0.5)).to(tl.int32)  # exact: no rounding, fused or not
        # (the tensor first: in triton 3.7's interpreter constexpr + tensor is no tensor tl.store takes)
        return tl.where(y < 0, -c, c) + INT8_S_ZERO


@triton.jit
def _int8_sr_power(c, UNSIGNED: tl.constexpr):
    c2 = c * c
    if UNSIGNED:
        c2 = c2 * c2
    return c2


@triton.jit
def int8_encode_index_sr(y, r, UNSIGNED: tl.constexpr):
    """The integer-space value y' and 16 random bits r (uint32) -> the table index, the code rounded stochastically
    (layouts int8_sr / master16_int8_sr; layouts.int8_codes_sr_of, csrc/compressed.h int8_code_sr): with p(c) = c^2
    or c^4, f the largest code with p(f) <= |y'| (unsigned max(y', 0)), the code is f + 1 when
    r (p(f + 1) - p(f)) < (|y'| - p(f)) 2^16, else f; NaN the top code. As compressed.h: n = the fp32 root rounded
    (floor(t) or floor(t) + 1), f = n - (a < p(n)), the bracket's other end from n -+ 1; the comparisons in float64,
    where every product and difference here is exact (a contraction into an fma changes nothing)."""
    if UNSIGNED:
        a32 = tl.where((y > 0) | (y != y), y, 0.0)
        top = 255.0
        g = tl.sqrt(tl.sqrt(a32))
    else:
        a32 = tl.abs(y)
        top = 127.0
        g = tl.sqrt(a32)
    n = tl.floor(tl.where(g < top, g, top) + 0.5).to(tl.float64)  # (NaN: the top; masked below)
    a = a32.to(tl.float64)
    pn = _int8_sr_power(n, UNSIGNED)
    below = a < pn
    f = tl.where(below, n - 1.0, n)
    q = _int8_sr_power(tl.where(below, f, n + 1.0), UNSIGNED)
    lo = tl.where(below, q, pn)
    hi = tl.where(below, pn, q)
    up = (f < top) & (r.to(tl.float64) * (hi - lo) < (a - lo) * 65536.0)
    if UNSIGNED:
        up = up | ((f == 0.0) & (a > 0.0))  # the floor: f = 0 < a goes up
    c = tl.where(a != a, top, f + up.to(tl.float64)).to(tl.int32)
    if UNSIGNED:
        return c
    return tl.where(y < 0, -c, c) + INT8_S_ZERO


@triton.jit
def _int8_ptr(ptr_tab, list_i, n_tensors, t, off, lanes, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers of list ``list_i`` of tensor ``t`` (scalar) at element ``off`` (int64 scalar, a multiple of
    ROWS x INT8_GROUP, or of ROWS for the scales) plus int32 ``lanes``: the 64-bit arithmetic once per program and,
    with ALIGNED (every data pointer 16-byte aligned), 128-bit accesses."""
    base = tl.load(ptr_tab + list_i * n_tensors + t)
    if DTYPE == CODES_S8:
        ptr = base.to(tl.pointer_type(tl.int8))
    elif DTYPE == CODES_U8:
        ptr = base.to(tl.pointer_type(tl.uint8))
    elif DTYPE == BITS16:  # master16_int8: the bf16 param's and grad's bits, the int16 remainder
        ptr = base.to(tl.pointer_type(tl.uint16))
    else:
        ptr = base.to(tl.pointer_type(tl.float32))
    ptr = ptr + off
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr + lanes


@triton.jit
def _int8_load(ptr_tab, list_i, scale_list, n_tensors, t, off, lanes, rmask, srow, tab_ptr, UNSIGNED: tl.constexpr,
               ALIGNED: tl.constexpr):
    """State list ``list_i`` of a quantized tensor, decoded: table value of each code times its block's scale."""
    if UNSIGNED:
        code = tl.load(_int8_ptr(ptr_tab, list_i, n_tensors, t, off, lanes, CODES_U8, ALIGNED), mask=rmask, other=0)
        k = code.to(tl.int32) + INT8_U_TAB
    else:
        code = tl.load(_int8_ptr(ptr_tab, list_i, n_tensors, t, off, lanes, CODES_S8, ALIGNED), mask=rmask, other=0)
        k = tl.maximum(code.to(tl.int32), -127) + (INT8_S_TAB + INT8_S_ZERO)  # (-128, outside the map: as -127)
    scale = tl.load(_int8_ptr(ptr_tab, scale_list, n_tensors, t, off // INT8_GROUP, srow, 0, ALIGNED), mask=rmask,
                    other=0.0)
    return tl.load(tab_ptr + k) * scale


@triton.jit
def _int8_store(ptr_tab, list_i, scale_list, n_tensors, t, off, lanes, rmask, srow, x, tab_ptr,
                UNSIGNED: tl.constexpr, ALIGNED: tl.constexpr, SRQ: tl.constexpr = False, key_b=0):
    """Encode state values ``x`` [rows, INT8_GROUP]: per row the absmax (the scale; a NaN makes it NaN, as
    torch.amax), the integer-space y' = (x u) k, its code (SRQ: rounded stochastically with the bits of each
    element's index off + lanes under ``key_b``, the tensor's key of this state's buffer); store codes and
    scales."""
    # torch.amax propagates NaN, the hardware max does not: a row's NaNs are added back (their sum; 0 without)
    scale = tl.max(tl.abs(x), axis=1, keep_dims=True) + tl.sum(tl.where(x != x, x, 0.0), axis=1, keep_dims=True)
    # layouts.int8_factors: u = 2^64 for a scale in (0, 2^-64), k = K / (scale u) correctly rounded (0 for 0)
    u = tl.where((scale > 0) & (scale < INT8_TINY), INT8_UNTINY, 1.0)
    kk = tl.math.div_rn(tl.full(scale.shape, INT8_K_U if UNSIGNED else INT8_K_S, tl.float32), scale * u)
    kk = tl.where(scale == 0, 0.0, kk)
    if SRQ:
        idx = off + lanes.to(tl.int64)
        h = idx.to(tl.uint32) ^ key_b ^ ((idx >> 32).to(tl.uint32) * tl.full([], 0x85EBCA6B, tl.uint32))
        k = int8_encode_index_sr((x * u) * kk, _lowbias32(h) & 0xFFFF, UNSIGNED)
    else:
        k = int8_encode_index((x * u) * kk, tab_ptr, UNSIGNED)
    if UNSIGNED:
        tl.store(_int8_ptr(ptr_tab, list_i, n_tensors, t, off, lanes, CODES_U8, ALIGNED), k.to(tl.uint8), mask=rmask)
    else:
        tl.store(_int8_ptr(ptr_tab, list_i, n_tensors, t, off, lanes, CODES_S8, ALIGNED), (k - INT8_S_ZERO).to(tl.int8),
                 mask=rmask)
    tl.store(_int8_ptr(ptr_tab, scale_list, n_tensors, t, off // INT8_GROUP, srow, 0, ALIGNED), scale, mask=rmask)


@triton.jit
def _int8_body(ptr_tab, n_tensors, scal_tab, t, off, lanes, rmask, srow, tab_ptr, grad_scale_ptr,
               MULTI: tl.constexpr, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, NSTATE: tl.constexpr,
               NSCAL: tl.constexpr, UNSIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr,
               ALIGNED: tl.constexpr, SRQ: tl.constexpr = False):
    """A quantized tensor's rows ``off`` + ``lanes`` ([ROWS, INT8_GROUP]; ``rmask``: the rows inside the tensor,
    ``srow`` the rows' index [ROWS, 1]): fp32 param and grad, each state decoded from its codes (list 2 + j) and
    block scales (list SC + j), the fp32 rule, the states encoded again. UNSIGNED: bit j set when state j
    is non-negative (uint8 codes). MASTER == 2 (master16_int8): bf16 param and grad, the param value the master
    decoded from the param's bits and the int16 remainder (list 2 + NSTATE), encoded back into both; the scales
    follow the remainder (SC = 3 + NSTATE, else 2 + NSTATE). SRQ: the codes rounded stochastically, the tensor's
    key in the scalar row's last column (``_prologue``), state j's bits under buffer 1 + j."""
    sp, lr, wd, gm, key = _prologue(scal_tab, t, grad_scale_ptr, NSCAL, HAS_GRAD_SCALE, SRQ)
    golden = tl.full([], 0x9E3779B9, tl.uint32)
    SC = 2 + NSTATE
    if MASTER == MASTER_REMAINDER:
        SC = 3 + NSTATE
        hi = tl.load(_int8_ptr(ptr_tab, 0, n_tensors, t, off, lanes, BITS16, ALIGNED), mask=rmask, other=0)
        lo = tl.load(_int8_ptr(ptr_tab, 2 + NSTATE, n_tensors, t, off, lanes, BITS16, ALIGNED), mask=rmask, other=0)
        p = master16_decode(hi.to(tl.uint32), lo.to(tl.uint32))
        g = tl.load(_int8_ptr(ptr_tab, 1, n_tensors, t, off, lanes, BITS16, ALIGNED), mask=rmask, other=0)
        g = (g.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        p = tl.load(_int8_ptr(ptr_tab, 0, n_tensors, t, off, lanes, 0, ALIGNED), mask=rmask, other=0.0)
        g = tl.load(_int8_ptr(ptr_tab, 1, n_tensors, t, off, lanes, 0, ALIGNED), mask=rmask, other=0.0)
    s_0 = g
    s_1 = g
    s_2 = g
    if NSTATE >= 1:
        s_0 = _int8_load(ptr_tab, 2, SC, n_tensors, t, off, lanes, rmask, srow, tab_ptr, UNSIGNED & 1, ALIGNED)
    if NSTATE >= 2:
        s_1 = _int8_load(ptr_tab, 3, SC + 1, n_tensors, t, off, lanes, rmask, srow, tab_ptr, UNSIGNED & 2, ALIGNED)
    if NSTATE >= 3:
        s_2 = _int8_load(ptr_tab, 4, SC + 2, n_tensors, t, off, lanes, rmask, srow, tab_ptr, UNSIGNED & 4, ALIGNED)
    if MULTI:
        p, s_0, s_1, s_2 = multi_buffer_math(p, g, s_0, s_1, s_2, sp, lr, wd, gm, RULE, F0, F1)
    else:
        p, s_0 = one_buffer_math(p, g, s_0, sp, lr, wd, gm, RULE, F0, F1)
    if MASTER == MASTER_REMAINDER:
        hi, lo = master16_encode(p)
        tl.store(_int8_ptr(ptr_tab, 0, n_tensors, t, off, lanes, BITS16, ALIGNED), hi, mask=rmask)
        tl.store(_int8_ptr(ptr_tab, 2 + NSTATE, n_tensors, t, off, lanes, BITS16, ALIGNED), lo, mask=rmask)
    else:
        tl.store(_int8_ptr(ptr_tab, 0, n_tensors, t, off, lanes, 0, ALIGNED), p, mask=rmask)
    if NSTATE >= 1:
        _int8_store(ptr_tab, 2, SC, n_tensors, t, off, lanes, rmask, srow, s_0, tab_ptr, UNSIGNED & 1, ALIGNED,
                    SRQ, key + golden)
    if NSTATE >= 2:
        _int8_store(ptr_tab, 3, SC + 1, n_tensors, t, off, lanes, rmask, srow, s_1, tab_ptr, UNSIGNED & 2, ALIGNED,
                    SRQ, key + golden * 2)
    if NSTATE >= 3:
        _int8_store(ptr_tab, 4, SC + 2, n_tensors, t, off, lanes, rmask, srow, s_2, tab_ptr, UNSIGNED & 4, ALIGNED,
                    SRQ, key + golden * 3)


@triton.jit
def int8_state_kernel(ptr_tab, n_tensors, scal_tab, prog_tab, n_prog, numel_tab, tab_ptr, found_inf_ptr,
                      grad_scale_ptr, MULTI: tl.constexpr, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                      NSTATE: tl.constexpr, NSCAL: tl.constexpr, UNSIGNED: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ROWS: tl.constexpr,
                      KINDS: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr, PDT: tl.constexpr = 0,
                      MASTER: tl.constexpr = 0, SRQ: tl.constexpr = False):
    """Layout int8_state, one launch per bucket: program i updates ROWS x INT8_GROUP elements of tensor
    prog_tab[i] from block prog_tab[n_prog + i]; prog_tab[2 n_prog + i] = 1 when the tensor is quantized (codes and
    block scales: ``_int8_body``; its size is a multiple of INT8_GROUP, so the rows are whole blocks, masked by
    row), 0 when it keeps fp32 state (the lists 2.. hold fp32 states then: the elementwise body, masked by
    element). KINDS: 1 fp32 programs only, 2 quantized only, 3 both (only those are compiled). Layout master16_int8:
    PDT 2 (bf16 params and grads) and MASTER 2 (``MASTER_REMAINDER``): list 2 + NSTATE holds every tensor's int16
    remainder, the scales follow it; the fp32-state tensors run the master16 body. SRQ (int8_sr, master16_int8_sr):
    the codes rounded stochastically; every scalar row has the tensor's key as an extra column (the fp32-state
    programs read rows of that width too, and round nothing: their stores are fp32 or master16's)."""
    pid = tl.program_id(0)
    go = True
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0
    if go:
        t = tl.load(prog_tab + pid)
        off = tl.load(prog_tab + n_prog + pid) * (ROWS * INT8_GROUP)
        n = tl.load(numel_tab + t)
        rows = tl.arange(0, ROWS)[:, None]
        lanes = rows * INT8_GROUP + tl.arange(0, INT8_GROUP)[None, :]  # int32 [ROWS, INT8_GROUP]
        if KINDS == 2:
            _int8_body(ptr_tab, n_tensors, scal_tab, t, off, lanes, off + rows * INT8_GROUP < n, rows, tab_ptr,
                       grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE, NSCAL, UNSIGNED, HAS_GRAD_SCALE, MASTER, ALIGNED,
                       SRQ)
        elif KINDS == 1:
            idx = off + lanes.to(tl.int64)
            _body(ptr_tab, n_tensors, scal_tab, t, 0, idx, idx < n, grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE,
                  NSCAL, PDT, 0, MASTER, SRQ, HAS_GRAD_SCALE, False, False, HW_BF16)
        else:
            if tl.load(prog_tab + 2 * n_prog + pid) != 0:
                _int8_body(ptr_tab, n_tensors, scal_tab, t, off, lanes, off + rows * INT8_GROUP < n, rows, tab_ptr,
                           grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE, NSCAL, UNSIGNED, HAS_GRAD_SCALE, MASTER,
                           ALIGNED, SRQ)
            else:
                idx = off + lanes.to(tl.int64)
                _body(ptr_tab, n_tensors, scal_tab, t, 0, idx, idx < n, grad_scale_ptr, MULTI, RULE, F0, F1, NSTATE,
                      NSCAL, PDT, 0, MASTER, SRQ, HAS_GRAD_SCALE, False, False, HW_BF16)
