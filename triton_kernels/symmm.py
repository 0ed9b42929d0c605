"""The symmetric products of Muon's Newton-Schulz phase in Triton: out[b] = alpha * Y[b] Z[b]^T + beta * C0[b] for
[n, m, k] bf16 stacks Y, Z whose product is symmetric (X X^T with Z = Y; M M and the Gram form's m x m products,
polynomials in one symmetric matrix), computing only the BLOCK x BLOCK tiles on and above the diagonal and writing
each also mirrored below it: (T + 1) / (2 T) of the multiply-adds for T tiles per side. Each tile accumulates in
fp32 (``tl.dot``) and is rounded to bf16 once, after ``alpha * acc + beta * c0`` in fp32, as torch's bf16 GEMM
(cuBLAS) rounds once; the summation order differs from cuBLAS's, so results agree within bf16 rounding, not bit for
bit. The output is exactly symmetric: the upper triangle, mirrored (the CPU kernel, csrc/cpu/cpu_symmm.cpp, has the
same contract; C0 counts on and above the diagonal only).

Whether it beats cuBLAS on a GPU is for the next GPU lend to measure (``python -m bench.muon_ns_shapes --device
cuda``, ``bash bench/device_check.sh muon-ns``); until then Muon uses it only when asked
(``MOMENTUM_FUSED_TRITON_SYMMM=1``, momentum_fused/specs_muon.py ``symmetric_products``). This module never
imports momentum_fused; ``@triton.jit`` decides at import whether the kernel is compiled or interpreted
(TRITON_INTERPRET=1, the tests: tests/triton/test_symmm_triton.py).
"""
import torch
import triton
import triton.language as tl

BLOCK = 64  # tile side (m); k is streamed BLOCK_K at a time
BLOCK_K = 32
NUM_WARPS = 8  # sm_90 (ptxas): 126-128 registers, no spills, wgmma; 4 warps take 178-228 registers


@triton.jit
def _load_bf16(ptr, mask, HW_BF16: tl.constexpr):
    """bf16 values (compiled: a bf16 pointer) or, under the interpreter (no bf16 there), int16 bits widened to fp32
    exactly."""
    x = tl.load(ptr, mask=mask, other=0)
    if not HW_BF16:
        x = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def sym_mm_kernel(Y, Z, C0, OUT, PAIRS, m, k, s_yb, s_ym, s_zb, s_zm, s_cb, s_cm, s_ob, s_om, alpha, beta,
                  HAS_C0: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HW_BF16: tl.constexpr):
    """One program per (upper tile pair, batch matrix): PAIRS[2 p], PAIRS[2 p + 1] = (i, j), i <= j. The last dims
    of Y, Z, C0 and OUT are contiguous (stride 1). HW_BF16 False (the interpreter): the tensors are int16 views of
    the bf16 ones, rounded to nearest even on the bits (the interpreter's ``.to(tl.bfloat16)`` truncates)."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = tl.load(PAIRS + 2 * p)
    j = tl.load(PAIRS + 2 * p + 1)
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    y_ptr = Y + b * s_yb + rows[:, None] * s_ym + kk[None, :]
    z_ptr = Z + b * s_zb + cols[:, None] * s_zm + kk[None, :]
    for k0 in range(0, k, BLOCK_K):
        kmask = (k0 + kk) < k
        a = _load_bf16(y_ptr, (rows[:, None] < m) & kmask[None, :], HW_BF16)
        z = _load_bf16(z_ptr, (cols[:, None] < m) & kmask[None, :], HW_BF16)
        acc = tl.dot(a, tl.trans(z), acc)
        y_ptr += BLOCK_K
        z_ptr += BLOCK_K
    inside = (rows[:, None] < m) & (cols[None, :] < m)
    res = alpha * acc
    if HAS_C0:
        c0 = _load_bf16(C0 + b * s_cb + rows[:, None] * s_cm + cols[None, :], inside, HW_BF16)
        res += beta * c0.to(tl.float32)
    if HW_BF16:
        res = res.to(tl.bfloat16)
    else:  # round to nearest even on the bits; NaN stays a quiet NaN
        bits = res.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        res = tl.where(res != res, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.int16, bitcast=True)
    # a diagonal tile keeps its upper triangle, mirrored: exact symmetry also where z's rows are not y's
    rr = tl.arange(0, BLOCK)
    res = tl.where((rr[:, None] <= rr[None, :]) | (i != j), res, tl.trans(res))
    tl.store(OUT + b * s_ob + rows[:, None] * s_om + cols[None, :], res, mask=inside)
    # the mirror tile (j, i) of an off-diagonal one
    tl.store(OUT + b * s_ob + cols[:, None] * s_om + rows[None, :], tl.trans(res), mask=tl.trans(inside) & (i != j))


INTERPRETED = type(sym_mm_kernel).__name__ == "InterpretedFunction"


_PAIRS: dict = {}


def _pairs(tiles: int, device) -> torch.Tensor:
    """The (i, j), i <= j, tile pairs of a tiles x tiles grid as a flat int32 tensor on ``device`` (cached)."""
    key = (tiles, str(device))
    t = _PAIRS.get(key)
    if t is None:
        flat = [v for i in range(tiles) for j in range(i, tiles) for v in (i, j)]
        t = _PAIRS[key] = torch.tensor(flat, dtype=torch.int32, device=device)
    return t


def config() -> tuple:
    """(BLOCK, BLOCK_K, num_warps): the module's, or MOMENTUM_FUSED_TRITON_SYMMM_CONFIG="64x32x8" (powers of two, each
    >= 16 but the warps: the A/B of bench/device_check.sh)."""
    import os
    text = os.environ.get("MOMENTUM_FUSED_TRITON_SYMMM_CONFIG")
    if not text:
        return BLOCK, BLOCK_K, NUM_WARPS
    try:
        b, bk, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        b = bk = w = 0
    if not all(v > 0 and v & (v - 1) == 0 for v in (b, bk, w)) or min(b, bk) < 16:
        raise ValueError(f"MOMENTUM_FUSED_TRITON_SYMMM_CONFIG={text!r}: expected BLOCKxBLOCK_KxWARPS, powers of two, "
                         "BLOCK and BLOCK_K >= 16, e.g. 64x32x8")
    return b, bk, w


def sym_mm_bf16(out: torch.Tensor, y: torch.Tensor, z: torch.Tensor, c0, alpha: float, beta: float) -> torch.Tensor:
    """out = alpha * y z^T + beta * c0 (c0 None: no term) for [n, m, k] bf16 y, z with a symmetric product, [n, m, m]
    bf16 out (and c0), last dims contiguous. Returns out. Bad arguments raise ValueError before anything runs."""
    for name, t in (("y", y), ("z", z), ("out", out)) + ((("c0", c0),) if c0 is not None else ()):
        if t.dtype != torch.bfloat16 or t.dim() != 3 or (t.numel() and t.stride(-1) != 1):
            raise ValueError(f"sym_mm_bf16: {name} must be a [n, rows, cols] bf16 stack with contiguous rows, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    n, m, k = y.shape
    if tuple(z.shape) != (n, m, k) or tuple(out.shape) != (n, m, m) or (c0 is not None and tuple(c0.shape) != (n, m, m)):
        raise ValueError(f"sym_mm_bf16: shapes y {tuple(y.shape)}, z {tuple(z.shape)}, out {tuple(out.shape)}"
                         + ("" if c0 is None else f", c0 {tuple(c0.shape)}") + " do not fit [n, m, k] / [n, m, m]")
    if len({t.device for t in (y, z, out) + ((c0,) if c0 is not None else ())}) != 1:
        raise ValueError("sym_mm_bf16: every tensor must be on one device")
    block, block_k, warps = config()
    if n == 0 or m == 0:
        return out
    tiles = triton.cdiv(m, block)
    pairs = _pairs(tiles, y.device)
    cc = out if c0 is None else c0
    views = (y, z, cc, out) if not INTERPRETED else tuple(t.view(torch.int16) for t in (y, z, cc, out))
    sym_mm_kernel[(tiles * (tiles + 1) // 2, n)](
        *views, pairs, m, k, y.stride(0), y.stride(1), z.stride(0), z.stride(1), cc.stride(0), cc.stride(1),
        out.stride(0), out.stride(1), float(alpha), float(beta), HAS_C0=c0 is not None, BLOCK=block, BLOCK_K=block_k,
        HW_BF16=not INTERPRETED, num_warps=warps)
    return out


def symmetric_baddbmm(c0, a, b=None, beta=1.0, alpha=1.0):
    """``reference.symmetric_baddbmm`` on this kernel (a drop-in for bf16 stacks): beta * c0 + alpha * a b (c0 None:
    a b); b None means a^T (the Gram matrix a a^T), else b is symmetric and commutes with a, so that a b = a b^T is
    computed from the rows of a and b. beta = 0 ignores c0 (its NaNs too), as torch does."""
    y = a if a.stride(-1) == 1 else a.contiguous()
    z = y if b is None else (b if b.stride(-1) == 1 else b.contiguous())
    if c0 is not None and beta == 0.0:
        c0 = None
    if c0 is not None and c0.stride(-1) != 1:
        c0 = c0.contiguous()
    out = torch.empty(y.shape[0], y.shape[1], y.shape[1], dtype=torch.bfloat16, device=y.device)
    return sym_mm_bf16(out, y, z, c0, alpha, beta)
