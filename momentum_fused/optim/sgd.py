import torch

from .base import FusedOptimizer


class SGD(FusedOptimizer):
    """SGD, heavy ball and Nesterov, with torch.optim.SGD's conventions (docs/algorithms.md §1):
    coupled L2 decay, first-step buffer b = g, dampening on later steps, state ``momentum_buffer``."""

    rule = "sgd"
    torch_class = torch.optim.SGD  # (the drop-in: checkpoints of an older torch resume as there)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None, backend=None, layout=None,
                 sr_seed=0, capturable=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize),
                         backend=backend, layout=layout, sr_seed=sr_seed, capturable=capturable,
                         foreach=foreach, fused=fused, differentiable=differentiable)
