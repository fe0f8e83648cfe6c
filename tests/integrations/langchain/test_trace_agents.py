"""Tracing ``langchain.agents.create_agent`` agents (issue 19, items 2 and 4): the
system prompt and the tools' (argument) descriptions are Parameters, feedback on the
final answer reaches those of the model calls that made it, and after an optimizer
step the *same* agent object sends the new texts (checked on the request bodies the
cassettes hold). LM calls replay cassettes recorded against the simulator."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, dynamic_prompt, wrap_model_call
from langchain_core.messages import SystemMessage
from langchain_core.tools import BaseTool, tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from afnio import Variable
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import (
    AfnioTracingWarning,
    TracedChain,
    trace,
    trainable,
)
from tests.conftest import LMEndpoint

SYSTEM = (
    "You route facility requests. "
    'If the message begins with "mop", call cleaning. '
    'If the message mentions "leak", call cleaning. '
    'If the message mentions "flood", call cleaning and repairs.'
)
ARG = "What is broken, in the customer's words."


def _tools() -> list[BaseTool]:
    """Fresh tools for each test (write-back changes their descriptions)."""

    @tool(parse_docstring=True)
    def repairs(request: str) -> str:
        """Book a technician to fix broken equipment.

        Args:
            request: What is broken, in the customer's words.
        """
        return "A technician is on the way."

    @tool
    def cleaning(request: str) -> str:
        """Send a cleaner."""
        return "A cleaner is on the way."

    @tool
    def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        return "Order 42 has shipped."

    return [repairs, cleaning, lookup_order]


def _llm(lm: LMEndpoint, **settings: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=lm.base_url,
        api_key=lm.api_key,
        max_retries=0,
        **settings,
    )


def _ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _feedback(text: str) -> Variable:
    return Variable(text, role="feedback on the agent's trajectory")


def _with_grad(traced: TracedChain) -> set[str]:
    """The keys of the Parameters that got feedback."""
    params = [p for _, p in traced.named_parameters()]
    return {
        key
        for key, param in zip(traced.prompts(), params, strict=True)
        if param.grad and any(str(g.data).strip() for g in param.grad)
    }


def _step(traced: TracedChain, lm: LMEndpoint) -> None:
    TGD(traced.parameters(), model_client=lm.client(), model=SIMULATOR_MODEL).step()
    traced.write_back()


def _bodies(vcr: Any, run: Callable[[], Any]) -> list[dict[str, Any]]:
    """The JSON bodies of the chat requests ``run()`` made (recorded now, or
    replayed from the cassette), in order."""
    before = len(vcr.sent_requests)  # sent by the test, recorded or replayed
    run()
    bodies = [json.loads(r.body) for r in vcr.sent_requests[before:]]
    return [b for b in bodies if "messages" in b]


def _system_of(body: dict[str, Any]) -> str:
    first = body["messages"][0]
    assert first["role"] == "system", body
    return first["content"]


def _descriptions(body: dict[str, Any]) -> dict[str, str]:
    return {
        t["function"]["name"]: t["function"].get("description", "")
        for t in body.get("tools", [])
    }


def _called(state: dict[str, Any]) -> list[str]:
    return [c["name"] for m in state["messages"] for c in getattr(m, "tool_calls", [])]


def _sends_current_texts(traced: TracedChain, body: dict[str, Any]) -> None:
    """The request sends every current text of the traced agent (system prompt and
    tool descriptions)."""
    texts = traced.prompts()
    assert _system_of(body) == texts["agent.system"]
    for name, description in _descriptions(body).items():
        assert description == texts[f"tool.{name}"]


# -- one, several and no tool calls ----------------------------------------------------


@pytest.mark.afnio_replay
def test_a_wrong_tool_call_sends_feedback_to_the_prompt_and_offered_tools(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    tools = _tools()
    agent = create_agent(_llm(backward_lm), tools=tools, system_prompt=SYSTEM)
    traced = trace(agent)
    assert list(traced.prompts()) == [
        "agent.system",
        "tool.repairs",
        "tool.cleaning",
        "tool.lookup_order",
    ]
    answer = traced.invoke(_ask("A leak under the kitchen sink."))
    assert answer.data == "A cleaner is on the way." and answer.requires_grad
    assert traced.lm_calls == 2  # the call asking for the tool, the final answer
    answer.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    assert _with_grad(traced) == set(traced.prompts())  # every tool was offered
    _step(traced, backward_lm)
    assert (
        'If the message mentions "leak", call repairs.'
        in traced.prompts()["agent.system"]
    )
    # the user's own agent object sends the new texts and calls the expected tool
    state: dict[str, Any] = {}
    bodies = _bodies(
        vcr, lambda: state.update(agent.invoke(_ask("A leak under the kitchen sink.")))
    )
    for body in bodies:
        _sends_current_texts(traced, body)
    assert _called(state) == ["repairs"]
    assert tools[0].description == traced.prompts()["tool.repairs"]


@pytest.mark.afnio_replay
def test_parallel_tool_calls_each_reach_the_final_answer(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    agent = create_agent(_llm(backward_lm), tools=_tools(), system_prompt=SYSTEM)
    traced = trace(agent)
    answer = traced.invoke(_ask("A flood in the basement!"))
    state = traced.last_results[0]
    assert _called(state) == ["cleaning", "repairs"]  # one answer, two calls
    assert traced.lm_calls == 2
    answer.backward(
        _feedback("Expected tool calls: [repairs], got [cleaning, repairs].")
    )
    assert _with_grad(traced) == set(traced.prompts())
    _step(traced, backward_lm)
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("A flood in the basement!")))
    assert bodies
    for body in bodies:
        _sends_current_texts(traced, body)


@pytest.mark.afnio_replay
def test_no_tool_call_feedback_teaches_the_agent_to_call_one(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    tools = _tools()
    agent = create_agent(_llm(backward_lm), tools=tools, system_prompt=SYSTEM)
    traced = trace(agent)
    answer = traced.invoke(_ask("Where is my order 42?"))
    assert _called(traced.last_results[0]) == [] and traced.lm_calls == 1
    answer.backward(_feedback("Expected tool calls: [lookup_order], got []."))
    assert _with_grad(traced) == set(traced.prompts())
    _step(traced, backward_lm)
    state: dict[str, Any] = {}
    bodies = _bodies(
        vcr, lambda: state.update(agent.invoke(_ask("Where is my order 42?")))
    )
    for body in bodies:
        _sends_current_texts(traced, body)
    assert _called(state) == ["lookup_order"]


# -- middleware and response_format ----------------------------------------------------


@pytest.mark.afnio_replay
def test_a_tool_hidden_by_wrap_model_call_gets_no_feedback(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    @wrap_model_call
    def no_orders(request: ModelRequest, handler: Callable[..., Any]) -> Any:
        """Offer the model only the facility tools (LangChain's dynamic tools)."""
        kept = [t for t in request.tools if t.name != "lookup_order"]
        return handler(request.override(tools=kept))

    agent = create_agent(
        _llm(backward_lm), tools=_tools(), system_prompt=SYSTEM, middleware=[no_orders]
    )
    traced = trace(agent)
    answer = traced.invoke(_ask("A leak under the kitchen sink."))
    assert answer.data == "A cleaner is on the way."
    answer.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    assert _with_grad(traced) == {"agent.system", "tool.repairs", "tool.cleaning"}
    _step(traced, backward_lm)
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("A leak under the kitchen sink.")))
    assert bodies
    for body in bodies:
        assert set(_descriptions(body)) == {"repairs", "cleaning"}
        _sends_current_texts(traced, body)


class Routing(BaseModel):
    """Which team handles the request."""

    team: str


@pytest.mark.afnio_replay
def test_response_format_structured_response_is_the_traced_output(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    agent = create_agent(
        _llm(backward_lm), tools=_tools(), system_prompt=SYSTEM, response_format=Routing
    )
    traced = trace(agent)
    answer = traced.invoke(_ask("Mop the lobby floor please."))
    state = traced.last_results[0]
    assert isinstance(state["structured_response"], Routing)
    assert json.loads(answer.data) == state["structured_response"].model_dump()
    answer.backward(_feedback("The team should be cleaning."))
    assert "agent.system" in _with_grad(traced)
    traced.prompt_0.data = f"{SYSTEM} Answer with the team that acts."
    traced.write_back()
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("Mop the lobby floor please.")))
    assert bodies and all(_system_of(b) == traced.prompt_0.data for b in bodies)


# -- streaming and async ---------------------------------------------------------------


@pytest.mark.afnio_replay
def test_a_streaming_agent_is_traced_and_streams_the_new_texts(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    agent = create_agent(
        _llm(backward_lm, streaming=True), tools=_tools(), system_prompt=SYSTEM
    )
    traced = trace(agent)
    answer = traced.stream(_ask("A leak under the kitchen sink."))
    assert answer.data == "A cleaner is on the way." and traced.lm_calls == 2
    answer.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    assert _with_grad(traced) == set(traced.prompts())
    _step(traced, backward_lm)
    updates: list[Any] = []
    bodies = _bodies(
        vcr,
        lambda: updates.extend(
            agent.stream(_ask("A leak under the kitchen sink."), stream_mode="updates")
        ),
    )
    assert bodies and all(b.get("stream") for b in bodies)
    for body in bodies:
        _sends_current_texts(traced, body)
    assert [next(iter(u)) for u in updates] == ["model", "tools", "model"]


@pytest.mark.afnio_replay
def test_an_async_agent_is_traced_with_ainvoke_and_astream(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    bodies: list[dict[str, Any]] = []
    traced: TracedChain | None = None

    async def run() -> tuple[Variable, Variable]:
        # one event loop and an HTTP client of its own, closed at the end (an
        # async HTTP client is bound to the loop it ran on)
        nonlocal traced
        async with httpx.AsyncClient() as client:
            llm = _llm(backward_lm, http_async_client=client)
            agent = create_agent(llm, tools=_tools(), system_prompt=SYSTEM)
            traced = trace(agent)
            return await _async_run(traced, agent, backward_lm, vcr, bodies)

    first, second = asyncio.run(run())
    assert traced is not None
    assert first.data == second.data == "A cleaner is on the way."
    assert traced.lm_calls == 4
    assert _with_grad(traced) == set(traced.prompts())
    assert bodies
    for body in bodies:
        _sends_current_texts(traced, body)


async def _async_run(
    traced: TracedChain,
    agent: Any,
    backward_lm: LMEndpoint,
    vcr: Any,
    bodies: list[dict[str, Any]],
) -> tuple[Variable, Variable]:
    """ainvoke and astream the traced agent, backward, step, then the agent's own
    ainvoke (its request bodies into ``bodies``)."""
    first = await traced.ainvoke(_ask("A leak under the kitchen sink."))
    second = await traced.astream(_ask("Mop the lobby floor please."))
    first.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    await asyncio.to_thread(_step, traced, backward_lm)
    before = len(vcr.sent_requests)  # sent by the test, recorded or replayed
    await agent.ainvoke(_ask("A leak under the kitchen sink."))
    bodies.extend(json.loads(r.body) for r in vcr.sent_requests[before:])
    return first, second


# -- tool argument descriptions --------------------------------------------------------


@pytest.mark.afnio_replay
def test_tool_argument_descriptions_are_selectable_and_written_back(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    tools = _tools()
    agent = create_agent(_llm(backward_lm), tools=tools, system_prompt=SYSTEM)
    assert "tool.repairs.request" not in trace(agent).prompts()  # not by default
    # only described arguments are Parameters (an empty one has nothing to improve)
    assert list(trace(agent, select=("system", "tool_arg")).prompts()) == [
        "agent.system",
        "tool.repairs.request",
    ]
    traced = trace(agent, select="all")
    assert traced.prompts()["tool.repairs.request"] == ARG
    answer = traced.invoke(_ask("A leak under the kitchen sink."))
    answer.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    assert {"tool.repairs.request", "tool.repairs"} <= _with_grad(traced)
    # as an optimizer would: a new argument description (braces are literal text)
    params = dict(zip(traced.prompts(), traced.parameters(), strict=True))
    new = 'The broken item and where it is, e.g. {"item": "sink"}.'
    params["tool.repairs.request"].data = new
    traced.write_back()  # the other arguments (no description) stay as they are
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("A leak under the kitchen sink.")))
    assert bodies
    for body in bodies:
        schemas = {
            t["function"]["name"]: t["function"]["parameters"]["properties"]
            for t in body["tools"]
        }
        assert schemas["repairs"]["request"]["description"] == new
        assert "description" not in schemas["cleaning"]["request"]


# -- dynamic_prompt --------------------------------------------------------------------


@pytest.mark.afnio_replay
def test_a_dynamic_prompt_built_on_a_marked_text_trains_that_text(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    base = trainable(
        'You route facility requests. If the message mentions "leak", call cleaning.',
        name="router",
    )

    @dynamic_prompt
    def with_day(request: ModelRequest) -> str:
        return f"{base.content} Today is Monday."

    agent = create_agent(_llm(backward_lm), tools=_tools(), middleware=[with_day])
    traced = trace(agent)
    assert next(iter(traced.prompts())) == "message.router"
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)  # it is trainable
        answer = traced.invoke(_ask("A leak under the kitchen sink."))
    backward = _bodies(
        vcr,
        lambda: answer.backward(
            _feedback("Expected tool calls: [repairs], got [cleaning].")
        ),
    )
    assert "message.router" in _with_grad(traced)
    # the trace holds the prompt actually sent: the backward model is shown it
    assert "Today is Monday." in json.dumps(backward)
    new = 'You route facility requests. If the message mentions "leak", call repairs.'
    traced.prompt_0.data = new
    traced.write_back()
    assert base.content == new
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("A leak under the kitchen sink.")))
    assert bodies and all(_system_of(b) == f"{new} Today is Monday." for b in bodies)


@pytest.mark.afnio_replay
def test_a_dynamic_prompt_extending_the_system_prompt_trains_it(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    @dynamic_prompt
    def expert(request: ModelRequest) -> str:
        return f"{request.system_prompt} The user is a facility manager."

    agent = create_agent(
        _llm(backward_lm), tools=_tools(), system_prompt=SYSTEM, middleware=[expert]
    )
    traced = trace(agent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        answer = traced.invoke(_ask("A leak under the kitchen sink."))
    answer.backward(_feedback("Expected tool calls: [repairs], got [cleaning]."))
    assert _with_grad(traced) == set(traced.prompts())
    # (the simulator writes its rules only into a Parameter located "system", so
    # here the improved text is written directly, as an optimizer would)
    new = SYSTEM.replace('"leak", call cleaning', '"leak", call repairs')
    traced.prompt_0.data = new
    traced.write_back()
    bodies = _bodies(vcr, lambda: agent.invoke(_ask("A leak under the kitchen sink.")))
    assert bodies
    assert all(
        _system_of(b) == f"{new} The user is a facility manager." for b in bodies
    )


@pytest.mark.afnio_replay
def test_an_unmarked_dynamic_prompt_is_warned_about_once(lm: LMEndpoint) -> None:
    @dynamic_prompt
    def fixed(request: ModelRequest) -> str:
        return 'Route requests. If the message begins with "mop", call cleaning.'

    agent = create_agent(_llm(lm), tools=_tools(), middleware=[fixed])
    traced = trace(agent)
    assert "agent.system" not in traced.prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AfnioTracingWarning)
        traced.invoke(_ask("Mop the lobby floor please."))
        answer = traced.invoke(_ask("Mop the lobby floor please."))
    untrained = [
        w
        for w in caught
        if w.category is AfnioTracingWarning
        and "holds no trainable text" in str(w.message)
    ]
    assert len(untrained) == 1  # once per call site
    assert "trainable(" in str(untrained[0].message)
    assert answer.requires_grad  # the tool descriptions are still Parameters


# -- write-back checks, save/load ------------------------------------------------------


def _offline_agent(tools: list[BaseTool], system: Any = SYSTEM) -> Any:
    llm = ChatOpenAI(model=SIMULATOR_MODEL, api_key="sk-test", base_url="http://x/v1")
    return create_agent(llm, tools=tools, system_prompt=system)


def _texts(agent_tools: list[BaseTool], system: SystemMessage) -> list[str]:
    return [str(system.content), *(t.description for t in agent_tools)]


def test_a_bad_text_changes_nothing() -> None:
    tools = _tools()
    system = SystemMessage(SYSTEM)
    traced = trace(_offline_agent(tools, system), select="all")
    before = _texts(tools, system)
    params = dict(zip(traced.prompts(), traced.parameters(), strict=True))
    params["agent.system"].data = "A new system prompt."
    params["tool.cleaning"].data = "Send a cleaner for spills."
    params["tool.repairs"].data = "   "
    with pytest.raises(ValueError, match=r"tool\.repairs"):
        traced.write_back()
    assert _texts(tools, system) == before  # checked before anything changed
    params["tool.repairs"].data = 42
    with pytest.raises(TypeError, match="must be a str"):
        traced.write_back()
    assert _texts(tools, system) == before
    params["tool.repairs"].data = "Fix {anything} broken."  # braces are literal
    traced.write_back()
    assert system.content == "A new system prompt."  # the agent's own message
    assert [t.description for t in tools] == [
        "Fix {anything} broken.",
        "Send a cleaner for spills.",
        "Look up an order by its id.",
    ]


def test_save_and_load_prompts_of_an_agent(tmp_path: Path) -> None:
    tools = _tools()
    traced = trace(_offline_agent(tools), select="all")
    params = dict(zip(traced.prompts(), traced.parameters(), strict=True))
    params["agent.system"].data = 'Route it. Reply like {"tool": "name"}.'
    params["tool.repairs.request"].data = "The broken item."
    traced.write_back()
    path = tmp_path / "agent.json"
    traced.save_prompts(path)
    assert json.loads(path.read_text("utf-8")) == traced.prompts()

    fresh_tools = _tools()
    fresh_system = SystemMessage(SYSTEM)
    fresh = trace(_offline_agent(fresh_tools, fresh_system), select="all")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**traced.prompts(), "tool.cleaning": ""}), "utf-8")
    with pytest.raises(ValueError, match=r"tool\.cleaning"):
        fresh.load_prompts(bad)
    assert fresh_system.content == SYSTEM  # nothing changed
    assert fresh.prompts()["agent.system"] == SYSTEM
    fresh.load_prompts(path)
    assert fresh.prompts() == traced.prompts()
    assert fresh_system.content == 'Route it. Reply like {"tool": "name"}.'
    schema = fresh_tools[0].tool_call_schema.model_json_schema()
    assert schema["properties"]["request"]["description"] == "The broken item."
    with pytest.raises(TypeError, match="save_prompts"):
        fresh.export()
