"""Shared by the trainer tests: fit the Facility Support example classifier against
the simulator (the dataset copied from ../shared into a temporary root), with the
helpers of ``benchmarks/estimate_accuracy.py``."""

from __future__ import annotations

from pathlib import Path

from benchmarks import estimate_accuracy
from benchmarks.estimate_accuracy import FitRun, fit
from tests._shared_data import SHARED_DATASET, needs_shared_dataset

__all__ = ["FitRun", "data_root", "fit", "needs_dataset"]

needs_dataset = needs_shared_dataset("the check")


def data_root(tmp: Path) -> Path:
    return estimate_accuracy.data_root(tmp, SHARED_DATASET)
