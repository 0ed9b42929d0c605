"""The symmetric bf16 products of the Newton-Schulz phase (csrc/cpu/cpu_symmm.cpp, momentum_fused/_backend_cpu.py
``symmetric_product``), used by momentum_fused.Muon(ns_algorithm="gram" | "auto") on CPUs with AVX-512-BF16 and
no AMX: the kernel against the float64 product, the Newton-Schulz steps on it against float64, where it is used
and where it is not. Speed: bench/bench_muon.py (docs/muon.md)."""
import os
import subprocess
import sys

import pytest
import torch

import momentum_fused as mf
from momentum_fused import specs_muon
from momentum_fused._backend_cpu import symmetric_product
from symmetric_cases import assert_drop_in, assert_upper_triangle_mirrored, ns_errors, random_operands

SYM = symmetric_product()
needs_kernel = pytest.mark.skipif(
    SYM is None, reason="needs the CPU extension on a CPU with AVX-512-BF16 and no AMX (the symmetric kernel does not "
                        "run on this CPU; torch's products are used instead)")


def _raw(y, z, c0=None, alpha=1.0, beta=0.0):
    from momentum_fused import _C_cpu
    out = torch.empty(y.shape[0], y.shape[1], y.shape[1], dtype=torch.bfloat16)
    assert _C_cpu.sym_mm_bf16(out, y, z, c0, alpha, beta)
    return out


@needs_kernel
@pytest.mark.parametrize("n,m,k", [(1, 1, 2), (2, 5, 6), (3, 13, 2), (2, 33, 40), (1, 45, 34), (2, 100, 98),
                                   (1, 12, 64), (2, 64, 36), (1, 130, 8), (0, 4, 4), (2, 0, 6), (1, 7, 0)])
@pytest.mark.parametrize("with_c0", [False, True])
def test_kernel_is_the_upper_triangle_of_the_product_mirrored(n, m, k, with_c0):
    """The raw kernel on arbitrary y, z: the tiles on or above the diagonal of alpha y z^T + beta c0, each within an
    fp32-accumulated bf16 rounding of the float64 value, mirrored into the lower triangle (exactly symmetric)."""
    y, z, c0, alpha, beta = random_operands(n, m, k, with_c0)
    assert_upper_triangle_mirrored(_raw(y, z, c0, alpha, beta), y, z, c0, alpha, beta)


@needs_kernel
@pytest.mark.parametrize("shape,tall", [((3, 24, 70), False), ((2, 31, 9), True), ((4, 17, 17), False),
                                        ((2, 40, 65), False)])
def test_wrapper_gram_and_symmetric_operand(shape, tall):
    """``symmetric_product()`` as ``reference.symmetric_baddbmm``: a a^T of a (possibly transposed, odd-width)
    stack, and beta c0 + alpha a b for a symmetric b, within bf16 rounding of torch's bmm/baddbmm."""
    assert_drop_in(SYM, shape, tall)


def test_wrapper_refuses_bad_arguments():
    if SYM is None:
        pytest.skip("needs the CPU extension on a CPU with AVX-512-BF16 and no AMX")
    from momentum_fused import _C_cpu
    y = torch.randn(2, 4, 6).bfloat16()
    out = torch.empty(2, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        _C_cpu.sym_mm_bf16(out, y.float(), y, None, 1.0, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        _C_cpu.sym_mm_bf16(torch.empty(2, 4, 4, dtype=torch.bfloat16).mT, y, y, None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\[2, 4, 4\]"):
        _C_cpu.sym_mm_bf16(torch.empty(2, 4, 5, dtype=torch.bfloat16), y, y, None, 1.0, 0.0)
    c0 = torch.zeros(2, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="may not be"):
        _C_cpu.sym_mm_bf16(c0, y, y, c0, 1.0, 1.0)
    assert torch.equal(c0, torch.zeros_like(c0))  # nothing written


@needs_kernel
@pytest.mark.parametrize("shape", [(4, 64, 256), (3, 96, 32), (3, 48, 48), (2, 37, 101)])
@pytest.mark.parametrize("gram", [False, True])
def test_newton_schulz_on_the_kernel_is_as_accurate(shape, gram):
    """Newton-Schulz in bf16 with the kernel's products: relative error against the float64 iteration within
    1.05x of the same iteration on torch's products for the standard form (measured 1.00x), 1.1x for the Gram form
    of rectangular matrices (measured 0.97-1.04x, 4 seeds, m = 37-384), 1.35x for the Gram form of square ones
    (measured 1.07-1.27x; "auto" takes the standard form there)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    base, mine = ns_errors(x, SYM, gram)
    bound = 1.05 if not gram else (1.35 if shape[1] == shape[2] else 1.1)
    assert mine <= bound * base


@pytest.mark.parametrize("algorithm", ["standard", "gram", "auto"])
def test_where_the_kernel_is_used(algorithm, monkeypatch):
    """One place decides (specs_muon.symmetric_products): "gram"/"auto" in bf16 on the CPU take the kernel where
    it runs; "standard" (torch.optim.Muon's bits), fp32/fp64 NS and the absence of the kernel take torch's ops."""
    cpu = torch.device("cpu")
    got = specs_muon.symmetric_products(algorithm, cpu, torch.bfloat16)
    assert got is (None if algorithm == "standard" else SYM)
    for dt in (torch.float32, torch.float64):
        assert specs_muon.symmetric_products(algorithm, cpu, dt) is None
    calls = []
    real = specs_muon.symmetric_products

    def spy(*a):
        f = real(*a)
        if f is None:
            return None

        def counted(*args, **kw):
            calls.append(args[1].shape)
            return f(*args, **kw)
        return counted

    monkeypatch.setattr(specs_muon, "symmetric_products", spy)
    torch.manual_seed(0)
    ps = [torch.randn(16, 48, requires_grad=True), torch.randn(20, 20, requires_grad=True)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = mf.Muon(ps, lr=0.02, ns_dtype=torch.bfloat16, ns_algorithm=algorithm)
    opt.step()
    assert bool(calls) == (algorithm != "standard" and SYM is not None)


@needs_kernel
def test_muon_steps_with_the_kernel_stay_within_bf16_of_torch_products(monkeypatch):
    """10 Muon steps with ns_algorithm="auto" on the kernel against the same on torch's products (the kernel
    switched off): the params within bf16 Newton-Schulz noise (lr 0.02: 1e-2 of lr per step, absolute)."""
    shapes = [(24, 96), (96, 24), (32, 32), (5, 4, 6)]

    def run(use_kernel):
        monkeypatch.setattr(specs_muon, "symmetric_products",
                            (lambda *a: SYM if a[0] != "standard" else None) if use_kernel else (lambda *a: None))
        torch.manual_seed(1)
        ps = [torch.randn(*s, requires_grad=True) for s in shapes]
        opt = mf.Muon(ps, lr=0.02, ns_dtype=torch.bfloat16, ns_algorithm="auto")
        g = torch.Generator().manual_seed(2)
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach().clone() for p in ps]

    a, b = run(True), run(False)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 10 * 0.02 * 1e-1
        assert not torch.equal(x, y) or x.numel() < 64  # the kernel did run (different rounding)


def test_isa_cap_switches_the_kernel_off():
    """MOMENTUM_FUSED_CPU_ISA=avx2 (as on an AVX2-only CPU): no kernel, torch's products."""
    code = ("import torch; from momentum_fused import specs_muon as s; "
            "print(s.symmetric_products('auto', torch.device('cpu'), torch.bfloat16))")
    env = dict(os.environ, MOMENTUM_FUSED_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_a_first_call_from_two_threads_finds_the_kernel_in_both(monkeypatch):
    """symmetric_product decided once per process, publishing a "no kernel" placeholder before the check: a second
    thread's first call in that window took torch's bmm (other bits for its Muon step; a review saw 46-180 of
    2000 races). The second thread here calls while the first is held inside the check."""
    import threading

    from momentum_fused import _backend_cpu, backends
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    from momentum_fused import _C_cpu
    monkeypatch.setattr(_C_cpu, "sym_mm_bf16_available", lambda: True)  # (whatever this CPU has)
    monkeypatch.setattr(_backend_cpu, "_SYMMETRIC", None)
    inside, release, got = threading.Event(), threading.Event(), {}
    real = _backend_cpu.isa_env_error

    def held():
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)
        return real()

    monkeypatch.setattr(_backend_cpu, "isa_env_error", held)
    monkeypatch.delenv("MOMENTUM_FUSED_CPU_ISA", raising=False)
    first = threading.Thread(target=lambda: got.setdefault("first", _backend_cpu.symmetric_product()), name="first")
    first.start()
    assert inside.wait(10)
    got["second"] = _backend_cpu.symmetric_product()
    release.set()
    first.join(10)
    assert got["first"] is not None and got["second"] is not None
