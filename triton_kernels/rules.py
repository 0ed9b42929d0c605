"""One ``@triton.jit`` math function per update rule, on fp32 values.

Each ``<rule>_math`` has the name and the order of operations of ``momentum_fused/reference.py``'s
``<rule>_ref`` (this package does not import momentum_fused: the layouts below are checked against
``momentum_fused.specs`` by the backend at load time and by tests/triton).

Conventions shared by all math functions:
- tensor values are fp32 (scalars or blocks); hyperparameters arrive as fp64 values loaded from the
  per-tensor scalar table (never ``tl.constexpr``). Each function first derives its coefficients in
  fp64 (``1 - beta``, ``1 - lr * wd``, ``-lr * nu``: no fp32 cancellation, as in the float64
  reference) and rounds them once to fp32; all elementwise math is fp32;
- flags are ``tl.constexpr`` and choose code paths;
- tests on hyperparameters (``weight_decay != 0``, ``first``) use ``tl.where`` so that the same function
  serves a block of one tensor (scalar hyperparameters) and a packed block of many small tensors
  (one hyperparameter per lane);
- each returns the new parameter value followed by the new state values, in state order.
"""
import triton
import triton.language as tl

# Rule ids (compile-time constant of the kernels) and the layouts they expect.
RULE_IDS = {
    "sgd": 0,
    "qhm": 1,
    "adam": 2,
    "nadam": 3,
    "rmsprop": 4,
    "signum": 5,
    "lion": 6,
    "fsgdm": 7,
    "sgd_sf": 8,
    "adamw_sf": 9,
}
# Compiled kernels may only read module globals that are ``tl.constexpr`` (the interpreter accepts plain
# ints, so only a real compile catches this: tests/test_triton_compile.py compiles for sm_90 on CPU).
SGD, QHM, ADAM, NADAM, RMSPROP, SIGNUM, LION, FSGDM, SGD_SF, ADAMW_SF = (tl.constexpr(i) for i in range(10))

# Scalar-table columns per rule (must equal momentum_fused.specs: <spec>.scalar_names).
SCALARS = {
    "sgd": ("lr", "weight_decay", "momentum", "dampening", "first", "grad_mult"),
    "qhm": ("lr", "weight_decay", "momentum", "nu", "grad_mult"),
    "adam": ("lr", "weight_decay", "beta1", "beta2", "eps", "step_size", "bc2_sqrt", "grad_mult"),
    "nadam": ("lr", "weight_decay", "beta1", "beta2", "eps", "bc2", "grad_coef", "exp_avg_coef", "grad_mult"),
    "rmsprop": ("lr", "weight_decay", "alpha", "eps", "momentum", "grad_mult"),
    "signum": ("lr", "weight_decay", "momentum", "grad_mult"),
    "lion": ("lr", "weight_decay", "beta1", "beta2", "grad_mult"),
    "fsgdm": ("lr", "weight_decay", "u", "v", "first", "grad_mult"),
    "sgd_sf": ("lr", "c", "beta", "y_coef", "weight_decay", "grad_mult"),
    "adamw_sf": ("lr", "c", "beta", "y_coef", "weight_decay", "beta2", "bc2", "eps", "inner_momentum",
                 "inner_bc", "grad_mult"),
}
# Flag names per rule (must equal <spec>.flag_names); they become the constexprs F0, F1.
FLAGS = {
    "sgd": ("momentum", "nesterov"),
    "qhm": ("direct_decay",),
    "adam": ("decoupled", "amsgrad"),
    "nadam": ("decoupled",),
    "rmsprop": ("momentum", "centered"),
    "signum": ("momentum",),
    "lion": (),
    "fsgdm": (),
    "sgd_sf": (),
    "adamw_sf": ("inner_momentum",),
}
# Kernel family: "one" = the one-buffer kernel (0 or 1 state tensor), "multi" = 1 to 3 state tensors.
FAMILY = {
    "sgd": "one", "qhm": "one", "signum": "one", "lion": "one", "fsgdm": "one",
    "sgd_sf": "one",
    "adam": "multi", "nadam": "multi", "rmsprop": "multi", "adamw_sf": "multi",
}


@triton.jit
def _sign(x):
    # sign(0) = 0
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def sgd_math(p, g, b, lr, wd, momentum, dampening, first, gm,
             MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    g = g * gm.to(tl.float32)
    g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    if MOMENTUM:
        mom = momentum.to(tl.float32)
        b = tl.where(first != 0, g, b * mom + (1.0 - dampening).to(tl.float32) * g)
        if NESTEROV:
            g = g + mom * b
        else:
            g = b
    p = p - lr.to(tl.float32) * g
    return p, b


@triton.jit
def qhm_math(p, g, b, lr, wd, momentum, nu, gm, DIRECT_DECAY: tl.constexpr):
    g = g * gm.to(tl.float32)
    if DIRECT_DECAY:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    else:
        g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    b = b * momentum.to(tl.float32) + (1.0 - momentum).to(tl.float32) * g
    p = p + (-lr * nu).to(tl.float32) * b
    p = p + (-lr * (1.0 - nu)).to(tl.float32) * g
    return p, b


@triton.jit
def adam_math(p, g, m, v, vmax, lr, wd, beta1, beta2, eps, step_size, bc2_sqrt, gm,
              DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    g = g * gm.to(tl.float32)
    if DECOUPLED:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    else:
        g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    m = m + (1.0 - beta1).to(tl.float32) * (g - m)  # lerp(m, g, 1 - beta1)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        denom = tl.sqrt(vmax) / bc2_sqrt.to(tl.float32) + eps.to(tl.float32)
    else:
        denom = tl.sqrt(v) / bc2_sqrt.to(tl.float32) + eps.to(tl.float32)  # eps after the sqrt bias correction
    p = p + (-step_size).to(tl.float32) * (m / denom)
    return p, m, v, vmax


@triton.jit
def nadam_math(p, g, m, v, lr, wd, beta1, beta2, eps, bc2, grad_coef, exp_avg_coef, gm,
               DECOUPLED: tl.constexpr):
    g = g * gm.to(tl.float32)
    if DECOUPLED:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    else:
        g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    m = m + (1.0 - beta1).to(tl.float32) * (g - m)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * (g * g)
    denom = tl.sqrt(v / bc2.to(tl.float32)) + eps.to(tl.float32)
    p = p + grad_coef.to(tl.float32) * (g / denom)
    p = p + exp_avg_coef.to(tl.float32) * (m / denom)
    return p, m, v


@triton.jit
def rmsprop_math(p, g, sq, buf, ga, lr, wd, alpha, eps, momentum, gm,
                 MOMENTUM: tl.constexpr, CENTERED: tl.constexpr):
    g = g * gm.to(tl.float32)
    g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    one_m_alpha = (1.0 - alpha).to(tl.float32)
    sq = sq * alpha.to(tl.float32) + one_m_alpha * (g * g)
    if CENTERED:
        ga = tl.where(one_m_alpha < 0.5, ga + one_m_alpha * (g - ga), g - (g - ga) * (1.0 - one_m_alpha))  # torch.lerp
        avg = tl.sqrt(tl.fma(-ga, ga, sq))  # torch's addcmul(value=-1): one rounding (its NaNs where v - m^2 < 0)
    else:
        avg = tl.sqrt(sq)
    avg = avg + eps.to(tl.float32)
    if MOMENTUM:
        buf = buf * momentum.to(tl.float32) + g / avg
        p = p - lr.to(tl.float32) * buf
    else:
        p = p + (-lr).to(tl.float32) * (g / avg)
    return p, sq, buf, ga


@triton.jit
def signum_math(p, g, m, lr, wd, momentum, gm, MOMENTUM: tl.constexpr):
    g = g * gm.to(tl.float32)
    p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    if MOMENTUM:
        m = m * momentum.to(tl.float32) + (1.0 - momentum).to(tl.float32) * g
        p = p - lr.to(tl.float32) * _sign(m)
    else:
        p = p - lr.to(tl.float32) * _sign(g)
    return p, m


@triton.jit
def lion_math(p, g, m, lr, wd, beta1, beta2, gm):
    g = g * gm.to(tl.float32)
    p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    c = m * beta1.to(tl.float32) + (1.0 - beta1).to(tl.float32) * g
    p = p - lr.to(tl.float32) * _sign(c)
    m = m * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * g
    return p, m


@triton.jit
def fsgdm_math(p, g, b, lr, wd, u, v, first, gm):
    g = g * gm.to(tl.float32)
    g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    b = tl.where(first != 0, g, b * u.to(tl.float32) + v.to(tl.float32) * g)
    p = p - lr.to(tl.float32) * b
    return p, b


@triton.jit
def _lerp(a, b, w):
    # torch.lerp's formula (exact at w = 1: the first schedule-free step has c = 1)
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def sgd_sf_math(p, g, z, lr, c, y_coef, wd, gm):
    """Schedule-free SGD; p holds y."""
    g = g * gm.to(tl.float32)
    g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)  # decay evaluated at y
    p = _lerp(p, z, c.to(tl.float32))  # y <- y + c (z - y)
    p = p + y_coef.to(tl.float32) * g
    z = z - lr.to(tl.float32) * g
    return p, z


@triton.jit
def adamw_sf_math(p, g, z, v, m, lr, c, y_coef, wd, beta2, bc2, eps, inner_momentum, inner_bc, gm,
                  INNER_MOMENTUM: tl.constexpr):
    """Schedule-free AdamW; p holds y; state z, exp_avg_sq [, exp_avg]."""
    g = g * gm.to(tl.float32)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * (g * g)
    denom = tl.sqrt(v / bc2.to(tl.float32)) + eps.to(tl.float32)
    d = g / denom
    if INNER_MOMENTUM:
        m = m + (1.0 - inner_momentum).to(tl.float32) * (d - m)
        d = m / inner_bc.to(tl.float32)
    d = tl.where(wd != 0, d + wd.to(tl.float32) * p, d)
    p = _lerp(p, z, c.to(tl.float32))
    p = p + y_coef.to(tl.float32) * d
    z = z - lr.to(tl.float32) * d
    return p, z, v, m
