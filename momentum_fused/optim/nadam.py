import torch

from .base import FusedOptimizer


class NAdam(FusedOptimizer):
    """NAdam with torch.optim.NAdam's conventions (docs/algorithms.md §4); state ``step``,
    ``mu_product`` (host side, float64), ``exp_avg``, ``exp_avg_sq``."""

    rule = "nadam"
    torch_class = torch.optim.NAdam  # (the drop-in: checkpoints of an older torch resume as there)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, backend=None, layout=None, sr_seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed, capturable=capturable,
                         foreach=foreach, differentiable=differentiable)
