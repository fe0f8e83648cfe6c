"""One run, one set of totals: the Trainer's run summary that optimize() prints counts
the first validation, so its LM calls, tokens and cost are the report's (issue 18: the
tables used to leave the first validation out). On the live simulator (loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import optimize
from benchmarks.common import simulated
from tests._console import plain_lines, wide_plain_console
from tests.integrations.langchain._chains import exact, sentiment_chain

TRAINSET = [
    ({"message": "The new cleaning crew is wonderful."}, "positive"),
    ({"message": "The heater broke again, this is awful."}, "negative"),
    ({"message": "Please confirm the Tuesday visit."}, "neutral"),
    ({"message": "Terrible response time, I am upset."}, "negative"),
    ({"message": "Fantastic work on the garden."}, "positive"),
    ({"message": "Where can I find the invoice?"}, "neutral"),
]


@pytest.fixture
def chain() -> Iterator[Any]:
    """A sentiment chain on a live simulator, afnio's backward client set on it."""
    with simulated() as (sim, _):
        yield sentiment_chain(sim)


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
    wide_plain_console(monkeypatch)  # no cell is wrapped or cut
    _, report = optimize(
        chain, TRAINSET, exact, epochs=2, batch_size=3, model=SIMULATOR_MODEL
    )
    lines = plain_lines(capfd.readouterr().out)

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
    # and so is the last progress bar's running cost (the last validation's bar)
    bars = [line for line in lines if "cost: $" in line]
    assert bars and bars[-1].rstrip().endswith(f"cost: ${report.cost:.4f}")
