"""Shared helpers of the Triton tests: optimizer runs against the float64 reference."""
from __future__ import annotations

import torch

from tolerances import tol
from momentum_fused.triton_kernels import launcher

ODD_SHAPES = [(), (0,), (1,), (4097,), (3, 5, 7), (2, 0, 3)]


def make_params(shapes, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]


def grads_for(shapes, step, seed=1, mode="randn", signs=None):
    """Float64 gradients for one step.
    mode "randn": standard normal.
    mode "bounded": |g| in [0.5, 1.5], random signs (RMSprop: keeps g / sqrt(v) well conditioned).
    mode "sign_safe": |g| in [0.5, 1.5] and every element keeps a fixed sign across steps, so momentum
    buffers never come near 0 and sign rules (signSGD, Signum, Lion) have no near-ties."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, s in enumerate(shapes):
        if mode == "randn":
            out.append(torch.randn(s, generator=gen, dtype=torch.float64))
            continue
        mag = 0.5 + torch.rand(s, generator=gen, dtype=torch.float64)
        if mode == "sign_safe":
            out.append(signs[i] * mag)
        else:
            out.append(torch.where(torch.rand(s, generator=gen, dtype=torch.float64) < 0.5, -mag, mag))
    return out


def fixed_signs(shapes, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.where(torch.rand(s, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0) for s in shapes]


def round_to_storage(opt, params, dtype):
    """Round float64 reference params and elementwise state to ``dtype`` (emulates the storage)."""
    for p in params:
        p.data.copy_(p.data.to(dtype).double())
        for key, t in opt.state[p].items():
            if key not in ("step", "mu_product"):
                t.copy_(t.to(dtype).double())


def run_pair(cls, groups_kw, shapes_per_group, dtype, steps=10, device="cpu", grads="randn", seed=0,
             per_step=None, check_launches=1):
    """Run ``cls`` with backend="triton" in ``dtype`` and backend="reference" in float64 from the same
    (dtype-rounded) start with the same (dtype-rounded) gradients. Returns (triton opt, ref opt,
    triton params, ref params). Asserts ``check_launches`` kernel launches per step.

    fp32 runs are compared with the pure float64 trajectory. For fp16/bf16 storage the float64
    reference rounds its params and state to the storage dtype after every step (the float64 math
    of the spec, stored like the kernel stores): comparing a 10-step bf16 trajectory with an unrounded
    one measures the input's conditioning (elements that pass through large values and come back
    near 0) more than the kernel."""
    sign_safe = grads == "sign_safe"
    all_shapes = [s for shapes in shapes_per_group for s in shapes]
    init = [x.to(dtype) for x in make_params(all_shapes, seed)]
    tp = [x.clone().to(device).requires_grad_() for x in init]
    rp = [x.double().requires_grad_() for x in init]

    def groups(params):
        out, i = [], 0
        for kw, shapes in zip(groups_kw, shapes_per_group):
            out.append(dict(params=params[i:i + len(shapes)], **kw))
            i += len(shapes)
        return out

    topt = cls(groups(tp), backend="triton")
    ropt = cls(groups(rp), backend="reference")
    signs = fixed_signs(all_shapes, seed + 2) if sign_safe else None
    for k in range(steps):
        gs = grads_for(all_shapes, k, seed + 1, grads, signs)
        for a, b, g in zip(tp, rp, gs):
            gl = g.to(dtype)
            a.grad = gl.to(device)
            b.grad = gl.double()
        before = launcher.LAUNCHES
        topt.step()
        ropt.step()
        if dtype in (torch.float16, torch.bfloat16):
            round_to_storage(ropt, rp, dtype)
        if check_launches is not None:
            assert launcher.LAUNCHES - before == check_launches, "launches per step"
        if per_step is not None:
            per_step(k, topt, ropt, tp, rp)
    return topt, ropt, tp, rp


def assert_parity(topt, ropt, tp, rp, dtype):
    t = tol(dtype)
    for i, (a, b) in enumerate(zip(tp, rp)):
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), **t, msg=lambda m: f"param {i}: {m}")
        sa, sb = topt.state[a], ropt.state[b]
        assert set(sa) == set(sb)
        for key in sb:
            if key in ("step", "mu_product"):
                torch.testing.assert_close(sa[key].double(), sb[key].double(), rtol=0, atol=0)
                continue
            assert sa[key].dtype == dtype
            torch.testing.assert_close(sa[key].cpu().double(), sb[key], **t,
                                       msg=lambda m: f"param {i} state {key}: {m}")
