"""Review fixes of the agent / LangGraph tracer (issue 19): a ``Send`` worker is
linked to the step before it, a message replaced by id is linked to the node that
replaced it, equal texts from several writers link every writer, a tool running its
own LM chain links that call, reused tool-call ids, ``bind_tools`` copies written
back, same-name tools, shared ``args_schema``, multi-block system prompts, errors of
``trace``/``trainable`` and snapshots of recorded messages.

No LM service: the chat models are scripted fakes (see ``_fake_graph_models``), and
what feedback would reach is read from the afnio graph itself.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")

import operator
import warnings
from typing import Annotated, Any, TypedDict

from langchain.agents import create_agent
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import BaseTool, StructuredTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Send
from pydantic import BaseModel, Field

from afnio.cognitive import Parameter
from afnio_integrations.langchain import (
    AfnioTracingWarning,
    TracedChain,
    trace,
    trainable,
)
from tests.integrations.langchain._fake_graph_models import (
    CallRef,
    ScriptedChatModel,
    call_with,
    linked_calls,
    output_links,
    reached_parameters,
)


def _chain(llm: ScriptedChatModel, system: str, variable: str) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", system), ("human", "{" + variable + "}")]
    )
    return prompt | llm | StrOutputParser()


def _parameter(traced: TracedChain, key: str) -> Parameter:
    return dict(zip(traced.prompts(), traced.parameters(), strict=True))[key]


def _user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _has_tool_result(messages: list[BaseMessage]) -> bool:
    return any(isinstance(m, ToolMessage) for m in messages)


# -- Send, replaced messages, equal texts ---------------------------------------


class SummaryState(TypedDict, total=False):
    q: str
    a: str
    s: str


class SendState(TypedDict, total=False):
    """A planner's topics sent to workers; ``topic`` is written by another node."""

    q: str
    topic: str  # written by `setter`; unrelated to the workers' topics
    plan: str
    results: Annotated[list, operator.add]


class ReplaceState(TypedDict):
    """Messages merged by id (``add_messages``)."""

    messages: Annotated[list, add_messages]


class VoteState(TypedDict, total=False):
    """Votes appended by parallel nodes, then judged."""

    q: str
    votes: Annotated[list, operator.add]
    verdict: str


def test_a_send_worker_is_linked_to_the_planner_call_not_a_same_named_key() -> None:
    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        system = str(messages[0].content)
        if system.startswith("SETTER"):
            return "weather"
        if system.startswith("PLANNER"):
            return "apples,pears"
        return "about " + str(messages[-1].content)

    llm = ScriptedChatModel(answer=answer)
    setter_chain = _chain(llm, "SETTER prompt", "q")
    planner_chain = _chain(llm, "PLANNER prompt", "q")
    worker_chain = _chain(llm, "WORKER prompt", "topic")

    def setter(s: SendState) -> dict[str, Any]:
        return {"topic": setter_chain.invoke({"q": s["q"]})}

    def planner(s: SendState) -> dict[str, Any]:
        return {"plan": planner_chain.invoke({"q": s["q"]})}

    def fan(s: SendState) -> list[Send]:
        return [Send("worker", {"topic": t}) for t in s["plan"].split(",")]

    def worker(s: SendState) -> dict[str, Any]:
        return {"results": [worker_chain.invoke({"topic": s["topic"]})]}

    g = StateGraph(SendState)
    g.add_node("setter", setter)
    g.add_node("planner", planner)
    g.add_node("worker", worker)
    g.add_edge(START, "setter")
    g.add_edge("setter", "planner")
    g.add_conditional_edges("planner", fan, ["worker"])
    g.add_edge("worker", END)
    traced = trace(g.compile(), output_key="results")
    out = traced.invoke({"q": "fruit"})

    workers = call_with(linked_calls(out, traced), "WORKER")
    assert sorted(c.ref.output for c in workers) == ["about apples", "about pears"]
    for call in workers:
        assert call.calls == {CallRef("PLANNER prompt", "apples,pears")}
    # the setter's prompt (prompt0) gets no feedback
    assert traced.prompts()["prompt0.system0"] == "SETTER prompt"
    assert reached_parameters(out, traced) == {"prompt1.system0", "prompt2.system0"}


def test_a_message_replaced_by_id_is_linked_to_the_replacing_nodes_call() -> None:
    answer_msg = trainable("ANSWER the question.", name="answer")
    rewrite_msg = trainable("REWRITE politely.", name="rewrite")

    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        system = str(messages[0].content)
        return "raw answer" if system.startswith("ANSWER") else "polite answer"

    llm = ScriptedChatModel(answer=answer)

    def ans(s: ReplaceState) -> dict[str, Any]:
        return {"messages": [llm.invoke([answer_msg, *s["messages"]])]}

    def rewrite(s: ReplaceState) -> dict[str, Any]:
        last = s["messages"][-1]
        new = llm.invoke([rewrite_msg, HumanMessage(last.content)])
        return {"messages": [AIMessage(new.content, id=last.id)]}

    g = StateGraph(ReplaceState)
    g.add_node("ans", ans)
    g.add_node("rewrite", rewrite)
    g.add_edge(START, "ans")
    g.add_edge("ans", "rewrite")
    g.add_edge("rewrite", END)
    traced = trace(g.compile())
    out = traced.invoke(_user("hi"))

    assert str(out.data) == "polite answer"
    _, calls = output_links(out, traced)
    assert calls == {CallRef("REWRITE politely.", "polite answer")}
    (rewrite_call,) = call_with(linked_calls(out, traced), "REWRITE")
    assert rewrite_call.calls == {CallRef("ANSWER the question.", "raw answer")}
    assert reached_parameters(out, traced) == {"message.answer", "message.rewrite"}


def test_parallel_writers_of_equal_texts_to_a_list_each_reach_the_reader() -> None:
    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        return "yes" if str(messages[0].content).startswith("VOTER") else "verdict"

    llm = ScriptedChatModel(answer=answer)
    voter_a = _chain(llm, "VOTER_A prompt", "q")
    voter_b = _chain(llm, "VOTER_B prompt", "q")
    judge_chain = _chain(llm, "JUDGE prompt", "votes")

    def a(s: VoteState) -> dict[str, Any]:
        return {"votes": [voter_a.invoke({"q": s["q"]})]}

    def b(s: VoteState) -> dict[str, Any]:
        return {"votes": [voter_b.invoke({"q": s["q"]})]}

    def judge(s: VoteState) -> dict[str, Any]:
        return {"verdict": judge_chain.invoke({"votes": ", ".join(s["votes"])})}

    g = StateGraph(VoteState)
    g.add_node("a", a)
    g.add_node("b", b)
    g.add_node("judge", judge)
    g.add_edge(START, "a")
    g.add_edge(START, "b")
    g.add_edge(["a", "b"], "judge")
    g.add_edge("judge", END)
    traced = trace(g.compile(), output_key="verdict")
    out = traced.invoke({"q": "ok?"})

    (judge_call,) = call_with(linked_calls(out, traced), "JUDGE")
    assert judge_call.calls == {
        CallRef("VOTER_A prompt", "yes"),
        CallRef("VOTER_B prompt", "yes"),
    }
    assert reached_parameters(out, traced) == {
        "prompt0.system0",
        "prompt1.system0",
        "prompt2.system0",
    }


def test_equal_text_messages_of_two_workers_each_reach_the_reviewer() -> None:
    worker_a = trainable("WORKER_A checks legal.", name="a")
    worker_b = trainable("WORKER_B checks budget.", name="b")
    reviewer = trainable("REVIEWER decides.", name="r")

    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        return "APPROVED" if str(messages[0].content).startswith("WORKER") else "ship"

    llm = ScriptedChatModel(answer=answer)

    def wa(s: MessagesState) -> dict[str, Any]:
        text = llm.invoke([worker_a, *s["messages"]]).content
        return {"messages": [HumanMessage(text, name="legal")]}

    def wb(s: MessagesState) -> dict[str, Any]:
        text = llm.invoke([worker_b, *s["messages"]]).content
        return {"messages": [HumanMessage(text, name="budget")]}

    def rv(s: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke([reviewer, *s["messages"]])]}

    g = StateGraph(MessagesState)
    g.add_node("wa", wa)
    g.add_node("wb", wb)
    g.add_node("rv", rv)
    g.add_edge(START, "wa")
    g.add_edge("wa", "wb")
    g.add_edge("wb", "rv")
    g.add_edge("rv", END)
    traced = trace(g.compile())
    out = traced.invoke(_user("proposal"))

    (review,) = call_with(linked_calls(out, traced), "REVIEWER")
    assert review.calls == {
        CallRef("WORKER_A checks legal.", "APPROVED"),
        CallRef("WORKER_B checks budget.", "APPROVED"),
    }
    assert reached_parameters(out, traced) == {"message.a", "message.b", "message.r"}


# -- tools --------------------------------------------------------------------


def test_a_tool_running_its_own_lm_chain_links_that_call_and_its_prompt() -> None:
    def answer(messages: list[BaseMessage], tools: list[Any]) -> AIMessage | str:
        if str(messages[0].content).startswith("INNER"):
            return "inner says 42"
        if not _has_tool_result(messages):
            call = {"name": "ask_expert", "args": {"q": "x"}, "id": "c1"}
            return AIMessage(content="", tool_calls=[call])
        return "final: " + str(messages[-1].content)

    llm = ScriptedChatModel(answer=answer)
    inner = _chain(llm, "INNER expert prompt", "q")

    @tool
    def ask_expert(q: str) -> str:
        """Ask the expert."""
        return inner.invoke({"q": q})

    agent = create_agent(llm, tools=[ask_expert], system_prompt="SYS outer")
    traced = trace(agent, select="all")
    out = traced.invoke(_user("q"))

    calls = linked_calls(out, traced)
    (final,) = [c for c in calls if c.ref.output == "final: inner says 42"]
    (asking,) = [c for c in calls if "ask_expert" in c.ref.output]
    assert final.calls == {CallRef("INNER expert prompt", "inner says 42"), asking.ref}
    assert "prompt0.system0" in reached_parameters(out, traced)


def test_reused_tool_call_ids_link_each_result_to_the_call_that_made_it() -> None:
    def answer(messages: list[BaseMessage], tools: list[Any]) -> AIMessage | str:
        n = sum(isinstance(m, ToolMessage) for m in messages)
        if n < 2:
            name = ["lookup", "repairs"][n]
            call = {"name": name, "args": {"q": str(n)}, "id": "call_0"}
            return AIMessage(content="", tool_calls=[call])
        return "done"

    @tool
    def lookup(q: str) -> str:
        """Look up."""
        return "found it"

    @tool
    def repairs(q: str) -> str:
        """Repair."""
        return "tech"

    agent = create_agent(
        ScriptedChatModel(answer=answer), tools=[lookup, repairs], system_prompt="SYS"
    )
    traced = trace(agent)
    out = traced.invoke(_user("hi"))  # no RecursionError

    calls = linked_calls(out, traced)
    assert len(calls) == 3
    (first,) = [c for c in calls if '"lookup"' in c.ref.output]
    (second,) = [c for c in calls if '"repairs"' in c.ref.output]
    (final,) = [c for c in calls if c.ref.output == "done"]
    assert first.calls == set()
    # the result of `lookup` (call_0 of the first turn) feeds the second call
    assert second.calls == {first.ref}
    assert final.calls == {first.ref, second.ref}


def test_write_back_reaches_tools_bound_with_bind_tools_in_the_same_graph() -> None:
    sent: list[list[str]] = []

    def answer(messages: list[BaseMessage], tools: list[Any]) -> AIMessage | str:
        sent.append([t["function"]["description"] for t in tools])
        if not _has_tool_result(messages):
            call = {"name": "repairs", "args": {"request": "x"}, "id": "c1"}
            return AIMessage(content="", tool_calls=[call])
        return "done"

    @tool
    def repairs(request: str) -> str:
        """Book a technician."""
        return "tech"

    tools = [repairs]
    llm_with_tools = ScriptedChatModel(answer=answer).bind_tools(tools)

    def chatbot(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm_with_tools.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("chatbot", chatbot)
    g.add_node("tools", ToolNode(tools))
    g.add_edge(START, "chatbot")
    g.add_conditional_edges("chatbot", tools_condition)
    g.add_edge("tools", "chatbot")
    app = g.compile()
    traced = trace(app)
    out = traced.invoke(_user("sink broken"))
    assert "tool.repairs" in reached_parameters(out, traced)

    new = "Book a technician for broken equipment."
    _parameter(traced, "tool.repairs").data = new
    traced.write_back()
    sent.clear()
    app.invoke(_user("sink broken"))
    assert sent == [[new], [new]]


def _search_tool(description: str) -> BaseTool:
    @tool
    def search(q: str) -> str:
        """placeholder"""
        return "r"

    search.description = description
    return search


def test_a_call_is_linked_only_to_the_same_named_tool_it_offered() -> None:
    llm = ScriptedChatModel(answer=lambda m, t: "ok")
    agent_a = create_agent(
        llm, tools=[_search_tool("A: search the web")], system_prompt="SYSA"
    )
    agent_b = create_agent(
        llm, tools=[_search_tool("B: search the wiki")], system_prompt="SYSB"
    )
    g = StateGraph(MessagesState)
    g.add_node("a", agent_a)
    g.add_node("b", agent_b)
    g.add_conditional_edges(START, lambda s: "a", ["a", "b"])
    g.add_edge("a", END)
    g.add_edge("b", END)
    traced = trace(g.compile())
    assert traced.prompts()["tool.search"] == "A: search the web"
    assert traced.prompts()["tool.search#1"] == "B: search the wiki"
    out = traced.invoke(_user("hi"))

    (call,) = linked_calls(out, traced)
    assert call.ref == CallRef("SYSA", "ok")
    assert call.parameters == {"agent.system", "tool.search"}


def test_tools_sharing_an_args_schema_share_one_parameter_per_argument() -> None:
    class Query(BaseModel):
        query: str = Field(description="The search terms.")

    a = StructuredTool.from_function(
        lambda query: "a", name="a", description="Tool A", args_schema=Query
    )
    b = StructuredTool.from_function(
        lambda query: "b", name="b", description="Tool B", args_schema=Query
    )
    agent = create_agent(
        ScriptedChatModel(answer=lambda m, t: "ok"), tools=[a, b], system_prompt="SYS"
    )
    traced = trace(agent, select="tool_arg")
    assert traced.prompts() == {"tool.a.query": "The search terms."}

    _parameter(traced, "tool.a.query").data = "New."
    traced.write_back()
    for shared in (a, b):
        props = convert_to_openai_tool(shared)["function"]["parameters"]["properties"]
        assert props["query"]["description"] == "New."


def test_arguments_without_a_description_are_not_parameters() -> None:
    @tool
    def repairs(request: str, urgent: bool) -> str:
        """Book a technician."""
        return "tech"

    agent = create_agent(
        ScriptedChatModel(answer=lambda m, t: "ok"), tools=[repairs], system_prompt="S"
    )
    traced = trace(agent, select="all")
    assert traced.prompts() == {
        "agent.system": "S",
        "tool.repairs": "Book a technician.",
    }


# -- system prompts, warnings and errors ------------------------------------------


def _repairs_tool() -> BaseTool:
    @tool
    def repairs(request: str) -> str:
        """Book a technician."""
        return "tech"

    return repairs


def test_a_multi_block_system_prompt_is_not_a_parameter_and_is_warned_about() -> None:
    system = SystemMessage(
        content=[
            {"type": "text", "text": "You route requests."},
            {
                "type": "text",
                "text": "Always call a tool.",
                "cache_control": {"type": "ephemeral"},
            },
        ]
    )
    agent = create_agent(
        ScriptedChatModel(answer=lambda m, t: "ok"),
        tools=[_repairs_tool()],
        system_prompt=system,
    )
    with pytest.warns(AfnioTracingWarning, match=r"system prompt \(2 content blocks\)"):
        traced = trace(agent)
    assert traced.prompts() == {"tool.repairs": "Book a technician."}


def test_leaving_the_system_prompt_out_with_select_does_not_warn() -> None:
    agent = create_agent(
        ScriptedChatModel(answer=lambda m, t: "ok"),
        tools=[_repairs_tool()],
        system_prompt="SYS route requests.",
    )
    traced = trace(agent, select="tool")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        out = traced.invoke(_user("hi"))
    assert reached_parameters(out, traced) == {"tool.repairs"}


def test_an_output_key_not_in_the_state_is_refused_by_trace() -> None:
    calls: list[int] = []

    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        calls.append(1)
        return "ok"

    agent = create_agent(
        ScriptedChatModel(answer=answer), tools=[_repairs_tool()], system_prompt="S"
    )
    with pytest.raises(ValueError, match=r"output_key='answer'.*'messages'"):
        trace(agent, output_key="answer")
    assert calls == []


def test_an_unknown_role_in_select_is_refused_with_the_known_roles() -> None:
    agent = create_agent(
        ScriptedChatModel(answer=lambda m, t: "ok"),
        tools=[_repairs_tool()],
        system_prompt="S",
    )
    with pytest.raises(ValueError, match=r"\['tools'\].*tool_arg"):
        trace(agent, select=("system", "tools"))


@pytest.mark.parametrize("text", ["", "   "])
def test_trainable_refuses_an_empty_text(text: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        trainable(text, name="x")


# -- recorded conversations -------------------------------------------------------


def test_a_recorded_call_keeps_the_message_content_it_was_sent() -> None:
    llm = ScriptedChatModel(answer=lambda m, t: f"answer {len(m[-1].content)}")
    system = trainable(SystemMessage("SYS prompt"), name="sys")

    def step(q: str) -> str:
        msg = HumanMessage(content=[{"type": "text", "text": q}])
        first = llm.invoke([system, msg])
        msg.content.append({"type": "text", "text": "ADDED AFTER THE FIRST CALL"})
        second = llm.invoke([system, msg])
        return f"{first.content} | {second.content}"

    traced = trace(RunnableLambda(step), include=[system])
    out = traced.invoke("hello")

    users = {
        c.ref.output: [m["content"] for m in c.conversation if m["role"] == "user"]
        for c in linked_calls(out, traced)
    }
    assert users == {
        "answer 1": ["hello"],
        "answer 2": ["hello\nADDED AFTER THE FIRST CALL"],
    }


def test_a_graph_call_without_anything_trainable_is_warned_about() -> None:
    # a node sending a plain prompt (as a summarizing middleware does) has no text
    # afnio can train: the user is told once, naming the call; the marked call is not
    system = trainable("Classify the urgency: low or high.", name="urgency")
    llm = ScriptedChatModel(answer=lambda m, t: "low")

    def classify(state: SummaryState) -> dict[str, str]:
        return {"a": str(llm.invoke([system, HumanMessage(state["q"])]).content)}

    def summarize(state: SummaryState) -> dict[str, str]:
        return {"s": str(llm.invoke(f"Summarize: {state['q']}").content)}

    graph = StateGraph(SummaryState)
    graph.add_node("classify", classify)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "summarize")
    graph.add_edge("summarize", END)
    traced = trace(graph.compile(), output_key="a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = traced.invoke({"q": "A leak"})
        traced.invoke({"q": "A spill"})
    found = [w for w in caught if issubclass(w.category, AfnioTracingWarning)]
    assert len(found) == 1, [str(w.message) for w in found]
    assert "summarize" in str(found[0].message)
    assert "no system message" in str(found[0].message)
    assert reached_parameters(out, traced) == {"message.urgency"}


class HandoffState(TypedDict, total=False):
    q: str
    answer: str
    out: str


def test_a_handoff_from_a_subgraph_links_the_parent_to_the_inner_call() -> None:
    # the multi-agent handoff: a subgraph node returns Command(graph=PARENT, ...);
    # the parent applies its update, so node b reads what the inner LM call wrote
    from langgraph.types import Command

    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        system = str(messages[0].content)
        return "inner text" if system.startswith("INNER") else "final"

    llm = ScriptedChatModel(answer=answer)
    inner_chain = _chain(llm, "INNER prompt", "q")
    b_chain = _chain(llm, "B prompt", "answer")

    def inner(s: HandoffState) -> Command:
        text = inner_chain.invoke({"q": s["q"]})
        return Command(graph=Command.PARENT, goto="b", update={"answer": text})

    def b(s: HandoffState) -> dict[str, str]:
        return {"out": b_chain.invoke({"answer": s["answer"]})}

    sub = StateGraph(HandoffState)
    sub.add_node("inner", inner)
    sub.add_edge(START, "inner")
    parent = StateGraph(HandoffState)
    parent.add_node("agent", sub.compile(), destinations=("b",))
    parent.add_node("b", b)
    parent.add_edge(START, "agent")
    parent.add_edge("b", END)
    traced = trace(parent.compile(), output_key="out")
    out = traced.invoke({"q": "x"})

    (b_call,) = call_with(linked_calls(out, traced), "B prompt")
    assert b_call.calls == {CallRef("INNER prompt", "inner text")}
    assert len(reached_parameters(out, traced)) == 2  # both prompts


class PassState(TypedDict, total=False):
    q: str
    first: str
    second: str
    out: str


def test_a_key_passed_through_with_the_text_of_the_nodes_own_answer_keeps_its_writer():
    # n2 returns the whole state plus its own key ({**state, ...}); its own answer has
    # the same text as the `first` it passes through: n3, reading `first`, must still
    # reach n1's call (n2's may be linked too: it could have written that text)
    p1 = trainable("P1 classify urgency", name="p1")
    p2 = trainable("P2 classify impact", name="p2")
    p3 = trainable("P3 report", name="p3")

    def answer(messages: list[BaseMessage], tools: list[Any]) -> str:
        return "report" if str(messages[0].content).startswith("P3") else "high"

    llm = ScriptedChatModel(answer=answer)

    def n1(s: PassState) -> dict[str, str]:
        return {"first": str(llm.invoke([p1, HumanMessage(s["q"])]).content)}

    def n2(s: PassState) -> dict[str, str]:
        return {**s, "second": str(llm.invoke([p2, HumanMessage(s["q"])]).content)}

    def n3(s: PassState) -> dict[str, str]:
        text = "urgency=" + s["first"]
        return {"out": str(llm.invoke([p3, HumanMessage(text)]).content)}

    graph = StateGraph(PassState)
    for name, node in (("n1", n1), ("n2", n2), ("n3", n3)):
        graph.add_node(name, node)
    graph.add_edge(START, "n1")
    graph.add_edge("n1", "n2")
    graph.add_edge("n2", "n3")
    graph.add_edge("n3", END)
    traced = trace(graph.compile(), output_key="out")
    out = traced.invoke({"q": "A leak"})
    (report,) = call_with(linked_calls(out, traced), "P3")
    assert CallRef("P1 classify urgency", "high") in report.calls
    assert "message.p1" in reached_parameters(out, traced)
