"""Estimating a run before any LM call: call counts that follow afnio's rules, token
counts on the real prompt templates, argument checks, ``Trainer.estimate`` on an
agent (no request made), and the acceptance check on Facility Support: assumptions
tuned on a batch-16, 1-epoch pilot estimate other configurations within 20%, in both
backward modes (upstream and cheap)."""

from __future__ import annotations

import math

import pytest

import afnio
from afnio import cognitive as cog
from afnio.autodiff.options import resolve_backward_options
from afnio.models.phases import PhaseRow
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.trainer.estimate import (
    Assumptions,
    GraphShape,
    _solve_growth,
    approx_tokens,
    estimate,
)
from afnio.utils.data import DataLoader
from benchmarks import estimate_accuracy
from examples.facility_support import START_PROMPT, SentimentClassifier
from tests._shared_data import SHARED_DATASET
from tests.trainer._facility import needs_dataset


def words(text: str) -> int:
    """The simulator's token count (words)."""
    return len(text.split())


SHAPE = GraphShape(
    forward_calls=2,
    prompt_texts=("Summarize the message.", "Classify the summary."),
    parameters=("Summarize the message.", "Classify the summary."),
    inputs=("one two three four",),
    judge_calls=1,
    judge_texts=("Is the label right?",),
)


def test_calls_follow_afnios_rules_when_every_sample_fails() -> None:
    run = estimate(
        SHAPE,
        n_train=10,
        n_val=5,
        epochs=2,
        batch_size=4,  # batches of 4, 4, 2
        validate_first=True,
        assumptions=Assumptions(failure_rate=1.0),
    )
    phases = {name: p.calls for name, p in run.by_phase.items()}
    assert phases == {
        "forward": 2 * (2 * 10 + 3 * 5),  # 2 calls per sample, 3 validation passes
        "evaluator": 2 * 10 + 3 * 5,  # one judge call per sample
        # one chat backward per failed sample and LM call, one evaluator-backward
        # group per batch (at most 8 failed samples each)
        "backward": 2 * 20 + 2 * 3,
        "optimizer": 2 * 6,  # 2 parameters x 6 steps
    }
    assert run.calls == sum(phases.values())


def test_no_failures_means_no_backward_and_no_optimizer_calls() -> None:
    run = estimate(
        SHAPE, n_train=10, epochs=3, assumptions=Assumptions(failure_rate=0.0)
    )
    assert set(run.by_phase) == {"forward", "evaluator"}


def test_groups_and_metric_feedback_change_the_evaluator_backward_calls() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    every = Assumptions(failure_rate=1.0)
    grouped = estimate(shape, n_train=32, batch_size=32, assumptions=every)
    assert grouped.by_phase["backward"].calls == 32 + 4  # 32 chat, 4 groups of 8
    single = estimate(
        shape,
        n_train=32,
        batch_size=32,
        assumptions=Assumptions(failure_rate=1.0, samples_per_call=1),
    )
    assert single.by_phase["backward"].calls == 32 + 32
    metric = GraphShape(1, ("Classify.",), ("Classify.",), evaluator_feedback=False)
    assert (
        estimate(metric, n_train=32, batch_size=32, assumptions=every)
        .by_phase["backward"]
        .calls
        == 32
    )


def test_a_partial_failure_rate_counts_batches_with_a_failure() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    run = estimate(
        shape, n_train=80, batch_size=8, assumptions=Assumptions(failure_rate=0.25)
    )
    # 10 steps; a step has an optimizer call when any of its 8 samples fails
    assert run.by_phase["optimizer"].calls == round(10 * (1 - 0.75**8))
    # 20 chat backward calls + 1 evaluator-backward group per batch with a failure
    assert run.by_phase["backward"].calls == round(20 + 10 * (1 - 0.75**8))


def test_forward_tokens_are_the_prompt_and_input_sizes_plus_message_overhead() -> None:
    shape = GraphShape(
        1,
        ("Classify the sentiment.", "{message}"),
        ("Classify the sentiment.",),
        inputs=("a b c d e", "a b c"),  # 4 words on average
    )
    run = estimate(
        shape,
        n_train=10,
        n_val=10,
        assumptions=Assumptions(failure_rate=0.0, answer_tokens=2),
        tokenizer=words,
    )
    forward = run.by_phase["forward"]
    assert forward.prompt_tokens == 20 * (3 + 1 + 4 + 2 * 3)
    assert forward.completion_tokens == 20 * 2


def test_parameters_grow_with_feedback_up_to_the_cap() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    capped = Assumptions(
        failure_rate=1.0, growth_per_failure_tokens=10, max_growth_tokens=30
    )
    run = estimate(shape, n_train=8, epochs=5, batch_size=8, assumptions=capped)
    # the answers (new values) are the parameter plus min(80 u, 30) for u = 1..5
    base = approx_tokens("Classify.")
    assert run.by_phase["optimizer"].completion_tokens == 5 * (base + 30)
    flat = Assumptions(failure_rate=1.0, growth_per_failure_tokens=0)
    fixed = estimate(shape, n_train=8, epochs=5, batch_size=8, assumptions=flat)
    assert (
        fixed.by_phase["forward"].prompt_tokens < run.by_phase["forward"].prompt_tokens
    )


def test_cost_uses_each_phases_price_and_lists_unpriced_phases() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    priced = estimate(shape, n_train=16, batch_size=8, models="gpt-4o-mini")
    assert priced.cost > 0 and priced.unpriced == ()
    mixed = estimate(
        shape,
        n_train=16,
        batch_size=8,
        models={"forward": "gpt-4o-mini", "backward": "no-such-model-9"},
    )
    assert mixed.by_phase["forward"].cost > 0
    assert mixed.by_phase["backward"].cost == mixed.by_phase["optimizer"].cost == 0
    assert mixed.unpriced == (
        "backward (no-such-model-9)",
        "optimizer (no-such-model-9)",
    )
    assert "no price" in str(mixed) and "assuming 50% of samples fail" in str(mixed)
    unpriced = estimate(shape, n_train=16, batch_size=8)
    assert unpriced.cost == 0 and len(unpriced.unpriced) == 3


def test_bad_arguments_say_which_and_how_to_fix() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        estimate(shape, n_train=10, batch_size=0)
    with pytest.raises(ValueError, match="`n_train` must be an int >= 1"):
        estimate(shape, n_train=0)
    with pytest.raises(ValueError, match="unknown phases \\['fwd'\\]"):
        estimate(shape, n_train=10, models={"fwd": "gpt-4o"})
    with pytest.raises(ValueError, match="`failure_rate` must be between 0 and 1"):
        Assumptions(failure_rate=1.5)
    with pytest.raises(ValueError, match="`forward_calls` must be an int >= 1"):
        GraphShape(0, ("x",), ("x",))
    with pytest.raises(ValueError, match="nothing to optimize"):
        GraphShape(1, ("x",), ())
    with pytest.raises(TypeError, match="`inputs` must be a tuple of str"):
        GraphShape(1, ("x",), ("x",), inputs="abc")
    with pytest.raises(ValueError, match="`judge_texts` must be given"):
        GraphShape(1, ("x",), ("x",), judge_calls=1)


def test_growth_is_solved_back_from_its_mean() -> None:
    g = _solve_growth(mean=50.0, updates=5, per_update=2.0, cap=90)
    assert sum(min(u * g * 2.0, 90) for u in range(1, 6)) / 5 == pytest.approx(
        50, abs=0.01
    )
    assert _solve_growth(mean=0.0, updates=5, per_update=2.0, cap=90) == 0.0


def test_assumptions_from_a_pilots_rows() -> None:
    shape = GraphShape(1, ("abc " * 10,), ("abc " * 10,))
    rows = [
        PhaseRow("forward", "m", 100, 10_000, 200, 0.0),
        # 20 failed samples: 20 chat-backward texts + 20 evaluator texts of 30 words
        PhaseRow("backward", "m", 23, 9_000, 1200, 0.0),
        PhaseRow("optimizer", "m", 4, 2_000, 4 * 40, 0.0),
    ]
    a = Assumptions.from_rows(
        rows,
        shape=shape,
        train_samples=80,
        failure_rate=0.25,
        final_parameters=["abc " * 50],
        tokenizer=words,
        feedback_tokens=45,  # an override wins
    )
    assert a.failure_rate == 0.25 and a.answer_tokens == 2
    assert a.feedback_tokens == 45
    assert a.max_growth_tokens == 40
    assert a.growth_per_failure_tokens > 0


def test_trainer_estimate_reads_the_agents_shape_and_the_loaders() -> None:
    agent = SentimentClassifier(None, SIMULATOR_MODEL, START_PROMPT)  # no client
    dataset = [(afnio.Variable(f"message {i} " * 20), "neutral") for i in range(20)]
    shape = GraphShape.of_module(agent, dataset)
    assert shape.forward_calls == 1 and shape.judge_calls == 0
    assert shape.parameters == (START_PROMPT,)
    assert shape.prompt_texts == (START_PROMPT, "{message}")
    assert shape.inputs[0] == "message 0 " * 20
    run = Trainer(max_epochs=2).estimate(
        agent,
        DataLoader(dataset, batch_size=8),
        DataLoader(dataset, batch_size=20),
        models="gpt-4o-mini",
    )
    assert run.by_phase["forward"].calls == 2 * 20 + 2 * 20
    assert run.cost > 0
    with pytest.raises(TypeError, match="`train_dataloader` must be a DataLoader"):
        Trainer().estimate(agent, [1, 2, 3])

    class NoLM(cog.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt = cog.Parameter("x", role="prompt")

    with pytest.raises(ValueError, match="no ChatCompletion submodule"):
        Trainer().estimate(NoLM(), DataLoader(dataset, batch_size=8))


@needs_dataset
@pytest.mark.parametrize("mode", ["upstream", "cheap"])
def test_assumptions_tuned_on_a_pilot_estimate_other_runs_within_20_percent(
    mode: str,
) -> None:
    # benchmarks/estimate_accuracy.py: a batch-16, 1-epoch pilot tunes the
    # assumptions; each other run is estimated by trainer.estimate (which must make
    # no request) before it runs, then measured; pilot, estimate and runs all in
    # afnio.backward_options(mode)
    for row in estimate_accuracy.measure([(8, 3), (4, 2)], SHARED_DATASET, mode):
        assert row["assumed"] == resolve_backward_options(mode)
        report = (
            f"{mode}: batch {row['batch']} x {row['epochs']} epochs: estimated "
            f"{row['estimated_calls']} calls / {row['estimated_tokens']} tokens / "
            f"${row['estimated_cost']:.4f}, measured {row['measured_calls']} / "
            f"{row['measured_tokens']} / ${row['measured_cost']:.4f}"
        )
        print(report)
        for what in ("calls", "tokens", "cost"):
            measured = row[f"measured_{what}"]
            assert abs(row[f"estimated_{what}"] - measured) <= 0.2 * measured, report
        # the backward phase alone (what the mode changes), estimated at the run's
        # own failure rate: the step model's calls and prompt sizes, without the
        # error of the failure-rate assumption
        for what in ("calls", "tokens"):
            measured = row[f"measured_backward_{what}"]
            at_rate = row[f"at_rate_backward_{what}"]
            assert abs(at_rate - measured) <= 0.2 * measured, (what, at_rate, report)


def test_large_batches_do_not_overflow() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    for rate in (0.01, 0.5, 1.0):
        run = estimate(
            shape,
            n_train=2000,
            batch_size=2000,
            assumptions=Assumptions(failure_rate=rate),
        )
        assert (
            run.by_phase["backward"].calls
            == round(2000 * rate + math.ceil(2000 * rate / 8))
            or rate == 0.01
        )  # 0.01: the groups are a distribution, not a count
        assert run.by_phase["optimizer"].calls == 1


def test_per_step_validation_momentum_and_constraints_are_counted() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    every = Assumptions(failure_rate=1.0)
    base = estimate(shape, n_train=40, n_val=10, batch_size=8, assumptions=every)
    gated = estimate(
        shape,
        n_train=40,
        n_val=10,
        batch_size=8,
        validate_every_step=True,
        assumptions=every,
    )
    # 5 steps, each followed by a validation of 10 samples
    assert gated.by_phase["forward"].calls == base.by_phase["forward"].calls + 5 * 10
    richer = estimate(
        shape,
        n_train=40,
        batch_size=8,
        momentum=2,
        constraints=["Do not use the character x."],
        assumptions=every,
    )
    plain = estimate(shape, n_train=40, batch_size=8, assumptions=every)
    assert (
        richer.by_phase["optimizer"].prompt_tokens
        > plain.by_phase["optimizer"].prompt_tokens
    )


def test_feedback_is_counted_per_distinct_text_not_capped() -> None:
    shape = GraphShape(1, ("Classify.",), ("Classify.",))
    a = Assumptions(failure_rate=1.0, feedback_tokens=60)
    small = estimate(shape, n_train=4, batch_size=4, assumptions=a)
    large = estimate(shape, n_train=64, batch_size=64, assumptions=a)
    # 64 feedback texts of 60 tokens reach the one optimizer prompt
    assert large.by_phase["optimizer"].prompt_tokens > 64 * 60
    assert small.by_phase["optimizer"].prompt_tokens < 4 * 60 + 400


def test_texts_inside_messages_and_judge_explanations_cost_tokens() -> None:
    prompt = "Classify the sentiment of the customer message. " * 4
    inside = GraphShape(1, (prompt,), (prompt,), parameters_are_messages=False)
    whole = GraphShape(1, (prompt,), (prompt,))
    a = Assumptions(failure_rate=1.0)
    assert (
        estimate(inside, n_train=8, batch_size=8, assumptions=a)
        .by_phase["backward"]
        .prompt_tokens
        > estimate(whole, n_train=8, batch_size=8, assumptions=a)
        .by_phase["backward"]
        .prompt_tokens
    )
    judged = GraphShape(1, (prompt,), (prompt,), judge_calls=1, judge_texts=("Judge.",))
    assert (
        estimate(judged, n_train=8, batch_size=8, assumptions=a)
        .by_phase["backward"]
        .prompt_tokens
        > estimate(whole, n_train=8, batch_size=8, assumptions=a)
        .by_phase["backward"]
        .prompt_tokens
    )


def test_wrong_types_are_named() -> None:
    with pytest.raises(TypeError, match="`failure_rate` must be a number"):
        Assumptions(failure_rate="0.5")
    with pytest.raises(TypeError, match="`samples_per_call` must be an int"):
        Assumptions(samples_per_call=2.5)
    with pytest.raises(ValueError, match="`forward_calls` must be an int >= 1"):
        GraphShape(1.5, ("x",), ("x",))
    with pytest.raises(TypeError, match="`shape` must be a GraphShape"):
        estimate("shape", n_train=1)
    with pytest.raises(TypeError, match="`agent` must be an afnio Module"):
        Trainer().estimate("agent", DataLoader([1], batch_size=1))
