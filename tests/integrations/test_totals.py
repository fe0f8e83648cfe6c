"""One run, one set of totals: the Trainer's run summary that optimize() prints counts
the first validation, so its LM calls, tokens and cost are the report's (issue 18: the
tables used to leave the first validation out). On the live simulator (loopback)."""

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

TRAINSET = [
    ({"message": "The new cleaning crew is wonderful."}, "positive"),
    ({"message": "The heater broke again, this is awful."}, "negative"),
    ({"message": "Please confirm the Tuesday visit."}, "neutral"),
    ({"message": "Terrible response time, I am upset."}, "negative"),
    ({"message": "Fantastic work on the garden."}, "positive"),
    ({"message": "Where can I find the invoice?"}, "neutral"),
]
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


def table_rows(lines: list[str], title: str) -> list[list[str]]:
    """The body rows of the rich table titled ``title`` (cells stripped; a row that
    wrapped onto a second line is left out of the figures by its empty cells)."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    body = next(i for i in range(start, len(lines)) if lines[i].startswith("┡"))
    rows = []
    for line in lines[body + 1 :]:
        if line.startswith("└"):
            return rows
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[-1]:  # not a wrapped continuation line
            rows.append(cells)
    raise AssertionError(f"the table {title!r} does not end")


def test_the_run_summary_counts_what_the_report_counts(
    chain: Any,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no cell is wrapped or cut
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    _, report = optimize(
        chain, TRAINSET, exact, epochs=2, batch_size=3, model=SIMULATOR_MODEL
    )
    lines = _ANSI.sub("", capfd.readouterr().out).split("\n")

    clients = table_rows(lines, "Run summary")
    per_client = [row for row in clients if row[0] != "total"]
    assert len(per_client) == 2  # the chain's ChatOpenAI and afnio's client
    assert sum(int(row[1]) for row in per_client) == report.calls
    assert sum(int(row[2]) for row in per_client) == report.tokens
    cost = sum(float(row[3]) for row in per_client)
    assert cost == pytest.approx(report.cost, abs=1e-5)
    total = [row for row in clients if row[0] == "total"]
    assert total == [
        ["total", str(report.calls), str(report.tokens), f"{report.cost:.6f}"]
    ]

    phases = table_rows(lines, "LM calls by phase")
    assert sum(int(row[2]) for row in phases) == report.calls
    assert sum(int(row[2]) for row in phases) == sum(r.calls for r in report.phases)
    # the first validation is in both: its forward calls are one per validation row
    forward = sum(int(row[2]) for row in phases if row[0] == "forward")
    assert forward == sum(r.calls for r in report.phases if r.phase == "forward")
    text = "\n".join(lines)
    assert "first validation included" in text
    # the caption's running total is the report's too
    assert f"total_cost=${report.cost:.4f}" in text
