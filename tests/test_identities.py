"""Algebraic identities between the rules (docs/algorithms.md §§ 2, 3, 5). Bitwise where the two
sides execute the same float operations, TOL[float64] where they are equal only in exact arithmetic."""
import math

import pytest
import torch

import momentum_fused as mf
from optim_db import assert_states_close, clone_params, make_grads, make_params, run
from tolerances import TOL

STEPS = 12
F64 = TOL[torch.float64]


def _bitwise_params(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_qhm_nu0_is_plain_sgd(wd, momentum, backend):
    # nu = 0: p <- p - lr [g + 0 * b]; the buffer never reaches p. The reference executes the same
    # float ops as torch SGD plus an exact "+ (-0) * b": bitwise. A compiled backend may contract
    # p + (-lr) g into an FMA differently per kernel: equal within TOL[float64].
    a, b, c = make_params(), make_params(), make_params()
    grads = make_grads(steps=STEPS)
    run(mf.QHM(a, lr=0.1, momentum=momentum, nu=0.0, weight_decay=wd, backend=backend), a, grads)
    run(mf.SGD(b, lr=0.1, weight_decay=wd, backend=backend), b, grads)
    run(torch.optim.SGD(c, lr=0.1, weight_decay=wd), c, grads)
    if backend == "reference":
        _bitwise_params(a, b)
        _bitwise_params(a, c)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, **F64)
        torch.testing.assert_close(x, z, **F64)


@pytest.mark.parametrize("beta", [0.5, 0.9])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_qhm_nu1_is_ema_heavy_ball(beta, wd):
    """QHM(nu=1, beta, lr) == torch SGD(momentum=beta, lr (1-beta)): params equal, and QHM's buffer is
    the EMA (1 - beta) * torch's buffer (torch starts with b = g, QHM with b = (1-beta) g from zeros)."""
    lr = 0.1
    q, t = make_params(), make_params()
    qo = mf.QHM(q, lr=lr, momentum=beta, nu=1.0, weight_decay=wd)
    to = torch.optim.SGD(t, lr=lr * (1 - beta), momentum=beta, weight_decay=wd)
    for gs in make_grads(steps=STEPS):
        run(qo, q, [gs])
        run(to, t, [gs])
        for x, y in zip(q, t):
            torch.testing.assert_close(x, y, **F64)
            torch.testing.assert_close(qo.state[x]["momentum_buffer"], (1 - beta) * to.state[y]["momentum_buffer"],
                                       **F64)


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("conv,nesterov", [("from_nesterov", True), ("from_momentum", False)])
def test_qhm_converters_reproduce_torch_sgd(conv, nesterov, wd):
    lr, beta = 0.05, 0.9
    kw = getattr(mf.QHM, conv)(lr, beta)
    assert set(kw) == {"lr", "momentum", "nu"}
    q, t = make_params(), make_params()
    qo = mf.QHM(q, weight_decay=wd, **kw)
    to = torch.optim.SGD(t, lr=lr, momentum=beta, nesterov=nesterov, weight_decay=wd)
    for gs in make_grads(steps=STEPS):
        run(qo, q, [gs])
        run(to, t, [gs])
        for x, y in zip(q, t):
            torch.testing.assert_close(x, y, **F64)
    # the other converter gives a different trajectory (the test can tell them apart)
    other = "from_momentum" if nesterov else "from_nesterov"
    r = make_params()
    run(mf.QHM(r, weight_decay=wd, **getattr(mf.QHM, other)(lr, beta)), r, make_grads(steps=STEPS))
    assert not torch.allclose(r[0], q[0], **F64)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(maximize=True, weight_decay=0.3)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_lion_tied_is_signum(beta, kw):
    a, b = make_params(), make_params()
    grads = make_grads(steps=STEPS)
    lo = run(mf.Lion(a, lr=0.01, betas=(beta, beta), **kw), a, grads)
    so = run(mf.Signum(b, lr=0.01, momentum=beta, **kw), b, grads)
    _bitwise_params(a, b)
    if beta != 0:
        for x, y in zip(a, b):
            assert torch.equal(lo.state[x]["exp_avg"], so.state[y]["momentum_buffer"])


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, maximize=True)])
def test_signum0_is_signsgd(kw):
    a, b, c = make_params(), make_params(), make_params()
    grads = make_grads(steps=STEPS)
    run(mf.Signum(a, lr=0.01, momentum=0.0, **kw), a, grads)
    run(mf.SignSGD(b, lr=0.01, **kw), b, grads)
    _bitwise_params(a, b)
    # and the explicit formula p <- p (1 - lr wd) - lr sign(+-g), in float64
    wd, s = kw.get("weight_decay", 0.0), (-1.0 if kw.get("maximize") else 1.0)
    for gs in grads:
        for p, g in zip(c, gs):
            p.mul_(1 - 0.01 * wd).sub_(0.01 * torch.sign(s * g))
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y, **F64)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                                dict(maximize=True)])
@pytest.mark.parametrize("beta", [0.9, 0.99])
def test_adam_tied_is_adam_beta_beta(beta, kw):
    a, b = make_params(), make_params()
    grads = make_grads(steps=STEPS)
    ao = run(mf.AdamTied(a, lr=0.01, beta=beta, **kw), a, grads)
    bo = run(mf.Adam(b, lr=0.01, betas=(beta, beta), **kw), b, grads)
    assert_states_close(ao, a, bo, b, rtol=0, atol=0)


def test_adam_tied_param_group_beta():
    p = make_params()
    o = mf.AdamTied([dict(params=p[:1]), dict(params=p[1:], beta=0.8)], lr=0.01, beta=0.9)
    assert o.param_groups[0]["betas"] == (0.9, 0.9) and o.param_groups[1]["betas"] == (0.8, 0.8)
    with pytest.raises(ValueError, match="betas"):
        o.add_param_group(dict(params=[torch.zeros(2, dtype=torch.float64)], betas=(0.9, 0.99)))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_wd0_is_adam(amsgrad):
    a, b, c, d = make_params(), make_params(), make_params(), make_params()
    grads = make_grads(steps=STEPS)
    ao = run(mf.AdamW(a, lr=0.01, weight_decay=0.0, amsgrad=amsgrad), a, grads)
    bo = run(mf.Adam(b, lr=0.01, amsgrad=amsgrad), b, grads)
    assert_states_close(ao, a, bo, b, rtol=0, atol=0)
    # and AdamW(wd) is Adam(decoupled_weight_decay=True, wd) -- not Adam(wd) (coupled)
    co = run(mf.AdamW(c, lr=0.01, weight_decay=0.1, amsgrad=amsgrad), c, grads)
    do = run(mf.Adam(d, lr=0.01, weight_decay=0.1, amsgrad=amsgrad, decoupled_weight_decay=True), d, grads)
    assert_states_close(co, c, do, d, rtol=0, atol=0)
    e = make_params()
    run(mf.Adam(e, lr=0.01, weight_decay=0.1, amsgrad=amsgrad), e, grads)
    assert not torch.allclose(e[0], c[0], **F64)


@pytest.mark.parametrize("beta", [0.9, 0.99])
def test_tied_beta_variance_recurrence(beta):
    """sigma2 = v - m^2 from the raw state obeys sigma2_t = beta sigma2_{t-1} + beta (1-beta) (g - m_{t-1})^2."""
    p = make_params(shapes=[(50,)])
    opt = mf.AdamTied(p, lr=0.01, beta=beta)
    gen = torch.Generator().manual_seed(5)
    m_prev = torch.zeros(50, dtype=torch.float64)
    s2_prev = torch.zeros(50, dtype=torch.float64)
    for _ in range(20):
        g = 0.3 + torch.randn(50, generator=gen, dtype=torch.float64)
        p[0].grad = g
        opt.step()
        st = opt.state[p[0]]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        s2 = v - m * m
        expected = beta * s2_prev + beta * (1 - beta) * (g - m_prev) ** 2
        torch.testing.assert_close(s2, expected, **F64)
        assert (s2 >= -1e-15).all()
        m_prev, s2_prev = m.clone(), s2.clone()
    # an untied Adam does not obey it
    q = make_params(shapes=[(50,)])
    o2 = mf.Adam(q, lr=0.01, betas=(0.5, beta))
    gen = torch.Generator().manual_seed(5)
    g1 = 0.3 + torch.randn(50, generator=gen, dtype=torch.float64)
    g2 = 0.3 + torch.randn(50, generator=gen, dtype=torch.float64)
    q[0].grad = g1
    o2.step()
    m1, v1 = o2.state[q[0]]["exp_avg"].clone(), o2.state[q[0]]["exp_avg_sq"].clone()
    q[0].grad = g2
    o2.step()
    m2, v2 = o2.state[q[0]]["exp_avg"], o2.state[q[0]]["exp_avg_sq"]
    assert not torch.allclose(v2 - m2 * m2, beta * (v1 - m1 * m1) + beta * (1 - beta) * (g2 - m1) ** 2)


@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_gradient_snr_on_gaussian_gradients(mu):
    """Gradients g ~ N(mu, s^2) i.i.d. per element and step, beta = 0.99, 500 steps, 2000 elements.
    The estimate m_hat is an EMA with variance s^2 (1-beta)/(1+beta), so E[m_hat^2] / s^2 =
    snr + (1-beta)/(1+beta) = snr + 0.005; sigma2_hat averages ~(1+beta)/(1-beta) = 199 samples, so
    E[1/sigma2_hat] ~ (1/s^2)(1 + 2/199) (Jensen, +1%). Expected mean ~ snr (1.01) + 0.005, i.e. +1.5% (snr 1)
    to +3% (snr 0.25); the Monte-Carlo error of the mean over 2000 independent elements is ~0.7% (per-element relative std ~0.3). Tolerance:
    6% relative. A wrong estimator (no bias correction: negligible here after 500 steps; sigma2 = v
    instead of v - m^2: snr/(1+snr), 20% to 50% low; m instead of m^2: off by a factor 1/mu) fails it."""
    s = 1.0
    n, steps, beta = 2000, 500, 0.99
    p = torch.zeros(n, dtype=torch.float64)
    opt = mf.AdamTied([p], lr=1e-3, beta=beta)
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        p.grad = mu + s * torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
    snr = opt.gradient_snr()[p]
    target = mu ** 2 / s ** 2
    assert abs(snr - target) <= 0.06 * target, (snr, target)


def test_gradient_snr_matches_state_and_adam_direction():
    """With eps = 0 the Adam step is -lr m_hat / sqrt(v_hat) = -lr sign(m) / sqrt(1 + 1/snr) elementwise,
    snr = m_hat^2 / (v_hat - m_hat^2) (bias-corrected moments, tied beta), in float64."""
    beta, lr = 0.9, 0.01
    p = make_params(shapes=[(64,)])[0]
    opt = mf.AdamTied([p], lr=lr, beta=beta, eps=0.0)
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 8):
        before = p.clone()
        p.grad = 0.5 * torch.randn(64, generator=gen, dtype=torch.float64) + torch.linspace(-1, 1, 64, dtype=torch.float64)
        opt.step()
        st = opt.state[p]
        bc = 1 - beta ** t
        m = st["exp_avg"] / bc
        var = st["exp_avg_sq"] / bc - m * m
        snr_el = m * m / var
        direction = (before - p) / lr
        if t >= 2:  # at t = 1, var = 0 exactly (one sample): |direction| = 1, snr = inf
            torch.testing.assert_close(direction, torch.sign(m) / torch.sqrt(1 + 1 / snr_el), rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(direction.abs(), torch.ones_like(direction), **F64)
        got = opt.gradient_snr()[p]
        expected = torch.where((m == 0) & (var <= 0), torch.zeros_like(m), m * m / var.clamp_min(0)).mean()
        if t >= 2:
            assert math.isclose(got, float(expected), rel_tol=1e-9), (got, expected)
        else:
            assert got == math.inf


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layout, dtype", [("int8_state", torch.float32), ("int8_sr", torch.float32),
                                           ("master16_int8", torch.bfloat16)])
def test_gradient_snr_decodes_8bit_moments(backend, layout, dtype):
    """Under the int8 layouts the moments are 8-bit codes with block scales: gradient_snr read the codes as the
    values (inf here, where fp32 state gives ~0.126). It decodes them now: the formula on the moments decoded
    with layouts.int8_decode, and within 1% of fp32 state's figure (signs flipping each step: a low SNR)."""
    if backend == "cpu" and mf.backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here")
    gen = torch.Generator().manual_seed(2)
    mag = torch.rand(64, 128, generator=gen) + 0.5
    grads = [mag * (-1) ** i * (1 + 0.1 * torch.rand(64, 128, generator=gen)) for i in range(3)]
    init = torch.randn(64, 128, generator=gen)
    snr = {}
    for lay, dt in (("native", torch.float32), (layout, dtype)):
        p = init.to(dt).detach().requires_grad_()
        opt = mf.AdamTied([p], lr=0.01, backend=backend, layout=lay)
        for g in grads:
            p.grad = g.to(dt)
            opt.step()
        snr[lay] = opt.gradient_snr()[p]
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    bc = 1 - opt.param_groups[0]["betas"][0] ** float(st["step"])
    m = mf.layouts.int8_decode(st["exp_avg"], st["exp_avg_scale"], True).double() / bc
    var = (mf.layouts.int8_decode(st["exp_avg_sq"], st["exp_avg_sq_scale"], False).double() / bc - m * m).clamp_min(0)
    expected = torch.where((m == 0) & (var == 0), torch.zeros_like(m), m * m / var).mean()
    assert math.isclose(snr[layout], float(expected), rel_tol=1e-12), (snr, float(expected))
    assert math.isclose(snr[layout], snr["native"], rel_tol=1e-2), snr


def test_gradient_snr_of_a_complex_param_counts_its_real_pairs():
    """A complex param's update treats it as pairs of reals (docs/conventions.md); gradient_snr cast the complex
    moments to float64, which dropped the imaginary parts (the real parts' SNR alone). It now equals the SNR of
    the same run on the param's view_as_real twin."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    grads = [torch.randn(40, 2, generator=gen, dtype=torch.float64) + 0.5 for _ in range(4)]
    pc = torch.view_as_complex(init.clone()).requires_grad_()
    pr = init.clone().requires_grad_()
    oc, orr = mf.AdamTied([pc], lr=0.01, beta=0.9), mf.AdamTied([pr], lr=0.01, beta=0.9)
    for g in grads:
        pc.grad, pr.grad = torch.view_as_complex(g.clone()), g.clone()
        oc.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), rtol=0, atol=0)
    assert math.isclose(oc.gradient_snr()[pc], orr.gradient_snr()[pr], rel_tol=1e-12)
