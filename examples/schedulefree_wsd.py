"""Schedule-Free AdamW under a warmup-stable-decay schedule, with the scheduler-aware weights.

Run: python examples/schedulefree_wsd.py. Trains a small regression model twice, with
weight_rule="lr_max" (the facebookresearch default) and "lr_t" (each iterate weighted by the lr it
was taken with), and prints the loss of the averaged iterate x (eval mode) at the end.
"""
import argparse

import torch
from torch import nn

import momentum_fused as mf
from momentum_fused.schedules import wsd


def train(weight_rule: str, steps: int = 300) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = mf.AdamWScheduleFree(model.parameters(), lr=1e-2, weight_rule=weight_rule, weight_lr_power=1.0)
    sched = wsd(opt, warmup=30, stable=170, decay=100)  # linear decay to 0 over the last 100 steps
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    opt.eval()  # params now hold the averaged iterate x
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), y).item()
    opt.train()
    return loss


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300,
                    help="steps (default 300: the schedule's 30 warmup, 170 stable, 100 decay, all taken)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    for rule in ("lr_max", "lr_t"):
        print(f"weight_rule={rule!r}: final loss of x = {train(rule, args.steps):.5f}")
