"""A DSPy metric's own textual feedback in direct mode (issue 23, review finding L5).

A GEPA-style metric (``dspy.Prediction(score=..., feedback=...)``) gives a sample
its own text. In direct mode (``AfnioTGD``'s cheap default) a failed sample with
feedback gets the direct sentence (``DIRECT_EVALUATOR_FEEDBACK``: the metric, the
prediction, the score, the expected value) followed by the metric's text; one
without gets the sentence alone. In ``"lm"`` mode (upstream) a failed sample with
feedback gets the metric's text alone and one without is sent to the backward LM.
Samples at ``best_score`` get nothing in both modes."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("dspy", reason="needs the dspy extra")

import afnio
from afnio.models.model import ChatCompletionModel
from afnio_integrations.dspy import MetricEvaluator
from tests._helpers import direct_feedback_text as direct


class CountingLM(ChatCompletionModel):
    """A backward client answering each evaluator-backward call with one feedback
    per ``<SAMPLE>``, naming the sample's prediction; counts the calls."""

    def __init__(self) -> None:
        super().__init__(provider="counting")
        self.calls = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        count = messages[-1]["content"].count("<SAMPLE index=")
        return json.dumps({"gradients": [f"lm feedback {i}" for i in range(count)]})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


METRIC = "DSPy metric graded"
PREDICTIONS = ["a", "b", "c", "d"]
TARGETS = ["x", "b", "z", "d"]
SCORES = [0.0, 1.0, 0.5, 1.0]
FEEDBACK = ["Say x.", "", "", "Right."]
"""Sample 0 failed with feedback, 1 is right, 2 failed without feedback, 3 is right
with feedback."""


def _gradient(lm: CountingLM | None = None, **kwargs: Any) -> list[str]:
    if lm is not None:
        afnio.set_backward_model_client(lm)
    prediction = afnio.Variable(PREDICTIONS, role="answers", requires_grad=True)
    _, explanation = MetricEvaluator.apply(
        prediction, TARGETS, SCORES, FEEDBACK, METRIC, 1.0, **kwargs
    )
    explanation.backward()
    (grad,) = prediction.grad
    return list(grad.data)


def test_direct_mode_states_the_metric_result_then_the_metrics_own_feedback() -> None:
    lm = CountingLM()
    assert _gradient(lm, feedback_mode="direct") == [
        direct(METRIC, "a", 0.0, "x") + " Say x.",
        "",
        direct(METRIC, "c", 0.5, "z"),
        "",  # at best_score: nothing, even with feedback
    ]
    assert lm.calls == 0


def test_lm_mode_keeps_the_metrics_own_feedback_alone() -> None:
    lm = CountingLM()
    assert _gradient(lm, feedback_mode="lm") == ["Say x.", "", "lm feedback 0", ""]
    assert lm.calls == 1  # the sample without feedback only


def test_feedback_mode_none_follows_the_active_backward_options() -> None:
    with afnio.backward_options("cheap"):
        cheap = _gradient()  # no backward client: an LM call would raise
    assert cheap == _gradient(feedback_mode="direct")
    lm = CountingLM()
    with afnio.backward_options("upstream"):
        assert _gradient(lm) == ["Say x.", "", "lm feedback 0", ""]


def test_a_multi_field_target_puts_the_metrics_feedback_first() -> None:
    """A prediction of several fields has a target of several lines (``field:
    value`` per line): not a plain value to quote, so the metric's text leads."""
    target = "sentiment: negative\nurgency: high"
    prediction = afnio.Variable(["x"], role="answers", requires_grad=True)
    _, explanation = MetricEvaluator.apply(
        prediction,
        [target],
        [0.0],
        ['The expected urgency is "high".'],
        METRIC,
        1.0,
        feedback_mode="direct",
    )
    explanation.backward()
    assert prediction.grad[0].data == [
        'The expected urgency is "high". ' + direct(METRIC, "x", 0.0, target)
    ]
