"""What the benchmark runs: the rules (with our factory and torch's where torch has the rule), the
providers, and the bytes each rule moves per element. Uses only the public momentum_fused API."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

import momentum_fused as mf

# bytes read + written per element by one fused pass (n_state, param dtype, grad dtype, state dtype, layout)
bytes_per_elem = mf.layouts.roofline_bytes


@dataclass
class Rule:
    name: str
    ours: Callable  # (params, backend) -> optimizer
    n_state: int  # elementwise state tensors (same dtype as the param in the current layouts)
    torch_cls: type | None = None
    torch_kwargs: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)  # provider name -> (module, factory(module, params))


def _peer_lion(mod, params):
    return mod.Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)


def _peer_qhm(mod, params):
    return mod.QHM(params, lr=1.0, momentum=0.999, nu=0.7)


def _po_sf(name, **kw):
    def make(mod, params):
        opt = getattr(mod, name)(params, **kw)
        opt.train()
        return opt

    return make


def _peer_sf_sgd(mod, params):
    opt = mod.SGDScheduleFree(params, lr=1.0, momentum=0.9)
    opt.train()
    return opt


def _peer_sf_adamw(mod, params):
    opt = mod.AdamWScheduleFree(params, lr=2.5e-3)
    opt.train()
    return opt


def _sf(name, **kw):
    cls = getattr(mf, name, None)
    if cls is None:
        return None

    def make(params, backend):
        opt = cls(params, backend=backend, **kw)
        opt.train()
        return opt

    return make


def rules() -> list[Rule]:
    out = [
        Rule("sgd", lambda p, b: mf.SGD(p, lr=1e-3, backend=b), 0, torch.optim.SGD, dict(lr=1e-3)),
        Rule("sgd_momentum", lambda p, b: mf.SGD(p, lr=1e-3, momentum=0.9, backend=b), 1, torch.optim.SGD,
             dict(lr=1e-3, momentum=0.9)),
        Rule("nesterov", lambda p, b: mf.SGD(p, lr=1e-3, momentum=0.9, nesterov=True, backend=b), 1,
             torch.optim.SGD, dict(lr=1e-3, momentum=0.9, nesterov=True)),
        Rule("qhm", lambda p, b: mf.QHM(p, backend=b), 1, peers={"qhoptim": ("qhoptim.pyt", _peer_qhm),
                                                          "pytorch-optimizer": ("pytorch_optimizer", _peer_qhm)}),
        Rule("adam", lambda p, b: mf.Adam(p, backend=b), 2, torch.optim.Adam, {}),
        Rule("adamw", lambda p, b: mf.AdamW(p, backend=b), 2, torch.optim.AdamW, {}),
        Rule("amsgrad", lambda p, b: mf.Adam(p, amsgrad=True, backend=b), 3, torch.optim.Adam, dict(amsgrad=True)),
        Rule("adam_tied", lambda p, b: mf.AdamTied(p, beta=0.95, backend=b), 2, torch.optim.Adam,
             dict(betas=(0.95, 0.95))),
        Rule("nadam", lambda p, b: mf.NAdam(p, backend=b), 2, torch.optim.NAdam, {}),
        Rule("rmsprop", lambda p, b: mf.RMSprop(p, backend=b), 1, torch.optim.RMSprop, {}),
        Rule("signsgd", lambda p, b: mf.SignSGD(p, backend=b), 0),
        Rule("signum", lambda p, b: mf.Signum(p, backend=b), 1),
        Rule("lion", lambda p, b: mf.Lion(p, backend=b), 1, peers={"lion-pytorch": ("lion_pytorch", _peer_lion),
                                                         "pytorch-optimizer": ("pytorch_optimizer", _peer_lion)}),
        Rule("fsgdm", lambda p, b: mf.FSGDM(p, backend=b), 1),
    ]
    sf_sgd = _sf("SGDScheduleFree")
    if sf_sgd is not None:
        out.append(Rule("sf_sgd", sf_sgd, 1, peers={"schedulefree": ("schedulefree", _peer_sf_sgd),
                                                "pytorch-optimizer": ("pytorch_optimizer",
                                                                      _po_sf("ScheduleFreeSGD", lr=1.0, momentum=0.9))}))
    sf_adamw = _sf("AdamWScheduleFree")
    if sf_adamw is not None:
        out.append(Rule("sf_adamw", sf_adamw, 2, peers={"schedulefree": ("schedulefree", _peer_sf_adamw),
                                                  "pytorch-optimizer": ("pytorch_optimizer",
                                                                        _po_sf("ScheduleFreeAdamW", lr=2.5e-3))}))
    return out


@dataclass
class Provider:
    name: str
    kind: str  # "ours" | "torch" | "peer"
    make: Callable  # params -> optimizer


PROBE_NUMEL = 1031  # odd: a vector body and a tail
TORCH_UPDATE_TOL = 0.1  # a torch variant whose update is further than this from its for-loop step is no baseline


def torch_update_error(cls, kw: dict, device: torch.device, dtype: torch.dtype) -> float:
    """How far a torch.optim variant's update is from the same class's for-loop step in float64: 2 steps with lr
    0.5 on PROBE_NUMEL elements, ||dp - dp_ref|| / ||dp_ref|| (the rounding of ``dtype`` costs ~1 %). Catches a
    variant that runs but does not do the work: torch 2.13's CPU fused SGD never writes bf16/fp16 params (its
    reduced-precision loop has no param store), so timing it measured a step that moves 4 of SGD's 6 bytes."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(PROBE_NUMEL, generator=gen, dtype=torch.float64)
    grads = [torch.randn(PROBE_NUMEL, generator=gen, dtype=torch.float64) for _ in range(2)]
    kw = {**kw, "lr": 0.5}
    ref_kw = {k: v for k, v in kw.items() if k not in ("fused", "foreach")}

    def run(make, dev, dt):
        p = p0.to(dev, dt, copy=True).requires_grad_()
        opt = make([p])
        for g in grads:
            p.grad = g.to(dev, dt)
            opt.step()
        return p.detach().to("cpu", torch.float64)

    out = run(lambda ps: cls(ps, **kw), device, dtype)
    ref = run(lambda ps: cls(ps, foreach=False, **ref_kw), "cpu", torch.float64)
    start = p0.to(dtype).double()  # what the variant started from
    return float((out - start - (ref - p0)).norm() / (ref - p0).norm())


def _torch_variant_ok(cls, flag: str) -> bool:
    return flag in inspect.signature(cls.__init__).parameters


def _ours(rule: Rule, params, backend: str, layout: str):
    """Our optimizer for ``rule``; the dtype layout is a param-group key, set before the first step."""
    opt = rule.ours(params, backend)
    if layout != "native":
        if layout not in type(opt).supported_layouts:
            raise ValueError(f"{type(opt).__name__} does not support dtype layout {layout!r}")
        for g in opt.param_groups:
            g["layout"] = layout
    return opt


def providers(rule: Rule, device: torch.device, dtype: torch.dtype, include_reference: bool = True,
              layout: str = "native") -> tuple[list, dict]:
    """Available providers for ``rule`` and a {provider: reason} dict for those left out. Ours run in
    the momentum_fused dtype ``layout``; torch and peers in the native layout of ``dtype``."""
    avail, missing = [], {}
    spec_probe = [torch.zeros(1, device=device, dtype=dtype, requires_grad=True)]
    lay = mf.layouts.get_layout(layout)
    for name in mf.backends.names():
        if name == "reference" and not include_reference:
            continue
        try:  # constructing and resolving tells whether this backend runs this rule here
            opt = _ours(rule, spec_probe, name, layout)
            mf.backends.resolve(name, opt.spec, device, dtype, lay)
        except Exception as e:  # unavailable, or unsupported rule/dtype/layout: reported, not hidden
            missing[f"ours:{name}"] = str(e).split("\n")[0]
            continue
        avail.append(Provider(f"ours:{name}", "ours", lambda p, n=name: _ours(rule, p, n, layout)))
    if rule.torch_cls is not None:
        for variant in ("forloop", "foreach", "fused"):
            kw = dict(rule.torch_kwargs)
            if variant == "forloop":
                kw["foreach"] = False
            elif variant == "foreach":
                kw["foreach"] = True
            else:
                if not _torch_variant_ok(rule.torch_cls, "fused"):
                    missing[f"torch:{variant}"] = f"torch.optim.{rule.torch_cls.__name__} has no fused implementation"
                    continue
                kw["fused"] = True
            try:
                off = torch_update_error(rule.torch_cls, kw, device, dtype)
            except Exception as e:
                missing[f"torch:{variant}"] = str(e).split("\n")[0]
                continue
            if not off <= TORCH_UPDATE_TOL:  # not a baseline: timing it would compare with a step that does not do the work
                what = (f"its update is {off:.0%} off" if off == off and off != float("inf") else
                        "its params turn NaN or inf, unlike")
                missing[f"torch:{variant}"] = (
                    f"wrong results here: {what} torch's own for-loop step in float64 (lr 0.5, 2 steps, "
                    f"{PROBE_NUMEL} elements; bench/rules.py torch_update_error)")
                continue
            avail.append(Provider(f"torch:{variant}", "torch", lambda p, c=rule.torch_cls, k=kw: c(p, **k)))
    for peer, (module, factory) in rule.peers.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing[f"peer:{peer}"] = (f"{peer} not installed (pip install -e .[bench-peers])" if e.name and
                                       module.startswith(e.name) else f"{peer}: importing it failed: {e}")
            continue
        except Exception as e:  # installed but broken: say so, not "not installed"
            missing[f"peer:{peer}"] = f"{peer}: importing it failed: {type(e).__name__}: {str(e)[:160]}"
            continue
        avail.append(Provider(f"peer:{peer}", "peer", lambda p, m=mod, f=factory: f(m, p)))
    return avail, missing
