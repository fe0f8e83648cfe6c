"""Evaluators without LM calls: the contract's texts, roles, errors, graph shapes."""

from __future__ import annotations

import pytest

import afnio
from afnio import Variable
from afnio.autodiff.evaluator import DeterministicEvaluator, ExactMatchEvaluator
from afnio.autodiff.graph import AccumulateGrad


def exact_match_fn(p: str, t: str) -> int:
    return 1 if p == t else 0


def test_deterministic_scalar_matches_the_seed_docs() -> None:
    prediction = Variable("green", role="color prediction", requires_grad=True)
    score, explanation = DeterministicEvaluator.apply(
        prediction, "red", exact_match_fn, "exact match"
    )
    assert score.data == 0
    assert explanation.data == (
        "The evaluation function, designed for 'exact match', compared the <DATA> "
        "field of the predicted variable ('green') with the <DATA> field of the target "
        "variable ('red'), resulting in a score: 0."
    )
    assert score.role == "Evaluation result score of color prediction"
    assert explanation.role == "Evaluation result explanation of color prediction"
    assert score.requires_grad and explanation.requires_grad
    assert explanation.grad_fn.name() == "DeterministicEvaluatorBackward0"
    assert score.grad_fn is explanation.grad_fn


def test_deterministic_batched_matches_the_seed_docs() -> None:
    prediction = Variable(
        ["green", "blue"], role="color prediction", requires_grad=True
    )
    score, explanation = DeterministicEvaluator.apply(
        prediction,
        ["red", "blue"],
        exact_match_fn,
        "exact match",
        reduction_fn=sum,
        reduction_fn_purpose="summation",
    )
    assert score.data == 1
    assert explanation.data == (
        "The evaluation function, designed for 'exact match', compared the <DATA> "
        "fields of the predicted variable and the target variable across all samples "
        "in the batch, generating individual scores for each pair. These scores were "
        "then aggregated using the reduction function 'summation', resulting in a "
        "final aggregated score: 1."
    )


def test_contract_edges_for_the_seven_argument_call() -> None:
    prediction = Variable("green", role="color prediction", requires_grad=True)
    target = Variable("red", role="target")
    score, _ = DeterministicEvaluator.apply(
        prediction, target, exact_match_fn, "exact match", None, None, None
    )
    kinds = [
        type(e.node).__name__ if e.node else None for e in score.grad_fn.next_functions
    ]
    assert kinds == ["AccumulateGrad", None]
    assert isinstance(score.grad_fn.next_functions[0].node, AccumulateGrad)


def test_exact_match_scalar_and_batched() -> None:
    prediction = Variable("green", role="color prediction")
    score, explanation = ExactMatchEvaluator.apply(prediction, "red")
    assert score.data == 0
    assert "designed for 'exact match'" in explanation.data
    batched = Variable(["green", "blue"], role="color prediction")
    score, explanation = ExactMatchEvaluator.apply(batched, ["red", "blue"])
    assert score.data == 1
    assert explanation.data.endswith("resulting in a final aggregated score: 1.")


def test_no_reduction_keeps_per_sample_scores_and_explanations() -> None:
    prediction = Variable(["a", "b"], role="letters")
    score, explanation = ExactMatchEvaluator.apply(prediction, ["a", "c"], None, None)
    assert score.data == [1, 0]
    assert isinstance(explanation.data, list) and len(explanation.data) == 2
    assert "('b')" in explanation.data[1] and "('c')" in explanation.data[1]


def test_target_may_be_a_variable() -> None:
    prediction = Variable(["a", "b"], role="letters")
    score, _ = ExactMatchEvaluator.apply(prediction, Variable(["a", "b"], role="gold"))
    assert score.data == 2


def test_evaluator_errors() -> None:
    with pytest.raises(TypeError, match="`prediction` must be a Variable"):
        ExactMatchEvaluator.apply("green", "red")
    with pytest.raises(ValueError, match="2 samples but `target` has 3"):
        ExactMatchEvaluator.apply(Variable(["a", "b"]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="`prediction` is a batch"):
        ExactMatchEvaluator.apply(Variable(["a", "b"]), "a")
    with pytest.raises(ValueError, match="`target` is a list"):
        ExactMatchEvaluator.apply(Variable("a"), ["a"])
    with pytest.raises(ValueError, match="`reduction_fn_purpose` must not be empty"):
        ExactMatchEvaluator.apply(Variable(["a"]), ["a"], sum, "")
    with pytest.raises(ValueError, match="must not be empty"):
        DeterministicEvaluator.apply(Variable("a"), "a", exact_match_fn, "")
    with pytest.raises(TypeError, match="`eval_fn` must be a function"):
        DeterministicEvaluator.apply(Variable("a"), "a", "not callable", "x")


def test_success_fn_skips_the_backward_lm_entirely() -> None:
    # no backward client is set: any LM call would raise
    prediction = Variable(["a", "b"], role="letters", requires_grad=True)
    _, explanation = DeterministicEvaluator.apply(
        prediction, ["a", "x"], exact_match_fn, "exact match", lambda scores: True
    )
    explanation.backward()
    assert prediction.grad == []


def test_all_samples_at_best_score_make_no_lm_call() -> None:
    prediction = Variable(["a", "b"], role="letters", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(prediction, ["a", "b"])
    explanation.backward()
    assert prediction.grad == []


def test_under_no_grad_evaluators_record_nothing() -> None:
    with afnio.no_grad():
        score, explanation = ExactMatchEvaluator.apply(
            Variable("a", requires_grad=True), "a"
        )
    assert score.grad_fn is None and explanation.requires_grad is False
