"""Hyperparameter checks of the update-rule specs: each raises ValueError/TypeError naming the hyperparameter
(``Real``, ``Pair``, ``Flag``, ``Choice``, ``Int`` and the common instances), and ``lr_value``."""
from __future__ import annotations

import collections.abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch

# --------------------------------------------------------------------------------------------------
# Hyperparameter checks. Each raises ValueError/TypeError naming the hyperparameter.
# --------------------------------------------------------------------------------------------------
def _check_tensor_meta(name: str, value: torch.Tensor) -> None:
    if value.numel() != 1:
        raise ValueError(f"{name} as a Tensor must have exactly one element, got shape {tuple(value.shape)}")
    if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} Tensor must be real, got dtype {value.dtype}")
    if value.device.type == "meta":  # (its .item() raised torch's message, which named no hyperparameter)
        raise ValueError(f"{name} as a Tensor is on the meta device: it has no value to read")


_FP32_MAX = float(torch.finfo(torch.float32).max)


def _is_numpy(value: Any, ndim: int) -> bool:
    """A NumPy array of ``ndim`` dims (not imported: a NumPy value can only exist where NumPy is)."""
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == ndim and hasattr(value, "item")


def is_pair_like(value: Any) -> bool:
    """What torch.optim takes for ``betas``: any sequence it can index (a tuple, a list, omegaconf's
    ``ListConfig`` from a Hydra config) or a 1-D NumPy array; not a string or a tensor."""
    if isinstance(value, (str, bytes, torch.Tensor)):
        return False
    return isinstance(value, collections.abc.Sequence) or _is_numpy(value, 1)


def as_pair(value: Any) -> Any:
    """A constructor's ``betas`` as torch.optim.Adam keeps it: a pair-like value (``is_pair_like``) becomes a tuple,
    a 1-element tensor in it 0-d (torch's ``_to_scalar``), and a NumPy number a Python one (the same value; a
    checkpoint of plain numbers loads with ``torch.load(weights_only=True)``, which refuses omegaconf and NumPy
    objects); anything else is returned as it is (validation names it)."""
    if not is_pair_like(value):
        return value
    return tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else
                 b.item() if _is_numpy(b, 0) else b
                 for b in value)


def _as_real(name: str, value: Any, *, tensor_ok: bool = False, fp32: bool = True) -> float:
    if _is_numpy(value, 0):  # a 0-d NumPy array (np.asarray(0.01)), as torch.optim takes it
        value = value.item()
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            raise TypeError(f"{name} must be a Python number, got a Tensor")
        _check_tensor_meta(name, value)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if fp32 and abs(value) > _FP32_MAX:  # (fp32 kernels would compute with inf; torch raises at its step, fp32 params)
        raise ValueError(f"Invalid {name}: {value} (must lie in the float32 range, |x| <= 3.4028e+38)")
    return value


@dataclass(frozen=True)
class Real:
    """A finite real number in [lo, hi] (or a half-open interval)."""

    lo: float = -math.inf
    hi: float = math.inf
    hi_open: bool = False
    lo_open: bool = False
    tensor_ok: bool = False
    fp32: bool = True  # within the float32 range (hyperparameters); False: a float64 host counter (weight_sum)

    def check(self, name: str, value: Any) -> None:
        v = _as_real(name, value, tensor_ok=self.tensor_ok, fp32=self.fp32)
        too_low = v <= self.lo if self.lo_open else v < self.lo
        too_high = v >= self.hi if self.hi_open else v > self.hi
        if too_low or too_high:
            lb = "(" if self.lo_open else "["
            rb = ")" if self.hi_open else "]"
            raise ValueError(f"Invalid {name}: {v} (must be in {lb}{self.lo}, {self.hi}{rb})")


@dataclass(frozen=True)
class Pair:
    """A pair of numbers, each checked by ``item`` (Adam-style ``betas``)."""

    item: Real

    def check(self, name: str, value: Any) -> None:
        if not is_pair_like(value) or len(value) != 2:
            raise TypeError(f"{name} must be a pair of numbers (a tuple, list or other sequence of two), "
                            f"got {value!r}")
        for i, v in enumerate(value):
            self.item.check(f"{name}[{i}]", v)


def _type_name(value) -> str:
    """A value's type as a user reads it: ``numpy.bool`` (whose ``__name__`` is just ``bool``), ``int``."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


@dataclass(frozen=True)
class Flag:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {_type_name(value)}: {value!r}"
                            + ("; pass bool(value)" if isinstance(value, numbers.Number)
                               or type(value).__module__.split(".")[0] in ("numpy", "torch") else ""))


@dataclass(frozen=True)
class Choice:
    options: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.options:
            raise ValueError(f"Invalid {name}: {value!r} (must be one of {list(self.options)})")


@dataclass(frozen=True)
class Int:
    lo: int = 1
    whole_floats: bool = False  # a float of integral value passes too (a count computed as 0.1 * total_steps)

    def check(self, name: str, value: Any) -> None:
        whole = self.whole_floats and isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
            and math.isfinite(float(value)) and float(value).is_integer()
        if not whole and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int{' (or a float of integral value)' if self.whole_floats else ''}, "
                            f"got {type(value).__name__}: {value!r}")
        if value < self.lo:
            raise ValueError(f"Invalid {name}: {value} (must be >= {self.lo})")


LR = Real(0.0, tensor_ok=True)
NONNEG = Real(0.0)
UNIT_OPEN = Real(0.0, 1.0, hi_open=True)  # [0, 1)
FINITE = Real()
BETAS = Pair(UNIT_OPEN)


def lr_value(group: Mapping) -> float:
    """The group's learning rate as a float (``lr`` may be a one-element tensor). In a ``capturable``
    group a tensor lr stays a (float64, 0-d) tensor: read on the device, never on the host."""
    lr = group["lr"]
    if group.get("capturable"):  # (traced by torch.compile, a float lr may be a symbolic float: no float())
        return lr.detach().reshape(()).to(torch.float64) if isinstance(lr, torch.Tensor) else lr
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
