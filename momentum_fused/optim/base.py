"""The shared base of every momentum_fused optimizer.

It does the grouping, the validation, the lazy state, the host scalars and the dispatch; the
optimizer files only declare their rule and constructor. One ``step()``:

1. runs the closure (under ``enable_grad``);
2. *plans*: validates every group's hyperparameters, every gradient (sparse, shape, dtype, device)
   and every existing state tensor, and resolves a backend per (device, dtype) bucket. Nothing has
   been modified yet, so any error leaves params and state exactly as they were;
3. honours the GradScaler protocol (``found_inf`` nonzero: nothing changes, not even step counts;
   ``grad_scale``: gradients are divided by it inside the update, ``.grad`` itself is not modified);
4. calls the ``_prepare_step`` hook (per-group host scalars via ``spec.group_prepare``; reduction
   passes in subclasses), creates missing state, advances host counters, builds one scalar pack per tensor;
5. hands each bucket (device, dtype, flags) to its backend, once, across all groups.
"""
from __future__ import annotations

import gc
import math
import operator
import warnings
from itertools import compress, repeat
from typing import Any, ClassVar

import torch

from .. import backends
from .. import layouts as _layouts
from .. import distributed as _dist  # DTensor (FSDP2): local shards, see momentum_fused/distributed.py
from ..specs import HOST_STATE_KEYS, UpdateRuleSpec, get_spec, step_tensor

__all__ = ["FusedOptimizer"]

_TENSOR = {torch.Tensor}
_DTYPE = operator.attrgetter("dtype")
_LAYOUT = operator.attrgetter("layout")
_CPU_CUDA = operator.attrgetter("is_cpu", "is_cuda")


def _kinds(ts) -> tuple:
    """(dtypes, layouts, device indices, (is_cpu, is_cuda) pairs) of a list of tensors, as sets; C-speed
    maps (a tensor's ``device`` attribute costs more to build than these together). They identify the
    device among cpu and cuda devices only: the cached plan is kept for cpu and cuda params only."""
    return (set(map(_DTYPE, ts)), set(map(_LAYOUT, ts)), set(map(torch.Tensor.get_device, ts)),
            set(map(_CPU_CUDA, ts)))

def _cached_grads_py(params, mask, state_dicts, keys, flat, pdtype, device, sdtypes):
    """The cached plan's per-tensor checks (``FusedOptimizer._fast_plan``): the gradients of ``params``
    (those with ``mask[i]`` True; mask None: all) when every one of these holds, else None:
    mask[i] False <=> ``params[i].grad`` is None; params of dtype ``pdtype`` on ``device``, strided and
    contiguous; each gradient a plain (``torch.Tensor``) strided contiguous tensor with its param's shape,
    dtype and device; state tensor j of param i is the object ``flat[i * len(keys) + j]``, of dtype
    ``sdtypes[j]``, on ``device``, with the param's shape, strided and contiguous.

    The same checks run in C in ``momentum_fused._C_cpu.cached_grads`` (csrc/cpu/cpu_python.cpp), used
    instead when the cpu extension is built; this is the pure-Python install's version."""
    grads = [p.grad for p in params]
    present = [g is not None for g in grads]
    if mask is None:
        if present.count(False):
            return None
        items, gs = params, grads
    else:
        if present != mask:
            return None
        items, gs = list(compress(params, mask)), list(compress(grads, mask))
    if len(gs) != len(state_dicts):
        return None
    if not gs:
        return gs
    want = ({pdtype}, {torch.strided}, {device.index if device.type == "cuda" else -1},
            {(device.type == "cpu", device.type == "cuda")})
    is_contiguous = torch.Tensor.is_contiguous
    try:  # (is_contiguous raises for some layouts: the full plan then names the problem)
        shapes = [p.shape for p in items]
        if set(map(type, gs)) != _TENSOR or _kinds(gs) != want or _kinds(items) != want or \
                [g.shape for g in gs] != shapes or not all(map(is_contiguous, gs)) or \
                not all(map(is_contiguous, items)):
            return None
        nk = len(keys)
        for j, k in enumerate(keys):
            col = list(map(operator.itemgetter(k), state_dicts))
            if not _same_objects_py(col, flat[j::nk]):
                return None
            if _kinds(col) != (({sdtypes[j]},) + want[1:]) or [t.shape for t in col] != shapes or \
                    not all(map(is_contiguous, col)):
                return None
    except (RuntimeError, KeyError, TypeError, AttributeError):
        return None
    return gs


# The cached plan's identity checks (identity, not equality; the cache keeps the objects alive, so no id can
# be reused). C versions in momentum_fused._C_cpu (pointer comparisons that never touch the objects: a Python
# loop increments each one's reference count, a cache miss per object), these are the pure-Python install's.
def _same_objects_py(now, cached: list) -> bool:
    """Whether ``now`` is a list or tuple holding exactly the objects of ``cached``, in order."""
    return isinstance(now, (list, tuple)) and len(now) == len(cached) and all(map(operator.is_, now, cached))


def _same_dict_py(d: dict, keys: list, values: list) -> bool:
    """Whether the dict ``d`` holds exactly the keys ``keys`` and the values ``values``, in order."""
    return len(d) == len(keys) == len(values) and all(map(operator.is_, d, keys)) and \
        all(map(operator.is_, d.values(), values))


def _same_entries_py(dicts: list, key, objs: list) -> bool:
    """Whether ``dicts`` is a list or tuple with ``dicts[i].get(key) is objs[i]`` for every i (False when an
    entry is not a dict)."""
    if not isinstance(dicts, (list, tuple)):
        return False
    try:
        return len(dicts) == len(objs) and all(map(operator.is_, map(dict.get, dicts, repeat(key)), objs))
    except TypeError:  # an entry that is not a dict
        return False


def _host_scalar(state: dict, key: str, initial: float) -> torch.Tensor:
    """``state[key]`` as a float64 0-d CPU tensor (``initial`` when missing; a number or a tensor of another
    dtype, e.g. a float32 ``mu_product`` from a torch.optim checkpoint, is widened once)."""
    v = state.get(key)
    if isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.dim() == 0 and v.device.type == "cpu":
        return v
    return torch.tensor(initial if v is None else float(v), dtype=torch.float64)


def _plan_checks_impl():
    """The cached plan's checks (cached_grads, same_objects, same_dict, same_entries): the C versions when the
    cpu extension is built (they read tensor metadata and pointers only, so they serve CUDA params as well),
    else the Python twins."""
    try:
        from .. import _C_cpu
        return _C_cpu.cached_grads, _C_cpu.same_objects, _C_cpu.same_dict, _C_cpu.same_entries
    except Exception:  # not built, or not loadable: the pure-Python install
        return _cached_grads_py, _same_objects_py, _same_dict_py, _same_entries_py


_cached_grads, _same_objects, _same_dict, _same_entries = _plan_checks_impl()

_GROUP_KEYS_ALWAYS_ALLOWED = {"params", "param_names"}
# Dtype-layout keys of every param group (momentum_fused/layouts.py): the layout name, the stochastic
# rounding seed, and the group's count of applied steps (the rounding's counter; saved in state_dicts).
_LAYOUT_DEFAULTS = {"layout": "native", "sr_seed": 0, "sr_step": 0}
# capturable=True (a param-group key, saved in state_dicts): no host read or host-computed number per step,
# so that the step can be captured in a CUDA graph (see ``_device_scalars``).
_FRONT_DEFAULTS = {**_LAYOUT_DEFAULTS, "capturable": False}


def host_value_error(key: str, value) -> str | None:
    """Why ``value`` is not a valid host counter ``key`` ("step": a finite non-negative whole number;
    "mu_product": a finite number in [0, 1]; a number or a one-element tensor), or None. Reads a CUDA
    tensor's value (a host sync): used when loading a state_dict and on the full plan, not per step."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or not (value.is_floating_point() or value.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            return f"a {value.dtype} tensor of shape {tuple(value.shape)}, not a one-element real tensor"
        v = float(value.detach().reshape(()).cpu())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        return f"a {type(value).__name__}, not a number"
    if key == "step":
        if not math.isfinite(v) or v < 0 or v != math.floor(v):
            return f"{v}; a step count must be a finite non-negative whole number"
    elif key == "mu_product" and not (math.isfinite(v) and 0.0 <= v <= 1.0):
        return f"{v}; NAdam's mu_product (a product of momentum coefficients) must be in [0, 1]"
    return None


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _check_torch_flags(name, *, foreach=None, fused=None, differentiable=False) -> None:
    """torch.optim's implementation switches, accepted for a one-word swap: ``foreach`` and ``fused`` select
    nothing (every step is one fused multi-tensor kernel per bucket; ``backend=`` picks the implementation);
    ``differentiable=True`` (autograd through the step) is refused."""
    for key, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name}: {key} must be None or a bool, got {type(v).__name__}: {v!r}")
    if not isinstance(differentiable, bool):
        raise TypeError(f"{name}: differentiable must be a bool, got {type(differentiable).__name__}")
    if differentiable:
        raise ValueError(f"{name}: differentiable=True is not supported: the fused kernels update params and "
                         "state in place outside autograd; use torch.optim for a differentiable step")


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


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


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses set ``rule`` and call ``super().__init__(params, defaults, backend=)``.

    ``backend``: None (automatic, see momentum_fused.backends), or a registered backend name. The
    backend is an attribute of the optimizer, not part of its state_dict, so a checkpoint written
    with one backend loads with any other.

    Complex params are optimized as pairs of real numbers (``torch.view_as_real``), like torch.optim.

    ``layout``: the dtype layout of params and state (momentum_fused/layouts.py): "native" (default: state
    in the param dtype), "bf16_state" (fp32 params, bf16 state), "master" (bf16/fp16 params with an fp32
    master copy in ``state["master"]``), "bf16_sr" (bf16 params and state, stochastic rounding seeded by
    ``sr_seed``). Both are param-group keys (per-group values allowed) and saved in state_dicts.
    """

    rule: ClassVar[str]
    _step_supports_amp_scaling = True  # GradScaler sets .grad_scale / .found_inf, see step()

    # layouts this optimizer's front end supports (schedule-free narrows it: its train/eval swap)
    supported_layouts: ClassVar[tuple] = tuple(_layouts.LAYOUTS)

    def __init__(self, params, defaults: dict[str, Any], *, backend: str | None = None, layout: str | None = None,
                 sr_seed: int = 0, capturable: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 differentiable: bool = False):
        _check_torch_flags(type(self).__name__, foreach=foreach, fused=fused, differentiable=differentiable)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        if backend is not None and backend not in backends.names():
            raise ValueError(f"unknown backend {backend!r}; registered backends: {sorted(backends.names())}")
        self.backend = backend
        self._seen_keys: set = set()  # group keys already checked against near-miss hyperparameter names
        self._step_views: dict = {}
        self._fast = None
        self._called = {"step": False}
        self.spec.validate({**defaults, **self.spec.group_extras}, where=f"{type(self).__name__}: ")
        defaults = {**defaults, **_FRONT_DEFAULTS, "layout": "native" if layout is None else layout,
                    "sr_seed": sr_seed, "capturable": capturable}
        self._check_layout_keys(defaults, f"{type(self).__name__}: ")
        super().__init__(params, defaults)

    def _check_layout_keys(self, group, where) -> _layouts.Layout:
        lay = _layouts.get_layout(group["layout"]) if isinstance(group["layout"], str) else None
        if lay is None:
            raise ValueError(f"{where}layout must be a layout name; supported layouts: {_layouts.supported()}")
        if lay.name not in self.supported_layouts:
            raise ValueError(f"{where}{type(self).__name__} does not support dtype layout {lay.name!r} "
                             f"(it supports: {', '.join(self.supported_layouts)})")
        for key in ("sr_seed", "sr_step"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}{key} must be a non-negative int, got {v!r}")
        cap = group.get("capturable", False)
        if not isinstance(cap, bool):
            raise TypeError(f"{where}capturable must be a bool, got {type(cap).__name__}: {cap!r}")
        if cap:
            why = self._not_capturable(lay)
            if why is not None:
                raise ValueError(f"{where}{type(self).__name__} cannot run with capturable=True: {why}")
        return lay

    def _not_capturable(self, lay) -> str | None:
        """Why this optimizer's step cannot avoid host-side per-step numbers (None: it can)."""
        spec = self.spec
        if spec.pack_reads_state:
            return "its scalar pack reads per-tensor host state (NAdam's mu_product) every step"
        if spec.group_advance is not None or spec.group_prepare is not None or \
                type(self)._prepare_step is not FusedOptimizer._prepare_step:
            return "it keeps per-group host counters that change every step (FSGDM's u, schedule-free's c)"
        if lay.stochastic:
            return "the bf16_sr layout derives its rounding keys from a host counter (sr_step)"
        return None

    def _check_capturable(self, gi, group, chosen) -> None:
        """A capturable group needs backends that take the scalar table as a tensor and a tensor lr on the
        params' device (a float lr is fine: it is a constant of the captured graph)."""
        for (device, _), b in chosen.items():
            if not b.scalar_tables:
                raise RuntimeError(f"{type(self).__name__} param group {gi}: capturable=True needs a compiled "
                                   f"backend (cpu, cuda, triton); backend {b.name!r} reads its scalars on the host")
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device != device:
                raise ValueError(f"{type(self).__name__} param group {gi}: with capturable=True a tensor lr must "
                                 f"be on the params' device ({device}), got {lr.device}")
    # ------------------------------------------------------------------ construction and checkpoints
    @property
    def spec(self) -> UpdateRuleSpec:
        return get_spec(self.rule)

    def _known_keys(self) -> set:
        return {*self.defaults, *self.spec.group_extras, *_GROUP_KEYS_ALWAYS_ALLOWED}

    def _check_group_keys(self, group, where) -> None:
        """Keys that are not hyperparameters are carried (torch does; HF and layer-wise recipes add ``name``,
        ``layer_id``, ``lr_scale``), with a warning when one is a near miss of a hyperparameter's name
        (``weight_decy``); a true ``differentiable`` (from a torch.optim checkpoint) is refused. Checked when
        a group is added and, for keys added to a group later, at the next step (once per key)."""
        known = self.__dict__.get("_known")
        if known is None:
            known = self._known = frozenset(self._known_keys())
        extra = group.keys() - known
        if not extra:
            return
        if group.get("differentiable"):
            raise ValueError(f"{where}: differentiable=True is not supported (the fused kernels update in place "
                             "outside autograd)")
        seen = self.__dict__.setdefault("_seen_keys", set())
        for key in extra:
            if key in seen:
                continue
            seen.add(key)
            hit = near_miss(key, known - _GROUP_KEYS_ALWAYS_ALLOWED)
            if hit is not None:
                warnings.warn(f"{where}: key {key!r} is not a hyperparameter of {type(self).__name__} (did you mean "
                              f"{hit!r}?); it is kept in the group and has no effect", UserWarning, stacklevel=4)

    def train(self, mode: bool = True):
        """For client code that switches optimizers with the model (schedule-free needs it): a no-op here,
        since this rule keeps no averaged iterate. Returns the optimizer."""
        return self

    def eval(self):
        """See :meth:`train`: a no-op for this rule. Returns the optimizer."""
        return self

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "_pending_amp" in self.__dict__:
            self.sync_amp()
        if isinstance(param_group, dict):
            self._check_group_keys(param_group, f"{type(self).__name__} param group {len(self.param_groups)}")
            merged = {**self.defaults, **self.spec.group_extras, **param_group}
            self.spec.validate(merged, where=f"{type(self).__name__} param group: ")
            lay = self._check_layout_keys(merged, f"{type(self).__name__} param group: ")
            params = param_group["params"]
            if not isinstance(params, (torch.Tensor, set)):  # (torch refuses a set, with its message)
                params = list(params)  # a generator (model.parameters()) is read once, here
                param_group = {**param_group, "params": params}
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            seen = {}
            for i, p in enumerate(params):
                q = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                j = seen.setdefault(id(q), i)
                if j != i:
                    raise ValueError(f"{type(self).__name__}: param {i} of the new param group is param {j} "
                                     "again; a param may appear once per optimizer (torch.optim would apply "
                                     "its update twice and count one step)")
            for p in params:
                if isinstance(p, tuple):  # named parameters
                    p = p[1]
                if getattr(p, "_momentum_fused_lowrank", False):  # tag of momentum_fused.lowrank factors
                    raise TypeError(f"{type(self).__name__}: a LowRankLinear factor (U, S or V) needs the manifold "
                                    f"update: use momentum_fused.lowrank.LowRankSGD / LowRankAdam for the model")
                if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                    raise TypeError(f"{type(self).__name__} can only optimize floating point or complex "
                                    f"tensors, got dtype {p.dtype}")
                if isinstance(p, torch.Tensor) and lay.name != "native" and p.dtype not in lay.param_dtypes:
                    raise TypeError(f"{type(self).__name__}: dtype layout {lay.describe()} cannot hold a "
                                    f"{p.dtype} param; supported layouts: {_layouts.supported()}")
        super().add_param_group(param_group)
        for k, v in self.spec.group_extras.items():
            self.param_groups[-1].setdefault(k, v)
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        """Forget the per-step caches (the grouped step counters and the plan of the last step). The
        optimizer detects by itself what it can see (new param groups, loaded state_dicts, replaced
        params, grads or state tensors, see ``_fast_plan``); call this after changing a param's
        ``.data`` or a state tensor *in place of* its object (``t.data = ...``, ``resize_``)."""
        self._step_views = {}
        self._fast = None
        self.__dict__.pop("_known", None)

    def __getstate__(self) -> dict[str, Any]:
        self.sync_amp()
        state = super().__getstate__()
        for k in ("_pending_amp", "_amp_flag"):
            state.pop(k, None)
        state["backend"] = self.backend
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with {"state", "param_groups"} only: the live optimizer keeps
        # its forced backend (and its defaults: torch.optim.Optimizer.__setstate__ adds "differentiable")
        state.setdefault("backend", self.__dict__.get("backend"))
        live = self.__dict__.get("defaults") if "defaults" not in state else None
        had = "differentiable" in (state.get("defaults") or live or {})
        super().__setstate__(state)
        if live is not None:
            self.defaults = live
        if not had:
            self.defaults.pop("differentiable", None)
        self.invalidate_caches()
        self._called = {"step": False}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim.Optimizer.load_state_dict, except that host-side state (``step``,
        ``mu_product``) keeps its own dtype on the CPU instead of being cast to the param dtype, and
        groups saved by torch.optim (or an older version) get missing hyperparameters from the
        defaults. Loading a torch.optim state_dict of the same rule works, and vice versa."""
        self.sync_amp()
        self._check_loaded_host_state(state_dict)
        self.invalidate_caches()
        host, saved = {}, {}
        for idx, st in state_dict["state"].items():
            host[idx] = {k: v for k, v in st.items() if k in HOST_STATE_KEYS}
            saved[idx] = {k: v for k, v in st.items() if k not in HOST_STATE_KEYS and isinstance(v, torch.Tensor)}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        cap = {p for g in self.param_groups if g.get("capturable") for p in g["params"]}
        for idx, p in zip(saved_ids, params):
            for key, value in host.get(idx, {}).items():
                dtype = torch.float32 if key == "step" else torch.float64
                device = p.device if key == "step" and p in cap else "cpu"  # capturable: steps on the device
                self.state[p][key] = torch.as_tensor(value).detach().to(device, dtype).clone()
        for g in self.param_groups:
            for k, v in {**self.defaults, **self.spec.group_extras}.items():
                g.setdefault(k, v)
        # torch casts floating state to the param dtype; layouts keep their own state dtypes (bf16 state,
        # fp32 master): re-take those from the saved tensors, so that no value goes through a narrower type
        layout_of = {}
        for g in self.param_groups:
            lay = _layouts.get_layout(g["layout"])
            for p in g["params"]:
                layout_of[p] = lay
        for idx, p in zip(saved_ids, params):
            lay = layout_of[p]
            if lay.name == "native":
                continue
            for key, value in saved.get(idx, {}).items():
                want = torch.float32 if key == _layouts.MASTER_KEY else lay.state_dtype_for(p.dtype)
                self.state[p][key] = value.detach().to(device=p.device, dtype=want, copy=True)

    def _check_loaded_host_state(self, state_dict) -> None:
        """Host counters (``step``, ``mu_product``) and group keys of a state_dict, checked before anything is
        loaded: a clear error naming the param and the key, and the optimizer unchanged."""
        name = type(self).__name__
        try:
            groups, states = state_dict["param_groups"], state_dict["state"]
            where = {}
            for gi, g in enumerate(groups):
                if isinstance(g, dict) and g.get("differentiable"):
                    raise ValueError(f"{name}.load_state_dict: param group {gi} has differentiable=True, which is "
                                     "not supported (the fused kernels update in place outside autograd)")
                for pi, idx in enumerate(g["params"]):
                    where[idx] = (gi, pi)
            items = list(states.items())
        except (KeyError, TypeError, AttributeError):
            return  # (torch's load_state_dict names what is malformed)
        for idx, st in items:
            if not isinstance(st, dict):
                continue
            for key in HOST_STATE_KEYS:
                if key in st:
                    why = host_value_error(key, st[key])
                    if why is not None:
                        gi, pi = where.get(idx, ("?", "?"))
                        raise ValueError(f"{name}.load_state_dict: param {pi} of group {gi} (state_dict index "
                                         f"{idx}): state {key!r} is {why}; nothing was loaded")

    def _check_host_state(self, gi, group, items) -> None:
        """The full plan's check of host counters that did not come from this optimizer's own stepping (a loaded
        or assigned ``step`` / ``mu_product``): clear error naming param and key, before anything changes."""
        spec = self.spec
        keys = (("step",) if spec.counts_steps else ()) + ((spec.host_state[0],) if spec.pack_reads_state else ())
        if not keys or group.get("capturable"):  # (capturable counters live on the device: no host read)
            return
        state = self.state
        for key in keys:
            cached = self._step_views.get((gi, key))
            ours = set(map(id, cached[1])) if cached is not None else ()
            for p in items:
                st = state.get(p)
                v = None if st is None else st.get(key)
                if v is not None and id(v) not in ours:
                    why = host_value_error(key, v)
                    if why is not None:
                        pi = next(i for i, q in enumerate(group["params"]) if q is p)
                        raise ValueError(f"{self._where(p, pi, gi)}: state {key!r} is {why}")

    # ------------------------------------------------------------------ step
    def _plan(self):
        """Validate everything and pick backends. Modifies nothing. (The per-tensor checks are one
        combined test on the hot path; the detailed message is built only when one fails.)"""
        spec = self.spec
        name = type(self).__name__
        state = self.state
        strided = torch.strided
        plan = []
        traced = torch.compiler.is_compiling()
        for gi, group in enumerate(self.param_groups):
            if not traced:  # (traced: hyperparameters are graph inputs; validated by every eager step only)
                spec.validate(group, where=f"{name} param group {gi}: ")
                self._check_group_keys(group, f"{name} param group {gi}")
            lay = self._check_layout_keys(group, f"{name} param group {gi}: ")
            state_names = spec.state_names(group)
            check_names = (*state_names, _layouts.MASTER_KEY) if lay.master else state_names
            native = lay.name == "native"
            items, keys = [], set()
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                shape, dtype, device = p.shape, p.dtype, p.device
                if g.layout is not strided or g.shape != shape or g.dtype != dtype or g.device != device:
                    self._raise_bad_grad(p, g, pi, gi)
                if native:
                    sdt = dtype
                elif dtype in lay.param_dtypes:
                    sdt = lay.state_dtype_for(dtype)
                else:
                    raise TypeError(f"{self._where(p, pi, gi)}: dtype layout {lay.describe()} cannot hold a "
                                    f"{dtype} param; supported layouts: {_layouts.supported()}")
                st = state.get(p)
                if st:
                    for key in check_names:
                        t = st.get(key)
                        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape
                                              or t.dtype != (torch.float32 if key == "master" else sdt)
                                              or t.device != device):
                            self._raise_bad_state(p, key, t, pi, gi, torch.float32 if key == "master" else sdt)
                items.append(p)
                keys.add((device, dtype))
            keys = {(dev, _real_dtype(dt)) for dev, dt in keys}
            chosen = {key: backends.resolve(self.backend, spec, *key, lay) for key in keys}
            _dist.check_group(name, gi, items, state, state_names)  # DTensor layouts line up (no-op without DTensors)
            self._check_host_state(gi, group, items)
            if group["capturable"]:
                self._check_capturable(gi, group, chosen)
            plan.append((group, state_names, items, chosen))
        return plan

    # ------------------------------------------------------------------ the cached plan (hot path)
    def _fast_plan(self):
        """The plan of the last step, re-validated cheaply, or None (then ``_plan`` runs).

        After a step, ``_remember_plan`` keeps, per group, the params that had gradients, their shapes,
        (dtype, device), state dicts and state tensors. The next step reuses that plan, and the state
        created by then (every tensor has all its state), when each of these still holds, checked with
        C-speed list comparisons of object identities and one C loop over the tensors (``_cached_grads``)
        instead of per-tensor Python checks: the same ``state`` mapping with the same per-param dicts (the
        same key and value objects, in order), the same group objects and param lists, the same params with
        gradients, every gradient a plain contiguous strided tensor with the param's shape, dtype and
        device, params of the cached dtype and device, the same state tensor objects with the cached
        dtypes and the param's shape, the same state names (flags) and layout.
        Hyperparameters are validated on every step, exactly as ``_plan`` does. Anything else falls
        back to the full ``_plan``, which validates everything and raises the detailed errors."""
        fc = self._fast
        if fc is None:
            return None
        state = self.state
        groups = self.param_groups
        if state is not fc["state"] or len(groups) != len(fc["groups"]):
            return None
        if not _same_dict(state, fc["state_keys"], fc["state_values"]):
            return None
        spec = self.spec
        name = type(self).__name__
        plan, cached = [], []
        for gi, (group, e) in enumerate(zip(groups, fc["groups"])):
            if group is not e["group"]:
                return None
            spec.validate(group, where=f"{name} param group {gi}: ")
            if len(group) != e["nkeys"]:  # a key added since the last step
                self._check_group_keys(group, f"{name} param group {gi}")
            lay = self._check_layout_keys(group, f"{name} param group {gi}: ")
            if lay.name != e["layout"] or spec.state_names(group) != e["state_names"]:
                return None
            params = group["params"]
            if not _same_objects(params, e["params"]):
                return None
            gs = _cached_grads(params, e["mask"], e["states"], e["keys"], e["flat"], e["pdtype"], e["device"],
                               e["sdtypes"])
            if gs is None:
                return None
            items = e["items"]
            for hk in e["host_keys"]:  # a host counter replaced since the last step: the full plan checks it
                cv = self._step_views.get((gi, hk))
                if cv is None or not _same_entries(e["states"], hk, cv[1]):
                    return None
            key = e["chosen_key"]
            chosen = {} if key is None else {key: backends.resolve(self.backend, spec, *key, lay)}
            if group["capturable"]:
                self._check_capturable(gi, group, chosen)
            plan.append((group, e["state_names"], items, chosen))
            cached.append((e, gs))
        return plan, cached

    def _remember_plan(self, plan) -> None:
        """Cache this step's plan for ``_fast_plan`` when the hot path can serve it: plain (not DTensor,
        not complex) params of one (device, dtype) per group, every state tensor present."""
        self._fast = None
        cls = _dist.dtensor_class()
        entries = []
        for group, state_names, items, chosen in plan:
            if len(chosen) > 1 or any([dev.type not in ("cpu", "cuda") for dev, _ in chosen]):
                return
            lay = _layouts.get_layout(group["layout"])
            keys = (*state_names, _layouts.MASTER_KEY) if lay.master else tuple(state_names)
            states = []
            for p in items:
                st = self.state.get(p)
                if st is None or p.is_complex() or (cls is not None and isinstance(p, cls)) or \
                        any(k not in st for k in keys) or (self.spec.counts_steps and "step" not in st):
                    return
                states.append(st)
            params = group["params"]
            mask = [p.grad is not None for p in params]
            key = next(iter(chosen)) if chosen else None
            first = [states[0][k] for k in keys] if states else []
            entries.append({
                "group": group, "nkeys": len(group), "layout": lay.name, "state_names": state_names, "keys": keys,
                "params": list(params), "items": items,
                "mask": None if all(mask) else mask, "states": states,
                "flat": [st[k] for st in states for k in keys],
                "tuples": [tuple([st[k] for k in keys]) for st in states],
                # what _cached_grads checks every tensor against (a group without items checks none)
                "pdtype": items[0].dtype if items else torch.float32,
                "device": items[0].device if items else torch.device("cpu"),
                "sdtypes": tuple([t.dtype for t in first]) if states else tuple([torch.float32] * len(keys)),
                "chosen_key": key,
                "host_keys": () if group["capturable"] or not states else (("step",) if self.spec.counts_steps else ())
                + ((self.spec.host_state[0],) if self.spec.pack_reads_state and self.spec.advance_many else ()),
            })
        # the objects themselves (not their ids, which a new object may reuse once one is freed)
        self._fast = {"state": self.state, "groups": entries, "state_values": list(self.state.values()),
                      "state_keys": list(self.state)}

    def _where(self, p, pi, gi):
        return f"{type(self).__name__}: param {pi} of group {gi} (shape {tuple(p.shape)})"

    def _raise_bad_grad(self, p, g, pi, gi):
        where = self._where(p, pi, gi)
        if g.layout != torch.strided:
            raise RuntimeError(f"{where}: sparse gradients are not supported (layout {g.layout})")
        if g.shape != p.shape:
            raise RuntimeError(f"{where}: gradient shape {tuple(g.shape)} does not match the param")
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: gradient dtype {g.dtype} does not match the param dtype {p.dtype}")
        raise RuntimeError(f"{where}: gradient is on {g.device} but the param is on {p.device}")

    def _raise_bad_state(self, p, key, t, pi, gi, want_dtype=None):
        where = self._where(p, pi, gi)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: state {key!r} is a {type(t).__name__}, expected a Tensor")
        if t.shape != p.shape:
            raise ValueError(f"{where}: state {key!r} has shape {tuple(t.shape)}, which does not "
                             f"match the param; was a state_dict loaded into other params?")
        want = p.dtype if want_dtype is None else want_dtype
        raise ValueError(f"{where}: state {key!r} is {t.dtype} on {t.device}, expected {want} on {p.device} "
                         "(the group's dtype layout decides the state dtype)")

    # ------------------------------------------------------------------ GradScaler on the device
    def _device_amp(self, plan):
        """(found_inf, grad_scale) to hand to the kernels, or None for the host protocol (``_amp``).

        The device protocol (no host sync) is used when GradScaler's ``found_inf`` is a tensor, every
        bucket's backend reads device scalars (triton, cuda), and the rule keeps no per-group host
        counters (FSGDM, schedule-free: they take the host path). The kernels then skip every write
        when found_inf != 0; the host side (step counts, NAdam's mu_product, state created by this step,
        ``sr_step``) advances optimistically and is rolled back when the flag, copied to the host
        without blocking, turns out nonzero: checked at the start of the next step, by ``state_dict``,
        ``load_state_dict``, ``add_param_group`` and ``sync_amp()``."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if not isinstance(found_inf, torch.Tensor) or not (grad_scale is None or isinstance(grad_scale, torch.Tensor)):
            return None
        spec = self.spec
        if spec.group_advance is not None or spec.group_prepare is not None or \
                type(self)._prepare_step is not FusedOptimizer._prepare_step:
            return None
        for _, _, items, chosen in plan:
            if not all(getattr(b, "device_scalars", False) for b in chosen.values()):
                return None
        if found_inf.numel() != 1 or (grad_scale is not None and grad_scale.numel() != 1):
            raise ValueError(f"{type(self).__name__}: found_inf and grad_scale must be one-element tensors")
        return found_inf, grad_scale

    def sync_amp(self) -> None:
        """Resolve a pending device-side GradScaler check: wait for the flag of the last step and, if it
        was nonzero (the kernels skipped that step), roll the host-side state back. Called by step(),
        state_dict(), load_state_dict() and add_param_group(); call it before reading ``state`` directly
        between steps when training with a GradScaler on the triton/cuda backends."""
        pending = self.__dict__.pop("_pending_amp", None)
        if pending is None:
            return
        flag, event, record = pending
        if event is not None:
            event.synchronize()
        if float(flag) == 0.0:
            return
        stepped, mus, created, groups = record
        for st in stepped:
            st["step"].sub_(1.0)
        for st, old in mus:
            if old is None:
                st.pop("mu_product", None)
            else:
                st["mu_product"].copy_(old)
        for st, key in created:
            st.pop(key, None)
        for g in groups:
            g["sr_step"] -= 1
        for p in [p for p, st in self.state.items() if not st]:  # a skipped first step created nothing
            del self.state[p]
        self.invalidate_caches()

    def _defer_amp_flag(self, found_inf, record):
        """Copy found_inf to the host without blocking; sync_amp() reads it later."""
        if found_inf.device.type == "cuda":
            buf = self.__dict__.get("_amp_flag")
            if buf is None:
                buf = self._amp_flag = torch.empty(1, dtype=torch.float32, pin_memory=True)
            buf.copy_(found_inf.reshape(1), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            buf, event = found_inf.detach().reshape(1).clone(), None
        self._pending_amp = (buf, event, record)

    def state_dict(self):
        self.sync_amp()
        return super().state_dict()

    def _amp(self):
        """GradScaler protocol: returns (skip, inv_scale)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return True, 1.0
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return False, 1.0
        scale = float(grad_scale)
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"{type(self).__name__}: grad_scale must be finite and nonzero, got {scale}")
        return False, 1.0 / scale

    def _prepare_step(self, plan, loss, inv_scale: float) -> None:
        """Hook between validation (``_plan``, GradScaler check) and the update pass: everything is
        valid and nothing has been modified yet. Calls ``spec.group_prepare`` once per group (per-group
        host scalars such as the schedule-free c). Subclasses that need a reduction pass over all
        tensors (the schedule-free Polyak step) override it, raising here if the step must not
        happen, and then call ``super()._prepare_step``."""
        self._apply_group_prepare([group for group, *_ in plan])

    def _apply_group_prepare(self, groups, overrides=None) -> None:
        """``spec.group_prepare`` of every group (``overrides``: per-group values it reads instead of the
        group's, e.g. this step's Polyak lr), then the results written: all groups or none (it raises
        before the first write)."""
        prep = self.spec.group_prepare
        if prep is None:
            return
        name = type(self).__name__
        updates = []
        for gi, group in enumerate(groups):
            extra = overrides[gi] if overrides else None
            try:
                updates.append({**(extra or {}), **prep({**group, **extra} if extra else group)})
            except (ValueError, OverflowError) as e:
                raise ValueError(f"{name} param group {gi}: {e}") from None
        for group, upd in zip(groups, updates):
            group.update(upd)

    def _init_state(self, items, state_names, layout=_layouts.NATIVE, created=None):
        """Create missing elementwise state (zeros in the layout's state dtype; the fp32 master copy of
        the param under the ``master`` layout). Returns (state dicts, fresh flags): fresh is True for a
        tensor whose state was (partly) created in this step."""
        states, fresh = [], []
        n = len(state_names)
        native = layout.name == "native"
        for p in items:
            st = self.state[p]
            missing = [k for k in state_names if k not in st] if n else ([] if st else [None])
            for k in missing:
                if k is not None:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format, dtype=None if native else
                                             layout.state_dtype_for(p.dtype))
                    if created is not None:
                        created.append((st, k))
            if layout.master and _layouts.MASTER_KEY not in st:
                st[_layouts.MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                if created is not None:
                    created.append((st, _layouts.MASTER_KEY))
            states.append(st)
            fresh.append(bool(missing))
        return states, fresh

    def _advance_steps(self, gi, states) -> list:
        """Increment every tensor's ``step`` (torch's float32 0-d CPU tensor) and return the new counts.

        The first time, the group's counters are re-created as views of one 1-D tensor; while the same
        tensors keep stepping together (checked by object identity against the views this cache keeps
        alive, so an id cannot be reused), later steps advance all of them with one add and read them
        with one ``tolist``. Anything else (a different set of params with gradients, a loaded
        state_dict) takes the general path once and re-caches."""
        if not states:
            return []
        buf = self._host_views(gi, "step", states, step_tensor)
        buf.add_(1.0)
        return buf.tolist()

    def _host_views(self, gi, key, states, current) -> torch.Tensor:
        """A 1-D CPU tensor whose element i is ``states[i][key]``, a 0-d tensor viewing it.

        The first time, ``current(state)`` gives each tensor's value as a 0-d tensor (normalized: created
        when missing) and the states' entries are replaced by views of one stacked tensor; while the same
        tensors keep stepping together (checked by object identity against the views this cache keeps
        alive, so an id cannot be reused), the same tensor is returned, to be advanced in place by one
        vector op. Anything else (a different set of params with gradients, a loaded state_dict) takes the
        general path once and re-caches."""
        cached = self._step_views.get((gi, key))
        if cached is not None:
            buf, views = cached
            if _same_entries(states, key, views):
                return buf
        buf = torch.stack([current(st) for st in states])
        views = list(buf.unbind(0))
        for st, v in zip(states, views):
            st[key] = v
        self._step_views[(gi, key)] = (buf, views)
        return buf

    def _group_scalars(self, gi, group, states, fresh, grad_mult):
        """One scalar pack per tensor. Step counters of the whole group advance together, and tensors
        with equal (step, fresh) share one pack unless the rule's pack reads other per-tensor state."""
        spec = self.spec
        ts = self._advance_steps(gi, states) if spec.counts_steps else [None] * len(states)
        if spec.pack_reads_state:
            if spec.advance_many is None or not states:
                return [spec.Scalars(*spec.advance(group, st, f, t), grad_mult) for st, f, t in zip(states, fresh, ts)]
            key, initial = spec.host_state
            values = self._host_views(gi, key, states, lambda st: _host_scalar(st, key, initial))
            pks = spec.advance_many(group, values, fresh, ts)
            ids = list(map(id, pks))  # (equal packs are one tuple: one Scalars object each)
            if ids.count(ids[0]) == len(ids):
                return [spec.Scalars(*pks[0], grad_mult)] * len(ids)
            made = {}
            return [made[i] if i in made else made.setdefault(i, spec.Scalars(*pk, grad_mult)) for i, pk in zip(ids, pks)]
        n = len(states)
        if n and fresh.count(fresh[0]) == n and ts.count(ts[0]) == n:  # the usual case: one pack for all
            return [spec.Scalars(*spec.advance(group, states[0], fresh[0], ts[0]), grad_mult)] * n
        cache, out = {}, []
        for st, f, t in zip(states, fresh, ts):
            sc = cache.get((t, f))
            if sc is None:
                sc = cache[(t, f)] = spec.Scalars(*spec.advance(group, st, f, t), grad_mult)
            out.append(sc)
        return out

    def _advance_steps_device(self, gi, states, device) -> torch.Tensor:
        """capturable=True: the group's ``step`` counters are float32 0-d tensors on ``device``, views of one
        [n] tensor that one in-place add advances (captured as one kernel in a CUDA graph). Returns the
        counts as one [n] tensor and the tensors that hold them (to undo a skipped step).
        Traced by torch.compile: the counters are advanced where they are (a new buffer every call would
        fail dynamo's guards on the state's tensor identities and recompile every step)."""
        def on_device(s):  # a step count (None: not started) as the float32 0-d tensor on the device
            return torch.zeros((), dtype=torch.float32, device=device) if s is None else \
                torch.as_tensor(s).detach().to(device=device, dtype=torch.float32).reshape(())

        if torch.compiler.is_compiling():
            steps = []
            for st in states:
                s = st.get("step")
                if not (isinstance(s, torch.Tensor) and s.device == device and s.dtype == torch.float32 and s.dim() == 0):
                    s = st["step"] = on_device(s)
                steps.append(s)
            torch._foreach_add_(steps, 1.0)
            return torch.stack(steps), steps
        cached = self._step_views.get(gi)
        if cached is not None:
            buf, views = cached
            if buf.device == device and _same_entries(states, "step", views):
                buf.add_(1.0)
                return buf, [buf]
        # (first step, or re-planned: may copy counters to the device, never while capturing)
        steps = [on_device(st.get("step")) for st in states]
        buf = torch.stack(steps) + 1.0 if steps else torch.zeros(0, dtype=torch.float32, device=device)
        views = list(buf.unbind(0))
        for st, v in zip(states, views):
            st["step"] = v
        self._step_views[gi] = (buf, views)
        return buf, [buf]

    def _device_scalars(self, gi, group, states, fresh, grad_mult, device, undo: list) -> torch.Tensor:
        """capturable=True: the group's scalar packs as one float64 [n, k] table computed on ``device`` by
        tensor ops, from the same ``spec.advance`` as the host packs (``t`` is the [n] step vector, a tensor
        lr stays a tensor): no host read, no host-to-device copy of a per-step number, so the step can be
        captured in a CUDA graph and replayed with new gradients and an lr updated in place. Constant
        hyperparameters (betas, eps, weight decay) become fill kernels of the graph."""
        spec = self.spec
        n = len(states)
        t = None
        if spec.counts_steps:
            t, holders = self._advance_steps_device(gi, states, device)
            t = t.to(torch.float64)
            undo.extend(holders)
        tables = {}
        for f in sorted(set(fresh)):
            cols = []
            for v in (*spec.advance(group, {}, f, t), grad_mult):
                if isinstance(v, torch.Tensor):
                    cols.append(v.to(device=device, dtype=torch.float64).expand(n))
                else:
                    cols.append(torch.full((n,), float(v), dtype=torch.float64, device=device))
            tables[f] = torch.stack(cols, 1)
        if len(tables) == 1:
            return tables[fresh[0]]
        # some tensors got their state in this step (never the case in a captured step)
        return torch.where(torch.tensor(fresh, device=device)[:, None], tables[True], tables[False])

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step.

        Under ``torch.compile`` the step is traced into the graph in its capturable form (dynamo reads
        every param group's ``capturable`` as True, as it does for torch's optimizers): step counters on
        the params' device, the scalar table computed by tensor ops, one ``momentum_fused::bucket_step``
        op per bucket. Rules that cannot be capturable (NAdam, FSGDM, schedule-free), the bf16_sr layout
        and backends without scalar tables (reference) run eagerly instead: one graph break at the call.
        docs/ecosystem.md."""
        self._called["step"] = True  # what an LR scheduler's step wrapper records (see below the class)
        if torch.compiler.is_compiling() and self._traceable():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            return self._update(loss)
        return self._eager_step(closure)

    @property
    def _opt_called(self) -> bool:
        """Read by LR schedulers (warning when ``scheduler.step()`` comes before the first ``step()``). Kept
        in a dict: dynamo replays the mutation of a dict from a traced step, not an attribute write."""
        return self.__dict__.get("_called", {}).get("step", False)

    @_opt_called.setter
    def _opt_called(self, value) -> None:
        self.__dict__.setdefault("_called", {})["step"] = bool(value)

    def _traceable(self) -> bool:
        """Can dynamo trace this step (see ``step``)? Marked below as a constant of the trace (evaluated
        once when tracing, without guards on the lr values)."""
        spec = self.spec
        for group in self.param_groups:
            lay = _layouts.get_layout(group["layout"])
            if self._not_capturable(lay) is not None or not isinstance(group["lr"], torch.Tensor):
                return False  # (a float lr would be specialized: one recompilation per value)
            seen = set()
            for p in group["params"]:
                if p.grad is None or p.is_complex():
                    if p.grad is not None:
                        return False
                    continue
                key = (p.device, p.dtype)
                if key not in seen:
                    seen.add(key)
                    if not backends.resolve(self.backend, spec, p.device, p.dtype, lay).scalar_tables:
                        return False
        return True

    @torch._disable_dynamo
    def _eager_step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The cyclic garbage collector is paused for the update (not for the closure): the step allocates
        # ~10 short-lived acyclic objects per tensor, enough to trigger collections that traverse the whole
        # heap (measured: up to 30 us per tensor on a model of 10k tensors). Collection resumes after it.
        if not gc.isenabled():
            return self._update(loss)
        gc.disable()
        try:
            return self._update(loss)
        finally:
            gc.enable()

    def _update(self, loss):
        """The step after the closure: plan, GradScaler, state, scalars, one backend call per bucket."""
        if "_pending_amp" in self.__dict__:  # the previous step's device-side GradScaler flag
            self.sync_amp()
        traced = torch.compiler.is_compiling()  # (dynamo's guards replace the cached plan there)
        fast = None if traced else self._fast_plan()
        plan, cached = (self._plan(), None) if fast is None else fast
        amp = self._device_amp(plan)
        if amp is None:
            skip, inv_scale = self._amp()
            if skip:
                return loss
            record = None
        else:
            inv_scale = 1.0
            record = ([], [], [], [])  # stepped states, (state, old mu_product), (state, created key), groups
        self._prepare_step(plan, loss, inv_scale)
        spec = self.spec
        buckets: dict[tuple, tuple] = {}

        def bucket(backend, device, dtype, flags, layout, cap):
            key = (backend.name, device, dtype, flags, layout.name, cap)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = (backend, [], [], [], [], layout, [])
            return b

        cap_steps = []  # the step counters of capturable groups (on the device; GradScaler undoes them there)

        for gi, (group, state_names, items, chosen) in enumerate(plan):
            flags = spec.make_flags(group)
            grad_mult = (-1.0 if group["maximize"] else 1.0) * inv_scale
            lay = _layouts.get_layout(group["layout"])
            cap = group["capturable"]
            if cached is None:
                states, fresh = self._init_state(items, state_names, lay, None if record is None else record[2])
            else:  # the cached plan: every state tensor exists
                states, fresh = cached[gi][0]["states"], [False] * len(items)
            if record is not None:  # what the optimistic host-side advance must be able to undo
                if spec.counts_steps:
                    record[2].extend([(st, "step") for st in states if "step" not in st])
                    if not cap:  # (capturable counters are undone on the device, below)
                        record[0].extend(states)
                if spec.pack_reads_state:
                    record[1].extend([(st, st["mu_product"].clone() if isinstance(st.get("mu_product"), torch.Tensor)
                                       else None) for st in states])
                if lay.stochastic:
                    record[3].append(group)
            if cap:
                scalars = self._device_scalars(gi, group, states, fresh, grad_mult, next(iter(chosen))[0],
                                               cap_steps) if items else []
            else:
                scalars = self._group_scalars(gi, group, states, fresh, grad_mult)
            names = (*state_names, _layouts.MASTER_KEY) if lay.master else state_names
            keys = None
            if lay.stochastic:  # one rounding key per tensor: (seed, the group's step, the param's position)
                pos = {id(q): i for i, q in enumerate(group["params"])}
                keys = [_layouts.sr_key(group["sr_seed"], group["sr_step"], (gi << 20) + pos[id(p)]) for p in items]
                group["sr_step"] += 1
            if len(chosen) == 1 and (cached is not None or not any([p.is_complex() for p in items])):
                # one bucket: no per-tensor keys (a cached plan has no complex params)
                (device, dtype), backend = next(iter(chosen.items()))
                b = bucket(backend, device, dtype, flags, lay, cap)
                b[1].extend(items)
                if cached is None:
                    b[2].extend([p.grad for p in items])
                    b[3].extend([tuple([st[k] for k in names]) for st in states])
                else:
                    b[2].extend(cached[gi][1])
                    b[3].extend(cached[gi][0]["tuples"])
                if cap:
                    b[4].append(scalars)  # a [n, k] device table
                else:
                    b[4].extend(scalars)
                if keys is not None:
                    b[6].extend(keys)
            else:
                for i, (p, st, sc) in enumerate(zip(items, states, scalars)):
                    rp = _real(p)
                    b = bucket(chosen[(rp.device, rp.dtype)], rp.device, rp.dtype, flags, lay, cap)
                    b[1].append(rp)
                    b[2].append(_real(p.grad))
                    b[3].append(tuple([_real(st[k]) for k in names]))
                    b[4].append(sc[None] if cap else sc)
                    if keys is not None:
                        b[6].append(keys[i])
            if spec.group_advance is not None:
                spec.group_advance(group)  # per-group counters move after the packs used them
        for (_, device, _, flags, _, cap), (backend, ps, gs, sts, scs, lay, keys) in buckets.items():
            if cap:
                scs = scs[0] if len(scs) == 1 else torch.cat(scs)
            kw = {}
            if lay.name != "native":
                kw.update(layout=lay, sr_keys=keys if lay.stochastic else None)
            if amp is not None:  # device-side GradScaler scalars (no host read)
                kw.update(found_inf=amp[0].to(device, non_blocking=True),
                          grad_scale=None if amp[1] is None else amp[1].to(device, non_blocking=True))
            if traced:  # one opaque op in the graph (it runs backend.apply)
                _bucket_op(backend, spec, flags, ps, gs, sts, scs, **kw)
            else:
                backend.apply(spec, flags, *_dist.local_bucket(ps, gs, sts), scs, **kw)  # DTensors: local shards
        if amp is not None:
            for buf in cap_steps:  # an inf step did not happen: its count neither (no host read)
                buf.sub_(amp[0].to(buf.device, buf.dtype, non_blocking=True).reshape(()))
            if any(record):  # (capturable steps after the first have nothing to roll back on the host)
                self._defer_amp_flag(amp[0], record)
        if cached is None and not traced:
            self._remember_plan(plan)
        return loss


# An LR scheduler wraps ``optimizer.step`` in a function of torch/optim/lr_scheduler.py (to warn when
# ``scheduler.step()`` comes first) unless the step is marked as already tracking its calls. That file is
# skipped by dynamo, so the wrapper would put a graph break at every compiled ``opt.step()``; our step
# records ``_opt_called`` itself and carries the mark.
FusedOptimizer.step._wrapped_by_lr_sched = True
# = torch.compiler.assume_constant_result(FusedOptimizer._traceable), without importing torch._dynamo (and
# triton with it) at import time; tests/test_ecosystem.py checks that the public decorator sets this mark.
FusedOptimizer._traceable._dynamo_marked_constant = True


# ---------------------------------------------------------------------------------------- torch.compile
@torch.library.custom_op("momentum_fused::bucket_step", mutates_args=("params", "states"))
def bucket_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[torch.Tensor],
                scalars: torch.Tensor, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None, rule: str,
                flags: int, backend: str, layout: str) -> None:
    """One bucket of a traced (``torch.compile``) step: ``backend.apply`` of ``rule`` on params, grads and the
    flat state list (tensor-major, ``len(states) // len(params)`` per param), with the float64 [n, k] scalar
    table. Registered with its mutations (params and states are written in place) and a fake kernel, so
    that dynamo records it as one node instead of tracing the backend's Python."""
    spec = get_spec(rule)
    fl = spec.Flags(*[bool(flags >> i & 1) for i in range(len(spec.flag_names))])
    lay = _layouts.get_layout(layout)
    n = len(params)
    if n == 0:
        return
    per = len(states) // n
    sts = [tuple(states[i * per:(i + 1) * per]) for i in range(n)]
    b = backends.resolve(backend, spec, params[0].device, _real_dtype(params[0].dtype), lay)
    kw = {} if lay.name == "native" else {"layout": lay}
    if found_inf is not None:
        kw.update(found_inf=found_inf, grad_scale=grad_scale)
    b.apply(spec, fl, params, grads, sts, scalars, **kw)


@bucket_step.register_fake
def _bucket_step_fake(params, grads, states, scalars, found_inf, grad_scale, rule, flags, backend, layout):
    return None


def _bucket_op(backend, spec, flags, ps, gs, sts, scs, *, layout=None, sr_keys=None, found_inf=None, grad_scale=None):
    if sr_keys is not None:  # (capturable excludes bf16_sr; a traced step is capturable)
        raise NotImplementedError("momentum_fused: a traced step cannot use the bf16_sr layout")
    bits = sum(1 << i for i, f in enumerate(flags) if f)
    bucket_step(list(ps), list(gs), [t for st in sts for t in st], scs, found_inf, grad_scale, spec.name, bits,
                backend.name, "native" if layout is None else layout.name)
