"""Credit assignment through two stages as a DSPy program (issue 17, item 6): two
``dspy.Predict`` (``message -> feeling``, then ``feeling -> sentiment``), compiled by
``AfnioTGD`` on the simulator, learn the first predictor's instructions from the
second's feedback (see ``benchmarks/two_stage.py`` and
``tests/trainer/test_two_stage.py``, which runs the controls on the same program as
an afnio Module)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py)
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

from benchmarks import two_stage  # noqa: E402
from tests._shared_data import SHARED_DATASET, needs_shared_dataset  # noqa: E402

needs_data = needs_shared_dataset("the two-stage learning experiment")


@needs_data
def test_a_two_stage_dspy_program_learns_its_first_instructions(
    tmp_path: Path,
) -> None:
    root = two_stage.data_root(tmp_path, SHARED_DATASET)
    runs = [two_stage.run("dspy", "real", seed, root, tmp_path) for seed in (0, 1, 2)]
    assert two_stage.learning_problems(runs, min_gain=0.15) == []
