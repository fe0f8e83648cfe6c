"""AfnioTGD: bad examples and missing models refused before any LM call, and failures
that are not retried (issue 18, items 1-3). LM calls are counted on a live
simulator."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")

import afnio  # noqa: E402
from afnio.errors import StepError  # noqa: E402
from afnio.models.openai import OpenAI  # noqa: E402
from afnio.testing import SIMULATOR_MODEL, Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioTGD  # noqa: E402
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

EXAMPLE = r'dspy\.Example\(question=\.\.\., answer=\.\.\.\)\.with_inputs\("question"\)'
ROWS = [
    ("I am frustrated with the heating.", "negative"),
    ("I love the new lobby!", "positive"),
    ("My badge works.", "neutral"),
]


def sentiment_match(example: Any, pred: Any, trace: Any = None) -> bool:
    return example.sentiment == pred.sentiment


def _examples() -> list[Any]:
    return [
        dspy.Example(message=m, sentiment=s).with_inputs("message") for m, s in ROWS
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator, dspy.context(lm=make_lm(simulator)):
        yield simulator


@pytest.mark.parametrize(
    ("trainset", "kind", "match"),
    [
        (
            [("I love it", "positive")],
            TypeError,
            rf"`trainset\[0\]` must be a dspy.Example, got tuple \('I love it', "
            rf"'positive'\)\. Build it as {EXAMPLE}\.",
        ),
        (
            [{"message": "I love it", "sentiment": "positive"}],
            TypeError,
            r"`trainset\[0\]` must be a dspy.Example, got dict .*"
            r"dspy\.Example\(\*\*row\)",
        ),
        (
            [dspy.Example(message="I love it", sentiment="positive")],
            ValueError,
            rf"`trainset\[0\]` has no input keys \(its fields: 'message', "
            rf"'sentiment'\).*{EXAMPLE}",
        ),
        (
            "I love it",
            TypeError,
            r"`trainset` must be a list of dspy.Example, got str",
        ),
        (
            {"I love it": "positive"},
            TypeError,
            r"`trainset` must be a list of dspy.Example, got dict",
        ),
    ],
    ids=["a tuple", "a dict row", "no input keys", "a str", "a dict"],
)
def test_bad_examples_are_refused_before_any_lm_call(
    sim: Simulator, trainset: Any, kind: type, match: str
) -> None:
    tgd = AfnioTGD(metric=sentiment_match, progress=False)
    with pytest.raises(kind, match=match):
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=trainset)
    assert sim.stats.calls == 0


def test_an_lm_client_without_a_model_is_refused_before_any_lm_call(
    sim: Simulator,
) -> None:
    student = dspy.Predict("message -> sentiment")
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        tgd = AfnioTGD(metric=sentiment_match, backward_lm=client, progress=False)
        with pytest.raises(
            ValueError,
            match=r"AfnioTGD's backward_lm OpenAI\(.*pass completion_args=\{'model'",
        ):
            tgd.compile(student, trainset=_examples())
        tgd = AfnioTGD(
            metric=sentiment_match,
            backward_lm=make_lm(sim),
            optimizer_lm=client,
            progress=False,
        )
        with pytest.raises(ValueError, match=r"AfnioTGD's optimizer_lm OpenAI\("):
            tgd.compile(student, trainset=_examples())
        afnio.set_backward_model_client(client)  # no model
        tgd = AfnioTGD(metric=sentiment_match, progress=False)
        with pytest.raises(ValueError, match=r"afnio's backward client OpenAI\("):
            tgd.compile(student, trainset=_examples())
    assert sim.stats.calls == 0


def test_the_optimizer_lm_defaults_to_the_backward_clients_model(
    sim: Simulator,
) -> None:
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        tgd = AfnioTGD(
            metric=sentiment_match,
            optimizer_lm=client,  # the backward client: its model serves
            epochs=1,
            batch_size=3,
            progress=False,
        )
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    assert tgd.report is not None
    optimizer = [r for r in tgd.report.phases if r.phase == "optimizer"]
    assert optimizer and {r.model for r in optimizer} == {SIMULATOR_MODEL}


def test_a_metric_bug_fails_at_once_naming_the_example(sim: Simulator) -> None:
    def metric(example: Any, pred: Any, trace: Any = None) -> bool:
        return {"negative": True}[example.sentiment]  # KeyError on the others

    tgd = AfnioTGD(metric=metric, progress=False)
    with pytest.raises(StepError) as info:
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    error = info.value
    assert isinstance(error.__cause__, KeyError) and error.attempts == 1
    assert (error.dataset, error.sample_index, error.stage) == ("trainset", 1, "metric")
    assert "in the metric on trainset[1]" in str(error)
    assert "KeyError: 'positive'" in str(error)
    assert sim.stats.calls == 3  # the first validation's 3 program calls, once


def test_a_connection_error_of_the_programs_lm_names_it_and_its_url(
    sim: Simulator,
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    down = dspy.LM(
        f"openai/{SIMULATOR_MODEL}",
        api_base=url,
        api_key="sk-test",
        engine="litellm",
        cache=False,
        num_retries=0,
    )
    tgd = AfnioTGD(metric=sentiment_match, progress=False)
    with dspy.context(lm=down), pytest.raises(StepError) as info:
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    error = info.value
    assert error.transient and error.attempts == 3
    assert (
        f"LM client: the program's own LM dspy.LM('openai/{SIMULATOR_MODEL}', "
        f"api_base='{url}')" in str(error)
    )
