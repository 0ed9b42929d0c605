"""channels_last conv weights (a ResNet-50-like parameter set at half width): our AdamW step vs the same params
contiguous, and vs torch.optim.AdamW foreach / fused on the same channels_last params. Interleaved, one process."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, momentum_fused as mf
from harness import compare, report, count_plans
torch.set_num_threads(1)
torch.manual_seed(0)
W = int(sys.argv[1]) if len(sys.argv) > 1 else 2  # width divisor
def resnet50_shapes(w=W):
    shapes = [(64 // w, 3, 7, 7)]
    cin = 64 // w
    for mid, n in ((64, 3), (128, 4), (256, 6), (512, 3)):
        mid //= w; out = mid * 4
        for i in range(n):
            shapes += [(mid, cin, 1, 1), (mid, mid, 3, 3), (out, mid, 1, 1)]
            if i == 0: shapes.append((out, cin, 1, 1))
            shapes += [(mid,), (mid,), (mid,), (mid,), (out,), (out,)]
            cin = out
    shapes += [(1000, cin), (1000,)]
    return shapes
shapes = resnet50_shapes()
def make(cl):
    ps = []
    for s in shapes:
        t = torch.randn(s)
        if cl and len(s) == 4: t = t.to(memory_format=torch.channels_last)
        p = torch.nn.Parameter(t); p.grad = torch.randn_like(p); ps.append(p)
    return ps
ncl = sum(1 for s in shapes if len(s) == 4)
print(f"{len(shapes)} tensors, {ncl} conv weights, {sum(torch.Size(s).numel() for s in shapes)/1e6:.1f}M params")
kw = dict(lr=1e-3, weight_decay=0.01)
o_cl = mf.AdamW(make(True), backend="cpu", **kw)
o_c = mf.AdamW(make(False), backend="cpu", **kw)
t_fe = torch.optim.AdamW(make(True), foreach=True, **kw)
t_fu = torch.optim.AdamW(make(True), fused=True, **kw)
t_fu_c = torch.optim.AdamW(make(False), fused=True, **kw)
for o in (o_cl, o_c): o.step()
c = count_plans(o_cl)
med, _ = compare({"ours channels_last": o_cl.step, "ours contiguous": o_c.step, "torch foreach channels_last": t_fe.step,
                  "torch fused channels_last": t_fu.step, "torch fused contiguous": t_fu_c.step}, rounds=9, iters=5)
report("AdamW step, ResNet-50/%d params" % W, med, "ours contiguous")
print(f"  ours channels_last / torch fused channels_last: {med['ours channels_last']/med['torch fused channels_last']:.2f}")
print(f"  ours channels_last / torch foreach channels_last: {med['ours channels_last']/med['torch foreach channels_last']:.2f}")
print(f"  full plans taken by channels_last optimizer: {c['n']} of its steps")
# allocations of one step
from torch.profiler import profile, ProfilerActivity
for name, o in (("ours channels_last", o_cl), ("ours contiguous", o_c), ("torch fused channels_last", t_fu)):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        o.step()
    alloc = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    print(f"  {name:30s} bytes allocated in one step (profiler): {alloc/1e6:.1f} MB  (params {sum(p.numel() for g in o.param_groups for p in g['params'])*4/1e6:.1f} MB)")
