"""torch.compile and CUDA graphs with momentum_fused (docs/ecosystem.md).

    python examples/compile_capturable.py            # CPU: compiled train step, optimizer step traced
    python examples/compile_capturable.py --cuda     # also: capture opt.step() in a CUDA graph and replay it

1. A compiled train step (forward, backward, ``opt.step()``, LR scheduler) with a tensor lr: the optimizer
   step is traced into the graph (one ``momentum_fused::bucket_step`` op per bucket), so the only graph
   breaks are torch's own (``loss.backward()`` and ``zero_grad``); a scheduler changing the lr does not
   recompile. The script prints the graph breaks and the number of compiled graphs.
2. With ``--cuda``: ``capturable=True`` keeps step counters, lr and scalars on the GPU; one ``opt.step()`` is
   captured in a CUDA graph and replayed with new gradients and a new lr, and compared with eager steps.
"""
from __future__ import annotations

import argparse

import torch

import momentum_fused as mf


def compiled_train_step(device: str, steps: int = 6) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)).to(device)
    lr = torch.tensor(3e-3, device=device)  # a tensor lr: schedulers write it in place, no recompilation
    opt = mf.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    @torch.compile
    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    counters.clear()
    gen = torch.Generator(device=device).manual_seed(1)
    for k in range(steps):
        x = torch.randn(64, 16, device=device, generator=gen)
        loss = train_step(x, x[:, :1] * 2)
        sched.step()
        print(f"step {k}: loss {loss.item():.4f}, lr {float(opt.param_groups[0]['lr']):.2e}, "
              f"compiled graphs so far {counters['stats']['unique_graphs']}")
    breaks = [r.splitlines()[0] for r in counters["graph_break"]]
    ours = [r for r in counters["graph_break"] if "momentum_fused" in r or "FusedOptimizer" in r]
    print(f"graph breaks: {breaks}")
    print(f"graph breaks from momentum_fused: {len(ours)}")
    assert not ours, ours


def cuda_graph_replay(steps: int = 8) -> None:
    torch.manual_seed(0)
    shapes = [(1024, 1024), (1024,), (4096, 256)]
    ps = [torch.randn(s, device="cuda") for s in shapes]
    qs = [p.clone() for p in ps]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(steps + 3)]
    lrs = [1e-3 * 0.9 ** k for k in range(steps + 3)]

    lr = torch.tensor(lrs[0], device="cuda")
    opt = mf.AdamW([p.requires_grad_() for p in ps], lr=lr, capturable=True)
    static = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, static):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state, the launch tables (and compiles Triton)
        for k in range(3):
            lr.fill_(lrs[k])
            for g, new in zip(static, grads[k]):
                g.copy_(new)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(3, steps + 3):
        lr.fill_(lrs[k])
        for g, new in zip(static, grads[k]):
            g.copy_(new)
        graph.replay()

    ref = mf.AdamW([q.requires_grad_() for q in qs], lr=lrs[0])
    for k in range(steps + 3):
        ref.param_groups[0]["lr"] = lrs[k]
        for q, g in zip(qs, grads[k]):
            q.grad = g.clone()
        ref.step()
    torch.cuda.synchronize()
    err = max((p - q).abs().max().item() for p, q in zip(ps, qs))
    print(f"CUDA graph: {steps} replays + 3 eager warm-up steps vs {steps + 3} eager steps: max |diff| {err:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", action="store_true", help="also run on CUDA and capture a CUDA graph")
    args = ap.parse_args()
    compiled_train_step("cpu")
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA device visible")
        compiled_train_step("cuda")
        cuda_graph_replay()


if __name__ == "__main__":
    main()
