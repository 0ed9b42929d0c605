"""The per-step oracle of the compressed-state layouts (master16, int8_state, master16_int8, and int8_sr /
master16_int8_sr, whose codes are encoded with each tensor's key) for the compiled backends' tests
(tests/triton/test_compressed_triton.py, tests/test_cuda_backend.py).

``oracle_apply(real_apply, checked)`` wraps a backend's ``apply``: each master16 / int8_state bucket is first
replayed on copies by the same backend in the layout without compression (``master`` for master16, with the
decoded master as the fp32 master copy; native fp32 for int8_state, with the decoded states; ``master`` with both
for master16_int8), the results are
encoded with layouts.master16_encode / layouts.int8_encode (the spec), then the real kernel runs and its params,
remainders, codes, scales and fp32 states must be equal to those bit for bit (NaNs as NaNs). So the kernels'
decode, encode and plumbing are checked exactly, whatever the rule's fp32 math rounds like.
"""
import torch

import momentum_fused as mf
from momentum_fused import layouts

def case_kwargs(kw0, lp):
    """A backend_cases row's (kwargs, gradient scale): its kwargs with its ``lp`` overrides but ``gscale``."""
    return {**kw0, **{k: v for k, v in lp.items() if k != "gscale"}}, lp.get("gscale", 1.0)


def case_grad(shape, gen, scale, sign, dtype=torch.float32):
    """A gradient of N(0, 1) values times ``scale`` (``sign``: magnitudes kept away from 0, for the sign rules)."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return (g.sign() * (0.5 + g.abs()) if sign else g).to(dtype)


def step_pair(opt, ref, ps, rs, gen, scale, sign, steps, requantize):
    """``steps`` steps of ``opt`` (a quantized layout) and ``ref`` (fp32 state) on the same gradients
    (``case_grad``); after step ``t``, ``requantize(t)`` puts the reference's quantized states through the layout's
    encode and decode (the definition the kernels are checked against). Returns the last ``requantize``'s value."""
    out = None
    for t in range(steps):
        for p, r in zip(ps, rs):
            p.grad = case_grad(p.shape, gen, scale, sign)
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
        out = requantize(t)
    return out


def master_of(opt, p):
    """The fp32 master of ``p``: the copy (layout master), decoded from the param and its remainder (master16,
    master16_int8), or the param itself (fp32 params)."""
    st = opt.state[p]
    if layouts.MASTER_KEY in st:
        return st[layouts.MASTER_KEY]
    if layouts.REMAINDER_KEY in st:
        return layouts.master16_decode(p.detach(), st[layouts.REMAINDER_KEY]).view(p.shape)
    return p.detach()


# (id, optimizer, kwargs, gradient mode); every rule with each state-count change
CASES = [
    ("adam", mf.Adam, dict(lr=0.02, weight_decay=0.01), "randn"),
    ("adamw", mf.AdamW, dict(lr=0.02, weight_decay=0.1), "randn"),
    ("adamw-amsgrad", mf.AdamW, dict(lr=0.02, weight_decay=0.1, amsgrad=True), "randn"),
    ("adam-tied", mf.AdamTied, dict(lr=0.02, beta=0.9), "randn"),
    ("nadam", mf.NAdam, dict(lr=0.02, weight_decay=0.01), "randn"),
    ("nadam-decoupled", mf.NAdam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True), "randn"),
    ("rmsprop", mf.RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=0.01), "bounded"),
    ("rmsprop-momentum", mf.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9), "bounded"),
    # (master16 only: the 8-bit layouts refuse centered, backend_cases.takes_int8)
    ("rmsprop-momentum-centered", mf.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True), "bounded"),
    ("sgd-momentum", mf.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), "randn"),
    ("sgd-nesterov", mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "randn"),
    ("qhm", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01), "randn"),
    ("signsgd", mf.SignSGD, dict(lr=0.02, weight_decay=0.1), "sign_safe"),
    ("signum", mf.Signum, dict(lr=0.02, momentum=0.9, weight_decay=0.1), "sign_safe"),
    ("lion", mf.Lion, dict(lr=0.02, weight_decay=0.1), "sign_safe"),
    ("fsgdm", mf.FSGDM, dict(lr=0.05, weight_decay=5e-3, sigma=12, n_stages=3), "randn"),
]
SF_CASES = [  # master16 only (int8_state refuses schedule-free: z is an iterate, not a moment)
    ("sgd_sf", mf.SGDScheduleFree, dict(lr=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=3), "randn"),
    ("adamw_sf", mf.AdamWScheduleFree, dict(lr=0.02, weight_decay=0.01, warmup_steps=2), "randn"),
]


def _bits(x):
    return x.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])


def _equal(a, b, what):
    """Bit for bit; NaNs only as NaNs (their payload is not specified)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = _bits(a) != _bits(b)
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(b))
    assert not diff.any(), f"{what}: {diff.sum().item()} elements differ"


def oracle_apply(real_apply, checked, count_launches=None):
    """``real_apply`` wrapped as described above; appends the bucket's element count to ``checked`` per checked
    call. ``count_launches``: a counter whose increase over the real call must be 1 (one launch per bucket)."""
    def apply(spec, flags, params, grads, states, scalars, *, layout=layouts.NATIVE, **kw):
        if not (layout.int8 or layout.remainder):
            return real_apply(spec, flags, params, grads, states, scalars, layout=layout, **kw)
        ps = [p.detach().clone() for p in params]
        r = 1 if layout.remainder else 0  # master16, master16_int8: the remainder after the states (or codes)
        split, sts = [], []  # split: (quantized, number of states) per tensor
        for p, st in zip(params, states):
            q = layout.int8 and layouts.int8_quantized(p)
            n = (len(st) - r) // 2 if q else len(st) - r
            split.append((q, n))
            if q:  # codes..., [remainder], scales...
                s32 = tuple(layouts.int8_decode(c, s, c.dtype == torch.int8) for c, s in zip(st[:n], st[n + r:]))
            else:
                s32 = tuple(s.clone() for s in st[:n])
            if r:
                s32 += (layouts.master16_decode(p, st[n]).view(p.shape),)
            sts.append(s32)
        keys = kw.get("sr_keys") if layout.stochastic else None  # int8_sr, master16_int8_sr: the codes' keys
        real_apply(spec, flags, ps, grads, sts, scalars, layout=layouts.LAYOUTS["master"] if r else layouts.NATIVE,
                   **{k: v for k, v in kw.items() if k != "sr_keys"})
        before = count_launches() if count_launches else 0
        out = real_apply(spec, flags, params, grads, states, scalars, layout=layout, **kw)
        if count_launches:
            assert count_launches() - before == 1, "one launch per bucket"
        for i, (p, st, q, qs, (quant, n)) in enumerate(zip(params, states, ps, sts, split)):
            if r:
                hi, lo = layouts.master16_encode(qs[-1])
                _equal(p, hi.view(p.shape), f"param {i}")
                _equal(st[n], lo.view(p.shape), f"remainder {i}")
            else:
                _equal(p, q, f"param {i}")
            if quant:
                for j, (c, s, x) in enumerate(zip(st[:n], st[n + r:], qs)):
                    codes, scale = layouts.int8_encode(x, c.dtype == torch.int8,
                                                       None if keys is None else keys[i], 1 + j)
                    _equal(c, codes, f"codes of state {j}, tensor {i}")
                    _equal(s, scale, f"scales of state {j}, tensor {i}")
            else:
                for j, (a, b) in enumerate(zip(st[:n], qs)):
                    _equal(a, b, f"fp32 state {j} of tensor {i}")
        checked.append(sum(p.numel() for p in params))
        return out
    return apply


def encoder_probe_blocks(y, signed, gen):
    """Blocks of 256 for the int8 encoders' tests ([blocks, 256] fp32): the integer-space values ``y`` (in the
    map's range) 255 to a block after the value K (the block's scale is then K, so y' = x itself), 16 blocks of
    random values over 60 decades, 4 of tiny scales (below 2^-64: the u = 2^64 form), a zero block, and blocks
    with a NaN and an inf (unsigned: magnitudes)."""
    from momentum_fused import layouts
    big_k = layouts.INT8_K_SIGNED if signed else layouts.INT8_K_UNSIGNED
    blocks = y[: y.numel() // 255 * 255].view(-1, 255)
    x = torch.cat([torch.full((blocks.shape[0], 1), big_k), blocks], 1)  # scale K: y' = x itself
    rnd = torch.randn(16, 256, generator=gen) * 10.0 ** torch.randint(-30, 30, (16, 1), generator=gen).float()
    tiny = torch.randn(4, 256, generator=gen) * torch.tensor([1e-20, 1e-25, 1e-30, 1e-37])[:, None]
    special = torch.zeros(3, 256)
    special[1, 7] = float("nan")
    special[2, 9] = float("inf")
    special[1:, 100:] = torch.randn(2, 156, generator=gen)
    return torch.cat([x, rnd if signed else rnd.abs(), tiny if signed else tiny.abs(), special]).contiguous()
