"""One ``@triton.jit`` math function per update rule, on fp32 values.

Each ``<rule>_math`` has the name and the order of operations of ``momentum_fused/reference.py``'s
``<rule>_ref``. The rule ids, pack columns and flags come from ``momentum_fused.specs`` (this folder installs as
``momentum_fused.triton_kernels``).

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
import os

import triton
import triton.language as tl

from ..specs import KERNEL_RULES, get_spec

# Rule ids (compile-time constants of the kernels), scalar-table columns and flag names: derived from the one
# definition of each (specs.KERNEL_RULES, spec.scalar_names, spec.flag_names).
RULE_IDS = {name: i for i, name in enumerate(KERNEL_RULES)}
# Compiled kernels may only read module globals that are ``tl.constexpr`` (the interpreter accepts plain
# ints, so only a real compile catches this: tests/test_triton_compile.py compiles for sm_90 on CPU).
_CONSTANT_RULES = ("sgd", "qhm", "adam", "nadam", "rmsprop", "signum", "lion", "fsgdm", "sgd_sf", "adamw_sf",
                   "muon_momentum", "muon_apply")
SGD, QHM, ADAM, NADAM, RMSPROP, SIGNUM, LION, FSGDM, SGD_SF, ADAMW_SF, MUON_MOMENTUM_R, MUON_APPLY_R = (
    tl.constexpr(RULE_IDS[n]) for n in _CONSTANT_RULES)
# (MUON_MOMENTUM_* / MUON_APPLY_* are the pack columns: the rule ids take an _R suffix)
# What each rule's math writes (spec.traffic), by rule id: bit 0 the param, bit 1 + j state j. The kernels store
# nothing else (Muon's apply pass does not store its update back); the loads of what a rule never reads are dead
# code the compiler drops.
WRITES = tl.constexpr(tuple(int(t.writes_param) | (t.states_written << 1)
                            for t in (get_spec(n).traffic for n in KERNEL_RULES)))
SCALARS = {name: tuple(get_spec(name).scalar_names) for name in KERNEL_RULES}
FLAGS = {name: tuple(get_spec(name).flag_names) for name in KERNEL_RULES}


# MOMENTUM_FUSED_TRITON_IEEE=1: the rules divide and take square roots correctly rounded (PTX div.rn / sqrt.rn, as
# the CUDA and CPU kernels; the compiled kernels then round as the interpreter does). Default 0: Triton's ``/`` and
# ``tl.sqrt``, which compile to div.full (up to 2 ulp) and sqrt.approx.ftz (subnormal inputs flushed: with eps = 0 a
# subnormal second moment becomes a zero denominator, an inf step). The IEEE forms doubled the static instructions
# per element (AdamW fp32 27.8 -> 67.8, sm_90) and made two mixed kernels spill 8 bytes: kept an A/B knob until a GPU
# times it (bench/device_check.sh kernels-triton-ieee; docs/triton.md). The interpreter computes IEEE either way.
IEEE = tl.constexpr(os.environ.get("MOMENTUM_FUSED_TRITON_IEEE", "0") == "1")


@triton.jit
def _div(a, b):
    """a / b: correctly rounded under ``IEEE``, else Triton's division."""
    if IEEE:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x):
    """sqrt(x): correctly rounded under ``IEEE``, else Triton's (approximate, flushing subnormals)."""
    if IEEE:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


_NO_PROLOGUE_WD = frozenset({"sgd_sf", "adamw_sf", "muon_momentum"})


def _column_constants() -> dict:
    """``<RULE>_<COLUMN>`` -> tl.constexpr(index) for every rule's scalar pack (kernels.py reads packs by name).
    Every pack starts with lr and ends with grad_mult (the kernels' prologue reads those two generically)."""
    out = {}
    for name, cols in SCALARS.items():
        assert cols[0] == "lr" and cols[-1] == "grad_mult", (name, cols)
        # kernels.py's _prologue also reads column 1 as weight_decay (`wd`), which the branches pass on; the rules
        # whose column 1 is something else read their decay by name and must never use `wd`: listed here
        assert cols[1] == "weight_decay" or name in _NO_PROLOGUE_WD, (
            f"{name}: column 1 is {cols[1]!r}, not weight_decay: read it by name and add the rule to _NO_PROLOGUE_WD")
        for i, col in enumerate(cols):
            key = f"{name.upper()}_{col.upper()}"
            assert key not in out and key not in globals(), key
            out[key] = tl.constexpr(i)
    return out


globals().update(_column_constants())

# Kernel family: "one" = the one-buffer kernel (0 or 1 state tensor), "multi" = 1 to 3 state tensors.
FAMILY = {
    "sgd": "one", "qhm": "one", "signum": "one", "lion": "one", "fsgdm": "one",
    "sgd_sf": "one", "muon_momentum": "one", "muon_apply": "one",
    "adam": "multi", "nadam": "multi", "rmsprop": "multi", "adamw_sf": "multi",
}
# The rules these kernels serve are FAMILY's keys (the backend's supports() refuses the others, naming them); each
# one also needs its rule-id constant above, which the dispatch branches compare against.
assert set(FAMILY) == set(_CONSTANT_RULES), "FAMILY and the rule-id constants name different rules"


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
    m = _lerp(m, g, (1.0 - beta1).to(tl.float32))  # torch.lerp's two branches (beta1 < 0.5: the second)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)  # (as torch.maximum; the default drops a NaN)
        denom = _div(_sqrt(vmax), bc2_sqrt.to(tl.float32)) + eps.to(tl.float32)
    else:
        denom = _div(_sqrt(v), bc2_sqrt.to(tl.float32)) + eps.to(tl.float32)  # eps after the sqrt bias correction
    p = p + (-step_size).to(tl.float32) * _div(m, denom)
    return p, m, v, vmax


@triton.jit
def nadam_math(p, g, m, v, lr, wd, beta1, beta2, eps, bc2, grad_coef, exp_avg_coef, gm,
               DECOUPLED: tl.constexpr):
    g = g * gm.to(tl.float32)
    if DECOUPLED:
        p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    else:
        g = tl.where(wd != 0, g + wd.to(tl.float32) * p, g)
    m = _lerp(m, g, (1.0 - beta1).to(tl.float32))
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * (g * g)
    denom = _sqrt(_div(v, bc2.to(tl.float32))) + eps.to(tl.float32)
    p = p + grad_coef.to(tl.float32) * _div(g, denom)
    p = p + exp_avg_coef.to(tl.float32) * _div(m, denom)
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
        avg = _sqrt(tl.fma(-ga, ga, sq))  # torch's addcmul(value=-1): one rounding (its NaNs where v - m^2 < 0)
    else:
        avg = _sqrt(sq)
    avg = avg + eps.to(tl.float32)
    if MOMENTUM:
        buf = buf * momentum.to(tl.float32) + _div(g, avg)
        p = p - lr.to(tl.float32) * buf
    else:
        p = p + (-lr).to(tl.float32) * _div(g, avg)
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
    # torch.lerp's formula (exact at w = 1: the first schedule-free step has c = 1). Every lerp of the reference is
    # this one: Adam's and NAdam's first moment with beta1 < 0.5 took only the first branch before 2026-12-07 (at
    # beta1 = 0 a moment far above the gradient cancelled to 0 instead of the gradient; inf + 0 where torch has NaN)
    # (one select of the base and one of the scalar weight: two full branches selected per element made NAdam's
    # bf16 kernel spill 8 bytes on sm_90. a - (-w)(b - a) is a + w (b - a) exactly, signed zeros included;
    # b + (w - 1)(b - a) was not b - (b - a)(1 - w) at w = 1, where w - 1 is +0: the opposite zero)
    lo = w < 0.5
    return tl.where(lo, a, b) - tl.where(lo, -w, 1.0 - w) * (b - a)


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
    denom = _sqrt(_div(v, bc2.to(tl.float32))) + eps.to(tl.float32)
    d = _div(g, denom)
    if INNER_MOMENTUM:
        m = _lerp(m, d, (1.0 - inner_momentum).to(tl.float32))
        d = _div(m, inner_bc.to(tl.float32))
    d = tl.where(wd != 0, d + wd.to(tl.float32) * p, d)
    p = _lerp(p, z, c.to(tl.float32))
    p = p + y_coef.to(tl.float32) * d
    z = z - lr.to(tl.float32) * d
    return p, z, v, m


@triton.jit
def _lerp_fma(a, b, w):
    # torch.lerp as torch's CPU vector code computes it (one rounding): Muon's fp32 step equals torch's bitwise
    d = b - a
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, a), tl.fma(w - 1.0, d, b))


@triton.jit
def muon_momentum_math(g, buf, update, momentum, gm, NESTEROV: tl.constexpr):
    """Muon's momentum pass: buf <- lerp(buf, g, 1 - mu); update (a work buffer) <- lerp(g, buf, mu) or buf. The
    pass runs with the buffer in the param slot and the update as its one state (csrc/update_rules.h)."""
    g = g * gm.to(tl.float32)
    buf = _lerp_fma(buf, g, (1.0 - momentum).to(tl.float32))
    if NESTEROV:
        update = _lerp_fma(g, buf, momentum.to(tl.float32))
    else:
        update = buf
    return buf, update


@triton.jit
def muon_apply_math(p, update, lr, wd, adjusted_lr):
    """Muon's apply pass: p <- p (1 - lr wd); p <- p - adjusted_lr * update (update = the Newton-Schulz result)."""
    p = tl.where(wd != 0, p * (1.0 - lr * wd).to(tl.float32), p)
    return tl.fma((-adjusted_lr).to(tl.float32), update, p)


# ------------------------------------------------------------------------------------------- dispatch
# The kernels (kernels.py) know no rule: each family body loads its lists and calls one of these, which pick the
# rule's math by its compile-time id and read its scalars from the table row ``sp`` by column name.
@triton.jit
def one_buffer_math(p, g, b, sp, lr, wd, gm, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr):
    """Rules with 0 or 1 state tensor (family "one"); returns (p, b)."""
    if RULE == SGD:
        p, b = sgd_math(p, g, b, lr, wd, tl.load(sp + SGD_MOMENTUM), tl.load(sp + SGD_DAMPENING), tl.load(sp + SGD_FIRST), gm, F0, F1)
    elif RULE == QHM:
        p, b = qhm_math(p, g, b, lr, wd, tl.load(sp + QHM_MOMENTUM), tl.load(sp + QHM_NU), gm, F0)
    elif RULE == SIGNUM:
        p, b = signum_math(p, g, b, lr, wd, tl.load(sp + SIGNUM_MOMENTUM), gm, F0)
    elif RULE == LION:
        p, b = lion_math(p, g, b, lr, wd, tl.load(sp + LION_BETA1), tl.load(sp + LION_BETA2), gm)
    elif RULE == MUON_MOMENTUM_R:  # (lr, momentum, grad_mult); p is the momentum buffer, b the update (written)
        p, b = muon_momentum_math(g, p, b, tl.load(sp + MUON_MOMENTUM_MOMENTUM), gm, F0)
    elif RULE == MUON_APPLY_R:  # (lr, weight_decay, adjusted_lr, grad_mult); b is the update, read only
        p = muon_apply_math(p, b, lr, wd, tl.load(sp + MUON_APPLY_ADJUSTED_LR))
    elif RULE == SGD_SF:  # (lr, c, beta, y_coef, weight_decay, grad_mult)
        p, b = sgd_sf_math(p, g, b, lr, tl.load(sp + SGD_SF_C), tl.load(sp + SGD_SF_Y_COEF), tl.load(sp + SGD_SF_WEIGHT_DECAY), gm)
    else:
        tl.static_assert(RULE == FSGDM, "rule not served by the one-buffer kernel")
        p, b = fsgdm_math(p, g, b, lr, wd, tl.load(sp + FSGDM_U), tl.load(sp + FSGDM_V), tl.load(sp + FSGDM_FIRST), gm)
    return p, b


@triton.jit
def multi_buffer_math(p, g, s_0, s_1, s_2, sp, lr, wd, gm, RULE: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr):
    """Rules with 1 to 3 state tensors (family "multi"); returns (p, s_0, s_1, s_2)."""
    if RULE == ADAM:
        p, s_0, s_1, s_2 = adam_math(p, g, s_0, s_1, s_2, lr, wd, tl.load(sp + ADAM_BETA1), tl.load(sp + ADAM_BETA2),
                                     tl.load(sp + ADAM_EPS), tl.load(sp + ADAM_STEP_SIZE), tl.load(sp + ADAM_BC2_SQRT), gm, F0, F1)
    elif RULE == ADAMW_SF:  # (lr, c, beta, y_coef, wd, beta2, bc2, eps, inner_momentum, inner_bc, gm)
        p, s_0, s_1, s_2 = adamw_sf_math(p, g, s_0, s_1, s_2, lr, tl.load(sp + ADAMW_SF_C), tl.load(sp + ADAMW_SF_Y_COEF),
                                         tl.load(sp + ADAMW_SF_WEIGHT_DECAY), tl.load(sp + ADAMW_SF_BETA2), tl.load(sp + ADAMW_SF_BC2), tl.load(sp + ADAMW_SF_EPS),
                                         tl.load(sp + ADAMW_SF_INNER_MOMENTUM), tl.load(sp + ADAMW_SF_INNER_BC), gm, F0)
    elif RULE == NADAM:
        p, s_0, s_1 = nadam_math(p, g, s_0, s_1, lr, wd, tl.load(sp + NADAM_BETA1), tl.load(sp + NADAM_BETA2), tl.load(sp + NADAM_EPS),
                                 tl.load(sp + NADAM_BC2), tl.load(sp + NADAM_GRAD_COEF), tl.load(sp + NADAM_EXP_AVG_COEF), gm, F0)
    else:
        tl.static_assert(RULE == RMSPROP, "rule not served by the multi-buffer kernel")
        # state order: square_avg [, momentum_buffer] [, grad_avg]
        if F1 and not F0:  # centered only: (square_avg, grad_avg)
            p, s_0, s_2, s_1 = rmsprop_math(p, g, s_0, s_2, s_1, lr, wd, tl.load(sp + RMSPROP_ALPHA), tl.load(sp + RMSPROP_EPS),
                                            tl.load(sp + RMSPROP_MOMENTUM), gm, F0, F1)
        else:
            p, s_0, s_1, s_2 = rmsprop_math(p, g, s_0, s_1, s_2, lr, wd, tl.load(sp + RMSPROP_ALPHA), tl.load(sp + RMSPROP_EPS),
                                            tl.load(sp + RMSPROP_MOMENTUM), gm, F0, F1)
    return p, s_0, s_1, s_2
