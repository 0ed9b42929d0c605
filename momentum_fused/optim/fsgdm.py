from .base import FusedOptimizer


class FSGDM(FusedOptimizer):
    """Frequency SGD with momentum (Li et al., ICLR 2025; official yinleung/FSGDM conventions,
    docs/algorithms.md §7). ``b <- d`` on the first step, then ``b <- u b + v d`` with
    ``u = stage / (stage + c_scaling * sigma)`` rising in ``n_stages`` stages over ``sigma`` total
    steps. The step counter (a float starting at 1.0) lives in each param group as ``step``, so it is
    checkpointed. Unlike upstream, unknown keyword arguments raise."""

    rule = "fsgdm"

    def __init__(self, params, lr=1e-1, weight_decay=5e-4, c_scaling=33e-3, v_coefficient=1.0, n_stages=300,
                 sigma=117000, *, maximize=False, backend=None, layout=None, sr_seed=0,
                 capturable=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, c_scaling=c_scaling,
                                      v_coefficient=v_coefficient, n_stages=n_stages, sigma=sigma,
                                      maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed,
                         capturable=capturable)
