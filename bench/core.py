"""Timing, bandwidth and tensor profiles for the benchmark."""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 3, iters: int = 10,
            min_time: float = 0.0) -> list[float]:
    """Seconds per call of ``fn``: ``iters`` timed calls (more while their sum is under ``min_time``)
    after ``warmup`` untimed ones. CUDA: events; CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    while len(times) < iters or (sum(times) < min_time and len(times) < 10 * iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "n": len(times)}


# -------------------------------------------------------------------------------------- bandwidth
def llc_bytes() -> int:
    """The CPU's largest (last-level) cache in bytes, from sysfs (Linux); 0 when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            digits = s[:-1] if s[-1:].isalpha() else s
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        return 0
    return best


def cpu_roofline_numel(floor: int = 1 << 24) -> int:
    """fp32 elements of a CPU bandwidth buffer that misses the caches: twice the last-level cache (a 480 MiB L3
    held a 64 MiB buffer and measured twice the DRAM bandwidth, 2026-12-06), at least ``floor``, and at most a
    eighth of the available memory across the three buffers measure_bandwidth allocates."""
    n = max(floor, 2 * llc_bytes() // 4)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        n = min(n, max(floor, avail // (8 * 3 * 4)))
    except (ValueError, OSError, AttributeError):
        pass
    return int(n)


def measure_bandwidth(device: torch.device, numel: int, iters: int = 20) -> dict:
    """Copy (dst.copy_(src)) and in-place read-modify-write (x.mul_) bandwidth in GB/s on ``device``,
    both 8 B per fp32 element. The roofline is what the memory system can do, so the *best* of
    ``iters`` runs is reported (a median would fold in the noise of a shared machine); the median is
    kept alongside."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, iters=iters)
    x = torch.rand(numel, device=device)
    rmw = time_fn(lambda: x.mul_(1.0000001), device, iters=iters)
    b = 8 * numel / 1e9
    return {"numel": numel, "copy_GBps": b / min(copy), "rmw_GBps": b / min(rmw),
            "copy_GBps_median": b / summarize(copy)["median_ms"] * 1e3,
            "rmw_GBps_median": b / summarize(rmw)["median_ms"] * 1e3}


def best_bandwidth(a: dict, b: dict) -> dict:
    """The better of two bandwidth measurements (taken at the start and at the end of a run)."""
    return {k: (max(a[k], b[k]) if k.endswith("GBps") else a[k]) for k in a}


# --------------------------------------------------------------------------------------- profiles
def _gpt_shapes(d: int, layers: int) -> list[tuple]:
    shapes = [(16 * d, d), (4 * d, d)]  # token and position embeddings (scaled with the width)
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]  # final norm
    return shapes


def profile_shapes(name: str, total: int) -> list[tuple]:
    """Tensor shapes of a profile with about ``total`` elements.

    few-large: 4 equal tensors. llm: a GPT block stack of 24 layers (12 tensors each: norms, qkv, proj,
    mlp, biases) plus embeddings, ~300 tensors, width a multiple of 16 chosen to fit ``total`` (so that every
    matrix holds whole 256-element blocks: the int8 layouts quantize all of them; a multiple of 8 until 2026-12-06,
    d = 1800 at 1e9, left 31 % of the elements in fp32 state). tiny: tensors of <= 4096
    elements (sizes cycling 4096, 1000, 257, 64, 1) up to ``total``.
    """
    if name == "few-large":
        n = max(1, total // 4)
        return [(n,)] * 4
    if name == "llm":
        layers = 24
        d = 16
        while sum(math.prod(s) for s in _gpt_shapes(d + 16, layers)) <= total:  # widest stack that fits
            d += 16
        return _gpt_shapes(d, layers)
    if name == "tiny":
        sizes = (4096, 1000, 257, 64, 1)
        out, acc, i = [], 0, 0
        while acc < total:
            s = sizes[i % len(sizes)]
            out.append((s,))
            acc += s
            i += 1
        return out
    raise ValueError(f"unknown profile {name!r}; known: few-large, llm, tiny")


def make_params(shapes, device, dtype, seed=0) -> list[torch.Tensor]:
    """Random params and grads, generated on ``device`` (1e9 elements drawn on the host and copied
    would take ~15 s per provider on a GPU machine)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, device=device).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=g, device=device) * 1e-2).to(dtype)
        params.append(p)
    return params
