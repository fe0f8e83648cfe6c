"""``AfnioTGD(..., backward=...)`` (issue 23): ``"cheap"`` by default (a failed
example without metric feedback gets direct feedback, no evaluator-backward call;
chat-backward calls grouped 8 examples a call per predictor), ``"upstream"`` on
request, on DSPy programs written as DSPy's docs write them (``dspy.Predict``,
``dspy.ChainOfThought``, a module of two predictors). The calls are counted from
the live simulator's recorded requests, classified by the responder that answered
them (``tests/integrations/_cheap_calls.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them (see
# conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

import afnio  # noqa: E402
from afnio.autodiff import config  # noqa: E402
from afnio.testing import Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioTGD, MetricEvaluator  # noqa: E402
from benchmarks import two_stage  # noqa: E402
from tests._shared_data import SHARED_DATASET, needs_shared_dataset  # noqa: E402
from tests.integrations._cheap_calls import (  # noqa: E402
    backward_calls,
    ceil8,
    code_rows,
    failed_per_step,
    kinds,
    run_log,
    steps,
)
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

CHEAP_LINE = "backward: cheap (direct evaluator feedback, chat backward in groups of 8)"


def code_match(example: Any, pred: Any, trace: Any = None) -> bool:
    return example.code == pred.code


def _examples(rows: list[tuple[str, str, str]]) -> list[Any]:
    return [dspy.Example(message=m, code=c).with_inputs("message") for m, _, c in rows]


def _compile(
    program: Any,
    rows: list[Any],
    tmp_path: Path,
    metric: Any = code_match,
    **kwargs: Any,
) -> tuple[Any, Any, list[Any]]:
    """``AfnioTGD(...).compile(program)`` for one epoch on a live simulator:
    ``(optimized, tgd, requests)``."""
    kwargs.setdefault("batch_size", 10)
    with Simulator() as sim, dspy.context(lm=make_lm(sim), adapter=None):
        tgd = AfnioTGD(
            metric=metric,
            epochs=1,
            seed=0,
            progress=False,
            root_dir=str(tmp_path / "run"),
            **kwargs,
        )
        optimized = tgd.compile(program, trainset=rows)
        return optimized, tgd, list(sim.requests)


# -- the metric evaluator ------------------------------------------------------------


def test_direct_mode_states_the_metric_result_for_samples_without_feedback() -> None:
    """In cheap mode a failed sample without metric feedback gets the direct text
    (the metric, the prediction, its score and the expected value), one with
    metric feedback gets the direct text followed by the metric's text, a best
    sample gets nothing; no LM call (no backward client is set: one would raise)."""
    prediction = afnio.Variable(["a", "b", "c"], role="answers", requires_grad=True)
    with afnio.backward_options("cheap"):
        _, explanation = MetricEvaluator.apply(
            prediction,
            ["x", "b", "z"],
            [0.0, 1.0, 0.0],
            ["", "", "almost: say z"],
            "DSPy metric code_match",
            1.0,
        )
        explanation.backward()
    (grad,) = prediction.grad
    first, second, third = grad.data
    assert first.startswith(
        'The metric "DSPy metric code_match" gave the prediction "a" the score 0.0; '
        'the expected value is "x".'
    ), first
    assert second == ""
    assert third == (
        'The metric "DSPy metric code_match" gave the prediction "c" the score 0.0; '
        'the expected value is "z". almost: say z'
    )


def test_an_evaluators_own_feedback_mode_wins_over_the_active_options() -> None:
    prediction = afnio.Variable(["a", "b"], role="answers", requires_grad=True)
    _, explanation = MetricEvaluator.apply(
        prediction, ["x", "y"], [0, 0], ["", ""], "DSPy metric m", 1.0,
        feedback_mode="direct",
    )  # fmt: skip
    explanation.backward()  # outside any backward_options block: upstream
    assert [t.split(";")[1] for t in prediction.grad[0].data] == [
        ' the expected value is "x".',
        ' the expected value is "y".',
    ]
    prediction = afnio.Variable(["a"], role="answers", requires_grad=True)
    _, explanation = MetricEvaluator.apply(
        prediction, ["x"], [0], [""], "DSPy metric m", 1.0, feedback_mode="lm"
    )
    with afnio.backward_options("cheap"), pytest.raises(Exception, match="backward"):
        explanation.backward()  # an LM call, and no backward client is set
    with pytest.raises(ValueError, match="`feedback_mode` must be"):
        MetricEvaluator.apply(
            prediction, ["x"], [0], [""], "DSPy metric m", 1.0, feedback_mode="auto"
        )


# -- AfnioTGD on dspy.Predict ---------------------------------------------------------


def test_cheap_is_the_default_no_evaluator_call_and_ceil_failed_over_8_chat_calls(
    tmp_path: Path,
) -> None:
    """``dspy.Predict("message -> code")``, two steps of 10 failed examples: no
    evaluator-backward call, 2 grouped chat-backward calls per step (5 + 5); the
    report and the run log's header state the mode; the learned instructions are
    written back into the returned program."""
    rows = code_rows(20, seed=0)
    optimized, tgd, requests = _compile(
        dspy.Predict("message -> code"), _examples(rows), tmp_path
    )
    counted = kinds(requests)
    assert counted["evaluator_backward"] == 0, counted
    records = run_log(tmp_path / "run")
    failed = failed_per_step(records, "score")
    assert failed == [10, 10]
    parts = steps(requests)
    assert len(parts) == 2
    for part, n in zip(parts, failed, strict=True):
        calls = backward_calls(part)
        assert len(calls) == ceil8(n) == 2, calls
        assert sorted(c.samples for c in calls) == [5, 5]
    assert CHEAP_LINE in str(tgd.report).splitlines()
    assert tgd.backward == afnio.BackwardOptions("direct", 8)
    assert records[0]["backward_options"] == {
        "evaluator_feedback": "direct",
        "chat_samples_per_call": 8,
    }
    assert tgd.report.score_after == 1.0
    _, word, code = rows[5]
    assert f'"{word}", the code is {code}.' in optimized.signature.instructions


def test_upstream_reproduces_the_per_sample_call_pattern(tmp_path: Path) -> None:
    _, tgd, requests = _compile(
        dspy.Predict("message -> code"),
        _examples(code_rows(20, seed=0)),
        tmp_path,
        backward="upstream",
    )
    failed = failed_per_step(run_log(tmp_path / "run"), "score")
    assert failed == [10, 10]
    assert kinds(requests)["chat_backward_group"] == 0
    for part, n in zip(steps(requests), failed, strict=True):
        per_step = kinds(part)
        per_sample = math.ceil(n / config.EVALUATOR_SAMPLES_PER_CALL)
        assert per_step["evaluator_backward"] == per_sample == 2, per_step
        assert per_step["chat_backward"] == n, per_step
    assert "backward: upstream (LM-written evaluator feedback" in str(tgd.report)
    assert run_log(tmp_path / "run")[0]["backward_options"] == {
        "evaluator_feedback": "lm",
        "chat_samples_per_call": 1,
    }
    assert tgd.report.score_after == 1.0


def test_a_chain_of_thought_program_groups_its_chat_backward_calls(
    tmp_path: Path,
) -> None:
    """``dspy.ChainOfThought("message -> code")``, one step of 20 failed examples:
    3 chat-backward calls (7 + 7 + 6), no evaluator-backward call."""
    _, tgd, requests = _compile(
        dspy.ChainOfThought("message -> code"),
        _examples(code_rows(20, seed=4)),
        tmp_path,
        batch_size=20,
    )
    assert kinds(requests)["evaluator_backward"] == 0
    assert failed_per_step(run_log(tmp_path / "run"), "score") == [20]
    assert sorted(c.samples for c in backward_calls(requests)) == [6, 7, 7]
    assert tgd.report.score_after == 1.0


@pytest.mark.parametrize("seed", [1, 2])
def test_grouped_feedback_names_each_examples_own_expected_value(
    seed: int, tmp_path: Path
) -> None:
    """20 examples with distinct codes, shuffled, one batch, sent in 3 grouped
    chat-backward calls: each feedback text in the run log is credited to one
    example and names its word and code alone."""
    rows = code_rows(20, seed=seed)
    _, _, requests = _compile(
        dspy.Predict("message -> code"), _examples(rows), tmp_path, batch_size=20
    )
    # sent in 3 grouped calls
    assert sorted(c.samples for c in backward_calls(requests)) == [6, 7, 7]
    (step,) = [r for r in run_log(tmp_path / "run") if r["type"] == "step"]
    seen = []
    for param in step["params"]:
        for item in param["feedback"]:
            (s,) = item["samples"]
            seen.append(s)
            _, word, code = rows[s]
            assert f'"{word}", the code is {code}.' in item["text"], (s, item)
            others = [c for i, (_, _, c) in enumerate(rows) if i != s]
            assert not any(f"is {c}." in item["text"] for c in others), (s, item)
    assert sorted(seen) == list(range(20))


# -- a module of two predictors ------------------------------------------------------


@needs_shared_dataset("the two-predictor program's examples")
def test_two_predictors_get_ceil_items_over_8_calls_each_per_step(
    tmp_path: Path,
) -> None:
    """``message -> feeling`` then ``feeling -> sentiment``: per step, each
    predictor's chat-backward samples go in ceil(samples / 8) calls; the second
    predictor's samples are the step's failed examples."""
    splits = two_stage.load_splits(two_stage.data_root(tmp_path, SHARED_DATASET), 0)
    examples = [
        dspy.Example(message=m, sentiment=t).with_inputs("message")
        for m, t in splits.train[:32]
    ]
    _, _, requests = _compile(
        two_stage.build_program(),
        examples,
        tmp_path,
        metric=two_stage.sentiment_match,
        batch_size=16,
    )
    assert kinds(requests)["evaluator_backward"] == 0
    failed = [n for n in failed_per_step(run_log(tmp_path / "run"), "score") if n]
    parts = steps(requests)
    assert len(parts) == len(failed) >= 1
    first = two_stage.FIRST_PROMPT.split(" If ", 1)[0]
    second = two_stage.SECOND_PROMPT.split(" If ", 1)[0]
    for part, n in zip(parts, failed, strict=True):
        calls = backward_calls(part)
        by_predictor = {m: [c for c in calls if c.mentions(m)] for m in (first, second)}
        assert sum(map(len, by_predictor.values())) == len(calls)
        for marker, mine in by_predictor.items():
            samples = sum(c.samples for c in mine)
            assert len(mine) == ceil8(samples), (marker, mine)
        assert sum(c.samples for c in by_predictor[second]) == n
        assert sum(c.samples for c in by_predictor[first]) <= n


# -- arguments and the estimate ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"), [("fast", ValueError), (8, TypeError), ("", ValueError)]
)
def test_an_invalid_backward_is_refused_before_any_lm_call(
    value: Any, error: type[Exception], tmp_path: Path
) -> None:
    message = r"`backward` must be \"cheap\", \"upstream\""
    with pytest.raises(error, match=message):
        AfnioTGD(metric=code_match, backward=value)
    tgd = AfnioTGD(metric=code_match, progress=False, root_dir=str(tmp_path))
    tgd.backward = value  # set after construction: compile checks it first
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        with pytest.raises(error, match=message):
            tgd.compile(
                dspy.Predict("message -> code"),
                trainset=_examples(code_rows(4, seed=0)),
            )
        assert sim.stats.calls == 0
    with pytest.raises(error, match=message):
        tgd.estimate(
            dspy.Predict("message -> code"), trainset=_examples(code_rows(4, 0))
        )


def test_the_estimate_models_the_backward_mode() -> None:
    """``estimate`` runs inside the instance's backward options: cheap estimates
    no evaluator-backward calls and grouped chat-backward calls, fewer backward
    calls than upstream; no LM call."""
    program = dspy.Predict("message -> code")
    train = _examples(code_rows(20, seed=0))
    estimates = {
        mode: AfnioTGD(metric=code_match, batch_size=10, backward=mode).estimate(
            program, trainset=train, models="gpt-4o-mini"
        )
        for mode in ("cheap", "upstream")
    }
    cheap, upstream = (estimates[m].by_phase["backward"].calls for m in estimates)
    assert 0 < cheap < upstream, estimates
