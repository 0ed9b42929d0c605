"""momentum_fused: fused multi-tensor momentum optimizers for PyTorch.

The optimizers are ``torch.optim.Optimizer`` subclasses with torch's state names; the update rules
are specified once in :mod:`momentum_fused.reference` and dispatched per (device, dtype) bucket by
:mod:`momentum_fused.backends`. Dtype layouts: :mod:`momentum_fused.layouts`; the low-rank (DLRA) layer and
optimizers: :mod:`momentum_fused.lowrank`.
"""
from . import _checkout
from ._jit import load_cpu_extension as _load_cpu_extension

_checkout.install()  # a checkout on PYTHONPATH, not installed: momentum_fused.triton_kernels is its triton_kernels/

_load_cpu_extension()  # first: compiles momentum_fused._C_cpu at first import when the install has none
from . import backends, layouts, lowrank, reference, schedules, specs  # noqa: E402
from .optim import (FSGDM, QHM, SGD, Adam, AdamTied, AdamW, AdamWScheduleFree, FusedOptimizer, Lion,  # noqa: E402
                    Muon, NAdam, RMSprop, SGDScheduleFree, SignSGD, Signum)

__version__ = "0.1.0"

__all__ = ["SGD", "QHM", "Adam", "AdamW", "AdamTied", "NAdam", "RMSprop", "SignSGD", "Signum", "Lion", "FSGDM", "Muon",
           "SGDScheduleFree", "AdamWScheduleFree", "FusedOptimizer", "backends", "layouts", "lowrank", "reference",
           "schedules", "specs", "__version__"]
