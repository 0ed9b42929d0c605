"""The executable specification: one pure-torch function per update rule.

Each ``<rule>_ref(p, g, state, s, f)`` updates ``p`` and the elementwise ``state`` tensors in place,
in the tensors' own dtype (run it on float64 copies to get the oracle), on any device. (The reference
*backend* runs fp16/bf16 storage through these functions in float32, see backends._reference_apply.)
- ``g`` is never modified.
- ``state`` is the tuple of state tensors in the order of ``spec.state_names(group)``.
- ``s`` is the rule's scalar pack (``spec.Scalars``), computed on the host in float64.
- ``f`` is the rule's flags tuple (``spec.Flags``).

The op order is the one the kernels use, and where torch.optim has the rule, the one torch uses,
so that parity tests can be tight. Conventions: docs/algorithms.md.
"""
from __future__ import annotations

import torch

__all__ = ["RULES"]


def _grad(g, s):
    """maximize and 1/grad_scale arrive folded into ``grad_mult``."""
    return g if s.grad_mult == 1.0 else g * s.grad_mult


def sgd_ref(p, g, state, s, f):
    g = _grad(g, s)
    if s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)
    if f.momentum:
        (buf,) = state
        if s.first:
            buf.copy_(g)  # first step: b = g (not (1 - dampening) g)
        else:
            buf.mul_(s.momentum).add_(g, alpha=1.0 - s.dampening)
        g = g.add(buf, alpha=s.momentum) if f.nesterov else buf
    p.add_(g, alpha=-s.lr)


def qhm_ref(p, g, state, s, f):
    (buf,) = state
    g = _grad(g, s)
    if s.weight_decay != 0:
        if f.direct_decay:
            p.mul_(1.0 - s.lr * s.weight_decay)
        else:
            g = g.add(p, alpha=s.weight_decay)
    buf.mul_(s.momentum).add_(g, alpha=1.0 - s.momentum)
    p.add_(buf, alpha=-s.lr * s.nu)
    p.add_(g, alpha=-s.lr * (1.0 - s.nu))


def _adam_moments(p, g, m, v, s, decoupled):
    """The part Adam and NAdam share: maximize/unscale, L2 or decoupled decay, both moment EMAs.
    Returns the (decayed) gradient."""
    g = _grad(g, s)
    if s.weight_decay != 0:
        if decoupled:
            p.mul_(1.0 - s.lr * s.weight_decay)
        else:
            g = g.add(p, alpha=s.weight_decay)
    m.lerp_(g, 1.0 - s.beta1)
    v.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
    return g


def adam_ref(p, g, state, s, f):
    m, v = state[0], state[1]
    _adam_moments(p, g, m, v, s, f.decoupled)
    if f.amsgrad:
        vmax = state[2]
        torch.maximum(vmax, v, out=vmax)
        v = vmax
    denom = (v.sqrt() / s.bc2_sqrt).add_(s.eps)  # eps added after the sqrt bias correction
    p.addcdiv_(m, denom, value=-s.step_size)


def nadam_ref(p, g, state, s, f):
    m, v = state
    g = _adam_moments(p, g, m, v, s, f.decoupled)
    denom = v.div(s.bc2).sqrt().add_(s.eps)
    p.addcdiv_(g, denom, value=s.grad_coef)
    p.addcdiv_(m, denom, value=s.exp_avg_coef)


def rmsprop_ref(p, g, state, s, f):
    sq = state[0]
    g = _grad(g, s)
    if s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)
    sq.mul_(s.alpha).addcmul_(g, g, value=1.0 - s.alpha)
    if f.centered:
        ga = state[-1]
        ga.lerp_(g, 1.0 - s.alpha)
        avg = sq.addcmul(ga, ga, value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(s.eps)
    if f.momentum:
        buf = state[1]
        buf.mul_(s.momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-s.lr)
    else:
        p.addcdiv_(g, avg, value=-s.lr)


def signum_ref(p, g, state, s, f):
    g = _grad(g, s)
    if s.weight_decay != 0:
        p.mul_(1.0 - s.lr * s.weight_decay)
    if f.momentum:
        (m,) = state
        m.mul_(s.momentum).add_(g, alpha=1.0 - s.momentum)
        g = m
    p.add_(torch.sign(g), alpha=-s.lr)


def lion_ref(p, g, state, s, f):
    (m,) = state
    g = _grad(g, s)
    if s.weight_decay != 0:
        p.mul_(1.0 - s.lr * s.weight_decay)
    c = m.mul(s.beta1).add_(g, alpha=1.0 - s.beta1)  # same op order as signum's buffer update
    p.add_(torch.sign(c), alpha=-s.lr)
    m.mul_(s.beta2).add_(g, alpha=1.0 - s.beta2)


def fsgdm_ref(p, g, state, s, f):
    (buf,) = state
    g = _grad(g, s)
    if s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)
    if s.first:
        buf.copy_(g)
    else:
        buf.mul_(s.u).add_(g, alpha=s.v)
    p.add_(buf, alpha=-s.lr)


RULES = {
    "sgd": sgd_ref,
    "qhm": qhm_ref,
    "adam": adam_ref,
    "nadam": nadam_ref,
    "rmsprop": rmsprop_ref,
    "signum": signum_ref,
    "lion": lion_ref,
    "fsgdm": fsgdm_ref,
}


# ---------------------------------------------------------------- schedule-free (memory-efficient form)
# p holds y; state[0] is z (initialised to a copy of y by the optimizer when the state is created).
# x is not stored: x = (y - (1 - beta) z) / beta. Convention: facebookresearch/schedule_free v1.4.
def sgd_sf_ref(p, g, state, s, f):
    (z,) = state
    g = _grad(g, s)
    if s.weight_decay != 0:
        g = g.add(p, alpha=s.weight_decay)  # decay evaluated at y
    p.lerp_(z, s.c)  # y <- y + c (z - y)
    p.add_(g, alpha=s.y_coef)  # y_coef = lr (beta (1 - c) - 1)
    z.sub_(g, alpha=s.lr)


def adamw_sf_ref(p, g, state, s, f):
    z, v = state[0], state[1]
    g = _grad(g, s)
    v.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
    denom = v.div(s.bc2).sqrt_().add_(s.eps)  # bias correction inside the denominator
    d = g.div(denom)
    if f.inner_momentum:  # optional EMA of the preconditioned direction, bias-corrected (off by default)
        m = state[2]
        m.lerp_(d, 1.0 - s.inner_momentum)
        d = m.div(s.inner_bc)
    if s.weight_decay != 0:
        d = d.add(p, alpha=s.weight_decay)  # decay evaluated at y, not preconditioned
    p.lerp_(z, s.c)
    p.add_(d, alpha=s.y_coef)
    z.sub_(d, alpha=s.lr)


RULES["sgd_sf"] = sgd_sf_ref
RULES["adamw_sf"] = adamw_sf_ref


# ---------------------------------------------------------------- schedule-free Polyak reductions
# The Polyak step needs two sums over all tensors of a param group before the elementwise pass:
#   dot = <g, z - y>  (= beta <g, z - x> in the memory-efficient form, since z - x = (z - y) / beta)
#   sq  = ||g||^2_{D^-1} = sum g^2 / D,  D = 1 (SGD) or the Adam denominator sqrt(v_new / bc2) + eps,
# with v_new = beta2 v + (1 - beta2) g^2 computed here *without* writing v (same op order as adamw_sf_ref).
# ``state`` is the tuple of existing state tensors, or None when the tensor has no state yet (then
# z = y and v = 0). ``s`` needs grad_mult (and beta2, bc2, eps for adamw_sf). Returns two float64
# 0-d tensors on the tensor's device; the caller sums them. A fused backend can replace these.
_SUM_ROW = 1 << 14  # elements a row of ``fixed_sum`` adds: under torch's parallel grain (32768), so in one thread


def fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum()`` in an order that does not depend on torch's thread count: rows of ``_SUM_ROW`` elements, each
    added in one thread (torch parallelizes a reduction of several outputs over them), then their sums the same
    way. A whole-tensor sum splits its input among the threads, which moved the Polyak step size by an ulp with the
    thread count (a review, 2026-12-08)."""
    x = x.reshape(-1)
    n = x.numel()
    if n <= _SUM_ROW:
        return x.sum()
    rows = n // _SUM_ROW
    return fixed_sum(torch.cat([x[:rows * _SUM_ROW].view(rows, _SUM_ROW).sum(dim=1), x[rows * _SUM_ROW:].sum()[None]]))


def sgd_sf_polyak_reduce_ref(p, g, state, s, f):
    g = _grad(g, s).double()
    dot = fixed_sum(g * (state[0].double() - p.double())) if state is not None else g.new_zeros(())
    return dot, fixed_sum(g * g)


def adamw_sf_polyak_reduce_ref(p, g, state, s, f):
    g = _grad(g, s)
    if state is not None:
        z, v = state[0], state[1]
        dot = fixed_sum(g.double() * (z.double() - p.double()))
        v_new = v.mul(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
    else:
        dot = g.new_zeros((), dtype=torch.float64)
        v_new = torch.zeros_like(g).addcmul_(g, g, value=1.0 - s.beta2)  # as the update does from v = 0
    denom = v_new.div_(s.bc2).sqrt_().add_(s.eps)
    sq = fixed_sum(g.double() * g.double() / denom.double())
    return dot, sq


REDUCTIONS = {
    "sgd_sf": sgd_sf_polyak_reduce_ref,
    "adamw_sf": adamw_sf_polyak_reduce_ref,
}


# ---------------------------------------------------------------- muon (torch.optim.Muon convention, §10)
# Two elementwise passes around a matrix phase (contract v2). The momentum pass runs with the momentum buffer in
# the param slot (``buf``) and the update, a work buffer of the step, as its state. The buffer is torch 2.13's
# EMA form (buf.lerp_(g, 1 - mu)), so that checkpoints are exchanged with torch.optim.Muon; after the Frobenius
# normalization of Newton-Schulz its direction equals the summed form of the docs (docs/algorithms.md §10).
def muon_momentum_ref(buf, g, state, s, f):
    (update,) = state
    g = _grad(g, s)
    buf.lerp_(g, 1.0 - s.momentum)
    if f.nesterov:
        torch.lerp(g, buf, s.momentum, out=update)
    else:
        update.copy_(buf)


def muon_apply_ref(p, g, state, s, f):
    """``update`` holds NS(U) (written by the matrix phase); adjusted_lr = lr * the shape factor."""
    (update,) = state
    if s.weight_decay != 0:
        p.mul_(1.0 - s.lr * s.weight_decay)  # decoupled decay with the unadjusted lr, as torch
    p.add_(update, alpha=-s.adjusted_lr)


def newton_schulz(x, schedule, eps, dtype, gram=False, restarts=(), sym=None):
    """Quintic Newton-Schulz of each matrix of the [n, A, B] stack ``x`` in ``dtype``: X transposed when A > B
    (so that X X^T is the small Gram matrix), X / max(||X||_F, eps) per matrix, then for each (a, b, c) of
    ``schedule``: M = X X^T, X <- a X + (b M + c M^2) X (torch's addmm order, batched); transposed back.
    ``gram=True``: the same polynomial in the Gram form (``gram_newton_schulz``, restarted before the steps in
    ``restarts``). ``sym``: how the products whose result is symmetric are computed (``symmetric_baddbmm``'s
    signature; None: torch's bmm/baddbmm, as here). Returns the [n, A, B] result in ``dtype``."""
    tall = x.shape[-2] > x.shape[-1]
    X = x.to(dtype)
    if tall:
        X = X.mT
    norms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = X / norms.clamp(min=eps)
    sym = sym or symmetric_baddbmm
    if gram:  # (a tall stack's result comes back in the [n, A, B] layout, contiguous: gram_newton_schulz's `tall`)
        return gram_newton_schulz(X, schedule, restarts, sym, tall=tall)
    for a, b, c in schedule:
        M = sym(None, X)
        N = sym(M, M, M, beta=b, alpha=c)
        X = torch.baddbmm(X, N, X, beta=a)
    return X.mT if tall else X


def symmetric_baddbmm(c0, a, b=None, beta=1.0, alpha=1.0):
    """beta * c0 + alpha * (a @ b) (c0 None: a @ b) for a symmetric product: ``b`` None means a^T (the Gram
    matrix a a^T of an [n, m, k] stack), else ``b`` is a symmetric [n, m, m] stack that commutes with ``a``. These
    are the products of the Newton-Schulz steps that a symmetric kernel may compute by halves
    (momentum_fused/_backend_cpu.py, ``symmetric_product``). Here torch's bmm / baddbmm, the definition."""
    b = a.mT if b is None else b
    return torch.bmm(a, b) if c0 is None else torch.baddbmm(c0, a, b, beta=beta, alpha=alpha)


def gram_newton_schulz(X, schedule, restarts=(), sym=symmetric_baddbmm, tall=False):
    """The Newton-Schulz steps of ``newton_schulz`` on the normalized wide [n, m, k] stack ``X`` (m <= k), run on
    m x m matrices: with R = X X^T, a step X <- P X, P = a I + N, N = b R + c R^2, is Q <- P Q (Q: the product of
    the P's so far; Q = P for the first) and R <- P R P (= P^2 R: the P's are polynomials in R, so they commute);
    X = Q X once at the end. After the first step P is not formed: P Y = a Y + N Y is one baddbmm, rounded once.
    Before each step in ``restarts`` (a restart) X = Q X and R = X X^T are formed afresh, which drops the
    rounding error that Q and R accumulate, and that half precision cannot afford (docs/muon.md, "Gram form").
    Per step ~8 m^3 flops instead of ~4 m^2 k + 2 m^3, plus 4 m^2 k once and 4 m^2 k per restart. Every m x m
    product is symmetric (``sym``: R, N, Q, RP are polynomials in R). ``tall``: X is the transposed view of a
    tall stack; the result is then returned transposed back, as (Q X)^T = X^T Q^T computed by that one product,
    so that it is contiguous in the tall layout (no transposing copy of the result after the phase)."""
    R = sym(None, X)
    Q = None
    last = len(schedule) - 1
    for i, (a, b, c) in enumerate(schedule):
        if i in restarts and Q is not None:
            X, Q = torch.bmm(Q, X), None
            R = sym(None, X)
        N = sym(R, R, R, beta=b, alpha=c)
        if Q is None:
            Q = N.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = sym(Q, N, Q, beta=a)
        if i < last and (i + 1) not in restarts:
            RP = sym(R, R, N, beta=a)
            R = sym(RP, N, RP, beta=a)
    if Q is None:
        return X.mT if tall else X
    return torch.bmm(X.mT, Q.mT) if tall else torch.bmm(Q, X)


RULES["muon_momentum"] = muon_momentum_ref
RULES["muon_apply"] = muon_apply_ref
