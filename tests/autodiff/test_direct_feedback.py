"""Direct evaluator feedback (issue 23): ``feedback_mode="direct"`` (or the active
``afnio.backward_options(evaluator_feedback="direct")``) writes each failed sample's
feedback without an LM call."""

from __future__ import annotations

import json
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio import cognitive as cog
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    direct_feedback_texts,
)
from afnio.autodiff.provenance import _call_samples_of, bases_of, sources_of
from afnio.models.model import ChatCompletionModel
from tests._helpers import direct_feedback_text as direct


class CountingLM(ChatCompletionModel):
    """Answers every backward call with one feedback per listed sample; counts."""

    def __init__(self) -> None:
        super().__init__(provider="counting")
        self.calls = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        user = messages[-1]["content"]
        count = user.count("<SAMPLE index=") or 1
        return json.dumps({"gradients": [f"lm feedback {i}" for i in range(count)]})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


PREDICTIONS = ["red", "blue", "green", "blue"]
TARGETS = ["red", "green", "green", "yellow"]


def test_direct_mode_makes_no_lm_call_and_writes_each_failed_samples_text() -> None:
    lm = CountingLM()
    afnio.set_backward_model_client(lm)
    prediction = Variable(PREDICTIONS, role="color", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, TARGETS, feedback_mode="direct"
    )
    explanation.backward()
    assert lm.calls == 0
    (grad,) = prediction.grad
    assert grad.data == [
        "",
        direct("exact match", "blue", 0, "green"),
        "",
        direct("exact match", "blue", 0, "yellow"),
    ]
    assert grad.role == "feedback to color"
    # provenance: sample (s,), no call group, numbered in the targets (as in LM mode)
    assert sources_of(grad) == [(0,), (1,), (2,), (3,)]
    assert _call_samples_of(grad) == [None] * 4


def test_direct_mode_needs_no_backward_client_at_all() -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(prediction, ["a", "c"])
    with afnio.backward_options(evaluator_feedback="direct"):
        explanation.backward()
    assert prediction.grad[0].data == ["", direct("exact match", "b", 0, "c")]


def test_direct_and_lm_mode_number_the_feedback_in_the_same_basis() -> None:
    afnio.set_backward_model_client(CountingLM())
    grads = {}
    for mode in ("lm", "direct"):
        prediction = Variable(PREDICTIONS, role="color", requires_grad=True)
        _, explanation = ExactMatchEvaluator.apply(
            prediction, TARGETS, feedback_mode=mode, samples_per_call=1
        )
        explanation.backward()
        grads[mode] = prediction.grad[0]
    assert bases_of(grads["direct"]) == bases_of(grads["lm"])
    assert bases_of(grads["direct"])[1] is not None
    assert sources_of(grads["direct"]) == sources_of(grads["lm"])
    assert grads["lm"].data[1] == "lm feedback 0"  # LM mode unchanged: LM-written


def test_lm_mode_is_the_default_and_still_calls_the_backward_model() -> None:
    lm = CountingLM()
    afnio.set_backward_model_client(lm)
    prediction = Variable(PREDICTIONS, role="color", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(prediction, TARGETS)
    explanation.backward()
    assert lm.calls == 1
    assert prediction.grad[0].data == ["", "lm feedback 0", "", "lm feedback 1"]


def test_the_evaluators_feedback_mode_wins_over_the_active_options() -> None:
    lm = CountingLM()
    afnio.set_backward_model_client(lm)
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["c", "d"], feedback_mode="lm"
    )
    with afnio.backward_options("cheap"):
        explanation.backward()
    assert lm.calls == 1
    prediction2 = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation2 = ExactMatchEvaluator.apply(prediction2, ["c", "d"])
    with afnio.backward_options("cheap"):  # None: read when backward runs
        explanation2.backward()
    assert lm.calls == 1
    assert prediction2.grad[0].data[0] == direct("exact match", "a", 0, "c")


def test_a_bad_feedback_mode_fails_in_forward_naming_the_argument() -> None:
    prediction = Variable(["a"], role="label", requires_grad=True)
    for bad in ("LM", "auto", 1):
        with pytest.raises(ValueError, match=r"`feedback_mode` must be \"lm\""):
            ExactMatchEvaluator.apply(prediction, ["b"], feedback_mode=bad)
        with pytest.raises(ValueError, match=r"`feedback_mode` must be"):
            DeterministicEvaluator.apply(
                prediction, ["b"], lambda p, t: 0, "m", feedback_mode=bad
            )


def test_per_sample_skip_off_sends_every_sample() -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["a", "c"], per_sample_skip=False, feedback_mode="direct"
    )
    explanation.backward()
    assert prediction.grad[0].data == [
        direct("exact match", "a", 1, "a"),
        direct("exact match", "b", 0, "c"),
    ]


def test_success_fn_true_gives_no_gradient_in_direct_mode() -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation = DeterministicEvaluator.apply(
        prediction,
        ["a", "c"],
        lambda p, t: int(p == t),
        "match",
        lambda scores: sum(scores) >= 1,
        feedback_mode="direct",
    )
    explanation.backward()
    assert prediction.grad == []


def test_scalar_prediction_gets_a_str_gradient_and_no_provenance() -> None:
    prediction = Variable("green", role="color", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, "red", feedback_mode="direct"
    )
    explanation.backward()
    (grad,) = prediction.grad
    assert grad.data == direct("exact match", "green", 0, "red")
    assert sources_of(grad) == [None]


def test_braces_in_the_metric_name_and_data_stay_literal() -> None:
    prediction = Variable(["{prediction}", "x"], role="label", requires_grad=True)
    _, explanation = DeterministicEvaluator.apply(
        prediction,
        ["{target}", "{0}"],
        lambda p, t: 0.25,
        "F1 on {score} of {{fields}}",
        None,
        feedback_mode="direct",
        best_score=1,
    )
    explanation.backward()
    assert prediction.grad[0].data == [
        direct("F1 on {score} of {{fields}}", "{prediction}", 0.25, "{target}"),
        direct("F1 on {score} of {{fields}}", "x", 0.25, "{0}"),
    ]


def test_feedback_on_the_explanation_is_appended_as_the_detail() -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["c", "b"], feedback_mode="direct"
    )
    explanation.backward(Variable("Labels are lowercase {words}."))
    assert prediction.grad[0].data == [
        direct("exact match", "a", 0, "c") + " Labels are lowercase {words}.",
        "",
    ]


def test_per_sample_feedback_on_per_sample_explanations_stays_with_its_sample() -> None:
    prediction = Variable(["a", "b", "x"], role="label", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["c", "d", "x"], None, None, feedback_mode="direct"
    )
    explanation.backward(Variable(["first only", "", "third"]))
    assert prediction.grad[0].data == [
        direct("exact match", "a", 0, "c") + " first only",
        direct("exact match", "b", 0, "d"),
        "",
    ]


def test_direct_feedback_texts_for_chosen_samples() -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    score, _ = ExactMatchEvaluator.apply(prediction, ["a", "c"])
    ctx = score.grad_fn
    assert direct_feedback_texts(ctx, None) == ["", direct("exact match", "b", 0, "c")]
    assert direct_feedback_texts(ctx, Variable("more"), samples=[0]) == [
        direct("exact match", "a", 1, "a") + " more",
        "",
    ]


def test_functional_and_module_forms_pass_feedback_mode_through() -> None:
    lm = CountingLM()
    afnio.set_backward_model_client(lm)
    p1 = Variable(["a"], role="label", requires_grad=True)
    _, e1 = afnio.functional.exact_match_evaluator(p1, ["b"], feedback_mode="direct")
    p2 = Variable(["a"], role="label", requires_grad=True)
    _, e2 = afnio.functional.deterministic_evaluator(
        p2, ["b"], lambda p, t: 0, "m", None, sum, "summation", feedback_mode="direct"
    )
    p3 = Variable(["a"], role="label", requires_grad=True)
    _, e3 = cog.ExactMatchEvaluator()(p3, ["b"], feedback_mode="direct")
    p4 = Variable(["a"], role="label", requires_grad=True)
    _, e4 = cog.DeterministicEvaluator()(
        p4, ["b"], lambda p, t: 0, "m", feedback_mode="direct"
    )
    afnio.autodiff.backward([e1, e2, e3, e4])
    assert lm.calls == 0
    assert p1.grad[0].data == [direct("exact match", "a", 0, "b")]
    assert p2.grad[0].data == [direct("m", "a", 0, "b")]
    assert p3.grad[0].data == [direct("exact match", "a", 0, "b")]
    assert p4.grad[0].data == [direct("m", "a", 0, "b")]


def test_an_lm_judge_keeps_lm_feedback_in_direct_mode() -> None:
    from afnio.autodiff.evaluator import LMJudgeEvaluator

    class Judge(CountingLM):
        async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
            if (
                kwargs.get("response_format", {}).get("json_schema", {}).get("name")
                == "afnio_judgement"
            ):
                return '{"score": false, "explanation": "wrong"}'
            return await super().achat(messages, **kwargs)

    judge = Judge()
    afnio.set_backward_model_client(judge)
    messages = [{"role": "user", "content": [Variable("{prediction} vs {target}")]}]
    prediction = Variable(["a"], role="label", requires_grad=True)
    _, explanation = LMJudgeEvaluator.apply(judge, messages, prediction, ["b"])
    before = judge.calls
    with afnio.backward_options("cheap"):
        explanation.backward()
    assert judge.calls == before + 1
    assert prediction.grad[0].data == ["lm feedback 0"]
