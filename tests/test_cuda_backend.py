"""The compiled CUDA backend (csrc/cuda, momentum_fused/_backend_cuda.py) on a CUDA device.

The same case table as the CPU backend (tests/backend_cases.py): every rule x flags x dtype against the
float64 reference, >= 10 steps, params and every state tensor, odd shapes, two groups in one bucket;
plus 300 tensors, found_inf / grad_scale read on the device, a tensor lr, non-contiguous tensors, and
bit-equality with the CPU backend (both compile csrc/update_rules.h without FMA contraction and with
IEEE division and square root, so fp32 results must agree to the bit).
All marked gpu: skipped with a reason where no CUDA device is visible. Run on a GPU machine with
``MOMENTUM_FUSED_BUILD_CUDA=1 pip install -e . --no-build-isolation && pytest -m gpu tests/test_cuda_backend.py``.
"""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf
from momentum_fused import backends

from backend_cases import STEPS, _M, _case_params, _compare, _params, _run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    st = backends.status().get("cuda", "unavailable: momentum_fused._backend_cuda is not registered")
    if st != "available":
        pytest.fail(f"a CUDA device is visible but the cuda backend is not usable: {st}")


@pytest.mark.parametrize("cls,kw0,kw1,dtype,sign,lp", _case_params())
def test_parity_vs_float64_reference(cls, kw0, kw1, dtype, sign, lp):
    opt, ref, ps, rs = _run(cls, kw0, kw1, dtype, sign=sign, lp=lp, backend="cuda", device="cuda")
    _compare(opt, ref, ps, rs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_300_tensors_and_one_beyond_a_table(dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 3000, (300,), generator=gen)]
    shapes[7], shapes[100] = (), (3 * 65536 + 5,)  # a 0-d tensor, a tensor spanning 4 chunks
    for cls, kw, lp in ((mf.AdamW, dict(lr=1e-2, weight_decay=0.1), None),
                        (mf.SGD, dict(lr=0.05, momentum=0.9), _M)):
        opt, ref, ps, rs = _run(cls, kw, dict(lr=2e-2), dtype, shapes=shapes, lp=lp, backend="cuda", device="cuda")
        _compare(opt, ref, ps, rs, dtype)


@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2)), (mf.SGD, dict(lr=0.1, momentum=0.9)),
                                    (mf.Lion, dict(lr=1e-2))])
def test_found_inf_on_the_device_skips_every_write(cls, kw):
    """The backend op itself, with found_inf = 1 on the device: nothing is written."""
    ps = [torch.randn(s, device="cuda") for s in ((17,), (4097,), (200_000,))]
    opt = cls([p.requires_grad_() for p in ps], backend="cuda", **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]
    spec = opt.spec
    group = opt.param_groups[0]
    names = spec.state_names(group)
    sc = [spec.make_scalars(group, {"step": torch.tensor(1.0)}, False) for _ in ps]
    be = backends.resolve("cuda", spec, ps[0].device, ps[0].dtype)
    be.apply(spec, spec.make_flags(group), [p.detach() for p in ps], [torch.full_like(p, float("inf")) for p in ps],
             [tuple(opt.state[p][k] for k in names) for p in ps], sc,
             found_inf=torch.ones(1, device="cuda"), grad_scale=torch.full((1,), 2.0, device="cuda"))
    after = [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_grad_scale_on_the_device():
    """grad_scale = 1024 read by the kernel equals the unscaled run bit for bit (a power of two)."""
    ps = [torch.randn(s, device="cuda") for s in ((15,), (4097,))]
    qs = [p.clone() for p in ps]
    a = mf.Adam([p.requires_grad_() for p in ps], lr=1e-2, backend="cuda")
    b = mf.Adam([q.requires_grad_() for q in qs], lr=1e-2, backend="cuda")
    be = backends.resolve("cuda", a.spec, ps[0].device, ps[0].dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(STEPS):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad, q.grad = g * 1024, g
        b.step()
        # the same step through the op with a device grad_scale
        group = a.param_groups[0]
        states, fresh = a._init_state(ps, a.spec.state_names(group))
        sc = a._group_scalars(0, group, states, fresh, 1.0)
        be.apply(a.spec, a.spec.make_flags(group), [p.detach() for p in ps], [p.grad for p in ps],
                 [tuple(st[k] for k in a.spec.state_names(group)) for st in states], sc,
                 grad_scale=torch.full((1,), 1024.0, device="cuda"))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_gradscaler_skips_an_inf_step():
    ps = [torch.randn(64, 33, device="cuda", requires_grad=True)]
    opt = mf.AdamW(ps, lr=1e-2, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    scaler.scale(ps[0].square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = [ps[0].detach().clone()] + [v.clone() for v in opt.state[ps[0]].values()]
    opt.zero_grad()
    scaler.scale(ps[0].sum() * float("inf")).backward()
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    after = [ps[0].detach().clone()] + [v.clone() for v in opt.state[ps[0]].values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert scaler.get_scale() == scale / 2


def test_tensor_lr():
    opt, ref, ps, rs = _run(mf.AdamW, dict(lr=torch.tensor(1e-2), weight_decay=0.1), dict(lr=torch.tensor(5e-3)),
                            torch.float32, backend="cuda", device="cuda")
    _compare(opt, ref, ps, rs, torch.float32)


def test_non_contiguous_params_are_copied_in_and_out():
    p = torch.randn(9, 7, device="cuda").t().requires_grad_()
    r = p.detach().cpu().double().clone().requires_grad_()
    opt, ref = mf.AdamW([p], lr=1e-2, backend="cuda"), mf.AdamW([r], lr=1e-2, backend="reference")
    for _ in range(STEPS):
        g = torch.randn(9, 7, device="cuda").t()  # the param's shape (7, 9), transposed strides
        p.grad, r.grad = g, g.cpu().double()
        opt.step()
        ref.step()
    _compare(opt, ref, [p], [r], torch.float32)


@pytest.mark.parametrize("cls,kw", [(mf.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                    (mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
                                    (mf.NAdam, dict(lr=1e-2)), (mf.Lion, dict(lr=1e-2)),
                                    (mf.AdamWScheduleFree, dict(lr=1e-2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_equal_the_cpu_backend(cls, kw, dtype):
    if backends.status().get("cpu") != "available":
        pytest.skip("the cpu backend is not built here, nothing to compare with")
    shapes = [(100_003,), (17,), (4097,), ()]
    ps, _, gen = _params(shapes, dtype, 11)
    qs = [p.detach().to("cuda").requires_grad_() for p in ps]
    a, b = cls(ps, backend="cpu", **kw), cls(qs, backend="cuda", **kw)
    for _ in range(STEPS):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            p.grad, q.grad = g, g.to("cuda")
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach().cpu()), f"{cls.__name__} {dtype}: params differ from the cpu backend"
        for k, v in a.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert torch.equal(v, b.state[q][k].cpu()), f"{cls.__name__} {dtype}: state {k} differs"


def test_default_backend_for_cuda_tensors_is_cuda():
    p = torch.zeros(3, device="cuda", requires_grad=True)
    opt = mf.SGD([p], lr=0.1)
    p.grad = torch.ones_like(p)
    (_, _, _, chosen), = opt._plan()
    assert [b.name for b in chosen.values()] == ["cuda"]
