"""Shared by the trainer tests: fit the Facility Support example classifier against
the simulator (the dataset copied from ../shared into a temporary root), with the
helpers of ``benchmarks/estimate_accuracy.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import estimate_accuracy
from benchmarks.estimate_accuracy import DATASET, FitRun, fit

__all__ = ["FitRun", "data_root", "fit", "needs_dataset"]

needs_dataset = pytest.mark.skipif(
    not DATASET.exists(),
    reason="../shared/data is not available (a fresh clone): the check needs the "
    "Facility Support dataset",
)


def data_root(tmp: Path) -> Path:
    return estimate_accuracy.data_root(tmp)
