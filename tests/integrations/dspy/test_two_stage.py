"""Credit assignment through two stages as a DSPy program (issue 17, item 6): two
``dspy.Predict`` (``message -> feeling``, then ``feeling -> sentiment``), compiled by
``AfnioTGD`` on the simulator, learn the first predictor's instructions from the
second's feedback (see ``benchmarks/two_stage.py`` and
``tests/trainer/test_two_stage.py``, which runs the controls on the same program as
an afnio Module)."""

from __future__ import annotations

import statistics
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

needs_data = pytest.mark.skipif(
    not two_stage.DATASET.exists(),
    reason="../shared/data is not available (a fresh clone): the two-stage learning "
    "experiment needs the Facility Support dataset",
)


@needs_data
def test_a_two_stage_dspy_program_learns_its_first_instructions(
    tmp_path: Path,
) -> None:
    root = two_stage.data_root(tmp_path)
    runs = [two_stage.run("dspy", "real", seed, root, tmp_path) for seed in (0, 1, 2)]
    report = ", ".join(f"{o.before:.3f}->{o.after:.3f}" for o in runs)
    print(report)
    assert statistics.median(o.gain for o in runs) * 100 >= 15, report
    for outcome in runs:
        assert outcome.before < 0.6, report
        assert "the feeling is unhappy." in outcome.first_prompt, outcome
        assert outcome.second_prompt == two_stage.SECOND_PROMPT, outcome
