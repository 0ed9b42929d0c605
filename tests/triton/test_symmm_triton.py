"""Muon's symmetric products in Triton (triton_kernels/symmm.py), in the interpreter: the kernel against the float64
product (the upper tiles, mirrored), the drop-in ``symmetric_baddbmm`` against torch's products, Newton-Schulz on it
against the float64 iteration, the argument checks and the opt-in (MOMENTUM_FUSED_TRITON_SYMMM, CUDA only). Whether
it beats cuBLAS is for a GPU to say (bench/device_check.sh muon-ns); the GPU test at the end runs it compiled."""
import pytest
import torch

import momentum_fused as mf
from momentum_fused import specs_muon
from momentum_fused.triton_kernels import symmm
from symmetric_cases import assert_drop_in, assert_upper_triangle_mirrored, ns_errors, random_operands

@pytest.mark.parametrize("n,m,k", [(1, 1, 2), (2, 5, 7), (1, 64, 64), (2, 70, 45), (1, 130, 33), (0, 4, 4),
                                   (2, 0, 6), (1, 7, 0)])
@pytest.mark.parametrize("with_c0", [False, True])
def test_kernel_is_the_upper_triangle_of_the_product_mirrored(n, m, k, with_c0):
    y, z, c0, alpha, beta = random_operands(n, m, k, with_c0)
    out = torch.full((n, m, m), float("nan"), dtype=torch.bfloat16)  # (every element written: no NaN left)
    assert symmm.sym_mm_bf16(out, y, z, c0, alpha, beta) is out
    assert_upper_triangle_mirrored(out, y, z, c0, alpha, beta)


@pytest.mark.parametrize("shape,tall", [((3, 24, 70), False), ((2, 31, 9), True), ((2, 66, 40), False)])
def test_drop_in_gram_and_symmetric_operand(shape, tall):
    """``symmm.symmetric_baddbmm`` as ``reference.symmetric_baddbmm``: a a^T of a (possibly transposed) stack, and
    beta c0 + alpha a b for a symmetric b, within bf16 rounding of torch's bmm / baddbmm; beta = 0 ignores c0."""
    r = assert_drop_in(symmm.symmetric_baddbmm, shape, tall)
    nan = torch.full_like(r, float("nan"))
    assert torch.equal(symmm.symmetric_baddbmm(nan, r, r, beta=0.0), symmm.symmetric_baddbmm(None, r, r))


@pytest.mark.parametrize("shape", [(2, 64, 160), (2, 37, 101)])
@pytest.mark.parametrize("gram", [False, True])
def test_newton_schulz_on_the_kernel_is_as_accurate(shape, gram):
    """bf16 Newton-Schulz on the kernel's products: relative error against the float64 iteration within the bounds
    of the CPU kernel's test (tests/test_muon_symmetric.py) over the same iteration on torch's products."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    base, mine = ns_errors(x, symmm.symmetric_baddbmm, gram)
    assert mine <= (1.1 if gram else 1.05) * base


def test_bad_arguments_raise_before_anything_runs():
    y = torch.randn(2, 4, 6).bfloat16()
    out = torch.zeros(2, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        symmm.sym_mm_bf16(out, y.float(), y, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        symmm.sym_mm_bf16(torch.zeros(2, 4, 4, dtype=torch.bfloat16).mT, y, y, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="do not fit"):
        symmm.sym_mm_bf16(torch.zeros(2, 4, 5, dtype=torch.bfloat16), y, y, None, 1.0, 0.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_config_override(monkeypatch):
    """MOMENTUM_FUSED_TRITON_SYMMM_CONFIG picks the tile (the device check's A/B); the result does not depend on it
    beyond the summation order inside fp32 (here: equal), and a malformed value raises."""
    y = torch.randn(1, 40, 50, generator=torch.Generator().manual_seed(3)).bfloat16()
    a = symmm.symmetric_baddbmm(None, y)
    monkeypatch.setenv("MOMENTUM_FUSED_TRITON_SYMMM_CONFIG", "16x16x4")
    assert symmm.config() == (16, 16, 4)
    b = symmm.symmetric_baddbmm(None, y)
    assert ((a.double() - b.double()).abs() <= (y.double().abs() @ y.double().abs().mT) * 2.0 ** -7).all()
    monkeypatch.setenv("MOMENTUM_FUSED_TRITON_SYMMM_CONFIG", "48x16x4")
    with pytest.raises(ValueError, match="powers of two"):
        symmm.config()


@pytest.mark.parametrize("value,algorithm,device,want", [
    ("1", "auto", "cuda", "triton"), ("1", "gram", "cuda", "triton"), ("1", "standard", "cuda", None),
    ("0", "auto", "cuda", None), (None, "auto", "cuda", None), ("1", "auto", "meta", None)])
def test_opt_in_decides_where_the_kernel_is_used(value, algorithm, device, want, monkeypatch):
    """specs_muon.symmetric_products: the Triton kernel on CUDA only with MOMENTUM_FUSED_TRITON_SYMMM=1 and a Gram or
    auto algorithm (standard keeps torch's bits); a value other than 0 / 1 raises, at construction and every step."""
    if value is None:
        monkeypatch.delenv(specs_muon.TRITON_SYMMM_ENV, raising=False)
    else:
        monkeypatch.setenv(specs_muon.TRITON_SYMMM_ENV, value)
    got = specs_muon.symmetric_products(algorithm, torch.device(device), torch.bfloat16)
    assert (got is symmm.symmetric_baddbmm) == (want == "triton") and (got is None or want == "triton")
    assert specs_muon.symmetric_products(algorithm, torch.device(device), torch.float32) is None
    monkeypatch.setenv(specs_muon.TRITON_SYMMM_ENV, "yes")
    with pytest.raises(ValueError, match="MOMENTUM_FUSED_TRITON_SYMMM"):
        mf.Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_algorithm="auto")


@pytest.mark.gpu
def test_muon_on_cuda_with_the_triton_products_stays_within_bf16_of_cublas(monkeypatch):
    """Compiled: 10 Muon steps (ns_algorithm="auto", bf16) with the Triton products against cuBLAS's, the params
    within bf16 Newton-Schulz noise (as the CPU kernel's test)."""
    shapes = [(256, 1024), (1024, 256), (384, 384)]

    def run(flag):
        monkeypatch.setenv(specs_muon.TRITON_SYMMM_ENV, flag)
        torch.manual_seed(1)
        ps = [torch.randn(*s, device="cuda", requires_grad=True) for s in shapes]
        opt = mf.Muon(ps, lr=0.02, ns_dtype=torch.bfloat16, ns_algorithm="auto")
        g = torch.Generator(device="cuda").manual_seed(2)
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, device="cuda")
            opt.step()
        return [p.detach().clone() for p in ps]

    for x, y in zip(run("1"), run("0")):
        assert (x - y).abs().max().item() <= 10 * 0.02 * 1e-1
