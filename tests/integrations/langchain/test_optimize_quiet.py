"""optimize(progress=False) prints nothing on stdout, and with progress on the bar
shows the accuracy users read, not the batch's summed score as a "loss" (issue 18,
item 4). On the live simulator (loopback), as test_optimize.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import optimize
from benchmarks.common import simulated
from tests._console import plain_lines, wide_plain_console
from tests.integrations.langchain._chains import (
    TRAINSET,
    exact,
    sentiment_chain,
)


@pytest.fixture
def chain() -> Iterator[Any]:
    """A sentiment chain on a live simulator, afnio's backward client set on it."""
    with simulated() as (sim, _):
        yield sentiment_chain(sim)


def test_optimize_without_progress_prints_nothing_on_stdout(
    chain: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    _, report = optimize(
        chain,
        TRAINSET,
        exact,
        epochs=2,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert capfd.readouterr().out == ""
    assert report.score_after is not None and report.score_after > report.score_before
    assert len(report.history) == 2 and report.cost > 0


def test_optimize_progress_shows_accuracy_not_the_summed_score(
    chain: Any,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wide_plain_console(monkeypatch)  # a progress line is never cut
    _, report = optimize(
        chain, TRAINSET, exact, epochs=2, batch_size=4, model=SIMULATOR_MODEL
    )
    lines = plain_lines(capfd.readouterr().out)
    bars = [line for line in lines if line.startswith(("[Training]", "[Validation]"))]
    assert len(bars) == 5  # the first validation, then training and validation x 2
    for line in bars:
        assert re.search(r" accuracy: [01]\.\d{4} cost: \$\d", line), line
        assert "loss" not in line and "score" not in line
    # the last validation bar shows the accuracy the report gives
    assert f"accuracy: {report.score_after:.4f}" in bars[-1]
    assert f"accuracy: {report.score_before:.4f}" in bars[0]
    summary = "\n".join(lines)
    assert f"val_accuracy={report.score_after:.4f}" in summary
    assert "_loss=" not in summary and "_score=" not in summary
