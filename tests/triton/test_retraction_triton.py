"""The Triton CholeskyQR2 kernel (triton_kernels/cholesky_qr.py) in the interpreter, on CPU tensors:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton``. Kept small (the interpreter runs
~0.4 s per 16-column matrix). The compiled-kernel variants are @pytest.mark.gpu tests in
tests/test_retraction.py."""
from __future__ import annotations

import pytest
import torch

from momentum_fused.lowrank import qr
from momentum_fused.lowrank.retraction import ORTH_TOL, qr_with_info
from retraction_cases import assert_agrees, assert_valid_qr, mixed_batch, projector_dist
from tolerances import qr_agree_tol
from momentum_fused.triton_kernels import cholesky_qr as K

# r = 1, r = m, m not a multiple of the 64-row tile, one r > 16 (RP = 32)
CASES = [(20, 1, torch.float32), (37, 5, torch.float32), (96, 16, torch.float32), (16, 16, torch.float32),
         (70, 17, torch.float32), (37, 5, torch.float64), (96, 16, torch.float64)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def test_kernel_is_interpreted():
    assert K.is_interpreted()


@pytest.mark.parametrize("m,r,dtype", CASES, ids=[f"{m}x{r}-{str(d)[6:]}" for m, r, d in CASES])
def test_triton_agrees_with_householder(m, r, dtype):
    A, kappas = mixed_batch(m, r, [1.0, 1e2, 1e3], dtype, seed=m + r)
    Q, R, info = qr_with_info(A, "triton")
    Qh, Rh = qr(A, "householder")
    assert info.backend == "triton" and info.path.tolist() == [0, 0, 0]
    assert_valid_qr(A, Q, R, dtype)
    assert_agrees(A, Q, R, Qh, Rh, kappas, dtype)


def test_kernel_reports_and_fallback_repairs():
    """kappa 1e7 in float32: the kernel flags the matrix (info != 0), the host reruns it through the
    shifted CholeskyQR3 / Householder fallback, and the result is a valid QR; a zero column is flagged
    by the kernel as a failed Cholesky (info 1)."""
    A, _ = mixed_batch(40, 5, [1.0, 1e7], torch.float32, seed=2)
    Z = A.clone()
    Z[0, :, 3] = 0
    _, _, info, err = K.cholesky_qr2(torch.cat([A, Z[:1]]).contiguous(), ORTH_TOL[torch.float32])
    assert info[0].item() == 0 and err[0].item() <= ORTH_TOL[torch.float32]
    assert info[1].item() != 0
    assert info[2].item() == 1
    Q, R, qinfo = qr_with_info(A, "triton")
    assert qinfo.path[0].item() == 0 and qinfo.path[1].item() >= 1
    assert_valid_qr(A, Q, R, torch.float32)
    Qz, Rz, zinfo = qr_with_info(Z[:1], "triton")
    assert zinfo.path.item() >= 1
    assert_valid_qr(Z[:1], Qz, Rz, torch.float32, diag_positive=False)


def test_batched_equals_looped():
    A, kappas = mixed_batch(33, 4, [1.0, 1e3, 10.0], torch.float32, seed=4)
    Q, R = qr(A.reshape(3, 1, 33, 4), "triton")
    assert Q.shape == (3, 1, 33, 4) and R.shape == (3, 1, 4, 4)
    for i in range(3):
        q, rr = qr(A[i], "triton")
        t = qr_agree_tol(torch.float32, kappas[i], 4)
        assert projector_dist(Q[i, 0], q).item() <= t
        assert (torch.linalg.matrix_norm(R[i, 0] - rr) / A[i].norm()).item() <= t


def test_bf16_upcast():
    A, _ = mixed_batch(24, 3, [1.0, 10.0], torch.float32, seed=6)
    A = A.bfloat16()
    Q, R = qr(A, "triton")
    assert Q.dtype == torch.float32 and R.dtype == torch.float32
    Qf, Rf = qr(A.float(), "triton")
    assert torch.equal(Q, Qf) and torch.equal(R, Rf)
    assert_valid_qr(A.float(), Q, R, torch.float32)


def test_rank_above_64_raises_before_launch():
    with pytest.raises(RuntimeError, match="r <= 64"):
        qr(torch.randn(1, 70, 65), "triton")
    with pytest.raises(ValueError, match="r <= 64"):
        K.cholesky_qr2(torch.randn(1, 70, 65), 1e-5)


def test_auto_on_cpu_stays_cholesky_qr2():
    """The interpreter is for tests: auto never picks triton for CPU tensors."""
    _, _, info = qr_with_info(torch.randn(2, 20, 3))
    assert info.backend == "cholesky_qr2"
