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


@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_update_buffer_equals_an_fp32_one_bitwise(nesterov):
    """fp32 params, bf16 NS: the momentum pass stores the update in bf16 (bf16_state layout), rounded as torch's
    .to(bfloat16) of the fp32 value would be, so the run equals the one with an fp32 buffer bit for bit (the same
    kernel math in both: the interpreter's fma rounding does not matter; optim_db.muon_bf16_update_runs)."""
    from optim_db import assert_snapshot_equal, muon_bf16_update_runs
    new, old = muon_bf16_update_runs("triton", nesterov=nesterov)
    assert_snapshot_equal(new, old)


def test_grad_scaler_device_protocol_equals_steps_never_taken():
    """GradScaler's device protocol on the Triton kernels (found_inf and grad_scale read by the kernels of both
    passes and of the aux AdamW; never on the host): inf, ok, ok, inf, ok with grad_scale 4 equals, bit for bit, a
    run of the ok steps alone on the unscaled gradients (a power of two: exact); the skipped first step's state and
    the aux step counts are rolled back by sync_amp."""
    from optim_db import assert_snapshot_equal, refuse_host_reads, snapshot
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7, 2), (4, 3, 2), (3, 5), (6,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    plan = [True, False, False, True, False]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in plan]

    def make():
        ps = [x.clone().requires_grad_() for x in init]
        return ps, mf.Muon([dict(params=ps[:4]), dict(params=ps[4:], use_muon=False, lr=0.01)], lr=0.02,
                           ns_dtype=torch.float64, backend="triton")
    pa, a = make()
    pb, b = make()
    for inner in (a._core, a._aux):
        inner._amp = lambda: pytest.fail("the host GradScaler protocol (a host read of found_inf) was taken")
    for k, inf in enumerate(plan):
        for p, g in zip(pa, grads[k]):
            p.grad = g * 4
        if inf:
            pa[0].grad[1, 1] = float("inf")
            pa[4].grad[2] = float("nan")
        a.found_inf, a.grad_scale = torch.full((1,), float(inf)), torch.full((1,), 4.0)
        with refuse_host_reads(a.found_inf):
            a.step()
        del a.found_inf, a.grad_scale
        if not inf:
            for p, g in zip(pb, grads[k]):
                p.grad = g.clone()
            b.step()
    a.sync_amp()
    assert_snapshot_equal(snapshot(a, pa), snapshot(b, pb))
    assert float(a.state[pa[4]]["step"]) == 3.0
