"""Shared helpers of the QR retraction tests (main process and Triton interpreter process)."""
from __future__ import annotations

import math

import torch

from tolerances import QR_ORTH, QR_RESID, qr_agree_tol


def with_kappa(m, r, kappa, dtype, gen):
    """An m x r matrix with singular values logspaced from 1 to 1/kappa, built in float64 and cast."""
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64) if r > 1 else torch.ones(1, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


def mixed_batch(m, r, kappas, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.stack([with_kappa(m, r, k, dtype, gen) for k in kappas])
    return A, [k if r > 1 else 1.0 for k in kappas]


def projector_dist(Q, Qh):
    """||Q Q^T - Qh Qh^T||_F per matrix, in float64. For m > 1024 the m x m projectors are not formed:
    for orthonormal Q, Qh of equal rank the same norm is sqrt(2) ||Q - Qh (Qh^T Q)||_F (the part of
    span Q outside span Qh), exact up to O(u) from the round-off in Q^T Q = I."""
    Q, Qh = Q.double(), Qh.double()
    if Q.shape[-2] <= 1024:
        return torch.linalg.matrix_norm(Q @ Q.mT - Qh @ Qh.mT)
    return 2 ** 0.5 * torch.linalg.matrix_norm(Q - Qh @ (Qh.mT @ Q))


def orth_err(Q):
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    return torch.linalg.matrix_norm(Q.mT @ Q - eye)


def assert_valid_qr(A, Q, R, dtype, diag_positive=True):
    """Q orthonormal, A = QR to round-off, R exactly upper triangular with diag > 0 (>= 0 when
    diag_positive is False: rank-deficient A), shapes and dtype as promised."""
    assert Q.shape == A.shape and R.shape == A.shape[:-2] + (A.shape[-1], A.shape[-1])
    assert Q.dtype == dtype and R.dtype == dtype
    assert orth_err(Q).max().item() <= QR_ORTH[dtype]
    Ad = A.double()
    resid = torch.linalg.matrix_norm(Ad - Q.double() @ R.double()) / torch.linalg.matrix_norm(Ad)
    assert resid.max().item() <= QR_RESID[dtype]
    assert torch.equal(torch.tril(R, -1), torch.zeros_like(R))
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    assert bool((d > 0).all()) if diag_positive else bool((d >= 0).all())


def assert_agrees(A, Q, R, Qh, Rh, kappas, dtype):
    """Q Q^T and R agree with the Householder factors within qr_agree_tol(dtype, kappa), per matrix."""
    B = A.shape[0]
    pd = projector_dist(Q, Qh)
    rd = torch.linalg.matrix_norm(R.double() - Rh.double()) / torch.linalg.matrix_norm(A.double())
    for i in range(B):
        t = qr_agree_tol(dtype, kappas[i], A.shape[-1])
        assert pd[i].item() <= t, f"matrix {i} (kappa {kappas[i]:g}): ||QQ^T - QhQh^T|| = {pd[i].item():.3e} > {t:.3e}"
        assert rd[i].item() <= t, f"matrix {i} (kappa {kappas[i]:g}): ||R - Rh||/||A|| = {rd[i].item():.3e} > {t:.3e}"
