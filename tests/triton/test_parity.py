"""Every rule x flag combination x storage dtype through the optimizers with backend="triton",
against the float64 reference (params and every state tensor, 10 steps, odd shapes, one launch per
step)."""
import pytest
import torch

import momentum_fused as mf
from helpers import ODD_SHAPES, assert_parity, run_pair

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (id, class, kwargs, gradient mode: see helpers.grads_for)
CASES = [
    ("sgd", mf.SGD, dict(lr=0.05), "randn"),
    ("sgd-wd-maximize", mf.SGD, dict(lr=0.05, weight_decay=0.1, maximize=True), "randn"),
    ("sgd-momentum-dampening", mf.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), "randn"),
    ("sgd-nesterov", mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "randn"),
    ("qhm-grad", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01), "randn"),
    ("qhm-direct", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1, weight_decay_type="direct"),
     "randn"),
    ("adam", mf.Adam, dict(lr=0.02, weight_decay=0.01), "randn"),
    ("adam-amsgrad-maximize", mf.Adam, dict(lr=0.02, amsgrad=True, maximize=True), "randn"),
    ("adamw", mf.AdamW, dict(lr=0.02, weight_decay=0.1), "randn"),
    ("adamw-amsgrad", mf.AdamW, dict(lr=0.02, weight_decay=0.1, amsgrad=True), "randn"),
    ("nadam", mf.NAdam, dict(lr=0.02, weight_decay=0.01), "randn"),
    ("nadam-decoupled", mf.NAdam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True), "randn"),
    ("rmsprop", mf.RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=0.01), "bounded"),
    ("rmsprop-momentum", mf.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9), "bounded"),
    ("rmsprop-centered", mf.RMSprop, dict(lr=0.01, alpha=0.9, centered=True), "bounded"),
    ("rmsprop-momentum-centered", mf.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True,
                                                   weight_decay=0.01), "bounded"),
    ("signsgd", mf.SignSGD, dict(lr=0.02, weight_decay=0.1), "sign_safe"),
    ("signum", mf.Signum, dict(lr=0.02, momentum=0.9, weight_decay=0.1), "sign_safe"),
    ("signum-maximize", mf.Signum, dict(lr=0.02, momentum=0.9, maximize=True), "sign_safe"),
    ("lion", mf.Lion, dict(lr=0.02, weight_decay=0.1), "sign_safe"),
    ("fsgdm", mf.FSGDM, dict(lr=0.05, weight_decay=5e-3, sigma=12, n_stages=3), "randn"),
]
CASES += [  # schedule-free rules
    ("sgd_sf", mf.SGDScheduleFree, dict(lr=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=3), "randn"),
    ("adamw_sf", mf.AdamWScheduleFree, dict(lr=0.02, weight_decay=0.01, warmup_steps=2), "randn"),
    ("adamw_sf-inner-lr_t", mf.AdamWScheduleFree, dict(lr=0.02, inner_momentum=0.9, weight_rule="lr_t", r=1.0),
     "randn"),
]


def test_every_rule_the_kernels_serve_has_a_parity_case():
    """A rule added to rules.FAMILY (docs/architecture.md, adding a rule) needs its case here; Muon's two passes
    have theirs in test_muon_triton.py."""
    from momentum_fused.triton_kernels import rules
    covered = {cls.rule for _, cls, _, _ in CASES} | {"muon_momentum", "muon_apply"}
    assert set(rules.FAMILY) <= covered, sorted(set(rules.FAMILY) - covered)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_odd_shapes(case, dtype):
    _, cls, kw, grads = case
    topt, ropt, tp, rp = run_pair(cls, [kw], [ODD_SHAPES], dtype, grads=grads)
    assert_parity(topt, ropt, tp, rp, dtype)


@pytest.mark.parametrize("name,dtype", [("adamw-amsgrad", torch.float32), ("sgd-nesterov", torch.bfloat16)])
def test_parity_65537(name, dtype):
    """A tensor just above 16 blocks: 16 fast-path programs plus a one-element tail packed with a
    small tensor, in one launch."""
    _, cls, kw, grads = next(c for c in CASES if c[0] == name)
    topt, ropt, tp, rp = run_pair(cls, [kw], [[(65537,), (5,)]], dtype, grads=grads)
    assert_parity(topt, ropt, tp, rp, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_300_tensors_two_groups_one_launch(dtype):
    """300 tensors of mixed sizes in two param groups with different hyperparameters: ONE launch per
    step (per-tensor scalar table), and parity."""
    sizes = [1, 3, 17, 64, 100, 255, 513, 0, 2]
    shapes_a = [(sizes[i % len(sizes)],) for i in range(150)]
    shapes_b = [(sizes[(i * 7) % len(sizes)], ) for i in range(150)]
    kw_a = dict(lr=0.02, betas=(0.9, 0.99), weight_decay=0.1)
    kw_b = dict(lr=0.005, betas=(0.8, 0.9), weight_decay=0.0, eps=1e-6)
    topt, ropt, tp, rp = run_pair(mf.AdamW, [kw_a, kw_b], [shapes_a, shapes_b], dtype, check_launches=1)
    assert_parity(topt, ropt, tp, rp, dtype)


def test_two_dtypes_two_launches():
    """Buckets are (device, dtype, flags): a float32 and a bfloat16 param give two launches per step."""
    from momentum_fused.triton_kernels import launcher

    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    opt = mf.Adam([a, b], lr=0.01, backend="triton")
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        before = launcher.LAUNCHES
        opt.step()
        assert launcher.LAUNCHES - before == 2


def test_complex_param():
    """Complex params arrive as view_as_real views; they must update in place."""
    p0 = torch.randn(33, dtype=torch.complex64)
    tp = p0.clone().requires_grad_()
    rp = p0.to(torch.complex128).requires_grad_()
    topt = mf.Adam([tp], lr=0.01, backend="triton")
    ropt = mf.Adam([rp], lr=0.01, backend="reference")
    for k in range(10):
        g = torch.randn(33, dtype=torch.complex128, generator=torch.Generator().manual_seed(k))
        tp.grad = g.to(torch.complex64)
        rp.grad = tp.grad.to(torch.complex128)
        topt.step()
        ropt.step()
    torch.testing.assert_close(tp.detach().to(torch.complex128), rp.detach(), rtol=2e-5, atol=2e-6)


def test_noncontiguous_param():
    """A transposed (non-contiguous) param is updated through a contiguous copy."""
    base = torch.randn(7, 5)
    tp = base.t().clone().t().contiguous().t()  # shape (5, 7), not contiguous
    assert not tp.is_contiguous()
    tp.requires_grad_()
    rp = tp.detach().double().requires_grad_()
    topt = mf.SGD([tp], lr=0.1, momentum=0.9, backend="triton")
    ropt = mf.SGD([rp], lr=0.1, momentum=0.9, backend="reference")
    for k in range(10):
        g = torch.randn(5, 7, generator=torch.Generator().manual_seed(k))
        tp.grad = g.t().contiguous().t()
        rp.grad = g.double()
        topt.step()
        ropt.step()
    torch.testing.assert_close(tp.detach().double(), rp.detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cls, kw", [(mf.Adam, dict(betas=(0.0, 0.999))), (mf.NAdam, dict(betas=(0.0, 0.999))),
                                     (mf.AdamTied, dict(beta=0.0)), (mf.Adam, dict(betas=(0.3, 0.999))),
                                     (mf.AdamWScheduleFree, dict(inner_momentum=0.3))],
                         ids=["adam-beta1-0", "nadam-beta1-0", "adamtied-0", "adam-beta1-0.3", "adamw_sf-inner-0.3"])
def test_first_moments_take_torch_lerps_second_branch(cls, kw):
    """torch.lerp(m, g, w) is b - (b - a)(1 - w) for w >= 0.5: the kernels' Adam and NAdam moments (w = 1 - beta1)
    computed m + w (g - m) at every w, so beta1 = 0 after a gradient of 1e4 left m = 0 instead of the new 1e-4
    (a step lost: AdamTied's param off by 2x), and an fp16 inf gradient gave inf where torch gives NaN."""
    out = {}
    for backend in ("triton", "reference"):
        p = torch.zeros(3, requires_grad=True)
        opt = cls([p], lr=1e-3, backend=backend, **kw)
        for g in (1e4, 1e-4, -3e3, 2e-4):
            p.grad = torch.full((3,), g)
            opt.step()
        out[backend] = (p.detach().clone(), opt.state[p]["exp_avg"].clone())
    torch.testing.assert_close(out["triton"][1], out["reference"][1], rtol=2e-6, atol=0)
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=2e-6, atol=1e-9)
    if kw.get("betas", (None,))[0] == 0.0 or kw.get("beta") == 0.0:
        assert torch.equal(out["triton"][1], torch.full((3,), 2e-4))  # (beta1 = 0: the moment is the last gradient)
    for backend in ("triton", "reference"):  # fp16: an inf gradient into a finite moment is NaN, as torch's lerp
        if cls is mf.AdamWScheduleFree:
            continue
        p = torch.zeros(2, dtype=torch.float16, requires_grad=True)
        opt = cls([p], lr=1e-3, backend=backend, **kw)
        p.grad = torch.ones(2, dtype=torch.float16)
        opt.step()
        p.grad = torch.full((2,), float("inf"), dtype=torch.float16)
        opt.step()
        out[backend] = opt.state[p]["exp_avg"].clone()
    if cls is not mf.AdamWScheduleFree:
        assert torch.equal(out["triton"].isnan(), out["reference"].isnan())


def test_lerp_at_weight_one_keeps_torchs_signed_zero():
    """beta1 = 0 (a lerp weight of 1) into a gradient of +-0: torch.lerp gives b - (b - a) * 0, whose zero's sign
    the first rewrite of the kernels' _lerp (b + (w - 1)(b - a)) flipped (a review, 2026-12-07)."""
    out = {}
    for backend in ("triton", "reference"):
        p = torch.zeros(4, requires_grad=True)
        opt = mf.Adam([p], lr=1e-3, betas=(0.0, 0.999), backend=backend)
        p.grad = torch.tensor([0.5, -0.5, 0.5, -0.5])
        opt.step()
        p.grad = torch.tensor([-0.0, -0.0, 0.0, 0.0])
        opt.step()
        out[backend] = opt.state[p]["exp_avg"].clone()
    assert torch.equal(out["triton"], out["reference"])
    assert torch.equal(torch.signbit(out["triton"]), torch.signbit(out["reference"])), out


@pytest.mark.parametrize("layout, dtype", [("native", torch.float32), ("master16", torch.bfloat16),
                                           ("bf16_sr", torch.bfloat16), ("int8_state", torch.float32)])
def test_channels_last_params_equal_contiguous_ones(layout, dtype):
    """The triton backend steps a dense channels_last param in memory order (elementwise layouts) or on contiguous
    copies (bf16_sr, int8: their values follow the row-major index): either way the contiguous twin's bits."""
    from optim_db import assert_twin_runs_equal, channels_last_twin_runs
    a, b = channels_last_twin_runs("triton", layout, dtype)
    assert_twin_runs_equal(a, b)

