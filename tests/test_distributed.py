"""Scale-out on the CPU: 2 gloo processes (tests/dist_worker.py) running FSDP2 (``fully_shard``:
params, grads and state are DTensors sharded on dim 0), DDP, ZeroRedundancyOptimizer and
torch.distributed.checkpoint, each compared with single-process training of the same model on the
whole batch (computed inside the workers, same threads and same library build).

The model's layers have 7, 5 and 1 output rows: FSDP2's shards are uneven and rank 1 holds an empty
shard of the last layer. float64 throughout (Triton: float32), so the only difference between the
distributed and the single-process run is the round-off of the averaged gradients (~1e-16); a wrong
shard, a missing all-reduce or a gathered update shows up as ~1e-3.

All scenarios run in one spawn per module fixture (the process start dominates); each test reads
its scenario's results, and a scenario that raised reports its traceback in its own test.
"""
from __future__ import annotations

import math

import pytest
import torch

import dist_worker as dw
import momentum_fused as mf

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("needs torch.distributed with the gloo backend (this torch build has none)", allow_module_level=True)

F64 = dict(rtol=1e-10, atol=1e-13)  # observed: <= 7e-17 absolute
F32 = dict(rtol=1e-5, atol=1e-6)
BACKENDS = ["reference", "cpu"]
_CPU_STATUS = mf.backends.status().get("cpu", "not registered")


def _backend_params():
    return [pytest.param(b, marks=pytest.mark.skipif(
        b == "cpu" and _CPU_STATUS != "available", reason=f"cpu backend not built here: {_CPU_STATUS}"))
        for b in BACKENDS]


def _available(backends):
    return [b for b in backends if b != "cpu" or _CPU_STATUS == "available"]


WRAPPERS = ["fsdp", "ddp"]
INT8_LAYOUTS = ["int8_state", "master16_int8"]
FULL_SD_LAYOUTS = ["master16", "master16_int8", "int8_state"]
TRAIN_OPTS = list(dw.OPTIMIZERS)
CKPT_OPTS = ["adamw", "sf_adamw"]
MUON_ALGORITHMS = ["standard", "gram"]


def _scenarios():
    out = [dict(id=f"train-{w}-{o}-{b}", kind="train", wrapper=w, opt_name=o, backend=b)
           for w in WRAPPERS for o in TRAIN_OPTS for b in _available(BACKENDS)]
    out += [dict(id=f"comm-{o}-{b}", kind="step_comm", wrapper="fsdp", opt_name=o, backend=b)
            for o in ("adamw", "sf_sgd_polyak") for b in _available(BACKENDS)]
    out += [dict(id=f"ckpt-{o}-{b}", kind="checkpoint", opt_name=o, backend=b)
            for o in CKPT_OPTS for b in _available(BACKENDS)]
    out += [dict(id=f"zero-adamw-{b}", kind="zero", opt_name="adamw", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"zero_polyak-{b}", kind="zero_polyak", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"zero_sf_eval-{b}", kind="zero_sf_eval", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"partition_refusals-{b}", kind="partition_refusals", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"zero_sf_edges-{b}", kind="zero_sf_edges", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"bad_grad-{b}", kind="bad_grad", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"lowrank_ddp-{b}", kind="lowrank_ddp", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"int8_fsdp-{lay}-{b}", kind="int8_fsdp", layout=lay, backend=b)
            for lay in INT8_LAYOUTS for b in _available(BACKENDS)]
    out += [dict(id=f"int8_ckpt-{lay}-{b}", kind="int8_ckpt", layout=lay, backend=b)
            for lay in INT8_LAYOUTS for b in _available(BACKENDS)]
    out += [dict(id=f"int8_reshard-{lay}-{b}", kind="int8_reshard", layout=lay, backend=b)
            for lay in INT8_LAYOUTS for b in _available(BACKENDS)]
    out += [dict(id=f"int8_convert-{lay}-{b}", kind="int8_convert", layout=lay, backend=b)
            for lay in INT8_LAYOUTS for b in _available(BACKENDS)]
    out += [dict(id=f"master16_full-{lay}-{b}", kind="master16_full", layout=lay, backend=b)
            for lay in FULL_SD_LAYOUTS for b in _available(BACKENDS)]
    out += [dict(id=f"sr_shards-{b}", kind="sr_shards", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"sr_shards_int8-{b}", kind="sr_shards", layout="int8_sr", backend=b)
            for b in _available(BACKENDS)]
    out += [dict(id=f"muon_bf16_fsdp-{a}-{b}", kind="muon_bf16_fsdp", ns_algorithm=a, backend=b)
            for a in MUON_ALGORITHMS for b in _available(BACKENDS)]
    out += [dict(id=f"muon_bad_split-{b}", kind="muon_bad_split", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"muon_chunks-{b}", kind="muon_chunks", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"muon_mixed_dtypes-{b}", kind="muon_mixed_dtypes", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"muon_empty-{b}", kind="muon_empty", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"muon_experts-{m}-{b}", kind="muon_experts", mixed=m != "experts", toggle=m == "toggled",
                 backend=b) for m in ("experts", "mixed", "toggled") for b in _available(BACKENDS)]
    out += [dict(id=f"zero_int8_resume-{b}", kind="zero_int8_resume", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"zero_tied_beta-{b}", kind="zero_tied_beta", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"gradient_snr-{lay}-{b}", kind="gradient_snr", layout=lay, backend=b)
            for lay in ("native", "int8_state") for b in _available(BACKENDS)]
    out += [dict(id=f"strided_reductions-{b}", kind="strided_reductions", backend=b) for b in _available(BACKENDS)]
    out += [dict(id=f"muon_hsdp-{d}-{b}", kind="muon_hsdp", shard_dim=d, backend=b)
            for d in (0, 1) for b in _available(BACKENDS)]
    out += [dict(id=f"sparse_fsdp-{o}-{b}", kind="sparse_fsdp", opt_name=o, backend=b)
            for o in ("adamw", "sgd_momentum") for b in _available(BACKENDS)]
    return out


@pytest.fixture(scope="module")
def world():
    return dw.run_scenarios(_scenarios())


def _results(world, sid):
    """(rank 0 result, rank 1 result); fails with the worker's traceback if the scenario raised."""
    out = []
    for r, res in enumerate(world):
        assert sid in res, f"scenario {sid} did not run on rank {r}"
        if "error" in res[sid]:
            pytest.fail(f"scenario {sid} raised:\n{res[sid]['error']}")
        out.append(res[sid])
    return out


def _assert_snapshots_equal(got, want, where):
    """Params and every state tensor of two snapshots (dist_worker._snapshot) bit for bit."""
    assert len(got["params"]) == len(want["params"]), where
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: param {i}"
    for i, (sa, sb) in enumerate(zip(got["state"], want["state"])):
        assert set(sa) == set(sb), (where, i)
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"{where}: param {i} {k!r}"


def _assert_snapshots_close(got, want, tol, what):
    assert len(got["params"]) == len(want["params"])
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{what}: param {i}: {m}")
    for i, (sa, sb) in enumerate(zip(got["state"], want["state"])):
        assert set(sa) == set(sb), f"{what}: param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            if k == "step":
                assert float(sa[k]) == float(sb[k]), f"{what}: param {i}: step {sa[k]} vs {sb[k]}"
            else:
                torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m, i=i, k=k: f"{what}: param {i} {k!r}: {m}")
    for gi, (ga, gb) in enumerate(zip(got["groups"], want["groups"])):
        # torch's Optimizer.__setstate__ (run by load_state_dict) adds defaults["differentiable"] = False,
        # which FusedOptimizer.load_state_dict then copies into the groups; not a hyperparameter of ours
        ga, gb = ({k: v for k, v in g.items() if k != "differentiable"} for g in (ga, gb))
        assert set(ga) == set(gb), f"{what}: group {gi}: keys {sorted(set(ga) ^ set(gb))} differ"
        for k in ga:
            a, b = ga[k], gb[k]
            if isinstance(a, float) and isinstance(b, float):
                assert math.isclose(a, b, rel_tol=tol["rtol"], abs_tol=tol["atol"]), f"{what}: group {gi} {k}: {a} vs {b}"
            else:
                assert a == b, f"{what}: group {gi} {k}: {a!r} vs {b!r}"


# ------------------------------------------------------------------ FSDP2 / DDP vs a single process
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("opt_name", TRAIN_OPTS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_equals_single_process(world, wrapper, opt_name, backend):
    r0, r1 = _results(world, f"train-{wrapper}-{opt_name}-{backend}")
    for rank, res in enumerate((r0, r1)):
        _assert_snapshots_close(res["dist"], res["ref"], F64, f"{wrapper} rank {rank}")
        if "eval_params" in res:  # schedule-free: eval() puts the averaged x into the (sharded) params
            for i, (a, b) in enumerate(zip(res["eval_params"], res["ref"]["eval_params"])):
                torch.testing.assert_close(a, b, **F64, msg=lambda m, i=i: f"eval() param {i}: {m}")
    # the step was not a no-op (the comparison above would pass trivially otherwise)
    assert any(not torch.equal(a, b) for a, b in zip(r0["dist"]["params"], _initial_params()))
    if wrapper == "fsdp":
        # every tensor state entry is a DTensor laid out like its param, created with the local shard's shape
        for res in (r0, r1):
            assert res["layouts"], "no state was created"
            for key, p_dt, s_dt, same_placements, s_local, p_local in res["layouts"]:
                assert p_dt and s_dt and same_placements, (key, p_dt, s_dt, same_placements)
                assert s_local == p_local, (key, s_local, p_local)
        # the shards are uneven and one is empty: the update ran on local shards of every size
        numels = [p.numel() for p in r0["dist"]["params"]]
        assert [a + b for a, b in zip(r0["local_numels"], r1["local_numels"])] == numels
        assert 0 in r1["local_numels"] and r0["local_numels"] != r1["local_numels"]
    else:
        for res in (r0, r1):
            assert all(not p_dt and not s_dt for _, p_dt, s_dt, *_ in res["layouts"])


def _initial_params():
    return [p.detach() for p in dw._make_model(torch.float64).parameters()]


@pytest.mark.parametrize("backend", _backend_params())
def test_fsdp_step_communicates_only_for_polyak(world, backend):
    """Elementwise rules update local shards with no collective at all (no gathering); the Polyak
    step issues exactly one all-reduce (its two inner products, stacked) per step."""
    for res in _results(world, f"comm-adamw-{backend}"):
        assert res["counts"] == [{}, {}]
    for res in _results(world, f"comm-sf_sgd_polyak-{backend}"):
        assert len(res["counts"]) == 2
        for c in res["counts"]:
            assert sum(c.values()) == 1 and any("allreduce" in k for k in c), c


# ------------------------------------------------------------------ distributed checkpoint
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("opt_name", CKPT_OPTS)
def test_distributed_checkpoint_resume_equals_uninterrupted(world, opt_name, backend):
    for rank, res in enumerate(_results(world, f"ckpt-{opt_name}-{backend}")):
        # same math on the same shards; the loaded local tensors may sit at other storage offsets, which
        # moves elements between torch's SIMD body and scalar tail (lerp: fma or not): a few ulps at most
        _assert_snapshots_close(res["resumed"], res["uninterrupted"], dict(rtol=1e-13, atol=1e-16), f"rank {rank}")
        assert res["saved_state_types"] == ["DTensor"], res["saved_state_types"]
        assert res["loaded_is_dtensor"]


# ------------------------------------------------------------------ ZeroRedundancyOptimizer
@pytest.mark.parametrize("backend", _backend_params())
def test_zero_redundancy_optimizer_equals_single_process(world, backend):
    r0, r1 = _results(world, f"zero-adamw-{backend}")
    for rank, res in enumerate((r0, r1)):
        assert res["local_type"] == "AdamW"
        for i, (a, b) in enumerate(zip(res["params"], res["ref"]["params"])):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, i=i: f"rank {rank} param {i}: {m}")
    # the params really were partitioned: each rank's AdamW owns a part, together all of them
    assert r0["local_params"] > 0 and r1["local_params"] > 0
    assert r0["local_params"] + r1["local_params"] == len(r0["params"])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", _backend_params())
def test_plain_grad_on_a_dtensor_param_raises_and_changes_nothing(world, backend):
    for res in _results(world, f"bad_grad-{backend}"):
        assert res["message"] is not None and "gradient is a plain tensor" in res["message"], res["message"]
        assert res["unchanged"]
        assert res["steps"] == [1.0] * len(res["steps"])


# ------------------------------------------------------------------ Triton (interpreter) for one rule
def _triton_reason():
    from momentum_fused import _backend_triton

    err = _backend_triton._load_error()
    return None if err is None else f"triton backend unavailable: {err}"


@pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason()))
def test_fsdp_triton_interpreter_adamw_equals_single_process():
    """AdamW on the Triton backend (TRITON_INTERPRET=1 set in the workers before triton is imported),
    float32 (the Triton kernels do not take float64)."""
    world = dw.run_scenarios([dict(id="t", kind="train", wrapper="fsdp", opt_name="adamw", backend="triton",
                                   dtype="float32")], env={"TRITON_INTERPRET": "1"})
    for rank, res in enumerate(_results(world, "t")):
        _assert_snapshots_close(res["dist"], res["ref"], F32, f"triton rank {rank}")
        assert all(p_dt and s_dt and same for _, p_dt, s_dt, same, *_ in res["layouts"])


def test_lowrank_layers_with_dtensor_factors_raise_before_any_change(tmp_path):
    """Sharded LowRankLinear factors are not supported (issue 8): a clear error, nothing changes. A
    one-process DeviceMesh on gloo is enough to make DTensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from momentum_fused import lowrank

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        layer = lowrank.LowRankLinear(8, 6, rank=2, max_rank=3, bias=False)
        opt = lowrank.LowRankSGD(layer.parameters(), lr=0.1, momentum=0.9)
        for p in (layer.U, layer.S, layer.V):  # FSDP2 would make params and grads DTensors: the grads do
            p.grad = distribute_tensor(torch.ones_like(p), mesh, [Shard(0)])
        before = [t.detach().clone() for t in (layer.U, layer.S, layer.V)]
        with pytest.raises(NotImplementedError, match="leave LowRankLinear layers unsharded"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, (layer.U, layer.S, layer.V)))
    finally:
        if own:
            dist.destroy_process_group()


@pytest.mark.parametrize("backend", _backend_params())
def test_lowrank_sgd_under_ddp_equals_single_process(world, backend):
    """DDP all-reduces the factor gradients; the low-rank step (augment, lift, update, truncate) then sees
    the single-process gradients: same rank, W = U S V^T and dense params to round-off."""
    for res in _results(world, f"lowrank_ddp-{backend}"):
        assert res["dist"]["r"] == res["ref"]["r"]
        torch.testing.assert_close(res["dist"]["W"], res["ref"]["W"], rtol=1e-9, atol=1e-11)
        for a, b in zip(res["dist"]["dense"], res["ref"]["dense"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ the int8 layouts under FSDP2
@pytest.mark.parametrize("layout,backend", [("int8_state", "reference"), ("master16_int8", "reference"),
                                            *[pytest.param(lay, "cpu", marks=pytest.mark.skipif(
                                                _CPU_STATUS != "available",
                                                reason=f"cpu backend not built here: {_CPU_STATUS}"))
                                              for lay in INT8_LAYOUTS]])
def test_int8_layouts_under_fsdp_equal_single_process_bit_for_bit(world, layout, backend):
    """8-bit codes on FSDP2 shards (docs/layouts.md): blocks never straddle a shard, each shard's scales are its
    own rows', so with the same averaged gradients the sharded run IS the single-process one, codes included."""
    r0, r1 = _results(world, f"int8_fsdp-{layout}-{backend}")
    assert r0["codes"][:4] == ["torch.int8", "torch.float32", "torch.uint8", "torch.float32"]  # weight 0 quantized
    assert r0["local_numels"][0] + r1["local_numels"][0] == 17 * 256 and r1["local_numels"][0] < 4096
    for res in (r0, r1):
        got, want = res["dist"], res["ref"]
        for i, (a, b) in enumerate(zip(got["params"], want["params"])):
            assert torch.equal(a, b), f"param {i}"
        for i, (sa, sb) in enumerate(zip(got["state"], want["state"])):
            assert set(sa) == set(sb), i
            for k in sa:
                a, b = torch.as_tensor(sa[k]), torch.as_tensor(sb[k])
                assert a.shape == b.shape and torch.equal(a, b), f"param {i} {k}"  # scales: (rows, blocks per row)
    init = [p.detach() for p in dw._int8_model(r0["dist"]["params"][0].dtype).parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(r0["dist"]["params"], init))  # the steps did something


@pytest.mark.parametrize("layout,backend", [("int8_state", "reference"), ("master16_int8", "reference"),
                                            *[pytest.param(lay, "cpu", marks=pytest.mark.skipif(
                                                _CPU_STATUS != "available",
                                                reason=f"cpu backend not built here: {_CPU_STATUS}"))
                                              for lay in INT8_LAYOUTS]])
def test_int8_layouts_distributed_checkpoint_resume_equals_uninterrupted(world, layout, backend):
    """DCP save / load of an FSDP2 run in an int8 layout: codes, block scales (and master16_int8's remainder) are
    saved as DTensors, and the resumed run is the uninterrupted one bit for bit."""
    for rank, res in enumerate(_results(world, f"int8_ckpt-{layout}-{backend}")):
        assert "exp_avg.codes:DTensor:torch.int8" in res["saved"] and "exp_avg_sq.codes:DTensor:torch.uint8" in res["saved"]
        assert "exp_avg_scale:DTensor:torch.float32" in res["saved"], res["saved"]
        if layout == "master16_int8":
            assert "master_lo:DTensor:torch.uint8" in res["saved"], res["saved"]  # (its bytes: layouts.remainder_bytes)
        assert res["loaded_is_dtensor"]
        _assert_snapshots_equal(res["resumed"], res["uninterrupted"], f"rank {rank}")


@pytest.mark.parametrize("layout,backend", [("int8_state", "reference"), ("master16_int8", "reference"),
                                            *[pytest.param(lay, "cpu", marks=pytest.mark.skipif(
                                                _CPU_STATUS != "available",
                                                reason=f"cpu backend not built here: {_CPU_STATUS}"))
                                              for lay in INT8_LAYOUTS]])
def test_int8_layouts_dcp_reshard_between_fsdp_and_one_process(world, layout, backend):
    """An int8-layout DCP checkpoint saved by FSDP2 (2 ranks) loads into one process, and one saved by one process
    loads into FSDP2; either continues as the uninterrupted run, bit for bit (the block scales of a weight with
    rows of whole blocks have one shape, (rows, blocks per row), sharded or not: DCP's in-place load failed on
    the shape of a one-process run's (blocks,))."""
    r0, r1 = _results(world, f"int8_reshard-{layout}-{backend}")
    assert "to_one_error" not in r0, r0["to_one_error"]
    _assert_snapshots_equal(r0["to_one"], r0["uninterrupted"], "FSDP2 -> one process")
    for rank, res in enumerate((r0, r1)):
        _assert_snapshots_equal(res["from_one"], res["uninterrupted"], f"one process -> FSDP2, rank {rank}")


@pytest.mark.parametrize("layout,backend", [("int8_state", "reference"), ("master16_int8", "reference"),
                                            *[pytest.param(lay, "cpu", marks=pytest.mark.skipif(
                                                _CPU_STATUS != "available",
                                                reason=f"cpu backend not built here: {_CPU_STATUS}"))
                                              for lay in INT8_LAYOUTS]])
def test_switching_between_codes_and_fp32_state_under_fsdp_equals_one_process(world, layout, backend):
    """A new optimizer of the other layout loads an FSDP2 run's sharded state dict (codes -> fp32 moments, and
    back) and continues as the same switch in one process, bit for bit; so does a DCP checkpoint loaded into
    its own layout and then switched. Refused before 2026-12-06 (converting on sharded tensors)."""
    for rank, res in enumerate(_results(world, f"int8_convert-{layout}-{backend}")):
        for way in [k for k in res if "->" in k]:
            _assert_snapshots_equal(res[way]["dist"], res[way]["ref"], f"{way}, rank {rank}")
        other = "native" if layout == "int8_state" else "master16"
        _assert_snapshots_equal(res["dcp"], res[f"{layout}->{other}"]["ref"], f"DCP then {other}, rank {rank}")


@pytest.mark.parametrize("layout,backend", [*[(lay, "reference") for lay in FULL_SD_LAYOUTS],
                                            *[pytest.param(lay, "cpu", marks=pytest.mark.skipif(
                                                _CPU_STATUS != "available",
                                                reason=f"cpu backend not built here: {_CPU_STATUS}"))
                                              for lay in FULL_SD_LAYOUTS]])
def test_full_state_dict_of_compressed_layouts_under_fsdp_gathers_and_resumes(world, layout, backend):
    """get_optimizer_state_dict(full_state_dict=True) of an FSDP2 run in a compressed layout: in the master16
    layouts gloo gathered no int16 remainder (RuntimeError "Invalid scalar type"; NCCL has no int16 either), so
    the remainder is saved as its bytes. The full state dict resumes in one process and in FSDP2, bit for bit
    (int8_state: its codes and (rows, blocks per row) scales gathered and distributed again)."""
    r0, r1 = _results(world, f"master16_full-{layout}-{backend}")
    for rank, res in enumerate((r0, r1)):
        if layout != "int8_state":
            assert "master_lo:Tensor:torch.uint8:(17, 256, 2)" in res["saved"], res["saved"]
        if layout != "master16":
            assert "exp_avg_scale:Tensor:torch.float32:(17, 1)" in res["saved"], res["saved"]
        _assert_snapshots_equal(res["fsdp"], res["uninterrupted"], f"full state dict -> FSDP2, rank {rank}")
        _assert_snapshots_equal(res["broadcast"], res["uninterrupted"], f"rank 0's, broadcast -> FSDP2, rank {rank}")
    _assert_snapshots_equal(r0["one_process"], r0["uninterrupted"], "full state dict -> one process")


@pytest.mark.parametrize("backend", _backend_params())
def test_bf16_sr_shards_draw_their_own_bits(world, backend):
    """bf16_sr on a Shard(0) DTensor: each shard indexes its elements from 0, and every shard drew the same random
    bits (equal halves with equal gradients stayed equal, a correlated rounding across shards). The key of a
    shard not at the origin mixes in its offset: the halves part; the origin shard is the one-process run's rows
    bit for bit; a replicated param is one process's on both ranks (replicas round alike)."""
    r0, r1 = _results(world, f"sr_shards-{backend}")
    for res in (r0, r1):
        one, sharded = res["one"], res["sharded"]
        assert torch.equal(sharded[:2], one[:2])  # the origin shard: the one-process key
        assert not torch.equal(sharded[2:], sharded[:2])  # the second shard draws its own bits
        assert torch.equal(res["replicated"], one)
    assert torch.equal(r0["sharded"], r1["sharded"])


@pytest.mark.parametrize("backend", _backend_params())
def test_int8_sr_shards_draw_their_own_bits(world, backend):
    """int8_sr (stochastic 8-bit codes) on a Shard(0) DTensor, as bf16_sr above: a (16, 256) fp32 param with equal
    row halves and equal gradients, one block per row, quantized on both shards. The second shard's codes draw
    their own bits (the halves' codes part); the origin shard's codes and params are one process's; a replicated
    param is one process's on both ranks."""
    r0, r1 = _results(world, f"sr_shards_int8-{backend}")
    for res in (r0, r1):
        (p1, c1), (ps, cs), (pr, cr) = res["one"], res["sharded"], res["replicated"]
        assert cs.dtype == torch.int8 and int(cs.ne(0).sum()) > 1000
        assert torch.equal(cs[:8], c1[:8]) and torch.equal(ps[:8], p1[:8])  # the origin shard: one process's
        assert not torch.equal(cs[8:], cs[:8])  # the second shard draws its own bits
        assert torch.equal(cr, c1) and torch.equal(pr, p1)
    assert torch.equal(r0["sharded"][1], r1["sharded"][1])


# ------------------------------------------------------------------ Muon with bf16 Newton-Schulz under FSDP2
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("ns_algorithm", MUON_ALGORITHMS)
def test_muon_bf16_ns_under_fsdp_sends_bf16_and_equals_single_process_bit_for_bit(world, ns_algorithm, backend):
    """float32 params, ns_dtype=bf16: the two all_to_all_single of the NS phase (the shards to their owners, the
    results back) carry bf16 (the NS rounds its input to bf16 first and returns bf16, so rounding the shards before
    sending them is the same), and the params and
    momentum buffers equal, bit for bit, both the single-process run and FSDP2 with an fp32 update work buffer and
    an fp32 wire (the paths before: ``specs_muon.update_dtype`` and ``phases._wire_dtype`` patched to the param's
    dtype). Every rank trains on the whole batch, so the averaged
    gradients are the single process's exactly (tests/dist_worker.py, scenario_muon_bf16_fsdp)."""
    r0, r1 = _results(world, f"muon_bf16_fsdp-{ns_algorithm}-{backend}")
    for rank, res in enumerate((r0, r1)):
        for other in ("ref", "old"):
            got, want = res["dist"], res[other]
            assert len(got["params"]) == 6 and all(a.dtype == torch.float32 for a in got["params"])
            _assert_snapshots_equal(got, want, f"rank {rank} vs {other}")
            assert all("momentum_buffer" in got["state"][i] for i in (0, 2, 4))  # the weights: Muon's state
        # per step, 2 collectives (the way in, the way back), all owners at once: the 7x6 weight is owned by rank 0,
        # the 5x7 and 1x5 ones by rank 1; rows 4/3 of 7x6, 3/2 of 5x7, 1/0 of 1x5 (no padding)
        # the cached plan from the third step on (the Muon groups' plan of the first is invalidated by the aux AdamW's
        # new state): the owners and splits of the exchange are derived at the first two steps only
        for w in (res["ref_wire"], res["wire"], res["old_wire"]):
            assert w.pop() == ("exchange layouts derived at steps", () if w is res["ref_wire"] else (0, 1), ())
        assert res["ref_wire"] == []
        assert len(res["wire"]) == len(res["old_wire"]) == 5 * 2, res["wire"]
        assert {op for op, _, _ in res["wire"] + res["old_wire"]} == {"all_to_all_single"}, res["wire"]
        assert {d for _, ds, _ in res["wire"] for d in ds} == {"torch.bfloat16"}, res["wire"]
        assert {d for _, ds, _ in res["old_wire"] for d in ds} == {"torch.float32"}, res["old_wire"]
        assert [n for _, _, n in res["wire"]] == [n for _, _, n in res["old_wire"]]
        mine = [4 * 6, 3 * 7 + 1 * 5] if rank == 0 else [3 * 6, 2 * 7 + 0 * 5]  # (to rank 0, to rank 1)
        owned = [4 * 6 + 3 * 6] if rank == 0 else [3 * 7 + 1 * 5 + 2 * 7 + 0 * 5]  # (from every rank)
        # (output, input) numels: the way in receives what it owns and sends its rows; the way back the reverse
        assert [n for _, _, n in res["wire"]] == [(sum(owned), sum(mine)), (sum(mine), sum(owned))] * 5
    # uneven shards, one empty: rows 4/3 of 7x6, 3/2 of 5x7, 1/0 of 1x5
    assert [a + b for a, b in zip(r0["local_numels"], r1["local_numels"])] == [42, 7, 35, 5, 5, 1]
    assert r1["local_numels"][4] == 0 and r0["local_numels"][0] != r1["local_numels"][0]
    init = [p.detach() for p in dw._make_model(torch.float32).parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(r0["dist"]["params"], init))  # the steps did something


@pytest.mark.parametrize("backend", _backend_params())
def test_muon_under_fsdp_with_several_ns_calls_per_shape_equals_single_process_bit_for_bit(world, backend):
    """One matrix per NS call: each owner's two 7x7 weights take two calls, their results go back to the right
    rows (owners by size: the four 7x7 alternate 0, 1, 0, 1, then the 7x6 to rank 0, the 1x7 to rank 1)."""
    for rank, res in enumerate(_results(world, f"muon_chunks-{backend}")):
        _assert_snapshots_equal(res["dist"], res["ref"], f"rank {rank}")
        mine = [(1, 7, 6), (1, 7, 7), (1, 7, 7)] if rank == 0 else [(1, 7, 7), (1, 7, 7), (1, 1, 7)]
        assert res["stacks"] == mine * res["steps"], res["stacks"]


@pytest.fixture(scope="module")
def world_rounds():
    """The Muon FSDP2 scenarios again with every NS call its own round of the exchange (MOMENTUM_FUSED_NS_ROUND_ELEMS
    =1, set in the workers before momentum_fused is imported): asynchronous all-to-alls, overlapped with the NS."""
    sc = [dict(id=f"muon_bf16_fsdp-{a}-{b}", kind="muon_bf16_fsdp", ns_algorithm=a, backend=b)
          for a in MUON_ALGORITHMS for b in _available(BACKENDS)]
    sc += [dict(id=f"muon_chunks-{b}", kind="muon_chunks", backend=b) for b in _available(BACKENDS)]
    return dw.run_scenarios(sc, env={"MOMENTUM_FUSED_NS_ROUND_ELEMS": "1"})


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("ns_algorithm", MUON_ALGORITHMS)
def test_muon_exchange_in_rounds_equals_single_process_bit_for_bit(world_rounds, ns_algorithm, backend):
    """With one round per NS call (optim/phases.py ROUND_ELEMS) the exchange takes two asynchronous all-to-alls
    per round, all ways in first: rank 0 owns the 7x6 weight (round 0), rank 1 the 5x7 (round 0) and the 1x5
    (round 1). The results equal the single process bit for bit, as in one round."""
    r0, r1 = _results(world_rounds, f"muon_bf16_fsdp-{ns_algorithm}-{backend}")
    for rank, res in enumerate((r0, r1)):
        for other in ("ref", "old"):
            _assert_snapshots_equal(res["dist"], res[other], f"rank {rank} vs {other}")
        for w in (res["ref_wire"], res["wire"], res["old_wire"]):
            w.pop()
        assert {op for op, _, _ in res["wire"]} == {"all_to_all_single"}, res["wire"]
        # (output, input) numels per step: in r0, in r1, back r0, back r1 (rows 4/3 of 7x6, 3/2 of 5x7, 1/0 of 1x5)
        mine = ([4 * 6, 3 * 7], [0, 1 * 5]) if rank == 0 else ([3 * 6, 2 * 7], [0, 0 * 5])  # (to rank 0, to 1)
        owned = ([4 * 6 + 3 * 6], [0]) if rank == 0 else ([3 * 7 + 2 * 7], [1 * 5 + 0 * 5])
        step = [(sum(owned[0]), sum(mine[0])), (sum(owned[1]), sum(mine[1])),
                (sum(mine[0]), sum(owned[0])), (sum(mine[1]), sum(owned[1]))]
        assert [n for _, _, n in res["wire"]] == step * 5, res["wire"]
    for rank, res in enumerate(_results(world_rounds, f"muon_chunks-{backend}")):
        _assert_snapshots_equal(res["dist"], res["ref"], f"rank {rank} (chunks, a round per call)")
        mine = [(1, 7, 6), (1, 7, 7), (1, 7, 7)] if rank == 0 else [(1, 7, 7), (1, 7, 7), (1, 1, 7)]
        assert res["stacks"] == mine * res["steps"], res["stacks"]


@pytest.mark.parametrize("backend", _backend_params())
def test_muon_dtensor_rows_not_in_fsdp_split_raise_before_any_change(world, backend):
    """The NS phase sends each owner the rows of torch.chunk's split (FSDP2's); a Shard(0) DTensor sharded otherwise
    (3 / 4 rows of 7) is refused by the plan, on every rank, before anything changes."""
    for rank, res in enumerate(_results(world, f"muon_bad_split-{backend}")):
        assert res["message"] is not None and "torch.chunk's split" in res["message"], res["message"]
        assert f"has {[3, 4][rank]} rows, expected {[4, 3][rank]}" in res["message"], res["message"]
        assert res["unchanged"] and res["state"] == 0


@pytest.mark.parametrize("backend", _backend_params())
def test_muon_dtensor_group_of_mixed_dtypes_equals_single_process_bit_for_bit(world, backend):
    """bf16 and fp32 matrices in one Muon group (fp32 NS), Shard(0) DTensors on 2 processes: params and momentum
    buffers equal the single-process run exactly, so no update was rounded to another dtype on the wire
    (tests/dist_worker.py, scenario_muon_mixed_dtypes)."""
    for rank, res in enumerate(_results(world, f"muon_mixed_dtypes-{backend}")):
        got = res["dist"]
        assert [a.dtype for a in got["params"]] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
        assert all(set(st) == {"momentum_buffer"} for st in got["state"])
        _assert_snapshots_equal(got, res["ref"], f"rank {rank}")


@pytest.mark.parametrize("backend", _backend_params())
def test_muon_dtensor_matrices_with_no_rows_or_columns_step_as_one_process(world, backend):
    """(0, 4) and (3, 0) matrices beside others, Shard(0) DTensors on 2 processes: equal to one process bit for
    bit (their owner crashed in the NS exchange and the other rank hung until the timeout)."""
    for rank, res in enumerate(_results(world, f"muon_empty-{backend}")):
        _assert_snapshots_equal(res["dist"], res["ref"], f"rank {rank}")


@pytest.mark.parametrize("mixed", ["experts", "mixed", "toggled"])
@pytest.mark.parametrize("backend", _backend_params())
def test_muon_flatten_false_orthogonalizes_each_shards_matrices_where_they_are(world, backend, mixed):
    """``flatten=False``: 3-D and 4-D params (stacked experts, 5 over 2 ranks, and 1: a rank holds none), Shard(0)
    DTensors on 2 processes: equal to one process bit for bit, with no exchange (each shard holds whole matrices);
    a 2-D matrix beside them is exchanged as before; the flag written between steps takes effect at the next one
    (tests/dist_worker.py, scenario_muon_experts)."""
    for rank, res in enumerate(_results(world, f"muon_experts-{mixed}-{backend}")):
        _assert_snapshots_equal(res["dist"], res["ref"], f"rank {rank}")
        assert (res["exchanges"] > 0) == (mixed != "experts"), (rank, res["exchanges"])


@pytest.mark.parametrize("backend", _backend_params())
def test_adamtied_beta_and_betas_writes_under_zero_redundancy_optimizer_equal_one_process(world, backend):
    for rank, res in enumerate(_results(world, f"zero_tied_beta-{backend}")):
        (want, want_betas), (got, got_betas) = res["ref"], res["got"]
        assert got_betas == want_betas == (0.3, 0.3), (rank, got_betas, want_betas)
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, i=i: f"rank {rank} param {i}: {m}")
        kept = res["after_raise"]  # (ZeRO's groups, then this rank's AdamTied's, one to one)
        assert kept == [(0.6, 0.6), (0.7, 0.7), (0.5, 0.5)] * 2, (rank, kept)
        assert res["after_load"] == [(0.9, 0.9)] * 2, (rank, res["after_load"])


@pytest.mark.parametrize("backend", _backend_params())
def test_zero_redundancy_optimizer_resumes_an_int8_state_checkpoint(world, backend):
    """ZeRO's load_state_dict writes the state itself: the int8 codes, saved as ``{name: {"codes": t}}``, go back
    under their names at the next step, and the resumed run equals the uninterrupted one bit for bit."""
    for rank, res in enumerate(_results(world, f"zero_int8_resume-{backend}")):
        for a, b in zip(res["resumed"], res["uninterrupted"]):
            assert torch.equal(a, b), f"rank {rank}"


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_fsdp_with_a_changing_set_of_gradients_takes_the_cached_plan(world, opt_name, backend):
    """FSDP2, uneven and empty shards, a different third of the params without gradient each step (experts a batch
    did not use): the same trajectory as one process doing the same, and one full plan in 6 steps (the first: the
    cached plan keeps the DTensor params without a gradient as members, tests/test_sparse_grads.py)."""
    for rank, res in enumerate(_results(world, f"sparse_fsdp-{opt_name}-{backend}")):
        _assert_snapshots_close(res["dist"], res["ref"], F64, f"rank {rank}")
        assert res["full_plans"] == 1, res["full_plans"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", ["native", "int8_state"])
def test_adamtied_gradient_snr_under_fsdp_is_the_whole_params_mean_on_every_rank(world, layout, backend):
    """gradient_snr is a mean over each param's elements: under FSDP2 every rank returns the one-process value
    (it returned its own shard's mean where the rows split evenly: DTensor's mean() is then a Partial average, here
    ~1 % from the whole param's). float64 (native) or float32 (int8_state) params: the averaged gradients' round-off.
    (Under int8_state the 8-bit weight's value is inf, some decoded variance being 0: its bias still splits evenly.)"""
    r0, r1 = _results(world, f"gradient_snr-{layout}-{backend}")
    assert r0["dist"] == r1["dist"]
    assert r0["ref"] == r1["ref"]
    tol = 1e-9 if layout == "native" else 1e-4
    for i, (got, want) in enumerate(zip(r0["dist"], r0["ref"])):
        assert math.isclose(got, want, rel_tol=tol), f"param {i}: FSDP2 {got} vs one process {want}"


@pytest.mark.parametrize("backend", _backend_params())
def test_whole_tensor_reductions_of_a_strided_shard_param_equal_one_process(world, backend):
    """FSDP2 over tensor parallelism places params as _StridedShard, whose is_shard() is False: gradient_snr and the
    Polyak step's inner products summed only this rank's shard (snr ~2x off, params drifting by 0.16 in 5 steps on
    a 2x2 mesh). Now they equal one process (float64 round-off) and the ranks agree."""
    r0, r1 = _results(world, f"strided_reductions-{backend}")
    assert r0["adamtied"]["dist"]["placements"] == ["_StridedShard"]
    for name in ("adamtied", "sf_sgd_polyak"):
        for r in (r0, r1):
            got, want = r[name]["dist"], r[name]["ref"]
            torch.testing.assert_close(got["param"], want["param"], **F64, msg=lambda m: f"{name}: {m}")
        assert torch.equal(r0[name]["dist"]["param"], r1[name]["dist"]["param"]), name
    a, b, want = r0["adamtied"]["dist"]["snr"], r1["adamtied"]["dist"]["snr"], r0["adamtied"]["ref"]["snr"]
    assert a == b and math.isclose(a, want, rel_tol=1e-12), (a, b, want)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("shard_dim", [0, 1])
def test_muon_on_an_hsdp_mesh_exchanges_in_the_shard_group_and_equals_one_process(world, shard_dim, backend):
    """HSDP's placements on a 2-D mesh (Shard(0) on one mesh dim, Replicate on the other): Muon refused every 2-D
    mesh; it now exchanges each matrix's rows in the sharding dim's group, equal to one process bit for bit (a 2x2
    mesh on 4 ranks, fully_shard's HSDP included, was checked the same way by hand, 2026-12-07)."""
    for rank, res in enumerate(_results(world, f"muon_hsdp-{shard_dim}-{backend}")):
        assert res["placements"] == (["Replicate", "Shard"] if shard_dim else ["Shard", "Replicate"])
        _assert_snapshots_equal(res["dist"], res["ref"], f"rank {rank}")
        assert res["exchanges"] > 0, (rank, res["exchanges"])


@pytest.mark.parametrize("backend", _backend_params())
def test_polyak_step_under_zero_redundancy_optimizer_is_refused_before_any_change(world, backend):
    """ZeRO gives each rank's optimizer a partition of the params: the Polyak step's inner products were the
    partition's (each rank its own step size, silently). Refused at construction and at a step after the lr is set
    to "polyak" (params and state unchanged)."""
    for rank, res in enumerate(_results(world, f"zero_polyak-{backend}")):
        assert "not supported under ZeroRedundancyOptimizer" in res["built"], (rank, res["built"])
        assert "not supported under ZeroRedundancyOptimizer" in res["stepped"], (rank, res["stepped"])
        assert res["unchanged"], rank


@pytest.mark.parametrize("backend", _backend_params())
def test_schedule_free_eval_under_zero_redundancy_optimizer_moves_every_partition(world, backend):
    """ZeRO's optimizer holds one rank's partition: its eval()/train() moved only that partition's params, leaving
    the model a mix of x and y on every rank. They now broadcast every partition (ZeRO's own sync): the eval
    params and the training after train() equal one process."""
    for rank, res in enumerate(_results(world, f"zero_sf_eval-{backend}")):
        # ZeRO copies its groups' keys onto the optimizer's before a step and a consolidation: a stale train_mode
        # there made step() in eval mode run from x, and train() after a consolidation a no-op
        assert res["dist"]["mode_after_consolidate"] is False, rank
        assert "called in eval mode" in res["dist"]["step_in_eval"], (rank, res["dist"]["step_in_eval"])
        for when in ("eval", "end"):
            for i, (a, b) in enumerate(zip(res["dist"][when], res["ref"][when])):
                torch.testing.assert_close(a, b, **F64, msg=lambda m, i=i: f"rank {rank} {when} param {i}: {m}")


@pytest.mark.parametrize("backend", _backend_params())
def test_what_needs_whole_params_is_refused_on_fsdp1_shards_and_zero_partitions(world, backend):
    """FSDP1's flat shards and ZeRO's partitions are plain tensors of one rank's part: schedule-free lr="polyak"
    (each rank its own step size) and gradient_snr (each rank its part's mean) under FSDP1, and the low-rank
    optimizers under ZeRO (a layer split, its rank buffer stale), gave silently wrong results; now refused."""
    for rank, res in enumerate(_results(world, f"partition_refusals-{backend}")):
        assert "not supported with FSDP1" in res["fsdp1_polyak"], (rank, res["fsdp1_polyak"])
        assert "FSDP1" in res["fsdp1_snr"] and "flat shard" in res["fsdp1_snr"], (rank, res["fsdp1_snr"])
        assert "cannot run under ZeroRedundancyOptimizer" in res["zero_lowrank"], (rank, res["zero_lowrank"])


@pytest.mark.parametrize("backend", _backend_params())
def test_schedule_free_knows_which_zero_built_it_and_its_ranks_refuse_together(world, backend):
    """A ZeRO method building a schedule-free optimizer over params ZeRO does not partition: accepted and not tied
    to it (the caller walk took any ZeRO frame). A bad state tensor in one rank's partition: eval() raises on every
    rank (its own error on that rank) and nothing moves (the other rank moved and hung in the broadcast)."""
    for rank, res in enumerate(_results(world, f"zero_sf_edges-{backend}")):
        assert res["aux"] == "built", (rank, res["aux"])
        assert res["wrapped"] == "tied" and res["with_aux"] == "not tied", (rank, res["wrapped"], res["with_aux"])
        assert res["in_step"] == "not tied", (rank, res["in_step"])
        want = "ValueError" if rank == 0 else "failed on another rank"
        assert want in res["eval"], (rank, res["eval"])
        assert res["training"] is True and res["unchanged"], rank
