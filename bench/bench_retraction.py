"""Batched QR retraction backends vs torch.linalg.qr (issue 6).

    python -m bench.bench_retraction                      # CPU: 64 x 1024x32 and 64 x 4096x64, fp32
    python -m bench.bench_retraction --device cuda        # + 256 x 4096x64 (and the triton backend)
    python -m bench.bench_retraction --quick --out DIR

Measurements are interleaved in one process: each round times every method once, in turn, so machine
noise hits all of them alike; we report the median over rounds and the ratio torch.linalg.qr / method.
CUDA: CUDA events around each call plus a synchronize. Before timing, every method's output is checked
(orthonormality, A = QR, agreement with Householder on Q Q^T and R); a wrong result or a method that
cannot run aborts with a nonzero exit (nothing fails silently). Writes retraction.md and
retraction.json to --out (default bench/results/retraction-<device>).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from momentum_fused.lowrank.retraction import RETRACTION_BACKENDS, qr_with_info

SHAPES = {"cpu": [(64, 1024, 32), (64, 4096, 64)],
          "cuda": [(64, 1024, 32), (64, 4096, 64), (256, 4096, 64)]}


def _methods(device):
    out = {"torch.linalg.qr": lambda A: torch.linalg.qr(A)}
    for name in RETRACTION_BACKENDS:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timing
        out[name] = (lambda n: (lambda A: qr_with_info(A, n)))(name)
    return out


def _time_once(fn, A, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(A)
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / 1e3
    t0 = time.perf_counter()
    fn(A)
    return time.perf_counter() - t0


def _projector_dist(Q, Qh):
    """||Q Q^T - Qh Qh^T||_F from r x r products only (the m x m projectors would not fit in memory)."""
    sq = lambda X: X.square().sum(dim=(-2, -1))  # noqa: E731
    d2 = sq(Q.mT @ Q) + sq(Qh.mT @ Qh) - 2 * sq(Q.mT @ Qh)
    return d2.clamp_min(0).sqrt()


def _check(name, fn, A):
    """Raise if ``fn``'s QR of A is wrong (fp32 tolerances), else return (paths, orth error)."""
    res = fn(A)
    if name == "torch.linalg.qr":
        return None, None
    Q, R, info = res
    Qh, Rh = torch.linalg.qr(A.double())
    r = A.shape[-1]
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    orth = torch.linalg.matrix_norm(Q.double().mT @ Q.double() - eye).max().item()
    resid = (torch.linalg.matrix_norm(Q.double() @ R.double() - A.double()) /
             torch.linalg.matrix_norm(A.double())).max().item()
    proj = _projector_dist(Q.double(), Qh).max().item()
    tril = torch.tril(R, -1).abs().max().item()
    if not (orth <= 1e-5 and resid <= 1e-5 and proj <= 1e-4 and tril == 0.0
            and bool((torch.diagonal(R, dim1=-2, dim2=-1) > 0).all())):
        raise SystemExit(f"bench_retraction: {name} gave a wrong QR on {tuple(A.shape)}: ||QtQ-I||={orth:.2e} "
                         f"||A-QR||/||A||={resid:.2e} ||QQt-QhQht||={proj:.2e} max|tril(R)|={tril:.2e}")
    return info.counts(), orth


def run(device, quick, shapes=None):
    torch.manual_seed(0)
    rounds = 5 if quick else 11
    rows = []
    for (B, m, r) in shapes or SHAPES[device.type]:
        A = torch.randn(B, m, r, device=device)
        methods = _methods(device)
        checks = {}
        for name, fn in methods.items():
            checks[name] = _check(name, fn, A)   # also the warm-up (triton compiles here)
            fn(A)
        times = {name: [] for name in methods}
        for _ in range(rounds):
            for name, fn in methods.items():
                times[name].append(_time_once(fn, A, device))
        base = statistics.median(times["torch.linalg.qr"])
        for name in methods:
            med = statistics.median(times[name])
            rows.append(dict(shape=f"{B} x {m}x{r}", batch=B, m=m, r=r, method=name, median_ms=med * 1e3,
                             min_ms=min(times[name]) * 1e3, speedup_vs_torch_qr=base / med,
                             paths=checks[name][0], orth_err=checks[name][1], rounds=rounds))
        print(f"{B} x {m}x{r}: " + ", ".join(f"{row['method']} {row['median_ms']:.2f} ms ({row['speedup_vs_torch_qr']:.2f}x)"
                                             for row in rows if row["shape"] == f"{B} x {m}x{r}"),
              file=sys.stderr)
    return rows


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, torch threads={torch.get_num_threads()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 11")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--shapes", default=None, help="override, e.g. '2,40,4;8,100,16' (batch,m,r;...)")
    args = ap.parse_args(argv)
    shapes = None
    if args.shapes:
        shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";") if item]
        if not shapes or any(len(s) != 3 for s in shapes):
            raise SystemExit(f"bench_retraction: --shapes wants 'batch,m,r;...', got {args.shapes!r}")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_retraction: --device cuda but no CUDA device is visible")
    if device.type not in SHAPES:
        raise SystemExit(f"bench_retraction: unsupported device {device}")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows = run(device, args.quick, shapes)
    # the 1-minute load average before and after: on a shared CPU box, other processes skew the medians
    meta = dict(device=str(device), machine=_machine(device), torch=torch.__version__, dtype="float32",
                wall_s=time.perf_counter() - t0, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                loadavg_1min=[load0, os.getloadavg()[0]], cpu_count=os.cpu_count())
    out = Path(args.out or f"bench/results/retraction-{device.type}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "retraction.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# QR retraction backends, {meta['machine']} ({meta['device']}, torch {meta['torch']}, fp32)", "",
             f"Median of {rows[0]['rounds']} interleaved rounds; speedup = torch.linalg.qr median / method median.",
             "paths: how many matrices took CholeskyQR2 / shifted CholeskyQR3 / Householder.", "",
             "| shape (batch x m x r) | method | median ms | min ms | speedup vs torch.linalg.qr | paths |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        paths = "" if row["paths"] is None else "/".join(str(v) for v in row["paths"].values())
        lines.append(f"| {row['shape']} | {row['method']} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | "
                     f"{row['speedup_vs_torch_qr']:.2f}x | {paths} |")
    lines.append("")
    lines.append(f"Total wall time {meta['wall_s']:.1f} s; 1-minute load average {meta['loadavg_1min'][0]:.2f} "
                 f"before, {meta['loadavg_1min'][1]:.2f} after ({meta['cpu_count']} CPUs).")
    (out / "retraction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
