"""python -m bench: every rule x provider x profile x layout, as time per step and percent of roofline.

    python -m bench --quick                 # ~1-4 minutes on a 2-core CPU (machine noise)
    python -m bench                         # the full sweep (progress on stderr)
    python -m bench --device cuda --quick --params 1e9 --profiles llm,tiny
    python -m bench --rules muon            # only the Muon section (bench/bench_muon.py)

Providers run side by side in one process: our backends (reference, cpu, triton, cuda: whichever can run
the rule here), torch for-loop / foreach / fused, and peer packages when installed. Muon has a section of its
own (per step on a GPT-like stack of matrices, ours vs torch.optim.Muon vs muon-optimizer: bench/bench_muon.py). The bandwidth of a copy
and of an in-place read-modify-write is measured first on the same device; effective GB/s = bytes per
element (docs/algorithms.md §9, counted for the layout) x elements / median time.
Results: a markdown table on stdout; JSON, CSV, markdown and PNG plots under bench/results/<machine>/.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import momentum_fused as mf

from .core import (best_bandwidth, cpu_roofline_numel, llc_bytes, make_params, measure_bandwidth, profile_shapes,
                   summarize, time_fn)
from .rules import bytes_per_elem, providers, rules

# bench layout -> (param dtype, momentum_fused dtype layout). Torch and peer providers run the native
# layout of the same param dtype (torch has no master-weight, bf16-state or stochastic-rounding variant).
LAYOUTS = {"fp32": (torch.float32, "native"), "bf16": (torch.bfloat16, "native"),
           "bf16_state": (torch.float32, "bf16_state"), "master": (torch.bfloat16, "master"),
           "bf16_sr": (torch.bfloat16, "bf16_sr")}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "momentum_fused": mf.__version__,
            "backends": mf.backends.status(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:  # which kernel variant ran (the model name alone does not tell AVX2 from AVX-512 on these machines)
        info["cpu_isa"] = str(torch.ops.momentum_fused.cpu_isa())
    except Exception:
        info["cpu_isa"] = None
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("MOMENTUM_FUSED_", "OMP_", "MKL_NUM"))}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(info: dict, device: torch.device) -> str:
    name = info.get("gpu") if device.type == "cuda" else f"cpu-{info['cores']}core-{info['cpu']}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name or "unknown").strip("-").lower()[:60]


def _progress(i: int, n: int, label: str) -> None:
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    sys.stderr.flush()


def _working_set_mb(params, opt) -> float:
    ws = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params) + sum(
        t.nbytes for st in getattr(opt, "state", {}).values() for t in st.values() if isinstance(t, torch.Tensor))
    return ws / 2 ** 20


def run_interleaved(provs, shapes, device, dtype, warmup, iters, min_time, rounds) -> tuple[dict, dict]:
    """The providers of one row side by side: all built and warmed up, then ``rounds`` rounds in which each
    times ``iters`` steps, the order rotating every round (a shared machine's load then falls on every
    provider alike). Returns ({name: summary with the per-round medians}, {name: error})."""
    built, failed = [], {}
    for prov in provs:
        try:
            params = make_params(shapes, device, dtype)
            opt = prov.make(params)
            for _ in range(max(warmup, 1)):
                opt.step()
            built.append((prov, params, opt))
        except Exception as e:  # recorded, never silently dropped
            failed[prov.name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    times = {prov.name: [] for prov, _, _ in built}
    per_round = {prov.name: [] for prov, _, _ in built}
    for r in range(rounds):
        k = r % max(len(built), 1)
        for prov, params, opt in built[k:] + built[:k]:
            try:
                ts = time_fn(opt.step, device, warmup=0, iters=iters, min_time=min_time / rounds)
            except Exception as e:
                failed[prov.name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
                continue
            times[prov.name] += ts
            per_round[prov.name].append(1e3 * statistics.median(ts))  # (as the pooled median: not the upper one)
    out = {prov.name: {**summarize(times[prov.name]), "round_median_ms": per_round[prov.name],
                       "working_set_MB": _working_set_mb(params, opt)}
           for prov, params, opt in built if prov.name not in failed}
    return out, failed


def run_one(provider, shapes, device, dtype, warmup, iters, min_time) -> dict:
    params = make_params(shapes, device, dtype)
    opt = provider.make(params)
    times = time_fn(opt.step, device, warmup=warmup, iters=iters, min_time=min_time)
    ws = _working_set_mb(params, opt)
    del opt, params
    return {**summarize(times), "working_set_MB": ws}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, fp32 only, llm+tiny profiles, no scaling")
    ap.add_argument("--params", type=float, default=None, help="elements per profile (default: 2.5e5 quick / 1.6e7 full "
                    "on CPU, 1e9 on CUDA)")
    ap.add_argument("--profiles", default=None, help="comma list of few-large,llm,tiny")
    ap.add_argument("--layouts", default=None, help="comma list of " + ",".join(LAYOUTS))
    ap.add_argument("--rules", default=None, help="comma list of rule names (default: all)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per run (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds in which a row's providers take turns "
                    "(each round times --iters steps of each; CUDA runs them one after another)")
    ap.add_argument("--no-reference", action="store_true", help="leave out our (slow) reference backend")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<machine>)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.rounds < 1 or args.iters < 1:  # (a first step allocates the state: never timed)
        ap.error("--warmup, --rounds and --iters must be >= 1")

    device = torch.device(args.device)
    total = int(args.params or (1e9 if device.type == "cuda" else (2.5e5 if args.quick else 1.6e7)))
    if args.quick:
        args.iters = min(args.iters, 5)
        args.warmup = min(args.warmup, 1)
    profiles = (args.profiles or ("llm,tiny" if args.quick else "few-large,llm,tiny")).split(",")
    layouts = (args.layouts or ("fp32" if args.quick else "fp32,bf16")).split(",")
    for lay in layouts:
        if lay not in LAYOUTS:
            ap.error(f"unknown layout {lay!r}; supported: {sorted(LAYOUTS)}")
    all_rules = rules()
    run_muon = True  # the Muon section (bench/bench_muon.py): with every rule, or when --rules names "muon"
    if args.rules:
        wanted = set(args.rules.split(","))
        run_muon = "muon" in wanted
        wanted.discard("muon")
        unknown = wanted - {r.name for r in all_rules}
        if unknown:
            ap.error(f"unknown rules {sorted(unknown)}; known: {[r.name for r in all_rules] + ['muon']}")
        all_rules = [r for r in all_rules if r.name in wanted]
    min_time = 0.0 if args.quick else 0.2

    info = machine_info(device)
    # Large enough to leave the caches: on the CPU twice the last-level cache (a fixed 64 MiB buffer sat in a
    # 480 MiB L3 and read twice the DRAM bandwidth); rows whose working set fits in that cache are marked.
    info["llc_MB"] = llc_bytes() / 2 ** 20 if device.type == "cpu" else None
    bw_numel = cpu_roofline_numel() if device.type == "cpu" else max(total, 1 << 26)
    bw = measure_bandwidth(device, bw_numel)
    info["bandwidth"] = bw
    print(f"# momentum_fused benchmark on {info.get('gpu') or info['cpu']} ({info['threads']} threads), "
          f"torch {info['torch']}, {info['date']}")
    print(f"bandwidth (best of 20 at the start): copy {bw['copy_GBps']:.1f} GB/s, in-place read-modify-write "
          f"{bw['rmw_GBps']:.1f} GB/s (fp32, {bw['numel']:.2e} elements); re-measured at the end, the better one "
          "is the roofline below\n")

    jobs, missing = [], {}
    for rule in all_rules:
        for lay in layouts:
            dtype, mf_layout = LAYOUTS[lay]
            provs, miss = providers(rule, device, dtype, include_reference=not args.no_reference, layout=mf_layout)
            for k, v in miss.items():
                missing[f"{rule.name}/{lay}/{k}"] = v
            for prof in profiles:
                for p in provs:
                    jobs.append((rule, lay, prof, p))

    runs = []
    shapes_cache = {prof: profile_shapes(prof, total) for prof in profiles}
    rows: dict = {}  # (rule, layout, profile) -> its providers, in job order
    for rule, lay, prof, prov in jobs:
        rows.setdefault((rule.name, lay, prof), (rule, lay, prof, []))[3].append(prov)
    interleave = device.type == "cpu" and args.rounds > 1  # (CUDA: one provider's state at a time: 1e9 params)
    for i, (rule, lay, prof, provs) in enumerate(rows.values()):
        _progress(i, len(rows), f"{rule.name} {lay} {prof}")
        dtype, mf_layout = LAYOUTS[lay]
        shapes = shapes_cache[prof]
        numel = sum(math.prod(s) for s in shapes)
        if interleave:
            results, failed = run_interleaved(provs, shapes, device, dtype, args.warmup, args.iters, min_time,
                                              args.rounds)
        else:
            results, failed = {}, {}
            for prov in provs:
                try:
                    results[prov.name] = run_one(prov, shapes, device, dtype, args.warmup, args.iters, min_time)
                except Exception as e:  # recorded, never silently dropped
                    failed[prov.name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        for name, why in failed.items():
            missing[f"{rule.name}/{lay}/{prof}/{name}"] = why
        for prov in provs:
            if prov.name not in results:
                continue
            runs.append(_row(rule, lay, prof, prov, results[prov.name], numel, len(shapes), dtype, mf_layout, info,
                             bw))
    _progress(len(rows), len(rows), "done")
    sys.stderr.write("\n")
    bw = info["bandwidth"] = best_bandwidth(bw, measure_bandwidth(device, bw_numel))  # again at the end
    for r in runs:
        r["pct_rmw"] = 100 * r["GBps"] / bw["rmw_GBps"]
        r["pct_copy"] = 100 * r["GBps"] / bw["copy_GBps"]
    _add_speedups(runs)
    return _finish(args, device, info, total, runs, missing, all_rules, run_muon)


def _row(rule, lay, prof, prov, res, numel, n_tensors, dtype, mf_layout, info, bw) -> dict:
    bpe = bytes_per_elem(rule.n_state, dtype, layout=mf_layout if prov.kind == "ours" else "native")
    gbps = bpe * numel / (res["median_ms"] * 1e-3) / 1e9
    in_llc = bool(info.get("llc_MB")) and res["working_set_MB"] < info["llc_MB"]
    return {"rule": rule.name, "layout": lay, "profile": prof, "provider": prov.name, "kind": prov.kind,
            "numel": numel, "n_tensors": n_tensors, "bytes_per_elem": bpe, **res, "in_llc": in_llc,
            "noisy": res["median_ms"] > 1.5 * res["min_ms"], "GBps": gbps,
            "pct_rmw": 100 * gbps / bw["rmw_GBps"], "pct_copy": 100 * gbps / bw["copy_GBps"]}


def _finish(args, device, info, total, runs, missing, all_rules, run_muon) -> int:
    overhead = host_overhead(device, all_rules, args)
    scaling = [] if (args.quick or args.no_scaling) else scaling_sweep(device, total, args)
    muon = None
    if run_muon:
        from . import bench_muon
        _progress(0, 1, "muon: ours vs torch.optim.Muon vs muon-optimizer")
        muon = bench_muon.rows(device, args.quick, include_reference=not args.no_reference)
        sys.stderr.write("\n")

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / machine_slug(info, device)
    out.mkdir(parents=True, exist_ok=True)
    result = {"schema": 1, "meta": info, "args": vars(args), "total_params": total, "runs": runs,
              "host_overhead": overhead, "scaling": scaling, "missing": missing, "muon": muon}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        if runs:
            w = csv.DictWriter(f, fieldnames=list(runs[0]))
            w.writeheader()
            w.writerows(runs)
    table = markdown(result)
    if muon is not None:
        table += bench_muon.markdown(muon)
    (out / "results.md").write_text(table)
    print(table)
    if not args.no_plots:
        from .plots import plot_all
        made = plot_all(result, out)
        if made:
            print("plots: " + ", ".join(str(p) for p in made))
        else:
            import importlib.util
            print("plots: none (" + ("matplotlib not installed" if importlib.util.find_spec("matplotlib") is None
                                     else "the plots show the fp32 layout: no fp32 rows in this run") + ")")
    print(f"results: {out}/results.json, results.csv, results.md")
    return 0


def _add_speedups(runs: list[dict]) -> None:
    """speedup_vs_best_torch = the fastest torch provider's median / this median, and speedup_vs_best_peer the same
    against the fastest peer package (same rule, layout and profile, same process); on interleaved rows, the
    median of speedup_rounds instead (2026-12-06). speedup_rounds: on interleaved
    (CPU) rows, the ratio per round against that same provider (the fastest torch one, else the fastest peer), so
    that the headline ratio and its range over the rounds compare the same two providers (until 2026-12-06 the
    rounds took each round's fastest torch provider, and the headline could fall outside its own range)."""
    best: dict = {}  # (kind, rule, layout, profile) -> the run of the fastest provider of that kind
    for r in runs:
        if r["kind"] in ("torch", "peer"):
            key = (r["kind"], r["rule"], r["layout"], r["profile"])
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    for r in runs:
        row = (r["rule"], r["layout"], r["profile"])
        t, p = best.get(("torch", *row)), best.get(("peer", *row))
        r["speedup_vs_best_torch"] = t["median_ms"] / r["median_ms"] if t else None
        r["speedup_vs_best_peer"] = p["median_ms"] / r["median_ms"] if p else None
        ref, mine = (t or p or {}).get("round_median_ms"), r.get("round_median_ms")
        r["speedup_rounds"] = [a / b for a, b in zip(ref, mine)] if ref and mine and r is not (t or p) else None
        if r["speedup_rounds"]:  # the headline: the median of the rounds' side-by-side ratios, inside their range
            # (the ratio of the medians over all steps could fall outside it: rounds of unequal step counts under
            # min_time, or one slow round; a review found "0.45x (2.52-57.34)")
            med = statistics.median(r["speedup_rounds"])
            if t:
                r["speedup_vs_best_torch"] = med
            else:
                r["speedup_vs_best_peer"] = med


def host_overhead(device, all_rules, args) -> list[dict]:
    """Time per step with 300 one-element tensors: the device work is negligible, so this is the
    per-step host cost (Python, dispatch, launches) of each provider, for AdamW."""
    shapes = [(1,)] * 300
    out = []
    for rule in all_rules:
        if rule.name != "adamw":
            continue
        provs, _ = providers(rule, device, torch.float32, include_reference=not args.no_reference)
        for p in provs:
            res = run_one(p, shapes, device, torch.float32, args.warmup, args.iters, 0.0)
            out.append({"rule": rule.name, "provider": p.name, "n_tensors": 300, "host_ms_per_step": res["median_ms"]})
    return out


def scaling_sweep(device, total, args) -> list[dict]:
    """AdamW time versus total elements (one tensor per 1M elements), and versus tensor count at a fixed
    total, for our non-reference backends and torch fused/foreach."""
    rule = next(r for r in rules() if r.name == "adamw")
    provs, _ = providers(rule, device, torch.float32, include_reference=False)
    out = []
    sizes = [10 ** k for k in range(5, 10) if 10 ** k <= max(total, 10 ** 5)]
    for n in sizes:
        shapes = [(min(n, 1 << 20),)] * max(1, n // (1 << 20))
        for p in provs:
            res = run_one(p, shapes, device, torch.float32, 1, max(5, args.iters // 2), 0.0)
            out.append({"sweep": "numel", "numel": sum(math.prod(s) for s in shapes), "n_tensors": len(shapes),
                        "provider": p.name, **res})
    fixed = min(total, 1 << 22)
    for count in (1, 16, 256, 4096):
        shapes = [(fixed // count,)] * count
        for p in provs:
            res = run_one(p, shapes, device, torch.float32, 1, max(5, args.iters // 2), 0.0)
            out.append({"sweep": "count", "numel": fixed // count * count, "n_tensors": count, "provider": p.name,
                        **res})
    return out


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = []
    provs = sorted({r["provider"] for r in runs}, key=lambda s: (not s.startswith("ours"), s))
    groups = {}
    for r in runs:
        groups.setdefault((r["rule"], r["layout"], r["profile"]), {})[r["provider"]] = r
    meta, bw = result["meta"], result["meta"]["bandwidth"]
    lines.append(f"# {meta.get('gpu') or meta['cpu']} ({meta['threads']} threads, cpu kernels "
                 f"{meta.get('cpu_isa') or '-'}), torch {meta['torch']}, {meta['date']}, commit {meta.get('git_commit')}"
                 + (f", env {meta['env']}" if meta.get("env") else "") + "\n")
    lines.append(f"Roofline: in-place read-modify-write {bw['rmw_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s "
                 f"(best of 20, {bw['numel']:.2e} fp32 elements, measured at the start and the end of the run).\n")
    if meta.get("llc_MB"):
        lines.append(f"Last-level cache {meta['llc_MB']:.0f} MiB: a % marked `*` is of a row whose working set (params, "
                     "grads and state) fits in it, so it can exceed 100 %. A time marked `~` had a median above 1.5x "
                     "its minimum (a noisy row). On the CPU a row's providers take turns over --rounds rounds, and 'vs torch' "
                     "is the median of the rounds' ratios, with their range.\n")
    if not runs:  # (--rules muon alone: its own table follows; an empty one had a header of the wrong width)
        return "\n".join(lines) + "\nNo elementwise rule was selected.\n"
    lines.append(f"Median ms per step ({result['total_params']:.2e} elements per profile); "
                 "'best ours' = fastest of our backends, % of the in-place read-modify-write bandwidth, "
                 "speedup vs the fastest torch implementation and vs the fastest peer package measured in the same "
                 "run.\n")
    lines.append("| rule | layout | profile | tensors | " + " | ".join(provs)
                 + " | best ours %RMW | vs torch | vs peers |")
    lines.append("|" + "---|" * (4 + len(provs) + 3))
    for (rule, lay, prof), row in groups.items():
        ours = [r for r in row.values() if r["kind"] == "ours"]
        best = min(ours, key=lambda r: r["median_ms"]) if ours else None
        cells = [f"{row[p]['median_ms']:.3g}{'~' if row[p].get('noisy') else ''}" if p in row else "–"
                 for p in provs]
        n_t = next(iter(row.values()))["n_tensors"]
        sp = best.get("speedup_vs_best_torch") if best else None
        pct = f"{best['pct_rmw']:.0f}%{'*' if best.get('in_llc') else ''} ({best['provider'][5:]})" if best else "–"
        spd = f"{sp:.2f}x" if sp else "–"
        rr = best.get("speedup_rounds") if best else None
        pp = best.get("speedup_vs_best_peer") if best else None
        spp = f"{pp:.2f}x" if pp else "–"
        if rr:  # (the range over the rounds, against the provider of the first ratio shown)
            if sp:
                spd += f" ({min(rr):.2f}–{max(rr):.2f})"
            elif pp:
                spp += f" ({min(rr):.2f}–{max(rr):.2f})"
        lines.append(f"| {rule} | {lay} | {prof} | {n_t} | " + " | ".join(cells) + f" | {pct} | {spd} | {spp} |")
    if result["host_overhead"]:
        lines.append("\nHost overhead (AdamW, 300 one-element tensors, ms per step): "
                     + ", ".join(f"{o['provider']} {o['host_ms_per_step']:.3g}" for o in result["host_overhead"]))
    if result["missing"]:
        lines.append("\nNot measured (and why):")
        grouped: dict = {}
        for k, v in result["missing"].items():
            prov = k.split("/")[-1]
            reason = re.sub(r"rule '[a-z_]+'", "this rule", v)
            reason = re.sub(r"(cpu|cuda)/torch\.[a-z0-9]+", r"\1/<dtype>", reason)
            grouped.setdefault((prov, reason), []).append("/".join(k.split("/")[:-1]))
        for (prov, reason), where in grouped.items():
            lines.append(f"- {prov}: {reason} [{', '.join(where)}]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
