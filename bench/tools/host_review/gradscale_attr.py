"""Our step with GradScaler's attributes set (grad_scale=1+2^-20, found_inf=0, as GradScaler.step sets them) vs without,
vs torch fused AdamW with the same attributes: N tiny tensors. No re-multiplication (the scale is 1 + 2^-20)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, momentum_fused as mf
from harness import compare, report
torch.set_num_threads(1)
N, E = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
def ps():
    out = [torch.nn.Parameter(torch.randn(E)) for _ in range(N)]
    for p in out: p.grad = torch.randn_like(p)
    return out
def variant(o, scaled):
    grads = [p.grad for g in o.param_groups for p in g["params"]]
    gs, fi = torch.tensor(1.0 + 2.0 ** -20), torch.tensor(0.0)  # != 1: the unscale path runs; grads barely change
    def f():
        if scaled:
            o.grad_scale, o.found_inf = gs, fi
        o.step()
        if scaled:
            del o.grad_scale, o.found_inf
    return f
V = {"ours plain": variant(mf.AdamW(ps(), lr=1e-3, backend="cpu"), False),
     "ours grad_scale=1+2^-20": variant(mf.AdamW(ps(), lr=1e-3, backend="cpu"), True),
     "torch fused plain": variant(torch.optim.AdamW(ps(), lr=1e-3, fused=True), False),
     "torch fused grad_scale=1+2^-20": variant(torch.optim.AdamW(ps(), lr=1e-3, fused=True), True)}
med, _ = compare(V, rounds=9, iters=max(3, 3000 // N))
report(f"{N} tensors of {E}", med, "ours plain")
print("  added by grad_scale: ours %.3f ms, torch fused %.3f ms" % (med["ours grad_scale=1+2^-20"] - med["ours plain"],
      med["torch fused grad_scale=1+2^-20"] - med["torch fused plain"]))
