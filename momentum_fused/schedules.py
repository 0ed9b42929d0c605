"""Learning-rate schedules (torch.optim.lr_scheduler objects) for any torch optimizer.

``wsd``: warmup-stable-decay. With the schedule-free optimizers use it together with
``weight_rule="lr_t"`` (Pun, Buchholz, Gower, "Schedulers for Schedule-free"); see
docs/schedulefree.md. Do not combine its warmup with the optimizer's own ``warmup_steps`` unless a
double warmup is intended (the two factors multiply).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["wsd", "wsd_factor"]

_SHAPES = ("linear", "cosine", "sqrt")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"wsd: {name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"wsd: invalid {name}: {value} (must be >= 0)")


def wsd_factor(step: int, warmup: int, stable: int, decay: int, final_lr_frac: float = 0.0,
               decay_shape: str = "linear") -> float:
    """The multiplier of the base lr at scheduler step ``step`` (0 for the first optimizer step).

    - warmup: ``(step + 1) / warmup`` for ``step < warmup`` (the first step is not wasted at lr 0; the
      last warmup step reaches 1), the same convention as the schedule-free ``warmup_steps``;
    - stable: 1 for the next ``stable`` steps;
    - decay: with u = (step - warmup - stable + 1) / decay in (0, 1] over the next ``decay`` steps,
      ``final + (1 - final) * s(u)``, s = 1 - u (linear), (1 + cos(pi u)) / 2 (cosine), 1 - sqrt(u)
      (sqrt); the last decay step reaches ``final_lr_frac`` exactly;
    - after: ``final_lr_frac``.
    """
    if decay_shape not in _SHAPES:
        raise ValueError(f"wsd_factor: invalid decay_shape: {decay_shape!r} (must be one of {list(_SHAPES)})")
    if step < warmup:
        return (step + 1) / warmup
    step -= warmup
    if step < stable:
        return 1.0
    step -= stable
    if step >= decay:
        return float(final_lr_frac)
    u = (step + 1) / decay
    if decay_shape == "linear":
        s = 1.0 - u
    elif decay_shape == "cosine":
        s = 0.5 * (1.0 + math.cos(math.pi * u))
    else:
        s = 1.0 - math.sqrt(u)
    return final_lr_frac + (1.0 - final_lr_frac) * s


def wsd(optimizer, warmup: int, stable: int, decay: int, final_lr_frac: float = 0.0,
        decay_shape: str = "linear", last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup-stable-decay schedule as a ``torch.optim.lr_scheduler.LambdaLR``; call ``.step()`` after
    each ``optimizer.step()``. The factors are :func:`wsd_factor`. ``warmup``, ``stable``, ``decay``:
    step counts (ints >= 0, not all zero); ``final_lr_frac`` in [0, 1]: the final lr as a fraction of
    the base lr; ``decay_shape``: "linear", "cosine" or "sqrt"; ``last_epoch``: as LambdaLR (to resume,
    prefer ``scheduler.load_state_dict``). Every param group needs a numeric lr (not "polyak").

    Example::

        opt = momentum_fused.AdamWScheduleFree(model.parameters(), lr=2e-3, weight_rule="lr_t")
        sched = momentum_fused.schedules.wsd(opt, warmup=100, stable=800, decay=100)
        for batch in data:
            loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad(); sched.step()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"wsd: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for name, value in (("warmup", warmup), ("stable", stable), ("decay", decay)):
        _check_int(name, value)
    if warmup + stable + decay == 0:
        raise ValueError("wsd: warmup + stable + decay must be > 0")
    if isinstance(final_lr_frac, bool) or not isinstance(final_lr_frac, numbers.Real) \
            or not 0.0 <= float(final_lr_frac) <= 1.0:
        raise ValueError(f"wsd: invalid final_lr_frac: {final_lr_frac!r} (must be a number in [0, 1])")
    if decay_shape not in _SHAPES:
        raise ValueError(f"wsd: invalid decay_shape: {decay_shape!r} (must be one of {list(_SHAPES)})")
    if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
        raise ValueError(f"wsd: invalid last_epoch: {last_epoch!r} (must be an int >= -1)")
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("initial_lr", group["lr"]) if last_epoch != -1 else group["lr"]
        if isinstance(lr, str) or isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
            raise ValueError(f"wsd: param group {i} has lr={lr!r}; a schedule needs a numeric lr")
    frac = float(final_lr_frac)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: wsd_factor(s, warmup, stable, decay, frac, decay_shape), last_epoch=last_epoch)
