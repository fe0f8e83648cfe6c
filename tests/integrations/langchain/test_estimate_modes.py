"""``estimate(chain, ...)`` models the backward mode ``optimize`` runs in (issue 23):
``backward="cheap"`` by default as for ``optimize``; the estimate says which mode it
assumed, and comes within 20% of ``optimize``'s measured calls and tokens in both
modes (live simulator, no LM call by the estimate)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser

from afnio.autodiff.options import CHEAP, UPSTREAM
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer.estimate import Assumptions
from afnio_integrations.langchain import estimate, optimize
from benchmarks.common import simulated
from benchmarks.resume_kills import MESSAGES
from tests.integrations.langchain._chains import (
    TRAINSET,
    exact,
    sentiment_prompt,
    sim_chat,
)

ROWS = [({"message": m}, t) for m, t in MESSAGES]  # 12 rows


def words(text: str) -> int:
    return len(text.split())  # the simulator's tokens


def test_estimate_assumes_optimizes_default_cheap_mode_and_says_so() -> None:
    chain = sentiment_prompt()  # never called: an estimate makes no LM call
    every = Assumptions(failure_rate=1.0)
    kwargs = {"epochs": 1, "batch_size": 4, "assumptions": every}
    cheap = estimate(chain, TRAINSET, **kwargs)
    upstream = estimate(chain, TRAINSET, backward="upstream", **kwargs)
    assert cheap.backward == CHEAP and upstream.backward == UPSTREAM
    assert "backward mode: cheap (direct evaluator feedback" in str(cheap)
    # 8 rows in 2 batches of 4, every row failing: one grouped call per batch,
    # against 8 chat-backward calls and 2 evaluator-backward groups
    assert cheap.by_phase["backward"].calls == 2
    assert upstream.by_phase["backward"].calls == 8 + 2
    # a metric's own feedback: no evaluator-backward call in either mode
    metric = {"metric_feedback": True, **kwargs}
    assert estimate(chain, TRAINSET, **metric).by_phase["backward"].calls == 2
    assert (
        estimate(chain, TRAINSET, backward="upstream", **metric)
        .by_phase["backward"]
        .calls
        == 8
    )
    with pytest.raises(ValueError, match="`backward` must be"):
        estimate(chain, TRAINSET, backward="fastest")


@pytest.mark.parametrize("mode", ["upstream", "cheap"])
def test_estimate_comes_within_20_percent_of_optimize_in_each_mode(mode: str) -> None:
    with simulated() as (sim, _):
        chain = sentiment_prompt() | sim_chat(sim) | StrOutputParser()
        run = estimate(
            chain,
            ROWS,
            epochs=2,
            batch_size=8,
            backward=mode,
            tokenizer=words,
            # the simulator answers one word and writes one short rule per failure
            assumptions=Assumptions(
                failure_rate=0.3,
                answer_tokens=1,
                feedback_tokens=25,
                growth_per_failure_tokens=12,
            ),
        )
        assert sim.stats.calls == 0  # a dry run
        _, report = optimize(
            chain,
            ROWS,
            exact,
            epochs=2,
            batch_size=8,
            progress=False,
            model=SIMULATOR_MODEL,
            backward=mode,
        )
    estimated = run.prompt_tokens + run.completion_tokens
    text = f"{mode}: estimated {run.calls} / {estimated}, measured "
    text += f"{report.calls} / {report.tokens}"
    print(text)
    assert abs(run.calls - report.calls) <= 0.2 * report.calls, text
    assert abs(estimated - report.tokens) <= 0.2 * report.tokens, text
    measured = {r.phase: r.calls for r in report.phases}
    if mode == "cheap":  # one grouped call per batch with a failure, at most
        assert run.by_phase["backward"].calls <= 2 * 2
        assert measured["backward"] <= 2 * 2
