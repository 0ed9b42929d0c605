"""One process of an A/B between two builds of momentum_fused on the CPU: AdamW on bench_compressed's 16.3M-param
GPT shapes, torch's fused fp32 step and ours (a layout) in 6 interleaved rounds of 25 steps; prints both medians
and the per-round ratio. Run it alternately on two checkouts (each with its own built extension), e.g.

    for i in 1 2 3 4; do python bench/tools/compressed_ab.py /tmp/old; python bench/tools/compressed_ab.py .; done

Not a test: times move with the machine; compare the processes of one session."""
import statistics as st
import sys
import time


def main(repo: str, layout: str = "int8_state") -> None:
    sys.path.insert(0, repo)
    import torch
    import momentum_fused as mf
    from bench.bench_compressed import gpt_shapes
    if not mf.__file__.startswith(str(__import__("pathlib").Path(repo).resolve())):
        raise SystemExit(f"imported {mf.__file__}, not the checkout {repo}")

    def make(kind):
        gen = torch.Generator().manual_seed(0)
        dt = torch.bfloat16 if layout.startswith("master16") and kind == "ours" else torch.float32
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(dt)) for s in gpt_shapes()]
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dt)
        if kind == "torch":
            return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)
        return mf.AdamW(ps, lr=1e-3, weight_decay=0.01, backend="cpu", layout=layout)

    opts = {k: make(k) for k in ("torch", "ours")}
    for o in opts.values():
        for _ in range(3):
            o.step()
    t = {k: [] for k in opts}
    for _ in range(6):
        for k, o in opts.items():
            t0 = time.perf_counter()
            for _ in range(25):
                o.step()
            t[k].append((time.perf_counter() - t0) / 25 * 1e3)
    r = [a / b for a, b in zip(t["torch"], t["ours"])]
    print(f"{repo} {layout}: torch {st.median(t['torch']):.2f} ms, ours {st.median(t['ours']):.2f} ms, "
          f"ratio median {st.median(r):.3f} (min {min(r):.3f} max {max(r):.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
