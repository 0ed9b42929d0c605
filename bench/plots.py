"""PNG plots of a benchmark result (matplotlib is optional: without it no plot is made, and the caller
says so)."""
from __future__ import annotations

from pathlib import Path


def plot_all(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    made = []
    runs = result["runs"]
    for metric, fname, ylabel in (("pct_rmw", "roofline.png", "% of in-place RMW bandwidth"),
                                  ("speedup_vs_best_torch", "speedup.png", "speedup vs fastest torch (x)")):
        for prof in sorted({r["profile"] for r in runs}):
            sel = [r for r in runs if r["profile"] == prof and r["layout"] == "fp32" and r.get(metric)]
            if not sel:
                continue
            rules = sorted({r["rule"] for r in sel}, key=lambda n: [x["rule"] for x in sel].index(n))
            provs = sorted({r["provider"] for r in sel}, key=lambda s: (not s.startswith("ours"), s))
            fig, ax = plt.subplots(figsize=(max(8, len(rules) * 0.9), 4.5))
            w = 0.8 / len(provs)
            for j, pv in enumerate(provs):
                xs, ys = [], []
                for i, rn in enumerate(rules):
                    hit = [r for r in sel if r["rule"] == rn and r["provider"] == pv]
                    if hit:
                        xs.append(i + j * w)
                        ys.append(hit[0][metric])
                ax.bar(xs, ys, width=w, label=pv)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rules))])
            ax.set_xticklabels(rules, rotation=35, ha="right")
            ax.set_ylabel(ylabel)
            if metric == "speedup_vs_best_torch":
                ax.axhline(1.0, color="k", lw=0.8)
            meta = result["meta"]
            ax.set_title(f"{prof} profile, fp32, {result['total_params']:.1e} elements; "
                         f"{meta.get('gpu') or meta['cpu']}", fontsize=9)
            ax.legend(fontsize=7, ncol=3)
            fig.tight_layout()
            path = out / f"{prof}-{fname}"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    if result.get("scaling"):
        for sweep, xlabel in (("numel", "total elements"), ("count", "tensor count (fixed total)")):
            sel = [r for r in result["scaling"] if r["sweep"] == sweep]
            if not sel:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for pv in sorted({r["provider"] for r in sel}):
                pts = sorted((r["numel"] if sweep == "numel" else r["n_tensors"], r["median_ms"])
                             for r in sel if r["provider"] == pv)
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pv)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per AdamW step")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"scaling-{sweep}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    return made
