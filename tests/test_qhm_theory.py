"""QHM on quadratics (docs/algorithms.md §2) and the QHM.from_* converters.

On f = 0.5 * sum(h_i x_i^2) QHM is the linear recurrence x_{t+1} = c1 x_t - c2 x_{t-1} (t >= 1) with
c1 = 1 - lr h + lr nu beta h + beta, c2 = beta (1 - lr h + lr nu h); its rate is the spectral radius of
z^2 - c1 z + c2; stable iff 0 < lr < 2 (1 + beta) / (h (1 + beta (1 - 2 nu))).
All runs are float64 through the real optimizer (mf.QHM), never through a re-implementation of it.
"""
import cmath
import math

import pytest
import torch

import momentum_fused as mf


def poly(lr, beta, nu, h):
    c1 = 1 - lr * h + lr * nu * beta * h + beta
    c2 = beta * (1 - lr * h + lr * nu * h)
    return c1, c2


def radius(c1, c2):
    d = cmath.sqrt(c1 * c1 - 4 * c2)
    return max(abs((c1 + d) / 2), abs((c1 - d) / 2))


def qhm_trajectory(kw, h, steps, x0=1.0, grad=None):
    """Iterates x_0..x_steps of mf.QHM(**kw) on 0.5 h x^2 (elementwise h), or with a custom ``grad``."""
    h = torch.as_tensor(h, dtype=torch.float64)
    x = torch.full_like(h, x0)
    opt = mf.QHM([x], **kw)
    out = [x.clone()]
    for _ in range(steps):
        x.grad = h * x if grad is None else grad(x)
        opt.step()
        out.append(x.clone())
    return torch.stack(out)


def measured_rate(xs):
    """Slope of log(max |x| over a sliding window) over the second half of a run: the windowed max
    removes the oscillation of complex roots, the least-squares fit averages what is left."""
    a = xs.abs()
    n = len(a)
    w = min(200, n // 4)
    logm = a[n // 2 - w:].unfold(0, w + 1, 1).amax(dim=1).log()
    t = torch.arange(len(logm), dtype=torch.float64)
    tm = t - t.mean()
    return math.exp(float((tm * (logm - logm.mean())).sum() / (tm * tm).sum()))


# (lr, beta, nu, h): complex roots, real roots, a negative dominant root, heavy ball (nu = 1)
CONFIGS = [
    (0.1, 0.9, 0.7, 1.0),     # complex, rho = sqrt(c2) = 0.934
    (0.01, 0.5, 0.7, 1.0),    # real, rho = 0.990
    (0.05, 0.95, 1.0, 2.0),   # complex, heavy ball
    (1.5, 0.5, 0.5, 1.0),     # complex, fast (rho = 0.354)
    (1.8, 0.3, 0.2, 1.0),     # real, dominant root negative (-0.609)
    (0.1, 0.9, 0.3, 0.5),     # complex
    (0.2, 0.8, 0.9, 3.0),     # complex
]


@pytest.mark.parametrize("lr,beta,nu,h", CONFIGS)
def test_iterates_obey_characteristic_recurrence(lr, beta, nu, h):
    c1, c2 = poly(lr, beta, nu, h)
    xs = qhm_trajectory(dict(lr=lr, momentum=beta, nu=nu), [h], 60)[:, 0]
    resid = xs[2:] - c1 * xs[1:-1] + c2 * xs[:-2]
    scale = xs[2:].abs() + xs[1:-1].abs() + xs[:-2].abs()
    assert (resid.abs() <= 1e-12 * scale).all(), resid.abs().max()


@pytest.mark.parametrize("lr,beta,nu,h", CONFIGS)
def test_measured_contraction_is_spectral_radius(lr, beta, nu, h):
    c1, c2 = poly(lr, beta, nu, h)
    rho = radius(c1, c2)
    steps = min(800, int(400 / -math.log(rho)))  # |x| ends above e^-400: no underflow
    est = measured_rate(qhm_trajectory(dict(lr=lr, momentum=beta, nu=nu), [h], steps)[:, 0])
    # measured to ~2e-4 on these configs; 1e-3 still separates rho from sqrt(|c2|) and from |1 - lr h|
    assert abs(est - rho) <= 1e-3, (est, rho)


@pytest.mark.parametrize("beta,nu,h", [(0.9, 0.7, 1.0), (0.5, 0.0, 2.0), (0.9, 1.0, 1.0), (0.8, 0.3, 4.0)])
def test_stability_bound(beta, nu, h):
    lr_max = 2 * (1 + beta) / (h * (1 + beta * (1 - 2 * nu)))
    # at the bound, z = -1 is a root
    c1, c2 = poly(lr_max, beta, nu, h)
    assert abs(1 + c1 + c2) < 1e-12
    inside, outside = 0.98 * lr_max, 1.02 * lr_max
    assert radius(*poly(inside, beta, nu, h)) < 1 < radius(*poly(outside, beta, nu, h))
    xs_in = qhm_trajectory(dict(lr=inside, momentum=beta, nu=nu), [h], 700)[:, 0]
    xs_out = qhm_trajectory(dict(lr=outside, momentum=beta, nu=nu), [h], 700)[:, 0]
    assert xs_in[-50:].abs().max() < 1e-2
    assert xs_out[-50:].abs().max() > 1e2


# ------------------------------------------------------------------ converters
@pytest.mark.parametrize("alpha,b1,b2", [(0.1, 0.9, 0.5), (0.02, 0.7, 0.7), (0.3, 0.5, 0.1)])
def test_from_synthesized_nesterov_characteristic_polynomial(alpha, b1, b2):
    """x+ = x + b1 (x - x-) - alpha h (x + b2 (x - x-)) has c1 = 1 + b1 - alpha h (1 + b2),
    c2 = b1 - alpha h b2; the converted QHM has the same polynomial, checked on its own iterates."""
    kw = mf.QHM.from_synthesized_nesterov(alpha, b1, b2)
    for h in (0.1, 0.5, 1.0, 3.0):
        sn_c1, sn_c2 = 1 + b1 - alpha * h * (1 + b2), b1 - alpha * h * b2
        c1, c2 = poly(kw["lr"], kw["momentum"], kw["nu"], h)
        assert math.isclose(c1, sn_c1, rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(c2, sn_c2, rel_tol=1e-12, abs_tol=1e-14)
        xs = qhm_trajectory(kw, [h], 40)[:, 0]
        resid = xs[2:] - sn_c1 * xs[1:-1] + sn_c2 * xs[:-2]
        assert (resid.abs() <= 1e-12 * (xs[2:].abs() + xs[1:-1].abs() + xs[:-2].abs())).all()


def _max_radius(kw, hs):
    return max(radius(*poly(kw["lr"], kw["momentum"], kw["nu"], h)) for h in hs)


@pytest.mark.parametrize("l,kappa,rho_offset", [(1.0, 10.0, 0.02), (2.0, 100.0, 0.05), (0.5, 50.0, 0.01)])
def test_from_robust_momentum_rate(l, kappa, rho_offset):
    rho = 1 - kappa ** -0.5 + rho_offset  # robust momentum needs rho in [1 - 1/sqrt(kappa), 1 - 1/kappa]
    kw = mf.QHM.from_robust_momentum(l, kappa, rho)
    hs = [l / kappa + (l - l / kappa) * i / 1000 for i in range(1001)]
    r = _max_radius(kw, hs)
    assert r <= rho + 1e-9
    assert r >= rho - 1e-6  # and it is attained on the interval (the design rate, not a looser one)
    # measured on the optimizer, at the worst h
    h_worst = max(hs, key=lambda h: radius(*poly(kw["lr"], kw["momentum"], kw["nu"], h)))
    est = measured_rate(qhm_trajectory(kw, [h_worst], min(800, int(400 / -math.log(rho))))[:, 0])
    assert est <= rho + 2e-3


@pytest.mark.parametrize("l,kappa", [(1.0, 10.0), (2.0, 100.0), (3.0, 1000.0)])
def test_triple_momentum_rate(l, kappa):
    kw = mf.QHM.from_robust_momentum(l, kappa, None)
    assert kw == mf.QHM.from_triple_momentum(l, kappa)
    hs = [l / kappa + (l - l / kappa) * i / 2000 for i in range(2001)]
    assert abs(_max_radius(kw, hs) - (1 - kappa ** -0.5)) <= 1e-9


def _nonlinear_grad(x):
    return x ** 3 + torch.linspace(0.5, 2.0, len(x), dtype=torch.float64) * x


@pytest.mark.parametrize("delta,kappa,xi,eps", [(0.1, 1000.0, 10.0, 0.7), (0.05, 100.0, 5.0, 0.7),
                                                (0.2, 50.0, 3.0, 0.5)])
def test_from_accsgd_reproduces_accsgd(delta, kappa, xi, eps):
    """AccSGD (Kidambi et al. 2018) in the two-state form of its reference PyTorch implementation:
    long step L = delta kappa / eps, B = eps^2 xi / kappa, zeta = eps / (eps + B), w_0 = x_0,
        w <- (1 - B) w + B (x - L g(x)) ;  x <- zeta (x - delta g(x)) + (1 - zeta) w.
    Both it and QHM are linear filters from gradients to iterates with the same rest state, so with the
    converted (lr, beta, nu) the iterates agree for ANY gradient sequence: checked on a non-quadratic."""
    kw = mf.QHM.from_accsgd(delta, kappa, xi, eps)
    x0 = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    L, B = delta * kappa / eps, eps * eps * xi / kappa
    zeta = eps / (eps + B)
    x, w = x0.clone(), x0.clone()
    acc = [x.clone()]
    for _ in range(30):
        g = _nonlinear_grad(x)
        w = (1 - B) * w + B * (x - L * g)
        x = zeta * (x - delta * g) + (1 - zeta) * w
        acc.append(x.clone())
    p = x0.clone()
    opt = mf.QHM([p], **kw)
    for t in range(30):
        p.grad = _nonlinear_grad(p)
        opt.step()
        # reordered float64 arithmetic through 30 nonlinear steps: 1e-10 (TOL[float64] is per-op round-off)
        torch.testing.assert_close(p, acc[t + 1], rtol=1e-10, atol=1e-12)
    # characteristic polynomial of the AccSGD iteration matrix equals QHM's, for several h
    for h in (0.01, 0.5, 2.0):
        m = torch.tensor([[zeta * (1 - delta * h) + (1 - zeta) * B * (1 - L * h), (1 - zeta) * (1 - B)],
                          [B * (1 - L * h), 1 - B]], dtype=torch.float64)
        c1, c2 = poly(kw["lr"], kw["momentum"], kw["nu"], h)
        assert math.isclose(float(torch.trace(m)), c1, rel_tol=1e-12)
        assert math.isclose(float(torch.linalg.det(m)), c2, rel_tol=1e-10)


@pytest.mark.parametrize("k_p,k_i,k_d", [(-0.2, 0.1, 0.5), (0.2, 0.1, -0.5), (-0.05, 0.3, 0.2)])
def test_from_pid_reproduces_filtered_pid(k_p, k_i, k_d):
    """PID control of the iterate (Recht 2018 style, position form, e = -g):
        x_{t+1} = x_0 + k_p e_t + k_i sum_{s<=t} e_s + k_d D_t,  D_t = beta D_{t-1} + (1 - beta)(e_t - e_{t-1})
    with e_{-1} = D_{-1} = 0 and the derivative low-pass pole beta = k_d / (k_d - k_p). This is the form
    that makes the PID transfer function second order (the z^-2 term k_p beta + k_d (1 - beta) vanishes),
    i.e. a QHM; it is DERIVED here, not quoted from a paper: the unfiltered PID is third order and no
    QHM reproduces it. With qhoptim's map (lr = k_i, beta = k_d/(k_d-k_p), nu = k_p^2/(k_i k_d)) the
    iterates agree for any gradient sequence: checked on a non-quadratic."""
    beta = k_d / (k_d - k_p)
    assert 0 <= beta < 1
    kw = mf.QHM.from_pid(k_p, k_i, k_d)
    assert math.isclose(kw["momentum"], beta)
    x0 = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    x = x0.clone()
    integ = torch.zeros_like(x0)
    d = torch.zeros_like(x0)
    e_prev = torch.zeros_like(x0)
    pid = []
    for _ in range(25):
        e = -_nonlinear_grad(x)
        integ = integ + e
        d = beta * d + (1 - beta) * (e - e_prev)
        e_prev = e
        x = x0 + k_p * e + k_i * integ + k_d * d
        pid.append(x.clone())
    p = x0.clone()
    opt = mf.QHM([p], **kw)
    for t in range(25):
        p.grad = _nonlinear_grad(p)
        opt.step()
        # different float64 op order (running sums vs a momentum buffer) over 25 nonlinear steps
        torch.testing.assert_close(p, pid[t], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k_p,k_i,k_d,why", [(0.3, 0.1, 0.05, "momentum k_d / \\(k_d - k_p\\) = -0.2"),
                                             (0.05, 0.1, 0.3, "= 1.2"), (0.0, 0.1, 0.3, "= 1.0"),
                                             (0.2, 0.1, 0.0, "needs k_i != 0, k_d != 0"),
                                             (0.2, 0.0, -0.5, "needs k_i != 0"),
                                             (-0.5, 1e-300, 1e-300, "must not underflow"),
                                             (float("-inf"), 0.1, 1.0, "must be finite"),
                                             (-1e-05, 1e-160, 1e-160, "nu k_p\\^2 / \\(k_i k_d\\) = inf")])
def test_from_pid_refuses_gains_outside_qhms_range_naming_the_momentum(k_p, k_i, k_d, why):
    """Gains of one sign map to a momentum outside [0, 1), which QHM refuses: from_pid says so itself, naming
    the gains and the momentum (a review, 2026-12-06: QHM's own "Invalid momentum" named a value the user never
    passed; k_d = 0 raised ZeroDivisionError)."""
    with pytest.raises(ValueError, match=f"from_pid\\(k_p={k_p}, k_i={k_i}, k_d={k_d}\\).*{why}"):
        mf.QHM.from_pid(k_p, k_i, k_d)
