"""Steps where the set of params with a gradient changes between steps (MoE experts not routed, multi-task heads,
zero_grad(set_to_none=True)): ours vs torch fused AdamW, and vs our own step when every param has a grad.
N tensors x E; each step a different 10% of the params (fixed rotating pattern) have grad None."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, momentum_fused as mf
from harness import compare, report, count_plans
torch.set_num_threads(1)
N, E = int(sys.argv[1]), int(sys.argv[2])
def ps():
    out = [torch.nn.Parameter(torch.randn(E)) for _ in range(N)]
    G = [torch.randn(E) for _ in out]
    return out, G
def variant(opt_cls, kw, rotate):
    p, G = ps(); o = opt_cls(p, **kw); k = [0]
    for q, g in zip(p, G): q.grad = g
    o.step()
    def f():
        if rotate:
            k[0] += 1
            for i, (q, g) in enumerate(zip(p, G)):
                q.grad = None if (i + k[0]) % 10 == 0 else g
        o.step()
    return f, o
A = dict(lr=1e-3)
fo, oo = variant(mf.AdamW, dict(A, backend="cpu"), True)
fa, oa = variant(mf.AdamW, dict(A, backend="cpu"), False)
ft, _ = variant(torch.optim.AdamW, dict(A, fused=True), True)
fta, _ = variant(torch.optim.AdamW, dict(A, fused=True), False)
c = count_plans(oo)
med, _ = compare({"ours, 10% grads None (rotating)": fo, "ours, all grads": fa, "torch fused, 10% None (rotating)": ft,
                  "torch fused, all grads": fta}, rounds=9, iters=max(3, 3000 // N))
report(f"AdamW {N} x {E}", med, "ours, all grads")
print("  ours rotating / torch fused rotating: %.2f ; full plans taken (rotating): %d" % (
    med["ours, 10% grads None (rotating)"] / med["torch fused, 10% None (rotating)"], c["n"]))
