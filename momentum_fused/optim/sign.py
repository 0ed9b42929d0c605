from .base import FusedOptimizer


class Signum(FusedOptimizer):
    """Signum (Bernstein et al. 2018): ``m <- beta m + (1 - beta) g`` (zeros start),
    ``p <- p (1 - lr wd) - lr sign(m)``; sign(0) = 0. momentum=0 is signSGD and keeps no state."""

    rule = "signum"

    def __init__(self, params, lr=1e-4, momentum=0.9, weight_decay=0.0, *, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)


class SignSGD(Signum):
    """signSGD: ``p <- p (1 - lr wd) - lr sign(g)``. Signum with momentum=0 (no state)."""

    def __init__(self, params, lr=1e-4, weight_decay=0.0, *, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False, momentum=0.0):
        if momentum != 0.0:  # (momentum=0 accepted so that type(opt)(params, **opt.defaults) rebuilds)
            raise ValueError(f"SignSGD has no momentum, got momentum={momentum!r}; use Signum(momentum=...)")
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, maximize=maximize,
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023): ``c = beta1 m + (1 - beta1) g``; ``p <- p (1 - lr wd) - lr sign(c)``;
    ``m <- beta2 m + (1 - beta2) g``. State ``exp_avg``. Lion(beta, beta) is Signum(beta)."""

    rule = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)
