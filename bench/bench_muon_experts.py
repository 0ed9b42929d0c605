"""Muon on stacked MoE experts under FSDP2's Shard(0) on the CPU: 2 gloo processes (torch.multiprocessing, spawn),
one thread each. The same E expert matrices (d x h) held two ways:

- stacked: one [E, d, h] param per layer with ``flatten=False`` (each expert its own matrix): a Shard(0) shard
  holds whole experts, which each rank orthogonalizes where they are (no exchange);
- separate: E params of [d, h] per layer, each Shard(0) on its rows: every matrix goes to an owner rank and back
  (one ``all_to_all_single`` each way).

Both compute the same update (tests/test_muon.py, tests/test_distributed.py); the table gives a step's time and
the part spent inside ``all_to_all_single`` (waiting for the other rank included), per rank 0, median over rounds
(min-max), each round's figure the median of its steps; the cases take turns inside each round.

    python -m bench.bench_muon_experts                           # 4 layers of 8 experts of 128 x 352
    python -m bench.bench_muon_experts --layers 2 --experts 16 --d 64 --h 176 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

WORLD = 2
CASES = ("stacked (flatten=False)", "separate experts")


def _worker(rank, tmpdir, args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import momentum_fused as mf

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(args.experts, args.d, args.h, generator=gen) * 0.02 for _ in range(args.layers)]
    g = [torch.randn(args.experts, args.d, args.h, generator=gen) * 0.01 for _ in range(args.layers)]
    shard = lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)])  # noqa: E731

    def make(case):
        if case == CASES[0]:
            ps = [torch.nn.Parameter(shard(x)) for x in w]
            gs = [shard(x) for x in g]
            return mf.Muon(ps, lr=0.02, flatten=False, ns_algorithm=args.algorithm), ps, gs
        ps = [torch.nn.Parameter(shard(x[e])) for x in w for e in range(args.experts)]
        gs = [shard(x[e]) for x in g for e in range(args.experts)]
        return mf.Muon(ps, lr=0.02, ns_algorithm=args.algorithm), ps, gs

    runs = {case: make(case) for case in CASES}
    real = dist.all_to_all_single
    inside = [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            inside[0] += time.perf_counter() - t0

    dist.all_to_all_single = timed
    rounds = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case, (opt, ps, gs) in runs.items():
            steps = []
            for i in range(args.warmup + args.iters):
                for p, x in zip(ps, gs):
                    p.grad = x
                dist.barrier()
                inside[0] = 0.0
                t0 = time.perf_counter()
                opt.step()
                if i >= args.warmup:
                    steps.append((time.perf_counter() - t0, inside[0]))
            rounds[case].append([1e3 * statistics.median(s[k] for s in steps) for k in range(2)])
    dist.all_to_all_single = real
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(rounds, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (as bench_muon_fsdp: no interpreter finalization under gloo's threads)


def measure(layers=4, experts=8, d=128, h=352, rounds=5, iters=5, warmup=2, algorithm="auto") -> dict:
    import torch.multiprocessing as mp

    args = argparse.Namespace(layers=layers, experts=experts, d=d, h=h, rounds=rounds, iters=iters, warmup=warmup,
                              algorithm=algorithm)
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.start_processes(_worker, args=(tmpdir, args), nprocs=WORLD, start_method="spawn", join=True)
        with open(os.path.join(tmpdir, "rank0.json")) as f:
            return json.load(f)


def table(res: dict) -> str:
    def cell(vals):
        return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"

    base = statistics.median(r[0] for r in res[CASES[1]])
    rows = ["| case (rank 0) | step ms | inside all_to_all ms | separate / this |", "|---|---|---|---|"]
    for case, rs in res.items():
        rows.append(f"| {case} | {cell([r[0] for r in rs])} | {cell([r[1] for r in rs])} | "
                    f"{base / statistics.median(r[0] for r in rs):.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--h", type=int, default=352)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--algorithm", default="auto", choices=("standard", "gram", "auto"))
    a = ap.parse_args(argv)
    res = measure(a.layers, a.experts, a.d, a.h, a.rounds, a.iters, a.warmup, a.algorithm)
    print(f"Muon, {a.layers} layers of {a.experts} experts of {a.d} x {a.h}, ns_algorithm={a.algorithm!r}, "
          f"{WORLD} gloo processes, 1 thread each, {a.rounds} rounds of {a.iters} steps")
    print(table(res))


if __name__ == "__main__":
    main()
