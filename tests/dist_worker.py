"""The worker side of tests/test_distributed.py: scenarios run by 2 gloo processes (CPU).

``run_scenarios(scenarios, env)`` spawns WORLD processes (torch.multiprocessing, start method spawn);
each one initialises a gloo process group, runs every scenario in order and writes its own results
to ``rank{r}.pt``; the parent returns ``[results of rank 0, results of rank 1]``, each a dict
``{scenario id: result dict}``. A scenario that raises on a rank is recorded as ``{"error": traceback}``
for that rank (the next scenario still runs; collectives time out after TIMEOUT_S instead of hanging).

Every scenario trains the same tiny float64 MLP (layers of 7, 5 and 1 output rows, so FSDP2's dim-0
shards are uneven and rank 1 holds an *empty* shard of the last layer) on the rank's half of a
global batch, and also trains an unwrapped copy on the whole batch in the same process (the
single-process reference). The loss is a mean, and DDP / FSDP2 average gradients over the 2 ranks, so
both runs follow the same math; they differ only by round-off in the gradients.

Top-level imports are stdlib only: ``_entry`` applies ``env`` (e.g. TRITON_INTERPRET=1) before
torch, triton or momentum_fused are imported in the child.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import tempfile
import traceback

WORLD = 2
TIMEOUT_S = 60
STEPS = 5
GLOBAL_BATCH = 8

# name -> (class name in momentum_fused, kwargs)
OPTIMIZERS = {
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "lion": ("Lion", dict(lr=0.003, weight_decay=0.1)),
    "sf_adamw": ("AdamWScheduleFree", dict(lr=0.01, weight_decay=0.01, warmup_steps=2)),
    # the Polyak step: two global inner products per step, all-reduced over the FSDP shards
    "sf_sgd_polyak": ("SGDScheduleFree", dict(lr="polyak", momentum=0.9, polyak_max_lr=5.0)),
    # the weight matrices by Muon (NS in float64; FSDP2: gathered to an owner rank, orthogonalized there, the
    # rows sent back), the biases by its aux AdamW
    "muon": ("Muon", dict(lr=0.02, weight_decay=0.1, ns_dtype="float64")),
    # the same with the Gram form of Newton-Schulz (on every matrix, and its restarts)
    "muon_gram": ("Muon", dict(lr=0.02, weight_decay=0.1, ns_dtype="float64", ns_algorithm="gram")),
}


# ------------------------------------------------------------------------------------------ parent side

def _flat_state(st: dict):
    """(key, value) of a saved param state, a nested dict's entries as ``key.subkey`` (the 8-bit codes:
    ``exp_avg.codes``)."""
    for k, v in st.items():
        if isinstance(v, dict):
            yield from ((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            yield k, v

def run_scenarios(scenarios: list[dict], env: dict | None = None) -> list[dict]:
    """Run ``scenarios`` (dicts with "id", "kind" and the kind's arguments) on WORLD processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        files = [os.path.join(d, f"rank{r}.pt") for r in range(WORLD)]
        try:
            mp.spawn(_entry, args=(d, scenarios, dict(env or {})), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as e:
            # A worker that died after writing its results (gloo's teardown, pytorch/pytorch#179291: SIGABRT in
            # destroy_process_group or at exit) loses nothing; one that died before is a failure, with its files.
            if not all(os.path.exists(f) for f in files):
                raise RuntimeError(f"a worker died before writing its results ({e}); written: "
                                   f"{[os.path.basename(f) for f in files if os.path.exists(f)]}") from e
            import warnings
            warnings.warn(f"dist_worker: {e} after every rank wrote its results (teardown); results kept")
        import torch

        return [torch.load(f, weights_only=False) for f in files]


# ------------------------------------------------------------------------------------------ child side
def _entry(rank: int, tmpdir: str, scenarios: list[dict], env: dict) -> None:
    os.environ.update(env)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        for sc in scenarios:
            try:
                results[sc["id"]] = _KINDS[sc["kind"]](rank, tmpdir, **{k: v for k, v in sc.items()
                                                                        if k not in ("id", "kind")})
            except Exception:
                results[sc["id"]] = {"error": f"rank {rank}: " + traceback.format_exc()}
    finally:
        path = os.path.join(tmpdir, f"rank{rank}.pt")
        torch.save(results, path + ".part")
        os.replace(path + ".part", path)  # (whole or absent: run_scenarios reads the files of workers that died after)
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's finalization, where gloo's worker threads can still
    # release tensors and take the GIL of a dying interpreter (SIGABRT, "terminate called without an active
    # exception": pytorch/pytorch#179291; seen once in this project's CI, 2026-12-04).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _make_model(dtype, seed=0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)


def _batches(dtype, steps=STEPS):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64).to(dtype),
             torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64).to(dtype)) for _ in range(steps)]


def _half(t, rank):
    n = GLOBAL_BATCH // WORLD
    return t[rank * n:(rank + 1) * n]


def _make_opt(name, params, backend):
    import momentum_fused as mf

    cls, kw = OPTIMIZERS[name]
    if cls == "Muon":
        import torch

        kw = dict(kw, ns_dtype=getattr(torch, kw["ns_dtype"]))
        params = [dict(params=[p for p in params if p.dim() >= 2]),
                  dict(params=[p for p in params if p.dim() < 2], use_muon=False, lr=0.01)]
    return getattr(mf, cls)(params, **kw, backend=backend)


def _full(t):
    """A DTensor gathered (collective: every rank calls it in the same order), or a detached copy."""
    import torch

    from momentum_fused.distributed import is_dtensor

    if is_dtensor(t) and t.element_size() == 2 and t.dtype != torch.float16:  # gloo gathers no bf16 / int16:
        from torch.distributed.tensor import DTensor                             # their bits as int32
        wide = DTensor.from_local(t.to_local().view(torch.int16).to(torch.int32), t.device_mesh, t.placements,
                                  shape=t.shape, stride=t.stride())
        return wide.full_tensor().to(torch.int16).view(t.dtype).detach().clone()
    t = t.full_tensor() if is_dtensor(t) else t
    return t.detach().clone()


def _snapshot(opt, params) -> dict:
    """Full params and every tensor state entry (gathered), plus the group counters."""
    import torch

    state = []
    for p in params:
        st = opt.state.get(p, {})
        state.append({k: (_full(v) if isinstance(v, torch.Tensor) else v) for k, v in sorted(st.items())})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return dict(params=[_full(p) for p in params], state=state, groups=groups)


def _train_step(model, opt, x, y, closure_loss_allreduce=False, polyak=False):
    """One step: the loss is the mean squared error of ``model`` on (x, y)."""
    import torch.distributed as dist

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if closure_loss_allreduce:  # the global loss: the mean of the ranks' means
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return loss

    if polyak:
        return opt.step(closure)
    closure()
    return opt.step()


def _reference(opt_name, backend, dtype, steps=STEPS, seed=0, eval_at_end=False):
    """Single-process training of the unwrapped model on the whole batch."""
    model = _make_model(dtype, seed)
    params = list(model.parameters())
    opt = _make_opt(opt_name, params, backend)
    polyak = OPTIMIZERS[opt_name][1].get("lr") == "polyak"
    for x, y in _batches(dtype, steps):
        _train_step(model, opt, x, y, polyak=polyak)
    out = _snapshot(opt, params)
    if eval_at_end:
        opt.eval()
        out["eval_params"] = [p.detach().clone() for p in params]
    return out


def _fsdp(model):
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _wrap(wrapper, model):
    if wrapper == "fsdp":
        return _fsdp(model), model
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model), model
    raise ValueError(wrapper)


def scenario_train(rank, tmpdir, wrapper, opt_name, backend, dtype="float64"):
    """DDP or FSDP2 training over STEPS steps vs the single-process reference."""
    import torch

    from momentum_fused.distributed import is_dtensor

    dtype = getattr(torch, dtype)
    sf = opt_name.startswith("sf_")
    polyak = OPTIMIZERS[opt_name][1].get("lr") == "polyak"
    ref = _reference(opt_name, backend, dtype, eval_at_end=sf)
    wrapped, inner = _wrap(wrapper, _make_model(dtype))
    params = list(inner.parameters())
    opt = _make_opt(opt_name, params, backend)
    for x, y in _batches(dtype):
        _train_step(wrapped, opt, _half(x, rank), _half(y, rank), closure_loss_allreduce=polyak, polyak=polyak)
    # layouts of the tensor state: (key, param is DTensor, state is DTensor, same placements,
    # local state shape, local param shape)
    layouts = []
    for p in params:
        for k, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                layouts.append((k, is_dtensor(p), is_dtensor(v),
                                tuple(p.placements) == tuple(v.placements) if is_dtensor(v) else None,
                                tuple(v.to_local().shape) if is_dtensor(v) else tuple(v.shape),
                                tuple(p.to_local().shape) if is_dtensor(p) else tuple(p.shape)))
    out = dict(dist=_snapshot(opt, params), ref=ref, layouts=layouts,
               local_numels=[(p.to_local() if is_dtensor(p) else p).numel() for p in params])
    if sf:
        opt.eval()
        out["eval_params"] = [_full(p) for p in params]
    return out


def scenario_step_comm(rank, tmpdir, wrapper, opt_name, backend):
    """Collectives issued inside ``optimizer.step()`` (DTensor dispatch and c10d), FSDP2."""
    import torch
    from torch.distributed.tensor.debug import CommDebugMode

    polyak = OPTIMIZERS[opt_name][1].get("lr") == "polyak"
    wrapped, inner = _wrap(wrapper, _make_model(torch.float64))
    opt = _make_opt(opt_name, list(inner.parameters()), backend)
    counts = []
    for x, y in _batches(torch.float64, 2):
        xr, yr = _half(x, rank), _half(y, rank)
        opt.zero_grad()
        loss = ((wrapped(xr) - yr) ** 2).mean()
        loss.backward()
        if polyak:
            loss = loss.detach()
            torch.distributed.all_reduce(loss)
            with CommDebugMode() as comm:
                opt.step(lambda: loss)  # the closure only returns the (already global) loss
        else:
            with CommDebugMode() as comm:
                opt.step()
        counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
    return dict(counts=counts)


def _build_fsdp(opt_name, backend, seed=0):
    import torch

    model = _fsdp(_make_model(torch.float64, seed))
    return model, _make_opt(opt_name, list(model.parameters()), backend)


def _dcp_resume(build, steps, ckpt, save_after, warm=0):
    """The DCP round trip of a checkpoint scenario: a run built by ``build()`` takes ``save_after`` steps and is
    saved with torch.distributed.checkpoint; a fresh one (``build(seed=123)``, another init, after ``warm`` steps of
    its own) loads it and continues to STEPS. Returns the saved state tensors as (key, type name, dtype) and the
    resumed run's snapshot, and whether every loaded state tensor is a DTensor."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from momentum_fused.distributed import is_dtensor

    m_b, o_b = build()
    steps(m_b, o_b, range(save_after))
    osd = get_optimizer_state_dict(m_b, o_b)
    saved = {(k, type(v).__name__, str(v.dtype)) for st in osd["state"].values() for k, v in _flat_state(st)
             if isinstance(v, torch.Tensor) and v.dim() > 0}
    dcp.save({"model": get_model_state_dict(m_b), "optim": osd}, checkpoint_id=ckpt)
    m_c, o_c = build(seed=123)  # another init: the load must overwrite it
    steps(m_c, o_c, range(warm))
    sd = {"model": get_model_state_dict(m_c), "optim": get_optimizer_state_dict(m_c, o_c)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(m_c, sd["model"])
    set_optimizer_state_dict(m_c, o_c, sd["optim"])
    loaded_is_dtensor = all(is_dtensor(v) for st in o_c.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor) and v.dim() > 0)
    steps(m_c, o_c, range(save_after, STEPS))
    return saved, _snapshot(o_c, list(m_c.parameters())), loaded_is_dtensor


def scenario_checkpoint(rank, tmpdir, opt_name, backend, save_after=3):
    """torch.distributed.checkpoint of an FSDP2 model + optimizer after ``save_after`` steps, loaded
    into a fresh model and optimizer (other init), continued to STEPS: vs an uninterrupted run."""
    import torch

    batches = _batches(torch.float64)
    ckpt = os.path.join(tmpdir, f"ckpt-{opt_name}-{backend}")
    polyak = OPTIMIZERS[opt_name][1].get("lr") == "polyak"

    def steps(model, opt, ts):
        for t in ts:
            x, y = batches[t]
            _train_step(model, opt, _half(x, rank), _half(y, rank), closure_loss_allreduce=True, polyak=polyak)

    m_a, o_a = _build_fsdp(opt_name, backend)
    steps(m_a, o_a, range(STEPS))
    uninterrupted = _snapshot(o_a, list(m_a.parameters()))

    saved, resumed, loaded_is_dtensor = _dcp_resume(functools.partial(_build_fsdp, opt_name, backend), steps, ckpt,
                                                    save_after)
    return dict(uninterrupted=uninterrupted, resumed=resumed, saved_state_types=sorted({t for _, t, _ in saved}),
                loaded_is_dtensor=loaded_is_dtensor)


def scenario_zero(rank, tmpdir, opt_name, backend):
    """ZeroRedundancyOptimizer (each rank updates its partition) wrapping our optimizer, under DDP."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import momentum_fused as mf

    ref = _reference(opt_name, backend, torch.float64)
    model = _make_model(torch.float64)
    ddp = DDP(model)
    cls, kw = OPTIMIZERS[opt_name]
    # the backend is an optimizer attribute, not a param-group key: bind it with functools.partial
    # (ZeRO copies its keyword arguments into every param group)
    opt = ZeroRedundancyOptimizer(list(model.parameters()),
                                  optimizer_class=functools.partial(getattr(mf, cls), backend=backend), **kw)
    for x, y in _batches(torch.float64):
        _train_step(ddp, opt, _half(x, rank), _half(y, rank))
    local_params = sum(len(g["params"]) for g in opt.optim.param_groups)
    return dict(params=[p.detach().clone() for p in model.parameters()], ref=ref, local_params=local_params,
                local_type=type(opt.optim).__name__)


def scenario_zero_polyak(rank, tmpdir, backend):
    """Schedule-free lr="polyak" under ZeroRedundancyOptimizer (each rank's optimizer holds its partition of the
    params, so its inner products were the partition's: each rank its own step size, params 0.5 off one process in
    5 steps): refused at construction, and at the step after the lr is set to "polyak", nothing changed."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import momentum_fused as mf

    model = _make_model(torch.float64)
    ddp = DDP(model)
    make = functools.partial(mf.SGDScheduleFree, backend=backend)
    try:
        ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=make, lr="polyak", momentum=0.9)
        built = "no error"
    except ValueError as e:
        built = str(e)
    opt = ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=make, lr=0.5, momentum=0.9)
    batches = _batches(torch.float64)
    _train_step(ddp, opt, _half(batches[0][0], rank), _half(batches[0][1], rank))
    for g in opt.param_groups:
        g["lr"] = "polyak"
    before = [p.detach().clone() for p in model.parameters()]
    state = [(p, k, v.clone()) for p, st in opt.optim.state.items() for k, v in st.items()
             if isinstance(v, torch.Tensor)]
    x, y = _half(batches[1][0], rank), _half(batches[1][1], rank)
    try:
        _train_step(ddp, opt, x, y, polyak=True)
        stepped = "no error"
    except ValueError as e:
        stepped = str(e)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and len(state) > 0 and all(
        torch.equal(v, opt.optim.state[p][k]) for p, k, v in state)
    return dict(built=built, stepped=stepped, unchanged=unchanged)


def scenario_zero_sf_eval(rank, tmpdir, backend):
    """Schedule-free AdamW under ZeroRedundancyOptimizer and DDP: 3 steps, ``opt.optim.eval()`` (the averaged
    iterate x), ``train()``, 2 more steps, against one process. Each rank's optimizer swaps only its partition of
    the params: the model held a mix of x and y (0.01 off one process) until train()/eval() broadcast every
    partition afterwards, as ZeRO does after a step."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import momentum_fused as mf

    kw = dict(lr=0.01, weight_decay=0.01, warmup_steps=2)

    def run(zero):
        model = _make_model(torch.float64)
        net = DDP(model) if zero else model
        opt = (ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=functools.partial(
            mf.AdamWScheduleFree, backend=backend), **kw) if zero
            else mf.AdamWScheduleFree(model.parameters(), backend=backend, **kw))
        inner = opt.optim if zero else opt
        part = (lambda t: _half(t, rank)) if zero else (lambda t: t)
        out = {}
        for k, (x, y) in enumerate(_batches(torch.float64)):
            if k == 3:
                inner.eval()
                out["eval"] = [p.detach().clone() for p in model.parameters()]
                if zero:  # ZeRO copies its own groups' keys onto inner's here and before a step
                    opt.consolidate_state_dict(0)
                    out["mode_after_consolidate"] = inner.training
                    try:
                        opt.step()
                        out["step_in_eval"] = "stepped"
                    except RuntimeError as e:
                        out["step_in_eval"] = str(e)
                inner.train()
            _train_step(net, opt, part(x), part(y))
        out["end"] = [p.detach().clone() for p in model.parameters()]
        return out

    return dict(dist=run(True), ref=run(False))


def scenario_zero_sf_edges(rank, tmpdir, backend):
    """Schedule-free and ZeroRedundancyOptimizer, the edges of its detection: (a) a ZeRO method that builds a
    schedule-free lr="polyak" optimizer over params it does not partition (accepted: the detection looked at every
    caller frame whose self was a ZeRO, refused it, and tied its eval() to that ZeRO's broadcast), an optimizer class
    ZeRO builds that builds one over other params (not ZeRO's), and a wrapper optimizer ZeRO builds whose inner
    schedule-free optimizer holds ZeRO's partition (ZeRO's: a first fix stopped at the wrapper); (b) a bad state
    tensor in one rank's partition: eval() raises on every rank and no rank moves (the other rank moved its params
    and hung in the broadcast)."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import momentum_fused as mf

    class Trainer(ZeroRedundancyOptimizer):
        def make_aux(self, params):
            return mf.SGDScheduleFree(params, lr="polyak", backend=backend)

    model = _make_model(torch.float64)
    zero = Trainer(list(model.parameters()), optimizer_class=functools.partial(mf.SGDScheduleFree, backend=backend),
                   lr=0.5)
    out = {}
    try:
        aux = zero.make_aux([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
        out["aux"] = "built" if aux._zero is None else "tied to the ZeRO"
    except ValueError as e:
        out["aux"] = str(e)

    class Wrap(torch.optim.Optimizer):  # a Lookahead-style wrapper ZeRO builds: its inner optimizer is ZeRO's
        def __init__(self, params, **kw):
            params = list(params)
            self.inner = mf.SGDScheduleFree(params, backend=backend, **kw)
            super().__init__(params, {})

    class WithAux(torch.optim.SGD):  # an optimizer ZeRO builds that builds another over params ZeRO never saw
        def __init__(self, params, **kw):
            self.aux = mf.SGDScheduleFree([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr="polyak",
                                          backend=backend)
            super().__init__(params, **kw)

    wrapped = ZeroRedundancyOptimizer(list(_make_model(torch.float64).parameters()), optimizer_class=Wrap, lr=0.5)
    out["wrapped"] = "tied" if wrapped.optim.inner._zero is not None else "not tied"
    try:
        with_aux = ZeroRedundancyOptimizer(list(_make_model(torch.float64).parameters()), optimizer_class=WithAux,
                                           lr=0.5)
        out["with_aux"] = "tied" if with_aux.optim.aux._zero is not None else "not tied"
    except ValueError as e:
        out["with_aux"] = str(e)
    whole = []  # one over the whole model built in a closure ZeRO's step runs: every param on every rank, not ZeRO's
    closure_model = _make_model(torch.float64)
    plain = ZeroRedundancyOptimizer(list(closure_model.parameters()), optimizer_class=torch.optim.SGD, lr=0.1)

    def closure():
        whole.append(mf.SGDScheduleFree(list(closure_model.parameters()), lr="polyak", backend=backend))
        return None

    try:
        plain.step(closure)
        out["in_step"] = "tied" if whole[0]._zero is not None else "not tied"
    except ValueError as e:
        out["in_step"] = str(e)
    x, y = _batches(torch.float64)[0]
    _train_step(model, zero, _half(x, rank), _half(y, rank))
    if rank == 0:  # a z of another dtype in rank 0's partition only
        st = next(st for st in zero.optim.state.values() if "z" in st)
        st["z"] = st["z"].float()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        zero.optim.eval()
        out["eval"] = "moved"
    except (ValueError, RuntimeError) as e:
        out["eval"] = f"{type(e).__name__}: {e}"
    out["training"] = zero.optim.training
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return out


def scenario_partition_refusals(rank, tmpdir, backend):
    """What cannot see whole params where it is given one rank's part as plain tensors, refused with its reason:
    FSDP1 (FullyShardedDataParallel, use_orig_params) with schedule-free lr="polyak" (at construction) and
    AdamTied.gradient_snr (after a step; each rank returned its part's mean), and LowRankSGD built by
    ZeroRedundancyOptimizer (a layer's U, S, V split, its rank buffer stale on other ranks)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import momentum_fused as mf
    from momentum_fused import lowrank

    def error(fn):
        try:
            fn()
            return "no error"
        except ValueError as e:
            return str(e)

    out = {}
    model = FSDP1(_make_model(torch.float64), device_id=torch.device("cpu"), use_orig_params=True)
    out["fsdp1_polyak"] = error(lambda: mf.SGDScheduleFree(model.parameters(), lr="polyak", backend=backend))
    opt = mf.AdamTied(model.parameters(), lr=0.01, beta=0.9, backend=backend)
    x, y = _batches(torch.float64)[0]
    _train_step(model, opt, _half(x, rank), _half(y, rank))
    out["fsdp1_snr"] = error(opt.gradient_snr)
    out["zero_lowrank"] = error(lambda: ZeroRedundancyOptimizer(
        list(_lowrank_model().parameters()), optimizer_class=lowrank.LowRankSGD, lr=0.05))
    return out


_KINDS = {"train": scenario_train, "step_comm": scenario_step_comm, "checkpoint": scenario_checkpoint,
          "zero": scenario_zero, "zero_polyak": scenario_zero_polyak, "zero_sf_eval": scenario_zero_sf_eval}


def scenario_bad_grad(rank, tmpdir, backend):
    """A DTensor param whose .grad is a plain tensor of the global shape: step() raises before
    anything changes (the local shards would not line up element by element)."""
    import torch

    model = _fsdp(_make_model(torch.float64))
    params = list(model.parameters())
    opt = _make_opt("adamw", params, backend)
    x, y = _batches(torch.float64, 1)[0]
    _train_step(model, opt, _half(x, rank), _half(y, rank))  # one good step: state exists
    opt.zero_grad()
    ((model(_half(x, rank)) - _half(y, rank)) ** 2).mean().backward()
    before = [p.to_local().clone() for p in params] + [v.to_local().clone() for p in params
                                                        for k, v in sorted(opt.state[p].items()) if k != "step"]
    params[0].grad = torch.ones(params[0].shape, dtype=torch.float64)
    try:
        opt.step()
        message = None
    except RuntimeError as e:
        message = str(e)
    after = [p.to_local().clone() for p in params] + [v.to_local().clone() for p in params
                                                       for k, v in sorted(opt.state[p].items()) if k != "step"]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    steps = [float(opt.state[p]["step"]) for p in params]
    return dict(message=message, unchanged=unchanged, steps=steps)


_KINDS["bad_grad"] = scenario_bad_grad


def _lowrank_model(seed=0):
    import torch
    from torch import nn

    from momentum_fused import lowrank

    torch.manual_seed(seed)
    return nn.Sequential(lowrank.LowRankLinear(6, 8, rank=2, max_rank=3), nn.Tanh(), nn.Linear(8, 1)).double()


def _lowrank_run(model, wrapped, rank_slice, backend):
    """LowRankSGD (dense params through the `backend`) over STEPS steps; returns W = U S V^T per low-rank
    layer, its rank, and the dense params."""
    import torch

    from momentum_fused import lowrank

    opt = lowrank.LowRankSGD(model.parameters(), lr=0.05, momentum=0.9, tau=0.05, backend=backend)
    for x, y in _batches(torch.float64):
        if rank_slice is not None:
            x, y = _half(x, rank_slice), _half(y, rank_slice)
        opt.zero_grad()
        torch.nn.functional.mse_loss(wrapped(x), y).backward()
        opt.step()
    lr_layer = model[0]
    r = lr_layer.r
    w = lr_layer.U[:, :r] @ lr_layer.S[:r, :r] @ lr_layer.V[:, :r].T
    return dict(W=w.detach().clone(), r=r, dense=[p.detach().clone() for p in model[2].parameters()])


def scenario_lowrank_ddp(rank, tmpdir, backend):
    """LowRankSGD on a DDP-wrapped model (grads of U, S, V all-reduced by DDP) vs one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref_model = _lowrank_model()
    ref = _lowrank_run(ref_model, ref_model, None, backend)
    model = _lowrank_model()
    dist = _lowrank_run(model, DDP(model), rank, backend)
    return dict(ref=ref, dist=dist)


_KINDS["lowrank_ddp"] = scenario_lowrank_ddp
_KINDS["partition_refusals"] = scenario_partition_refusals
_KINDS["zero_sf_edges"] = scenario_zero_sf_edges


def scenario_zero_tied_beta(rank, tmpdir, backend):
    """AdamTied under ZeroRedundancyOptimizer with a `beta` written into ZeRO's group, later `betas`: ZeRO copies its
    groups' keys into AdamTied's before every step, so the `beta` it kept (its defaults give it one too) overrode
    every later betas write (a review, 2026-12-07). Against one process doing the same writes on the whole batch."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import momentum_fused as mf

    def run(make, wrap, split):
        model = _make_model(torch.float64)
        opt = make(list(model.parameters()))
        net = wrap(model)
        for s, (x, y) in enumerate(_batches(torch.float64)):
            if s == 0:
                opt.param_groups[0]["betas"] = (0.8, 0.8)  # (before the first step: ZeRO's default beta must not
            if s == 2:  # win over it)
                opt.param_groups[0]["beta"] = 0.5
            if s == 4:
                opt.param_groups[0]["betas"] = (0.3, 0.3)
            _train_step(net, opt, *((_half(x, rank), _half(y, rank)) if split else (x, y)))
        return [p.detach().clone() for p in model.parameters()], tuple(opt.param_groups[0]["betas"])

    make = lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=functools.partial(mf.AdamTied, backend=backend),
                                              lr=0.01, beta=0.9)
    ref = run(lambda ps: mf.AdamTied(ps, lr=0.01, beta=0.9, backend=backend), lambda m: m, False)
    got = run(make, DDP, True)
    # a step that raises after AdamTied planned it (a post hook here; an OOM in the update): the beta written before
    # it is kept (ZeRO copies betas back only after a step returns), and so is a betas given to a group ZeRO adds
    model = _make_model(torch.float64)
    ps = list(model.parameters())
    opt = make(ps[:-2])
    opt.add_param_group({"params": ps[-2:-1], "betas": (0.7, 0.7)})
    opt.param_groups[0]["beta"] = 0.6
    hook = opt.optim.register_step_post_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("once")))
    x, y = next(iter(_batches(torch.float64)))
    try:
        _train_step(DDP(model), opt, _half(x, rank), _half(y, rank))
    except RuntimeError:
        pass
    hook.remove()
    opt.add_param_group({"params": ps[-1:], "beta": 0.99})  # (its own beta beside ZeRO's defaults' betas)
    opt.param_groups[2]["betas"] = (0.5, 0.5)  # (before the group's first step: ZeRO's copy of its beta must not win)
    _train_step(DDP(model), opt, _half(x, rank), _half(y, rank))
    after_raise = [tuple(g["betas"]) for g in opt.param_groups] + [tuple(g["betas"]) for g in opt.optim.param_groups]
    # a beta written, then a checkpoint loaded: consolidate_state_dict had copied the beta into AdamTied's group,
    # and ZeRO's load does not remove it; the loaded betas must win, as in one process (a review, 2026-12-08)
    model = _make_model(torch.float64)
    opt = make(list(model.parameters()))
    _train_step(DDP(model), opt, _half(x, rank), _half(y, rank))
    opt.consolidate_state_dict(0)
    box = [opt.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, 0)
    opt.param_groups[0]["beta"] = 0.5
    opt.consolidate_state_dict(0)  # (a save after the write)
    opt.load_state_dict(box[0])
    _train_step(DDP(model), opt, _half(x, rank), _half(y, rank))
    after_load = [tuple(opt.param_groups[0]["betas"]), tuple(opt.optim.param_groups[0]["betas"])]
    return dict(ref=ref, got=got, after_raise=after_raise, after_load=after_load)


_KINDS["zero_tied_beta"] = scenario_zero_tied_beta


def _int8_model(dtype, seed=0):
    """Two layers: the first's weight (17 x 256) has rows of whole 256-element blocks and is quantized under the
    int8 layouts, sharded 9 / 8 rows by FSDP2 (each shard under 4096 elements: the decision is the global
    tensor's); the rest keeps fp32 state."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 17), nn.Tanh(), nn.Linear(17, 3)).to(dtype)


def _int8_job(layout, backend, one_row_layer=False):
    """(build, steps) of the AdamW runs of the compressed-layout checkpoint scenarios: ``build(sharded, seed)``
    makes _int8_model (fp32 params for int8_state, else bf16; ``one_row_layer``: then a Linear(3, 1), whose shard
    on rank 1 is empty), FSDP2-sharded or not, and its optimizer; ``steps(model, opt, ts)`` trains it on steps
    ``ts`` of one fixed batch sequence (every rank the whole batch: sharded equals one process bit for bit)."""
    import torch

    import momentum_fused as mf

    dtype = torch.float32 if layout == "int8_state" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    outs = 1 if one_row_layer else 3
    data = [(torch.randn(GLOBAL_BATCH, 256, generator=gen).to(dtype), torch.randn(GLOBAL_BATCH, outs, generator=gen)
             .to(dtype)) for _ in range(STEPS)]

    def build(sharded, seed=0):
        model = _int8_model(dtype, seed)
        if one_row_layer:
            model.append(torch.nn.Tanh())
            model.append(torch.nn.Linear(3, 1).to(dtype))
        model = _fsdp(model) if sharded else model
        return model, mf.AdamW(list(model.parameters()), lr=0.01, weight_decay=0.1, layout=layout, backend=backend)

    def steps(model, opt, ts):
        for t in ts:
            x, y = data[t]
            opt.zero_grad()
            ((model(x) - y).float() ** 2).mean().backward()
            opt.step()

    return build, steps


def scenario_int8_fsdp(rank, tmpdir, layout, backend, steps=STEPS):
    """int8_state (fp32) or master16_int8 (bf16) under FSDP2 vs one process. Every rank trains on the WHOLE batch,
    so the averaged gradient is exactly the single process's ((g + g) / 2 = g) and the runs agree bit for bit: a
    block cut by a shard, or scales of the wrong rows, would show as a difference of a whole code."""
    import torch

    import momentum_fused as mf

    dtype = torch.float32 if layout == "int8_state" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(GLOBAL_BATCH, 256, generator=gen).to(dtype), torch.randn(GLOBAL_BATCH, 3, generator=gen)
             .to(dtype)) for _ in range(steps)]

    def run(model, wrapped):
        params = list(model.parameters())
        opt = mf.AdamW(params, lr=0.01, weight_decay=0.1, layout=layout, backend=backend)
        for x, y in data:
            opt.zero_grad()
            ((wrapped(x) - y).float() ** 2).mean().backward()
            opt.step()
        return opt, params

    ref_opt, ref_params = run(*(2 * (_int8_model(dtype),)))
    model = _int8_model(dtype)
    opt, params = run(model, _fsdp(model))
    codes = [str(v.dtype) for p in params for k, v in sorted(opt.state[p].items()) if k != "step"]
    return dict(dist=_snapshot(opt, params), ref=_snapshot(ref_opt, ref_params), codes=codes,
                local_numels=[p.to_local().numel() for p in params])


_KINDS["int8_fsdp"] = scenario_int8_fsdp


def scenario_int8_checkpoint(rank, tmpdir, layout, backend, save_after=2):
    """torch.distributed.checkpoint (DCP) of an FSDP2 model + optimizer in an int8 layout: the codes, their
    (rows, blocks per row) scales and the master remainder are saved as DTensors, loaded into a fresh model and
    optimizer (another init) and continued: vs the uninterrupted run, bit for bit."""
    ckpt = os.path.join(tmpdir, f"ckpt-int8-{layout}-{backend}")
    make, steps = _int8_job(layout, backend)

    def build(seed=0):
        return make(True, seed)

    m_a, o_a = build()
    steps(m_a, o_a, range(STEPS))
    uninterrupted = _snapshot(o_a, list(m_a.parameters()))
    # (warm=1: the fresh optimizer holds live state of the layout, which the load must overwrite too)
    saved, resumed, loaded_is_dtensor = _dcp_resume(build, steps, ckpt, save_after, warm=1)
    return dict(uninterrupted=uninterrupted, resumed=resumed, saved=sorted(f"{k}:{t}:{d}" for k, t, d in saved),
                loaded_is_dtensor=loaded_is_dtensor)


_KINDS["int8_ckpt"] = scenario_int8_checkpoint


def scenario_int8_reshard(rank, tmpdir, layout, backend, save_after=2):
    """DCP resharding of an int8-layout checkpoint between FSDP2 (2 ranks) and one process, both ways. The
    quantized weight (17 x 256) has rows of whole blocks, so its blocks are the same under FSDP2 and in one
    process, and its scales must have one shape in both: (rows, blocks per row). "to_one": the FSDP2 run saves
    with DCP; rank 0 alone loads it into a plain model and optimizer (``no_dist``) and continues on the whole
    batch. "from_one": rank 0 alone trains a plain model, saves it with DCP (``no_dist``); both ranks load it into
    FSDP2 and continue. Both against the uninterrupted FSDP2 run (which equals one process bit for bit:
    scenario_int8_fsdp), bit for bit."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    build, steps = _int8_job(layout, backend)

    def load(model, opt, path, no_dist):
        steps(model, opt, range(1))  # live state of the layout, which the load must overwrite
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        steps(model, opt, range(save_after, STEPS))
        return model, opt

    m_a, o_a = build(True)
    steps(m_a, o_a, range(STEPS))
    out = dict(uninterrupted=_snapshot(o_a, list(m_a.parameters())))
    # FSDP2 -> one process
    to_one = os.path.join(tmpdir, f"reshard-to-one-{layout}-{backend}")
    m_b, o_b = build(True)
    steps(m_b, o_b, range(save_after))
    dcp.save({"model": get_model_state_dict(m_b), "optim": get_optimizer_state_dict(m_b, o_b)}, checkpoint_id=to_one)
    dist.barrier()
    if rank == 0:
        try:
            m_c, o_c = load(*build(False, seed=123), to_one, no_dist=True)
            out["to_one"] = _snapshot(o_c, list(m_c.parameters()))
        except Exception:
            out["to_one_error"] = traceback.format_exc()
    # one process -> FSDP2
    from_one = os.path.join(tmpdir, f"reshard-from-one-{layout}-{backend}")
    if rank == 0:
        m_d, o_d = build(False)
        steps(m_d, o_d, range(save_after))
        dcp.save({"model": get_model_state_dict(m_d), "optim": get_optimizer_state_dict(m_d, o_d)},
                 checkpoint_id=from_one, no_dist=True)
    dist.barrier()
    m_e, o_e = load(*build(True, seed=123), from_one, no_dist=False)
    out["from_one"] = _snapshot(o_e, list(m_e.parameters()))
    return out


_KINDS["int8_reshard"] = scenario_int8_reshard


def scenario_int8_convert(rank, tmpdir, layout, backend, save_after=2):
    """Switching layouts under FSDP2 (2 ranks, 9 / 8 rows): an optimizer in ``layout`` (codes) trains, and a new
    one in the layout without codes loads its sharded state dict (``load_state_dict``, every rank its shard) and
    continues; then the reverse. Each against the same switch in one process, bit for bit (every rank trains on
    the whole batch). Also DCP: the switched run's checkpoint, loaded in place into a fresh FSDP2 optimizer of
    the checkpoint's layout, then into one of the other."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import momentum_fused as mf

    other = {"int8_state": "native", "master16_int8": "master16"}[layout]
    make, steps = _int8_job(layout, backend)

    def switch(sharded, first, then):
        model, _ = make(sharded)
        a = mf.AdamW(list(model.parameters()), lr=0.01, weight_decay=0.1, layout=first, backend=backend)
        steps(model, a, range(save_after))
        b = mf.AdamW(list(model.parameters()), lr=0.01, weight_decay=0.1, layout=then, backend=backend)
        b.load_state_dict(a.state_dict())
        steps(model, b, range(save_after, STEPS))
        return model, b

    out = {}
    for first, then in ((layout, other), (other, layout)):
        m, o = switch(True, first, then)
        r_m, r_o = switch(False, first, then)
        out[f"{first}->{then}"] = dict(dist=_snapshot(o, list(m.parameters())),
                                       ref=_snapshot(r_o, list(r_m.parameters())))
    # DCP: a checkpoint in `layout`, loaded into the same layout, then converted to `other` on the shards
    ckpt = os.path.join(tmpdir, f"convert-{layout}-{backend}")
    m_a, o_a = make(True)
    steps(m_a, o_a, range(save_after))
    dcp.save({"optim": get_optimizer_state_dict(m_a, o_a)}, checkpoint_id=ckpt)
    m_b, _ = make(True)
    m_b.load_state_dict(m_a.state_dict())
    o_b = mf.AdamW(list(m_b.parameters()), lr=0.01, weight_decay=0.1, layout=layout, backend=backend)
    sd = {"optim": get_optimizer_state_dict(m_b, o_b)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_optimizer_state_dict(m_b, o_b, sd["optim"])
    o_c = mf.AdamW(list(m_b.parameters()), lr=0.01, weight_decay=0.1, layout=other, backend=backend)
    o_c.load_state_dict(o_b.state_dict())
    steps(m_b, o_c, range(save_after, STEPS))
    out["dcp"] = _snapshot(o_c, list(m_b.parameters()))
    return out


_KINDS["int8_convert"] = scenario_int8_convert


def scenario_master16_full_state_dict(rank, tmpdir, layout, backend, save_after=2):
    """A full (gathered) optimizer state dict of an FSDP2 run in a compressed layout (master16, master16_int8,
    int8_state); in the master16 layouts the remainder is saved as its bytes (uint8), which gloo gathers (it has
    no int16 collective: this failed before). Also gathered to rank 0's CPU (cpu_offload) and broadcast back
    from rank 0 (broadcast_from_rank0), the other ranks passing {}. Loaded into one process
    (rank 0, load_state_dict) and back into FSDP2 (set_optimizer_state_dict with full_state_dict), each
    continues as the uninterrupted run, bit for bit. The last layer has one row, so rank 1's shards of it are
    empty (their bytes view has no elements)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    build, steps = _int8_job(layout, backend, one_row_layer=True)

    m_a, o_a = build(True)
    steps(m_a, o_a, range(STEPS))
    out = dict(uninterrupted=_snapshot(o_a, list(m_a.parameters())))
    m_b, o_b = build(True)
    steps(m_b, o_b, range(save_after))
    full = StateDictOptions(full_state_dict=True)
    msd, osd = get_model_state_dict(m_b, options=full), get_optimizer_state_dict(m_b, o_b, options=full)
    out["saved"] = sorted({f"{k}:{type(v).__name__}:{v.dtype}:{tuple(v.shape)}" for st in osd["state"].values()
                           for k, v in _flat_state(st) if isinstance(v, torch.Tensor) and v.dim() > 0})
    if rank == 0:  # one process: a plain model, torch's state-dict helpers (FQN keys)
        m_c, o_c = build(False, seed=123)
        set_model_state_dict(m_c, msd)  # (copies, as from a file: a load aliases same-dtype state, as torch's)
        set_optimizer_state_dict(m_c, o_c, copy.deepcopy(osd))
        steps(m_c, o_c, range(save_after, STEPS))
        out["one_process"] = _snapshot(o_c, list(m_c.parameters()))
    m_d, o_d = build(True, seed=123)
    steps(m_d, o_d, range(1))  # live state, which the load overwrites
    set_model_state_dict(m_d, msd, options=full)
    set_optimizer_state_dict(m_d, o_d, osd, options=full)
    steps(m_d, o_d, range(save_after, STEPS))
    out["fsdp"] = _snapshot(o_d, list(m_d.parameters()))
    # the CPU-offloaded gather (rank 0 holds it, the others get {}) broadcast back from rank 0
    off = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_model_state_dict(m_b, options=off), get_optimizer_state_dict(m_b, o_b, options=off)
    m_e, o_e = build(True, seed=123)
    steps(m_e, o_e, range(1))
    bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(m_e, msd, options=bcast)
    set_optimizer_state_dict(m_e, o_e, osd, options=bcast)
    steps(m_e, o_e, range(save_after, STEPS))
    out["broadcast"] = _snapshot(o_e, list(m_e.parameters()))
    return out


_KINDS["master16_full"] = scenario_master16_full_state_dict


def scenario_sr_shards(rank, tmpdir, backend, steps=STEPS, layout="bf16_sr"):
    """bf16_sr on DTensor shards: a (4, 64) bf16 param whose two row halves are equal, with equal gradients, split
    2 / 2 rows by Shard(0), and a replicated copy. The shards index their elements from 0, so with one key per
    tensor both halves drew the same random bits and stayed equal; the shard's global offset is in its key now.
    Also returns a one-process run of the same param (its rows 0-1 are the origin shard's: the same key).
    ``layout="int8_sr"``: the same with a (16, 256) fp32 param (quantized: each shard 8 rows of one block) and the
    exp_avg codes returned too."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import momentum_fused as mf

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(3)
    rows, cols, dtype = (2, 64, torch.bfloat16) if layout == "bf16_sr" else (8, 256, torch.float32)
    half = torch.randn(rows, cols, generator=gen)
    init = torch.cat([half, half]).to(dtype)
    grads = []
    for _ in range(steps):
        g = torch.randn(rows, cols, generator=gen) * 1e-2
        grads.append(torch.cat([g, g]).to(dtype))

    def full(t):
        t = t.detach()
        return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()

    def run(make):
        p = make(init.clone()).requires_grad_()
        opt = mf.AdamW([p], lr=1e-3, layout=layout, sr_seed=7, backend=backend)
        for g in grads:
            p.grad = make(g.clone())
            opt.step()
        return full(p) if layout == "bf16_sr" else (full(p), full(opt.state[p]["exp_avg"]))

    return dict(sharded=run(lambda t: distribute_tensor(t, mesh, [Shard(0)])),
                replicated=run(lambda t: distribute_tensor(t, mesh, [Replicate()])),
                one=run(lambda t: t))


_KINDS["sr_shards"] = scenario_sr_shards


def scenario_zero_int8_resume(rank, tmpdir, backend, save_after=2):
    """ZeroRedundancyOptimizer over an int8_state AdamW under DDP: consolidate, save, load into a fresh ZeRO and
    continue, against the uninterrupted run, bit for bit. ZeRO's load writes ``optim.state[p]`` itself (not
    through our load_state_dict), so the checkpoint's codes (``{name: {"codes": t}}``) reach the live state: the
    next step refused the state as partial."""
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import momentum_fused as mf

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(GLOBAL_BATCH, 256, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen))
            for _ in range(STEPS)]

    def build(seed=0):
        model = _int8_model(torch.float32, seed)
        return model, DDP(model), ZeroRedundancyOptimizer(
            list(model.parameters()), optimizer_class=functools.partial(mf.AdamW, layout="int8_state",
                                                                        backend=backend), lr=0.01)

    def steps(ddp, opt, ts):
        for t in ts:
            x, y = data[t]
            opt.zero_grad()
            ((ddp(_half(x, rank)) - _half(y, rank)) ** 2).mean().backward()
            opt.step()

    m_a, d_a, z_a = build()
    steps(d_a, z_a, range(STEPS))
    m_b, d_b, z_b = build()
    steps(d_b, z_b, range(save_after))
    z_b.consolidate_state_dict(to=0)
    path = os.path.join(tmpdir, f"zero-int8-{backend}.pt")
    if rank == 0:
        torch.save(z_b.state_dict(), path)
    dist.barrier()
    m_c, d_c, z_c = build(seed=5)
    m_c.load_state_dict(m_b.state_dict())
    z_c.load_state_dict(torch.load(path, weights_only=False))
    steps(d_c, z_c, range(save_after, STEPS))
    return dict(uninterrupted=[p.detach().clone() for p in m_a.parameters()],
                resumed=[p.detach().clone() for p in m_c.parameters()])


_KINDS["zero_int8_resume"] = scenario_zero_int8_resume


def _muon_groups(params):
    """Muon's param groups of these tests: the weight matrices by Muon, the biases by its aux AdamW."""
    return [dict(params=[p for p in params if p.dim() >= 2]),
            dict(params=[p for p in params if p.dim() < 2], use_muon=False, lr=0.01)]


def scenario_muon_bf16_fsdp(rank, tmpdir, backend, ns_algorithm="standard"):
    """Muon with bf16 Newton-Schulz on the float32 MLP (uneven shards, an empty one on rank 1) under FSDP2 vs one
    process, and vs FSDP2 with an fp32 update work buffer and collectives forced to carry its dtype (the path
    before the wire carried the NS dtype and before the update was kept in it: ``phases._wire_dtype`` and
    ``specs_muon.update_dtype`` patched). Every rank trains on the WHOLE batch, so the averaged
    gradient is exactly the single process's ((g + g) / 2 = g) and the three runs must agree bit for bit. Records
    every collective of the NS phase's kinds (gather, scatter, all_to_all, all_to_all_single) issued inside
    ``step()``: its name, the dtypes and the element counts of its tensor arguments (all_to_all_single: output,
    input)."""
    import torch
    import torch.distributed as dist

    import momentum_fused as mf
    from momentum_fused.optim import phases

    data = _batches(torch.float32)

    def run(model, wrapped):
        params = list(model.parameters())
        opt = mf.Muon(_muon_groups(params), lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16,
                      ns_algorithm=ns_algorithm, backend=backend)
        wire = []
        real = {name: getattr(dist, name) for name in ("gather", "scatter", "all_to_all", "all_to_all_single")}

        def spy(name):
            def call(*args, **kwargs):
                ts = [t for t in args if isinstance(t, torch.Tensor)]
                wire.append((name, tuple(str(t.dtype) for t in ts), tuple(t.numel() for t in ts)))
                return real[name](*args, **kwargs)
            return call

        layouts = []  # the steps that derived the exchange's owners and splits (the others reuse them)
        real_layout = phases._exchange_layout
        for t, (x, y) in enumerate(data):
            opt.zero_grad()
            ((wrapped(x) - y) ** 2).mean().backward()
            for name in real:
                setattr(dist, name, spy(name))
            phases._exchange_layout = lambda *a, t=t: (layouts.append(t), real_layout(*a))[1]
            try:
                opt.step()
            finally:
                for name, fn in real.items():
                    setattr(dist, name, fn)
                phases._exchange_layout = real_layout
        wire.append(("exchange layouts derived at steps", tuple(layouts), ()))
        return _snapshot(opt, params), wire

    ref, ref_wire = run(*(2 * (_make_model(torch.float32),)))
    model = _make_model(torch.float32)
    got, wire = run(model, _fsdp(model))
    local_numels = [p.to_local().numel() for p in model.parameters()]
    from momentum_fused import specs_muon
    own_dtype, own_update = phases._wire_dtype, specs_muon.update_dtype
    phases._wire_dtype = lambda phase, group, dtype, device: dtype
    specs_muon.update_dtype = lambda group, dtype, device: dtype
    try:
        model = _make_model(torch.float32)
        old, old_wire = run(model, _fsdp(model))
    finally:
        phases._wire_dtype, specs_muon.update_dtype = own_dtype, own_update
    return dict(ref=ref, dist=got, old=old, ref_wire=ref_wire, wire=wire, old_wire=old_wire, local_numels=local_numels)


_KINDS["muon_bf16_fsdp"] = scenario_muon_bf16_fsdp


def scenario_muon_bad_split(rank, tmpdir, backend):
    """A Shard(0) DTensor matrix whose rows are not torch.chunk's split (3 / 4 of 7 rows, FSDP2 gives 4 / 3): the
    NS phase exchanges rows in that split, so step() raises on every rank before anything changes (no state is
    created, the param keeps its values)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import momentum_fused as mf

    mesh = init_device_mesh("cpu", (WORLD,))
    rows = [3, 4][rank]
    gen = torch.Generator().manual_seed(rank)
    local = torch.randn(rows, 6, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(7, 6),
                                              stride=(6, 1)))
    p.grad = DTensor.from_local(torch.ones(rows, 6, dtype=torch.float64), mesh, [Shard(0)], run_check=False,
                                shape=(7, 6), stride=(6, 1))
    opt = mf.Muon([p], lr=0.02, ns_dtype=torch.float64, backend=backend)
    try:
        opt.step()
        message = None
    except NotImplementedError as e:
        message = str(e)
    return dict(message=message, unchanged=torch.equal(p.to_local(), local), state=len(opt.state))


_KINDS["muon_bad_split"] = scenario_muon_bad_split


def _muon_sharded_vs_one_process(mesh, init, grads, backend, flatten=None, placements=None, **kw) -> dict:
    """Muon (fp32 NS; ``kw``: more of its keywords) over params ``init`` stepped with ``grads`` (one list per step):
    as plain tensors (ref) and as DTensors on ``mesh`` (dist: ``placements``, default [Shard(0)]), each run's
    snapshot, and the number of ``all_to_all_single`` calls of the sharded run (exchanges). ``flatten``: the group's
    flag written before each step (one per step), or None."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    import momentum_fused as mf

    placements = placements or [Shard(0)]

    def run(sharded):
        put = (lambda t: distribute_tensor(t.clone(), mesh, placements)) if sharded else (lambda t: t.clone())
        ps = [torch.nn.Parameter(put(x)) for x in init]
        opt = mf.Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, backend=backend, **kw)
        for k, gs in enumerate(grads):
            if flatten is not None:
                opt.param_groups[0]["flatten"] = flatten[k]
            for p, g in zip(ps, gs):
                p.grad = put(g)
            opt.step()
        return _snapshot(opt, ps)

    real, calls = dist.all_to_all_single, []
    dist.all_to_all_single = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        sharded = run(True)
    finally:
        dist.all_to_all_single = real
    return dict(ref=run(False), dist=sharded, exchanges=len(calls))


def scenario_muon_mixed_dtypes(rank, tmpdir, backend):
    """One Muon group of bf16 and fp32 matrices (a bf16 one first), NS in float32, as Shard(0) DTensors (FSDP2's
    placement, by distribute_tensor) against one process, bit for bit: each update crosses the wire in its own
    dtype (bf16 updates stay bf16 under an fp32 NS, fp32 ones stay fp32), one send buffer per mesh and dtype. A
    single buffer in the first param's dtype would round the fp32 updates to bf16 in transit."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(3)
    kinds = [((7, 6), torch.bfloat16), ((5, 7), torch.float32), ((9, 4), torch.float32), ((3, 8), torch.bfloat16)]
    init = [torch.randn(s, generator=gen).to(dt) for s, dt in kinds]
    grads = [[torch.randn(s, generator=gen).to(dt) for s, dt in kinds] for _ in range(STEPS)]
    return _muon_sharded_vs_one_process(mesh, init, grads, backend)


_KINDS["muon_mixed_dtypes"] = scenario_muon_mixed_dtypes


def scenario_muon_empty(rank, tmpdir, backend):
    """Muon matrices with 0 rows or 0 columns among others, as Shard(0) DTensors against one process: the owner
    of an empty matrix crashed in the NS exchange (a reshape(-1, 0, n)) while the other rank waited in it."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 3), (0, 4), (3, 0), (6, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    return _muon_sharded_vs_one_process(mesh, init, grads, backend)


_KINDS["muon_empty"] = scenario_muon_empty


def scenario_muon_experts(rank, tmpdir, backend, mixed=False, toggle=False):
    """``flatten=False``: params of 3 and 4 dims (stacked experts) as batches of matrices, as Shard(0) DTensors
    against one process: 5 experts over 2 ranks (3 and 2), 1 (one rank holds none), and a 4-D param. Each shard
    holds whole matrices, so no row is exchanged (``exchanges``: 0); with ``mixed`` a 2-D matrix beside them takes
    the exchange as before. ``toggle``: the flag written False, True, False... before each step (its first
    version kept the exchange's layout of the other flag: a crash, or, where the splits happened to fit, a 2-D
    matrix stepped without its Newton-Schulz); a (2, 3, 4) and a (2, 12) param are the latter case."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 6, 4), (1, 4, 7), (3, 2, 5, 3)] + ([(7, 5)] if mixed else []) + \
        ([(2, 3, 4), (2, 12)] if toggle else [])
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    return _muon_sharded_vs_one_process(mesh, init, grads, backend, [k % 2 == 1 for k in range(STEPS)]
                                        if toggle else [False] * STEPS)


_KINDS["muon_experts"] = scenario_muon_experts


def scenario_muon_hsdp(rank, tmpdir, backend, shard_dim):
    """Muon on a 2-D mesh as HSDP places params: Shard(0) on one mesh dim, Replicate on the other (here (1, 2) with
    (Replicate, Shard(0)) and (2, 1) with (Shard(0), Replicate): 2 processes; a 2x2 mesh runs the same code with
    each replica's shard group exchanging its own copy). The exchange runs in the group of the sharding mesh dim
    (it was refused: only 1-D meshes), equal to one process bit for bit; 2-D and 3-D (flatten=False) params."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (1, WORLD) if shard_dim == 1 else (WORLD, 1))
    placements = [Replicate(), Shard(0)] if shard_dim == 1 else [Shard(0), Replicate()]
    gen = torch.Generator().manual_seed(6)
    shapes = [(7, 5), (16, 8), (1, 4), (3, 4, 5)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    out = _muon_sharded_vs_one_process(mesh, init, grads, backend, flatten=[False] * STEPS, placements=placements)
    out["placements"] = [type(pl).__name__ for pl in placements]
    return out


_KINDS["muon_hsdp"] = scenario_muon_hsdp


def scenario_muon_chunks(rank, tmpdir, backend):
    """Muon (bf16 NS) under FSDP2 with one matrix per NS call (``max_batch_bytes=1`` patched into the spec, as
    tests/test_muon.py does): an owner's matrices of one shape take several calls, whose results must go back
    to the right rows. Six weights (7x6, four 7x7, 1x7); every rank trains on the WHOLE batch, so the run must
    equal one process's (patched the same) bit for bit. Records the stacks the NS gets in the FSDP2 run."""
    import dataclasses

    import torch
    from torch import nn

    import momentum_fused as mf
    import momentum_fused.specs_muon as sm
    from momentum_fused.specs import SPECS

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), *[m for _ in range(4) for m in (nn.Linear(7, 7), nn.Tanh())],
                             nn.Linear(7, 1))

    data = _batches(torch.float32)
    spec, real_ns = SPECS["muon"], sm.newton_schulz
    SPECS["muon"] = dataclasses.replace(spec, phases=tuple(dataclasses.replace(ph, max_batch_bytes=1)
                                                           if hasattr(ph, "fn") else ph for ph in spec.phases))
    stacks = []

    def spy(x, *args, **kwargs):
        stacks.append(tuple(x.shape))
        return real_ns(x, *args, **kwargs)

    def run(model, wrapped):
        params = list(model.parameters())
        opt = mf.Muon(_muon_groups(params), lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16, backend=backend)
        for x, y in data:
            opt.zero_grad()
            ((wrapped(x) - y) ** 2).mean().backward()
            opt.step()
        return _snapshot(opt, params)

    try:
        ref = run(*(2 * (make(),)))
        model = make()
        sm.newton_schulz = spy
        got = run(model, _fsdp(model))
    finally:
        SPECS["muon"], sm.newton_schulz = spec, real_ns
    return dict(ref=ref, dist=got, stacks=stacks, steps=len(data))


_KINDS["muon_chunks"] = scenario_muon_chunks


def scenario_gradient_snr(rank, tmpdir, layout, backend, steps=4):
    """AdamTied.gradient_snr() under FSDP2 and in one process: a (8, 1024) weight whose rows split evenly over the
    ranks (DTensor's own mean() of it is a Partial average: each rank read its shard's mean), uneven layers after
    it, and the int8 layouts' codes on the first weight (8192 elements, whole blocks per shard; float32 params, which
    those layouts take)."""
    import torch
    from torch import nn

    import momentum_fused as mf

    dtype = torch.float64 if layout == "native" else torch.float32

    def model_():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1024, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(GLOBAL_BATCH, 1024, generator=gen, dtype=dtype),
             torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=dtype)) for _ in range(steps)]

    def run(model, wrapped, part):
        opt = mf.AdamTied(model.parameters(), lr=0.01, beta=0.9, layout=layout, backend=backend)
        for x, y in data:
            opt.zero_grad()
            ((wrapped(part(x)) - part(y)) ** 2).mean().backward()
            opt.step()
        snr = opt.gradient_snr()
        return [snr[p] for p in model.parameters()]

    model = model_()
    ref = run(model, model, lambda t: t)
    model = model_()
    wrapped, inner = _wrap("fsdp", model)
    return dict(dist=run(inner, wrapped, lambda t: _half(t, rank)), ref=ref)


_KINDS["gradient_snr"] = scenario_gradient_snr


def scenario_strided_reductions(rank, tmpdir, backend, steps=4):
    """The whole-tensor reductions (AdamTied.gradient_snr, the Polyak step's inner products) of a param placed as
    FSDP2 places a tensor-parallel one, _StridedShard(0) (its is_shard() is False: the reductions left its mesh dim
    out and each rank used its own shard's sums), against the same param as a plain tensor in one process."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import momentum_fused as mf

    mesh = init_device_mesh("cpu", (WORLD,))
    placed = [_StridedShard(0, split_factor=2)]
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(8, 4, generator=gen, dtype=torch.float64) for _ in range(steps)]

    def run(make, sharded):
        p = torch.nn.Parameter(distribute_tensor(init.clone(), mesh, placed) if sharded else init.clone())
        opt = make([p])
        for i, g in enumerate(grads):
            def closure(g=g, i=i):
                p.grad = distribute_tensor(g.clone(), mesh, placed) if sharded else g.clone()
                return torch.tensor(1.0 / (i + 1), dtype=torch.float64)
            opt.step(closure)
        snr = opt.gradient_snr()[p] if hasattr(opt, "gradient_snr") else None
        return dict(param=_full(p), snr=snr, placements=[type(pl).__name__ for pl in p.placements] if sharded else None)

    makers = dict(adamtied=lambda ps: mf.AdamTied(ps, lr=0.01, beta=0.9, backend=backend),
                  sf_sgd_polyak=lambda ps: mf.SGDScheduleFree(ps, lr="polyak", momentum=0.9, polyak_max_lr=5.0,
                                                              backend=backend))
    return {name: dict(dist=run(make, True), ref=run(make, False)) for name, make in makers.items()}


_KINDS["strided_reductions"] = scenario_strided_reductions


def scenario_sparse_fsdp(rank, tmpdir, opt_name, backend, steps=6):
    """FSDP2 with a changing set of params with gradients (experts a batch did not use: after the backward, the
    same params of every rank set to None, a different set each step), against the single-process run doing the
    same; and how many steps took the full plan (the cached plan keeps DTensor members without a gradient)."""
    import torch

    def drop(params, t):  # (all at step 0: every param gets state)
        for i, p in enumerate(params):
            if t > 0 and (i + t) % 3 == 0:
                p.grad = None

    def run(model, wrapped, x_of, y_of):
        params = list(model.parameters())
        opt = _make_opt(opt_name, params, backend)
        full = []
        real = opt._plan
        opt._plan = lambda: full.append(1) or real()
        for t, (x, y) in enumerate(_batches(torch.float64, steps)):
            opt.zero_grad()
            ((wrapped(x_of(x)) - y_of(y)) ** 2).mean().backward()
            drop(params, t)
            opt.step()
        return _snapshot(opt, params), len(full)

    ref, _ = run(*[_make_model(torch.float64)] * 2, lambda x: x, lambda y: y)
    model = _make_model(torch.float64)
    wrapped, inner = _wrap("fsdp", model)
    dist, full = run(inner, wrapped, lambda x: _half(x, rank), lambda y: _half(y, rank))
    return dict(dist=dist, ref=ref, full_plans=full)


_KINDS["sparse_fsdp"] = scenario_sparse_fsdp
