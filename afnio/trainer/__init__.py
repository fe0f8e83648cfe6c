"""The Trainer: fit, validate, test and predict afnio Modules."""

from afnio.trainer.trainer import BudgetExceeded, Trainer

__all__ = ["BudgetExceeded", "Trainer"]
