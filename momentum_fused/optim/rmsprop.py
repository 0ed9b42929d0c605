import torch

from .base import FusedOptimizer


class RMSprop(FusedOptimizer):
    """RMSprop with torch.optim.RMSprop's conventions (docs/algorithms.md §4): eps added outside
    the square root, optional centering and momentum; state ``step``, ``square_avg``,
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered)."""

    rule = "rmsprop"
    torch_class = torch.optim.RMSprop  # (the drop-in: checkpoints of an older torch resume as there)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 layout=None, sr_seed=0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed, capturable=capturable,
                         foreach=foreach, differentiable=differentiable)
