"""``AfnioTGD``, textual gradient descent as a DSPy teleprompter: metric shapes, the
metric evaluator, argument checks, and the end-to-end acceptance run on Facility
Support sentiment against the simulator (DSPy -> LiteLLM -> HTTP)."""

from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

import afnio  # noqa: E402
from afnio.testing import Simulator  # noqa: E402
from afnio.utils.datasets import FacilitySupport  # noqa: E402
from afnio_integrations.dspy import (  # noqa: E402
    AfnioTGD,
    DSPyLM,
    MetricEvaluator,
    call_metric,
    trace,
)
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

SHARED = (
    Path(__file__).resolve().parents[3].parent / "shared" / "data" / "facility-support"
)
needs_data = pytest.mark.skipif(
    not (SHARED / "dataset.json").exists(),
    reason="../shared/data is not available (a fresh clone): the acceptance run "
    "needs the Facility Support dataset",
)


def sentiment_match(example: Any, pred: Any, trace: Any = None) -> bool:
    return example.sentiment == pred.sentiment


def sentiment_feedback(
    gold: Any,
    pred: Any,
    trace: Any = None,
    pred_name: str | None = None,
    pred_trace: Any = None,
) -> Any:
    """A GEPA-style metric: a score and a textual feedback."""
    if gold.sentiment == pred.sentiment:
        return dspy.Prediction(score=1.0, feedback="Correct.")
    return dspy.Prediction(
        score=0.0,
        feedback=f'Wrong sentiment "{pred.sentiment}": the expected sentiment is '
        f'"{gold.sentiment}".',
    )


# -- metrics -----------------------------------------------------------------------


class Judge(dspy.Module):
    """A metric that is itself a DSPy module (``__call__(*args, **kwargs)``)."""

    def forward(self, example: Any, pred: Any, trace: Any = None) -> float:
        return 0.5


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (True, (1.0, "")),
        (0, (0.0, "")),
        (0.25, (0.25, "")),
        (Fraction(1, 2), (0.5, "")),  # any numbers.Real
        (Decimal("1"), (1.0, "")),  # anything with __float__ (numpy scalars)
        ((0.0, "too long"), (0.0, "too long")),
        ({"score": 1, "feedback": "fine"}, (1.0, "fine")),
    ],
)
def test_call_metric_accepts_the_usual_shapes(result: Any, expected: Any) -> None:
    assert call_metric(lambda ex, pred, trace=None: result, 1, 2) == expected


def test_call_metric_passes_what_each_metric_shape_takes() -> None:
    seen: list[tuple[Any, ...]] = []

    def two(example: Any, pred: Any) -> int:
        seen.append((example, pred))
        return 1

    def gepa(*args: Any) -> Any:
        seen.append(args)
        return dspy.Prediction(score=0.5, feedback="meh")

    assert call_metric(two, "e", "p") == (1.0, "")
    assert call_metric(gepa, "e", "p") == (0.5, "meh")
    assert seen == [("e", "p"), ("e", "p", None, None, None)]
    assert call_metric(Judge(), "e", "p") == (0.5, "")


def test_call_metric_names_a_bad_result() -> None:
    def metric(example: Any, pred: Any) -> str:
        return "yes"

    with pytest.raises(TypeError, match=r"metric must return a score.*'yes'"):
        call_metric(metric, 1, 2)


def test_metric_feedback_is_the_gradient_and_best_samples_get_none() -> None:
    # no backward client is set: any LM call would raise
    prediction = afnio.Variable(["a", "b", "c"], role="answers", requires_grad=True)
    score, explanation = MetricEvaluator.apply(
        prediction,
        ["x", "b", "z"],
        [1, 5, 3],
        ["too short", "perfect", "almost"],
        "DSPy metric stars",
        5,
    )
    assert score.data == 9
    explanation.backward()
    (grad,) = prediction.grad
    assert grad.data == ["too short", "", "almost"]  # the 5/5 sample gets nothing


# -- arguments ---------------------------------------------------------------------


def test_afnio_tgd_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="`metric` must be a function"):
        AfnioTGD(metric="accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`epochs` must be an int >= 1"):
        AfnioTGD(metric=sentiment_match, epochs=0)
    with pytest.raises(TypeError, match="`best_score` must be a number"):
        AfnioTGD(metric=sentiment_match, best_score="1")  # type: ignore[arg-type]


def test_compile_checks_the_student_and_the_data() -> None:
    tgd = AfnioTGD(metric=sentiment_match, progress=False)
    student = dspy.Predict("message -> sentiment")
    good = [dspy.Example(message="hi", sentiment="neutral").with_inputs("message")]
    with pytest.raises(TypeError, match=r"`student` must be a dspy\.Module"):
        tgd.compile(object(), trainset=good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`trainset` is empty"):
        tgd.compile(student, trainset=[])
    with pytest.raises(TypeError, match=r"`trainset\[0\]` must be a dspy.Example"):
        tgd.compile(student, trainset=[{"message": "hi"}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"`trainset\[0\]` has no input keys"):
        tgd.compile(student, trainset=[dspy.Example(message="hi")])
    with pytest.raises(ValueError, match="`valset` is empty"):
        tgd.compile(student, trainset=good, valset=[])
    with pytest.raises(ValueError, match="does not use a teacher"):
        tgd.compile(student, trainset=good, teacher=student)
    with pytest.raises(TypeError, match="unexpected arguments"):
        tgd.compile(student, trainset=good, num_trials=3)
    with (
        dspy.context(lm=None),
        pytest.raises(ValueError, match="needs an LM to write feedback"),
    ):
        tgd.compile(student, trainset=good)


# -- concurrency -------------------------------------------------------------------


def test_dspy_lm_client_calls_run_concurrently_up_to_the_bound() -> None:
    async def many(client: DSPyLM, n: int) -> list[str]:
        messages = [{"role": "user", "content": "hello"}]
        return await asyncio.gather(*(client.achat(messages) for _ in range(n)))

    with Simulator(latency=0.3) as sim:
        client = DSPyLM(make_lm(sim))
        afnio.set_max_concurrency(12)
        assert asyncio.run(many(client, 12)) == ["neutral"] * 12
        assert sim.stats.peak_in_flight == 12  # not capped by a small thread pool
        assert client.calls == 12


def test_an_async_program_under_a_bound_of_one_does_not_deadlock() -> None:
    class Gather(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classify = dspy.Predict("message -> sentiment")

        def forward(self, message: str) -> Any:
            async def all_three() -> list[Any]:
                calls = (
                    self.classify.acall(message=f"{message} {k}") for k in range(3)
                )
                return await asyncio.gather(*calls)

            results = asyncio.run(all_three())
            return dspy.Prediction(sentiment=results[-1].sentiment)

    with Simulator(latency=0.1) as sim, dspy.context(lm=make_lm(sim)):
        afnio.set_max_concurrency(1)
        traced = trace(Gather())
        assert traced(message="hello").sentiment.data == "neutral"


# -- the acceptance run ------------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    if not (SHARED / "dataset.json").exists():
        pytest.skip("../shared/data is not available (a fresh clone)")
    root = tmp_path_factory.mktemp("data")
    raw = root / "FacilitySupport" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(SHARED / "dataset.json", raw / "dataset.json")
    out = {}
    for split in ("train", "val"):
        data = FacilitySupport(split, root=root, download=False)
        out[split] = [
            dspy.Example(
                message=data[i][0].data, sentiment=data[i][1][1].data
            ).with_inputs("message")
            for i in range(len(data))
        ]
    return out


@needs_data
@pytest.mark.parametrize("metric", [sentiment_match, sentiment_feedback])
def test_afnio_tgd_learns_facility_support_sentiment(
    metric: Any, sentiment_data: dict[str, list[Any]], tmp_path: Path
) -> None:
    train, val = sentiment_data["train"], sentiment_data["val"]
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        student = dspy.Predict("message -> sentiment")
        tgd = AfnioTGD(metric=metric, epochs=3, batch_size=16, seed=0, progress=False)
        optimized = tgd.compile(student, trainset=train, valset=val)
        report = tgd.report
        assert report is not None
        print(report)
        assert report.score_before is not None and report.score_before < 0.62
        assert report.score_after is not None and report.score_after >= 0.75
        assert report.calls == sim.stats.calls  # every request of the run counted
        phases = {r.phase for r in report.phases}
        assert phases == {"forward", "backward", "optimizer"}
        assert sum(r.calls for r in report.phases) == sim.stats.calls
        assert report.tokens > 0 and report.cost > 0
        assert 'If the message mentions "' in report.prompt_diff
        # the student is untouched; the copy is a plain DSPy program
        assert student.signature.instructions.startswith("Given the fields")
        assert optimized._compiled
        evaluate = dspy.Evaluate(devset=val, metric=sentiment_match, num_threads=8)
        assert evaluate(optimized).score >= 75.0
        path = tmp_path / "optimized.json"
        optimized.save(str(path))
        loaded = dspy.Predict("message -> sentiment")
        loaded.load(str(path))
        assert loaded.signature.instructions == optimized.signature.instructions


def test_max_cost_stops_the_run_within_the_budget() -> None:
    train = [
        dspy.Example(
            message=f"I am frustrated, case {k}.", sentiment="negative"
        ).with_inputs("message")
        for k in range(16)
    ]
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        budget = 0.004
        tgd = AfnioTGD(
            metric=sentiment_match,
            epochs=5,
            batch_size=4,
            max_cost=budget,
            progress=False,
        )
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=train)
        report = tgd.report
        assert report is not None
        assert report.stopped_reason and "max_cost" in report.stopped_reason
        assert report.cost <= budget
        assert report.score_after is None  # the last instructions were not validated


def test_constraints_momentum_and_revert_reach_the_optimizer() -> None:
    train = [
        dspy.Example(message=m, sentiment=s).with_inputs("message")
        for m, s in [
            ("I am frustrated with the heating.", "negative"),
            ("I love the new lobby!", "positive"),
            ("My badge works.", "neutral"),
            ("The service was excellent.", "positive"),
        ]
    ]
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        tgd = AfnioTGD(
            metric=sentiment_match,
            epochs=2,
            batch_size=2,
            momentum=2,
            constraints=['Do not use the character "`".'],
            revert_on_regression=True,
            progress=False,
        )
        optimized = tgd.compile(dspy.Predict("message -> sentiment"), trainset=train)
        report = tgd.report
        assert report is not None
        instructions = optimized.signature.instructions
        assert "`" not in instructions  # the constraint was in the optimizer prompt
        assert 'If the message mentions "frustrated"' in instructions
        assert all("train_reverted" in row for row in report.history)
        assert report.score_after == 1.0


@needs_data
def test_a_pilot_report_projects_the_full_run_within_20_percent(
    sentiment_data: dict[str, list[Any]],
) -> None:
    from afnio.trainer.projection import project

    train, val = sentiment_data["train"], sentiment_data["val"]
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        pilot = AfnioTGD(
            metric=sentiment_match, epochs=1, batch_size=16, progress=False
        )
        pilot.compile(
            dspy.Predict("message -> sentiment"), trainset=train[:32], valset=val[:32]
        )
        assert pilot.report is not None
        projected = project(
            pilot.report.profile(),
            n_train=len(train),
            n_val=len(val),
            epochs=2,
            batch_size=16,
        )
        sim.reset_stats()
        full = AfnioTGD(metric=sentiment_match, epochs=2, batch_size=16, progress=False)
        full.compile(dspy.Predict("message -> sentiment"), trainset=train, valset=val)
        calls = sim.stats.calls
        tokens = sim.stats.prompt_tokens + sim.stats.completion_tokens
    projected_tokens = projected.prompt_tokens + projected.completion_tokens
    report = (
        f"projected {projected.calls} / {projected_tokens}, measured {calls} / {tokens}"
    )
    print(report)
    assert abs(projected.calls - calls) <= 0.2 * calls, report
    assert abs(projected_tokens - tokens) <= 0.2 * tokens, report


@needs_data
def test_estimate_tuned_on_a_pilot_estimates_the_full_run_within_20_percent(
    sentiment_data: dict[str, list[Any]],
) -> None:
    from afnio.trainer.estimate import Assumptions

    def words(text: str) -> int:
        return len(text.split())  # the simulator's tokens

    train, val = sentiment_data["train"], sentiment_data["val"]
    student = dspy.Predict("message -> sentiment")
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        pilot = AfnioTGD(
            metric=sentiment_match, epochs=1, batch_size=16, progress=False
        )
        compiled = pilot.compile(student, trainset=train[:32], valset=val[:32])
        assert pilot.report is not None
        assumptions = Assumptions.from_rows(
            pilot.report.phases,
            shape=pilot.graph_shape(student, train[:32]),
            train_samples=32,
            failure_rate=1 - pilot.report.history[0]["train_score"],
            final_parameters=[compiled.signature.instructions],
            tokenizer=words,
        )
        full = AfnioTGD(metric=sentiment_match, epochs=2, batch_size=16, progress=False)
        sim.reset_stats()
        run = full.estimate(
            student,
            trainset=train,
            valset=val,
            assumptions=assumptions,
            tokenizer=words,
        )
        assert sim.stats.calls == 0  # a dry run: no request
        assert run.by_phase["forward"].cost > 0  # DSPy's configured LM is priced
        full.compile(student, trainset=train, valset=val)
        calls = sim.stats.calls
        tokens = sim.stats.prompt_tokens + sim.stats.completion_tokens
    estimated = run.prompt_tokens + run.completion_tokens
    report = f"estimated {run.calls} / {estimated}, measured {calls} / {tokens}"
    print(report)
    assert abs(run.calls - calls) <= 0.2 * calls, report
    assert abs(estimated - tokens) <= 0.2 * tokens, report


def test_estimate_arguments_and_program_shapes() -> None:
    examples = [
        dspy.Example(message=f"message {i}", sentiment="neutral").with_inputs("message")
        for i in range(8)
    ]
    tgd = AfnioTGD(metric=sentiment_match, epochs=1, batch_size=4, progress=False)
    cot = dspy.ChainOfThought("message -> sentiment")
    one = tgd.estimate(cot, trainset=examples)
    # a validation first, 8 training samples, a validation after the epoch
    assert one.by_phase["forward"].calls == 8 + 8 + 8
    react_like = tgd.estimate(cot, trainset=examples, forward_calls=3)
    assert react_like.by_phase["forward"].calls == 3 * 24
    with pytest.raises(ValueError, match="`valset` is empty"):
        tgd.estimate(cot, trainset=examples, valset=[])
    with pytest.raises(ValueError, match=r"no dspy\.Predict to count"):
        tgd.estimate(dspy.Module(), trainset=examples)
    with pytest.raises(TypeError, match=r"`student` must be a dspy\.Module"):
        tgd.estimate("program", trainset=examples)
    gated = AfnioTGD(
        metric=sentiment_match,
        epochs=1,
        batch_size=4,
        revert_on_regression=True,
        progress=False,
    ).estimate(cot, trainset=examples)
    assert gated.by_phase["forward"].calls == one.by_phase["forward"].calls + 2 * 8
