"""optimize()/estimate(): the trainset shapes they accept, the rows they refuse before
any LM call, the ``model=`` they settle, and the failures they do not retry (issue 18,
items 1-3). LM calls are counted on a live simulator."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

import openai
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

import afnio
from afnio.errors import StepError
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_integrations._rows import normalize_rows
from afnio_integrations.langchain import LangChainChatModel, estimate, optimize

ROWS = [
    ("The heater broke again, this is awful.", "negative"),
    ("I love how quickly you fixed the lift.", "positive"),
    ("Please confirm the Tuesday visit.", "neutral"),
    ("Terrible response time, I am upset.", "negative"),
]
CLASSIFY = "Classify the sentiment of the message."


def exact(prediction: str, target: str) -> int:
    return int(prediction.strip() == target)


class _Series(dict):  # what DataFrame.iterrows() yields beside the index
    __module__ = "pandas.core.series"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Setup:
    sim: Simulator
    backward: OpenAI

    def chain(self, base_url: str | None = None, human: str = "{message}") -> Any:
        """The LangChain docs' chain: prompt | ChatOpenAI | StrOutputParser."""
        prompt = ChatPromptTemplate.from_messages(
            [("system", CLASSIFY), ("human", human)]
        )
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL,
            base_url=base_url or self.sim.base_url,
            api_key="k",
            max_retries=0,
        )
        return prompt | llm | StrOutputParser()


@pytest.fixture
def setup() -> Iterator[Setup]:
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as backward,
    ):
        afnio.set_backward_model_client(
            backward, completion_args={"model": SIMULATOR_MODEL}
        )
        yield Setup(sim, backward)


def _run(chain: Any, trainset: Any, **kwargs: Any) -> Any:
    kwargs = {"epochs": 1, "batch_size": 4, "progress": False, **kwargs}
    return optimize(chain, trainset, kwargs.pop("metric", exact), **kwargs)[1]


# -- item 1: the shapes ----------------------------------------------------------------


def test_dict_rows_with_label_key_train_like_pairs(setup: Setup) -> None:
    pairs = _run(setup.chain(), [({"message": m}, t) for m, t in ROWS])
    calls = setup.sim.stats.calls
    setup.sim.reset_stats()
    rows = [{"message": m, "label": t, "id": k} for k, (m, t) in enumerate(ROWS)]
    dicts = _run(setup.chain(), rows, label_key="label", input_keys=["message"])
    assert (dicts.score_before, dicts.score_after) == (
        pairs.score_before,
        pairs.score_after,
    )
    assert dicts.score_after > dicts.score_before
    assert setup.sim.stats.calls == calls  # the same run, call for call


def test_str_inputs_reach_a_single_variable_prompt(setup: Setup) -> None:
    report = _run(setup.chain(), ROWS)  # (str, target) pairs
    assert report.score_before == 0.25 and report.score_after == 1.0


def test_langsmith_examples_as_dicts_and_objects_are_read() -> None:
    class Example:  # what langsmith.schemas.Example looks like (no import)
        def __init__(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
            self.inputs, self.outputs = inputs, outputs

    data = [
        {"inputs": {"message": "Awful."}, "outputs": {"label": "negative"}},
        Example({"message": "Great!"}, {"label": "positive"}),
    ]
    assert normalize_rows(data, "trainset") == [
        ({"message": "Awful."}, "negative"),
        ({"message": "Great!"}, "positive"),
    ]
    several = [{"inputs": {"message": "Hi", "lang": "en"}, "outputs": {"a": 1, "b": 2}}]
    assert normalize_rows(
        several, "trainset", label_key="b", input_keys=["message"]
    ) == [({"message": "Hi"}, 2)]
    with pytest.raises(ValueError, match=r"`trainset\[0\]` has several outputs"):
        normalize_rows(several, "trainset")


def test_langsmith_examples_train_like_pairs(setup: Setup) -> None:
    examples = [{"inputs": {"message": m}, "outputs": {"label": t}} for m, t in ROWS]
    report = _run(setup.chain(), examples)
    assert report.score_before == 0.25 and report.score_after == 1.0


BAD_TRAINSETS = [
    (
        [{"message": "Awful.", "label": "negative"}],
        {},
        TypeError,
        r"`trainset\[0\]` is a dict row \{'message': 'Awful.', 'label': 'negative'\}, "
        r"but no label_key=.* label_key='label'",
    ),
    (
        {"Awful.": "negative", "Great!": "positive"},
        {},
        TypeError,
        r"`trainset` is a dict .*list\(trainset.items\(\)\)",
    ),
    ("Awful.", {}, TypeError, r"`trainset` must be a list of rows, got str 'Awful.'"),
    (None, {}, TypeError, r"`trainset` must be a list of rows, got NoneType"),
    (
        [("Awful.", "negative", "extra")],
        {},
        TypeError,
        r"`trainset\[0\]` is a tuple of 3 items .*Expected \(inputs, target\) pairs "
        r"such as \(\{'message': 'The heater broke again.'\}, 'negative'\)",
    ),
    (
        [("Awful.", "negative"), ("Great!", None)],
        {},
        ValueError,
        r"`trainset\[1\]` has a None target",
    ),
    (
        [{"message": "Awful.", "label": "negative"}, {"text": "Great!", "label": "x"}],
        {"label_key": "label", "input_keys": ["message"]},
        ValueError,
        r"`trainset\[1\]` has no key 'message' \(from input_keys\)",
    ),
    (
        [("Awful.", "negative")],
        {"label_key": "label"},
        TypeError,
        r"`trainset\[0\]` is an \(inputs, target\) pair, but label_key=",
    ),
    (
        [{"message": "Awful.", "label": "negative"}],
        {"label_key": "label", "input_keys": "message"},
        TypeError,
        r"pass input_keys=\['message'\]",
    ),
    (
        [({"text": "Awful."}, "negative")],
        {},
        ValueError,
        r"The inputs of `trainset\[0\]` \(dict \{'text': 'Awful.'\}\) lack 'message'",
    ),
    (
        [{"text": "Awful.", "label": "negative"}],
        {"label_key": "label"},
        ValueError,
        r"The inputs of `trainset\[0\]`.* lack 'message': the chain's prompt takes",
    ),
    (
        [[ROWS[0], ROWS[1]], [ROWS[2], ROWS[3]]],
        {},
        TypeError,
        r"`trainset\[0\]` holds rows instead of being one .*pass a flat list of "
        r"\(inputs, target\) rows",
    ),
    (
        [(1, "negative"), (2, "positive")],
        {},
        TypeError,
        r"`trainset\[0\]` has inputs of type int \(tuple \(1, 'negative'\)\): the "
        r"inputs are what chain.invoke takes",
    ),
    (
        [(("Awful.", "now"), "negative")],
        {},
        TypeError,
        r"`trainset\[0\]` has inputs of type tuple",
    ),
    (
        [(0, _Series({"message": "Awful.", "label": "negative"}))],
        {},
        TypeError,
        r"`trainset\[0\]` is a pandas row .*DataFrame.iterrows\(\).* pass "
        r"df.to_dict\('records'\) with label_key=",
    ),
    (
        [(t, {"message": m}) for m, t in ROWS],
        {},
        TypeError,
        r"`trainset\[0\]` looks reversed: its target is a dict and its inputs a str "
        r".*A row is \(inputs, target\), the inputs first",
    ),
    (
        [({"message": m}, {"label": t}) for m, t in ROWS],
        {},
        TypeError,
        r"`trainset\[0\]` has a dict target .*\{'inputs': inputs, 'outputs': "
        r"target\} with label_key='label'",
    ),
    (
        [({"message": "Awful."}, ["negative"])],
        {},
        TypeError,
        r"`trainset\[0\]` has a list target",
    ),
    (
        set(ROWS),
        {},
        TypeError,
        r"`trainset` is a set of rows, which has no order.*Pass a list",
    ),
]


@pytest.mark.parametrize(
    ("trainset", "kwargs", "kind", "match"),
    BAD_TRAINSETS,
    ids=[
        "dict row without label_key",
        "dict {text: label}",
        "a str",
        "None",
        "3-tuple",
        "None target",
        "missing input key",
        "pairs with label_key",
        "input_keys as a str",
        "inputs lack a prompt variable",
        "dict row lacks a prompt variable",
        "rows nested in rows",
        "int inputs",
        "tuple inputs",
        "a DataFrame.iterrows() row",
        "reversed pairs",
        "a dict target",
        "a list target",
        "a set of rows",
    ],
)
def test_bad_rows_are_refused_before_any_lm_call(
    setup: Setup, trainset: Any, kwargs: dict[str, Any], kind: type, match: str
) -> None:
    chain = setup.chain()
    with pytest.raises(kind, match=match):
        optimize(chain, trainset, exact, progress=False, **kwargs)
    with pytest.raises(kind, match=match):
        estimate(chain, trainset, **kwargs)
    assert setup.sim.stats.calls == 0


def test_a_bad_valset_row_is_named_as_valset(setup: Setup) -> None:
    with pytest.raises(ValueError, match=r"`valset\[1\]` has a None target"):
        optimize(setup.chain(), ROWS, exact, valset=[ROWS[0], ("Hi", None)])
    assert setup.sim.stats.calls == 0


def test_str_inputs_for_a_prompt_of_two_variables_are_refused(setup: Setup) -> None:
    chain = setup.chain(human="{topic}: {message}")
    with pytest.raises(TypeError, match=r"takes 2 variables \['message', 'topic'\]"):
        optimize(chain, ROWS, exact)
    with pytest.raises(ValueError, match=r"`input_keys`=\['message'\] lacks 'topic'"):
        rows = [{"message": m, "topic": "x", "label": t} for m, t in ROWS]
        optimize(chain, rows, exact, label_key="label", input_keys=["message"])
    assert setup.sim.stats.calls == 0


def test_estimate_reads_dict_rows_like_optimize(setup: Setup) -> None:
    rows = [{"message": m, "label": t} for m, t in ROWS]
    by_dict = estimate(setup.chain(), rows, label_key="label")
    by_pair = estimate(setup.chain(), [({"message": m}, t) for m, t in ROWS])
    assert by_dict == by_pair


# -- item 2: model= --------------------------------------------------------------------


def test_model_defaults_to_the_backward_clients_model(setup: Setup) -> None:
    report = _run(setup.chain(), ROWS)  # no model=: the backward client's
    assert report.score_after == 1.0
    assert {r.model for r in report.phases if r.phase == "optimizer"} == {
        SIMULATOR_MODEL
    }


def test_a_client_without_a_model_is_refused_before_any_lm_call(setup: Setup) -> None:
    with OpenAI(base_url=setup.sim.base_url, api_key="sk-test") as other:
        with pytest.raises(
            ValueError, match=r"the optimizer client OpenAI\(.*pass model='gpt-4o-mini'"
        ):
            optimize(setup.chain(), ROWS, exact, model_client=other)
        afnio.set_backward_model_client(other)  # no completion_args["model"]
        with pytest.raises(ValueError, match=r"backward client OpenAI.* has no model"):
            optimize(setup.chain(), ROWS, exact)
    assert setup.sim.stats.calls == 0


def test_a_client_that_names_its_model_needs_no_model_argument(setup: Setup) -> None:
    optimizer = LangChainChatModel(
        ChatOpenAI(model=SIMULATOR_MODEL, base_url=setup.sim.base_url, api_key="k")
    )
    report = _run(setup.chain(), ROWS, model_client=optimizer)
    assert report.score_after == 1.0


# -- item 3: failures ------------------------------------------------------------------


def test_a_metric_bug_fails_at_once_naming_the_row(setup: Setup) -> None:
    def metric(prediction: str, target: str) -> int:
        return {"positive": 1}[target]  # KeyError on other labels

    rows = ROWS[1:]  # positive, neutral, negative: the 3 samples
    with pytest.raises(StepError) as info:
        optimize(setup.chain(), rows, metric, progress=False)
    error = info.value
    assert isinstance(error.__cause__, KeyError)
    assert (error.dataset, error.sample_index) == ("trainset", 1)
    assert (error.phase, error.stage) == ("validation", "metric")
    assert str(error).startswith(
        "The validation failed in the metric on trainset[1] (batch 0): "
        "KeyError: 'neutral'"
    )
    # the first validation's 3 chain calls, then nothing (it was 9 LM calls)
    assert setup.sim.stats.calls == 3


def test_a_langchain_error_is_shown_as_plain_text(setup: Setup) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    llm = ChatOpenAI(model=SIMULATOR_MODEL, base_url=setup.sim.base_url, api_key="k")
    # the entry is a lambda (its input is unknown): the prompt's KeyError comes at run
    chain = RunnableLambda(lambda d: {"text": d["text"]}) | prompt | llm
    rows = [({"text": m}, t) for m, t in ROWS[:2]]
    with pytest.raises(StepError) as info:
        optimize(chain, rows, exact, progress=False)
    text = str(info.value)
    assert (
        "KeyError: Input to ChatPromptTemplate is missing variables {'message'}" in text
    )
    assert "on trainset[0]" in text  # both rows fail: the first one is named
    assert "\\n" not in text and "\\'" not in text
    assert info.value.attempts == 1 and setup.sim.stats.calls == 0


def test_a_connection_error_of_the_chains_model_names_it_and_its_url(
    setup: Setup,
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(StepError) as info:
        optimize(setup.chain(base_url=url), ROWS, exact, progress=False)
    error = info.value
    assert error.transient and error.attempts == 3
    assert isinstance(error.__cause__, openai.APIConnectionError)
    assert (
        f"LM client: the chain's own model ChatOpenAI (model '{SIMULATOR_MODEL}', "
        f"base URL {url})" in str(error)
    )


# -- review fixes ----------------------------------------------------------------------


class _Sentiment(BaseModel):
    sentiment: str


def test_a_malformed_structured_answer_is_retried(setup: Setup) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    llm = ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=setup.sim.base_url, api_key="k", max_retries=0
    )
    structured = llm.with_structured_output(_Sentiment, method="json_schema")
    chain = prompt | structured | RunnableLambda(lambda o: o.sentiment)
    setup.sim.inject("malformed_json", times=1)  # one cut JSON answer
    report = _run(chain, ROWS)  # was: StepError (ValidationError) at attempt 1
    assert report.score_after == 1.0


def test_a_connection_error_names_the_failing_url_wherever_the_model_is(
    setup: Setup,
) -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )

    def down() -> ChatOpenAI:
        return ChatOpenAI(
            model=SIMULATOR_MODEL, base_url=url, api_key="sk-secret", max_retries=0
        )

    inner = prompt | down() | StrOutputParser()
    up = ChatOpenAI(model=SIMULATOR_MODEL, base_url=setup.sim.base_url, api_key="k")
    chains = {
        "a sub-chain in a lambda": prompt
        | RunnableLambda(lambda v: inner.invoke({"message": v.to_string()})),
        "behind with_fallbacks": prompt
        | down().with_fallbacks([down()])
        | StrOutputParser(),
        "the second of two models": prompt
        | up
        | StrOutputParser()
        | RunnableLambda(lambda s: {"message": s})
        | prompt
        | down()
        | StrOutputParser(),
    }
    for name, chain in chains.items():
        with pytest.raises(StepError) as info:
            optimize(chain, ROWS[:2], exact, progress=False)
        notes = [
            line for line in str(info.value).splitlines() if line.startswith("LM ")
        ]
        assert len(notes) == 1, name
        assert f"request to {url}/chat/completions" in notes[0], name
        assert setup.sim.base_url not in notes[0], name  # not the model that works
        assert " or " not in notes[0] and "sk-secret" not in str(info.value), name


def test_langchain_chat_model_repr_names_its_model_and_masked_url() -> None:
    chat = ChatOpenAI(
        model="gpt-4o-mini",
        base_url="http://me:pw@127.0.0.1:9/v1?api-key=k1",
        api_key="sk-secret",
    )
    assert repr(LangChainChatModel(chat)) == (
        "LangChainChatModel(ChatOpenAI, model='gpt-4o-mini', "
        "base_url='http://me:<redacted>@127.0.0.1:9/v1?api-key=<redacted>')"
    )


def test_the_backward_client_wrapper_is_accepted_as_the_optimizer_client(
    setup: Setup,
) -> None:
    wrapper = afnio.get_backward_model_client()
    report = _run(setup.chain(), ROWS, model_client=wrapper)  # was: TGD refused it
    assert report.score_after == 1.0
    assert {r.model for r in report.phases if r.phase == "optimizer"} == {
        SIMULATOR_MODEL
    }


@pytest.mark.parametrize(
    ("returned", "kind", "match"),
    [
        (None, TypeError, r"on trainset\[0\] it returned NoneType None"),
        ("1", TypeError, r"on trainset\[0\] it returned str '1'"),
        ({"score": 1}, TypeError, r"on trainset\[0\] it returned dict"),
        (float("nan"), ValueError, r"returned a NaN score on trainset\[0\]"),
        ((1, 2), TypeError, r"on trainset\[0\] its feedback is int 2"),
    ],
    ids=["None", "a str", "a dict", "NaN", "a non-str feedback"],
)
def test_a_bad_metric_result_names_the_row_and_what_it_returned(
    setup: Setup, returned: Any, kind: type, match: str
) -> None:
    def metric(prediction: str, target: str) -> Any:
        return returned

    with pytest.raises(StepError, match=match) as info:
        _run(setup.chain(), ROWS, metric=metric)
    error = info.value
    assert isinstance(error.__cause__, kind) and error.attempts == 1
    assert (error.dataset, error.sample_index, error.stage) == ("trainset", 0, "metric")


def test_a_none_feedback_is_no_feedback(setup: Setup) -> None:
    def metric(prediction: str, target: str) -> tuple[int, str | None]:
        return int(prediction.strip() == target), None

    report = _run(setup.chain(), ROWS, metric=metric)
    sent = "\n".join(str(body) for body in setup.sim.requests)
    assert "None" not in sent  # "None" was sent as the feedback of every sample
    assert report.score_before == 0.25


def test_a_chain_error_names_the_exact_row_of_a_batch(setup: Setup) -> None:
    def check(inputs: dict[str, Any]) -> dict[str, Any]:
        if inputs["message"] == "BOOM":
            raise KeyError("no sentiment for BOOM")
        return inputs

    rows = [({"message": m}, t) for m, t in ROWS * 6]  # 24 rows, one batch
    rows[13] = ({"message": "BOOM"}, "negative")
    chain = RunnableLambda(check) | setup.chain()
    with pytest.raises(StepError) as info:
        optimize(chain, rows, exact, batch_size=24, progress=False)
    error = info.value
    assert (error.dataset, error.sample_index) == ("trainset", 13)
    assert "on trainset[13]" in str(error)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_error_after_the_model_names_the_row_it_came_from(
    setup: Setup, seed: int
) -> None:
    # the failing step runs after the LM call, on an object the chain built (not the
    # row's input): the row is still the one whose run failed
    def after(state: dict[str, Any]) -> str:
        if state["message"] == "BOOM":
            raise ValueError(f"cannot post-process {state['answer']!r}")
        return state["answer"]

    rows = [({"message": m}, t) for m, t in ROWS * 4]
    bad = random.Random(seed).randrange(len(rows))
    rows[bad] = ({"message": "BOOM"}, "negative")
    chain = RunnablePassthrough.assign(answer=setup.chain()) | RunnableLambda(after)
    with pytest.raises(StepError) as info:
        optimize(chain, rows, exact, batch_size=len(rows), progress=False)
    assert (info.value.dataset, info.value.sample_index) == ("trainset", bad)
    assert f"on trainset[{bad}]" in str(info.value)
