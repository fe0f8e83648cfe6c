"""AfnioTGD: bad examples and missing models refused before any LM call, and failures
that are not retried (issue 18, items 1-3). LM calls are counted on a live
simulator."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py, which
# closes what a test left open; the other DSPy test files filter the same warning)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

import afnio  # noqa: E402
from afnio.errors import StepError  # noqa: E402
from afnio.models.openai import OpenAI  # noqa: E402
from afnio.testing import SIMULATOR_MODEL, Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioTGD, DSPyLM  # noqa: E402
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


def _the_client_as_optimizer_lm(client: OpenAI) -> dict[str, Any]:
    return {"optimizer_lm": client}  # the backward client: its model serves


def _the_wrapper_as_both_lms(client: OpenAI) -> dict[str, Any]:
    wrapper = afnio.get_backward_model_client()  # the singleton wrapping ``client``
    return {"backward_lm": wrapper, "optimizer_lm": wrapper}


@pytest.mark.parametrize(
    "lms",
    [_the_client_as_optimizer_lm, _the_wrapper_as_both_lms],
    ids=[
        "the optimizer_lm defaults to the backward client's model",
        "the backward client wrapper is accepted as an lm",
    ],
)
def test_the_backward_client_serves_as_an_lm_with_its_model(
    sim: Simulator, lms: Callable[[OpenAI], dict[str, Any]]
) -> None:
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        tgd = AfnioTGD(
            metric=sentiment_match,
            epochs=1,
            batch_size=3,
            progress=False,
            **lms(client),
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


# -- review fixes ----------------------------------------------------------------------


def test_a_generator_valset_is_read_once(sim: Simulator) -> None:
    tgd = AfnioTGD(metric=sentiment_match, epochs=1, batch_size=3, progress=False)
    valset = (ex for ex in _examples()[:2])
    tgd.compile(
        dspy.Predict("message -> sentiment"), trainset=_examples(), valset=valset
    )
    assert tgd.report is not None
    # its 2 examples scored before and after the epoch (was 2 x 3: the trainset's)
    assert tgd.report.val_samples == 2 * 2


class _TwoSteps(dspy.Module):
    """A program of two predictors whose forward() names its input."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("message -> summary")
        self.classify = dspy.Predict("summary -> sentiment")

    def forward(self, message: str) -> Any:
        return self.classify(summary=self.summarize(message=message).summary)


class _AnyInputs(dspy.Module):
    """A program whose forward() takes any inputs: nothing can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict("message -> sentiment")

    def forward(self, **inputs: Any) -> Any:
        return self.classify(message=" ".join(map(str, inputs.values())))


@pytest.mark.parametrize(
    ("program", "source"),
    [
        (lambda: dspy.Predict("message -> sentiment"), "the input fields"),
        (lambda: dspy.ChainOfThought("message -> sentiment"), "the input fields"),
        (_TwoSteps, r"the parameters of its forward\(\)"),
    ],
    ids=["Predict", "ChainOfThought", "a module naming its inputs"],
)
def test_examples_whose_inputs_the_program_does_not_take_are_refused(
    sim: Simulator, program: Any, source: str
) -> None:
    rows = [dspy.Example(text=m, sentiment=s).with_inputs("text") for m, s in ROWS]
    tgd = AfnioTGD(metric=sentiment_match, progress=False)
    with pytest.raises(
        ValueError,
        match=rf"`trainset\[0\]` has the input keys \['text'\], but the program "
        rf"takes \['message'\] \({source}.*lacks 'message'.*"
        r"dspy\.Example\(message=\.\.\., sentiment=\.\.\.\)\.with_inputs\('message'\)",
    ):
        tgd.compile(program(), trainset=rows)
    with pytest.raises(ValueError, match=r"`valset\[0\]` has the input keys"):
        tgd.compile(program(), trainset=_examples(), valset=rows)
    assert sim.stats.calls == 0  # was 72 LM calls on empty inputs


def test_a_program_taking_any_inputs_is_not_checked(sim: Simulator) -> None:
    rows = [dspy.Example(text=m, sentiment=s).with_inputs("text") for m, s in ROWS]
    tgd = AfnioTGD(metric=sentiment_match, epochs=1, batch_size=3, progress=False)
    tgd.compile(_AnyInputs(), trainset=rows)
    assert tgd.report is not None and sim.stats.calls > 0


def test_a_nan_score_is_refused_naming_the_example(sim: Simulator) -> None:
    def metric(example: Any, pred: Any, trace: Any = None) -> float:
        return float("nan")

    tgd = AfnioTGD(metric=metric, progress=False)
    with pytest.raises(StepError, match=r"in the metric on trainset\[0\]") as info:
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=_examples())
    assert isinstance(info.value.__cause__, ValueError)
    assert "NaN score" in str(info.value)


def test_dspy_lm_repr_names_its_masked_base_url() -> None:
    lm = dspy.LM(
        "openai/gpt-4o-mini",
        api_base="http://me:pw@127.0.0.1:9/v1?key=k1",
        api_key="sk-secret",
        engine="litellm",
    )
    assert repr(DSPyLM(lm)) == (
        "DSPyLM('openai/gpt-4o-mini', "
        "api_base='http://me:<redacted>@127.0.0.1:9/v1?key=<redacted>')"
    )
