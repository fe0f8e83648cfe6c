"""Where the tests find the Facility Support dataset: ``../shared`` beside the
repository (CI has it; a user's fresh clone does not, and those tests skip). Tests copy
it into a temporary root laid out as the dataset class expects; the benchmarks' own
default (``$AFNIO_DATA_DIR``) is never used by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["SHARED_DATASET", "needs_shared_dataset"]

SHARED_DATASET = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "facility-support"
    / "dataset.json"
)


def needs_shared_dataset(what: str) -> pytest.MarkDecorator:
    """Skip unless ``../shared`` holds the dataset; ``what`` names the check."""
    return pytest.mark.skipif(
        not SHARED_DATASET.exists(),
        reason=f"../shared/data is not available (a fresh clone): {what} needs the "
        "Facility Support dataset",
    )
