"""Shared helpers of the research reproductions (docs/research.md): paths, statistics, tables, JSON."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.dirname(HERE)
REPO = os.path.dirname(EXAMPLES)
RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(REPO, "docs", "img")
if EXAMPLES not in sys.path:  # train_charlm lives in examples/
    sys.path.insert(0, EXAMPLES)


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run (< 2 min): writes to --out-dir, default a temp dir")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the mode's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared CPU)")
    p.add_argument("--out-dir", help="where the JSON and the plot go (full mode default: "
                   "examples/research/results/ and docs/img/)")
    p.add_argument("--report-only", action="store_true",
                   help="do not train: re-print the tables and redraw the plot from the saved JSON")
    return p


def paths(args, name: str):
    """(json path, png path) of an experiment: the committed locations in full mode, else --out-dir."""
    if args.out_dir or args.quick:
        d = args.out_dir or os.path.join(tempfile.gettempdir(), "momentum_fused_research")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{name}{'_quick' if args.quick else ''}.json"), os.path.join(d, f"research_{name}.png")
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}.json"), os.path.join(IMG, f"research_{name}.png")


def save_json(obj, path):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=None, separators=(",", ":"), allow_nan=True)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def mean_std(xs):
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_ms(xs, digits=3, pct=False):
    """'mean ± std [min, max] (n)' of a list (std with n - 1)."""
    m, s = mean_std(xs)
    if pct:
        return f"{100 * m:.{max(0, digits - 2)}f}% ± {100 * s:.{max(0, digits - 2)}f} [{100 * min(xs):.1f}, {100 * max(xs):.1f}]"
    return f"{m:.{digits}f} ± {s:.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


def grid_note(grid, best):
    """The grid with the chosen value, and whether it lies at an edge of the grid."""
    edge = " (edge)" if best in (min(grid), max(grid)) and len(grid) > 1 else ""
    return f"{best:g}{edge}"


def subsample(xs, n=200):
    """At most n points of a curve, for the JSON (keeps the last one)."""
    if len(xs) <= n:
        return list(xs)
    k = math.ceil(len(xs) / n)
    out = list(xs[::k])
    if (len(xs) - 1) % k:
        out.append(xs[-1])
    return out


def smooth(xs, w=20):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def savefig(fig, path, dpi=90):
    fig.savefig(path, dpi=dpi)
    kb = os.path.getsize(path) / 1024
    print(f"wrote {path} ({kb:.0f} KB)")
    if kb > 200:
        print(f"warning: {path} is {kb:.0f} KB (> 200 KB)")


class Timer:
    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def __str__(self):
        return f"{time.perf_counter() - self.t0:.0f} s wall, {time.process_time() - self.c0:.0f} s CPU"

    def cpu(self):
        return time.process_time() - self.c0


def run_main(args, name, run, report, plot):
    """The main() of every reproduction: run (or, with --report-only, reload the saved JSON), save, print the
    tables, draw the plot; returns the results."""
    import torch
    torch.set_num_threads(args.threads)
    jpath, ppath = paths(args, name)
    res = load_json(jpath) if args.report_only else run(args)
    if not args.report_only:
        save_json(res, jpath)
    print(report(res))
    plot(res, ppath)
    return res
