"""Thin torch.optim.Optimizer subclasses, one per rule; all of them share FusedOptimizer."""
from .adam import Adam, AdamTied, AdamW
from .base import FusedOptimizer
from .fsgdm import FSGDM
from .muon import Muon
from .nadam import NAdam
from .qhm import QHM
from .rmsprop import RMSprop
from .schedulefree import AdamWScheduleFree, SGDScheduleFree
from .sgd import SGD
from .sign import Lion, SignSGD, Signum

__all__ = ["FusedOptimizer", "SGD", "QHM", "Adam", "AdamW", "AdamTied", "NAdam", "RMSprop", "SignSGD", "Signum",
           "Lion", "FSGDM", "Muon", "SGDScheduleFree", "AdamWScheduleFree"]
