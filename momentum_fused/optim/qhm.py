import math

from .base import FusedOptimizer


class QHM(FusedOptimizer):
    """Quasi-hyperbolic momentum (Ma & Yarats; qhoptim's conventions, docs/algorithms.md §2):
    ``b <- beta b + (1 - beta) g`` (zeros start), ``p <- p - lr [(1 - nu) g + nu b]``.

    ``weight_decay_type``: "grad" adds ``weight_decay * p`` to the gradient, "direct" scales
    ``p <- p (1 - lr weight_decay)`` first. The ``from_*`` classmethods return the ``lr``,
    ``momentum`` and ``nu`` keyword arguments that make QHM reproduce another method."""

    rule = "qhm"

    def __init__(self, params, lr=1.0, momentum=0.999, nu=0.7, weight_decay=0.0, weight_decay_type="grad",
                 *, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                                      weight_decay_type=weight_decay_type, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)

    @staticmethod
    def _kw(lr, momentum, nu):
        return {"lr": float(lr), "momentum": float(momentum), "nu": float(nu)}

    @classmethod
    def from_nesterov(cls, lr, momentum):
        """torch.optim.SGD(lr, momentum, nesterov=True): exactly, step by step (nu = beta,
        lr scaled by 1/(1 - beta) because QHM's buffer is an average)."""
        return cls._kw(lr / (1.0 - momentum), momentum, momentum)

    @classmethod
    def from_momentum(cls, lr, momentum):
        """torch.optim.SGD(lr, momentum) heavy ball (no dampening): exactly (nu = 1)."""
        return cls._kw(lr / (1.0 - momentum), momentum, 1.0)

    @classmethod
    def from_pid(cls, k_p, k_i, k_d):
        """The PID controller optimizer of Recht (2018) / An et al. (2018) with gains k_p, k_i, k_d (qhoptim's
        map: lr = k_i, momentum = k_d / (k_d - k_p), nu = k_p^2 / (k_i k_d)). QHM takes momentum in [0, 1), which
        this map gives for k_p and k_d of opposite signs; other gains are refused here, naming the momentum they
        map to (qhoptim runs them: its buffer then weighs the gradient negatively, or by more than one)."""
        where = f"QHM.from_pid(k_p={k_p}, k_i={k_i}, k_d={k_d})"
        if not all(math.isfinite(float(k)) for k in (k_p, k_i, k_d)):
            raise ValueError(f"{where}: the gains must be finite")
        if k_d == k_p or k_i * k_d == 0:
            raise ValueError(f"{where}: needs k_i != 0, k_d != 0 and k_d != k_p (the map divides by k_i k_d and by "
                             "k_d - k_p; k_i k_d must not underflow)")
        momentum = k_d / (k_d - k_p)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{where}: maps to momentum k_d / (k_d - k_p) = {momentum!r}, outside the [0, 1) that "
                             "QHM takes; gains k_p and k_d of opposite signs map inside it")
        nu = k_p * k_p / (k_i * k_d)
        if not math.isfinite(nu):
            raise ValueError(f"{where}: maps to nu k_p^2 / (k_i k_d) = {nu!r}, which QHM cannot take (finite only)")
        return cls._kw(k_i, momentum, nu)

    @classmethod
    def from_synthesized_nesterov(cls, alpha, beta1, beta2):
        """Lessard et al. (2016): x+ = x + beta1 (x - x-) - alpha grad f(x + beta2 (x - x-))."""
        return cls._kw(alpha / (1.0 - beta1), beta1, 1.0 - ((1.0 - beta1) / beta1) * beta2)

    @classmethod
    def from_robust_momentum(cls, l, kappa, rho=None):
        """Robust momentum (Cyrus et al. 2018) for L-smooth, kappa-conditioned problems with target
        rate rho; ``rho=None`` gives triple momentum (Van Scoy et al. 2018), rho = 1 - 1/sqrt(kappa)."""
        if rho is None:
            rho = 1.0 - kappa ** -0.5
        alpha = kappa * (1.0 - rho) ** 2 * (1.0 + rho) / l
        beta1 = kappa * rho ** 3 / (kappa - 1.0)
        beta2 = rho ** 3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
        return cls.from_synthesized_nesterov(alpha, beta1, beta2)

    @classmethod
    def from_triple_momentum(cls, l, kappa):
        """Triple momentum (Van Scoy et al. 2018): robust momentum at rho = 1 - 1/sqrt(kappa)."""
        return cls.from_robust_momentum(l, kappa, None)

    @classmethod
    def from_accsgd(cls, delta, kappa, xi, eps=0.7):
        """AccSGD (Kidambi et al. 2018) with short step delta, long step kappa, advantage xi."""
        return cls._kw(delta * eps * (1.0 + xi) / (1.0 + eps), (kappa - eps * eps * xi) / (kappa + eps * xi),
                       (eps * xi - 1.0) / (eps * (1.0 + xi)))
