"""Schedule-Free SGD and AdamW (Defazio et al. 2024; convention: facebookresearch/schedule_free v1.4).

Memory-efficient form: during training the param tensor holds y, the state holds ``z`` (created as a
copy of y on the first step of the tensor; + ``exp_avg_sq`` for AdamW). The averaged iterate x is not
stored; it follows from y = (1 - beta) z + beta x:

    x = (y - (1 - beta) z) / beta,      z - x = (z - y) / beta.

``eval()`` puts x into the params (p <- lerp(p, z, 1 - 1/beta)), ``train()`` puts y back
(p <- lerp(p, z, 1 - beta)). Both are idempotent. **The optimizers start in train mode** (unlike
schedule_free >= 1.3, which starts in eval mode), so ``step()`` works at once; ``step()`` in eval mode
raises. The mode is stored in every param group as ``train_mode`` and therefore in the state_dict.

Host counters live in the param groups (checkpointed): ``k``, ``lr_max``, ``weight_sum``; the last
step's ``scheduled_lr`` (gamma_k), ``sf_c`` (c_{k+1}) and ``polyak_lr`` are kept there for logging.
See docs/schedulefree.md for the learning-rate modes, the weight rules and the Polyak step.
"""
from __future__ import annotations

import numbers
import weakref
from collections import namedtuple

import torch

from .. import layouts as _layouts
from .. import distributed as _dist
from .. import reference
from ..specs import sf_beta
from .amp import _drop_amp_attrs
from .base import FusedOptimizer, _real
from .masters import _chunks

__all__ = ["SGDScheduleFree", "AdamWScheduleFree", "polyak_reductions"]

_ReduceScalars = namedtuple("_ReduceScalars", ("grad_mult", "beta2", "bc2", "eps"))


def polyak_reductions(rule: str, group: dict, params, state, inv_scale: float = 1.0, grad_of=None):
    """The reduction pass of the Polyak step for one param group: returns
    (<g, z - y>, ||g||^2_{D^-1}) as Python floats, summed in float64 over ``params`` (the group's
    params that have a gradient). Reads, never writes. ``state`` is the optimizer's state mapping.
    Per-tensor math: ``momentum_fused.reference.REDUCTIONS[rule]`` (a fused backend can replace it). ``grad_of``:
    a param's gradient as the step reads it (``FusedOptimizer.grad_of``; None: ``.grad``)."""
    fn = reference.REDUCTIONS[rule]
    if "betas" in group:
        beta2 = float(group["betas"][1])
        s = _ReduceScalars(inv_scale, beta2, 1.0 - beta2 ** (group["k"] + 1), float(group["eps"]))
    else:
        s = _ReduceScalars(inv_scale, 0.0, 1.0, 0.0)
    names = ("z", "exp_avg_sq") if "betas" in group else ("z",)
    # (device, DTensor shard groups) -> [dot, sq], accumulated on the device: one host sync per device,
    # not per tensor. DTensors (FSDP2) contribute their local shards; the partial sums are then
    # all-reduced over the mesh dims they are sharded on (the same order on every rank: params order).
    sums = {}
    for p in params:
        st = state.get(p, {})
        tensors = tuple(_real(_dist.local(st[n])) for n in names) if all(n in st for n in names) else None
        g = p.grad if grad_of is None else grad_of(p)
        d, q = fn(_real(_dist.local(p)), _real(_dist.local(g)), tensors, s, None)
        key = (d.device, _dist.shard_groups(p))
        acc = sums.get(key)
        if acc is None:
            sums[key] = [d.clone(), q.clone()]
        else:
            acc[0] += d
            acc[1] += q
    totals = [_dist.all_reduce_sums(torch.stack([a[0], a[1]]), groups) for (_, groups), a in sums.items()]
    return (sum(float(t[0]) for t in totals), sum(float(t[1]) for t in totals))


def _agree_across_ranks(zero, check) -> None:
    """``check()`` on every rank of ``zero``'s process group, then raise on all of them if it raised on any (this
    rank's own error, else a RuntimeError saying another rank's failed): under ZeRO a rank checks only its partition, and one
    rank refusing while the others moved their params and waited in the broadcast of every partition hung them."""
    import torch.distributed as dist

    try:
        check()
        err = None
    except Exception as e:  # noqa: BLE001 (re-raised below, after the ranks agree)
        err = e
    device = next((p.device for g in zero.param_groups for p in g["params"]), torch.device("cpu"))
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=zero.process_group)
    if err is not None:
        raise err
    if int(flag.item()):
        raise RuntimeError("train()/eval(): the check failed on another rank of the ZeroRedundancyOptimizer (see its "
                           "error); nothing moved on this rank")


def _loss_tensor(loss):
    """The closure's loss as a tensor when it is one, a NumPy array or a Python or NumPy number (a bool is not a
    loss), else None."""
    if isinstance(loss, torch.Tensor):
        return loss.detach()
    if type(loss).__module__ == "numpy" and hasattr(loss, "dtype") or \
            isinstance(loss, numbers.Number) and not isinstance(loss, bool):
        try:
            return torch.as_tensor(loss)
        except (TypeError, RuntimeError):  # (a NumPy dtype torch has no tensor of: not a loss it can read)
            return None
    return None


def _loss_value(loss):
    """The closure's loss as a float, or None when it is not a real scalar (a Python or NumPy real number, a
    one-element tensor or NumPy array)."""
    t = _loss_tensor(loss)
    if t is None or t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        return None
    return float(t.item())


def _loss_nonfinite(loss):
    """A non-finite value of the closure's loss (any element of a tensor or NumPy array of several; a complex
    one's real or imaginary part), else None."""
    t = _loss_tensor(loss)
    if t is None or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return None
    bad = t[~torch.isfinite(t)]
    return bad.reshape(-1)[0].item() if bad.numel() else None


# z is an iterate (the param's scale and precision), not a moment estimate. Not the 8-bit layouts: codes of a
# block's absmax would move it by up to 1/127 of that max (docs/algorithms.md §11). Not bf16_state (fp32
# params, bf16 state): a bf16 z drops every update below half its ulp, and x follows z (a review found z
# unmoved after 200 steps of lr 1e-3, 85 % of a least-squares run's progress lost; 2026-12-06)
_SF_REFUSED = {
    **{n: "z is an iterate, not a moment estimate: 8-bit codes relative to a block's maximum would move it by "
          "up to 1/127 of that maximum" for n in _layouts.LAYOUTS if _layouts.get_layout(n).int8},
    "bf16_state": "z is an iterate kept in the state dtype: in bf16 every update smaller than half its ulp is "
                  "lost and training stalls; keep fp32 state (native), or with bf16 params use master, "
                  "master16 or bf16_sr"}


class _ScheduleFree(FusedOptimizer):
    """Shared train/eval, error checks and the Polyak reduction pass."""

    unsupported_layout_reasons = _SF_REFUSED
    supported_layouts = tuple(n for n in FusedOptimizer.supported_layouts if n not in _SF_REFUSED)
    _zero = None  # (the class default: an optimizer pickled before the attribute existed)

    def __init__(self, params, *args, **kwargs):
        # torch's ZeroRedundancyOptimizer builds this optimizer over one rank's partition of the params: the Polyak
        # step's inner products would then be this partition's (each rank its own step size: 0.5 off one process in
        # 5 steps of a small MLP), and no DTensor says where the other partitions are; train()/eval() move only this
        # partition's params, so they broadcast every partition afterwards, as ZeRO does after a step
        zero, params = _dist.zero_building(self, params)
        super().__init__(params, *args, **kwargs)
        self._zero = None if zero is None else weakref.ref(zero)
        self._check_partition()

    def _check_partition(self) -> None:
        """lr="polyak" needs inner products over whole params: refused where this optimizer holds only a part of
        them as plain tensors, which no DTensor places (each rank would take its own step size, silently)."""
        polyak = [g for g in self.param_groups if g.get("lr") == "polyak"]
        if not polyak:
            return
        name = type(self).__name__
        if self._zero is not None:
            raise ValueError(f"{name}: lr='polyak' is not supported under ZeroRedundancyOptimizer: the step size "
                             "needs inner products over all params, and this optimizer holds only this rank's "
                             "partition (each rank would take its own step size). Use a numeric lr, or DDP or "
                             "FSDP2 (whose sharded inner products are all-reduced)")
        if any(_dist.is_fsdp1_flat(p) for g in polyak for p in g["params"]):
            raise ValueError(f"{name}: lr='polyak' is not supported with FSDP1 (FullyShardedDataParallel): its "
                             "params are flat shards, plain tensors of one rank's part, so the inner products "
                             "would be this rank's (each rank would take its own step size). Use FSDP2 "
                             "(fully_shard: DTensor shards, all-reduced) or DDP")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if len(self.param_groups) > 1:  # a group added later joins the optimizer's current mode
            self.param_groups[-1]["train_mode"] = self.param_groups[0]["train_mode"]

    def _check_swap(self, to_train: bool) -> None:
        """Before ``_swap`` writes anything: the hyperparameters, and the tensors it reads and writes (z, the master
        or its remainder, the param) of every group that moves. A z of another shape raised torch's message after
        the groups before it had moved (and, within a group, the params before it, the group's mode unchanged: a
        retry moved those params twice)."""
        name = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            self.spec.validate(group, where=f"{name} param group {gi}: ")
            if group["train_mode"] == to_train:
                continue
            lay = self._check_layout_keys(group, f"{name} param group {gi}: ")
            for pi, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st or st.get("z") is None:
                    continue
                if _layouts.is_remainder_bytes(st.get(_layouts.REMAINDER_KEY)):  # a checkpoint's form, written by
                    # ZeRO's load: back to int16, as the step takes it (optim/checks.py)
                    st[_layouts.REMAINDER_KEY] = _layouts.remainder_from_bytes(st[_layouts.REMAINDER_KEY])
                self._check_master_keys(st, lay, p, pi, gi)
                keys = ("z", *lay.extra_keys)
                for key in keys:
                    t = st.get(key)
                    want = p.dtype if lay.name == "native" else lay.dtype_of(key, p.dtype)
                    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != want
                                          or t.device != p.device):
                        self._raise_bad_state(p, key, t, pi, gi, want)
                self._check_state_objects(p, st, pi, gi, keys, keys)
                if p.is_inference() and not torch.is_inference_mode_enabled():
                    raise RuntimeError(f"{self._where(p, pi, gi)} is an inference tensor (made under "
                                       "torch.inference_mode()): train()/eval() cannot move it in place")

    @torch.no_grad()
    def _swap(self, to_train: bool) -> None:
        zero = None if self._zero is None else self._zero()
        if self._zero is None:
            self._check_swap(to_train)
        else:
            if not hasattr(zero, "_sync_params"):
                raise RuntimeError(f"{type(self).__name__}: built by a ZeroRedundancyOptimizer that is gone or has no "
                                   "_sync_params(): train()/eval() would move only this rank's partition of the params")
            _agree_across_ranks(zero, lambda: self._check_swap(to_train))
        moved = any(g["train_mode"] != to_train for g in self.param_groups)
        # layout="master": params written since the last step (or loaded) restart their masters before these move
        # (optim/masters.py; the swap below copies the master into the param, which would undo the write)
        self._sync_written_params()
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue  # already there: calling train()/eval() twice is harmless
            beta = sf_beta(group)
            weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta
            for p in group["params"]:
                st = self.state.get(p, {})
                z = st.get("z")
                if z is None:
                    continue
                master, lo = st.get("master"), st.get(_layouts.REMAINDER_KEY)
                if master is not None:  # the master layout: move the fp32 copy, the param follows (RNE)
                    master.lerp_(z.to(master.device), weight)
                    p.copy_(master)
                elif lo is not None:  # master16: the same move of the decoded master, encoded again, over flat
                    # slices (layouts.CODEC_CHUNK): a decoded whole param took ~45 bytes an element (a review)
                    for pc, lc, zc in _chunks(_dist.local(p), _dist.local(lo), _dist.local(z),
                                              chunk=_layouts.CODEC_CHUNK):
                        m = _layouts.master16_decode(pc, lc).view(pc.shape)
                        m.lerp_(zc.to(m.device), weight)
                        hi, low = _layouts.master16_encode(m)
                        pc.copy_(hi.view(pc.shape))
                        lc.copy_(low.view(lc.shape))
                else:  # z may be narrower than p (bf16_state): lerp in the param's dtype, rounded once
                    p.lerp_(z.to(p.device, p.dtype), weight)
            group["train_mode"] = to_train
        self._note_masters()  # (the swap wrote the params: not a user's write)
        if zero is not None and moved:  # (a collective: every rank calls train()/eval(), as every rank steps)
            zero._sync_params()
            # ZeRO copies its own groups' keys onto this optimizer's before a step and before consolidating a
            # state_dict: its train_mode, stale, made step() run from x and train() a no-op after that
            for zg, g in zip(zero.param_groups, self.param_groups):
                zg["train_mode"] = g["train_mode"]

    def train(self, mode: bool = True):
        """Put y into the params (p <- lerp(p, z, 1 - beta)); required before ``step()``."""
        self._swap(bool(mode))
        return self

    def eval(self):
        """Put the averaged iterate x into the params (p <- lerp(p, z, 1 - 1/beta)), for evaluation
        and for saving a model. ``train()`` undoes it up to round-off."""
        self._swap(False)
        return self

    @property
    def training(self) -> bool:
        for gi, g in enumerate(self.param_groups):
            if "train_mode" not in g:
                raise ValueError(f"{type(self).__name__} param group {gi}: missing key 'train_mode' (deleted from "
                                 "the group?): it says where the params are, True after train() (y), False after "
                                 "eval() (x); put it back")
        return all(g["train_mode"] for g in self.param_groups)

    @torch._disable_dynamo  # as FusedOptimizer.step: one graph break at the call under torch.compile
    @torch.no_grad()
    def step(self, closure=None):
        name = type(self).__name__
        try:
            if not self.training:
                raise RuntimeError(f"{name}.step() called in eval mode: the params hold the averaged iterate x. "
                                   "Call optimizer.train() before training steps (and optimizer.eval() before "
                                   "evaluating or saving the model).")
            self._check_partition()  # (an lr set to "polyak" since the construction)
            if closure is None and any(g.get("lr") == "polyak" for g in self.param_groups):  # (a deleted lr, or
                # another string: the full plan names it)
                raise ValueError(f"{name}: lr='polyak' needs a closure that re-evaluates the model and returns "
                                 "the loss: optimizer.step(closure)")
        except BaseException:  # (refused before FusedOptimizer's step: GradScaler's grad_scale and found_inf not
            _drop_amp_attrs(self)  # left for the next step, which would divide twice or skip: a review, 2026-12-08)
            raise
        return super().step(closure)

    def _prepare_step(self, plan, loss, inv_scale, created=None):
        name = type(self).__name__
        if loss is not None:
            f = _loss_nonfinite(loss)
            if f is not None:
                raise ValueError(f"{name}: the closure returned a non-finite loss ({f}); the step was not "
                                 "taken (params, state and counters are unchanged)")
        polyak = [(group, items) for group, _, items, _ in plan if isinstance(group["lr"], str)]
        if polyak:
            f = _loss_value(loss)
            if f is None:
                raise ValueError(f"{name}: lr='polyak' needs the closure to return the loss as a real number or a "
                                 f"one-element real tensor, got {type(loss).__name__}"
                                 + (f" of dtype {loss.dtype}" if isinstance(loss, torch.Tensor) else ""))
            gammas = []
            for group, items in polyak:  # reduction pass: reads only (gamma is written with the other counters)
                dot, sq = polyak_reductions(self.rule, group, items, self.state, inv_scale, self.grad_of)
                num = max(f - float(group["f_star"]) + dot, 0.0)
                # a group whose gradients are all zero has no Polyak information: no step (its z stays, weight
                # decay included, which (f - f*)/M would scale up, docs/schedulefree.md)
                gamma = num / max(sq, float(group["M"])) if sq > 0.0 else 0.0
                if group["polyak_max_lr"] is not None:
                    gamma = min(gamma, float(group["polyak_max_lr"]))
                gammas.append(gamma)
            overrides = {id(group): {"polyak_lr": gamma} for (group, _), gamma in zip(polyak, gammas)}
        else:
            overrides = {}
        groups = [group for group, *_ in plan]
        self._apply_group_prepare(groups, [overrides.get(id(g)) for g in groups])  # all groups, or none
        for group, _, items, _ in plan:  # z starts as a copy of y (schedule_free convention)
            sdt = _layouts.get_layout(group["layout"]).state_dtype_for
            for p in items:
                st = self.state[p]
                if "z" not in st:
                    st["z"] = p.detach().to(dtype=sdt(p.dtype), memory_format=torch.preserve_format, copy=True)
                    if created is not None:
                        created.append((st, "z"))


class SGDScheduleFree(_ScheduleFree):
    """Schedule-Free SGD (docs/algorithms.md §6), schedule_free v1.4 semantics.

    lr: a number (scaled by any torch LR scheduler and by the linear warmup) or "polyak".
    momentum: the interpolation beta in (0, 1). weight_decay: coupled, evaluated at y.
    warmup_steps, r, weight_lr_power: as schedule_free. weight_rule: "lr_max" (default, = schedule_free)
    or "lr_t" (weight each iterate by its scheduled lr ** weight_lr_power). f_star, polyak_max_lr (None:
    no cap), M (denominator safeguard > 0): the Polyak step options (only read with lr="polyak").
    foreach: accepted as schedule_free's, selects nothing (every step is fused). Starts in train mode."""

    rule = "sgd_sf"

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *, weight_rule="lr_max", f_star=0.0, polyak_max_lr=None, M=1e-8,
                 maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      weight_rule=weight_rule, f_star=f_star, polyak_max_lr=polyak_max_lr,
                                      M=M, maximize=maximize), backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable, foreach=foreach)


class AdamWScheduleFree(_ScheduleFree):
    """Schedule-Free AdamW (docs/algorithms.md §6), schedule_free v1.4 semantics: bias correction
    inside the denominator d = g / (sqrt(v / (1 - beta2^(k+1))) + eps), weight decay lambda*y added to
    d (evaluated at y). Interpolation beta = betas[0].

    inner_momentum (default 0 = off = schedule_free): mu in [0, 1); when > 0 the preconditioned
    direction is averaged, m <- mu m + (1 - mu) g/D (state ``exp_avg``), and m / (1 - mu^(k+1)) replaces
    g/D in the y and z updates (the decay term is added after, unaveraged). Not combinable with
    lr="polyak". Other options as :class:`SGDScheduleFree`. Starts in train mode."""

    rule = "adamw_sf"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 r=0.0, weight_lr_power=2.0, *, weight_rule="lr_max", inner_momentum=0.0, f_star=0.0,
                 polyak_max_lr=None, M=1e-8, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      weight_rule=weight_rule, inner_momentum=inner_momentum, f_star=f_star,
                                      polyak_max_lr=polyak_max_lr, M=M, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable, foreach=foreach)
