import weakref

import torch

from .. import distributed as _dist
from .. import layouts as _layouts
from ..hparams import is_pair_like
from .base import FusedOptimizer
from .checkpoints import _int8_to_values


class Adam(FusedOptimizer):
    """Adam / AMSGrad with torch.optim.Adam's conventions (docs/algorithms.md §3): coupled L2 decay
    unless ``decoupled_weight_decay``, eps added after the sqrt bias correction; state ``step``,
    ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq`` with amsgrad)."""

    rule = "adam"
    torch_class = torch.optim.Adam  # (the drop-in: checkpoints of an older torch resume as there)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, layout=None, sr_seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed, capturable=capturable,
                         foreach=foreach, fused=fused, differentiable=differentiable)


class AdamW(Adam):
    """AdamW: Adam with decoupled decay ``p <- p (1 - lr wd)``; torch.optim.AdamW's defaults."""

    torch_class = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 backend=None, layout=None, sr_seed=0, decoupled_weight_decay=True):
        if decoupled_weight_decay is not True:  # (accepted so that type(opt)(params, **opt.defaults) rebuilds)
            raise ValueError(f"AdamW: decoupled_weight_decay must be True, got {decoupled_weight_decay!r} "
                             "(Adam(decoupled_weight_decay=False) is Adam with L2 decay)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=True, backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable, foreach=foreach, fused=fused, differentiable=differentiable)

    def __setstate__(self, state):
        # as torch.optim.AdamW: every group decays decoupled, also one loaded from an Adam checkpoint (whose
        # decoupled_weight_decay=False would otherwise turn this optimizer into Adam)
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _check_tied(groups, where, first=0) -> None:
    for gi, g in enumerate(groups, first):
        betas = g.get("betas") if isinstance(g, dict) else None
        if is_pair_like(betas) and len(betas) == 2 and betas[0] != betas[1]:
            raise ValueError(f"{where} param group {gi}: betas must be equal, got {tuple(betas)}; use Adam for "
                             "untied betas (OneCycleLR and CyclicLR with cycle_momentum=True write betas[0] only: "
                             "pass cycle_momentum=False, or set both betas yourself)")


_TIED_BETA = 0.95  # AdamTied's default beta
_MISSING = object()


class AdamTied(Adam):
    """Adam with beta1 = beta2 = beta ("In Search of Adam's Secret Sauce", Orvieto & Gower 2025).

    Same kernel as Adam; the tie makes sigma^2 = v - m^2 an exact online variance, so the state holds
    a per-element gradient signal-to-noise estimate, read by :meth:`gradient_snr`. Param groups take
    ``beta`` (or ``betas`` with equal entries)."""

    _zero = None  # (the class default: an optimizer pickled or copied, whose weak reference is not kept)

    def __init__(self, params, lr=1e-3, beta=_TIED_BETA, eps=1e-8, weight_decay=0.0, *, maximize=False,
                 decoupled_weight_decay=False, backend=None, layout=None, sr_seed=0,
                 capturable=False, betas=None, amsgrad=False):
        # (betas with equal entries: accepted so that type(opt)(params, **opt.defaults) rebuilds)
        if betas is not None:
            _check_tied([{"betas": betas}], "AdamTied")
            if not is_pair_like(betas) or len(betas) != 2:
                raise ValueError(f"AdamTied: betas must be a pair of equal betas, got {betas!r}")
            if beta != _TIED_BETA and beta != betas[0]:  # (a beta given too, other than the default)
                raise ValueError(f"AdamTied: beta={beta!r} and betas={tuple(betas)!r} disagree; pass one of them")
            beta = betas[0]
        # torch's ZeroRedundancyOptimizer copies its own groups' keys into this one's before each step: a `beta` it
        # holds (its defaults give its groups one) is taken out of its group once converted (_step_plan), or it
        # would override every later write of betas
        zero, params = _dist.zero_building(self, params)
        super().__init__(params, lr=lr, betas=(beta, beta), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)
        self._zero = None if zero is None else weakref.ref(zero)
        if zero is not None:  # its groups take this one's betas after this constructor (ZeRO syncs them back);
            for zg in zero.param_groups:  # a beta left in them would override a betas written before the first
                zg.pop("beta", None)  # step, and its defaults' beta every group it adds (a review, 2026-12-07)
            if "beta" in zero.defaults:
                zero.defaults["betas"] = (zero.defaults.pop("beta"),) * 2

    def add_param_group(self, param_group):
        zero = self._zero() if self._zero is not None else None
        if zero is not None and isinstance(param_group, dict) and "beta" in param_group and \
                "betas" in param_group and param_group["betas"] == zero.defaults.get("betas"):
            param_group.pop("betas")  # (ZeRO's add_param_group gave the group its defaults' betas beside the group's
            # own beta: the group's stands)
        if isinstance(param_group, dict) and "beta" in param_group:  # (the caller's dict itself, as every group)
            beta, betas = param_group["beta"], param_group.get("betas")
            if betas is not None:  # (as the constructor: refused, not one silently dropped; the dict unchanged)
                _check_tied([{"betas": betas}], "AdamTied", len(self.param_groups))
                if not is_pair_like(betas) or len(betas) != 2 or beta != betas[0]:
                    raise ValueError(f"AdamTied param group {len(self.param_groups)}: beta={beta!r} and "
                                     f"betas={betas!r} disagree; pass one of them")
            del param_group["beta"]
            param_group["betas"] = (beta, beta)
        if isinstance(param_group, dict):
            _check_tied([param_group], "AdamTied", len(self.param_groups))
        super().add_param_group(param_group)
        if zero is not None and len(zero.param_groups) == len(self.param_groups):  # (ZeRO's new group: its beta
            zg = zero.param_groups[-1]  # would override a later betas write at every step, as in the constructor)
            zg.pop("beta", None)
            zg["betas"] = self.param_groups[-1]["betas"]

    def _step_plan(self):  # (not step(): torch wraps each class's step with its hooks, which would run twice)
        # A `beta` written into a live group (a beta schedule, in the key the groups take) replaces its betas from
        # this step on; put back as it was when the step is refused (a review, 2026-12-07: it was ignored, with a
        # warning calling it an unknown key).
        zero = self._zero() if self._zero is not None else None
        if zero is not None:  # (ZeRO copies its groups' keys into these before a step and in consolidate_state_dict,
            for gi, g in enumerate(self.param_groups):  # never removes one: a beta its group no longer holds, as
                zg = zero.param_groups[gi] if gi < len(zero.param_groups) else {}  # after its load_state_dict, is
                if "beta" in g and zg.get("beta") is not g["beta"]:  # stale (a review, 2026-12-08: it overrode
                    del g["beta"]  # the loaded betas)
        written = [(gi, g, g["beta"], g.get("betas", _MISSING)) for gi, g in enumerate(self.param_groups)
                   if "beta" in g]
        for _, g, beta, _ in written:
            g["betas"] = (beta, beta)
            del g["beta"]
        try:
            _check_tied(self.param_groups, "AdamTied")  # a group edited since: refused before anything changes
            planned = super()._step_plan()
        except BaseException:
            for _, g, beta, betas in written:
                g["beta"] = beta
                if betas is _MISSING:
                    g.pop("betas", None)
                else:
                    g["betas"] = betas
            raise
        if zero is not None:  # (its groups match these one to one: it syncs them by position; each beta written is
            for gi, _, beta, _ in written:  # its group's, above) its betas too: ZeRO syncs them back only after a
                zg = zero.param_groups[gi]  # step that returns; a step raising after this plan kept its stale betas
                del zg["beta"]
                zg["betas"] = (beta, beta)
        return planned

    def _load_state_dict(self, state_dict):  # (after the load pre-hooks: one may tie an Adam checkpoint's betas)
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list):  # (nothing loaded: an Adam checkpoint with untied betas)
            _check_tied(groups, "AdamTied.load_state_dict:")
        super()._load_state_dict(state_dict)

    @torch.no_grad()
    def gradient_snr(self) -> dict:
        """Per param tensor: the mean over elements of m^2 / sigma^2, from the bias-corrected moments
        m = exp_avg / (1 - beta^t), sigma^2 = exp_avg_sq / (1 - beta^t) - m^2 (the tied-beta online
        mean/variance estimate). Elements with sigma^2 = 0 count as inf (0 when m = 0 too). Returns
        {param: float}; params without state yet are left out. The Adam direction with eps = 0 is
        sign(m) / sqrt(1 + 1/snr) elementwise. Any layout: 8-bit codes are decoded with their block scales; a
        complex param counts as its pairs of reals (the update's convention). Sharded DTensor params (FSDP2): the
        mean over the whole param, the same on every rank; a collective, so every rank calls it."""
        self.sync_amp()  # (a skipped step's deferred GradScaler rollback, before the state is read)
        out = {}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            if b1 != b2:
                raise ValueError(f"gradient_snr needs tied betas, got {tuple(group['betas'])}")
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "exp_avg" not in st:
                    continue
                if _dist.is_fsdp1_flat(p):
                    raise ValueError("gradient_snr: a param of FSDP1 (FullyShardedDataParallel) is a flat shard, a "
                                     "plain tensor of one rank's part: its mean would be this rank's part's. Use FSDP2 "
                                     "(fully_shard: DTensor shards, whose means are all-reduced)")
                bc = 1.0 - float(b1) ** float(st["step"])
                m = _moment_values(st, "exp_avg", p) / bc
                var = (_moment_values(st, "exp_avg_sq", p) / bc - m * m).clamp_min(0.0)
                ratio = torch.where((m == 0) & (var == 0), torch.zeros_like(m), m * m / var)
                out[p] = _mean_over_shards(ratio)
        return out


def _mean_over_shards(t: torch.Tensor) -> float:
    """The mean over all elements of ``t`` (a DTensor: of the whole tensor), the same on every rank: a DTensor's
    local sum all-reduced over the groups that shard it (DTensor's own ``mean()`` of a Shard(0) tensor whose rows
    split evenly is a Partial average, which ``float()`` read as this rank's shard mean)."""
    n = t.numel()
    if not n:
        return float("nan")
    total = _dist.local(t).sum().reshape(1).to(torch.float64)
    return float(_dist.all_reduce_sums(total, _dist.shard_groups(t))) / n


def _moment_values(st: dict, key: str, p: torch.Tensor) -> torch.Tensor:
    """A moment of ``p``'s state as float64 values of real numbers: 8-bit codes (the int8 layouts) decoded with
    their block scales as a checkpoint conversion decodes them, a complex state as its real pairs (a cast to
    float64 read the codes as the values, and dropped a complex state's imaginary parts)."""
    v, sc = st[key], st.get(key + _layouts.INT8_SCALE_SUFFIX)
    if sc is not None and v.dtype in (torch.int8, torch.uint8):
        v = _int8_to_values(v, sc, p)
    if v.is_complex():
        v = torch.view_as_real(v)
    return v.double()
