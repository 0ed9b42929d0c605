"""The same checks on a CUDA device with compiled kernels. Run on a GPU machine with
``TRITON_INTERPRET=0 pytest tests/triton -m gpu`` (tests/conftest.py skips them, with a reason, where
no CUDA device is visible; tests/triton/conftest.py skips them in an interpreter run)."""
import pytest
import torch

from helpers import ODD_SHAPES, assert_parity, run_pair
from momentum_fused.specs import SPECS
from test_parity import CASES
from momentum_fused.triton_kernels import launcher, rules

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_cuda(case, dtype):
    _, cls, kw, grads = case
    shapes = ODD_SHAPES + [(65537,)] + [(17,)] * 300
    topt, ropt, tp, rp = run_pair(cls, [kw], [shapes], dtype, grads=grads, device="cuda")
    assert_parity(topt, ropt, tp, rp, dtype)


def test_found_inf_cuda():
    p = [torch.randn(5000, device="cuda", dtype=torch.bfloat16)]
    g = [torch.randn(5000, device="cuda", dtype=torch.bfloat16)]
    b = [torch.zeros(5000, device="cuda", dtype=torch.bfloat16)]
    old = [x.clone() for x in p + b]
    sc = [SPECS["sgd"].make_scalars(dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0), {}, True)]
    launcher.multi_tensor_apply("one", rules.RULE_IDS["sgd"], (True, False), [p, g, b], sc,
                                found_inf=torch.ones(1, device="cuda"), grad_scale=torch.ones(1, device="cuda"))
    assert all(torch.equal(x, y) for x, y in zip(p + b, old))


def test_bf16_beyond_2_pow_31_elements():
    """int64 indexing: a bf16 tensor of more than 2**31 elements is updated at both ends."""
    n = 2 ** 31 + 4096 + 5
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * n:
        pytest.skip("needs ~13 GB of GPU memory")
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    g[-7:] = torch.arange(1, 8, device="cuda", dtype=torch.bfloat16)
    sc = [SPECS["sgd"].make_scalars(dict(lr=1.0, weight_decay=0.0, momentum=0.0, dampening=0.0), {}, True)]
    launcher.multi_tensor_apply("one", rules.RULE_IDS["sgd"], (False, False), [[p], [g]], sc)
    assert torch.equal(p[-7:], -g[-7:])
    assert bool((p[:-7] == -1).all())
    assert float(p.double().square().sum()) == pytest.approx(n - 7 + sum(k * k for k in range(1, 8)), rel=1e-3)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bf16_update_buffer_equals_an_fp32_one_bitwise_cuda(nesterov):
    """The compiled kernels' bf16 store of Muon's update (bf16_state layout) is torch's round to nearest even:
    the run equals the one with an fp32 update buffer bit for bit (optim_db.muon_bf16_update_runs)."""
    from optim_db import assert_snapshot_equal, muon_bf16_update_runs
    new, old = muon_bf16_update_runs("triton", "cuda", nesterov=nesterov)
    assert_snapshot_equal(new, old)
