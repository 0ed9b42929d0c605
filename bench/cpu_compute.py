"""Compute cost of the cpu kernels, apart from memory: ns per element of one op call on data that stays in
L2 (one thread, 8,192 elements, minus a 16-element call for the fixed cost), and the same op streaming 16M
elements on all threads. Shows whether a layout is compute- or memory-bound on this CPU (docs/csrc.md:
bf16 AdamW is compute-bound on 2 AVX2 cores).

    python -m bench.cpu_compute

Calls the compiled op directly (``momentum_fused._C_cpu.cpu_step``, the eager entry of
``torch.ops.momentum_fused.cpu_step``); medians of 7 repetitions. Times nothing in the test suite.
"""
from __future__ import annotations

import time

import torch

import momentum_fused._backend_cpu as bcpu
from momentum_fused.specs import SPECS

# (rule, flag bits, state count, a scalar pack without weight decay)
CASES = [("sgd", 1, 1, [1e-3, 0.0, 0.9, 0.0, 0.0, 1.0]),
         ("adam", 1, 2, [1e-3, 0.0, 0.9, 0.999, 1e-8, 1e-2, 0.03, 1.0])]


def seconds_per_call(rule, flags, nstate, pack, dtype, n, reps, threads):
    from momentum_fused import _C_cpu

    torch.set_num_threads(threads)
    p, g = torch.randn(n).to(dtype), (torch.randn(n) * 1e-2).to(dtype)
    st = [torch.rand(n).to(dtype) for _ in range(nstate)]
    assert len(pack) == len(SPECS[rule].scalar_names)
    sc = torch.tensor([pack], dtype=torch.float64)
    rid = bcpu.RULE_IDS[rule]
    for _ in range(3):
        _C_cpu.cpu_step([p], [g], st, sc, rid, flags)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            _C_cpu.cpu_step([p], [g], st, sc, rid, flags)
        ts.append((time.perf_counter() - t0) / reps)
    return sorted(ts)[3]


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_compute", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)  # (no options: --help says what it does instead of running it)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, cpu kernel variant {torch.ops.momentum_fused.cpu_isa()}")
    for rule, flags, nstate, pack in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            small = seconds_per_call(rule, flags, nstate, pack, dtype, 8192, 2000, 1)
            tiny = seconds_per_call(rule, flags, nstate, pack, dtype, 16, 2000, 1)
            big = seconds_per_call(rule, flags, nstate, pack, dtype, 16 * 2 ** 20, 5, threads)
            print(f"{rule:5s} {str(dtype).replace('torch.', ''):9s} in L2, 1 thread: "
                  f"{(small - tiny) / (8192 - 16) * 1e9:6.3f} ns/elem | 16M elements, {threads} threads: "
                  f"{big * 1e3:7.2f} ms ({big / (16 * 2 ** 20) * 1e9:.3f} ns/elem)")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
