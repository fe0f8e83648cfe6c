"""The dry-run estimate models the backward options (issue 23): direct evaluator
feedback (no evaluator-backward call for a deterministic evaluator, its own text as
the feedback shown) and grouped chat backward (per template ``ceil(k / n)`` calls,
sized on the grouped prompt); it reads the active options when it runs and says
which it assumed."""

from __future__ import annotations

import math

import pytest

import afnio
from afnio.autodiff.lm_backward import split_evenly
from afnio.autodiff.options import CHEAP, UPSTREAM, BackwardOptions
from afnio.models.phases import PhaseRow
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.trainer.estimate import Assumptions, GraphShape, estimate
from afnio.utils.data import DataLoader
from examples.facility_support import START_PROMPT, SentimentClassifier

PROMPT = "Classify the sentiment of the customer message. " * 4
ONE = GraphShape(1, (PROMPT, "{message}"), (PROMPT,), inputs=("word " * 150,))
EVERY = Assumptions(failure_rate=1.0)


def words(text: str) -> int:
    return len(text.split())


def backward_calls(shape: GraphShape, options: object, **kwargs: object) -> int:
    run = estimate(shape, backward=options, **kwargs)  # type: ignore[arg-type]
    return run.by_phase["backward"].calls


def test_cheap_mode_makes_one_call_per_group_and_no_evaluator_backward() -> None:
    # batch 32, every sample fails: upstream 32 chat + 4 evaluator groups of 8;
    # cheap: ceil(32 / 8) grouped chat calls, no evaluator-backward call
    kwargs = {"n_train": 32, "batch_size": 32, "assumptions": EVERY}
    assert backward_calls(ONE, "upstream", **kwargs) == 32 + 4
    assert backward_calls(ONE, "cheap", **kwargs) == 4
    # each option on its own
    direct = BackwardOptions(evaluator_feedback="direct")
    assert backward_calls(ONE, direct, **kwargs) == 32
    grouped = BackwardOptions(chat_samples_per_call=8)
    assert backward_calls(ONE, grouped, **kwargs) == 4 + 4


def test_grouped_calls_follow_split_evenly_over_the_failed_samples() -> None:
    # 19 failed of 32 (the benchmark's step): ceil(19 / 8) = 3 calls of 7, 6, 6
    run = estimate(
        ONE,
        n_train=19,
        batch_size=19,
        assumptions=EVERY,
        backward="cheap",
        tokenizer=words,
    )
    assert run.by_phase["backward"].calls == len(split_evenly(19, 8)) == 3
    # the answers hold one feedback text per sample
    assert run.by_phase["backward"].completion_tokens == 19 * EVERY.feedback_tokens
    every_batch = estimate(
        ONE, n_train=40, batch_size=4, assumptions=EVERY, backward="cheap"
    )
    assert every_batch.by_phase["backward"].calls == 10  # one group per batch of 4


def test_a_partial_failure_rate_counts_expected_groups_per_batch() -> None:
    p = 0.25
    run = estimate(
        ONE,
        n_train=160,
        batch_size=16,
        assumptions=Assumptions(failure_rate=p),
        backward="cheap",
    )
    groups = sum(
        math.comb(16, k) * p**k * (1 - p) ** (16 - k) * math.ceil(k / 8)
        for k in range(17)
    )
    assert run.by_phase["backward"].calls == round(10 * groups)


def test_grouped_calls_are_counted_per_template() -> None:
    two = GraphShape(2, ("Summarize.", "Classify."), ("Summarize.", "Classify."))
    kwargs = {"n_train": 16, "batch_size": 16, "assumptions": EVERY}
    # two templates: each its own 2 groups of 8
    assert backward_calls(two, "cheap", **kwargs) == 2 * 2
    # one template used twice per sample (an agent's tool turn and answer): its
    # 32 requests share calls
    agent = GraphShape(2, ("Route.",), ("Route.",), templates=1)
    assert backward_calls(agent, "cheap", **kwargs) == 4
    assert backward_calls(agent, "upstream", **kwargs) == 32 + 2
    with pytest.raises(ValueError, match="`templates` \\(3\\) must be <= "):
        GraphShape(2, ("x",), ("x",), templates=3)
    with pytest.raises(ValueError, match="`templates` must be an int >= 1"):
        GraphShape(2, ("x",), ("x",), templates=0)


def test_an_lm_judge_keeps_its_evaluator_backward_and_metric_feedback_has_none() -> (
    None
):
    judged = GraphShape(1, (PROMPT,), (PROMPT,), judge_calls=1, judge_texts=("J",))
    kwargs = {"n_train": 16, "batch_size": 16, "assumptions": EVERY}
    # the judge's LM feedback stays: 2 grouped chat calls + 2 evaluator groups
    assert backward_calls(judged, "cheap", **kwargs) == 2 + 2
    metric = GraphShape(1, (PROMPT,), (PROMPT,), evaluator_feedback=False)
    assert backward_calls(metric, "upstream", **kwargs) == 16
    assert backward_calls(metric, "cheap", **kwargs) == 2


def test_direct_feedback_is_the_feedback_the_chat_backward_shows() -> None:
    def chat_prompt_tokens(options: object, feedback: int) -> int:
        a = Assumptions(failure_rate=1.0, feedback_tokens=feedback)
        shape = GraphShape(1, (PROMPT,), (PROMPT,), evaluator_feedback=False)
        if options == "direct":
            shape = ONE
        run = estimate(
            shape,
            n_train=1,
            batch_size=1,
            assumptions=a,
            backward=BackwardOptions(evaluator_feedback="direct"),
            tokenizer=words,
        )
        return run.by_phase["backward"].prompt_tokens

    # the direct text's size does not follow the LM-written feedback's length...
    assert chat_prompt_tokens("direct", 10) == chat_prompt_tokens("direct", 500)
    # ...a metric's own feedback (shown as it is) does
    assert chat_prompt_tokens("metric", 500) > chat_prompt_tokens("metric", 10) + 400


def test_a_grouped_call_shows_the_shared_system_prompt_once() -> None:
    single = estimate(
        ONE,
        n_train=8,
        batch_size=8,
        assumptions=EVERY,
        backward=BackwardOptions("direct", 1),
        tokenizer=words,
    )
    grouped = estimate(
        ONE,
        n_train=8,
        batch_size=8,
        assumptions=EVERY,
        backward=CHEAP,
        tokenizer=words,
    )
    one_call = grouped.by_phase["backward"]
    per_sample = single.by_phase["backward"]
    assert one_call.calls == 1 and per_sample.calls == 8
    # 8 single calls repeat the instructions and the 32-word system prompt 8 times
    # and each sample's 150-word message once; the grouped call sends the message
    # 8 times too, the rest once
    saved = per_sample.prompt_tokens - one_call.prompt_tokens
    assert saved > 7 * words(PROMPT)
    assert one_call.prompt_tokens > 8 * 150


def test_the_estimate_reads_the_active_options_and_says_which_it_assumed() -> None:
    shape = GraphShape(1, (PROMPT,), (PROMPT,))
    outside = estimate(shape, n_train=16, batch_size=8)
    assert outside.backward == UPSTREAM
    with afnio.backward_options("cheap"):
        inside = estimate(shape, n_train=16, batch_size=8)
        explicit = estimate(shape, n_train=16, batch_size=8, backward="upstream")
    assert inside.backward == CHEAP
    assert inside == estimate(shape, n_train=16, batch_size=8, backward=CHEAP)
    assert explicit == outside
    assert "backward mode: cheap (direct evaluator feedback, up to 8 samples" in str(
        inside
    )
    assert "backward mode: upstream (LM-written evaluator feedback" in str(outside)
    custom = estimate(shape, n_train=16, backward=BackwardOptions("lm", 4))
    assert "backward mode: custom (LM-written evaluator feedback, up to 4" in str(
        custom
    )
    with pytest.raises(ValueError, match="`backward` must be"):
        estimate(shape, n_train=16, backward="cheapest")
    with pytest.raises(TypeError, match="`backward` must be"):
        estimate(shape, n_train=16, backward=8)


def test_trainer_estimate_models_the_options_it_runs_in() -> None:
    agent = SentimentClassifier(None, SIMULATOR_MODEL, START_PROMPT)  # no client
    dataset = [(afnio.Variable(f"message {i} " * 20), "neutral") for i in range(32)]
    loader = DataLoader(dataset, batch_size=32)
    every = Assumptions(failure_rate=1.0)
    upstream = Trainer(max_epochs=1).estimate(agent, loader, assumptions=every)
    with afnio.backward_options("cheap"):
        cheap = Trainer(max_epochs=1).estimate(agent, loader, assumptions=every)
    assert upstream.by_phase["backward"].calls == 32 + 4
    assert cheap.by_phase["backward"].calls == 4
    assert cheap.backward == CHEAP and upstream.backward == UPSTREAM
    assert cheap.by_phase["backward"].prompt_tokens < (
        upstream.by_phase["backward"].prompt_tokens / 2
    )


def test_assumptions_from_a_direct_mode_pilot_count_only_chat_backward_texts() -> None:
    shape = GraphShape(1, ("abc " * 10,), ("abc " * 10,))
    rows = [
        PhaseRow("forward", "m", 100, 10_000, 200, 0.0),
        PhaseRow("backward", "m", 3, 9_000, 1200, 0.0),  # 20 failed samples
        PhaseRow("optimizer", "m", 4, 2_000, 160, 0.0),
    ]
    common = {"shape": shape, "train_samples": 80, "failure_rate": 0.25}
    # upstream: 20 chat-backward and 20 evaluator texts; direct: 20 chat texts
    assert Assumptions.from_rows(rows, **common).feedback_tokens == 30
    assert Assumptions.from_rows(rows, backward="cheap", **common).feedback_tokens == 60
    with afnio.backward_options("cheap"):
        assert Assumptions.from_rows(rows, **common).feedback_tokens == 60
