"""optimize(): a LangChain chain improved end to end on the live simulator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from afnio import functional as F
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer.estimate import Assumptions
from afnio_integrations.langchain import estimate, optimize
from benchmarks.common import simulated
from tests.integrations.langchain._chains import (
    CLASSIFY,
    TRAINSET,
    exact,
    run_without_afnio,
    sentiment_prompt,
    sim_chat,
)


@dataclass
class Classifier:
    """A sentiment chain on a live simulator, afnio's backward client set on it."""

    sim: Simulator
    prompt: ChatPromptTemplate
    chain: Any
    trainset: list[tuple[dict[str, str], str]]


@pytest.fixture
def classifier() -> Iterator[Classifier]:
    with simulated() as (sim, _):
        prompt = sentiment_prompt()
        chain = prompt | sim_chat(sim) | StrOutputParser()
        yield Classifier(sim, prompt, chain, list(TRAINSET))


@pytest.mark.parametrize("metric", [exact, F.exact_match_evaluator])
def test_optimize_improves_the_users_chain_and_reports(
    metric: object, classifier: Classifier
) -> None:
    sim, prompt, chain = classifier.sim, classifier.prompt, classifier.chain
    trainset = classifier.trainset
    returned, report = optimize(
        chain,
        trainset,
        metric,
        epochs=2,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert returned is chain
    assert report.score_before == 0.25 and report.score_after == 1.0
    assert report.prompts_before == {"prompt0.system0": CLASSIFY}
    new = prompt.messages[0].prompt.template
    assert report.prompts_after == {"prompt0.system0": new} and new != CLASSIFY
    assert "+" + new in report.prompt_diff
    assert report.calls == sim.stats.calls  # the chain's calls and afnio's
    assert sum(r.calls for r in report.phases) == sim.stats.calls
    assert report.tokens > 0 and report.cost > 0
    assert chain.invoke({"message": "Awful again."}) == "negative"
    assert "score before: 0.250  after: 1.000" in str(report)


def test_max_cost_counts_the_chains_own_calls_and_holds(
    classifier: Classifier,
) -> None:
    budget = 0.003
    _, report = optimize(
        classifier.chain,
        classifier.trainset,
        exact,
        epochs=5,
        batch_size=2,
        max_cost=budget,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert report.stopped_reason and "max_cost" in report.stopped_reason
    assert report.cost <= budget
    chain_cost = sum(r.cost for r in report.phases if r.phase == "forward")
    assert chain_cost > 0  # the chain's own calls were counted


def test_estimate_spends_nothing_and_counts_what_optimize_calls(
    classifier: Classifier,
) -> None:
    sim, chain, trainset = classifier.sim, classifier.chain, classifier.trainset
    words = lambda text: len(text.split())  # noqa: E731 (the simulator's tokens)
    run = estimate(
        chain,
        trainset,
        epochs=2,
        batch_size=4,
        # the simulator answers one word and writes one 12-word rule per failure
        assumptions=Assumptions(
            failure_rate=0.75 / 2, answer_tokens=1, growth_per_failure_tokens=12
        ),
        tokenizer=words,
    )
    assert sim.stats.calls == 0  # a dry run: no request
    assert run.unpriced == ("backward (no model)", "optimizer (no model)")
    assert run.by_phase["forward"].cost > 0  # the chain's own model is priced
    _, report = optimize(
        chain,
        trainset,
        exact,
        epochs=2,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    measured = {r.phase: r for r in report.phases}
    # every forward call is counted exactly: 2 epochs x 8 + 3 validations x 8
    assert run.by_phase["forward"].calls == measured["forward"].calls == 40
    forward_tokens = measured["forward"].prompt_tokens
    assert abs(run.by_phase["forward"].prompt_tokens - forward_tokens) <= (
        0.2 * forward_tokens
    )
    assert abs(run.calls - report.calls) <= 0.2 * report.calls
    # metric feedback spares the evaluator-backward calls of upstream's mode (the
    # cheap default makes none either way)
    feedback = estimate(
        chain, trainset, metric_feedback=True, batch_size=8, backward="upstream"
    )
    plain = estimate(chain, trainset, batch_size=8, backward="upstream")
    assert feedback.by_phase["backward"].calls < plain.by_phase["backward"].calls
    with pytest.raises(ValueError, match="nothing to optimize"):
        estimate(chain, trainset, select="ai")
    with pytest.raises(TypeError, match=r"`trainset\[0\]` is a dict .*one key"):
        estimate(chain, [{"message": "hi"}])
    gated = estimate(chain, trainset, batch_size=4, revert_on_regression=True)
    # a validation of the 8 samples after each of the 2 steps per epoch, 3 epochs
    assert gated.by_phase["forward"].calls == plain.by_phase["forward"].calls + 6 * 8


def test_optimize_rejects_an_empty_trainset() -> None:
    with pytest.raises(ValueError, match="`trainset` is empty"):
        optimize(sentiment_prompt(), [], exact)


LOADER = """
import json, sys
from langchain_core.load import loads

chain = loads(open(sys.argv[1]).read(), secrets_from_env=True,
              valid_namespaces=["langchain_openai"], allowed_objects="all")
print(json.dumps(chain.invoke({"message": "Awful service again."})))
"""


def test_the_saved_chain_runs_where_afnio_cannot_be_imported(
    tmp_path: Path, classifier: Classifier
) -> None:
    sim, prompt, chain = classifier.sim, classifier.prompt, classifier.chain
    trainset = classifier.trainset
    optimize(
        chain,
        trainset,
        exact,
        epochs=2,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    from afnio_integrations.langchain import trace

    saved = tmp_path / "chain.json"
    trace(chain).save_chain(saved)
    assert "sk-" not in saved.read_text()  # keys are env references, not values
    sim.reset_stats()
    assert run_without_afnio(LOADER, saved, "sk-from-env") == "negative"
    sent = sim.requests[-1]["messages"][0]["content"]
    assert sent == prompt.messages[0].prompt.template and sent != CLASSIFY


def exact_with_feedback(prediction: str, target: str) -> tuple[int, str]:
    if prediction.strip() == target:
        return 1, ""
    return (
        0,
        f'The prediction "{prediction}" is wrong: the expected value is "{target}".',
    )


def test_a_metrics_textual_feedback_is_used_as_the_gradient(
    classifier: Classifier,
) -> None:
    sim, chain, trainset = classifier.sim, classifier.chain, classifier.trainset
    _, report = optimize(
        chain,
        trainset,
        exact_with_feedback,
        epochs=2,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert report.score_after == 1.0
    # no evaluator-backward call was made: the metric wrote the feedback
    evaluator_calls = [
        r
        for r in sim.requests
        if "<EVALUATION" in str(r.get("messages", [{}])[-1].get("content", ""))
    ]
    assert evaluator_calls == []
