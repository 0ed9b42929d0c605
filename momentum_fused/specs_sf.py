"""The update-rule specs of Schedule-Free SGD and AdamW (schedule_free v1.4 semantics; docs/algorithms.md §6,
docs/schedulefree.md): hyperparameters, the per-group host counters and the scalar packs. Registered in
``momentum_fused.specs.SPECS`` by that module."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .specs import (FINITE, LR, NONNEG, SPECS, UNIT_OPEN, Choice, Flag, Int, Pair, Real, UpdateRuleSpec,
                    lr_value)

# ---------------------------------------------------------------- schedule-free SGD / AdamW (v1.4)
# Per-group host state lives in the param group (so it is checkpointed): ``k`` (steps taken, from 0),
# ``lr_max``, ``weight_sum``, ``train_mode``; ``scheduled_lr`` (gamma_k) and ``sf_c`` (c_{k+1}) hold the
# values of the last step, written by ``_sf_group_prepare`` once per group per step and read by the
# per-tensor packs; ``polyak_lr`` is the last Polyak step (written by the optimizer's reduction pass).
# See docs/schedulefree.md.
@dataclass(frozen=True)
class SFLR:
    """A schedule-free learning rate: a finite number >= 0 (or one-element tensor) or "polyak"."""

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, str):
            if value != "polyak":
                raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0 or 'polyak')")
            return
        LR.check(name, value)


@dataclass(frozen=True)
class OptionalReal:
    """None, or a number checked by ``item``."""

    item: Real

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.item.check(name, value)


UNIT_OPEN_BOTH = Real(0.0, 1.0, lo_open=True, hi_open=True)  # (0, 1)

_SF_COMMON_HPARAMS = dict(
    lr=SFLR(), weight_decay=NONNEG, warmup_steps=Int(0, whole_floats=True), r=NONNEG, weight_lr_power=NONNEG,
    weight_rule=Choice(("lr_max", "lr_t")), f_star=FINITE, polyak_max_lr=OptionalReal(Real(0.0, lo_open=True)),
    M=Real(0.0, lo_open=True), maximize=Flag(),
    # host counters (group extras): validated so that a corrupt checkpoint fails before any change
    k=Int(0), lr_max=Real(-1.0, fp32=False), weight_sum=Real(0.0, fp32=False), train_mode=Flag())
_SF_COMMON_DEFAULTS = dict(weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0, weight_rule="lr_max",
                           f_star=0.0, polyak_max_lr=None, M=1e-8, maximize=False)
_SF_EXTRAS = dict(k=0, lr_max=-1.0, weight_sum=0.0, train_mode=True, scheduled_lr=0.0, sf_c=0.0,
                  polyak_lr=0.0)


def sf_beta(group: Mapping) -> float:
    """The interpolation beta of schedule-free: ``momentum`` (SGD) or ``betas[0]`` (AdamW)."""
    return float(group["betas"][0]) if "betas" in group else float(group["momentum"])


def sf_warmup_factor(group: Mapping) -> float:
    """(k+1)/warmup_steps during warmup, else 1 (k = steps taken so far, counted from 0)."""
    k, w = group["k"], group["warmup_steps"]
    return (k + 1) / w if k < w else 1.0


def _sf_pow(base: float, exponent: float) -> float:
    """``base ** exponent`` for base >= 0, inf where float64 overflows (Python raises OverflowError)."""
    try:
        return base ** exponent
    except OverflowError:
        return math.inf


def _sf_group_prepare(g) -> dict:
    """Once per group per step, before the packs (float64 host arithmetic, schedule_free v1.4 order): the
    group's new host counters, as a dict the optimizer writes into the group once every group has been
    computed (nothing is written here). Raises ValueError, writing nothing, when the averaging weight or
    its running sum is not finite (an lr such as 1e300 whose power overflows float64)."""
    k = g["k"]
    if isinstance(g["lr"], str):  # "polyak": gamma from the reduction pass, uniform average
        lr = float(g["polyak_lr"]) * sf_warmup_factor(g)
        return dict(scheduled_lr=lr, lr_max=max(lr, g["lr_max"]), weight_sum=g["weight_sum"] + 1.0,
                    sf_c=1.0 / (k + 1))
    lr = lr_value(g) * sf_warmup_factor(g)
    lr_max = max(lr, g["lr_max"])
    base = lr_max if g["weight_rule"] == "lr_max" else lr
    weight = _sf_pow(float(k + 1), g["r"]) * _sf_pow(base, g["weight_lr_power"])
    weight_sum = g["weight_sum"] + weight
    if not (math.isfinite(weight) and math.isfinite(weight_sum)):
        raise ValueError(f"the schedule-free averaging weight (k+1)**r * {g['weight_rule']}**weight_lr_power = "
                         f"{float(k + 1)}**{g['r']} * {base}**{g['weight_lr_power']} (running sum "
                         f"{g['weight_sum']}) is not finite in float64: lr={lr} is too large for this "
                         "weight_lr_power; the step was not taken")
    return dict(scheduled_lr=lr, lr_max=lr_max, weight_sum=weight_sum,
                sf_c=weight / weight_sum if weight_sum != 0 else 0.0)


def _sf_group_advance(g) -> None:
    g["k"] = g["k"] + 1


def _sf_cross(g) -> None:
    if "betas" in g and not 0.0 < float(g["betas"][0]) < 1.0:
        raise ValueError(f"Invalid betas[0]: {g['betas'][0]} (schedule-free needs beta1 in (0, 1): "
                         "eval() divides by it)")
    if isinstance(g["lr"], str) and g["maximize"]:
        raise ValueError("lr='polyak' needs a lower bound f_star of a minimized loss; maximize=True is "
                         "not supported with it")
    if isinstance(g["lr"], str) and g.get("inner_momentum", 0.0) != 0.0:
        raise ValueError("lr='polyak' is not supported together with inner_momentum > 0")


def _sgd_sf_advance(g, st, fresh, t):
    lr, c, beta = float(g["scheduled_lr"]), float(g["sf_c"]), sf_beta(g)
    return (lr, c, beta, lr * (beta * (1.0 - c) - 1.0), float(g["weight_decay"]))


SGD_SF_SPEC = UpdateRuleSpec(
    name="sgd_sf",
    family="schedule_free",
    hparams=dict(momentum=UNIT_OPEN_BOTH, **_SF_COMMON_HPARAMS),
    defaults=dict(lr=1.0, momentum=0.9, **_SF_COMMON_DEFAULTS),
    state_names=lambda g: ("z",),
    flag_names=(),
    flags=lambda g: (),
    scalar_names=("lr", "c", "beta", "y_coef", "weight_decay", "grad_mult"),
    advance=_sgd_sf_advance,
    cross_check=_sf_cross,
    group_advance=_sf_group_advance,
    group_prepare=_sf_group_prepare,
    group_extras=_SF_EXTRAS,
)


def _adamw_sf_advance(g, st, fresh, t):
    lr, c = float(g["scheduled_lr"]), float(g["sf_c"])
    beta1, beta2 = (float(b) for b in g["betas"])
    k = g["k"]
    mu = float(g["inner_momentum"])
    inner_bc = 1.0 - mu ** (k + 1)
    return (lr, c, beta1, lr * (beta1 * (1.0 - c) - 1.0), float(g["weight_decay"]), beta2,
            1.0 - beta2 ** (k + 1), float(g["eps"]), mu, inner_bc)


ADAMW_SF_SPEC = UpdateRuleSpec(
    name="adamw_sf",
    family="schedule_free",
    hparams=dict(betas=Pair(UNIT_OPEN), eps=NONNEG, inner_momentum=UNIT_OPEN, **_SF_COMMON_HPARAMS),
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, inner_momentum=0.0, **_SF_COMMON_DEFAULTS),
    state_names=lambda g: ("z", "exp_avg_sq") + (("exp_avg",) if g["inner_momentum"] != 0 else ()),
    flag_names=("inner_momentum",),
    flags=lambda g: (g["inner_momentum"] != 0,),
    scalar_names=("lr", "c", "beta", "y_coef", "weight_decay", "beta2", "bc2", "eps", "inner_momentum",
                  "inner_bc", "grad_mult"),
    advance=_adamw_sf_advance,
    cross_check=_sf_cross,
    group_advance=_sf_group_advance,
    group_prepare=_sf_group_prepare,
    group_extras=_SF_EXTRAS,
)

SPECS[SGD_SF_SPEC.name] = SGD_SF_SPEC
SPECS[ADAMW_SF_SPEC.name] = ADAMW_SF_SPEC
