"""LowRankLinear: a linear layer stored as W = U S Vᵀ (docs/algorithms.md §8), and ``convert``.

Storage. U (out_features × max_rank), S (max_rank × max_rank) and V (in_features × max_rank) are
``nn.Parameter``s of fixed shape; the current rank r (a buffer named ``rank``, saved in the
state_dict) says how many leading columns are in use. The forward pass reads only U[:, :r],
S[:r, :r], V[:, :r]; the rest is kept at zero by the optimizers. Only linear layers are supported:
convolutions are not (see docs/lowrank.md).

How the optimizers find the factors. U, S and V are :class:`LowRankFactor` parameters: a
``nn.Parameter`` subclass carrying its ``role`` ("U", "S" or "V") and a weak reference to its layer.
``momentum_fused.lowrank.LowRankSGD``/``LowRankAdam`` read this tag to group the triple and to read and
write the layer's rank; the dense optimizers (``momentum_fused.SGD`` etc.) see the class attribute
``_momentum_fused_lowrank`` and refuse such params with a clear error. The tag survives
``copy.deepcopy`` (re-linked to the copied layer) and pickling (re-linked on unpickling).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LowRankLinear", "LowRankFactor", "convert", "to_dense"]


def _rebuild_factor(data, requires_grad, role):
    p = LowRankFactor(data, requires_grad)
    p.role = role
    return p


class LowRankFactor(nn.Parameter):
    """A factor (U, S or V) of a :class:`LowRankLinear`. ``role`` is "U", "S" or "V"; ``layer()``
    returns the owning layer (or None when detached, e.g. a factor deep-copied on its own)."""

    _momentum_fused_lowrank = True  # read by FusedOptimizer.add_param_group: dense optimizers refuse these

    role: str = "?"
    _layer_ref = None

    def layer(self):
        return None if self._layer_ref is None else self._layer_ref()

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = _rebuild_factor(self.data.clone(memory_format=torch.preserve_format), self.requires_grad,
                                 self.role)
        memo[id(self)] = result
        owner = self.layer()
        new_owner = memo.get(id(owner)) if owner is not None else None  # the layer copy, when it is copied too
        if new_owner is not None:
            result._layer_ref = weakref.ref(new_owner)
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_factor, (self.data, self.requires_grad, self.role))

    def __repr__(self):
        return f"LowRankFactor(role={self.role}):\n" + super().__repr__()


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LowRankLinear: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"LowRankLinear: {name} must be >= {low}, got {value}")


class LowRankLinear(nn.Module):
    """y = x V_r S_rᵀ U_rᵀ + b, i.e. nn.Linear with weight W = U_r S_r V_rᵀ (out × in).

    ``rank``: the initial rank r; ``max_rank``: the storage width r_max, the largest rank the
    optimizers may reach (1 <= rank <= max_rank <= min(in_features, out_features)). The cheap regime
    is max_rank << min(in, out)/2; up to min(in, out) is allowed (docs/algorithms.md §8 rank bounds).

    Initialisation: the truncated SVD of an nn.Linear-initialised dense weight (kaiming-uniform,
    like nn.Linear), so S starts diagonal with the top singular values of that weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, max_rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        _check_int("in_features", in_features)
        _check_int("out_features", out_features)
        _check_int("rank", rank)
        _check_int("max_rank", max_rank)
        if rank > max_rank:
            raise ValueError(f"LowRankLinear: rank ({rank}) must be <= max_rank ({max_rank})")
        if max_rank > min(in_features, out_features):
            raise ValueError(f"LowRankLinear: max_rank ({max_rank}) must be <= min(in_features, out_features) "
                             f"= {min(in_features, out_features)}")
        self.in_features, self.out_features, self.max_rank = in_features, out_features, max_rank
        fk = dict(device=device, dtype=dtype)
        m, n = out_features, in_features
        self.U = LowRankFactor(torch.zeros(m, max_rank, **fk))
        self.S = LowRankFactor(torch.zeros(max_rank, max_rank, **fk))
        self.V = LowRankFactor(torch.zeros(n, max_rank, **fk))
        self.bias = nn.Parameter(torch.empty(m, **fk)) if bias else None
        self.register_buffer("rank", torch.tensor(rank, dtype=torch.int64, device=device))
        self._r = rank
        self._link()
        if not self.__dict__.pop("_no_init", False):  # (from_dense: set from the dense weight instead)
            self.reset_parameters()

    # ------------------------------------------------------------------ tags and rank
    def _link(self):
        ref = weakref.ref(self)
        for role in ("U", "S", "V"):
            p = self._parameters[role]
            p.role = role
            p._layer_ref = ref

    def _retag(self):
        """U, S and V as LowRankFactors again, the same objects (their class set back in place, so that an
        optimizer holding them keeps working), then linked: ``load_state_dict(..., assign=True)`` puts plain
        ``nn.Parameter``s in their place, and conversions under
        ``torch.__future__.set_swap_module_params_on_conversion(True)`` swap their class and ``__dict__``
        away; an optimizer would then not find the layer and train U, S, V as dense params."""
        for role in ("U", "S", "V"):
            p = self._parameters.get(role)
            if isinstance(p, nn.Parameter) and type(p) is not LowRankFactor:
                if type(p) is not nn.Parameter:
                    raise TypeError(f"LowRankLinear: factor {role} became a {type(p).__name__}, not a LowRankFactor "
                                    "or an nn.Parameter; the low-rank optimizers could not find it")
                p.__class__ = LowRankFactor
        self._link()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._retag()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._link()

    @property
    def r(self) -> int:
        """The current rank (a Python int; the ``rank`` buffer holds the same number for the state_dict)."""
        return self._r

    def _set_rank(self, r: int) -> None:
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"LowRankLinear: rank must be in [1, max_rank={self.max_rank}], got {r}")
        self._r = int(r)
        self.rank.fill_(int(r))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "rank"
        if key in state_dict:
            r = int(state_dict[key])
            if not 1 <= r <= self.max_rank:
                error_msgs.append(f"LowRankLinear: saved rank {r} is outside [1, max_rank={self.max_rank}]")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._retag()  # (assign=True: new Parameters in place of the factors)
        if not self.rank.is_meta:
            self._r = int(self.rank)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _set_from_svd(self, W: torch.Tensor, r: int) -> None:
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        # (the tolerance of the optimizers' working dtype: fp32 for bf16/fp16 factors, which they upcast; bf16's
        # eps made every rank >= 2 of a layer 128 wide "numerically rank-deficient" before 2026-12-06)
        work = torch.float32 if self.S.dtype in (torch.float16, torch.bfloat16) else self.S.dtype
        if not bool(s[r - 1] > s[0] * torch.finfo(work).eps * max(W.shape)):
            raise ValueError(f"LowRankLinear: the weight has numerical rank < {r} (sigma_{r} = {float(s[r - 1]):.3g}, "
                             f"sigma_1 = {float(s[0]):.3g}); the optimizers need an invertible core S: use a lower "
                             f"rank or tol=")
        for p in (self.U, self.S, self.V):
            p.zero_()
        self.U[:, :r] = U[:, :r].to(self.U.dtype)
        self.V[:, :r] = Vh[:r].T.to(self.V.dtype)
        self.S[:r, :r] = torch.diag(s[:r]).to(self.S.dtype)
        self._set_rank(r)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.U.is_meta:  # (built on the meta device to be materialized by a load: nothing to compute)
            return
        W = torch.empty(self.out_features, self.in_features, device=self.U.device, dtype=self.U.dtype)
        nn.init.kaiming_uniform_(W, a=math.sqrt(5))  # nn.Linear's init
        self._set_from_svd(W, self._r)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @staticmethod
    def rank_for_tol(s: torch.Tensor, tol: float) -> int:
        """Smallest j with ‖σ_{j:}‖₂ < tol ‖σ‖₂ (σ sorted descending), at least 1; len(σ) if none."""
        s = s.double()
        tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]).sqrt()  # tail[j] = ‖σ_{j:}‖
        below = (tail < tol * tail[0]).nonzero()
        return max(1, int(below[0]) if len(below) else len(s))

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int | None = None, tol: float | None = None, *,
                   max_rank: int | None = None) -> "LowRankLinear":
        """A LowRankLinear holding the truncated SVD of ``linear.weight`` (and a copy of its bias).

        Exactly one of ``rank`` (keep the top ``rank`` singular values) or ``tol`` (the smallest rank
        with a discarded tail ‖σ_{r:}‖ < tol ‖σ‖) is given. ``max_rank`` defaults to
        max(rank, min(in, out) // 2). Draws nothing from the global RNG (``convert`` keeps a seeded run's data
        order equal to its dense baseline's). The factors take the weight's ``requires_grad``, the bias its own,
        and the layer the Linear's training mode (a frozen or eval-mode layer stays so, as ``to_dense`` keeps
        them the other way)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if (rank is None) == (tol is None):
            raise ValueError("from_dense: give exactly one of rank= or tol=")
        if linear.weight.is_meta:
            raise ValueError("from_dense: the Linear is on the meta device, so its weight has no values to "
                             "factor (an SVD); materialize and load the dense model first, or build "
                             "LowRankLinear(..., device='meta') and load a low-rank checkpoint into it")
        W = linear.weight.detach()
        m, n = W.shape
        if tol is not None:
            if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
                raise ValueError(f"from_dense: tol must be in [0, 1), got {tol!r}")
            rank = cls.rank_for_tol(torch.linalg.svdvals(W.double()), tol)
        if max_rank is None:
            max_rank = max(rank, min(m, n) // 2)
        # no random init (it would be overwritten: an SVD of a random matrix, and draws from the global RNG that
        # would change a seeded run's data order against its dense baseline)
        layer = cls.__new__(cls)
        object.__setattr__(layer, "_no_init", True)
        layer.__init__(n, m, rank, max_rank, bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        layer._set_from_svd(W, rank)
        for f in (layer.U, layer.S, layer.V):
            f.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(linear.bias.requires_grad)
        layer.train(linear.training)
        return layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._r
        h = F.linear(x, self.V[:, :r].T)        # x V_r
        h = F.linear(h, self.S[:r, :r])         # · S_rᵀ
        return F.linear(h, self.U[:, :r], self.bias)  # · U_rᵀ + b

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight U_r S_r V_rᵀ (out × in), computed (not stored)."""
        r = self._r
        return self.U[:, :r] @ self.S[:r, :r] @ self.V[:, :r].T

    def num_params(self) -> int:
        """Parameters in use at the current rank: r (in + out) + r² (+ bias)."""
        r = self._r
        return r * (self.in_features + self.out_features) + r * r + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self._r}, "
                f"max_rank={self.max_rank}, bias={self.bias is not None}")


_TIED_OPTIONS = ("dense", "error")


def _shared_layers(model: nn.Module, candidates) -> dict:
    """{name: what it shares} for each (name, module) of ``candidates`` that is registered in ``model`` under
    more than one name, or whose own parameters (weight, bias) are also registered by another module (a tied
    head: ``lm_head.weight is wte.weight``). Found by object identity over
    ``model.named_modules(remove_duplicate=False)`` and each module's own parameters."""
    names_of = {}    # id(module) -> every name it is registered under
    owners_of = {}   # id(param) -> [(id(owning module), "module.param")]
    for name, mod in model.named_modules(remove_duplicate=False):
        first = id(mod) not in names_of
        names_of.setdefault(id(mod), []).append(name)
        if first:  # a module registered twice owns its parameters once
            for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                owners_of.setdefault(id(p), []).append((id(mod), f"{name}.{pname}" if name else pname))
    shared = {}
    for name, mod in candidates:
        what = []
        others = [n for n in names_of[id(mod)] if n != name]
        if others:
            what.append("the same module is also registered as " + ", ".join(repr(n) for n in others))
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            with_ = [full for owner, full in owners_of.get(id(p), []) if owner != id(mod)]
            if with_:
                what.append(f"its {pname} is the same tensor as " + ", ".join(repr(n) for n in with_))
        if what:
            shared[name] = "; ".join(what)
    return shared


def convert(model: nn.Module, filter: Callable[[str, nn.Module], bool] | None = None, rank: int | None = None,
            max_rank: int | None = None, tol: float | None = None, *, tied: str = "dense") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``filter(name, module)`` selects (default:
    all) by ``LowRankLinear.from_dense(module, rank=, tol=, max_rank=)``. Returns ``model`` (an ``nn.Linear``
    passed as ``model`` itself, selected under the name "", is returned converted, as ``to_dense`` returns a
    ``LowRankLinear`` converted). Conv layers are not supported. Raises (before changing anything) when a
    selected layer cannot take the rank, naming the layer.

    Tied layers: a selected Linear whose weight or bias is also a parameter of another module (GPT-2's
    ``lm_head.weight is transformer.wte.weight``), or a Linear registered under several names, cannot be
    factored without untying it. ``tied="dense"`` (default) leaves such layers dense and tied, with one
    warning naming each and what it shares; ``tied="error"`` raises a ValueError naming them (before
    changing anything)."""
    if tied not in _TIED_OPTIONS:
        raise ValueError(f"convert: tied must be one of {_TIED_OPTIONS}, got {tied!r}")
    if (rank is None) == (tol is None):
        raise ValueError("convert: give exactly one of rank= or tol=")
    names = {}  # id(module) -> its names, in registration order
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Linear):
            names.setdefault(id(mod), (mod, []))[1].append(name)
    # a module registered twice is selected when filter selects it under any of its names
    chosen = [(ns[0], mod) for mod, ns in names.values()
              if filter is None or any(filter(n, mod) for n in ns)]
    shared = _shared_layers(model, chosen)
    if shared:
        lines = "\n".join(f"  {name!r}: {what}" for name, what in shared.items())
        if tied == "error":
            raise ValueError(f"convert: these selected Linear layers share parameters or are registered twice, "
                             f"so factoring them would untie them:\n{lines}\nexclude them with filter=, or "
                             f"pass tied='dense' to keep them dense (and tied)")
        warnings.warn(f"momentum_fused.lowrank.convert: left dense (and tied) because factoring would untie "
                      f"them:\n{lines}", stacklevel=2)
        chosen = [(name, mod) for name, mod in chosen if name not in shared]
    for name, mod in chosen:
        k = min(mod.in_features, mod.out_features)
        if (rank is not None and rank > k) or (max_rank is not None and max_rank > k):
            raise ValueError(f"convert: layer {name!r} ({mod.out_features}x{mod.in_features}) cannot take "
                             f"rank={rank}, max_rank={max_rank} (limit min(in, out) = {k}); exclude it with filter=")
    new = {}
    for name, mod in chosen:
        try:
            new[name] = LowRankLinear.from_dense(mod, rank=rank, tol=tol, max_rank=max_rank)
        except (ValueError, TypeError) as e:  # (tol= picking a rank above max_rank; a singular weight; meta)
            raise type(e)(f"convert: layer {name!r} ({mod.out_features}x{mod.in_features}): {e}; nothing was "
                          "converted") from None
    if "" in new:  # the model is the one Linear: its converted self (setattr(model, "", ...) would hide it)
        return new[""]
    for name, layer in new.items():
        _replace(model, name, layer)
    return model


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`LowRankLinear` of ``model`` by an ``nn.Linear`` with the same device
    and dtype, weight U_r S_r V_rᵀ at the current rank (computed in float64, rounded once) and the same bias.
    Returns ``model`` (a ``LowRankLinear`` passed as ``model`` itself is returned converted). Its
    ``state_dict`` then loads into the original dense architecture. A layer registered under several names
    becomes one Linear registered under the same names. Optimizer state of the factors does not carry over:
    build a new optimizer for the dense model."""
    if isinstance(model, LowRankLinear):
        return _dense_of(model)
    done = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, LowRankLinear):
            if id(mod) not in done:
                done[id(mod)] = _dense_of(mod)
            _replace(model, name, done[id(mod)])
    return model


def _dense_of(layer: LowRankLinear) -> nn.Linear:
    U = layer.U
    # skip_init: no random init (it would be overwritten, and would draw from the global RNG)
    dense = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=U.device, dtype=U.dtype)
    r = layer.r
    W = U[:, :r].double() @ layer.S[:r, :r].double() @ layer.V[:, :r].double().T
    dense.weight.copy_(W.to(U.dtype))
    dense.weight.requires_grad_(U.requires_grad)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
        dense.bias.requires_grad_(layer.bias.requires_grad)
    dense.train(layer.training)
    return dense
