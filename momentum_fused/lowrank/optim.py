"""LowRankSGD / LowRankAdam: the DLRA momentum optimizers of docs/algorithms.md §8.

One optimizer for the whole model. Params that are :class:`~momentum_fused.lowrank.layer.LowRankFactor`
(U, S, V of a :class:`LowRankLinear`, found through the tag the layer puts on them) are trained on the
manifold of rank-r matrices; every other param (biases, norms, embeddings) is handed to an internal
``momentum_fused.SGD`` / ``momentum_fused.Adam`` over the same hyperparameters, so the normal fused
backends run for them. Both share one ``state`` dict, so ``state_dict()`` is torch's format.

One step of a layer W = U S Vᵀ (G = ∂L/∂W; the factor gradients of ONE backward pass are
G_U = G V Sᵀ, G_S = UᵀGV, G_V = GᵀUS):

1 augment   Û = orth([U, G_U]) (m × min(2r, m)), V̂ likewise, through ``retraction.qr`` with U as the
            leading block (G_U is orthogonalised against U twice, its columns scaled to unit norm,
            then [U, Y] is factored: ÛᵀU = [R₁₁; 0] with R₁₁ = I up to round-off). When 2r > m the
            basis is completed (any orthonormal completion spans Rᵐ). When r = m nothing changes.
2 lift      Ŝ = (ÛᵀU) S (VᵀV̂), B̂ = (ÛᵀU) B (VᵀV̂) (Adam: m the same, v through its square root).
3 gradient  Ĝ = Ûᵀ P_T(G) V̂ = (ÛᵀU)(Lᵀ V̂) + (ÛᵀK)(VᵀV̂) − (ÛᵀU) G_S (VᵀV̂), with K = GV = G_U S⁻ᵀ and
            L = GᵀU = G_V S⁻¹ recovered from the factor gradients: S must be invertible (it is diagonal
            and positive after every truncation; a singular S raises).
4 update    the rule of momentum_fused.reference (sgd_ref / adam_ref) on the core: torch.optim.SGD
            conventions (first step b = g, dampening, nesterov, coupled L2 decay = Ĝ + λŜ) or Adam.
5 truncate  P Σ Qᵀ = svd(Ŝ), r₁ = smallest j with ‖σ_{j:}‖ < τ‖σ‖, clamped to [r_min, r_max]; U ← Û P₁,
            V ← V̂ Q₁, S ← diag(σ₁), B ← P₁ᵀ B̂ Q₁ (Adam: m likewise, v ← (P₁ᵀ √v̂ Q₁)²). On a step without
            augmentation (Û = U) Û P and V̂ Q are re-orthonormalized (qr) before they are written.

Schedules: the basis is augmented on steps t with (t − 1) % augment_every == 0 (other steps update the
core in the fixed basis, Ĝ = G_S), truncated when t % truncate_every == 0 (so with equal periods k:
augment on the first step of a cycle, truncate on its last), and also whenever an
augmented core does not fit the storage (a non-square core, or a rank above max_rank): a truncation
is then forced. ``fixed_rank=True`` keeps every layer at its current rank (τ must be 0).
``param_budget`` caps Σ r(m + n) + r² over all LowRankLinear layers after every step that truncates: the
kept singular values are the largest over the layers truncated in it (r_min first; the others count at the
rank they have after the step), the τ rule and max_rank still apply. Between truncations (truncate_every
> 1) an augmented layer holds up to twice its rank, so the budget can be exceeded on those steps.

Layers of one param group with equal (m, n, r, step) form a bucket: one batched solve, one batched qr
per side (one for both when m == n), one batched SVD.

State: the momentum cores live in ``state[S]`` (``momentum_buffer``; Adam ``exp_avg``, ``exp_avg_sq``)
as r_max × r_max tensors (only the leading r × r block in use), with ``step``. The rank is the
layer's ``rank`` buffer: save and load the model's state_dict together with the optimizer's.
τ, r_min, schedules, budget, backend and retraction are constructor settings, not saved.
"""
from __future__ import annotations

import heapq
import time
from contextlib import contextmanager

import torch

from .. import distributed as _dist

from .. import reference
from ..hparams import as_pair
from ..optim.adam import Adam
from ..optim.checkpoints import with_load_hooks
from ..optim.compile import autocast_off
from ..optim.host_state import check_loaded_state
from ..optim.sgd import SGD
from ..specs import get_spec
from .groups import GroupsMixin, _is_factor
from .layer import LowRankLinear
from .retraction import RETRACTION_BACKENDS, qr

__all__ = ["LowRankSGD", "LowRankAdam"]

PHASES = ("augment", "gradient", "update", "truncate")


class _LowRankOptimizer(GroupsMixin, torch.optim.Optimizer):
    _dense_cls: type
    _rule: str

    def __init__(self, params, defaults, *, tau, r_min, augment_every, truncate_every, fixed_rank,
                 param_budget, backend, retraction):
        name = type(self).__name__
        zero, params = _dist.zero_building(self, params)
        if zero is not None:  # (a partition could split a layer, or leave its rank buffer stale on other ranks)
            raise ValueError(f"{name} cannot run under ZeroRedundancyOptimizer: a low-rank layer's U, S and V are "
                             "stepped together (one retraction) and its rank is a buffer, which ZeRO's partitions "
                             "would split or leave stale on the other ranks (it broadcasts params); use it with DDP")
        if tau is None:
            tau = 0.0 if fixed_rank else 0.1
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= tau < 1.0):
            raise ValueError(f"{name}: tau must be a number in [0, 1), got {tau!r}")
        if fixed_rank and tau != 0:
            raise ValueError(f"{name}: fixed_rank=True keeps r fixed and needs tau=0, got tau={tau}")
        for key, v in (("r_min", r_min), ("augment_every", augment_every), ("truncate_every", truncate_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {key} must be an int >= 1, got {v!r}")
        if param_budget is not None:
            if isinstance(param_budget, bool) or not isinstance(param_budget, int) or param_budget < 1:
                raise ValueError(f"{name}: param_budget must be a positive int or None, got {param_budget!r}")
            if fixed_rank:
                raise ValueError(f"{name}: param_budget and fixed_rank=True exclude each other")
        if retraction not in RETRACTION_BACKENDS + ("auto",):
            raise ValueError(f"{name}: unknown retraction {retraction!r}; expected one of "
                             f"{RETRACTION_BACKENDS + ('auto',)}")
        spec = get_spec(self._rule)
        if "betas" in defaults:  # (a tuple of plain numbers, as torch.optim.Adam and FusedOptimizer keep it)
            defaults = {**defaults, "betas": as_pair(defaults["betas"])}
        spec.validate({**spec.defaults, **defaults}, where=f"{name}: ", init=True)
        self.tau, self.r_min, self.fixed_rank = float(tau), r_min, bool(fixed_rank)
        self.augment_every, self.truncate_every = augment_every, truncate_every
        self.param_budget, self.backend, self.retraction = param_budget, backend, retraction
        self.profile = None  # a dict: step() adds the seconds of each phase to it (bench/bench_lowrank.py)
        self._layers: list[list[LowRankLinear]] = []
        self._inner = None
        self._inner_index: dict[int, int] = {}
        self._linked: list = []  # the _structure() of _layers and _inner
        super().__init__(params, defaults)  # (add_param_group checks param_budget's r_min floor, groups.py)

    def load_state_dict(self, state_dict):
        """torch's, after the state of every param and core is checked whole (``host_state.check_loaded_state``:
        a partial state, or another rule's, is refused before anything is loaded, as by the dense optimizers;
        before 2026-12-07 a missing moment was silently restarted at zero with the step counter kept). The load
        hooks run where torch runs them (``checkpoints.with_load_hooks``)."""
        spec, name = get_spec(self._rule), type(self).__name__

        def load(sd):
            check_loaded_state(name, sd, lambda g: spec.required_state({**spec.defaults, **g}))
            super(_LowRankOptimizer, self).load_state_dict(sd)

        with_load_hooks(self, state_dict, load)

    def train(self, mode: bool = True):
        """A no-op (no averaged iterate), so that client code can call it on any optimizer. Returns self."""
        return self

    def eval(self):
        """See :meth:`train`. Returns self."""
        return self

    @staticmethod
    def _cost(layer, r):
        return r * (layer.in_features + layer.out_features) + r * r

    # ------------------------------------------------------------------ timing (bench only)
    @contextmanager
    def _phase(self, name, device):
        if self.profile is None:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.profile[name] = self.profile.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ validation (modifies nothing)
    def _plan(self):
        name = type(self).__name__
        spec = get_spec(self._rule)
        self._relink()
        buckets: dict[tuple, list] = {}
        grads = []
        for gi, group in enumerate(self.param_groups):
            spec.validate({**spec.defaults, **group}, where=f"{name} param group {gi}: ")
            if group.get("amsgrad", False):
                raise ValueError(f"{name}: amsgrad=True is not supported on the low-rank core")
            for li, layer in enumerate(self._layers[gi]):
                fs = (layer.U, layer.S, layer.V)
                gs = [p.grad for p in fs]
                if all(g is None for g in gs):
                    continue
                where = f"{name}: LowRankLinear {li} of group {gi} ({layer.out_features}x{layer.in_features})"
                if any(g is None for g in gs):
                    raise RuntimeError(f"{where}: U, S and V need gradients together (some are None)")
                if any(_dist.is_dtensor(t) for t in (*fs, *gs)):
                    raise NotImplementedError(
                        f"{where}: its factors are DTensors (FSDP2 / tensor parallel). Sharded low-rank layers "
                        "(rows of U and V sharded, an all-reduced Gram in the retraction) are not implemented: "
                        "leave LowRankLinear layers unsharded (e.g. fully_shard only the other modules); "
                        "DDP works, since its params are plain tensors")
                for p, g in zip(fs, gs):
                    if g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                        raise RuntimeError(f"{where}: gradient of {p.role} must be dense, {tuple(p.shape)}, "
                                           f"{p.dtype}, on {p.device}")
                r = layer.r
                if not 1 <= r <= layer.max_rank:
                    raise ValueError(f"{where}: rank {r} outside [1, max_rank={layer.max_rank}]")
                st = self.state.get(layer.S, {})
                t = int(float(st["step"])) + 1 if "step" in st else 1
                names = spec.state_names({**spec.defaults, **group})
                for k in names:  # (a checkpoint of a layer with another max_rank: refused before any write)
                    buf = st.get(k)
                    if isinstance(buf, torch.Tensor) and (buf.shape != layer.S.shape or buf.dtype != layer.S.dtype
                                                          or buf.device != layer.S.device):
                        raise ValueError(f"{where}: state {k!r} is {tuple(buf.shape)} {buf.dtype} on {buf.device}, "
                                         f"the core S is {tuple(layer.S.shape)} {layer.S.dtype} on {layer.S.device} "
                                         "(a checkpoint of a layer with another max_rank or dtype?); nothing changed")
                fresh = not all(k in st for k in names)
                # (max_rank too: a bucket's forced truncation is decided once, for all its layers)
                key = (gi, layer.U.device, layer.U.dtype, layer.out_features, layer.in_features, r, t, fresh,
                       layer.max_rank)
                buckets.setdefault(key, []).append(layer)
                grads.extend(gs)
            for pi, p in enumerate(group["params"]):
                if not _is_factor(p) and p.grad is not None:
                    if p.grad.layout != torch.strided:  # (before isfinite, which sparse layouts lack)
                        raise RuntimeError(f"{name} param group {gi}: param {pi}: sparse gradients are not "
                                           f"supported (layout {p.grad.layout}); nothing changed")
                    grads.append(p.grad)
        if grads:
            ok = torch.stack([torch.isfinite(g).all().to("cpu") for g in grads])
            if not bool(ok.all()):
                i = int((~ok).nonzero()[0])
                raise RuntimeError(f"{name}: non-finite gradient (shape {tuple(grads[i].shape)}); the step is "
                                   f"skipped and nothing changed")
        if self._inner is not None:
            for gi, igi in self._inner_index.items():
                self._inner.param_groups[igi].update(self._dense_hparams(self.param_groups[gi]))
            self._inner._plan()  # validates the dense params; modifies nothing
        return buckets

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._plan()
        with autocast_off():  # (a caller's autocast region ran the products in bf16: compile.autocast_off)
            results = [self._compute(key, layers) for key, layers in buckets.items()]
            self._choose_ranks(results)
            for res in results:
                self._write(res)
        if self._inner is not None:
            self._inner._eager_step()  # (not step(): torch's step hooks, global ones included, ran for this one)
        return loss

    def _compute(self, key, layers):
        """Steps 1-5 for one bucket, without writing anything. Returns what _write needs."""
        gi, device, dtype, m, n, r, t, fresh, max_rank = key
        name = type(self).__name__
        group = self.param_groups[gi]
        spec = get_spec(self._rule)
        g = {**spec.defaults, **group}
        wd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

        def stack(fn):
            return torch.stack([fn(layer).to(wd) for layer in layers])

        U, S, V = stack(lambda l: l.U[:, :r]), stack(lambda l: l.S[:r, :r]), stack(lambda l: l.V[:, :r])
        GU, GS, GV = (stack(lambda l: l.U.grad[:, :r]), stack(lambda l: l.S.grad[:r, :r]),
                      stack(lambda l: l.V.grad[:, :r]))
        names = spec.state_names(g)
        cores = None if fresh else [stack(lambda l, k=k: self.state[l.S][k][:r, :r]) for k in names]
        augment = (t - 1) % self.augment_every == 0 and r < max(m, n)
        truncate = t % self.truncate_every == 0
        km, kn = (min(2 * r, m), min(2 * r, n)) if augment else (r, r)
        with self._phase("augment", device):
            if augment:
                Uh, Vh = self._augment(U, GU, km, V, GV, kn)
                Sh = self._lift([S], km, kn)[0]   # ÛᵀU = [I; 0], VᵀV̂ = [I, 0]: Ŝ = S padded with zeros
                cores = None if cores is None else self._lift(cores, km, kn)
            else:
                Uh, Vh, Sh = U, V, S.clone()
        # a step that truncates takes Ĝ's structural zeros exactly; one that keeps the augmented core whole
        # (truncate_every > 1) the computed form: the next step solves with that core, and with an exact zero (2,2)
        # block 16-bit Adam's sign-like first steps made it singular (a review, 2026-12-07)
        truncates = truncate or (augment and (km != kn or km > max_rank or self.fixed_rank))
        with self._phase("gradient", device):
            Gh = self._galerkin(U, S, V, Uh, Vh, GU, GS, GV, where=(layers, gi), exact=truncates) if augment else GS
        with self._phase("update", device):
            if cores is None:
                cores = [torch.zeros_like(Sh) for _ in names]
            scalars = spec.Scalars(*spec.advance(g, {}, fresh, t), -1.0 if g.get("maximize") else 1.0)
            getattr(reference, f"{self._rule}_ref")(Sh, Gh, tuple(cores), scalars, spec.make_flags(g))
        forced = truncates and not truncate
        res = dict(key=key, layers=layers, t=t, Uh=Uh, Vh=Vh, Sh=Sh, cores=cores, names=names, svd=None)
        with self._phase("truncate", device):
            if not bool(torch.isfinite(Sh).all()):  # (before the SVD, whose own error on it named no cause)
                raise RuntimeError(f"{name}: the updated core of a layer in group {gi} is not finite; "
                                   f"nothing changed (lower the learning rate?)")
            if truncate or forced:
                P, sig, Qh = torch.linalg.svd(Sh, full_matrices=False)
                sig_host = sig.double().cpu()
                if not bool(torch.isfinite(sig_host).all()):
                    raise RuntimeError(f"{name}: the updated core of a layer in group {gi} has non-finite "
                                       f"singular values; nothing changed (lower the learning rate?)")
                res["svd"] = (P, sig, Qh)
                if not augment or km == r or kn == r:  # a side not augmented (Û = U; at r = min(m, n) the short
                    # side): its rotated factor re-orthonormalized (rounding accumulates otherwise: fp32 |UᵀU - I|
                    # ~1e-4 after 1,000 steps, bf16 0.5; a review, 2026-12-07)
                    res["rotated"] = self._reorthonormalize(Uh @ P, Vh @ Qh.mT)
                res["ranks"] = [self._tau_rank(s, layer) for s, layer in zip(sig_host, layers)]
                res["sig_host"] = sig_host
        return res

    def _augment(self, U, GU, km, V, GV, kn):
        def side_input(U, G, k):
            r = U.shape[-1]
            if k == r:
                return None
            if k == 2 * r:
                Y = G - U @ (U.mT @ G)
            else:  # 2r > m: complete the basis from the coordinate vectors least represented in span(U)
                idx = (U * U).sum(-1).argsort(dim=-1)[..., : k - r]
                E = torch.zeros(U.shape[0], U.shape[1], k - r, dtype=U.dtype, device=U.device)
                E.scatter_(1, idx.unsqueeze(1), 1.0)  # (one unit column each: E[b, idx[b, j], j] = 1)
                Y = E - U @ (U.mT @ E)
            Y = Y - U @ (U.mT @ Y)  # second Gram-Schmidt pass against U
            Y = Y / Y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
            return torch.cat([U, Y], -1)

        A_u, A_v = side_input(U, GU, km), side_input(V, GV, kn)
        Uh, Vh = self._orthonormal_pair(A_u, A_v, U.dtype)
        return (U if Uh is None else Uh), (V if Vh is None else Vh)

    def _orthonormal_pair(self, A_u, A_v, dtype):
        """The qr's Q of both sides (None for a side given as None), in ``dtype``: one batched qr for both when
        their shapes are equal."""
        if A_u is not None and A_v is not None and A_u.shape == A_v.shape:
            Q, _ = qr(torch.cat([A_u, A_v]), backend=self.retraction)
            return Q[: A_u.shape[0]].to(dtype), Q[A_u.shape[0]:].to(dtype)
        return tuple(None if A is None else qr(A, backend=self.retraction)[0].to(dtype) for A in (A_u, A_v))

    def _reorthonormalize(self, UP, VQ):
        """U P and V Qᵀ of a truncation without augmentation (or with one side not augmented: a layer at
        r = min(m, n)), made orthonormal again (the qr's Q, positive
        diagonal: within rounding of the inputs, whose columns are orthonormal in exact arithmetic). Without it
        the fixed-basis steps of augment_every > 1 multiply the factors by a rotation every truncation and the
        rounding accumulates (fp32: |UᵀU - I| ~3e-4 after 3,000 steps; bf16 factors 0.13 after 1,000). A Q's
        leading columns are those of the qr of the leading columns, so each layer's rank r₁ takes its slice."""
        return self._orthonormal_pair(UP, VQ, UP.dtype)

    def _galerkin(self, U, S, V, Uh, Vh, GU, GS, GV, where=None, exact=True):
        """Step 3: Ĝ = Ûᵀ P_T(G) V̂ from the factor gradients (batched [B, ...]), by blocks: with Û = [U, Y] and
        V̂ = [V, Z] (Y ⟂ U, Z ⟂ V), K = G V and L = Gᵀ U,

            Ĝ = [[G_S,  Lᵀ Z],
                 [Yᵀ K, 0   ]]

        and where S is diagonal (after a truncation) and a side was augmented from its gradient (2r columns), Y
        spans the columns of (I - U Uᵀ) K in order (G_U = K Sᵀ), so Yᵀ K is the qr's upper-triangular R, and Lᵀ Z
        is lower triangular. Those zeros are written, not computed: as rounding noise (~1e-8 of the gradient in
        fp32, Adam's eps) Adam's normalization turned them into steps of ~lr (a review, 2026-12-07: one fp32 step
        39% of the update away from float64; 1e-5 with the zeros exact). ``exact=False`` (a step that keeps the
        augmented core whole): the products of the formula, Ûᵀ U and Vᵀ V̂ computed, their rounding in those
        entries; the next step solves with that core, which an exact zero block left singular in 16-bit factors."""
        K, L = self._solve_kl(S, GU, GV, *(where or ([None] * len(S), -1)))
        if not exact:
            AU, AV = Uh.mT @ U, V.mT @ Vh
            return AU @ (L.mT @ Vh) + (Uh.mT @ K) @ AV - AU @ GS @ AV
        r, km, kn = U.shape[-1], Uh.shape[-1], Vh.shape[-1]
        Gh = GS.new_zeros(GS.shape[0], km, kn)
        Gh[:, :r, :r] = GS
        diag = None
        if km > r or kn > r:
            off = S - torch.diag_embed(torch.diagonal(S, dim1=-2, dim2=-1))
            diag = (off == 0).flatten(1).all(1)[:, None, None]  # (per layer, on the device: no host read)
        if km > r:
            YK = Uh[..., r:].mT @ K
            Gh[:, r:, :r] = torch.where(diag, YK.triu(), YK) if km == 2 * r else YK
        if kn > r:
            LZ = L.mT @ Vh[..., r:]
            Gh[:, :r, r:] = torch.where(diag, LZ.tril(), LZ) if kn == 2 * r else LZ
        return Gh

    def _solve_kl(self, S, GU, GV, layers, gi):
        """K = G V = G_U S⁻ᵀ and L = Gᵀ U = G_V S⁻¹ (K Sᵀ = G_U, L S = G_V)."""
        Kt, info1 = torch.linalg.solve_ex(S, GU.mT)
        Lt, info2 = torch.linalg.solve_ex(S.mT, GV.mT)
        bad = (info1 != 0) | (info2 != 0) | ~torch.isfinite(Kt).flatten(1).all(1) | ~torch.isfinite(Lt).flatten(1).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            layer = layers[i]
            shape = "" if layer is None else f" ({layer.out_features}x{layer.in_features}, rank {layer.r}, group {gi})"
            raise RuntimeError(f"{type(self).__name__}: the core S of a LowRankLinear{shape} is singular: the gradient "
                               f"assembly from one backward pass (docs/algorithms.md §8 step 3) needs S invertible; "
                               f"nothing changed")
        return Kt.mT, Lt.mT

    @staticmethod
    def _lift(cores, km, kn):
        """Step 2 for cores in the basis (U, V): in (Û, V̂), whose leading columns are U and V (ÛᵀU = [I; 0]), the
        same core padded with zeros to km × kn; exactly, where products with the computed ÛᵀU left rounding noise
        in the new rows and columns (Adam's v through its square root too: padding commutes with both)."""
        out = []
        for c in cores:
            z = c.new_zeros(*c.shape[:-2], km, kn)
            z[..., :c.shape[-2], :c.shape[-1]] = c
            out.append(z)
        return out

    def _transport(self, cores, P1, Q1):
        return [P1.mT @ c @ Q1 for c in cores]

    def _tau_rank(self, sig, layer):
        k = len(sig)
        if self.fixed_rank:
            return min(layer.r, k)
        r1 = LowRankLinear.rank_for_tol(sig, self.tau) if self.tau > 0 else k
        return max(min(r1, layer.max_rank, k), min(self.r_min, layer.max_rank, k))

    def _choose_ranks(self, results):
        """The global parameter budget: keep the largest singular values over all truncated layers."""
        if self.param_budget is None:
            return
        truncated = [(res, i) for res in results if res["svd"] is not None for i in range(len(res["layers"]))]
        ids = {id(res["layers"][i]) for res, i in truncated}
        grown = {id(layer): res["Uh"].shape[-1] for res in results if res["svd"] is None for layer in res["layers"]}
        used = sum(self._cost(layer, grown.get(id(layer), layer.r)) for ls in self._layers for layer in ls
                   if id(layer) not in ids)  # (a layer augmented in this step without truncation: its new rank)
        ranks, heap = {}, []
        for j, (res, i) in enumerate(truncated):
            layer, sig, cap = res["layers"][i], res["sig_host"][i], res["ranks"][i]
            r0 = min(self.r_min, layer.max_rank, len(sig))
            ranks[j] = r0
            used += self._cost(layer, r0)
            if r0 < cap:
                heapq.heappush(heap, (-float(sig[r0]), j))
        while heap:
            _, j = heapq.heappop(heap)
            res, i = truncated[j]
            layer, r = res["layers"][i], ranks[j]
            extra = self._cost(layer, r + 1) - self._cost(layer, r)
            if used + extra > self.param_budget:
                continue
            used += extra
            ranks[j] = r + 1
            if r + 1 < res["ranks"][i]:
                heapq.heappush(heap, (-float(res["sig_host"][i][r + 1]), j))
        for j, (res, i) in enumerate(truncated):
            res["ranks"][i] = ranks[j]

    # ------------------------------------------------------------------ write (after all checks passed)
    def _write(self, res):
        gi, device, dtype, m, n, r, t, fresh, _ = res["key"]
        layers, Uh, Vh, Sh, cores = res["layers"], res["Uh"], res["Vh"], res["Sh"], res["cores"]
        with self._phase("truncate", device):
            if res["svd"] is not None:
                P, sig, Qh = res["svd"]
                UP, VQ = res["rotated"] if "rotated" in res else (Uh @ P, Vh @ Qh.mT)
            for i, layer in enumerate(layers):
                if res["svd"] is not None:
                    r1 = res["ranks"][i]
                    P1, Q1 = P[i, :, :r1], Qh[i, :r1].mT
                    newU, newV, newS = UP[i, :, :r1], VQ[i, :, :r1], torch.diag(sig[i, :r1])
                    newC = self._transport([c[i] for c in cores], P1, Q1)
                else:
                    r1 = Uh.shape[-1]
                    newU, newV, newS, newC = Uh[i], Vh[i], Sh[i], [c[i] for c in cores]
                for p, val in ((layer.U, newU), (layer.V, newV)):
                    p[:, :r1].copy_(val)
                    p[:, r1:].zero_()
                st = self.state[layer.S]
                layer.S.zero_()
                layer.S[:r1, :r1].copy_(newS)
                for k, val in zip(res["names"], newC):
                    buf = st.get(k)
                    if buf is None:
                        buf = st[k] = torch.zeros_like(layer.S, memory_format=torch.contiguous_format)
                    buf.zero_()
                    buf[:r1, :r1].copy_(val)
                st["step"] = torch.tensor(float(t), dtype=torch.float32)
                layer._set_rank(r1)


class LowRankSGD(_LowRankOptimizer):
    """Heavy ball / Nesterov on the manifold of rank-r matrices (docs/algorithms.md §8), with
    torch.optim.SGD's conventions on the core; dense params get momentum_fused.SGD. See the module
    docstring for the step, the options and the state layout."""

    _dense_cls = SGD
    _rule = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, *,
                 tau=None, r_min=1, augment_every=1, truncate_every=1, fixed_rank=False, param_budget=None,
                 maximize=False, backend=None, retraction="auto"):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize),
                         tau=tau, r_min=r_min, augment_every=augment_every, truncate_every=truncate_every,
                         fixed_rank=fixed_rank, param_budget=param_budget, backend=backend, retraction=retraction)


class LowRankAdam(_LowRankOptimizer):
    """Adam on the core in the coordinates of the current basis (docs/algorithms.md §8): m is lifted and
    transported like the momentum, v through its square root (v ← (P₁ᵀ √v̂ Q₁)²). Basis dependent, so
    it has no dense full-rank limit. Dense params get momentum_fused.Adam."""

    _dense_cls = Adam
    _rule = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 decoupled_weight_decay=False, tau=None, r_min=1, augment_every=1, truncate_every=1,
                 fixed_rank=False, param_budget=None, maximize=False, backend=None, retraction="auto"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                         tau=tau, r_min=r_min, augment_every=augment_every, truncate_every=truncate_every,
                         fixed_rank=fixed_rank, param_budget=param_budget, backend=backend, retraction=retraction)

    def _transport(self, cores, P1, Q1):
        m, v = cores
        return [P1.mT @ m @ Q1, (P1.mT @ v.sqrt() @ Q1).square()]
