"""Muon's two elementwise passes (muon_momentum, muon_apply) on the Triton kernels, through momentum_fused.Muon
with backend="triton", against the float64 reference (params and the momentum buffer, 10 steps; the Newton-Schulz
phase runs with torch ops in float64 on both sides): one launch per pass per step. (The kernels use tl.fma, as
torch's lerp and add do; the interpreter computes tl.fma with two roundings, so fp32 bit-equality with the
reference backend is a property of the compiled kernels, not tested here.)"""
import pytest
import torch

import momentum_fused as mf
from helpers import assert_parity, run_pair

SHAPES = [(3, 5), (7, 2), (4, 3, 2), (3, 5), (0, 4), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(lr=0.02, weight_decay=0.1),
                                dict(lr=0.02, nesterov=False, momentum=0.9, adjust_lr_fn="match_rms_adamw",
                                     maximize=True)], ids=["nesterov", "heavy_ball"])
def test_muon_passes_parity(kw, dtype):
    topt, ropt, tp, rp = run_pair(mf.Muon, [dict(kw, ns_dtype=torch.float64)], [SHAPES], dtype, check_launches=2)
    assert_parity(topt, ropt, tp, rp, dtype)

