"""Tracing hand-written LangGraph graphs (issue 19, items 3 and 4): prompts in node
functions (globals, closures, default arguments, subgraphs) and marked system
messages are Parameters; state read by a node is linked to the node that wrote that
key; conditional edges and cycles are traced; ``config`` (recursion limit, thread
ids with a checkpointer) passes through; write-back reaches the same compiled graph.
LM calls replay cassettes recorded against the simulator; the randomized
channel-write check uses LangChain's fake chat model (no HTTP)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any, Literal, TypedDict

import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")

from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import BaseTool, tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import MemorySaver
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from afnio import Variable
from afnio import functional as F
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import (
    PlaceholderMismatchError,
    TracedChain,
    trace,
    trainable,
)
from tests.conftest import LMEndpoint

ROUTER = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "Route the message to the right team: billing or technical. "
            'If the message mentions "invoice", the team is billing.',
        ),
        ("human", "{message}"),
    ]
)
"""A global prompt, used by the router node (found through the globals it names)."""


def _llm(lm: LMEndpoint) -> ChatOpenAI:
    return ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=lm.base_url, api_key=lm.api_key, max_retries=0
    )


def _nodes(output: Variable) -> Any:
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(edge.node for edge in node.next_functions)


def _reached(traced: TracedChain, output: Variable) -> set[str]:
    """The keys of the Parameters feedback on ``output`` can reach."""
    leaves = {id(n.variable) for n in _nodes(output) if hasattr(n, "variable")}
    params = [p for _, p in traced.named_parameters()]
    return {
        key for key, p in zip(traced.prompts(), params, strict=True) if id(p) in leaves
    }


def _with_grad(traced: TracedChain) -> set[str]:
    params = [p for _, p in traced.named_parameters()]
    return {
        key
        for key, param in zip(traced.prompts(), params, strict=True)
        if param.grad and any(str(g.data).strip() for g in param.grad)
    }


def _bodies(vcr: Any, run: Callable[[], Any]) -> list[dict[str, Any]]:
    """The JSON bodies of the chat requests ``run()`` made (recorded now, or
    replayed from the cassette), in order."""
    before = len(vcr.sent_requests)  # sent by the test, recorded or replayed
    run()
    bodies = [json.loads(r.body) for r in vcr.sent_requests[before:]]
    return [b for b in bodies if "messages" in b]


def _systems(bodies: list[dict[str, Any]]) -> list[str]:
    return [
        m["content"] for b in bodies for m in b["messages"] if m["role"] == "system"
    ]


# -- two model-calling nodes and a conditional edge ----------------------------------


class Ticket(TypedDict, total=False):
    message: str
    team: str
    urgency: str


def _support_graph(lm: LMEndpoint) -> tuple[Any, dict[str, ChatPromptTemplate]]:
    """The router node picks a team (a conditional edge), the team's node rates the
    urgency. The team prompts live in the node functions' closures."""
    llm = _llm(lm)
    teams = {
        team: ChatPromptTemplate.from_messages(
            [
                (
                    "system",
                    f"Classify the urgency of the {team} message: low or high. "
                    'Reply as JSON like {{"urgency": "low"}} only when asked.',
                ),
                ("human", "{message}"),
            ]
        )
        for team in ("billing", "technical")
    }

    def route(state: Ticket) -> dict[str, str]:
        chain = ROUTER | llm | StrOutputParser()
        return {"team": chain.invoke({"message": state["message"]})}

    billing_prompt, technical_prompt = teams["billing"], teams["technical"]

    def billing(state: Ticket) -> dict[str, str]:
        chain = billing_prompt | llm | StrOutputParser()
        return {"urgency": chain.invoke({"message": state["message"]})}

    def technical(state: Ticket) -> dict[str, str]:
        chain = technical_prompt | llm | StrOutputParser()
        return {"urgency": chain.invoke({"message": state["message"]})}

    def to_team(state: Ticket) -> Literal["billing", "technical"]:
        return "billing" if state["team"] == "billing" else "technical"

    builder = StateGraph(Ticket)
    builder.add_node("route", route)
    builder.add_node("billing", billing)
    builder.add_node("technical", technical)
    builder.add_edge(START, "route")
    builder.add_conditional_edges("route", to_team)
    builder.add_edge("billing", END)
    builder.add_edge("technical", END)
    return builder.compile(), teams


@pytest.mark.afnio_replay
def test_feedback_reaches_the_router_and_the_chosen_node_not_the_other(
    backward_lm: LMEndpoint, vcr: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # write-back changes the global ROUTER: this test changes a copy of its template
    message = ROUTER.messages[0]
    monkeypatch.setattr(message, "prompt", message.prompt.model_copy())
    graph, teams = _support_graph(backward_lm)
    before = {
        name: prompt.messages[0].prompt.template
        for name, prompt in [("router", ROUTER), *teams.items()]
    }
    traced = trace(graph, output_key="urgency")
    keys = {"prompt0.system0", "prompt1.system0", "prompt2.system0"}
    assert set(traced.prompts()) == keys
    router, billing, technical = (
        next(k for k, v in traced.prompts().items() if v == text)
        for text in (
            ROUTER.messages[0].prompt.template,
            teams["billing"].messages[0].prompt.template,
            teams["technical"].messages[0].prompt.template,
        )
    )
    urgency = traced.invoke({"message": "My invoice is wrong and payroll is due."})
    assert traced.last_results[0]["team"] == "billing" and urgency.data == "low"
    _, explanation = F.exact_match_evaluator(urgency, "high")
    explanation.backward()
    assert _with_grad(traced) == {router, billing}  # technical never ran
    TGD(
        traced.parameters(), model_client=backward_lm.client(), model=SIMULATOR_MODEL
    ).step()
    traced.write_back()
    texts = traced.prompts()
    assert texts[technical] == before["technical"]  # no feedback, no change
    assert texts[billing] != before["billing"] or texts[router] != before["router"]
    # the same compiled graph sends the new texts; the literal braces stay braces
    bodies = _bodies(
        vcr,
        lambda: graph.invoke({"message": "My invoice is wrong and payroll is due."}),
    )
    sent = _systems(bodies)
    assert texts[router] in sent
    rendered = texts[billing].replace("{{", "{").replace("}}", "}")
    assert rendered in sent and '{"urgency": "low"}' in rendered


# -- a cycle: a hand-written agent loop ------------------------------------------------


def _tools() -> list[BaseTool]:
    @tool
    def repairs(request: str) -> str:
        """Book a technician to fix broken equipment."""
        return "A technician is on the way."

    @tool
    def cleaning(request: str) -> str:
        """Send a cleaner."""
        return "A cleaner is on the way."

    return [repairs, cleaning]


def _agent_loop(lm: LMEndpoint, checkpointer: Any = None) -> tuple[Any, SystemMessage]:
    """LangGraph's agent loop, written by hand: the model node sends a marked
    ``SystemMessage`` as it is, the ``ToolNode`` runs the calls, and a conditional
    edge loops back to the model until it answers without a tool call."""
    tools = _tools()
    system = trainable(
        SystemMessage(
            "You route facility requests. "
            'If the message mentions "leak", call cleaning.'
        ),
        name="router",
    )
    llm = _llm(lm).bind_tools(tools)

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke([system, *state["messages"]])]}

    def should_continue(state: MessagesState) -> Literal["tools", "__end__"]:
        return "tools" if state["messages"][-1].tool_calls else END

    builder = StateGraph(MessagesState)
    builder.add_node("agent", call_model)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", should_continue)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer), system


def _ask(text: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(text)]}


@pytest.mark.afnio_replay
def test_a_cycle_is_traced_and_its_marked_message_learns(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    graph, system = _agent_loop(backward_lm)
    traced = trace(graph)
    assert list(traced.prompts()) == ["message.router", "tool.repairs", "tool.cleaning"]
    answer = traced.invoke(_ask("A leak under the kitchen sink."))
    assert answer.data == "A cleaner is on the way."
    assert traced.lm_calls == 2  # agent -> tools -> agent
    answer.backward(
        Variable("Expected tool calls: [repairs], got [cleaning].", role="feedback")
    )
    assert _with_grad(traced) == set(traced.prompts())
    TGD(
        traced.parameters(), model_client=backward_lm.client(), model=SIMULATOR_MODEL
    ).step()
    traced.write_back()
    assert system.content == traced.prompts()["message.router"]
    assert 'If the message mentions "leak", call repairs.' in system.content
    state: dict[str, Any] = {}
    bodies = _bodies(
        vcr, lambda: state.update(graph.invoke(_ask("A leak under the kitchen sink.")))
    )
    assert bodies and all(s == system.content for s in _systems(bodies))
    calls = [c["name"] for m in state["messages"] for c in getattr(m, "tool_calls", [])]
    assert calls == ["repairs"]


@pytest.mark.afnio_replay
def test_the_recursion_limit_of_the_config_bounds_a_traced_cycle(
    lm: LMEndpoint,
) -> None:
    graph, _ = _agent_loop(lm)
    traced = trace(graph)
    with pytest.raises(GraphRecursionError):
        traced.invoke(_ask("A leak under the kitchen sink."), {"recursion_limit": 2})
    answer = traced.invoke(
        _ask("A leak under the kitchen sink."), {"recursion_limit": 4}
    )
    assert answer.data == "A cleaner is on the way."


@pytest.mark.afnio_replay
def test_a_thread_id_with_a_checkpointer_passes_through_the_trace(
    lm: LMEndpoint, vcr: Any
) -> None:
    graph, _ = _agent_loop(lm, checkpointer=MemorySaver())
    traced = trace(graph)
    config = {"configurable": {"thread_id": "customer-7"}}
    traced.invoke(_ask("A leak under the kitchen sink."), config)
    bodies = _bodies(vcr, lambda: traced.invoke(_ask("Thanks, bye."), config))
    # the second turn sees the first (the checkpointer kept the thread's state)
    contents = [m.get("content") for m in bodies[0]["messages"]]
    assert "A leak under the kitchen sink." in contents
    assert "A cleaner is on the way." in contents
    state = graph.get_state(config).values
    assert [m.content for m in state["messages"]][-2] == "Thanks, bye."
    last = traced.last_results[0]["messages"][-1]
    assert last.content == state["messages"][-1].content


# -- discovery -------------------------------------------------------------------------


def test_prompts_in_globals_closures_defaults_and_subgraphs_are_found() -> None:
    llm = FakeListChatModel(responses=["ok"])
    closure = ChatPromptTemplate.from_messages(
        [("system", "Closure prompt."), ("human", "{message}")]
    )
    default = ChatPromptTemplate.from_messages(
        [("system", "Default-argument prompt."), ("human", "{message}")]
    )
    inner_note = trainable("Subgraph note.", name="note")

    def inner(state: Ticket) -> dict[str, str]:
        return {"urgency": llm.invoke([inner_note, HumanMessage("x")]).content}

    sub = StateGraph(Ticket)
    sub.add_node("inner", inner)
    sub.add_edge(START, "inner")
    subgraph = sub.compile()

    def route(state: Ticket) -> dict[str, str]:
        return {"team": (ROUTER | llm | StrOutputParser()).invoke(state)}

    def close(state: Ticket) -> dict[str, str]:
        return {"team": (closure | llm | StrOutputParser()).invoke(state)}

    def by_default(state: Ticket, prompt: Any = default) -> dict[str, str]:
        return {"team": (prompt | llm | StrOutputParser()).invoke(state)}

    builder = StateGraph(Ticket)
    for name, node in [("route", route), ("close", close), ("dflt", by_default)]:
        builder.add_node(name, node)
    builder.add_node("sub", subgraph)
    builder.add_edge(START, "route")
    builder.add_edge("route", "close")
    builder.add_edge("close", "dflt")
    builder.add_edge("dflt", "sub")
    graph = builder.compile()
    texts = set(trace(graph).prompts().values())
    assert texts == {
        ROUTER.messages[0].prompt.template,
        "Closure prompt.",
        "Default-argument prompt.",
        "Subgraph note.",
    }
    traced = trace(graph)
    out = traced.invoke({"message": "hello"})
    assert "message.note" in _reached(traced, out)  # the subgraph wrote urgency
    assert traced.last_results[0]["urgency"] == "ok"


# -- state links by channel writes (randomized, ground truth by construction) ----------


def _writers_graph(
    seed: int,
) -> tuple[Any, str, str, dict[str, str]]:
    """Writers (one prompt each) run in parallel from START, each writing its own
    state key; several write the *same* text. A reader node reads one key, either
    through a narrower input schema or through a prompt variable named like the key,
    and its prompt's answer is the output."""
    rng = random.Random(seed)
    keys = rng.sample(["alpha", "beta", "gamma", "delta", "eps"], rng.randint(2, 5))
    read = rng.choice(keys)
    mode = rng.choice(["schema", "same name"])
    answers = {k: rng.choice(["same", "same", "other"]) for k in keys}
    state = TypedDict(  # type: ignore[misc]
        "State",
        {"question": str, "answer": str, **dict.fromkeys(keys, str)},
        total=False,
    )
    builder = StateGraph(state)
    writers: dict[str, str] = {}

    def writer(key: str) -> Callable[[Any], dict[str, str]]:
        prompt = ChatPromptTemplate.from_messages(
            [("system", f"Writer of {key}."), ("human", "{question}")]
        )
        chain = prompt | FakeListChatModel(responses=[answers[key]]) | StrOutputParser()

        def write(s: Any) -> dict[str, str]:
            return {key: chain.invoke({"question": s["question"]})}

        return write

    for key in keys:
        builder.add_node(f"write_{key}", writer(key))
        builder.add_edge(START, f"write_{key}")
        writers[key] = f"Writer of {key}."
    answer = FakeListChatModel(responses=["final"])
    if mode == "schema":
        reads = TypedDict("Reads", {read: str})  # type: ignore[misc]
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Reader."), ("human", "{text}")]
        )

        def reader(s: reads) -> dict[str, str]:  # type: ignore[valid-type]
            return {"answer": (prompt | answer).invoke({"text": s[read]}).content}

    else:
        reads = None
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Reader."), ("human", "{" + read + "}")]
        )

        def reader(s: Any) -> dict[str, str]:
            return {"answer": (prompt | answer).invoke({read: s[read]}).content}

    # (the input schema given explicitly: a local TypedDict in an annotation is not
    # resolved by LangGraph under `from __future__ import annotations`)
    builder.add_node("reader", reader, input_schema=reads if mode == "schema" else None)
    builder.add_edge([f"write_{k}" for k in keys], "reader")
    builder.add_edge("reader", END)
    return builder.compile(), read, mode, writers


@pytest.mark.parametrize("seed", range(12))
def test_a_read_key_links_only_the_node_that_wrote_it(seed: int) -> None:
    graph, read, mode, writers = _writers_graph(seed)
    traced = trace(graph, output_key="answer")
    by_text = {v: k for k, v in traced.prompts().items()}
    out = traced.invoke({"question": "Where is the lift?"})
    expected = {by_text["Reader."], by_text[writers[read]]}
    assert _reached(traced, out) == expected, (mode, read, writers)


# -- write-back checks -----------------------------------------------------------------


def test_a_graph_text_that_breaks_a_placeholder_changes_nothing() -> None:
    _, system = _agent_loop(LMEndpoint("http://x/v1", "sk-test", None))
    builder = StateGraph(Ticket)
    prompt = ChatPromptTemplate.from_messages(
        [("system", 'Rate {message} as JSON like {{"u": 1}}.'), ("human", "{message}")]
    )
    llm = FakeListChatModel(responses=["low"])

    def rate(state: Ticket) -> dict[str, str]:
        return {"urgency": (prompt | llm | StrOutputParser()).invoke(state)}

    builder.add_node("rate", rate)
    builder.add_edge(START, "rate")
    traced = trace(builder.compile(), include=[system])
    params = dict(zip(traced.prompts(), traced.parameters(), strict=True))
    params["message.router"].data = "New routing text."
    params["prompt0.system0"].data = 'Rate it as JSON like {"u": 2}.'  # drops {message}
    with pytest.raises(PlaceholderMismatchError):
        traced.write_back()
    assert system.content.startswith("You route facility requests.")  # unchanged
    assert (
        prompt.messages[0].prompt.template == 'Rate {message} as JSON like {{"u": 1}}.'
    )
    params["prompt0.system0"].data = 'Rate {message} as JSON like {"u": 2}.'
    traced.write_back()  # single braces around non-placeholders are healed
    assert system.content == "New routing text."
    assert (
        prompt.format_messages(message="m")[0].content
        == 'Rate m as JSON like {"u": 2}.'
    )
