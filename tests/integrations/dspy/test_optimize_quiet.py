"""AfnioTGD(progress=False) prints nothing on stdout, and with progress on the bar
shows the score users read (the mean metric), not the batch's summed score as a
"loss" (issue 18, item 4). On the live simulator (DSPy -> LiteLLM -> HTTP), as
test_optimize.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

from afnio.testing import Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioTGD  # noqa: E402
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TRAIN = [
    ("I am frustrated with the heating.", "negative"),
    ("I love the new lobby!", "positive"),
    ("My badge works.", "neutral"),
    ("The service was excellent.", "positive"),
    ("The lift is broken again, I am upset.", "negative"),
    ("Please send the invoice.", "neutral"),
]


def sentiment_match(example: Any, pred: Any, trace: Any = None) -> bool:
    return example.sentiment == pred.sentiment


def _examples() -> list[Any]:
    return [
        dspy.Example(message=m, sentiment=s).with_inputs("message") for m, s in TRAIN
    ]


def test_compile_without_progress_prints_nothing_on_stdout(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        tgd = AfnioTGD(metric=sentiment_match, epochs=2, batch_size=3, progress=False)
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    assert capfd.readouterr().out == ""
    report = tgd.report
    assert report is not None and len(report.history) == 2 and report.cost > 0


def test_compile_progress_shows_the_mean_score_not_the_summed_one(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # a progress line is never cut
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        tgd = AfnioTGD(metric=sentiment_match, epochs=2, batch_size=3)
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    report = tgd.report
    assert report is not None and report.score_after is not None
    out = _ANSI.sub("", capfd.readouterr().out)
    lines = [line.rstrip() for line in out.split("\n")]
    bars = [line for line in lines if line.startswith(("[Training]", "[Validation]"))]
    assert len(bars) == 5  # the first validation, then training and validation x 2
    for line in bars:
        assert re.search(r" score: [01]\.\d{4} cost: \$\d", line), line
        assert "loss" not in line
    assert f"score: {report.score_before:.4f}" in bars[0]
    assert f"score: {report.score_after:.4f}" in bars[-1]
    summary = "\n".join(lines)
    assert f"val_score={report.score_after:.4f}" in summary
    assert "_loss=" not in summary and "loss_score" not in summary
