"""The simulator learns a task of the user's own: Facility Support urgency
(low/medium/high) with optimize() on a LangChain chain, as the README demo trains.

The full measurement (seeds 0-2 and their shuffled-label controls) is
``python benchmarks/urgency.py``; this test runs seed 0 and its control (about 10 s)
and applies the benchmark's own check (``urgency.learning_problems``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import urgency
from tests._shared_data import SHARED_DATASET, needs_shared_dataset

pytest.importorskip("langchain_openai", reason="needs the langchain extra")
pytestmark = needs_shared_dataset("the urgency check")


def test_urgency_is_learned_and_shuffled_labels_are_not(tmp_path: Path) -> None:
    root = urgency.data_root(tmp_path, SHARED_DATASET)
    real = urgency.measure(root, [0])
    control = urgency.measure(root, [0], shuffled=True)
    problems = urgency.learning_problems(real, control)
    assert not problems, problems
    # the untrained chain answers the task's default label ("low", the first listed)
    assert real[0].before == pytest.approx(32 / 68)
    assert real[0].after >= real[0].before + 0.15
