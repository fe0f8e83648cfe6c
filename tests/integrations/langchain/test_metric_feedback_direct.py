"""A metric's own textual feedback in direct mode (issue 23, review finding L5).

``optimize()``'s metric may return ``(score, feedback)``; the samples then go
through :class:`MetricFeedback`. Direct mode (the cheap backward, ``optimize()``'s
default) gives a sample with feedback the direct sentence
(``DIRECT_EVALUATOR_FEEDBACK``: the metric's name, the prediction, the score, the
target) followed by the metric's text, and a failed sample without feedback the
sentence alone; ``"lm"`` mode (upstream) keeps the metric's text alone and gives a
sample without feedback nothing. No LM call writes any of them (no backward client
is set in the unit tests: a call would raise)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import afnio
from afnio.testing import SIMULATOR_MODEL
from afnio.testing.world import (
    ChatBackwardPrompt,
    Message,
    PromptVariable,
    chat_backward_gradients,
    confirmed_tools,
    expected_tools,
)
from afnio_integrations.langchain import optimize
from afnio_integrations.langchain._optimize import MetricFeedback
from benchmarks.common import simulated
from tests._helpers import direct_feedback_text as direct
from tests.integrations._cheap_calls import backward_calls, code_rows, kinds, steps
from tests.integrations.langchain._chains import sim_chat

PREDICTIONS = ["a", "b", "c", "d"]
TARGETS = ["x", "b", "z", "d"]
SCORES = [0, 1, 0, 1]
FEEDBACK = ["Say x.", "", "", "Right."]
"""Sample 0 failed with feedback, 1 is right without, 2 failed without, 3 is right
with feedback (a confirmation, as ``trajectory_match`` gives)."""


def _gradient(**kwargs: Any) -> list[str]:
    prediction = afnio.Variable(PREDICTIONS, role="answers", requires_grad=True)
    _, explanation = MetricFeedback.apply(
        prediction, SCORES, FEEDBACK, TARGETS, "my_metric", 1, **kwargs
    )
    explanation.backward()
    (grad,) = prediction.grad
    return list(grad.data)


def test_direct_mode_states_the_metric_result_then_the_metrics_own_feedback() -> None:
    assert _gradient(feedback_mode="direct") == [
        direct("my_metric", "a", 0, "x") + " Say x.",
        "",  # right and nothing to say
        direct("my_metric", "c", 0, "z"),  # failed, no metric text: the sentence
        direct("my_metric", "d", 1, "d") + " Right.",  # the metric's confirmation
    ]


def test_lm_mode_keeps_the_metrics_own_feedback_alone_and_makes_no_lm_call() -> None:
    assert _gradient(feedback_mode="lm") == ["Say x.", "", "", "Right."]


def test_feedback_mode_none_follows_the_active_backward_options() -> None:
    with afnio.backward_options("cheap"):
        cheap = _gradient()
    with afnio.backward_options("upstream"):
        upstream = _gradient()
    assert cheap == _gradient(feedback_mode="direct")
    assert upstream == _gradient() == ["Say x.", "", "", "Right."]  # core default
    with pytest.raises(ValueError, match="`feedback_mode` must be"):
        _gradient(feedback_mode="auto")


def test_without_a_best_score_every_sample_without_feedback_gets_the_sentence() -> None:
    prediction = afnio.Variable(["a", "b"], role="answers", requires_grad=True)
    _, explanation = MetricFeedback.apply(
        prediction, [0.2, 0.9], ["", "Close."], ["x", "y"], "m", None,
        feedback_mode="direct",
    )  # fmt: skip
    explanation.backward()
    assert prediction.grad[0].data == [
        direct("m", "a", 0.2, "x"),
        direct("m", "b", 0.9, "y") + " Close.",
    ]


def test_an_unbatched_prediction_gets_one_text() -> None:
    prediction = afnio.Variable("a", role="answer", requires_grad=True)
    _, explanation = MetricFeedback.apply(
        prediction, [0], ["Say x."], ["x"], "m", 1, feedback_mode="direct"
    )
    explanation.backward()
    assert prediction.grad[0].data == direct("m", "a", 0, "x") + " Say x."


# -- targets that are not plain values -----------------------------------------------

METRIC_SAYS = 'The expected sentiment is "negative".'
RULE = 'If the message mentions "angry", the sentiment is negative.'
"""What the simulator's chat backward writes from :data:`METRIC_SAYS`."""
NOT_PLAIN = [
    '{"sentiment": "negative", "urgency": "high"}',  # a JSON string
    str({"sentiment": "negative", "urgency": "high"}),  # a dict, as optimize() has it
    "sentiment: negative\nurgency: high",  # several fields
]


def _rule_for(feedback: str) -> str:
    """The simulator's chat-backward gradient for the system prompt of a classifier
    whose answer got ``feedback``."""
    prompt = ChatBackwardPrompt(
        messages=(
            Message("system", "Classify the sentiment."),
            Message("user", "I am angry: the lift is broken."),
        ),
        feedback=feedback,
        variables=(PromptVariable("1", "system prompt", "system", True, "Classify."),),
        output="neutral",
    )
    return chat_backward_gradients(prompt)[0]


@pytest.mark.parametrize("target", NOT_PLAIN, ids=["json", "dict", "lines"])
def test_a_target_that_is_not_a_plain_value_puts_the_metrics_feedback_first(
    target: str,
) -> None:
    """Quoting such a target (``the expected value is "{"sentiment": ...}"``) would
    make the first expected value a reader finds a fragment of it: the metric's own
    text leads, and the simulator's rule names what the metric expected."""
    prediction = afnio.Variable(["neutral"], role="answers", requires_grad=True)
    _, explanation = MetricFeedback.apply(
        prediction, [0], [METRIC_SAYS], [target], "m", 1, feedback_mode="direct"
    )
    explanation.backward()
    (text,) = prediction.grad[0].data
    assert text == METRIC_SAYS + " " + direct("m", "neutral", 0, target)
    assert _rule_for(text) == RULE
    # the sentence first would have led the rule to the quoted target instead
    assert _rule_for(direct("m", "neutral", 0, target) + " " + METRIC_SAYS) != RULE


def test_a_tool_routing_feedback_is_still_read_as_tool_routing() -> None:
    """An agent's target is its tool names (a plain value): the sentence comes
    first, and the metric's ``Expected tool calls`` / ``match the reference`` forms
    are still what the simulator reads (the sentence's ``expected value`` is no tool
    form)."""
    answer = "A technician will come to fix the lift."
    prediction = afnio.Variable([answer, answer], role="answers", requires_grad=True)
    _, explanation = MetricFeedback.apply(
        prediction,
        [0.0, 1.0],
        [
            "Expected tool calls: [repairs], got [].",
            "The tool calls match the reference: [repairs].",
        ],
        ["repairs", "repairs"],
        "trajectory_match_strict",
        1,
        feedback_mode="direct",
    )
    explanation.backward()
    missed, matched = prediction.grad[0].data
    assert missed.startswith(direct("trajectory_match_strict", answer, 0.0, "repairs"))
    assert expected_tools(missed) == ("repairs",)
    assert confirmed_tools(matched) == ("repairs",)


# -- through optimize() ----------------------------------------------------------------

FEEDBACK_ON_OUTPUT = re.compile(r"<FEEDBACK_ON_OUTPUT>(.*?)</FEEDBACK_ON_OUTPUT>", re.S)
PARSER_NOTE = re.compile(r"^\(feedback on the output of the StrOutputParser [^)]*\) ")
"""The note the traced output parser puts before the feedback it passes on."""


def _run(backward: str, tmp_path: Path) -> tuple[list[str], dict[str, str], Any]:
    """One step of ``optimize()`` on an LCEL chain whose 10 rows all fail at first;
    the metric gives feedback on 5 of them. Returns the first step's
    ``<FEEDBACK_ON_OUTPUT>`` texts (the parser's note removed), the rows' targets by
    message, and the calls by responder."""
    rows = code_rows(10, seed=0)
    with_feedback = {c for _, _, c in rows[:5]}

    def coded(prediction: str, target: str) -> tuple[int, str | None]:
        if prediction.strip() == target:
            return 1, ""
        if target in with_feedback:
            return 0, f"The code must be {target}."
        return 0, None  # no textual feedback for this row

    with simulated() as (sim, _):
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Classify the code of the message."), ("human", "{message}")]
        )
        chain = prompt | sim_chat(sim) | StrOutputParser()
        optimize(
            chain,
            [({"message": m}, c) for m, _, c in rows],
            coded,
            epochs=1,
            batch_size=10,
            seed=0,
            progress=False,
            model=SIMULATOR_MODEL,
            root_dir=str(tmp_path / "run"),
            backward=backward,
        )
        requests = list(sim.requests)
    first = steps(requests)[0]
    texts = [
        PARSER_NOTE.sub("", t.strip())
        for call in backward_calls(first)
        for t in FEEDBACK_ON_OUTPUT.findall(call.text)
    ]
    return texts, {m: c for m, _, c in rows}, kinds(requests)


def test_optimize_cheap_sends_the_sentence_and_the_metrics_feedback(
    tmp_path: Path,
) -> None:
    texts, _, counted = _run("cheap", tmp_path)
    assert counted["evaluator_backward"] == 0, counted
    assert len(texts) == 10  # every failed row: 5 with metric text, 5 without
    pattern = re.compile(
        r'The metric "coded" gave the prediction "(?P<p>[^"]*)" the score 0; the '
        r'expected value is "(?P<t>[^"]+)"\.(?: The code must be (?P<again>.+)\.)?$'
    )
    matches = [pattern.match(t) for t in texts]
    assert all(matches), texts
    assert sum(m["again"] is not None for m in matches) == 5
    assert all(m["again"] in (None, m["t"]) for m in matches)


def test_optimize_upstream_sends_the_metrics_feedback_alone(tmp_path: Path) -> None:
    texts, targets, counted = _run("upstream", tmp_path)
    assert counted["evaluator_backward"] == 0, counted  # the metric wrote it
    assert len(texts) == 5  # a row without metric feedback gets none
    assert sorted(texts) == sorted(
        f"The code must be {c}." for c in list(targets.values())[:5]
    )
