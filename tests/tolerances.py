"""The one tolerance table. Every comparison of a run against the float64 reference uses it.

Keys are the dtype the run computed in. Values are (rtol, atol) for ``torch.testing.assert_close``
on params and on every state tensor after >= 10 steps.
- float64: round-off only (our reference vs torch.optim, or reordered float64 arithmetic).
- float32 / float16 / bfloat16: accumulated rounding of the storage dtype over ~10 steps.
Sign-based rules (signSGD, Signum, Lion): one flipped sign moves an element by 2 lr, so on random gradients
they are compared in float64 only; in lower precisions (tests/triton, the compressed layouts) on "sign_safe"
gradients (tests/triton/helpers.py: |g| in [0.5, 1.5], each element's sign fixed across steps), where no
rounding can flip a sign.
"""
import torch

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


# Batched QR retraction (tests/test_retraction.py, tests/triton/test_retraction_triton.py).
# Orthonormality ||Q^T Q - I||_F (fp32: the docs/algorithms.md §8 invariant) and the backward error
# ||A - Q R||_F / ||A||_F are round-off bounds. Two correct QRs of A differ by O(u kappa(A)) plus a
# round-off floor that grows with r (measured: ~r/2 u at kappa = 1, <= 1 u kappa at kappa >= 1e2 for
# m, r <= 130), so agreement between backends on Q Q^T and on R (||R - R_h||_F / ||A||_F) is checked
# at QR_AGREE_C * u * max(kappa, r).
QR_ORTH = {torch.float32: 1e-5, torch.float64: 1e-12}
QR_RESID = {torch.float32: 2e-6, torch.float64: 4e-15}
QR_AGREE_C = 4.0


def qr_agree_tol(dtype: torch.dtype, kappa: float, r: int) -> float:
    return QR_AGREE_C * torch.finfo(dtype).eps * max(float(kappa), float(r))
