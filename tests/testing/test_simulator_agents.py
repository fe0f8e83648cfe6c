"""A LangChain agent (``langchain.agents.create_agent``, on LangGraph) runs against the
simulator's tool calling as written in LangChain's docs: rules in the system prompt and
in the tools' docstrings route each message to no, one or several tools, every tool
call gets its result, and the loop ends with a final answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from afnio.testing import SIMULATOR_MODEL, Simulator

SYSTEM = (
    "You route facility requests. "
    'If the message begins with "mop", call cleaning. '
    'If the message mentions "flood", call cleaning and repairs.'
)


@tool
def repairs(request: str) -> str:
    """Fix broken equipment. Use this tool when the message mentions "broken"."""
    return "A technician is on the way."


@tool
def cleaning(request: str) -> str:
    """Send a cleaner."""
    return "A cleaner is on the way."


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order by its id."""
    return "Order shipped."


def _agent(sim: Simulator, **model_args: Any) -> Any:
    llm = ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=sim.base_url,
        api_key="sk-test",
        max_retries=0,
        **model_args,
    )
    return create_agent(
        llm, tools=[repairs, cleaning, lookup_order], system_prompt=SYSTEM
    )


def _trajectory(messages: list[Any]) -> list[list[str]]:
    """The tools each model turn called, in order (the last turn calls none)."""
    return [
        [call["name"] for call in m.tool_calls]
        for m in messages
        if isinstance(m, AIMessage)
    ]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Mop the lobby floor please.", [["cleaning"], []]),
        ("The printer is broken.", [["repairs"], []]),
        ("A flood in the basement!", [["cleaning", "repairs"], []]),
        ("What are the opening hours?", [[]]),
    ],
)
def test_an_agent_calls_the_routed_tools_and_ends(
    message: str, expected: list[list[str]]
) -> None:
    with Simulator() as sim:
        state = _agent(sim).invoke({"messages": [{"role": "user", "content": message}]})
    messages = state["messages"]
    assert _trajectory(messages) == expected
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(results) == sum(len(turn) for turn in expected)  # each call answered
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls
    assert messages[-1].content  # a final answer


def test_an_agent_streams_and_runs_async() -> None:
    with Simulator() as sim:
        agent = _agent(sim, streaming=True)
        request = {"messages": [{"role": "user", "content": "A flood upstairs."}]}
        updates = list(agent.stream(request, stream_mode="updates"))
        state = asyncio.run(agent.ainvoke(request))
    # two parallel calls: each runs as its own tools step
    assert [next(iter(u)) for u in updates] == ["model", "tools", "tools", "model"]
    assert _trajectory(state["messages"]) == [["cleaning", "repairs"], []]
