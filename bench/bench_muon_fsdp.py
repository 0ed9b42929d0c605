"""Host overhead of a Muon step under FSDP2 on the CPU: 2 gloo processes (torch.multiprocessing, spawn), one
thread each, a GPT-like stack of tiny matrices (default 12 blocks of 4 Linear(32, 32): 48 weight matrices in Muon's
group, their 48 biases in a ``use_muon=False`` group), so that a step is host work, not flops.

    python -m bench.bench_muon_fsdp                       # d=32, 12 blocks, 5 rounds of 30 steps
    python -m bench.bench_muon_fsdp --d 64 --blocks 6 --rounds 7
    python -m bench.bench_muon_fsdp --rounds 15 --cases "fsdp / ours; fsdp / ours, fp32 wire"
    python -m bench.bench_muon_fsdp --device cuda --world 1   # NCCL on one GPU: the host time on CUDA DTensors
    python -m bench.bench_muon_fsdp --shapes gpt --d 128 --blocks 4 \
        --cases "fsdp / ours, one round; fsdp / ours, a round per call"   # the exchange's rounds A/B

Cases, on the same model and gradients (one forward / backward, then only ``opt.step()`` is timed):
- fsdp: ``fully_shard`` per block and on the root (params, grads and state are Shard(0) DTensors):
  ours (bf16 Newton-Schulz, the collectives in bf16), ours with the exchange in one synchronous round and in one
  asynchronous round per NS call (``phases.ROUND_ELEMS`` 0 and 1: their "inside the collectives" is the time to
  issue them, the waits fall in the rest), ours with the collectives in fp32 (``phases._wire_dtype``
  patched: the path before they carried the NS dtype), ours without the timers, and torch.optim.Muon (weights)
  + torch.optim.AdamW(foreach=True) (biases): torch's Muon runs on DTensors through DTensor dispatch (it does
  not refuse them).
- plain: the unwrapped model in each process (no collectives): ours, and torch.optim.Muon + AdamW.
- AdamW only (every param, no Newton-Schulz, no collectives): the host overhead of an elementwise rule on the same
  DTensors: ours under FSDP2 and unwrapped, torch.optim.AdamW(foreach=True) and (fused=True) under FSDP2.

Ours is split per step: time inside Newton-Schulz (``specs_muon.newton_schulz``: the owner's batched NS), time
inside the collectives of the NS phase (``all_to_all_single``, the way in and the way back; ``gather`` /
``scatter`` too, which the path before used: this includes waiting for the other rank), time in the inner
optimizers' plans (``_step_plan``: validation and backend choice, the full plan or the cached one where it
applies; Muon.step runs it once per inner optimizer before either changes anything), and the rest (the two
elementwise passes, the aux AdamW's update, state, packing and assembling the exchanged buffers). torch:
time inside ``_zeropower_via_newtonschulz`` (under FSDP2 it includes DTensor's implicit redistributions). The
cases take turns inside each round; a round's figure is the interquartile mean of its steps (the middle half by
total time: the columns add up), per rank (under FSDP2 the ranks wait for each other in the collectives; the plain
cases run in both processes at once, as DDP would); the table gives the median over rounds and the min-max."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

WORLD = 2  # processes (--world): gloo on the CPU; --device cuda: NCCL, one GPU per process


def _model(d, blocks, shapes="square", seed=0):
    """``blocks`` blocks of 4 Linear layers: d x d each ("square"), or GPT's qkv, out, up and down projections
    ("gpt": 3d x d, d x 3d, 4d x d, d x 4d: four shapes, so an owner's NS takes four calls)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    dims = [(d, d)] * 4 if shapes == "square" else [(d, 3 * d), (3 * d, d), (d, 4 * d), (4 * d, d)]
    return nn.Sequential(*[nn.Sequential(*[nn.Linear(i, o) for i, o in dims]) for _ in range(blocks)])


def _fsdp(model, device="cpu", world=WORLD):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _Timers:
    """Seconds spent inside the wrapped functions during one step."""

    def __init__(self):
        self.ns = self.comm = self.plan = 0.0

    def wrap(self, fn, field):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
        return call


def _ours(params, wire32=False, round_elems=None):
    """Our Muon + aux AdamW, and the patches the case runs under: ``wire32`` (the collectives in fp32, the path
    before they carried the NS dtype), ``round_elems`` (phases.ROUND_ELEMS: 1, a round of the exchange per NS
    call; 0, one round)."""
    import torch

    import momentum_fused as mf

    mats = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = mf.Muon([dict(params=mats), dict(params=rest, use_muon=False, lr=3e-4)], lr=0.02, weight_decay=0.1,
                  ns_dtype=torch.bfloat16)
    return [opt], dict(wire32=wire32, round_elems=round_elems)


def _torch(params):
    import torch

    mats = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [torch.optim.Muon(mats, lr=0.02, weight_decay=0.1),
            torch.optim.AdamW(rest, lr=3e-4, weight_decay=0.1, foreach=True)], {}


def _ours_adamw(params):
    import momentum_fused as mf
    return [mf.AdamW(params, lr=3e-4, weight_decay=0.1)], {}


def _torch_adamw(params, fused):
    import torch
    return [torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **({"fused": True} if fused else {"foreach": True}))], \
        {}


CASES = {  # name -> (wrapper, optimizers, their kwargs, timers)
    "fsdp / ours": ("fsdp", _ours, {}, "ours"),
    "fsdp / ours, fp32 wire": ("fsdp", _ours, dict(wire32=True), "ours"),
    # the NS exchange in one synchronous round, and in one asynchronous round per NS call (optim/phases.py)
    "fsdp / ours, one round": ("fsdp", _ours, dict(round_elems=0), "ours"),
    "fsdp / ours, a round per call": ("fsdp", _ours, dict(round_elems=1), "ours"),
    "fsdp / ours, no timers": ("fsdp", _ours, {}, None),
    "fsdp / torch Muon + AdamW": ("fsdp", _torch, {}, "torch"),
    "plain / ours": ("plain", _ours, {}, "ours"),
    "plain / torch Muon + AdamW": ("plain", _torch, {}, "torch"),
    # every param by AdamW: the host overhead of an elementwise rule on DTensors (no NS, no collectives)
    "fsdp / ours, AdamW only": ("fsdp", _ours_adamw, {}, "ours"),
    "fsdp / torch AdamW(foreach)": ("fsdp", _torch_adamw, dict(fused=False), "torch"),
    "fsdp / torch AdamW(fused)": ("fsdp", _torch_adamw, dict(fused=True), "torch"),
    "plain / ours, AdamW only": ("plain", _ours_adamw, {}, "ours"),
}


def _worker(rank, tmpdir, args):
    import json

    import torch
    import torch.distributed as dist
    import torch.optim._muon as torch_muon

    import momentum_fused.specs_muon as specs_muon
    from momentum_fused.optim import phases

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
                            rank=rank, world_size=args.world)
    x = torch.randn(8, args.d, generator=torch.Generator().manual_seed(1)).to(args.device)

    def setup(wrapper, make, **kw):
        model = _model(args.d, args.blocks, args.shapes).to(args.device)
        run = _fsdp(model, args.device, args.world) if wrapper == "fsdp" else model
        run(x).square().mean().backward()
        return make(list(model.parameters()), **kw)

    cases = {  # name -> (opts, patches, timed: which functions the timers wrap)
        name: (*setup(wrapper, make, **kw), timed) for name, (wrapper, make, kw, timed) in CASES.items()
        if args.cases is None or name in args.cases}
    comm = ("gather", "scatter", "all_to_all_single")  # (the NS phase's collectives, before and after)
    real = dict(ns=specs_muon.newton_schulz, tns=torch_muon._zeropower_via_newtonschulz, wire=phases._wire_dtype,
                round_elems=phases.ROUND_ELEMS, **{name: getattr(dist, name) for name in comm})

    def inners(opts):  # our optimizers that plan: Muon's inner ones (its Muon and aux AdamW groups), or our AdamW
        return [o for opt in opts for o in ((opt._core, opt._aux) if hasattr(opt, "_core") else (opt,))
                if o is not None and hasattr(o, "_step_plan")]

    def install(timers, timed, patches, opts):
        if timed == "ours":
            specs_muon.newton_schulz = timers.wrap(real["ns"], "ns")
            for name in comm:
                setattr(dist, name, timers.wrap(real[name], "comm"))
            for inner in inners(opts):  # (an instance attribute: shadows the method for this step only)
                inner._step_plan = timers.wrap(type(inner)._step_plan.__get__(inner), "plan")
        elif timed == "torch":
            torch_muon._zeropower_via_newtonschulz = timers.wrap(real["tns"], "ns")
        if patches.get("wire32"):
            phases._wire_dtype = lambda phase, group, dtype, device: dtype
        if patches.get("round_elems") is not None:  # (read when the exchange layout is made: the case's first step)
            phases.ROUND_ELEMS = patches["round_elems"]

    def uninstall(opts):
        specs_muon.newton_schulz, torch_muon._zeropower_via_newtonschulz = real["ns"], real["tns"]
        phases._wire_dtype, phases.ROUND_ELEMS = real["wire"], real["round_elems"]
        for name in comm:
            setattr(dist, name, real[name])
        for inner in inners(opts):
            inner.__dict__.pop("_step_plan", None)

    rounds = {name: [] for name in cases}  # per round: (total, ns, comm, plan, rest) medians in ms
    for _ in range(args.rounds):
        for name, (opts, patches, timed) in cases.items():
            # (torch's Muon on DTensors takes ~1 s a step: fewer steps)
            warmup, iters = (1, max(3, args.iters // 10)) if name == "fsdp / torch Muon + AdamW" else \
                (args.warmup, args.iters)
            dist.barrier()
            steps = []
            for i in range(warmup + iters):
                timers = _Timers()
                install(timers, timed, patches, opts)
                try:
                    t0 = time.perf_counter()  # (on a GPU: the host's time, the kernels run behind it)
                    for opt in opts:
                        opt.step()
                    total = time.perf_counter() - t0
                finally:
                    uninstall(opts)
                if i >= warmup:
                    steps.append((total, timers.ns, timers.comm, timers.plan,
                                  total - timers.ns - timers.comm - timers.plan))
            rounds[name].append(_middle_mean(steps))
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(rounds, f)
    dist.destroy_process_group()
    # The figures are on disk: leave without the interpreter's finalization, where gloo's worker threads can still
    # release tensors and take the GIL of a dying interpreter (SIGABRT: the teardown flake tests/dist_worker.py
    # leaves the same way; seen here in CI, 2026-12-04, test_bench.py::test_muon_fsdp_bench_smoke).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _middle_mean(steps) -> list:
    """A round's figure in ms: the steps sorted by total time, the mean of each column over the middle half (an
    interquartile mean: robust to the shared machine's outliers, and the columns add up to the total)."""
    steps = sorted(steps)
    n = len(steps)
    mid = steps[n // 4:n - n // 4]
    return [1e3 * statistics.fmean(s[k] for s in mid) for k in range(len(mid[0]))]


def measure(d=32, blocks=12, rounds=5, iters=30, warmup=5, cases=None, device="cpu", world=WORLD,
            shapes="square") -> dict:
    """{rank: {case: [[total, ns, comm, plan, rest] ms per round]}}."""
    import json

    import torch.multiprocessing as mp

    args = argparse.Namespace(d=d, blocks=blocks, rounds=rounds, iters=iters, warmup=warmup, cases=cases,
                              device=device, world=world, shapes=shapes)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, args), nprocs=world, join=True)
        out = {}
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out[r] = json.load(f)
    return out


def table(res: dict, rank: int = 0) -> str:
    def cell(vals):
        return f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"

    lines = [f"rank {rank}: ms per step (interquartile mean of a round's steps), median over rounds (min–max)", "",
             "| case | total | inside NS | inside the collectives | plan (checks) | rest |",
             "|---|---|---|---|---|---|"]
    for name, rows in res[rank].items():
        cols = [cell([r[k] for r in rows]) for k in range(5)]
        if "torch" in name:  # (torch's collectives run inside DTensor dispatch, in its NS and in the rest)
            cols[2] = cols[3] = "—"
        elif "no timers" in name:
            cols[1:4] = ["—"] * 3
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=32, help="matrix side (default 32)")
    ap.add_argument("--blocks", type=int, default=12, help="blocks of 4 Linear(d, d) (default 12: 48 matrices)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="timed steps per case per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cases", default=None, help=f"a ';'-separated subset of: {'; '.join(CASES)} (default: all)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu (gloo) or cuda (NCCL, one GPU per process: the host time of a step on CUDA DTensors)")
    ap.add_argument("--world", type=int, default=WORLD, help=f"processes (default {WORLD}; 1 on a one-GPU machine)")
    ap.add_argument("--shapes", default="square", choices=("square", "gpt"),
                    help="square: Linear(d, d) x 4 per block; gpt: d->3d, 3d->d, d->4d, 4d->d (four shapes)")
    a = ap.parse_args(argv)
    import torch

    cases = None if a.cases is None else [c.strip() for c in a.cases.split(";")]
    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if a.device == "cuda" and torch.cuda.device_count() < a.world:
        ap.error(f"--device cuda --world {a.world} needs {a.world} GPUs, this machine has {torch.cuda.device_count()}")
    res = measure(a.d, a.blocks, a.rounds, a.iters, a.warmup, cases, a.device, a.world, a.shapes)
    mats = f"{a.d}x{a.d}" if a.shapes == "square" else f"GPT-shaped (d={a.d})"
    print(f"torch {torch.__version__}, {a.world} {'NCCL' if a.device == 'cuda' else 'gloo'} processes x 1 thread "
          f"({a.device}), {4 * a.blocks} matrices {mats} + {4 * a.blocks} biases, {a.rounds} rounds x {a.iters} "
          "steps\n")
    for r in range(a.world):
        print(table(res, r) + "\n")


if __name__ == "__main__":
    main()
