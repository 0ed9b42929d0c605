"""The int8 layouts with DTensor (FSDP2) params, in one process (a one-rank gloo mesh; the two-rank run is
tests/test_distributed.py::test_int8_state_under_fsdp_equals_single_process).

Blocks never straddle a shard: a DTensor param is quantized when its rows hold whole blocks and it is sharded on
dim 0 only (layouts.int8_quantized), its scales are a DTensor of shape (rows, blocks per row) placed like it, and the
decision is the global tensor's. Its blocks are then those of the same plain tensor, so the steps are bit for bit
those of the plain param.
"""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf
from momentum_fused import layouts

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend (this torch build has none)", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(one_rank_mesh):
    return one_rank_mesh


def _run(values, grads, layout, make):
    ps = [torch.nn.Parameter(make(v.clone())) for v in values]
    opt = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, layout=layout, backend="reference")
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = make(g.clone().to(p.dtype))
        opt.step()
    return opt, ps


@pytest.mark.parametrize("layout", ["int8_state", "master16_int8", "int8_sr", "master16_int8_sr"])
def test_a_dtensor_param_steps_as_the_plain_one(mesh, layout):
    """(The stochastic layouts: one rank holds the shard at the origin, whose rounding key is the plain param's.)"""
    from torch.distributed.tensor import Shard, distribute_tensor
    dt = torch.float32 if layout in ("int8_state", "int8_sr") else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    shapes = [(17, 256), (9, 2, 256), (4096,), (40, 128)]  # rows of whole blocks: the first two only
    values = [torch.randn(s, generator=gen).to(dt) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    shard = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    opt, ps = _run(values, grads, layout, shard)
    ref, rs = _run(values, grads, layout, lambda t: t)
    # the last steps took the cached plan, on the local shards (codes, scales and fp32 state alike)
    assert opt._fast is not None and opt._fast["groups"][0]["dtensor"] is not None
    assert opt._fast_plan() is not None
    # a param that keeps fp32 state steps as under the layout without codes
    fb, fs = _run(values, grads, {"int8_state": "native", "master16_int8": "master16", "int8_sr": "native",
                              "master16_int8_sr": "master16"}[layout], lambda t: t)
    for i, (p, r, f) in enumerate(zip(ps, rs, fs)):
        q = layouts.int8_quantized(p)
        assert q == (i < 2), (i, q)  # a plain (4096,) or (40, 128) is quantized; sharded, its rows are not blocks
        r, rst = (r, ref.state[r]) if q else (f, fb.state[f])
        assert torch.equal(p.full_tensor(), r.detach()), i
        st = opt.state[p]
        assert set(st) == set(rst), i
        for k, v in st.items():
            assert type(v) is not torch.Tensor or k == "step", (i, k)  # DTensors, as the param
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            if k.endswith("_scale"):
                assert tuple(v.shape) == (shapes[i][0], p.numel() // shapes[i][0] // 256)
                assert tuple(v.placements) == tuple(p.placements)
            assert full.shape == rst[k].shape and torch.equal(full, rst[k]), (i, k)  # (scales: one shape, DCP)


def test_scales_placed_otherwise_are_refused_before_any_change(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    p = torch.nn.Parameter(distribute_tensor(torch.ones(17, 256), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(17, 256), mesh, [Shard(0)])
    opt = mf.AdamW([p], lr=0.1, layout="int8_state", backend="reference")
    opt.step()
    st = opt.state[p]
    st["exp_avg_scale"] = distribute_tensor(st["exp_avg_scale"].full_tensor(), mesh, [Replicate()])
    before = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in st.items()}
    w = p.full_tensor().clone()
    with pytest.raises(ValueError, match="exp_avg_scale.*DTensor placed as the param"):
        opt.step()
    assert torch.equal(p.full_tensor(), w)
    for k, v in st.items():
        assert torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, before[k]), k
    st["exp_avg_scale"] = st["exp_avg_scale"].full_tensor()  # a plain tensor for a DTensor param
    with pytest.raises(ValueError, match="exp_avg_scale.*DTensor placed as the param"):
        opt.step()


def _fsdp_pair(mesh, seed):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    plain = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Tanh(),  # rows of whole blocks:
                                torch.nn.Linear(256, 16, bias=False))                   # quantized both ways
    import copy
    sharded = copy.deepcopy(plain)
    fully_shard(sharded[0], mesh=mesh)
    fully_shard(sharded[2], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return plain, sharded


def _train(model, opt, steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 256, generator=gen)
        opt.zero_grad()
        ((model(x) - x[:, :16]) ** 2).mean().backward()
        opt.step()


def test_int8_checkpoints_move_between_fsdp2_and_one_process(mesh):
    """The full optimizer state dict of an FSDP2 int8_state run loads into an unsharded optimizer, and the other
    way: the scales are (rows, blocks per row) there and (blocks,) here, the same blocks in order, so they are
    reshaped; the continued steps equal the uninterrupted run bit for bit. The step refused the scales' shape
    before 2026-12-05. A full state dict with codes into a live optimizer without them fails inside torch."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    make = lambda m, layout="int8_state": mf.AdamW(m.parameters(), lr=1e-2, layout=layout)  # noqa: E731
    ref, _ = _fsdp_pair(mesh, 0)
    ref_opt = make(ref)
    _train(ref, ref_opt, 5)
    for src_sharded in (True, False):
        plain, sharded = _fsdp_pair(mesh, 0)
        src, dst = (sharded, plain) if src_sharded else (plain, sharded)
        src_opt = make(src)
        _train(src, src_opt, 2)
        dst_opt = make(dst)
        set_model_state_dict(dst, get_model_state_dict(src, options=opts), options=opts)
        set_optimizer_state_dict(dst, dst_opt, get_optimizer_state_dict(src, src_opt, options=opts), options=opts)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):  # the batches the source saw, then three more: the reference's five
            torch.randn(8, 256, generator=gen)
        for _ in range(3):
            x = torch.randn(8, 256, generator=gen)
            dst_opt.zero_grad()
            ((dst(x) - x[:, :16]) ** 2).mean().backward()
            dst_opt.step()
        for a, b in zip(ref.parameters(), dst.parameters()):
            assert torch.equal(a.detach(), b.full_tensor() if hasattr(b, "full_tensor") else b.detach())
    plain, sharded = _fsdp_pair(mesh, 0)
    src_opt = make(plain)
    _train(plain, src_opt, 2)
    dst_opt = make(sharded, "native")
    # (fails inside torch's set_optimizer_state_dict: its codes, {name: {"codes": t}}, do not match the live fp32
    # tensor's structure (IndexError in its unflatten, before our load runs); switch layouts with load_state_dict
    # between two optimizers instead: test_a_checkpoint_converts_between_codes_and_values_on_dtensors_...)
    with pytest.raises(IndexError):  # (torch's, not ours: our load never ran)
        set_optimizer_state_dict(sharded, dst_opt, get_optimizer_state_dict(plain, src_opt, options=opts),
                                 options=opts)
    # (torch's set_optimizer_state_dict first creates zero state by a step with lr 0): nothing of the source's
    assert all(float(st["exp_avg"].full_tensor().abs().max()) == 0.0 for st in dst_opt.state.values())


# ---------------------------------------------------------------- master16 on DTensors (a review, 2026-12-06)
def test_schedule_free_master16_eval_and_train_of_dtensor_params_equal_the_plain_ones(mesh):
    """eval()/train() move the master16 master through layouts.master16_decode/encode: on DTensors torch 2.13's
    ``<<``/``>>`` return their input unchanged, which wrote NaNs and ~3e38 into FSDP2-sharded params before
    2026-12-06 (distributed.shardwise runs the codecs on the local shards)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in ((16, 8), (7,))]
    grads = [[torch.randn(v.shape, generator=gen).to(torch.bfloat16) for v in values] for _ in range(3)]
    runs = []
    for make in (lambda t: distribute_tensor(t, mesh, [Shard(0)]), lambda t: t):
        ps = [torch.nn.Parameter(make(v.clone())) for v in values]
        opt = mf.AdamWScheduleFree(ps, lr=1e-2, warmup_steps=2, layout="master16", backend="reference")
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = make(g.clone())
            opt.step()
        snaps = []
        for mode in ("eval", "train"):
            getattr(opt, mode)()
            snaps += [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in ps]
        runs.append(snaps)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not any(bool(t.isnan().any()) for t in runs[0])


@pytest.mark.parametrize("src,dst", [("master16", "master"), ("master", "master16")])
def test_a_master_conversion_of_dtensor_params_equals_the_plain_ones(mesh, src, dst):
    """A checkpoint's full tensors (plain) loaded into a DTensor param's other master layout: cut to the local
    shard (distributed.placed_like) before the codecs; a live key of the destination layout beside them (as
    torch.distributed.checkpoint leaves it) does not stop the conversion (the saved layout decides)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(16, 8, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(16, 8, generator=gen).to(torch.bfloat16) for _ in range(3)]
    p = torch.nn.Parameter(v.clone())
    a = mf.AdamW([p], lr=1e-2, layout=src, backend="reference")
    for g in grads:
        p.grad = g
        a.step()
    sd = a.state_dict()
    results = []
    for make in (lambda t: distribute_tensor(t, mesh, [Shard(0)]), lambda t: t):
        q = torch.nn.Parameter(make(p.detach().clone()))
        b = mf.AdamW([q], lr=1e-2, layout=dst, backend="reference")
        q.grad = make(grads[0].clone())
        b.step()  # (live state of the destination layout, as a DCP load starts from)
        with torch.no_grad():
            q.copy_(make(p.detach().clone()))
        sd2 = {"state": {0: {**{k: b.state[q][k] for k in b.state[q]}, **sd["state"][0]}},
               "param_groups": sd["param_groups"]}
        b.load_state_dict(sd2)
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        results.append([full(q).detach().clone()] + [full(b.state[q][k]).clone() for k in sorted(b.state[q])
                                                     if k != "step"])
    assert all(torch.equal(x, y) for x, y in zip(*results))
    # (b, q: the plain run) the converted master is the checkpoint's, not the live one (the conversion ran)
    master = layouts.master16_decode(p.detach(), a.state[p]["master_lo"]).view(p.shape) if src == "master16" else \
        a.state[p]["master"]
    got = b.state[q]["master"] if dst == "master" else layouts.master16_decode(q.detach(), b.state[q]["master_lo"])
    assert torch.equal(got.view(master.shape), master)


@pytest.mark.parametrize("write", ["copy_", "load_state_dict"])
def test_a_master_layout_dtensor_param_written_between_steps_is_stepped_from_the_write(mesh, write):
    """FSDP2: a DTensor's in-place ops bump the DTensor's version counter, not its local shard's, which the check of
    params written between steps read: a checkpoint loaded into the live sharded model was undone by the next step
    (a review). The versions now come from the DTensors."""
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.manual_seed(0)
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4).to(torch.bfloat16), mesh, [Shard(0)]))
    opt = mf.AdamW([p], lr=1e-3, layout="master", backend="reference")
    for _ in range(3):
        p.grad = distribute_tensor(torch.randn(8, 4).to(torch.bfloat16), mesh, [Shard(0)])
        opt.step()
    five = distribute_tensor(torch.full((8, 4), 5.0, dtype=torch.bfloat16), mesh, [Shard(0)])
    with torch.no_grad():
        if write == "copy_":
            p.copy_(five)
        else:
            mod = torch.nn.Module()
            mod.w = p
            mod.load_state_dict({"w": five})
    opt.param_groups[0]["lr"] = 0.0
    p.grad = distribute_tensor(torch.zeros(8, 4, dtype=torch.bfloat16), mesh, [Shard(0)])
    opt.step()
    assert torch.equal(p.full_tensor(), torch.full((8, 4), 5.0, dtype=torch.bfloat16))


# ------------------------------------------- layout conversions on DTensors (FSDP2 params), 2026-12-06
_OTHER = {"int8_state": "native", "native": "int8_state", "master16_int8": "master16", "master16": "master16_int8",
          "int8_sr": "native"}


@pytest.mark.parametrize("src,backend", [(s, b) for s in _OTHER for b in ("reference", "cpu")])
def test_a_checkpoint_converts_between_codes_and_values_on_dtensors_as_in_one_process(mesh, src, backend):
    """A state dict of one layout loaded into an optimizer of the other (codes <-> fp32 moments) on DTensor
    params converts shard by shard: the loaded state, and three more steps, equal the same conversion on plain
    params bit for bit. Refused before 2026-12-06 ("converting between them is not supported on sharded
    tensors"), so that switching layouts under FSDP2 went through one process."""
    from torch.distributed.tensor import Shard, distribute_tensor
    if backend == "cpu" and mf.backends.status().get("cpu") != "available":
        pytest.skip(f"cpu backend not built here: {mf.backends.status().get('cpu')}")
    dst = _OTHER[src]
    dt = torch.bfloat16 if "master16" in src else torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = [(17, 256), (9, 2, 256), (5, 7)]  # quantized sharded and plain; the last one in neither
    values = [torch.randn(s, generator=gen).to(dt) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]

    def run(make):
        ps = [torch.nn.Parameter(make(v.clone())) for v in values]
        a = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, layout=src, backend=backend)
        b = mf.AdamW(ps, lr=1e-2, weight_decay=0.1, layout=dst, backend=backend)
        for k, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = make(g.clone().to(p.dtype))
            if k == 2:
                b.load_state_dict(a.state_dict())
                loaded = [{n: v.clone() for n, v in b.state[p].items()} for p in ps]
            (a if k < 2 else b).step()
        return ps, b, loaded

    ps, opt, loaded = run(lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    rs, ref, ref_loaded = run(lambda t: t)
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
    for i, (p, r) in enumerate(zip(ps, rs)):
        assert set(loaded[i]) == set(ref_loaded[i]), i
        for k, v in loaded[i].items():
            assert type(v) is not torch.Tensor or k == "step", (i, k)  # DTensors, as the param
            if k.endswith("_scale"):
                assert tuple(v.placements) == tuple(p.placements)
            assert torch.equal(full(v), ref_loaded[i][k]) and full(v).dtype == ref_loaded[i][k].dtype, (i, k)
        assert torch.equal(p.full_tensor(), r.detach()), i
        for k, v in opt.state[p].items():
            assert torch.equal(full(v), ref.state[r][k]), (i, k)
    codes = [k for st in loaded for k, v in st.items() if v.dtype in (torch.int8, torch.uint8)]
    assert len(codes) == (4 if dst.endswith("int8") or dst == "int8_state" else 0)


def test_a_conversion_from_codes_placed_otherwise_is_refused_before_any_change(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    p = torch.nn.Parameter(distribute_tensor(torch.ones(17, 256), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(17, 256), mesh, [Shard(0)])
    src = mf.AdamW([p], lr=0.1, layout="int8_state", backend="reference")
    src.step()
    dst = mf.AdamW([p], lr=0.1, layout="native", backend="reference")
    dst.step()
    before = {k: v.full_tensor().clone() for k, v in dst.state[p].items() if k != "step"}
    sd = src.state_dict()
    st = sd["state"][0]
    st["exp_avg_scale"] = distribute_tensor(st["exp_avg_scale"].full_tensor(), mesh, [Replicate()])
    with pytest.raises(ValueError, match="'exp_avg'.*neither DTensors of its shape .* placed as the param"):
        dst.load_state_dict(sd)
    for k, v in before.items():
        assert torch.equal(dst.state[p][k].full_tensor(), v), k


def test_a_conversion_checks_the_states_the_checkpoints_flags_add_before_any_change(mesh):
    """The check before a conversion covered the live group's state names only; a checkpoint with AMSGrad loaded
    into an optimizer without it converts max_exp_avg_sq too, and its misplaced codes failed halfway (DTensor
    ops on a plain tensor) after exp_avg and the group had changed (a review, 2026-12-06)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    p = torch.nn.Parameter(distribute_tensor(torch.randn(17, 256), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(17, 256), mesh, [Shard(0)])
    src = mf.AdamW([p], lr=0.1, layout="int8_state", amsgrad=True, backend="reference")
    src.step()
    dst = mf.AdamW([p], lr=0.1, layout="native", backend="reference")
    dst.step()
    before = {k: v.full_tensor().clone() for k, v in dst.state[p].items() if k != "step"}
    sd = src.state_dict()
    codes = sd["state"][0]["max_exp_avg_sq"]
    codes["codes"] = codes["codes"].full_tensor()  # plain codes beside DTensor scales
    with pytest.raises(ValueError, match="'max_exp_avg_sq'.*nothing was loaded"):
        dst.load_state_dict(sd)
    assert set(dst.state[p]) == set(before) | {"step"} and dst.param_groups[0]["amsgrad"] is False
    for k, v in before.items():
        assert torch.equal(dst.state[p][k].full_tensor(), v), k


def test_a_conversion_from_dtensors_of_another_shape_is_refused(mesh):
    """Saved DTensors of another global shape with the same number of elements (another model's checkpoint): their
    shards are not the param's rows, so a shard-wise conversion would scramble (or, with uneven shards, fail
    halfway); refused before any change (as plain tensors of another shape are since 2026-12-07: the shape is
    checked with the size, as in one process)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    other = torch.nn.Parameter(distribute_tensor(torch.randn(9, 512), mesh, [Shard(0)]))
    other.grad = distribute_tensor(torch.randn(9, 512), mesh, [Shard(0)])
    src = mf.AdamW([other], lr=0.1, backend="reference")
    src.step()
    p = torch.nn.Parameter(distribute_tensor(torch.randn(18, 256), mesh, [Shard(0)]))
    dst = mf.AdamW([p], lr=0.1, layout="int8_state", backend="reference")
    with pytest.raises(ValueError, match="state 'exp_avg' has shape \\(9, 512\\).*Nothing was loaded"):
        dst.load_state_dict(src.state_dict())
    assert len(dst.state[p]) == 0
