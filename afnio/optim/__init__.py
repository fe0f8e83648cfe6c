"""Optimizers: the base class and textual gradient descent."""

from afnio.optim.optimizer import Optimizer
from afnio.optim.tgd import TGD, OptimizerStepError, tgd

__all__ = ["TGD", "tgd"]

_public = (Optimizer, OptimizerStepError)  # also importable from afnio.optim
