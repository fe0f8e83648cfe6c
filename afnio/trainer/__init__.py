"""The Trainer: fit, validate, test and predict afnio Modules; its loggers (the run
log ``run_log.jsonl``, ``metrics_steps.csv``, MLflow) are in
:mod:`afnio.trainer.loggers`."""

from afnio.trainer.trainer import BudgetExceeded, Trainer

__all__ = ["BudgetExceeded", "Trainer"]
