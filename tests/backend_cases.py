"""The backend parity case table and its runner, shared by the compiled backends' tests
(tests/test_cpu_backend.py on CPU, tests/test_cuda_backend.py on a CUDA device).

Every case runs one backend against the float64 reference backend for >= 10 steps over two param
groups (different hyperparameters, same flags, so one bucket) and compares params and every state
tensor with the one tolerance table (tests/tolerances.py).
"""
from __future__ import annotations

import pytest
import torch

import momentum_fused as mf

from tolerances import tol

SHAPES = [(), (0,), (1,), (15,), (17,), (4097,), (65537,), (3, 5, 7)]
STEPS = 10
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# (id, class, kwargs of group 0, overrides for group 1 (same flags, other hyperparameters), sign rule,
#  bf16/fp16 settings). Low-precision runs keep every value the storage dtype rounds near magnitude 1,
#  where tolerances.py's bf16/fp16 budget applies: gradients ~0.1 ("gscale") for momentum-buffer rules
#  (a buffer of ~5 has a bf16 ulp of 0.03 > atol), ~1 for second-moment rules (v = (1-beta2) g^2 stays
#  out of the fp16 subnormals), and eps=1 for RMSprop with momentum (g/(sqrt(v)+eps) stays ~g).
_M = dict(gscale=0.1)  # momentum-buffer rules
_V = dict(gscale=1.0)  # second-moment rules
def takes_layout(case, layout: str = "int8_state") -> bool:
    """Whether ``layout`` takes this case's optimizer and kwargs (``case``: (id, class, kwargs, ...), this module's
    or compressed_oracle's): the class offers it and its rule does not refuse the group under a layout of reduced
    state precision (RMSprop's centered=True: specs.UpdateRuleSpec.state_refusal, tested in
    test_compressed_state.py)."""
    cls, kw = case[1], case[2]
    if layout not in cls.supported_layouts:
        return False
    spec = mf.specs.get_spec(cls.rule)
    return (spec.state_refusal is None or not mf.layouts.get_layout(layout).reduced_state
            or spec.state_refusal({**spec.defaults, **kw}) is None)


def takes_int8(case) -> bool:
    """``takes_layout`` for the 8-bit layouts (they refuse the same groups)."""
    return takes_layout(case, "int8_state")


CASES = [
    ("sgd", mf.SGD, dict(lr=0.05), dict(lr=0.02, weight_decay=0.01), False, _M),
    ("sgd-momentum", mf.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     dict(lr=0.02, dampening=0.0, weight_decay=0.0, maximize=True), False, _M),
    ("sgd-nesterov", mf.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
     dict(lr=0.02, momentum=0.8, maximize=False), False, _M),
    ("qhm-grad", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01), dict(lr=0.05, nu=0.5), False, _M),
    ("qhm-direct", mf.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01, weight_decay_type="direct"),
     dict(momentum=0.5, weight_decay=0.1), False, _M),
    ("adam", mf.Adam, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, betas=(0.8, 0.99), weight_decay=0.0), False,
     _V),
    ("adamw", mf.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(lr=5e-3, eps=1e-6, maximize=True), False, _V),
    ("adam-amsgrad", mf.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01), dict(betas=(0.5, 0.9)), False, _V),
    ("adamw-amsgrad", mf.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True), dict(lr=2e-2, weight_decay=0.0), False,
     _V),
    ("adamtied", mf.AdamTied, dict(lr=1e-2, beta=0.9), dict(beta=0.95), False, _V),
    ("nadam", mf.NAdam, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, momentum_decay=1e-2), False, _V),
    ("nadamw", mf.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), dict(betas=(0.8, 0.99)),
     False, _V),
    ("rmsprop", mf.RMSprop, dict(lr=1e-3), dict(weight_decay=0.01, alpha=0.9), False, _V),
    ("rmsprop-momentum", mf.RMSprop, dict(lr=1e-3, momentum=0.9, weight_decay=0.01), dict(momentum=0.5), False,
     dict(gscale=0.1, eps=1.0)),
    ("rmsprop-centered", mf.RMSprop, dict(lr=1e-3, centered=True), dict(lr=2e-3, maximize=True), False, _V),
    ("rmsprop-momentum-centered", mf.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True),
     dict(alpha=0.95, eps=1e-4), False, dict(gscale=0.1, eps=1.0)),
    ("signsgd", mf.SignSGD, dict(lr=1e-2, weight_decay=0.1), dict(lr=2e-2, weight_decay=0.0), True, _M),
    ("signum", mf.Signum, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), dict(momentum=0.5, maximize=True), True,
     _M),
    ("lion", mf.Lion, dict(lr=1e-2, weight_decay=0.1), dict(betas=(0.5, 0.9), weight_decay=0.0), True, _M),
    ("fsgdm", mf.FSGDM, dict(lr=0.05, sigma=9, n_stages=3), dict(lr=0.02, c_scaling=0.1, weight_decay=0.0), False,
     _M),
]
CASES += [  # schedule-free rules
    ("sgd_sf", mf.SGDScheduleFree, dict(lr=0.1, weight_decay=0.01, warmup_steps=3),
     dict(lr=0.05, momentum=0.5), False, _M),
    ("adamw_sf", mf.AdamWScheduleFree, dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, betas=(0.8, 0.99)),
     False, _V),
    # fp16: eps=0.1 keeps d = g/(sqrt(v)+eps) away from ratios of fp16-subnormal v, which the inner
    # momentum would accumulate
    ("adamw_sf-inner", mf.AdamWScheduleFree, dict(lr=1e-2, inner_momentum=0.9, weight_lr_power=1.0),
     dict(weight_decay=0.1), False, dict(gscale=1.0, eps=0.1)),
]

# Muon (a multi-phase rule: its two elementwise passes muon_momentum and muon_apply are kernel rules, the
# Newton-Schulz phase between them runs with torch ops, here in float64 on both sides). Matrices only: 2-D and
# 3-D, tall and wide, an empty one, and one above the CPU kernels' per-thread grain (32768 elements).
MUON_SHAPES = [(3, 5), (65, 520), (4, 3, 2), (3, 5), (7, 2), (0, 4), (520, 65), (1, 1)]
MUON_CASES = [
    ("muon-nesterov", mf.Muon, dict(lr=0.02, ns_dtype=torch.float64), dict(lr=0.01, weight_decay=0.0, maximize=True),
     False, _M),
    ("muon-heavy-ball", mf.Muon, dict(lr=0.02, nesterov=False, momentum=0.9, adjust_lr_fn="match_rms_adamw",
                                      ns_dtype=torch.float64), dict(momentum=0.5, weight_decay=0.3), False, _M),
    ("muon-batched", mf.Muon, dict(lr=0.02, flatten=False, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float64),
     dict(weight_decay=0.05, flatten=True), False, _M),  # (the 3-D param, in the first group: 4 matrices)
]


def _muon_case_params():
    return [pytest.param(cls, kw0, kw1, dt, sign, lp, id=f"{cid}-{str(dt).replace('torch.', '')}")
            for cid, cls, kw0, kw1, sign, lp in MUON_CASES for dt in DTYPES]


def _params(shapes, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]
    rs = [p.detach().cpu().double().clone().requires_grad_() for p in ps]
    return ps, rs, gen


def _grads(shapes, dtype, gen, signs=None, scale=1.0):
    gs = []
    for i, s in enumerate(shapes):
        g = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        if signs is not None:  # fixed sign per element, magnitude in [0.5, 1.5]: no sign near a tie
            g = signs[i] * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))
        gs.append(g.to(dtype))
    return gs


def _groups(params, kw0, kw1):
    half = len(params) // 2
    return [dict(params=params[:half], **kw0), dict(params=params[half:], **{**kw0, **kw1})]


def _state_names(opt, p):
    if not hasattr(opt, "spec"):  # momentum_fused.Muon (its groups are stepped by inner optimizers)
        return tuple(opt.state[p])
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return opt.spec.state_names(group)
    raise AssertionError("param not in optimizer")


def _compare(opt, ref, ps, rs, dtype, what=""):
    t = tol(dtype)
    for i, (p, r) in enumerate(zip(ps, rs)):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), **t, msg=lambda m: f"{what} param {i}: {m}")
        names = _state_names(ref, r)
        for k in names:
            a, e = opt.state[p][k], ref.state[r][k]
            assert a.dtype == p.dtype and a.shape == p.shape
            torch.testing.assert_close(a.cpu().double(), e, **t, msg=lambda m: f"{what} param {i} state {k}: {m}")


def _run(cls, kw0, kw1, dtype, shapes=SHAPES, steps=STEPS, sign=False, seed=0, lp=None, backend="cpu",
         device="cpu"):
    gscale = 1.0
    if lp is not None and dtype in (torch.bfloat16, torch.float16):
        lp = dict(lp)
        gscale = lp.pop("gscale", 1.0)
        kw0 = {**kw0, **lp}
        kw1 = {k: v for k, v in kw1.items() if k not in lp}
    ps, rs, gen = _params(shapes, dtype, seed, device)
    opt = cls(_groups(ps, kw0, kw1), backend=backend)
    ref = cls(_groups(rs, kw0, kw1), backend="reference")
    signs = [torch.randint(0, 2, s, generator=gen).double() * 2 - 1 for s in shapes] if sign else None
    for _ in range(steps):
        for p, r, g in zip(ps, rs, _grads(shapes, dtype, gen, signs, gscale)):
            p.grad = g.to(device)
            r.grad = g.double()
        opt.step()
        ref.step()
    return opt, ref, ps, rs


def _case_params():
    out = []
    for cid, cls, kw0, kw1, sign, lp in CASES:
        for dt in DTYPES:
            if sign and dt not in (torch.float64, torch.float32):
                continue
            out.append(pytest.param(cls, kw0, kw1, dt, sign, lp, id=f"{cid}-{str(dt).replace('torch.', '')}"))
    return out




# ====================================================================================== dtype layouts
# Shared by the compiled backends' layout tests: the backend itself (backends.resolve(name, ...).apply) on
# one bucket, every rule of CASES x every layout of momentum_fused/layouts.py, against the same layout run
# in float64 math by a small loop over momentum_fused.reference.RULES (on the CPU): each step computes in
# float64 from the STORED values and rounds with the layout's rounding (RNE through fp32 via .to(dtype), SR
# via layouts.sr_round_bf16 of the fp32 value) -- a "rounded float64 reference".
from momentum_fused import backends as _backends  # noqa: E402
from momentum_fused import layouts as LAY  # noqa: E402
from momentum_fused.reference import RULES as REF_RULES  # noqa: E402
from momentum_fused.specs import SPECS as _SPECS  # noqa: E402

ALL_LAYOUTS = ("native", "bf16_state", "master", "bf16_sr")
# (layout, param dtype): the rows of the layout table (native's bf16/fp16 runs are the optimizer-level
# parity tests)
LAYOUT_RUNS = [("native", torch.float32), ("bf16_state", torch.float32), ("master", torch.bfloat16),
               ("master", torch.float16), ("bf16_sr", torch.bfloat16)]
# > 32,768 elements in all: two threads split the bucket (SR element indices start mid-tensor)
LAYOUT_SHAPES = [(), (0,), (1,), (17,), (4097,), (3, 5, 7), (33_001,)]


class LayoutRun:
    """One bucket of one CASES row in one layout: the backend's tensors (on ``device``), the float64-math
    reference's tensors (CPU, same storage dtypes), the host state and groups that give the scalar packs."""

    def __init__(self, cls, kw0, kw1, lay, dtype, sign, lp, shapes=LAYOUT_SHAPES, seed=0, backend="cpu",
                 device="cpu"):
        self.lay = LAY.get_layout(lay)
        self.dtype = dtype
        self.sdtype = self.lay.state_dtype_for(dtype)
        self.device = torch.device(device)
        # the CASES low-precision settings (well-conditioned: no cancellation that would amplify one rounding
        # step's difference) in every layout: a rounding at a boundary in one run and not the other is
        # what each comparison has to absorb
        self.gscale = 1.0
        if lp is not None:
            lp = dict(lp)
            self.gscale = lp.pop("gscale", 1.0)
            kw0 = {**kw0, **lp}
            kw1 = {k: v for k, v in kw1.items() if k not in lp}
        dummy = [torch.zeros(1, requires_grad=True) for _ in shapes]
        opt = cls(_groups(dummy, kw0, kw1), backend="reference")  # only for spec / groups / packs
        self.spec = spec = opt.spec
        self.groups = opt.param_groups
        self.group_of = [gi for gi, g in enumerate(self.groups) for _ in g["params"]]
        assert len({tuple(spec.make_flags(g)) for g in self.groups}) == 1, "the groups must share flags"
        self.flags = spec.make_flags(self.groups[0])
        self.names = spec.state_names(self.groups[0])
        self.backend = _backends.resolve(backend, spec, self.device, dtype)
        assert self.lay.name in self.backend.layouts
        self.gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.signs = [torch.randint(0, 2, s, generator=self.gen).double() * 2 - 1 for s in shapes] if sign else None
        ref_ps = [torch.randn(s, generator=self.gen, dtype=torch.float64).to(dtype) for s in shapes]
        ref_states = []
        for p in ref_ps:
            st = [p.clone().to(self.sdtype) if k == "z" else torch.zeros(p.shape, dtype=self.sdtype)
                  for k in self.names]  # schedule-free z starts as a copy of y
            if self.lay.master:
                st.append(p.float())
            ref_states.append(st)
        self.ref_ps, self.ref_states = ref_ps, ref_states
        self.p0 = [p.clone() for p in ref_ps]
        self.ps = [p.to(self.device, copy=True) for p in ref_ps]
        self.states = [[t.to(self.device, copy=True) for t in st] for st in ref_states]
        self.host = [{} for _ in shapes]
        self.t = 0

    def packs(self):
        spec, out = self.spec, []
        if spec.group_prepare is not None:
            for g in self.groups:
                g.update(spec.group_prepare(g))
        for i, gi in enumerate(self.group_of):
            g = self.groups[gi]
            out.append(spec.make_scalars(g, self.host[i], self.t == 0, -1.0 if g.get("maximize") else 1.0))
        if spec.group_advance is not None:
            for g in self.groups:
                spec.group_advance(g)
        return out

    def step(self):
        gs = [g.to(self.dtype) for g in _grads(self.shapes, torch.float64, self.gen, self.signs, self.gscale)]
        sc = self.packs()
        keys = [LAY.sr_key(1234, self.t, i) for i in range(len(self.shapes))] if self.lay.stochastic else None
        self.backend.apply(self.spec, self.flags, self.ps, [g.to(self.device) for g in gs],
                           [tuple(s) for s in self.states], sc, layout=self.lay, sr_keys=keys)
        fn = REF_RULES[self.spec.name]
        ns = len(self.names)
        for i, (p, g, st) in enumerate(zip(self.ref_ps, gs, self.ref_states)):
            x = (st[ns] if self.lay.master else p).double()
            s64 = tuple(t.double() for t in st[:ns])
            fn(x, g.double(), s64, sc[i], self.flags)
            x32, s32 = x.float(), [t.float() for t in s64]
            if self.lay.stochastic:
                p.copy_(LAY.sr_round_bf16(x32, keys[i], 0).view(p.shape))
                for j, t in enumerate(s32):
                    st[j].copy_(LAY.sr_round_bf16(t, keys[i], 1 + j).view(p.shape))
            else:
                p.copy_(x32)  # .to(storage dtype): round to nearest even
                for j, t in enumerate(s32):
                    st[j].copy_(t)
                if self.lay.master:
                    st[ns].copy_(x32)
        self.t += 1

    def compare(self):
        """Tolerances of tests/tolerances.py for the storage dtype: a state's for its dtype, the master's for
        fp32, the param's for the coarser of the param and state dtypes (bf16 state feeds fp32 params)."""
        ns = len(self.names)
        order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
        ptol = tol(max(self.dtype, self.sdtype, key=order.index))
        for i, (p, r, st, rst) in enumerate(zip(self.ps, self.ref_ps, self.states, self.ref_states)):
            assert p.dtype == self.dtype and p.device.type == self.device.type  # "cuda" != "cuda:0"
            torch.testing.assert_close(p.cpu().double(), r.double(), **ptol, msg=lambda m: f"param {i}: {m}")
            for j, (a, e) in enumerate(zip(st, rst)):
                want = torch.float32 if j == ns else self.sdtype
                assert a.dtype == want, (j, a.dtype, want)
                what = "master" if j == ns else self.names[j]
                torch.testing.assert_close(a.cpu().double(), e.double(), **tol(want),
                                           msg=lambda m: f"{i} {what}: {m}")
        assert any(not torch.equal(p.cpu(), q) for p, q in zip(self.ps, self.p0))  # the params did move


def _layout_case_params():
    out = []
    for cid, cls, kw0, kw1, sign, lp in CASES:
        for lay, dt in LAYOUT_RUNS:
            out.append(pytest.param(cls, kw0, kw1, lay, dt, sign, lp,
                                    id=f"{cid}-{lay}-{str(dt).replace('torch.', '')}"))
    return out


# ---- bit-exact stores: AMSGrad (4 buffers: param + 3 states) mirrored in torch fp32, op for op
_ADAM = _SPECS["adam"]
_AMS = _ADAM.Flags(False, True)


def _adam_pack(t):
    b1, b2, lr = 0.9, 0.999, 1e-2
    return _ADAM.Scalars(lr, 0.0, b1, b2, 1e-8, lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5, 1.0)


def _adam_mirror(p, g, m, v, vmax, sc):
    """csrc/update_rules.h adam_math<float, false, true> with weight_decay 0 and grad_mult 1 in torch fp32
    on the CPU, one IEEE operation at a time (as the kernels, compiled without FMA contraction)."""
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (constants: double -> float once)
    w1, beta2, omb2, eps = f(1.0 - sc.beta1), f(sc.beta2), f(1.0 - sc.beta2), f(sc.eps)
    nss, bc2 = f(-sc.step_size), f(sc.bc2_sqrt)
    assert float(w1) < 0.5  # mf_lerp's first branch
    m = m + w1 * (g - m)
    v = v * beta2 + (omb2 * g) * g
    vmax = torch.maximum(vmax, v)
    # IEEE sqrt: through float64 (exact after rounding to fp32; torch's fp32 CPU sqrt is not correctly
    # rounded); a full divisor: torch multiplies by the reciprocal of a scalar one
    denom = torch.sqrt(vmax.double()).float() / torch.full_like(vmax, bc2) + eps
    p = p + (nss * m) / denom
    return p, m, v, vmax


def _bits(t):
    """The stored bits as integers (NaNs compare, -0 differs from 0), for any element size."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# The CPU kernel variants (MOMENTUM_FUSED_CPU_ISA) by instruction set: avx512w runs avx512's instructions, tuned.
ISA_RANK = {"baseline": 0, "avx2": 1, "avx512": 2, "avx512w": 2}


def cpu_flags() -> set:
    """This CPU's feature flags (/proc/cpuinfo), empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split(":")[-1].split())
    except OSError:
        return set()


def host_cxx() -> str:
    """The host C++ compiler ($CXX, g++ or c++); skips the test without one."""
    import os
    import shutil
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("needs a C++ compiler (g++ or $CXX)")
    return cxx


def run_csrc_check(source: str, tmp_path, *args: str) -> str:
    """Compile a C++ check program that includes csrc/ headers (the kernels' fp32 flags: no FMA contraction) and run
    it with ``args``; its stdout. Skips where no C++ compiler is found (host_cxx)."""
    import os
    import subprocess
    cxx = host_cxx()
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    src, exe = tmp_path / "check.cpp", tmp_path / "check"
    src.write_text(source)
    built = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno",
                            "-Wno-maybe-uninitialized", f"-I{csrc}", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"the check program did not compile:\n{built.stderr[-4000:]}"
    ran = subprocess.run([str(exe), *args], capture_output=True, text=True)
    assert ran.returncode == 0, f"the check program failed ({ran.returncode}):\n{ran.stderr[-4000:]}"
    return ran.stdout


def _adam_bucket(lay, dtype, shapes, seed):
    """CPU tensors: params, and per param (exp_avg, exp_avg_sq, max_exp_avg_sq[, master]) with values that
    are not all representable in the storage dtype after an update."""
    gen = torch.Generator().manual_seed(seed)
    sd = LAY.get_layout(lay).state_dtype_for(dtype)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    sts = []
    for p in ps:
        st = [torch.randn(p.shape, generator=gen).mul(0.1).to(sd), torch.rand(p.shape, generator=gen).add(0.01).to(sd)]
        st.append((st[1].float() * (1 + torch.rand(p.shape, generator=gen))).to(sd))
        if lay == "master":
            st.append(p.float() + torch.randn(p.shape, generator=gen) * 1e-3)  # not the param's value
        sts.append(st)
    return ps, sts, gen


def check_layout_stores_bit_exact(lay, dtype, backend="cpu", device="cpu"):
    """Every store of every buffer equals the layout's rounding of the fp32 value, bit for bit: SR against
    layouts.sr_round_bf16 (param = buffer 0, state j = buffer 1 + j, element index within the tensor),
    RNE against torch's .to(); the master holds the fp32 value. Two steps from random stored values."""
    shapes = [(200_003,), (5,), (70_001,)]
    cps, csts, gen = _adam_bucket(lay, dtype, shapes, 11)
    ps = [p.to(device, copy=True) for p in cps]
    sts = [[t.to(device, copy=True) for t in st] for st in csts]
    b = _backends.resolve(backend, _ADAM, torch.device(device), dtype)
    for t in (1, 2):
        sc = _adam_pack(t)
        gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
        keys = [LAY.sr_key(99, t, i) for i in range(len(ps))] if lay == "bf16_sr" else None
        want = []
        for p, g, st in zip(ps, gs, sts):
            x = (st[3] if lay == "master" else p).cpu().float()
            want.append(_adam_mirror(x, g.float(), *(s.cpu().float() for s in st[:3]), sc))
        b.apply(_ADAM, _AMS, ps, [g.to(device) for g in gs], [tuple(s) for s in sts], [sc] * len(ps),
                layout=LAY.get_layout(lay), sr_keys=keys)
        for i, (p, st, w) in enumerate(zip(ps, sts, want)):
            for j, (got, x) in enumerate(zip([p] + st[:3], w)):
                got = got.cpu()
                exp = LAY.sr_round_bf16(x, keys[i], j) if lay == "bf16_sr" else x.to(got.dtype)
                assert got.dtype == exp.dtype and torch.equal(_bits(got), _bits(exp)), (t, i, j)
            if lay == "master":
                assert torch.equal(st[3].cpu(), w[0]), (t, i)
    if lay == "bf16_sr":  # the stores really rounded stochastically: many differ from round-to-nearest
        rne = want[0][0].to(torch.bfloat16)
        assert (ps[0].cpu().view(torch.int16) != rne.view(torch.int16)).float().mean() > 0.1
