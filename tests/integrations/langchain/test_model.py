"""A LangChain chat model as afnio's backward and optimizer client (cassettes recorded
against the simulator)."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import afnio
from afnio import functional as F
from afnio.models.pricing import calculate_cost, get_model_price
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import LangChainChatModel, trace
from tests.conftest import LMEndpoint

CLASSIFY = "Classify the sentiment of the message."
RULE = 'If the message mentions "frustrated", the sentiment is negative.'


@pytest.mark.afnio_replay
def test_a_langchain_model_as_backward_and_optimizer_client(lm: LMEndpoint) -> None:
    chat = ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=lm.base_url, api_key=lm.api_key, max_retries=0
    )
    client = LangChainChatModel(chat)
    afnio.set_backward_model_client(client)
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    chain = prompt | chat | StrOutputParser()
    traced = trace(chain)
    prediction = traced.invoke({"message": "I am frustrated."})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [RULE]
    TGD(traced.parameters(), model_client=client).step()
    traced.write_back()
    assert chain.invoke({"message": "So frustrated."}) == "negative"
    # evaluator backward, chat backward, optimizer: three calls through the adapter
    assert client.calls == 3
    usage = client.get_usage()
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    price = get_model_price(SIMULATOR_MODEL)
    assert price is not None
    assert usage["cost"]["amount"] == pytest.approx(calculate_cost(usage, price))
    assert copy.deepcopy(client)["class_type"] == "LangChainChatModel"


def test_adapter_errors() -> None:
    with pytest.raises(TypeError, match="LangChain BaseChatModel"):
        LangChainChatModel("gpt-4o")  # type: ignore[arg-type]
    chat = ChatOpenAI(model="m", base_url="http://127.0.0.1:9/v1", api_key="k")
    client = LangChainChatModel(chat)
    with pytest.raises(ValueError, match="role 'tool'"):
        client.chat([{"role": "tool", "content": "x"}])
    assert repr(client) == (
        "LangChainChatModel(ChatOpenAI, model='m', base_url='http://127.0.0.1:9/v1')"
    )
