"""Host time of a Triton-backend step without a GPU: the front end, the Triton backend and its launcher (pointer
reads, table cache, checks, scalar tables) on CPU tensors in the interpreter, with the kernel launch itself
replaced by a no-op (the interpreter would otherwise run the kernel in numpy).

On the H200 (2026-12-04) the Triton step was slower than the cuda one by its host side alone (1.2-1.9 ms for 292
tensors against 0.4-0.7; 14-17 ms for 4,981 tiny tensors against 3.5), while its kernels were as fast; this
measures that host side where it can be changed. Not measured: Triton's own launch overhead (the compiled
launcher binds ~20 arguments per call) and anything on the device.

Run: ``python -m bench.triton_host [--profiles llm,tiny] [--rules adamw,sgd,adamw-int8] [--runs 3] [--iters 20]``
(sets TRITON_INTERPRET=1 itself). Report: median ms per step of each run (the runs' spread: this machine is
shared, compare two builds by interleaving their runs).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import momentum_fused as mf  # noqa: E402

from .core import profile_shapes  # noqa: E402

PARAMS = {"llm": int(2e6), "tiny": int(5.4e6)}  # llm: 292 tensors (small sizes: the host side does not scale)


class _NoLaunch:
    """Stands for a compiled kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


def _optimizer(rule, ps):
    if rule == "adamw":
        return mf.AdamW(ps, lr=1e-3, weight_decay=0.1, backend="triton")
    if rule == "sgd":
        return mf.SGD(ps, lr=1e-3, momentum=0.9, backend="triton")
    if rule == "adamw-int8":  # the int8_state kernel's own launcher (launcher.int8_state_apply)
        return mf.AdamW(ps, lr=1e-3, weight_decay=0.1, layout="int8_state", backend="triton")
    raise SystemExit(f"unknown rule {rule!r} (adamw, sgd, adamw-int8)")


def measure(profile, rule, iters):
    shapes = profile_shapes(profile, PARAMS[profile])
    ps = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = _optimizer(rule, ps)
    for _ in range(3):
        opt.step()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    return len(ps), statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default="llm,tiny")
    ap.add_argument("--rules", default="adamw,sgd")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from momentum_fused.triton_kernels import launcher
    for family in list(launcher.KERNELS):
        launcher.KERNELS[family] = _NoLaunch()
    launcher.int8_state_kernel = _NoLaunch()
    from momentum_fused import _backend_triton
    fast = getattr(_backend_triton, "_POINTER_ROWS", None)
    print(f"pointer reads: {'_C_cpu.pointer_rows' if fast else 'Python'}")
    print("| profile | rule | tensors | host ms per step, each run |")
    print("|---|---|---|---|")
    for profile in args.profiles.split(","):
        for rule in args.rules.split(","):
            runs = [measure(profile, rule, args.iters) for _ in range(args.runs)]
            print(f"| {profile} | {rule} | {runs[0][0]} | {' / '.join(f'{ms:.2f}' for _, ms in runs)} |")


if __name__ == "__main__":
    main()
