"""The keys and keywords users write: torch.optim's implementation switches (accepted for a one-word swap), the
near miss of a misspelt group key, and the stack level that makes a warning name the user's line."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

__all__ = ["FRONT_DEFAULTS", "FRONT_GROUP_EXTRAS", "GROUP_KEYS_ALWAYS_ALLOWED", "check_torch_flags", "near_miss",
           "torch_setstate", "user_stacklevel"]

# keys of every param group that are not hyperparameters of the rule
GROUP_KEYS_ALWAYS_ALLOWED = {"params", "param_names"}
# the front's keys of every FusedOptimizer group, saved in state_dicts: the dtype layout and its rounding seed;
# capturable=True: no host read or host-computed number per step, so that the step can be captured in a CUDA graph
FRONT_DEFAULTS = {"layout": "native", "sr_seed": 0, "capturable": False}
# the front's per-group counters, kept out of ``defaults`` as the rules' own counters (``spec.group_extras``)
# are, so that ``type(opt)(params, **opt.defaults)`` rebuilds as with torch.optim: sr_step counts the steps
# that drew stochastic-rounding keys
FRONT_GROUP_EXTRAS = {"sr_step": 0}


def check_torch_flags(name, *, foreach=None, fused=None, differentiable=False) -> None:
    """torch.optim's implementation switches, accepted for a one-word swap: ``foreach`` and ``fused`` select
    nothing (every step is one fused multi-tensor kernel per bucket; ``backend=`` picks the implementation);
    ``differentiable=True`` (autograd through the step) is refused."""
    for key, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name}: {key} must be None or a bool, got {type(v).__name__}: {v!r}")
    if foreach and fused:  # (torch's RuntimeError, word for word: code that catches it keeps working)
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if not isinstance(differentiable, bool):
        raise TypeError(f"{name}: differentiable must be a bool, got {type(differentiable).__name__}")
    if differentiable:
        raise ValueError(f"{name}: differentiable=True is not supported: the fused kernels update params and "
                         "state in place outside autograd; use torch.optim for a differentiable step")


def torch_setstate(opt, state: dict, setstate) -> None:
    """torch.optim.Optimizer.__setstate__ (``setstate``) for our optimizers: torch's load_state_dict calls it with
    {"state", "param_groups"} only, and the live ``defaults`` stay; torch adds ``differentiable`` to them, which
    our constructors refuse (``type(opt)(params, **opt.defaults)`` then raised), so it is taken out again unless
    the defaults had it."""
    live = opt.__dict__.get("defaults") if "defaults" not in state else None
    had = "differentiable" in (state.get("defaults") or live or {})
    setstate(state)
    if live is not None:
        opt.defaults = live
    if not had:
        opt.defaults.pop("differentiable", None)


def instance_settings(opt, state: dict) -> dict:
    """``state`` (an ``__getstate__``'s) with the settings a user put on the instance itself, which torch's
    ``__getstate__`` (defaults, state, param_groups) drops from a copy or pickle: ``_step_supports_amp_scaling``
    (docs/ecosystem.md, accelerate: a review found the setting lost by ``copy.deepcopy``); the groups as their
    state dicts save them (``compile.saved_groups``)."""
    from .compile import saved_groups  # (compile.py imports this module)

    if "_step_supports_amp_scaling" in opt.__dict__:
        state["_step_supports_amp_scaling"] = opt.__dict__["_step_supports_amp_scaling"]
    if "param_groups" in state:  # (and the capturable its steps run with: compile.eager_step_checks)
        state["param_groups"] = saved_groups(opt, state["param_groups"])
    return state


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one that names the first frame
    outside momentum_fused and torch: the user's line, past the wrappers torch and schedulers put around step()."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                 os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                 contextlib.__file__)  # (compile.eager_step_checks warns inside a context manager's __enter__)


def near_miss(key, known) -> str | None:
    """The known key that ``key`` most likely misspells (a case change, or one or two edits, one for keys
    of up to 7 characters), or None."""
    if not isinstance(key, str) or key in known:
        return None
    best = None
    for k in known:
        d = _edit_distance(key.lower(), k.lower())
        if d <= (1 if len(k) < 8 else 2) and (best is None or d < best[0]):
            best = (d, k)
    return None if best is None else best[1]
