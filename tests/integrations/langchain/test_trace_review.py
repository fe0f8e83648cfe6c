"""Review fixes of the LangChain tracer (after 583264a): long loops of sub-calls,
streamed outputs, concurrent ``with_fallbacks``, prompts shared by two traced chains,
chains as branch conditions, warning locations and the location of a feed made
without a prompt.

No LM service: the chat models are instant fakes (a fixed answer, or the system
prompt's text echoed back, after an optional per-prompt delay for the async calls),
and what a gradient would reach is read from the graph itself.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import (
    RunnableBranch,
    RunnableGenerator,
    RunnableLambda,
    RunnableParallel,
    chain,
)
from langchain_core.tracers.schemas import Run
from pydantic import Field

from afnio._variable import Variable
from afnio_integrations.langchain import AfnioTracingWarning, trace
from afnio_integrations.langchain._tracing import ROUTING, PromptIndex, build_graph


class _Echo(BaseChatModel):
    """A chat model answering its system message's text; an async call first waits
    ``delays[text]`` seconds (so concurrent calls overlap as wanted)."""

    delays: dict[str, float] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, **kwargs: Any
    ) -> ChatResult:
        text = str(messages[0].content)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, **kwargs: Any
    ) -> ChatResult:
        await asyncio.sleep(self.delays.get(str(messages[0].content), 0.0))
        return self._generate(messages)


def _prompt(system: str, human: str = "{message}") -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([("system", system), ("human", human)])


def _nodes(output: Variable) -> Iterator[Any]:
    """Every node of the graph behind ``output``."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(edge.node for edge in node.next_functions)


def _reached(output: Variable) -> list[str]:
    """The texts of the leaf Variables (Parameters) feedback on ``output`` reaches."""
    return sorted(
        str(node.variable.data) for node in _nodes(output) if hasattr(node, "variable")
    )


def _down(_: Any) -> str:
    raise ConnectionError("the primary model is down")


# -- 1: a long loop of sub-calls in a @chain function ---------------------------------

LOOP = 200


def _looping(n: int) -> Any:
    sub = _prompt("Classify.") | FakeListChatModel(responses=["neutral"])
    sub = sub | StrOutputParser()

    @chain
    def classify_all(message: str) -> str:
        return " ".join(sub.invoke({"message": f"{message} {i}"}) for i in range(n))

    return classify_all


def test_a_long_loop_of_sub_calls_is_traced_with_little_overhead() -> None:
    looping = _looping(LOOP)
    traced = trace(looping)
    prediction = traced.invoke("Message")  # no RecursionError
    assert prediction.data == " ".join(["neutral"] * LOOP)
    assert _reached(prediction) == ["Classify."]
    assert traced.lm_calls == LOOP
    plain, tracing = [], []
    for _ in range(3):  # best of three: a generous bound, not a tight timing
        t0 = time.perf_counter()
        looping.invoke("Message")
        t1 = time.perf_counter()
        traced.invoke("Message")
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        tracing.append(t2 - t1)
    added_ms = (min(tracing) - min(plain)) / LOOP * 1000
    assert added_ms < 3.0, f"{added_ms:.2f} ms added per LM call"


# -- 2: a streamed call's whole output ------------------------------------------------


def test_a_stream_returns_the_whole_output_of_messages_and_dicts() -> None:
    chat = FakeListChatModel(responses=["neutral"])  # streams one letter a chunk
    to_message = trace(_prompt("Classify.") | chat)
    assert to_message.stream({"message": "Hi"}).data == "neutral"
    assert asyncio.run(to_message.astream({"message": "Hi"})).data == "neutral"
    parallel = trace(
        RunnableParallel(b=_prompt("Classify.") | chat | StrOutputParser())
    )
    assert parallel.stream({"message": "Hi"}).data == '{"b": "neutral"}'
    streamed = asyncio.run(parallel.astream({"message": "Hi"}))
    assert streamed.data == '{"b": "neutral"}'
    assert _reached(streamed) == ["Classify."]


def test_chunks_that_do_not_add_up_give_the_recorded_output() -> None:
    def pieces(chunks: Iterator[Any]) -> Iterator[Any]:
        for _ in chunks:
            yield {"a": "x"}
            yield {"b": "y"}  # plain dicts: LangChain keeps the last one

    traced = trace(_prompt("Classify.") | RunnableGenerator(pieces))
    assert traced.stream({"message": "Hi"}).data == '{"b": "y"}'


# -- 3: with_fallbacks running concurrently under one parent ---------------------------


def _fallbacks() -> tuple[Any, Any]:
    llm = _Echo(delays={"A2": 0.2, "B1": 0.05})
    fa = (_prompt("A1") | RunnableLambda(_down)).with_fallbacks(
        [_prompt("A2") | llm | StrOutputParser()]
    )
    fb = (_prompt("B1") | llm | StrOutputParser()).with_fallbacks(
        [_prompt("B2") | llm | StrOutputParser()]
    )
    return fa, fb


def test_concurrent_fallbacks_under_one_parent_keep_their_own_runs() -> None:
    fa, fb = _fallbacks()

    @chain
    async def both(message: str) -> str:
        a, b = await asyncio.gather(
            fa.ainvoke({"message": message}), fb.ainvoke({"message": message + "!"})
        )
        return a + " / " + b

    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        prediction = asyncio.run(trace(both).ainvoke("Hi"))
    assert prediction.data == "A2 / B1"
    assert _reached(prediction) == ["A2", "B1"]


def test_runs_several_fallbacks_could_hold_are_warned_about() -> None:
    fa, fb = _fallbacks()

    @chain
    async def both(message: str) -> str:  # the same input, overlapping spans
        a, b = await asyncio.gather(
            fa.ainvoke({"message": message}), fb.ainvoke({"message": message})
        )
        return a + " / " + b

    with pytest.warns(AfnioTracingWarning, match="could belong to any of 2"):
        prediction = asyncio.run(trace(both).ainvoke("Hi"))
    assert prediction.data == "A2 / B1"


def test_a_fallback_given_the_error_is_still_adopted() -> None:
    llm = _Echo()
    fallback = _prompt("Backup.") | llm | StrOutputParser()
    primary = RunnableLambda(_down).with_fallbacks([fallback], exception_key="error")
    traced = trace(RunnableLambda(lambda d: {**d}) | primary)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        prediction = traced.invoke({"message": "Hi"})
    assert prediction.data == "Backup."
    assert _reached(prediction) == ["Backup."]


# -- 4: a prompt shared by two traced chains -----------------------------------------


def test_tracing_a_second_chain_leaves_the_first_intact() -> None:
    llm = _Echo()
    base = _prompt("Answer in {language}.")
    first = trace(base | llm | StrOutputParser())
    inputs = {"language": "English", "message": "Hi"}
    assert _reached(first.invoke(inputs)) == ["Answer in {language}."]
    second = trace(  # a copy of base (keeping its afnio id) is found before base
        RunnableParallel(
            french=base.partial(language="French") | llm | StrOutputParser(),
            asked=base | llm | StrOutputParser(),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        prediction = first.invoke(inputs)
        both = second.invoke(inputs)
    assert [id(v) for v in _leaves(prediction)] == [id(first.prompt_0)]
    assert {id(v) for v in _leaves(both)} == {
        id(p) for p in second.parameters()
    } and len(list(second.parameters())) == 2


def _leaves(output: Variable) -> list[Variable]:
    return [node.variable for node in _nodes(output) if hasattr(node, "variable")]


# -- 5: a chain as a branch condition -------------------------------------------------


def test_the_lm_call_of_a_branch_condition_gets_the_feedback_of_its_branch() -> None:
    llm = _Echo()

    def routed_to(name: str) -> Any:
        return (
            _prompt(name)
            | llm
            | StrOutputParser()
            | RunnableLambda(lambda text: "Route" in text)
        )

    branch = RunnableBranch(
        (routed_to("Other"), _prompt("Never") | llm | StrOutputParser()),
        (routed_to("Route"), _prompt("Billing") | llm | StrOutputParser()),
        _prompt("General") | llm | StrOutputParser(),
    )
    prediction = trace(branch).invoke({"message": "Hi"})
    assert prediction.data == "Billing"
    # both conditions that ran decided the route; the branch that did not run, no
    assert _reached(prediction) == ["Billing", "Other", "Route"]
    # a branch that chose a prompt: the routing call is an input of the LM call
    chosen = RunnableBranch(
        (routed_to("Route"), _prompt("Billing")), _prompt("General")
    )
    prediction = trace(chosen | llm | StrOutputParser()).invoke({"message": "Hi"})
    assert _reached(prediction) == ["Billing", "Route"]
    locations = [
        n.locations
        for n in _nodes(prediction)
        if getattr(n, "conversation", None)
        and n.conversation[0]["content"] == "Billing"
    ]
    assert locations == [["system", ROUTING]]


# -- 6: warning locations and feed locations ------------------------------------------


def _undiscovered_chain() -> Any:
    hidden = _prompt("Hidden.") | _Echo() | StrOutputParser()
    registry = {"hidden": hidden}  # looked up at run time: invisible to discovery
    return (
        _prompt("Found.")
        | _Echo()
        | StrOutputParser()
        | RunnableLambda(lambda text: registry["hidden"].invoke({"message": text}))
    )


@pytest.mark.parametrize("how", ["call", "invoke", "batch"])
def test_the_undiscovered_warning_names_the_users_call_site(how: str) -> None:
    traced = trace(_undiscovered_chain())
    with pytest.warns(AfnioTracingWarning, match="did not discover") as caught:
        if how == "call":
            traced({"message": "Hi"})
        elif how == "invoke":
            traced.invoke({"message": "Hi"})
        else:
            traced.batch([{"message": "Hi"}])
    assert [w.filename for w in caught] == [__file__]


def test_a_feed_made_without_a_prompt_is_located_by_its_key() -> None:
    llm = _Echo()
    chain_ = RunnableParallel(question=_prompt("Ask.") | llm | StrOutputParser())
    chain_ = chain_ | RunnableLambda(lambda d: llm.invoke(d["question"]))
    prediction = trace(chain_).invoke({"message": "Hi"})
    calls = [n for n in _nodes(prediction) if getattr(n, "conversation", None)]
    asked = next(n for n in calls if n.conversation[0]["role"] == "system")
    assert asked.locations == ["system"]
    fed = next(n for n in calls if n is not asked)
    assert fed.locations == ["input:question"]


def _run(
    name: str,
    span: tuple[float, float],
    inputs: Any,
    outputs: Any,
    run_type: str = "chain",
    tags: tuple[str, ...] = (),
    children: tuple[Run, ...] = (),
) -> Run:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return Run(
        id=uuid4(),
        name=name,
        run_type=run_type,
        start_time=start + timedelta(seconds=span[0]),
        end_time=start + timedelta(seconds=span[1]),
        inputs=inputs,
        outputs=outputs,
        tags=list(tags),
        child_runs=list(children),
    )


def test_a_bound_run_that_two_runs_could_hold_is_reported_not_guessed() -> None:
    # a model run recorded beside the two sequences of a .map() (the ambient run),
    # with the step tag its real sequence gave it; neither sequence's neighbouring
    # values match it, and they differ: not interchangeable
    def sequence(start: float, word: str) -> Run:
        return _run(
            "RunnableSequence",
            (start, 9),
            {"input": word},
            {"output": word},
            children=(
                _run("Prompt", (start + 0.1, 2), {"w": word}, {"output": word},
                     run_type="prompt", tags=("seq:step:1",)),
                _run("Parser", (5, 6), {"input": word}, {"output": word},
                     run_type="parser", tags=("seq:step:3",)),
            ),
        )  # fmt: skip

    model = _run(
        "FakeChat",
        (3, 4),
        {"messages": [[HumanMessage("elsewhere")]]},
        {"generations": [[{"text": "other"}]]},
        run_type="chat_model",
        tags=("seq:step:2",),
    )
    each = _run(
        "RunnableEach",
        (0, 10),
        {"input": ["one", "two"]},
        {"output": ["one", "two"]},
        children=(sequence(1, "one"), sequence(1.5, "two"), model),
    )
    traced = build_graph(each, [], ["one", "two"], PromptIndex({}, {}))
    assert [a.site for a in traced.ambiguous] == [
        "RunnableEach > FakeChat (seq:step:2)"
    ]
    assert "could belong to any of 2 runs" in traced.ambiguous[0].reason
