"""Batched QR retraction (momentum_fused.lowrank.retraction): householder and cholesky_qr2 on CPU,
the triton backend's error paths without the interpreter, and the GPU variants (@pytest.mark.gpu).
The Triton kernel itself is tested in the interpreter: tests/triton/test_retraction_triton.py."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from momentum_fused.lowrank import RETRACTION_BACKENDS, qr
from momentum_fused.lowrank.retraction import auto_backend, qr_with_info
from retraction_cases import (assert_agrees, assert_valid_qr, mixed_batch, orth_err, projector_dist,
                              with_kappa)
from tolerances import QR_ORTH, qr_agree_tol

KAPPAS = [1.0, 10.0, 1e2, 1e3, 1e4]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

# r = 1, r = m, m not a multiple of any block size
SHAPES = [(7, 1), (37, 5), (16, 16), (100, 16), (130, 33), (64, 64)]
DTYPES = [torch.float64, torch.float32]


# ------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cholesky_qr2_agrees_with_householder(shape, dtype):
    m, r = shape
    A, kappas = mixed_batch(m, r, KAPPAS, dtype)
    Q, R, info = qr_with_info(A, "cholesky_qr2")
    Qh, Rh = qr(A, "householder")
    assert info.backend == "cholesky_qr2"
    assert_valid_qr(A, Q, R, dtype)
    assert_agrees(A, Q, R, Qh, Rh, kappas, dtype)
    if dtype == torch.float64:  # far inside CholeskyQR2's range: the fast path must have run
        assert info.path.tolist() == [0] * len(KAPPAS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_householder_is_torch_qr_with_signs_fixed(dtype):
    A, _ = mixed_batch(50, 8, KAPPAS, dtype)
    Q, R = qr(A, "householder")
    Qt, Rt = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(Rt, dim1=-2, dim2=-1))
    assert bool((s != 0).all())
    torch.testing.assert_close(Q, Qt * s.unsqueeze(-2), rtol=0, atol=0)
    torch.testing.assert_close(R, Rt * s.unsqueeze(-1), rtol=0, atol=0)
    assert_valid_qr(A, Q, R, dtype)


def test_auto_on_cpu_is_cholesky_qr2():
    A, _ = mixed_batch(40, 6, [1.0, 1e2], torch.float32)
    Q, R, info = qr_with_info(A)
    assert info.backend == "cholesky_qr2"
    Q2, R2, _ = qr_with_info(A, "cholesky_qr2")
    assert torch.equal(Q, Q2) and torch.equal(R, R2)


# ------------------------------------------------------------------------------- fallback
def test_fallback_ill_conditioned_fp32():
    """kappa ~ 1e7 in float32 is far outside CholeskyQR2's range (~u^-1/2): that matrix must leave the
    fast path, the well-conditioned ones in the same batch must not, and the result is a valid QR."""
    A, _ = mixed_batch(200, 16, [1.0, 1e7, 1e2], torch.float32, seed=3)
    Q, R, info = qr_with_info(A, "cholesky_qr2")
    path = info.path.tolist()
    assert path[0] == 0 and path[2] == 0 and path[1] >= 1, path
    assert_valid_qr(A, Q, R, torch.float32)
    if path[1] == 2:  # Householder on that matrix alone
        Qh, Rh = qr(A[1], "householder")
        torch.testing.assert_close(Q[1], Qh, rtol=0, atol=1e-6)
        torch.testing.assert_close(R[1], Rh, rtol=0, atol=1e-6)
    counts = info.counts()
    assert counts["cholesky_qr2"] == 2 and counts["shifted_cholesky_qr3"] + counts["householder"] == 1


def test_shifted_cholesky_qr3_path_fp64():
    """kappa 1e10 in float64: CholeskyQR2 fails (> u^-1/2 ~ 1e8), the shifted CholeskyQR3 succeeds and
    agrees with Householder to u * kappa."""
    A, kappas = mixed_batch(120, 10, [1e10, 1.0], torch.float64, seed=5)
    Q, R, info = qr_with_info(A, "cholesky_qr2")
    assert info.path.tolist() == [1, 0]
    Qh, Rh = qr(A, "householder")
    assert_valid_qr(A, Q, R, torch.float64)
    assert_agrees(A, Q, R, Qh, Rh, kappas, torch.float64)


@pytest.mark.parametrize("backend", ["householder", "cholesky_qr2"])
def test_rank_deficient(backend):
    """A zero column and a repeated column: Q still orthonormal, A = QR, diag(R) >= 0 with a round-off
    sized entry for the dependent column (the documented definition); an all-zero A gives R = 0."""
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(4, 30, 4, generator=gen)
    A[1, :, 2] = 2 * A[1, :, 0]
    A[2, :, 3] = 0
    A[3] = 0  # an all-zero matrix (e.g. a zero gradient block): Q is any orthonormal basis, R = 0
    Q, R, info = qr_with_info(A, backend)
    assert_valid_qr(A[:3], Q[:3], R[:3], torch.float32, diag_positive=False)
    assert orth_err(Q[3]).item() <= QR_ORTH[torch.float32] and torch.equal(R[3], torch.zeros(4, 4))
    assert R[1, 2, 2].abs().item() <= 1e-5 * A[1].norm().item()
    assert R[2, 3, 3].abs().item() <= 1e-5 * A[2].norm().item()
    assert info.path[0].item() == (0 if backend == "cholesky_qr2" else 2)


# ------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["householder", "cholesky_qr2"])
def test_batched_equals_looped(backend, dtype):
    """Each matrix of a [2, 3, m, r] batch equals its QR alone, incl. one that takes the fallback.
    torch's batched and single-matrix kernels round differently, and a correct QR moves by up to
    u kappa under round-off, hence the per-matrix qr_agree_tol (kappa_fb: the fallback matrix, where
    the comparison is meaningful in float64 only; in float32 it must take the same path)."""
    kappa_fb = 1e12 if dtype == torch.float64 else 1e7
    A, kappas = mixed_batch(45, 7, [1.0, 1e3, kappa_fb, 1e2, 10.0, 1e4], dtype, seed=11)
    Q, R, info = qr_with_info(A.reshape(2, 3, 45, 7), backend)
    assert Q.shape == (2, 3, 45, 7) and R.shape == (2, 3, 7, 7) and info.path.shape == (2, 3)
    Q, R, path = Q.reshape(6, 45, 7), R.reshape(6, 7, 7), info.path.reshape(6)
    if backend == "cholesky_qr2":
        assert path.tolist() == [0, 0, path[2].item(), 0, 0, 0]
        assert path[2].item() >= 1
    for i in range(6):
        q, rr, inf = qr_with_info(A[i], backend)
        assert inf.path.item() == path[i].item()
        if dtype == torch.float32 and i == 2:
            continue
        t = qr_agree_tol(dtype, kappas[i], 7)
        assert projector_dist(Q[i], q).item() <= t
        assert (torch.linalg.matrix_norm(R[i].double() - rr.double()) / A[i].double().norm()).item() <= t


def test_unbatched_and_empty_batch():
    A = with_kappa(20, 3, 10.0, torch.float64, torch.Generator().manual_seed(1))
    for backend in ("householder", "cholesky_qr2"):
        Q, R = qr(A, backend)
        assert Q.shape == (20, 3) and R.shape == (3, 3)
        assert_valid_qr(A[None], Q[None], R[None], torch.float64)
        Q, R = qr(torch.zeros(0, 4, 20, 3), backend)
        assert Q.shape == (0, 4, 20, 3) and R.shape == (0, 4, 3, 3)


def test_non_contiguous_input():
    A, _ = mixed_batch(33, 6, [1.0, 1e2], torch.float64)
    At = A.mT.contiguous().mT  # same values, column-major strides
    Q, R = qr(At, "cholesky_qr2")
    Q2, R2 = qr(A, "cholesky_qr2")
    torch.testing.assert_close(Q, Q2, rtol=0, atol=1e-13)
    torch.testing.assert_close(R, R2, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_upcast(dtype):
    A, _ = mixed_batch(40, 5, [1.0, 1e2], torch.float32)
    A = A.to(dtype)
    for backend in ("householder", "cholesky_qr2"):
        Q, R = qr(A, backend)
        assert Q.dtype == torch.float32 and R.dtype == torch.float32
        Qf, Rf = qr(A.float(), backend)
        assert torch.equal(Q, Qf) and torch.equal(R, Rf)
        assert_valid_qr(A.float(), Q, R, torch.float32)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", list(RETRACTION_BACKENDS) + ["auto"])
def test_bad_input(backend):
    with pytest.raises(ValueError, match="m >= r"):
        qr(torch.randn(3, 4), backend)
    with pytest.raises(ValueError, match="ndim >= 2"):
        qr(torch.randn(5), backend)
    with pytest.raises(TypeError, match="floating-point"):
        qr(torch.ones(5, 3, dtype=torch.int64), backend)
    with pytest.raises(TypeError, match="floating-point"):
        qr(torch.randn(5, 3, dtype=torch.complex64), backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        qr([[1.0, 2.0]], backend)
    with pytest.raises(ValueError, match="r must be >= 1"):
        qr(torch.randn(5, 0), backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cholesky'"):
        qr(torch.randn(5, 3), "cholesky")


@pytest.mark.parametrize("backend", ["householder", "cholesky_qr2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(backend, bad):
    A = torch.randn(2, 30, 4)
    A[1, 3, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        qr(A, backend)


def test_triton_rank_limit():
    with pytest.raises(RuntimeError, match="r <= 64"):
        qr(torch.randn(100, 65), "triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="checks the error without the interpreter; TRITON_INTERPRET=1 is set in this process")
def test_triton_on_cpu_needs_interpreter():
    A = torch.randn(2, 20, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        qr(A, "triton")


def test_import_does_not_load_triton():
    code = ("import sys, momentum_fused, momentum_fused.lowrank as L, torch; "
            "L.qr(torch.randn(2, 9, 3)); L.qr(torch.randn(9, 3), 'householder'); "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_bench_smoke(tmp_path):
    """bench.bench_retraction on a tiny shape: runs its correctness checks and writes md + json."""
    import json

    from bench import bench_retraction
    rows = bench_retraction.main(["--quick", "--shapes", "3,40,4", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} == {"torch.linalg.qr", "householder", "cholesky_qr2"}
    data = json.loads((tmp_path / "retraction.json").read_text())
    assert len(data["rows"]) == 3 and (tmp_path / "retraction.md").read_text().count("| 3 x 40x4 |") == 3
    assert all(r["median_ms"] > 0 for r in data["rows"])


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cholesky_qr2"])
def test_gpu_large_batch_agrees_with_householder(backend):
    """256 x 4096x64 fp32 on CUDA (the benchmark shape) vs Householder."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(256, 4096, 64, generator=gen).cuda()
    Q, R, info = qr_with_info(A, backend)
    Qh, Rh = qr(A, "householder")
    assert info.backend == backend and int((info.path == 0).sum()) == 256
    assert orth_err(Q).max().item() <= QR_ORTH[torch.float32]
    assert projector_dist(Q, Qh).max().item() <= qr_agree_tol(torch.float32, 100.0, 64)
    rd = torch.linalg.matrix_norm(R.double() - Rh.double()) / torch.linalg.matrix_norm(A.double())
    assert rd.max().item() <= qr_agree_tol(torch.float32, 100.0, 64)
    assert bool((torch.diagonal(R, dim1=-2, dim2=-1) > 0).all())
    assert torch.equal(torch.tril(R, -1), torch.zeros_like(R))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_mixed_conditioning(dtype):
    A, kappas = mixed_batch(130, 33, KAPPAS + [1e7], dtype)
    A = A.cuda()
    Qh, Rh = qr(A, "householder")
    for backend in ("triton", "cholesky_qr2"):
        Q, R, info = qr_with_info(A, backend)
        assert_valid_qr(A, Q, R, dtype)
        assert_agrees(A[:-1], Q[:-1], R[:-1], Qh[:-1], Rh[:-1], kappas[:-1], dtype)
        assert info.path[-1].item() >= (1 if dtype == torch.float32 else 0)


def test_auto_rule():
    assert auto_backend("cuda", 32, True) == "triton"
    assert auto_backend("cuda", 33, True) == "cholesky_qr2"
    assert auto_backend("cuda", 8, False) == "cholesky_qr2"
    assert auto_backend("cpu", 8, True) == "cholesky_qr2"


@pytest.mark.gpu
def test_gpu_auto_rule():
    for r, expected in ((8, "triton"), (32, "triton"), (64, "cholesky_qr2"), (65, "cholesky_qr2")):
        _, _, info = qr_with_info(torch.randn(4, 100, r, device="cuda"))
        assert info.backend == expected, r
