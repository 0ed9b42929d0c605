"""Low-rank (DLRA) training utilities.

``retraction`` holds the batched thin-QR retraction (``qr``) with several
backends (see docs/lowrank_retraction.md).
"""
from .retraction import qr, RETRACTION_BACKENDS

# the low-rank layer and the DLRA optimizers (docs/algorithms.md §8; docs/lowrank.md)
from .layer import LowRankFactor, LowRankLinear, convert, to_dense  # noqa: E402
from .optim import LowRankAdam, LowRankSGD  # noqa: E402
