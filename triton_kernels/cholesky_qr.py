"""Batched CholeskyQR2 in one Triton kernel (thin QR of A [B, m, r], r <= 64).

One program per batch matrix. Everything r x r lives in registers (padded to RP = next power of two,
at least 16, because ``tl.dot`` needs tiles >= 16); A is streamed over m in BLOCK_M-row tiles.

    pass 1  G1 = A^T A                              (reads A)
            L1 = chol(G1), X1 = L1^-1              (in registers, in the kernel)
    pass 2  Q1 = A X1^T tile by tile, G2 = Q1^T Q1  (reads A; Q1 is never stored)
            L2 = chol(G2), X2 = L2^-1
    pass 3  Q = (A X1^T) X2^T, stored; G3 = Q^T Q    (reads A, writes Q)
            R = R2 R1 = (L1 L2)^T, stored
So R^-1 is applied in the passes that read A, as an explicit triangular inverse (the second pass
repairs the orthogonality lost by the first, as in CholeskyQR2). Pass 3 recomputes Q1 with the same
operations as pass 2, so G2 is exactly the Gram of the Q1 that pass 3 multiplies.

Per matrix the kernel reports ``info``: 0 ok, 1 Cholesky of G1 failed (a pivot <= 0 or NaN), 2 Cholesky
of G2 failed, 3 loss of orthogonality ||Q^T Q - I||_F > orth_tol (or NaN); and ``err`` = that norm.
The caller (momentum_fused.lowrank.retraction) reruns the flagged matrices through its fallback.

fp32 math uses ``input_precision="ieee"`` (a tf32 Gram would lose the orthogonality on a GPU).
fp64 inputs compute in fp64 (IS_F64). This module never imports momentum_fused; ``@triton.jit``
decides at import whether the kernel is compiled or interpreted (TRITON_INTERPRET=1).
"""
import torch
import triton
import triton.language as tl

MAX_RANK = 64


@triton.jit
def _cholesky(G, r, RP: tl.constexpr):
    """Lower Cholesky factor of the (padded) Gram G; the padded diagonal is set to 1.
    Returns (L, nbad): nbad counts pivots that were not > 0 (NaN included); such a column is
    replaced by e_k so the loop finishes with a finite, invertible L, and the caller flags the matrix."""
    ar = tl.arange(0, RP)
    rows = ar[:, None]
    cols = ar[None, :]
    G = tl.where((rows == cols) & (rows >= r), 1.0, G)
    L = tl.zeros((RP, RP), dtype=G.dtype)
    nbad = tl.sum(tl.zeros((RP,), dtype=tl.float32), axis=0)
    for k in range(RP):
        colk = tl.sum(tl.where(cols == k, G, 0.0), axis=1)
        piv = tl.sum(tl.where(ar == k, colk, 0.0), axis=0)
        good = piv > 0.0
        nbad += tl.where(good, 0.0, 1.0)
        # a bad pivot: continue with the unit column e_k (L stays finite and invertible; flagged)
        colk = tl.where(good, colk, tl.where(ar == k, 1.0, 0.0))
        d = tl.sqrt(tl.where(good, piv, 1.0))
        lk = tl.where(ar >= k, colk / d, 0.0)
        L = tl.where(cols == k, lk[:, None], L)
        G = G - lk[:, None] * lk[None, :]
    return L, nbad


@triton.jit
def _lower_inverse(L, RP: tl.constexpr):
    """X = L^-1 by forward substitution, one row per step (L lower, nonzero diagonal)."""
    ar = tl.arange(0, RP)
    rows = ar[:, None]
    X = tl.zeros((RP, RP), dtype=L.dtype)
    for k in range(RP):
        lrow = tl.sum(tl.where(rows == k, L, 0.0), axis=0)
        lkk = tl.sum(tl.where(ar == k, lrow, 0.0), axis=0)
        off = tl.where(ar < k, lrow, 0.0)
        s = tl.sum(off[:, None] * X, axis=0)
        xk = (tl.where(ar == k, 1.0, 0.0) - s) / lkk
        X = tl.where(rows == k, xk[None, :], X)
    return X


@triton.jit
def _mm(a, b, IS_F64: tl.constexpr):
    if IS_F64:
        c = tl.dot(a, b, out_dtype=tl.float64)
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def cholesky_qr2_kernel(a_ptr, q_ptr, r_ptr, info_ptr, err_ptr, m, r, orth_tol,
                        RP: tl.constexpr, BLOCK_M: tl.constexpr, IS_F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    a_base = a_ptr + pid * m * r
    q_base = q_ptr + pid * m * r
    offs_m = tl.arange(0, BLOCK_M)
    ar = tl.arange(0, RP)
    cmask = ar < r
    if IS_F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32

    # pass 1: G1 = A^T A
    G = tl.zeros((RP, RP), dtype=acc_t)
    for start in range(0, m, BLOCK_M):
        ri = (start + offs_m).to(tl.int64)
        mask = (ri[:, None] < m) & cmask[None, :]
        a = tl.load(a_base + ri[:, None] * r + ar[None, :], mask=mask, other=0.0)
        G += _mm(tl.trans(a), a, IS_F64)
    L1, bad1 = _cholesky(G, r, RP)
    Ri1 = tl.trans(_lower_inverse(L1, RP))

    # pass 2: G2 = Q1^T Q1 with Q1 = A R1^-1, never stored
    G = tl.zeros((RP, RP), dtype=acc_t)
    for start in range(0, m, BLOCK_M):
        ri = (start + offs_m).to(tl.int64)
        mask = (ri[:, None] < m) & cmask[None, :]
        a = tl.load(a_base + ri[:, None] * r + ar[None, :], mask=mask, other=0.0)
        q1 = _mm(a, Ri1, IS_F64)
        G += _mm(tl.trans(q1), q1, IS_F64)
    L2, bad2 = _cholesky(G, r, RP)
    Ri2 = tl.trans(_lower_inverse(L2, RP))

    # pass 3: Q = (A R1^-1) R2^-1, stored; G3 = Q^T Q for the orthogonality check
    G = tl.zeros((RP, RP), dtype=acc_t)
    for start in range(0, m, BLOCK_M):
        ri = (start + offs_m).to(tl.int64)
        mask = (ri[:, None] < m) & cmask[None, :]
        a = tl.load(a_base + ri[:, None] * r + ar[None, :], mask=mask, other=0.0)
        q = _mm(_mm(a, Ri1, IS_F64), Ri2, IS_F64)
        tl.store(q_base + ri[:, None] * r + ar[None, :], q, mask=mask)
        G += _mm(tl.trans(q), q, IS_F64)

    rows = ar[:, None]
    cols = ar[None, :]
    valid = (rows < r) & (cols < r)
    E = tl.where(valid, G - tl.where(rows == cols, 1.0, 0.0), 0.0)
    err = tl.sqrt(tl.sum(tl.sum(E * E, axis=1), axis=0))
    # R = R2 R1 = L2^T L1^T = (L1 L2)^T
    Rm = tl.trans(_mm(L1, L2, IS_F64))
    tl.store(r_ptr + pid * r * r + rows * r + cols, Rm, mask=valid)
    code = tl.where(bad1 > 0, 1, tl.where(bad2 > 0, 2, tl.where(err <= orth_tol, 0, 3)))
    tl.store(info_ptr + pid, code.to(tl.int32))
    tl.store(err_ptr + pid, err.to(tl.float64))


def _config(rp: int, interpreted: bool):
    """(BLOCK_M, num_warps). The interpreter prefers few, large tiles."""
    if interpreted:
        return 64, 4
    if rp <= 32:
        return 64, 4
    return 32, 8


def is_interpreted() -> bool:
    return type(cholesky_qr2_kernel).__name__ == "InterpretedFunction"


def cholesky_qr2(A: torch.Tensor, orth_tol: float, block_m: int | None = None):
    """A: contiguous [B, m, r] float32 or float64, r <= MAX_RANK. Returns (Q, R, info, err):
    Q [B, m, r], R [B, r, r] (upper, diag > 0 where info == 0), info int32 [B], err float64 [B].
    One launch. Validation of user input is the caller's job; this checks only its own contract."""
    if A.ndim != 3 or not A.is_contiguous() or A.dtype not in (torch.float32, torch.float64):
        raise ValueError("cholesky_qr2 kernel: A must be a contiguous [B, m, r] float32/float64 tensor")
    B, m, r = A.shape
    if not 1 <= r <= MAX_RANK or m < r:
        raise ValueError(f"cholesky_qr2 kernel: need 1 <= r <= {MAX_RANK} and m >= r, got m={m}, r={r}")
    rp = max(16, triton.next_power_of_2(r))
    bm, warps = _config(rp, is_interpreted())
    if block_m is not None:
        bm = block_m
    Q = torch.empty_like(A)
    R = torch.zeros(B, r, r, dtype=A.dtype, device=A.device)
    info = torch.empty(B, dtype=torch.int32, device=A.device)
    err = torch.empty(B, dtype=torch.float64, device=A.device)
    if B == 0:
        return Q, R, info, err
    cholesky_qr2_kernel[(B,)](A, Q, R, info, err, m, r, float(orth_tol), RP=rp, BLOCK_M=bm,
                              IS_F64=A.dtype == torch.float64, num_warps=warps)
    return Q, R, info, err
