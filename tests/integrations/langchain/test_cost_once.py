"""A LangChain model wrapped for afnio (``LangChainChatModel``) and called by an afnio
Module inside a traced chain (``AfnioRunnable``) is counted once: by the wrapper, never
again by the chain's tracer, in ``traced.usage``, the phase ledger, the Trainer's
meter and ``optimize``'s report (on the live simulator)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI

import afnio
import afnio.cognitive as cog
from afnio import Variable
from afnio.models.phases import LEDGER
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer.trainer import _CostMeter
from afnio_integrations.langchain import (
    AfnioRunnable,
    AfnioTracingWarning,
    LangChainChatModel,
    optimize,
    trace,
)
from afnio_integrations.langchain._tracing import RunCollector

CLASSIFY = "Classify the sentiment of the message."


class Summarize(cog.Module):
    """An afnio Module that calls its client directly."""

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = client

    def forward(self, text: Any) -> Variable:
        text = text.data if isinstance(text, Variable) else text
        reply = self.client.chat([{"role": "user", "content": f"Summarize: {text}"}])
        return Variable(reply, role="summary")


class Explain(cog.Module):
    """An afnio Module that calls its client through a ChatCompletion operation."""

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.instruction = cog.Parameter(
            "Repeat the label in one word.", role="system prompt"
        )
        self.client = client
        self.chat = cog.ChatCompletion()

    def forward(self, label: str) -> Variable:
        messages = [
            {"role": "system", "content": [self.instruction]},
            {"role": "user", "content": [Variable("{label}", role="template")]},
        ]
        return self.chat(
            self.client, messages, inputs={"label": label}, model=SIMULATOR_MODEL
        )


class ChatStarts(BaseCallbackHandler):
    """Counts the chat-model runs it sees, and their parents."""

    def __init__(self) -> None:
        self.parents: list[UUID | None] = []
        self.chains: dict[UUID, str] = {}

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, **kwargs: Any
    ) -> None:
        self.chains[run_id] = str(kwargs.get("name"))

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self.parents.append(parent_run_id)


@dataclass
class Setup:
    sim: Simulator
    llm: ChatOpenAI  # the chain's own model
    wrapped: LangChainChatModel  # the same model, as an afnio client
    prompt: ChatPromptTemplate


@pytest.fixture
def setup() -> Iterator[Setup]:
    with Simulator() as sim:
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="k", max_retries=0
        )
        prompt = ChatPromptTemplate.from_messages(
            [("system", CLASSIFY), ("human", "{message}")]
        )
        yield Setup(sim, llm, LangChainChatModel(llm), prompt)


def _ledger_calls(snapshot: Any) -> int:
    return sum(row.calls for row in LEDGER.since(snapshot))


def test_a_wrapped_model_called_inside_a_traced_chain_is_counted_once(
    setup: Setup,
) -> None:
    chain = (
        setup.prompt
        | setup.llm
        | StrOutputParser()
        | AfnioRunnable(Summarize(setup.wrapped))
    )
    traced = trace(chain)
    snapshot = LEDGER.snapshot()
    meter = _CostMeter([traced.usage, setup.wrapped])  # what the Trainer meters
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)  # not an unknown LM call
        traced.invoke({"message": "I love it"})
    assert setup.sim.stats.calls == 2  # the chain's model, then the module's
    assert traced.usage.calls == 1  # only the chain's own call is traced
    assert setup.wrapped.calls == 1
    assert _ledger_calls(snapshot) == 2
    assert sum(row[3] for row in meter.per_client()) == 2
    ledger_cost = sum(row.cost for row in LEDGER.since(snapshot))
    assert meter.cost() == pytest.approx(ledger_cost)


def test_async_and_batched_calls_of_the_chain_count_the_module_once(
    setup: Setup,
) -> None:
    # the chain's model and the wrapped one share langchain-openai's cached HTTP
    # pools; the chain runs on asyncio.run's loop, the module's call on afnio's
    wrapped = LangChainChatModel(
        ChatOpenAI(
            model=SIMULATOR_MODEL,
            base_url=setup.sim.base_url,
            api_key="k",
            max_retries=0,
        )
    )
    chain = (
        setup.prompt | setup.llm | StrOutputParser() | AfnioRunnable(Summarize(wrapped))
    )
    traced = trace(chain)
    snapshot = LEDGER.snapshot()

    async def three() -> list[str]:  # the chain's calls on this loop's pools
        return [await traced.ainvoke({"message": m}) for m in ("Love", "Bad", "Ok")]

    asyncio.run(three())
    traced.batch([{"message": "Awful."}, {"message": "Fine."}])
    assert setup.sim.stats.calls == 10
    assert traced.usage.calls == 5 and wrapped.calls == 5
    assert _ledger_calls(snapshot) == 10


def test_the_traced_chain_meters_the_clients_of_its_afnio_modules(
    setup: Setup,
) -> None:
    other = LangChainChatModel(setup.llm)
    inner = AfnioRunnable(Summarize(other))
    chain = (
        setup.prompt
        | setup.llm
        | StrOutputParser()
        | AfnioRunnable(Summarize(setup.wrapped))
        | RunnableLambda(lambda text: inner.invoke(text))  # found in the closure
    )
    traced = trace(chain)
    assert [id(c) for c in traced.llm_clients()] == [
        id(traced.usage),
        id(setup.wrapped),
        id(other),
    ]
    plain = trace(setup.prompt | setup.llm)
    assert [id(c) for c in plain.llm_clients()] == [id(plain.usage)]


def test_other_callbacks_still_see_the_modules_call(setup: Setup) -> None:
    """Only afnio's tracer is taken off the wrapped model's call: a handler of the
    chain's config sees it nested under the module's run, and so does a handler
    configured on the model itself."""
    own = ChatStarts()
    model = ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=setup.sim.base_url,
        api_key="k",
        max_retries=0,
        callbacks=[own],
    )
    chain = (
        setup.prompt
        | setup.llm
        | StrOutputParser()
        | AfnioRunnable(Summarize(LangChainChatModel(model)), name="summarize")
    )
    traced = trace(chain)
    handler = ChatStarts()
    traced.invoke({"message": "I love it"}, config={"callbacks": [handler]})
    assert len(handler.parents) == 2  # the chain's call and the module's
    assert handler.chains[handler.parents[1]] == "summarize"
    assert len(own.parents) == 1
    assert traced.usage.calls == 1


def test_an_explicit_config_keeps_its_callbacks_but_not_afnios_tracer(
    setup: Setup,
) -> None:
    handler, collector = ChatStarts(), RunCollector()
    setup.wrapped.chat(
        [{"role": "user", "content": "hi"}],
        config={"callbacks": [handler, collector], "tags": ["mine"]},
    )
    assert len(handler.parents) == 1
    assert collector.roots == []


def test_optimize_reports_each_call_once_when_the_module_client_is_the_backward_client(
    setup: Setup,
) -> None:
    afnio.set_backward_model_client(setup.wrapped)
    chain = (
        setup.prompt
        | setup.llm
        | StrOutputParser()
        | AfnioRunnable(Explain(setup.wrapped))
    )
    rows = [
        ({"message": "The heater broke again."}, "negative"),
        ({"message": "Great work on the garden."}, "positive"),
    ]
    before = setup.sim.stats.calls
    _, report = optimize(
        chain,
        rows,
        lambda prediction, target: int(prediction.strip() == target),
        epochs=1,
        batch_size=2,
        progress=False,
    )
    calls = setup.sim.stats.calls - before
    assert calls > 4  # validation, training and optimizer calls were made
    assert report.calls == calls
    assert sum(row.calls for row in report.phases) == calls
    assert report.cost == pytest.approx(sum(row.cost for row in report.phases))
