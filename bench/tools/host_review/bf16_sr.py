"""layout="bf16_sr" vs the other bf16 layouts (master16, master) and bf16 native, same bf16 params: our step, N tensors
x E, cpu backend; and the host side alone (meta tensors + bench.frontend's null backend, standing for CUDA)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))  # (the repo root: bench)
import torch, momentum_fused as mf
from harness import compare, report
torch.set_num_threads(1)
N, E = int(sys.argv[1]), int(sys.argv[2])
from bench.frontend import register_null_backend, NULL
register_null_backend()
def ps(device="cpu"):
    out = [torch.nn.Parameter(torch.randn(E, dtype=torch.bfloat16, device=device)) for _ in range(N)]
    for p in out: p.grad = torch.randn_like(p)
    return out
V = {}
for lay in ("bf16_sr", "master16", "master", "native"):
    V[f"cpu {lay}"] = mf.AdamW(ps(), lr=1e-3, layout=lay, backend="cpu").step
for lay in ("bf16_sr", "master16"):
    V[f"meta/null {lay}"] = mf.AdamW(ps("meta"), lr=1e-3, layout=lay, backend=NULL).step
V["torch fused bf16 (native)"] = torch.optim.AdamW(ps(), lr=1e-3, fused=True).step
med, _ = compare(V, rounds=9, iters=max(3, 3000 // N))
report(f"AdamW bf16 params, {N} x {E}", med, "cpu master16")
print("  bf16_sr / master16: cpu %.2f, host-only %.2f ; bf16_sr / torch fused bf16: %.2f" % (
    med["cpu bf16_sr"] / med["cpu master16"], med["meta/null bf16_sr"] / med["meta/null master16"],
    med["cpu bf16_sr"] / med["torch fused bf16 (native)"]))
