"""One ``UpdateRuleSpec`` per update rule: the single place that knows a rule's hyperparameters,
their valid ranges, its state tensors, its compile-time flags and its host scalar pack.

The scalar pack is the contract between the optimizer front-end and every backend: a fixed tuple of
float64 numbers (named by ``scalar_names``) computed on the host once per step and per tensor. Backends
never look at a param group; they receive tensors, a flags tuple and scalar packs. Time-varying numbers
(bias corrections, the NAdam mu-product, the FSGDM momentum coefficient) are folded into the pack here,
so that kernels stay free of ``pow``/``exp`` and of per-rule host logic.

The update rules themselves are written in ``momentum_fused/reference.py`` (the executable spec) and in
the kernel sources; see docs/algorithms.md for the conventions.
"""
from __future__ import annotations

import numbers
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["UpdateRuleSpec", "SPECS", "KERNEL_RULES", "get_spec", "HOST_STATE_KEYS", "StateTensor", "ElementwisePass", "MatrixPhase",
           "Traffic"]

# State entries that live on the host (never cast to the param dtype, never touched by kernels).
HOST_STATE_KEYS = ("step", "mu_product")


# Hyperparameter checks: momentum_fused/hparams.py
from .hparams import (BETAS, Choice, FINITE, Flag, Int, LR, NONNEG, Pair, Real, UNIT_OPEN, _as_real, _check_tensor_meta, lr_value)  # noqa: E402,F401


# Contract v2 (state tensors of their own shape and dtype, phases, memory traffic): momentum_fused/contract.py
from .contract import ElementwisePass, MatrixPhase, StateTensor, Traffic  # noqa: E402,F401


# --------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateRuleSpec:
    """Everything the front-end and the backends need to know about one update rule.

    name:          rule id, shared by reference.py, triton_kernels/rules.py and csrc/update_rules.h.
    family:        kernel family (which kernel body serves it).
    hparams:       hyperparameter name -> check; the group keys a rule reads.
    defaults:      constructor defaults (torch's where torch has the optimizer).
    state_names:   group -> names of the elementwise state tensors (same shape as the param), in the
                   order backends receive them.
    flag_names:    names of the compile-time flags (choose a code path, never a value).
    flags:         group -> flags tuple.
    scalar_names:  names of the host scalar pack, in order.
    advance:       (group, state, fresh, t) -> scalar pack (without grad_mult). ``t`` is the tensor's step
                   count after this step's increment when ``counts_steps`` (else None); ``fresh`` is True
                   when the state was created in this step. Bias corrections etc. are computed here.
    counts_steps:  the rule keeps a per-tensor ``step`` (torch's float32 0-d CPU tensor); the optimizer
                   increments all of a group's step tensors in one call before the packs.
    pack_reads_state: the pack depends on per-tensor host state other than ``step`` (NAdam's
                   mu_product), so it cannot be shared between tensors with equal (t, fresh).
    host_state:    (key, initial value) of that per-tensor host state: a float64 0-d CPU tensor.
    advance_many:  (group, values, fresh list, t list) -> one pack per tensor, equal to ``advance`` per
                   tensor: the optimizer keeps every tensor's ``host_state`` as a view of ``values`` (a
                   float64 [n] CPU tensor), which it advances in place with vector ops.
    cross_check:   group -> None; checks that involve several hyperparameters.
    init_check:    group -> None; checks made when a group is created (constructor, add_param_group) and not
                   at a step, where torch.optim checks them in ``__init__`` only (SGD's nesterov needs momentum:
                   a scheduler may take momentum to 0 later, and torch then steps plain SGD).
    group_advance: group -> None; per-group host counters updated once per step (FSGDM).
    group_prepare: group -> dict; per-group host scalars computed once per step *before* the packs
                   (after validation and the GradScaler check), e.g. the schedule-free c and lr_max;
                   returned, not written: the optimizer writes them once every group has been computed.
    group_extras:  host counters kept in every param group (so they are checkpointed), with their
                   initial values; not constructor arguments.
    state_tensors: group -> tuple of ``StateTensor`` (contract v2), when some state is not an elementwise
                   tensor of the param's shape and layout dtype (block scales, int8 codes) or is a work
                   buffer of one step; None: ``StateTensor(name)`` for each of ``state_names``. The
                   persistent ones must be ``state_names(group)``, in order.
    phases:        () for one elementwise pass (the rule itself); else the sequence of ``ElementwisePass``
                   and ``MatrixPhase`` one step runs (contract v2; e.g. orthogonalized momentum: momentum
                   pass, Newton-Schulz on the update, apply pass).
    traffic:       what a kernel rule's math reads and writes (``Traffic``; Muon's passes skip arrays).
    state_refusal: group -> why a layout that stores the state below fp32 precision (``Layout.reduced_state``:
                   the 8-bit codes, bf16 state) cannot hold this group's state (None: it can), checked with
                   the layout at construction, add_param_group and every step.

    ``bytes_per_elem(group)`` (fp32 roofline bytes read + written per element, docs/algorithms.md §9) follows
    from ``state_names``: ``momentum_fused.layouts.roofline_bytes``.
    """

    name: str
    family: str
    hparams: Mapping[str, Any]
    defaults: Mapping[str, Any]
    state_names: Callable[[Mapping], tuple]
    flag_names: tuple
    flags: Callable[[Mapping], tuple]
    scalar_names: tuple
    advance: Callable[[Mapping, dict, bool], tuple]
    cross_check: Callable[[Mapping], None] | None = None
    init_check: Callable[[Mapping], None] | None = None
    counts_steps: bool = False
    pack_reads_state: bool = False
    host_state: tuple | None = None
    advance_many: Callable[[Mapping, torch.Tensor, list, list], list] | None = None
    group_advance: Callable[[Mapping], None] | None = None
    group_prepare: Callable[[Mapping], dict] | None = None
    group_extras: Mapping[str, Any] = field(default_factory=dict)
    state_tensors: Callable[[Mapping], tuple] | None = None
    phases: tuple = ()
    traffic: Traffic = Traffic()
    state_refusal: Callable[[Mapping], str | None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "Scalars", namedtuple(f"{self.name}_scalars", self.scalar_names))
        object.__setattr__(self, "Flags", namedtuple(f"{self.name}_flags", self.flag_names))

    def tensors(self, group: Mapping) -> tuple:
        """Every state tensor of this rule for ``group`` (persistent first, as ``state_names``)."""
        if self.state_tensors is None:
            return tuple(StateTensor(n) for n in self.state_names(group))
        return tuple(self.state_tensors(group))

    @property
    def plain_state(self) -> bool:
        """Every state tensor is elementwise (the param's shape, the layout's state dtype) and persistent."""
        return self.state_tensors is None

    def every_state_name(self, group: Mapping) -> tuple:
        """The state names this rule keeps under ``group``'s flags or others (a flag's state stays while the flag
        is off, as torch keeps it): ``state_names`` of ``group``, then those of it with every hyperparameter
        switched on (a bool True, a number 0.5, NumPy's too: the rules' conditions are a flag or a nonzero
        coefficient)."""
        def on(v):
            if isinstance(v, bool):
                return True
            numpy_scalar = type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0
            return 0.5 if isinstance(v, numbers.Real) or numpy_scalar else v

        full = {**self.defaults, **self.group_extras, **group}
        names = tuple(self.state_names(full))
        return names + tuple(k for k in self.state_names({k: on(v) for k, v in full.items()}) if k not in names)

    def required_state(self, group: Mapping) -> tuple:
        """The state keys a param that holds any state must hold, for ``group``: a param's state is created
        whole at its first step, so a partial one (a key deleted, another optimizer's checkpoint) is refused
        rather than completed with zeros (torch.optim raises KeyError). The state tensors that a flag switched on
        later adds (SGD's momentum_buffer, AMSGrad's max_exp_avg_sq, RMSprop's grad_avg: those the rule's
        defaults do not need) may start at any step, as at a first step; host counters (``step``, NAdam's
        ``mu_product``) are required with the rest."""
        base = set(self.state_names({**self.defaults, **self.group_extras}))
        keys = tuple(k for k in self.state_names(group) if k in base)
        if self.counts_steps:
            keys += ("step",)
        if self.host_state is not None:
            keys += (self.host_state[0],)
        return keys

    def bytes_per_elem(self, group: Mapping) -> int:
        """Bytes read + written per element by one fused fp32 pass of this rule with ``group``'s flags."""
        from .layouts import roofline_bytes
        return roofline_bytes(len(self.state_names({**self.defaults, **self.group_extras, **group})))

    def validate(self, group: Mapping, where: str = "", init: bool = False) -> None:
        """Raise ValueError/TypeError naming the first invalid hyperparameter of ``group``. In a
        ``capturable`` group the value of a tensor hyperparameter (the lr) is not read: that would be a
        host sync (and impossible in a CUDA graph); its shape and dtype are checked. ``init``: ``group`` is
        being created, the constructor's defaults or an added group (``init_check`` runs too)."""
        device_values = bool(group.get("capturable", False))
        for key, check in self.hparams.items():
            if key not in group:
                raise ValueError(f"{where}missing hyperparameter {key!r} for rule {self.name!r}")
            try:
                value = group[key]
                if device_values and isinstance(value, torch.Tensor) and getattr(check, "tensor_ok", False):
                    _check_tensor_meta(key, value)
                    continue
                check.check(key, value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}{e}") from None
        for check in (self.cross_check, self.init_check if init else None):
            if check is None:
                continue
            try:
                check(group)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}{e}") from None

    def make_flags(self, group: Mapping):
        return self.Flags(*self.flags(group))

    def make_scalars(self, group: Mapping, state: dict, fresh: bool, grad_mult: float = 1.0):
        """One tensor's scalar pack, advancing its host state (``step``) first. ``grad_mult``
        multiplies the incoming gradient (maximize sign times 1/grad_scale); it is always the pack's
        last entry. (The optimizer does the same for a whole group at once, see FusedOptimizer.)"""
        t = bump_step(state) if self.counts_steps else None
        return self.Scalars(*self.advance(group, state, fresh, t), grad_mult)


def _grad_sign(group: Mapping) -> float:
    return -1.0 if group.get("maximize", False) else 1.0


def step_tensor(state: dict) -> torch.Tensor:
    """``state['step']`` as torch keeps it: a 0-d CPU tensor of torch's scalar dtype (float32; float64 under a
    default dtype float64), created at 0, or converted; a float64 or integer count stays exact in float64 (a
    review, 2026-12-08: float32 rounded a float64 count past 2**24, which then stopped advancing)."""
    step = state.get("step")
    if not isinstance(step, torch.Tensor) or step.dtype not in (torch.float32, torch.float64) or step.dim() != 0 \
            or step.device.type != "cpu":
        step = state["step"] = torch.tensor(float(0.0 if step is None else step), dtype=step_dtype(step))
    return step


def step_dtype(value=None) -> torch.dtype:
    """The dtype of a host step counter holding ``value`` (None: a new one): float64 for a float64 or integer
    tensor and under torch's default dtype float64 (torch's ``_get_scalar_dtype``), else float32."""
    wide = isinstance(value, torch.Tensor) and (value.dtype == torch.float64 or not value.is_floating_point())
    return torch.float64 if wide or torch.get_default_dtype() == torch.float64 else torch.float32


def bump_step(state: dict) -> float:
    """Increment ``state['step']`` (before use, as torch) and return the new count."""
    step = step_tensor(state)
    step += 1
    return float(step.item())


# ---------------------------------------------------------------- sgd (torch.optim.SGD convention)
def _sgd_cross(g):  # (at every step: nesterov with a dampening; momentum 0, which a scheduler may set, is plain SGD)
    if g["nesterov"] and g["momentum"] != 0 and g["dampening"] != 0:
        _sgd_init(g)


def _sgd_init(g):  # (torch's __init__ check, when a group is created)
    if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening = 0 "
                         f"(got momentum={g['momentum']}, dampening={g['dampening']})")


SGD_SPEC = UpdateRuleSpec(
    name="sgd",
    family="one_buffer",
    hparams=dict(lr=LR, momentum=UNIT_OPEN, dampening=Real(0.0, 1.0), weight_decay=NONNEG,
                 nesterov=Flag(), maximize=Flag()),
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False),
    state_names=lambda g: ("momentum_buffer",) if g["momentum"] != 0 else (),
    flag_names=("momentum", "nesterov"),
    flags=lambda g: (g["momentum"] != 0, bool(g["nesterov"])),
    scalar_names=("lr", "weight_decay", "momentum", "dampening", "first", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["weight_decay"]), float(g["momentum"]),
                                  float(g["dampening"]), 1.0 if fresh else 0.0),
    cross_check=_sgd_cross,
    init_check=_sgd_init,
)

# ---------------------------------------------------------------- qhm (Ma & Yarats, qhoptim)
QHM_SPEC = UpdateRuleSpec(
    name="qhm",
    family="one_buffer",
    hparams=dict(lr=LR, momentum=UNIT_OPEN, nu=FINITE, weight_decay=NONNEG,
                 weight_decay_type=Choice(("grad", "direct")), maximize=Flag()),
    defaults=dict(lr=1.0, momentum=0.999, nu=0.7, weight_decay=0.0, weight_decay_type="grad",
                  maximize=False),
    state_names=lambda g: ("momentum_buffer",),
    flag_names=("direct_decay",),
    flags=lambda g: (g["weight_decay_type"] == "direct",),
    scalar_names=("lr", "weight_decay", "momentum", "nu", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["weight_decay"]), float(g["momentum"]),
                                  float(g["nu"])),
)


# ---------------------------------------------------------------- adam / adamw / amsgrad / tied
def _adam_advance(g, st, fresh, t):
    beta1, beta2 = (float(b) for b in g["betas"])
    lr = lr_value(g)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    return (lr, float(g["weight_decay"]), beta1, beta2, float(g["eps"]), lr / bc1, bc2 ** 0.5)


ADAM_SPEC = UpdateRuleSpec(
    name="adam",
    family="two_buffer",
    hparams=dict(lr=LR, betas=BETAS, eps=NONNEG, weight_decay=NONNEG, amsgrad=Flag(),
                 decoupled_weight_decay=Flag(), maximize=Flag()),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                  decoupled_weight_decay=False, maximize=False),
    state_names=lambda g: ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if g["amsgrad"] else ()),
    flag_names=("decoupled", "amsgrad"),
    flags=lambda g: (bool(g["decoupled_weight_decay"]), bool(g["amsgrad"])),
    scalar_names=("lr", "weight_decay", "beta1", "beta2", "eps", "step_size", "bc2_sqrt", "grad_mult"),
    advance=_adam_advance,
    counts_steps=True,
)


# ---------------------------------------------------------------- nadam (torch convention)
def _nadam_mus(g, t):
    """(mu_t, mu_{t+1}) of torch's NAdam momentum schedule."""
    beta1, psi = float(g["betas"][0]), float(g["momentum_decay"])
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)), beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))


def _nadam_pack(g, t, mu, mu_next, mu_product):
    """The pack of a tensor at step t whose mu_product (after this step's multiply) is ``mu_product``."""
    beta1, beta2 = (float(b) for b in g["betas"])
    lr = lr_value(g)
    return (lr, float(g["weight_decay"]), beta1, beta2, float(g["eps"]), 1.0 - beta2 ** t,
            -lr * (1.0 - mu) / (1.0 - mu_product), -lr * mu_next / (1.0 - mu_product * mu_next))


def _nadam_advance(g, st, fresh, t):
    """One tensor: its ``mu_product`` (a float64 0-d CPU tensor) is multiplied by mu_t in place."""
    mu, mu_next = _nadam_mus(g, t)
    prod = st.get("mu_product")
    if not isinstance(prod, torch.Tensor):
        prod = st["mu_product"] = torch.tensor(1.0 if prod is None else float(prod), dtype=torch.float64)
    prod.mul_(mu)
    return _nadam_pack(g, t, mu, mu_next, float(prod.item()))


def _nadam_advance_many(g, prods, fresh, ts):
    """All tensors of a group at once (``UpdateRuleSpec.advance_many``): ``prods`` is a float64 [n] tensor
    whose elements are the tensors' mu_product (their state holds views of it), multiplied in place by
    each tensor's mu_t with one multiply; the same IEEE products as ``_nadam_advance``'s per-tensor ones.
    Tensors with equal (t, mu_product) share one pack tuple."""
    mus = {t: _nadam_mus(g, t) for t in set(ts)}
    if len(mus) == 1:
        prods.mul_(mus[ts[0]][0])
    elif ts:
        prods.mul_(torch.tensor([mus[t][0] for t in ts], dtype=torch.float64))
    values = prods.tolist()
    n = len(ts)
    if n and ts.count(ts[0]) == n and values.count(values[0]) == n:  # the usual case: one pack
        return [_nadam_pack(g, ts[0], *mus[ts[0]], values[0])] * n
    cache, out = {}, []
    for t, v in zip(ts, values):
        pack = cache.get((t, v))
        if pack is None:
            pack = cache[(t, v)] = _nadam_pack(g, t, *mus[t], v)
        out.append(pack)
    return out


NADAM_SPEC = UpdateRuleSpec(
    name="nadam",
    family="two_buffer",
    hparams=dict(lr=LR, betas=BETAS, eps=NONNEG, weight_decay=NONNEG, momentum_decay=NONNEG,
                 decoupled_weight_decay=Flag(), maximize=Flag()),
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                  decoupled_weight_decay=False, maximize=False),
    state_names=lambda g: ("exp_avg", "exp_avg_sq"),
    flag_names=("decoupled",),
    flags=lambda g: (bool(g["decoupled_weight_decay"]),),
    scalar_names=("lr", "weight_decay", "beta1", "beta2", "eps", "bc2", "grad_coef", "exp_avg_coef",
                  "grad_mult"),
    advance=_nadam_advance,
    counts_steps=True,
    pack_reads_state=True,
    host_state=("mu_product", 1.0),
    advance_many=_nadam_advance_many,
)


# ---------------------------------------------------------------- rmsprop (torch convention)
def _rmsprop_advance(g, st, fresh, t):
    return (lr_value(g), float(g["weight_decay"]), float(g["alpha"]), float(g["eps"]),
            float(g["momentum"]))


RMSPROP_SPEC = UpdateRuleSpec(
    name="rmsprop",
    family="two_buffer",
    hparams=dict(lr=LR, alpha=UNIT_OPEN, eps=NONNEG, weight_decay=NONNEG, momentum=UNIT_OPEN,
                 centered=Flag(), maximize=Flag()),
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                  maximize=False),
    state_names=lambda g: ("square_avg",) + (("momentum_buffer",) if g["momentum"] > 0 else ())
    + (("grad_avg",) if g["centered"] else ()),
    flag_names=("momentum", "centered"),
    flags=lambda g: (g["momentum"] > 0, bool(g["centered"])),
    scalar_names=("lr", "weight_decay", "alpha", "eps", "momentum", "grad_mult"),
    advance=_rmsprop_advance,
    counts_steps=True,
    # the centered variance v - a^2 of two moments rounded apart: an 8-bit code is off by up to half a gap (~1 % of
    # v near its block's top, all of it below the smallest code); a bf16 average of alpha 0.99 stalls within
    # ~ulp / (2 (1 - alpha)) ~ 20 % of its value (rounded to nearest) or wanders by about an ulp (rounded
    # stochastically). So v - a^2 is noise where the variance is small beside a^2 and turns negative: NaN params
    # from finite gradients (8-bit: found 2026-12-06; bf16_sr within ~240 steps of gradients 1 + 0.01 N(0, 1),
    # bf16_state where fp32 state stays finite: 2026-12-07). bitsandbytes' 8-bit RMSprop refuses centered too;
    # native bf16 params (bf16 state, torch.optim's own arithmetic) are kept as torch runs them (docs/layouts.md)
    state_refusal=lambda g: ("centered=True computes the variance square_avg - grad_avg^2 from two moments "
                             "rounded apart to the layout's reduced precision (8-bit codes, or bf16, in which "
                             "an average of alpha 0.99 stalls or wanders), which turns it negative (NaN params) "
                             "wherever the variance is small beside the mean; use centered=False, or a layout "
                             "with fp32 state (native with fp32 params; master or master16 with bf16 params)")
    if g["centered"] else None,
)

# ---------------------------------------------------------------- signum / signSGD (decoupled decay)
SIGNUM_SPEC = UpdateRuleSpec(
    name="signum",
    family="one_buffer",
    hparams=dict(lr=LR, momentum=UNIT_OPEN, weight_decay=NONNEG, maximize=Flag()),
    defaults=dict(lr=1e-4, momentum=0.9, weight_decay=0.0, maximize=False),
    state_names=lambda g: ("momentum_buffer",) if g["momentum"] != 0 else (),
    flag_names=("momentum",),
    flags=lambda g: (g["momentum"] != 0,),
    scalar_names=("lr", "weight_decay", "momentum", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["weight_decay"]), float(g["momentum"])),
)

# ---------------------------------------------------------------- lion (Chen et al. 2023)
LION_SPEC = UpdateRuleSpec(
    name="lion",
    family="one_buffer",
    hparams=dict(lr=LR, betas=BETAS, weight_decay=NONNEG, maximize=Flag()),
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    state_names=lambda g: ("exp_avg",),
    flag_names=(),
    flags=lambda g: (),
    scalar_names=("lr", "weight_decay", "beta1", "beta2", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["weight_decay"]), float(g["betas"][0]),
                                  float(g["betas"][1])),
)


# ---------------------------------------------------------------- fsgdm (official yinleung/FSGDM)
def _fsgdm_cross(g):
    if g["sigma"] < g["n_stages"]:
        raise ValueError(f"Invalid sigma: {g['sigma']} (the total step count must be >= n_stages="
                         f"{g['n_stages']}, otherwise a stage has zero steps)")


def fsgdm_momentum(group: Mapping) -> float:
    """u = stage / (stage + c*sigma), stage = (s // spe) * spe, spe = sigma // N; s = group['step']."""
    spe = group["sigma"] // group["n_stages"]
    stage = (group["step"] // spe) * spe
    return stage / (stage + group["c_scaling"] * group["sigma"])


def _fsgdm_group_advance(g):
    g["step"] = g["step"] + 1.0


FSGDM_SPEC = UpdateRuleSpec(
    name="fsgdm",
    family="one_buffer",
    hparams=dict(lr=LR, weight_decay=NONNEG, c_scaling=Real(0.0, lo_open=True), v_coefficient=NONNEG,
                 n_stages=Int(1), sigma=Int(1), step=Real(1.0), maximize=Flag()),
    defaults=dict(lr=1e-1, weight_decay=5e-4, c_scaling=33e-3, v_coefficient=1.0, n_stages=300,
                  sigma=117000, maximize=False),
    state_names=lambda g: ("momentum_buffer",),
    flag_names=(),
    flags=lambda g: (),
    scalar_names=("lr", "weight_decay", "u", "v", "first", "grad_mult"),
    advance=lambda g, st, fresh, t: (lr_value(g), float(g["weight_decay"]), float(fsgdm_momentum(g)),
                                  float(g["v_coefficient"]), 1.0 if fresh else 0.0),
    cross_check=_fsgdm_cross,
    group_advance=_fsgdm_group_advance,
    group_extras=dict(step=1.0),
)

# The rules the compiled kernels implement, in the order of their ids (the one definition of the ids: the C++
# enum Rule in csrc/generated/tables.h and the backends' tables are derived from it).
KERNEL_RULES = ("sgd", "qhm", "adam", "nadam", "rmsprop", "signum", "lion", "fsgdm", "sgd_sf", "adamw_sf",
                "muon_momentum", "muon_apply")

SPECS: dict[str, UpdateRuleSpec] = {
    s.name: s for s in (SGD_SPEC, QHM_SPEC, ADAM_SPEC, NADAM_SPEC, RMSPROP_SPEC, SIGNUM_SPEC,
                        LION_SPEC, FSGDM_SPEC)
}


def get_spec(name: str) -> UpdateRuleSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; known: {sorted(SPECS)}") from None


# the schedule-free specs (momentum_fused/specs_sf.py) register themselves in SPECS
from . import specs_sf  # noqa: E402,F401
from .specs_sf import sf_beta, sf_warmup_factor  # noqa: E402,F401
# the Muon specs (momentum_fused/specs_muon.py) register themselves in SPECS (its two elementwise passes are in
# KERNEL_RULES; the multi-phase rule "muon" itself is not)
from . import specs_muon  # noqa: E402,F401
