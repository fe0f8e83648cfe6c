"""Optimizers: the base class and textual gradient descent."""

from afnio.optim.optimizer import Optimizer
from afnio.optim.tgd import (
    TGD,
    TGD_MESSAGES,
    OptimizerStepError,
    TGDMessagesWarning,
    tgd,
)

__all__ = ["TGD", "tgd"]

# also importable from afnio.optim
_public = (Optimizer, OptimizerStepError, TGDMessagesWarning, TGD_MESSAGES)
