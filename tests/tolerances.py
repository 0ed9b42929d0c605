"""The one tolerance table. Every comparison of a run against the float64 reference uses it.

Keys are the dtype the run computed in. Values are (rtol, atol) for ``torch.testing.assert_close``
on params and on every state tensor after >= 10 steps.
- float64: round-off only (our reference vs torch.optim, or reordered float64 arithmetic).
- float32 / float16 / bfloat16: accumulated rounding of the storage dtype over ~10 steps.
Sign-based rules (signSGD, Signum, Lion) are compared in float64 only: one flipped sign moves an
element by 2 lr, so low precision comparisons would be flaky rather than informative.
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
