"""Checks shared by the tests of the two symmetric-product kernels of Muon's Newton-Schulz phase: the CPU one
(tests/test_muon_symmetric.py) and the Triton one (tests/triton/test_symmm_triton.py)."""
from __future__ import annotations

import torch

from momentum_fused import specs_muon
from momentum_fused.reference import newton_schulz

TORCH_SCHEDULE = [(3.4445, -4.7750, 2.0315)] * 5


def ulp_bound(ref64, absprod, k):
    """|out - ref| allowed for an fp32-accumulated bf16 product rounded once: half a bf16 ulp of the result (2^-9
    relative) plus the fp32 accumulation error of k terms."""
    return ref64.abs() * 2.0 ** -8 + absprod * (k + 2) * 2.0 ** -23 + 1e-30


def random_operands(n, m, k, with_c0):
    """(y, z, c0, alpha, beta) for a kernel test of shape [n, m, k] (c0 None without it)."""
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + k)
    y = torch.randn(n, m, k, generator=g).bfloat16()
    z = torch.randn(n, m, k, generator=g).bfloat16()
    c0 = torch.randn(n, m, m, generator=g).bfloat16() if with_c0 else None
    return (y, z, c0, 0.75, -1.5) if with_c0 else (y, z, None, 1.0, 0.0)


def assert_upper_triangle_mirrored(out, y, z, c0, alpha, beta):
    """``out`` is the tiles on or above the diagonal of alpha y z^T + beta c0, each within an fp32-accumulated bf16
    rounding of the float64 value, mirrored into the lower triangle (exactly symmetric)."""
    m, k = y.shape[1], y.shape[2]
    ref = alpha * (y.double() @ z.double().mT)
    absprod = abs(alpha) * (y.double().abs() @ z.double().abs().mT)
    if c0 is not None:
        ref = ref + beta * c0.double()
        absprod = absprod + abs(beta) * c0.double().abs()
    upper = torch.ones(m, m, dtype=torch.bool).triu()
    want = torch.where(upper, ref, ref.mT)
    bound = torch.where(upper, ulp_bound(ref, absprod, k), ulp_bound(ref, absprod, k).mT)
    assert torch.equal(out, out.mT)
    assert ((out.double() - want).abs() <= bound).all()


def ns_errors(x, sym, gram):
    """(relative error of bf16 Newton-Schulz on torch's products, the same on ``sym``'s) against the float64
    iteration: the largest over the stack ``x``."""
    kw = dict(gram=True, restarts=specs_muon.gram_restarts(5)) if gram else {}
    ref = newton_schulz(x, TORCH_SCHEDULE, 1e-7, torch.float64)

    def rel(y):
        return ((y.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()

    return (rel(newton_schulz(x, TORCH_SCHEDULE, 1e-7, torch.bfloat16, **kw)),
            rel(newton_schulz(x, TORCH_SCHEDULE, 1e-7, torch.bfloat16, sym=sym, **kw)))


def assert_drop_in(sym, shape, tall):
    """``sym`` as ``reference.symmetric_baddbmm``: a a^T of a (possibly transposed) bf16 stack, and beta c0 + alpha a b
    for a symmetric b, each exactly symmetric and within bf16 rounding of torch's bmm / baddbmm. Returns the
    symmetric r = a a^T it computed."""
    from momentum_fused.reference import symmetric_baddbmm
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).bfloat16()
    a = x.mT if tall else x  # tall: a transposed view, as the Newton-Schulz phase has it
    got = sym(None, a)
    want = symmetric_baddbmm(None, a)
    assert torch.equal(got, got.mT)
    assert ((got.double() - want.double()).abs() <= (a.double().abs() @ a.double().abs().mT) * 2.0 ** -7 + 1e-30).all()
    r = got
    got2 = sym(r, r, r, beta=-4.775, alpha=2.0315)
    want2 = symmetric_baddbmm(r, r, r, beta=-4.775, alpha=2.0315)
    scale2 = 2.0315 * (r.double().abs() @ r.double().abs()) + 4.775 * r.double().abs()
    assert torch.equal(got2, got2.mT)
    assert ((got2.double() - want2.double()).abs() <= scale2 * 2.0 ** -7 + 1e-30).all()
    return r
