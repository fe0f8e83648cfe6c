"""AfnioRunnable: an afnio Module inside an LCEL chain (cassettes recorded against the
simulator)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

from langchain_core.runnables import RunnableLambda

from afnio import Variable
from afnio import cognitive as cog
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import AfnioRunnable
from afnio_integrations.langchain._tracing import RunCollector
from tests.conftest import LMEndpoint


class Classifier(cog.Module):
    def __init__(self, client: Any) -> None:
        super().__init__()
        self.instruction = cog.Parameter(
            'If the message mentions "refund", the sentiment is negative.',
            role="system prompt",
        )
        self.client = client
        self.chat = cog.ChatCompletion()

    def forward(self, message: str) -> Variable:
        messages = [
            {"role": "system", "content": [self.instruction]},
            {"role": "user", "content": [Variable("{message}", role="template")]},
        ]
        return self.chat(
            self.client, messages, inputs={"message": message}, model=SIMULATOR_MODEL
        )


@pytest.mark.afnio_replay
def test_an_afnio_module_inside_an_lcel_chain(lm: LMEndpoint) -> None:
    runnable = AfnioRunnable(Classifier(lm.client()))
    chain = RunnableLambda(lambda d: d["text"]) | runnable | RunnableLambda(str.upper)
    assert chain.invoke({"text": "I want a refund."}) == "NEGATIVE"
    assert chain.batch([{"text": "refund please"}, {"text": "hello"}]) == [
        "NEGATIVE",
        "NEUTRAL",
    ]
    assert list(chain.stream({"text": "A refund now."})) == ["NEGATIVE"]
    assert asyncio.run(chain.ainvoke({"text": "refund!"})) == "NEGATIVE"
    assert asyncio.run(chain.abatch([{"text": "a refund"}, {"text": "hi"}])) == [
        "NEGATIVE",
        "NEUTRAL",
    ]
    collector = RunCollector()
    chain.invoke({"text": "I want a refund."}, config={"callbacks": [collector]})
    names = [run.name for run in collector.roots[-1].child_runs]
    assert "Classifier" in names  # callbacks see the module's run


def test_return_variables_and_errors() -> None:
    class Echo(cog.Module):
        def forward(self, x: str) -> Variable:
            return Variable(x, role="echo")

    assert AfnioRunnable(Echo(), return_variables=True).invoke("hi").role == "echo"
    assert AfnioRunnable(Echo(), name="echo").invoke("hi") == "hi"
    with pytest.raises(TypeError, match="afnio Module"):
        AfnioRunnable(lambda x: x)  # type: ignore[arg-type]


def test_input_and_output_schemas_follow_the_module() -> None:
    class Upper(cog.Module):
        def forward(self, text: str) -> Variable:
            return Variable(text.upper(), role="upper")

    runnable = AfnioRunnable(Upper())
    assert runnable.InputType is str
    assert runnable.get_input_schema().model_json_schema()["type"] == "string"
    assert AfnioRunnable(Upper(), return_variables=True).OutputType is Variable
