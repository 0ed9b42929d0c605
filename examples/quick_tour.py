"""A quick tour: every dense momentum_fused optimizer trains the same small MLP on the same synthetic task
(the low-rank ones: examples/lowrank_experiments.py).

Run: python examples/quick_tour.py [--steps 300]. Prints a loss table and the backend that ran.
The task: regress the output of a fixed random "teacher" MLP from 16 inputs (noise-free, so a good
optimizer drives the loss well below its starting value).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import momentum_fused as mf


def make_task(seed=0, n=2048, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        y = teacher(x)
    return x, y


def make_model(seed=1, d=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def muon(params):  # the weight matrices on Muon, the biases on its aux AdamW (use_muon=False)
    ps = list(params)
    return mf.Muon([dict(params=[p for p in ps if p.ndim == 2], lr=0.02, weight_decay=0.01),
                    dict(params=[p for p in ps if p.ndim < 2], use_muon=False, lr=3e-3)])


# (name, factory) with settings a user might start from for a model this size.
OPTIMIZERS = [
    ("SGD", lambda p: mf.SGD(p, lr=0.05)),
    ("SGD heavy ball", lambda p: mf.SGD(p, lr=0.05, momentum=0.9)),
    ("SGD Nesterov", lambda p: mf.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("QHM (nu=0.7, beta=0.999)", lambda p: mf.QHM(p, lr=1.0, momentum=0.999, nu=0.7)),
    ("Adam", lambda p: mf.Adam(p, lr=3e-3)),
    ("AdamW", lambda p: mf.AdamW(p, lr=3e-3, weight_decay=1e-2)),
    ("AMSGrad", lambda p: mf.Adam(p, lr=3e-3, amsgrad=True)),
    ("AdamTied (beta=0.95)", lambda p: mf.AdamTied(p, lr=3e-3, beta=0.95)),
    ("NAdam", lambda p: mf.NAdam(p, lr=3e-3)),
    ("RMSprop", lambda p: mf.RMSprop(p, lr=1e-3)),
    ("signSGD", lambda p: mf.SignSGD(p, lr=1e-3)),
    ("Signum", lambda p: mf.Signum(p, lr=1e-3, momentum=0.9)),
    ("Lion", lambda p: mf.Lion(p, lr=3e-4, betas=(0.9, 0.99))),
    ("FSGDM", lambda p: mf.FSGDM(p, lr=0.05, weight_decay=0.0, n_stages=10, sigma=300)),
    ("Schedule-free SGD", lambda p: mf.SGDScheduleFree(p, lr=0.5, momentum=0.9)),
    ("Schedule-free AdamW", lambda p: mf.AdamWScheduleFree(p, lr=1e-2, warmup_steps=20)),
    ("Muon (+ AdamW for biases)", muon),
]


def run(factory, steps, x, y):
    model = make_model()
    opt = factory(model.parameters())
    loss_fn = nn.MSELoss()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    dt = (time.perf_counter() - t0) / steps
    if isinstance(opt, (mf.SGDScheduleFree, mf.AdamWScheduleFree)):
        opt.eval()  # schedule-free: evaluate the averaged iterate x
    with torch.no_grad():
        last = loss_fn(model(x), y).item()
    return first, last, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = make_task()
    backend = mf.backends.resolve(None, mf.specs.get_spec("adam"), torch.device("cpu"), torch.float32).name
    print(f"momentum_fused {mf.__version__}, torch {torch.__version__}; backends: {mf.backends.status()}")
    print(f"CPU tensors run on backend {backend!r}. Task: teacher-MLP regression, {args.steps} full-batch steps.\n")
    print(f"| {'optimizer':<26} | {'loss at 0':>10} | {'final loss':>10} | {'ratio':>8} | {'ms/step':>7} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 9}|")
    for name, factory in OPTIMIZERS:
        first, last, dt = run(factory, args.steps, x, y)
        print(f"| {name:<26} | {first:>10.4g} | {last:>10.4g} | {last / first:>8.2e} | {dt * 1e3:>7.2f} |")
    print("\n(ms/step includes the forward and backward pass of the model; see bench/ for optimizer-only timings.)")


if __name__ == "__main__":
    main()
