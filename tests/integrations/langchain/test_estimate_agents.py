"""``estimate`` on a ``create_agent`` agent: the agent's texts are its trainable
Parameters, each input costs two model calls (a tool turn and the answer), and nothing
is called; in the cheap mode each model call's requests are grouped per batch."""

from __future__ import annotations

import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")

from langchain.agents import create_agent
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from afnio.autodiff.options import CHEAP
from afnio.trainer.estimate import Assumptions
from afnio_integrations.langchain import estimate


@tool
def repairs(request: str) -> str:
    """Send a technician to fix broken equipment."""
    return "A technician is on the way."


@tool
def cleaning(request: str) -> str:
    """Send a cleaner."""
    return "A cleaner is on the way."


def _agent() -> object:
    # an unreachable base URL: any LM call would fail the test
    llm = ChatOpenAI(
        model="gpt-4o-mini", base_url="http://127.0.0.1:9", api_key="x", max_retries=0
    )
    return create_agent(
        llm, tools=[repairs, cleaning], system_prompt="You route facility requests."
    )


ROWS = [("Mop the lobby", "cleaning"), ("The boiler is broken", "repairs")] * 5


def test_estimate_counts_two_model_calls_per_agent_input_and_calls_nothing() -> None:
    one_epoch = estimate(_agent(), ROWS, epochs=1, batch_size=10, models="gpt-4o-mini")
    # the first validation, the epoch and its validation: 3 passes over the rows,
    # 2 model calls each
    assert one_epoch.by_phase["forward"].calls == 3 * 2 * len(ROWS)
    assert one_epoch.cost > 0


def test_estimate_sizes_the_agent_texts_and_explicit_forward_calls() -> None:
    small = estimate(_agent(), ROWS, epochs=1, models="gpt-4o-mini")
    more = estimate(_agent(), ROWS, epochs=1, models="gpt-4o-mini", forward_calls=4)
    assert more.by_phase["forward"].calls == 2 * small.by_phase["forward"].calls
    only_system = estimate(_agent(), ROWS, epochs=1, select="system", models="x")
    with_tools = estimate(_agent(), ROWS, epochs=1, models="x")
    # the tool descriptions are trainable by default: more optimizer calls
    assert (
        with_tools.by_phase["optimizer"].calls > only_system.by_phase["optimizer"].calls
    )


def test_cheap_estimate_groups_each_model_call_of_the_agent_per_batch() -> None:
    every = Assumptions(failure_rate=1.0)
    kwargs = {"epochs": 1, "batch_size": 10, "assumptions": every, "models": "x"}
    cheap = estimate(_agent(), ROWS, **kwargs)
    upstream = estimate(_agent(), ROWS, backward="upstream", **kwargs)
    # 10 failed inputs x 2 model calls: the tool turns' 10 requests in ceil(10 / 8)
    # grouped calls, the answers' 10 (whose conversation holds the tool turn, a
    # variable of their own) in 2 more; upstream: 20 chat-backward calls and 2
    # evaluator-backward groups
    assert cheap.by_phase["backward"].calls == 2 * 2
    assert upstream.by_phase["backward"].calls == 20 + 2
    assert cheap.backward == CHEAP
