"""Agent tracing overhead: traced vs untraced ``invoke`` of a ``create_agent`` agent
and of a LangGraph ``StateGraph`` with a cycle, on an instant fake chat model that
speaks tool calling (no network, no real model).

Cases:

* a ``langchain.agents.create_agent`` agent with 3 ``@tool`` tools, on each of three
  scripted conversations: one tool call (2 model calls, 1 tool call), two parallel
  tool calls (2 model calls, 2 tool calls) and three sequential tool calls (4 model
  calls, 3 tool calls);
* a ``StateGraph`` with two model-calling nodes (``draft`` and ``review``, each a
  ``prompt | model | parser`` chain), a conditional edge after ``review`` and a
  bounded cycle back to ``draft``: ``--graph-calls`` model calls per invoke
  (default 10, 30 and 100), where the graph building could grow with the number of
  supersteps.

Reports the time added per traced model call (µs) and the ratio traced/untraced:
untraced and traced invokes alternate, each side's median invoke counts, best of
``--repeat`` runs; the process's CPU time added is reported too (``--clock cpu``
checks the target on it: steadier when other processes load the machine).
Target: < 3 ms added per model call in every case (negligible next to any real
model call); the script exits 1 when a case misses it.

Run: ``python benchmarks/agent_tracing_overhead.py [--calls 300] [--repeat 3]
[--graph-calls 10 30 100] [--agent-rounds 10 30] [--clock wall|cpu]
[--json out.json]``; ``--agent-rounds`` adds agents making that many sequential
tool calls (longer conversations); ``--quick`` is a seconds-long smoke run (for the
tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, StateGraph

from afnio_integrations.langchain import trace

# -- the instant fake chat model -------------------------------------------------------


class ScriptedToolModel(BaseChatModel):
    """An instant chat model that speaks tool calling, scripted by the user message.

    The last human message reads ``"plan: a+b; c"``: one round of tool calls per
    ``;``-separated group (``+`` joins parallel calls in one answer). The model
    answers the ``n``-th round while fewer than ``n`` assistant messages follow that
    human message, then a final text answer. Without a plan it answers ``"ok"``.
    Stateless (the answer depends only on the messages), so traced and untraced runs
    get the same conversations. ``bind_tools`` binds the tools in OpenAI's shape, as
    a real provider's model does, so the trace sees which tools each call offered.
    """

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-model"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """The model with ``tools`` bound (OpenAI's tool shape)."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages))])

    @staticmethod
    def _answer(messages: list[BaseMessage]) -> AIMessage:
        last_human = max(
            (i for i, m in enumerate(messages) if isinstance(m, HumanMessage)),
            default=None,
        )
        if last_human is None:
            return AIMessage(content="ok")
        text = str(messages[last_human].content)
        if not text.startswith("plan:"):
            return AIMessage(content="ok")
        rounds = [r.strip() for r in text[len("plan:") :].split(";") if r.strip()]
        done = sum(isinstance(m, AIMessage) for m in messages[last_human + 1 :])
        if done >= len(rounds):
            return AIMessage(content="Done: your request is handled.")
        calls = [
            {"name": name.strip(), "args": {"query": text}, "id": f"call_{done}_{j}"}
            for j, name in enumerate(rounds[done].split("+"))
        ]
        return AIMessage(content="", tool_calls=calls)


# -- the agent -------------------------------------------------------------------------


@tool
def lookup_order(query: str) -> str:
    """Look up the status of a customer's order."""
    return f"order for {query[:20]}: shipped"


@tool
def check_stock(query: str) -> str:
    """Check whether an item is in stock."""
    return "in stock"


@tool
def issue_refund(query: str) -> str:
    """Issue a refund for a customer's order."""
    return "refund issued"


TARGET_MS = 3.0  # added per model call, every case
GRAPH_CALLS = [10, 30, 100]  # model calls per invoke of the graph cycle
QUICK_GRAPH_CALLS = [4, 10]  # the same, for --quick (the tests)

AGENT_SYSTEM = "You are a support agent. Use the tools to answer the customer."

# (label, plan, model calls, tool calls) per invoke
AGENT_CASES = [
    ("agent, 1 tool call", "plan: lookup_order", 2, 1),
    ("agent, 2 parallel tool calls", "plan: lookup_order+check_stock", 2, 2),
    (
        "agent, 3 sequential tool calls",
        "plan: lookup_order; check_stock; issue_refund",
        4,
        3,
    ),
]


def long_plan(rounds: int) -> str:
    """A plan of ``rounds`` sequential tool calls (``rounds + 1`` model calls)."""
    names = [t.name for t in (lookup_order, check_stock, issue_refund)]
    return "plan: " + "; ".join(names[i % 3] for i in range(rounds))


def make_agent() -> Any:
    """A ``create_agent`` agent with 3 tools on the instant scripted model."""
    return create_agent(
        ScriptedToolModel(),
        tools=[lookup_order, check_stock, issue_refund],
        system_prompt=AGENT_SYSTEM,
    )


def agent_inputs(plan: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": plan}]}


# -- the graph -------------------------------------------------------------------------


class DraftState(TypedDict):
    question: str
    draft: str
    notes: str
    loops: int
    limit: int


def make_graph() -> Any:
    """Two model-calling nodes (``draft``, ``review``), a conditional edge after
    ``review`` and a cycle back to ``draft`` until ``limit`` loops are done (2 model
    calls per loop)."""
    model = ScriptedToolModel()
    draft_chain = (
        ChatPromptTemplate.from_messages(
            [
                ("system", "Draft a reply to the customer."),
                ("human", "Question: {question}\nReviewer notes: {notes}"),
            ]
        )
        | model
        | StrOutputParser()
    )
    review_chain = (
        ChatPromptTemplate.from_messages(
            [
                ("system", "Review the draft and say what to improve."),
                ("human", "Draft: {draft}"),
            ]
        )
        | model
        | StrOutputParser()
    )

    def draft(state: DraftState) -> dict[str, Any]:
        notes = state.get("notes", "")
        return {
            "draft": draft_chain.invoke({"question": state["question"], "notes": notes})
        }

    def review(state: DraftState) -> dict[str, Any]:
        notes = review_chain.invoke({"draft": state["draft"]})
        return {"notes": notes, "loops": state.get("loops", 0) + 1}

    def again(state: DraftState) -> str:
        return "draft" if state["loops"] < state["limit"] else END

    builder = StateGraph(DraftState)
    builder.add_node("draft", draft)
    builder.add_node("review", review)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "review")
    builder.add_conditional_edges("review", again, ["draft", END])
    return builder.compile()


def graph_inputs(model_calls: int) -> dict[str, Any]:
    return {
        "question": "Where is my order?",
        "notes": "",
        "loops": 0,
        "limit": model_calls // 2,
    }


def graph_config(model_calls: int) -> dict[str, Any]:
    """Room for the cycle: two supersteps per loop, plus slack."""
    return {"recursion_limit": model_calls + 10}


# -- measuring -------------------------------------------------------------------------


class _CallCounter(BaseCallbackHandler):
    """Counts the model and tool calls of a run."""

    def __init__(self) -> None:
        self.model_calls = 0
        self.tool_calls = 0

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.model_calls += 1

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self.model_calls += 1

    def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        self.tool_calls += 1


@dataclass
class CaseReport:
    """One case, best of ``repeat`` runs (µs per model call)."""

    label: str
    model_calls_per_invoke: int
    tool_calls_per_invoke: int
    invokes: int
    untraced_us: float
    traced_us: float
    added_us: float
    spread_us: float
    ratio: float
    added_cpu_us: float
    clock: str
    met: bool


def _timed(run: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, process CPU s) of ``run()`` (CPU time of all the process's threads:
    what the work costs, whatever else the machine is running)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(
    make: Callable[[], Any],
    inputs: Any,
    invokes: int,
    model_calls: int,
    config: dict[str, Any] | None = None,
) -> tuple[float, float, float, float]:
    """(untraced, traced) wall µs, then (untraced, traced) CPU µs, per model call:
    the median over ``invokes`` invokes of the agent or graph ``make()`` builds,
    each making ``model_calls`` model calls.

    Untraced and traced invokes alternate, and the median of each is taken, so a
    burst of load from another process on a shared machine moves neither much.
    """
    plain_app = make()
    traced = trace(make())
    plain: list[tuple[float, float]] = []
    tracing: list[tuple[float, float]] = []
    for _ in range(invokes):
        plain.append(_timed(lambda: plain_app.invoke(inputs, config)))
        tracing.append(_timed(lambda: traced.invoke(inputs, config)))
    per = model_calls / 1e6
    return (
        statistics.median(t[0] for t in plain) / per,
        statistics.median(t[0] for t in tracing) / per,
        statistics.median(t[1] for t in plain) / per,
        statistics.median(t[1] for t in tracing) / per,
    )


def check_calls(
    make: Callable[[], Any],
    inputs: Any,
    model_calls: int,
    tool_calls: int,
    config: dict[str, Any] | None = None,
) -> None:
    """Fail loudly if one invoke does not make the model and tool calls the case
    claims (the per-call figures would be wrong)."""
    counter = _CallCounter()
    make().invoke(inputs, {**(config or {}), "callbacks": [counter]})
    got = (counter.model_calls, counter.tool_calls)
    if got != (model_calls, tool_calls):
        raise RuntimeError(
            f"the case makes {got[0]} model and {got[1]} tool calls per invoke, "
            f"not the {model_calls} and {tool_calls} it reports per call"
        )


def run_case(
    label: str,
    make: Callable[[], Any],
    inputs: Any,
    invokes: int,
    model_calls: int,
    tool_calls: int,
    repeat: int,
    target_ms: float,
    config: dict[str, Any] | None = None,
    clock: str = "wall",
) -> CaseReport:
    """One case, best of ``repeat``, printed; its report. ``clock`` (``"wall"`` or
    ``"cpu"``) is the figure the target is checked on."""
    check_calls(make, inputs, model_calls, tool_calls, config)
    measure(make, inputs, 1, model_calls, config)  # warm up imports and caches
    runs = [measure(make, inputs, invokes, model_calls, config) for _ in range(repeat)]
    plain = min(r[0] for r in runs)
    traced = min(r[1] for r in runs)
    added = traced - plain
    spread = statistics.pstdev(r[1] - r[0] for r in runs)
    added_cpu = min(r[3] for r in runs) - min(r[2] for r in runs)
    report = CaseReport(
        label=label,
        model_calls_per_invoke=model_calls,
        tool_calls_per_invoke=tool_calls,
        invokes=invokes,
        untraced_us=plain,
        traced_us=traced,
        added_us=added,
        spread_us=spread,
        ratio=traced / plain,
        added_cpu_us=added_cpu,
        clock=clock,
        met=(added_cpu if clock == "cpu" else added) < target_ms * 1000,
    )
    print(f"{label}, {invokes} invokes, best of {repeat}", flush=True)
    print(f"  untraced, per model call: {plain:9.1f} µs")
    print(f"  traced, per model call:   {traced:9.1f} µs")
    print(
        f"  added per traced model call: {added:9.1f} µs (±{spread:.1f}), "
        f"ratio {report.ratio:.2f}x; CPU time added: {added_cpu:.1f} µs",
        flush=True,
    )
    return report


def run_all(
    calls: int,
    repeat: int,
    graph_calls: Sequence[int],
    target_ms: float,
    clock: str = "wall",
    agent_rounds: Sequence[int] = (),
) -> list[CaseReport]:
    """Every case: about ``calls`` model calls per timed run of each; the target
    checked on ``clock`` (``"wall"`` or ``"cpu"``). ``agent_rounds``: also agents
    making that many sequential tool calls per invoke (longer conversations)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    reports = []
    for label, plan, model_calls, tool_calls in AGENT_CASES:
        reports.append(
            run_case(
                label,
                make_agent,
                agent_inputs(plan),
                max(1, calls // model_calls),
                model_calls,
                tool_calls,
                repeat,
                target_ms,
                clock=clock,
            )
        )
    for rounds in agent_rounds:
        reports.append(
            run_case(
                f"agent, {rounds} sequential tool calls",
                make_agent,
                agent_inputs(long_plan(rounds)),
                max(1, calls // (rounds + 1)),
                rounds + 1,
                rounds,
                repeat,
                target_ms,
                {"recursion_limit": 2 * rounds + 10},
                clock,
            )
        )
    for n in graph_calls:
        reports.append(
            run_case(
                f"StateGraph cycle, {n} model calls per invoke",
                make_graph,
                graph_inputs(n),
                max(1, calls // n),
                n,
                0,
                repeat,
                target_ms,
                graph_config(n),
                clock,
            )
        )
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--calls", type=int, default=300, help="model calls per timed run of a case"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--graph-calls", type=int, nargs="*", default=GRAPH_CALLS)
    parser.add_argument(
        "--agent-rounds",
        type=int,
        nargs="*",
        default=[],
        help="also agents making this many sequential tool calls per invoke",
    )
    parser.add_argument("--target-ms", type=float, default=TARGET_MS)
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long run (for the tests)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="check the target on wall time (default) or on the process's CPU "
        "time (steadier on a loaded machine)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.repeat, args.graph_calls = 8, 1, QUICK_GRAPH_CALLS
    if args.calls < 1 or args.repeat < 1:
        parser.error("--calls and --repeat must be at least 1")
    if any(n < 1 for n in args.agent_rounds):
        parser.error("--agent-rounds must be at least 1")
    if any(n < 2 or n % 2 for n in args.graph_calls):
        parser.error("--graph-calls must be even numbers >= 2 (2 model calls a loop)")
    reports = run_all(
        args.calls,
        args.repeat,
        args.graph_calls,
        args.target_ms,
        args.clock,
        args.agent_rounds,
    )
    ok = all(r.met for r in reports)
    worst = max(r.added_cpu_us if args.clock == "cpu" else r.added_us for r in reports)
    target = f"< {args.target_ms:g} ms added per model call, every case, {args.clock}"
    print(
        f"target ({target}): {'met' if ok else 'MISSED'} (worst {worst / 1000:.2f} ms)",
        flush=True,
    )
    if args.json is not None:
        payload = {
            "target_ms": args.target_ms,
            "clock": args.clock,
            "passed": ok,
            "worst_added_ms": worst / 1000,
            "cases": [asdict(r) for r in reports],
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
