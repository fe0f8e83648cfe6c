"""End to end on the live simulator (loopback): a structured-output chain learns, a
DSPy ``bool`` output trains to the end, and when nothing can be learned the report of
``optimize()`` says what the optimizer was told (issue 18, item 6, review)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any, Literal

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

import pydantic
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_integrations._report import OptimizeReport
from afnio_integrations.langchain import optimize
from benchmarks.common import simulated
from tests.integrations.langchain._chains import (
    exact,
    sentiment_chain,
    sim_chat,
)

TICKETS = [
    ("Outage: the payroll system has been down since 8am", "high"),
    ("URGENT: production database unreachable", "high"),
    ("Question about the invoice layout", "low"),
    ("Typo on the pricing page", "low"),
]
SPAM = [
    ("Congratulations! You won a free iPhone, click here", "yes"),
    ("Free vacation! Reply to claim", "yes"),
    ("Lunch tomorrow at noon?", "no"),
    ("Meeting moved to 3pm", "no"),
]


class Ticket(pydantic.BaseModel):
    summary: str
    priority: Literal["low", "high"]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulated() as (simulator, _):
        yield simulator


def _run(chain: Any, rows: list[tuple[str, str]], metric: Any) -> OptimizeReport:
    with contextlib.redirect_stdout(io.StringIO()):
        _, report = optimize(
            chain,
            [({"message": m}, t) for m, t in rows],
            metric,
            epochs=2,
            batch_size=4,
            progress=False,
        )
    return report


def test_a_structured_output_chain_learns_its_schemas_field(sim: Simulator) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Triage the support ticket."), ("human", "{message}")]
    )
    chain = prompt | sim_chat(sim).with_structured_output(Ticket, method="json_schema")
    # optimize's metric sees the model's output as text: the schema's JSON object
    report = _run(chain, TICKETS, lambda p, t: int(json.loads(p)["priority"] == t))
    assert report.score_before == 0.5
    assert report.score_after == 1.0
    after = next(iter(report.prompts_after.values()))
    assert 'If the message begins with "outage", the priority is high.' in after


def test_a_spam_chain_learns_from_its_question_and_answer_list(
    sim: Simulator,
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Is this message spam? Answer yes or no."), ("human", "{message}")]
    )
    chain = prompt | sim_chat(sim) | StrOutputParser()
    report = _run(chain, SPAM, exact)
    assert report.score_after == 1.0
    assert "the spam is no." in next(iter(report.prompts_after.values()))


def test_the_report_says_what_the_optimizer_was_told_when_nothing_changed(
    sim: Simulator,
) -> None:
    # a sentiment task whose messages hold no evaluative word: the simulator cannot
    # write a rule, and the report (not only the feedback calls) says why
    rows = [
        ("The battery lasts two days", "positive"),
        ("It broke in a week", "negative"),
    ]
    report = _run(sentiment_chain(sim), rows, exact)
    text = str(report)
    assert report.prompts_after == report.prompts_before
    assert "(no prompt changed) the last feedback the optimizer received:" in text
    assert "No rule can be written: the input holds no evaluative word" in text
    assert "No rule can be written" in next(iter(report.last_feedback.values()))


def test_a_dspy_bool_output_trains_to_the_end() -> None:
    dspy = pytest.importorskip("dspy")
    from afnio_integrations.dspy import AfnioTGD

    class Spam(dspy.Signature):
        """Is this message spam?"""

        message: str = dspy.InputField()
        is_spam: bool = dspy.OutputField()

    rows = [
        dspy.Example(message=m, is_spam=t == "yes").with_inputs("message")
        for m, t in SPAM
    ]

    def metric(example: Any, prediction: Any, trace: Any = None) -> bool:
        return example.is_spam == prediction.is_spam

    with Simulator() as simulator:
        lm = dspy.LM(
            f"openai/{SIMULATOR_MODEL}",
            api_base=simulator.base_url,
            api_key="sk-test",
            cache=False,
        )
        with dspy.context(lm=lm):
            tgd = AfnioTGD(metric=metric, epochs=2, batch_size=4, progress=False)
            program = tgd.compile(dspy.Predict(Spam), trainset=rows)
            predictions = [program(message=m).is_spam for m, _ in SPAM]
    assert predictions == [True, True, False, False]
    assert tgd.report.score_after == 1.0
