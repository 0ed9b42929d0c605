"""One param group holding params of two dtypes (a bf16 model whose norms were kept fp32, in one group), and one
complex param among real ones: ours vs the same tensors split by dtype into groups / without the complex one, and
vs torch fused AdamW (foreach for complex). N tensors x E."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, momentum_fused as mf
from harness import compare, report, count_plans
torch.set_num_threads(1)
N, E = int(sys.argv[1]), int(sys.argv[2])
def ps(mixed=False, cplx=False):
    torch.manual_seed(0)
    out = []
    for i in range(N):
        dt = torch.float32 if (mixed and i % 3 == 0) else (torch.bfloat16 if mixed else torch.float32)
        if cplx and i == 0: dt = torch.complex64
        out.append(torch.nn.Parameter(torch.randn(E, dtype=dt)))
    for p in out: p.grad = torch.randn_like(p)
    return out
def split(p):
    return [{"params": [q for q in p if q.dtype == torch.bfloat16]}, {"params": [q for q in p if q.dtype != torch.bfloat16]}]
B = dict(lr=1e-3, backend="cpu")
om = mf.AdamW(ps(mixed=True), **B); os_ = mf.AdamW(split(ps(mixed=True)), **B)
oc = mf.AdamW(ps(cplx=True), **B); orl = mf.AdamW(ps(), **B)
V = {"ours mixed bf16/fp32 one group": om.step, "ours same split by dtype (2 groups)": os_.step,
     "torch fused mixed one group": torch.optim.AdamW(ps(mixed=True), lr=1e-3, fused=True).step,
     "ours 1 complex64 + real, one group": oc.step, "ours all real": orl.step,
     "torch foreach 1 complex + real": torch.optim.AdamW(ps(cplx=True), lr=1e-3, foreach=True).step,
     "torch fused all real": torch.optim.AdamW(ps(), lr=1e-3, fused=True).step}
for f in V.values(): f()
cm, cc = count_plans(om), count_plans(oc)
med, _ = compare(V, rounds=9, iters=max(3, 3000 // N))
report(f"AdamW {N} x {E}", med, "ours all real")
print("  mixed-dtype group: ours/split %.2f, ours/torch fused %.2f, full plans %d" % (
    med["ours mixed bf16/fp32 one group"] / med["ours same split by dtype (2 groups)"],
    med["ours mixed bf16/fp32 one group"] / med["torch fused mixed one group"], cm["n"]))
print("  one complex param: ours/all-real %.2f, ours/torch foreach %.2f, full plans %d" % (
    med["ours 1 complex64 + real, one group"] / med["ours all real"],
    med["ours 1 complex64 + real, one group"] / med["torch foreach 1 complex + real"], cc["n"]))
