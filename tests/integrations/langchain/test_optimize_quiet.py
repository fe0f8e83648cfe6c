"""optimize(progress=False) prints nothing on stdout, and with progress on the bar
shows the accuracy users read, not the batch's summed score as a "loss" (issue 18,
item 4). On the live simulator (loopback), as test_optimize.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_integrations.langchain import optimize

MESSAGES = [
    ("The new cleaning crew is wonderful.", "positive"),
    ("The heater broke again, this is awful.", "negative"),
    ("Please confirm the Tuesday visit.", "neutral"),
    ("I love how quickly you fixed the lift.", "positive"),
    ("Terrible response time, I am upset.", "negative"),
    ("Where can I find the invoice?", "neutral"),
    ("Fantastic work on the garden.", "positive"),
    ("The worst service we have had.", "negative"),
]
TRAINSET = [({"message": m}, t) for m, t in MESSAGES]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def exact(prediction: str, target: str) -> int:
    return int(prediction.strip() == target)


@pytest.fixture
def chain() -> Iterator[Any]:
    """A sentiment chain on a live simulator, afnio's backward client set on it."""
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", "Classify the sentiment of the message."),
                ("human", "{message}"),
            ]
        )
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="k", max_retries=0
        )
        yield prompt | llm | StrOutputParser()


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
    monkeypatch.setenv("COLUMNS", "250")  # a progress line is never cut
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    _, report = optimize(
        chain, TRAINSET, exact, epochs=2, batch_size=4, model=SIMULATOR_MODEL
    )
    lines = [
        line.rstrip() for line in _ANSI.sub("", capfd.readouterr().out).split("\n")
    ]
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
