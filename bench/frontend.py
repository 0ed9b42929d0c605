"""Host time of ``step()`` without any kernel: the front end on CUDA-like tensors, measured without a GPU.

A GPU step is the front end (validation, host counters, scalar packs, bucketing: Python and C on the host) followed
by kernel launches that run asynchronously; with many small tensors the host side is what the GPU waits for. This
script times the front end alone: the params, gradients and state live on the ``meta`` device (metadata only, no
data, like a CUDA tensor seen from the host: not a CPU tensor), and the bucket goes to a backend that does nothing
but declares what the cuda backend declares (device scalars, scalar tables, the same layouts). The cached plan
(docs/architecture.md, "One step") serves these params exactly as it serves CUDA params: its checks read tensor
metadata only. The same step on CPU tensors with the same null backend is measured side by side, and the full plan
(the cache dropped before every step) for scale.

Run: ``python -m bench.frontend [--rules adamw,sgd,lion,nadam,adamw-int8] [--profiles llm,tiny] [--runs 5]
[--json FILE]``.
Report: median ms per step over ``--runs`` runs of ``--iters`` steps each, and the spread (min..max of the runs).
This is no kernel timing: on a GPU, bench/device_check.sh (phase step-times) times the real step with CUDA events
around the op and the front end apart.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import momentum_fused as mf
from momentum_fused import backends

from .core import profile_shapes

NULL = "null-frontend"
RULES = {
    "adamw": lambda ps: mf.AdamW(ps, lr=1e-3, weight_decay=0.01, backend=NULL),
    "sgd": lambda ps: mf.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend=NULL),
    "lion": lambda ps: mf.Lion(ps, lr=1e-4, backend=NULL),
    "nadam": lambda ps: mf.NAdam(ps, lr=1e-3, backend=NULL),
    # the int8 layouts' per-tensor state (codes and block scales, or fp32 state for small tensors)
    "adamw-int8": lambda ps: mf.AdamW(ps, lr=1e-3, weight_decay=0.01, layout="int8_state", backend=NULL),
}
# element totals per profile: the llm profile is a 292-tensor GPT stack at any total (10M keeps the CPU side's
# state small; the host work does not depend on sizes), the tiny one ~5,000 tensors of <= 4096 elements
TOTALS = {"llm": 10**7, "tiny": 5000 * 1082}


def register_null_backend(devices=("meta", "cpu")) -> None:
    """A backend that receives the buckets and does nothing, with the cuda backend's declared capabilities."""
    def apply(spec, flags, params, grads, states, scalars, **kw):
        return None
    from momentum_fused._backend_cuda import CUDA_LAYOUTS  # (what the cuda backend runs, built or not)
    backends.register(backends.Backend(name=NULL, apply=apply, devices=devices, layouts=CUDA_LAYOUTS,
                                       device_scalars=True, scalar_tables=True))


def make(shapes, device):
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, device=device))
        p.grad = torch.empty_like(p)
        ps.append(p)
    return ps


def time_steps(opt, iters: int, full: bool) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        if full:
            opt.invalidate_caches()
        opt.step()
    return (time.perf_counter() - t) / iters * 1e3


def measure(rule: str, profile: str, device: str, runs: int, iters: int, full: bool) -> dict:
    shapes = profile_shapes(profile, TOTALS[profile])
    opt = RULES[rule](make(shapes, device))
    for _ in range(3):
        opt.step()
    ms = [time_steps(opt, iters, full) for _ in range(runs)]
    cached = opt._fast is not None
    return {"rule": rule, "profile": profile, "tensors": len(shapes), "device": device,
            "plan": "full" if full else "cached", "cache_kept": cached, "median_ms": statistics.median(ms),
            "min_ms": min(ms), "max_ms": max(ms), "runs": runs, "iters": iters}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="adamw,sgd,lion,nadam,adamw-int8", help=f"comma list of {','.join(RULES)}")
    ap.add_argument("--profiles", default="llm,tiny", help=f"comma list of {','.join(TOTALS)}")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the front end is single-threaded)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    for flag, given, known in (("--rules", a.rules, RULES), ("--profiles", a.profiles, TOTALS)):
        bad = [x for x in given.split(",") if x not in known]
        if bad:  # (a KeyError traceback before)
            ap.error(f"{flag}: unknown {bad}; known: {','.join(known)}")
    torch.set_num_threads(a.threads)
    register_null_backend()
    rows = []
    try:
        for profile in a.profiles.split(","):
            for rule in a.rules.split(","):
                for device, full in (("meta", False), ("cpu", False), ("meta", True)):
                    rows.append(measure(rule, profile, device, a.runs, a.iters if not full else max(1, a.iters // 4),
                                        full))
    finally:
        backends._REGISTRY.pop(NULL, None)
    print(f"front end only (no kernel), torch {torch.__version__}, {a.runs} runs; median ms per step (min..max)")
    print(f"{'rule':7} {'profile':8} {'tensors':>7} {'meta cached':>20} {'cpu cached':>20} {'meta full plan':>20} "
          f"{'us/tensor':>9}")
    for i in range(0, len(rows), 3):
        m, c, f = rows[i:i + 3]
        cell = lambda r: f"{r['median_ms']:.2f} ({r['min_ms']:.2f}..{r['max_ms']:.2f})"  # noqa: E731
        print(f"{m['rule']:7} {m['profile']:8} {m['tensors']:>7} {cell(m):>20} {cell(c):>20} {cell(f):>20} "
              f"{m['median_ms'] * 1e3 / m['tensors']:>9.2f}")
        if not m["cache_kept"]:
            print(f"  WARNING: the cached plan was not kept for {m['rule']} on meta")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
