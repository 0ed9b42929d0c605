"""Batched thin QR (the retraction of the low-rank optimizer, docs/algorithms.md §8), behind one function.

``qr(A, backend)`` factors A [..., m, r] (m >= r) as A = Q R with Q^T Q = I and R upper triangular with
diag(R) > 0, batched over the leading dims. bf16/fp16 (and other low-precision floats) compute in
float32 and return float32; float32 and float64 keep their dtype. See docs/lowrank_retraction.md.

Backends
- ``householder``: torch.linalg.qr, then the sign fix (columns of Q and rows of R whose R_jj < 0 are
  negated; R_jj == 0 is left as is).
- ``cholesky_qr2``: G = A^T A, R1 = chol(G), Q1 = A R1^-1, and the same again on Q1 (CholeskyQR2), in
  torch batched ops. R^-1 is applied as an explicit triangular inverse followed by a batched matmul
  (on CPU torch's batched triangular solve is ~5x slower than inverse + bmm). Then a per-matrix check,
  and the fallback below for the matrices that fail it.
- ``triton``: the same CholeskyQR2 in one Triton kernel per call (triton_kernels/cholesky_qr.py:
  Gram over m, the r x r Cholesky and triangular inverse in the kernel, R^-1 applied in the passes that
  read A), r <= 64, float32 or float64 (bf16/fp16 upcast on the host). The kernel flags its failures;
  flagged matrices get the same fallback.

Fallback rule (cholesky_qr2 and triton; it is part of the algorithm, so the result is always a valid
QR, never a different kind of answer). A matrix *passes* a CholeskyQR stage when every Cholesky
succeeded (cholesky_ex info == 0, no NaN) and ||Q^T Q - I||_F <= ORTH_TOL[dtype]. Each matrix's path:
  0  CholeskyQR2 passed (the fast path: fine in float32 up to kappa(A) ~ 1e3..4e3);
  1  otherwise shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020):
     R0 = chol(A^T A + s I), s = 11 (m r + r (r + 1)) u ||A||_F^2, Q0 = A R0^-1, then CholeskyQR2 of Q0,
     R = R2 R1 R0; accepted if it passes;
  2  otherwise Householder (always accepted: it is unconditionally backward stable).
Only the failing matrices of a batch are recomputed; ``qr_with_info`` returns each matrix's path.
The fallback costs one host sync per call (to learn whether any matrix failed).

Rank-deficient A (a column in the span of the others, a zero column) has no unique QR. Every backend
then still returns Q with orthonormal columns and A = Q R up to round-off, with diag(R) >= 0 and
R_jj ~ round-off for the dependent columns; the matching columns of Q are *some* unit vectors
orthogonal to the preceding ones (whatever the path that accepted the matrix produced: in practice
path 2 Householder, or path 1 when the shift regularises it). Callers that augment a basis (§8) need
exactly this: an orthonormal completion.

Non-finite input (NaN/Inf in A, or a Gram that overflows in every path) raises ValueError.

auto rule (``auto_backend``): triton when A is on CUDA, r <= AUTO_TRITON_MAX_RANK (32) and triton
loads; otherwise cholesky_qr2 (CPU always: the interpreter is for tests, not speed). Measured on an
H200 (bench/results/retraction-cuda): at r = 32 the kernel is ~3x faster than torch-batched
cholesky_qr2, at r = 64 it is 1.2-1.5x slower (one program per matrix), hence the cut at 32. An explicit backend that cannot run raises with the reason;
it never silently runs another backend.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

__all__ = ["qr", "qr_with_info", "QRInfo", "RETRACTION_BACKENDS", "ORTH_TOL", "TRITON_MAX_RANK",
           "auto_backend", "resolve_backend"]

RETRACTION_BACKENDS = ("householder", "cholesky_qr2", "triton")
TRITON_MAX_RANK = 64
AUTO_TRITON_MAX_RANK = 32
# acceptance threshold of a CholeskyQR stage, on ||Q^T Q - I||_F, by compute dtype
ORTH_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
PATH_NAMES = ("cholesky_qr2", "shifted_cholesky_qr3", "householder")


class QRInfo(NamedTuple):
    backend: str          # the backend that ran (auto resolved)
    path: torch.Tensor    # int64 [...]: 0 CholeskyQR2, 1 shifted CholeskyQR3, 2 Householder (see PATH_NAMES)

    def counts(self) -> dict:
        return {name: int((self.path == i).sum()) for i, name in enumerate(PATH_NAMES)}


# ------------------------------------------------------------------------------------------ checks
def _check(A, backend):
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"qr: A must be a torch.Tensor, got {type(A).__name__}")
    if not isinstance(backend, str) or backend not in RETRACTION_BACKENDS + ("auto",):
        raise ValueError(f"qr: unknown backend {backend!r}; expected one of {RETRACTION_BACKENDS + ('auto',)}")
    if A.ndim < 2:
        raise ValueError(f"qr: A must have shape [..., m, r] (ndim >= 2), got shape {tuple(A.shape)}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"qr: A must be a real floating-point tensor, got dtype {A.dtype}")
    m, r = A.shape[-2], A.shape[-1]
    if r < 1:
        raise ValueError(f"qr: r must be >= 1, got A of shape {tuple(A.shape)}")
    if m < r:
        raise ValueError(f"qr: a thin QR needs m >= r, got A of shape {tuple(A.shape)} (m={m}, r={r})")


def _triton_unavailable(A) -> str | None:
    """Why the triton backend cannot run on A, or None."""
    r = A.shape[-1]
    if r > TRITON_MAX_RANK:
        return (f"the triton backend supports r <= {TRITON_MAX_RANK} (the r x r Gram lives in registers), "
                f"got r={r}; use backend='cholesky_qr2' or 'householder'")
    if A.device.type not in ("cuda", "cpu"):
        return f"the triton backend runs on cuda (or cpu in the Triton interpreter), not {A.device.type}"
    from .. import _backend_triton  # cheap: imports neither triton nor the kernels
    err = _backend_triton._load_error()
    if err is not None:
        return err
    mod = sys.modules.get("momentum_fused.triton_kernels.cholesky_qr")
    interpreting = (type(mod.cholesky_qr2_kernel).__name__ == "InterpretedFunction" if mod is not None
                    else os.environ.get("TRITON_INTERPRET") == "1")
    if A.device.type == "cpu" and not interpreting:
        return ("the triton backend on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported")
    if A.device.type == "cuda" and interpreting:
        return ("the Triton kernels were defined in interpreter mode (TRITON_INTERPRET=1); CUDA tensors "
                "need compiled kernels (TRITON_INTERPRET unset before triton is imported)")
    return None


def resolve_backend(A: torch.Tensor, backend: str = "auto") -> str:
    """The backend ``qr`` would run for A (the auto rule), or raise why an explicit one cannot run."""
    _check(A, backend)
    if backend == "triton":
        why = _triton_unavailable(A)
        if why is not None:
            raise RuntimeError(f"qr(backend='triton') cannot run: {why}")
        return backend
    if backend != "auto":
        return backend
    use_triton = (A.device.type == "cuda" and A.shape[-1] <= AUTO_TRITON_MAX_RANK
                  and _triton_unavailable(A) is None)
    return auto_backend(A.device.type, A.shape[-1], use_triton)


def auto_backend(device_type: str, r: int, triton_ok: bool) -> str:
    """The auto rule on its own: triton on CUDA for r <= AUTO_TRITON_MAX_RANK when it can run."""
    if device_type == "cuda" and r <= AUTO_TRITON_MAX_RANK and triton_ok:
        return "triton"
    return "cholesky_qr2"


# ------------------------------------------------------------------------------------- algorithms
def _sign_fix(Q, R):
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    s = torch.where(d < 0, -1.0, 1.0).to(R.dtype)
    return Q * s.unsqueeze(-2), R * s.unsqueeze(-1)


def _householder(A):
    Q, R = torch.linalg.qr(A, mode="reduced")
    return _sign_fix(Q, R)


def _upper_inverse(R):
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def _cholqr_step(A, shift=None):
    """One CholeskyQR step: (Q, R, ok) with ok [B] bool = Cholesky succeeded and finite."""
    G = torch.bmm(A.mT, A)
    if shift is not None:
        G.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    L, info = torch.linalg.cholesky_ex(G)
    ok = (info == 0) & torch.isfinite(L).all(dim=(-2, -1))
    R = L.mT
    # a failed Cholesky leaves garbage (possibly a zero pivot): keep those matrices finite and flagged
    R = torch.where(ok[:, None, None], R, torch.eye(R.shape[-1], dtype=R.dtype, device=R.device))
    Q = torch.bmm(A, _upper_inverse(R))
    return Q, R, ok


def _orth_err(Q):
    E = torch.bmm(Q.mT, Q)
    E.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return torch.linalg.matrix_norm(E)


def _cholesky_qr2(A, tol):
    Q1, R1, ok1 = _cholqr_step(A)
    Q, R2, ok2 = _cholqr_step(Q1)
    ok = ok1 & ok2 & (_orth_err(Q) <= tol)
    return Q, torch.bmm(R2, R1), ok


def _shifted_cholesky_qr3(A, tol):
    m, r = A.shape[-2], A.shape[-1]
    u = torch.finfo(A.dtype).eps / 2
    norm2 = A.square().sum(dim=(-2, -1))              # ||A||_F^2 >= ||A||_2^2
    shift = 11.0 * (m * r + r * (r + 1)) * u * norm2
    Q0, R0, ok0 = _cholqr_step(A, shift)
    Q, R, ok = _cholesky_qr2(Q0, tol)
    return Q, torch.bmm(R, R0), ok0 & ok


def _fallback(A, Q, R, path, bad, tol):
    """Recompute the matrices where ``bad`` through path 1, then path 2. In place on Q, R, path."""
    idx = bad.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    Qs, Rs, ok = _shifted_cholesky_qr3(A[idx], tol)
    path[idx] = 1
    Q[idx] = Qs
    R[idx] = Rs
    hidx = idx[~ok]
    if hidx.numel():
        Qh, Rh = _householder(A[hidx])
        path[hidx] = 2
        Q[hidx] = Qh
        R[hidx] = Rh


def _run_cholesky_qr2(A, tol):
    Q, R, ok = _cholesky_qr2(A, tol)
    path = torch.zeros(A.shape[0], dtype=torch.int64, device=A.device)
    if not bool(ok.all()):                               # the one host sync
        _fallback(A, Q, R, path, ~ok, tol)
    return Q, R, path


def _run_triton(A, tol):
    from ..triton_kernels import cholesky_qr as K  # lazy: imports triton
    Q, R, info, _ = K.cholesky_qr2(A.contiguous(), tol)
    path = torch.zeros(A.shape[0], dtype=torch.int64, device=A.device)
    bad = info != 0
    if bool(bad.any()):
        _fallback(A, Q, R, path, bad, tol)
    return Q, R, path


# ------------------------------------------------------------------------------------------ public
def qr_with_info(A: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, QRInfo]:
    """``qr`` plus a QRInfo: the backend that ran and each matrix's path (0/1/2, see module doc)."""
    name = resolve_backend(A, backend)
    batch, m, r = A.shape[:-2], A.shape[-2], A.shape[-1]
    X = A if A.dtype in (torch.float32, torch.float64) else A.float()
    X = X.reshape(-1, m, r)
    tol = ORTH_TOL[X.dtype]
    if X.shape[0] == 0:
        Q, R = X.new_empty(X.shape), X.new_empty((0, r, r))
        path = torch.zeros(0, dtype=torch.int64, device=X.device)
    elif name == "householder":
        Q, R = _householder(X)
        path = torch.full((X.shape[0],), 2, dtype=torch.int64, device=X.device)
    elif name == "cholesky_qr2":
        Q, R, path = _run_cholesky_qr2(X, tol)
    else:
        Q, R, path = _run_triton(X, tol)
    if not bool(torch.isfinite(R).all()):
        raise ValueError("qr: A contains non-finite values (NaN/Inf), or its norm overflows "
                         f"{X.dtype}: no QR computed")
    return Q.reshape(*batch, m, r), R.reshape(*batch, r, r), QRInfo(name, path.reshape(batch))


def qr(A: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Batched thin QR of A [..., m, r] (m >= r): Q [..., m, r] with orthonormal columns and
    R [..., r, r] upper triangular with diag(R) > 0 (>= 0 for rank-deficient A, see the module doc),
    A = Q R. bf16/fp16 inputs are computed in float32 and Q, R are returned in float32.

    backend: "householder", "cholesky_qr2", "triton" or "auto" (triton on CUDA when r <= 32 and
    triton loads, else cholesky_qr2). An explicit backend that cannot run raises the reason."""
    Q, R, _ = qr_with_info(A, backend)
    return Q, R
