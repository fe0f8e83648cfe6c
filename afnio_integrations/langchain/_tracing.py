"""Tracing an LCEL chain into an afnio graph, through LangChain callbacks.

Each call runs the **user's own chain** with a tracer in ``config["callbacks"]``
(nothing is wrapped or rebuilt). From the recorded run tree, every chat-model call
becomes an afnio node whose inputs are the Parameters of the prompt that produced its
messages and the outputs of earlier calls that fed that prompt; its output is the
recorded text (no LM call is repeated). ``loss.backward()`` then asks the backward model
for feedback on every Parameter through every LM call, with the exact messages the
model saw.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run

from afnio_integrations._recorded import RecordedChatCall, StepOutput

__all__ = ["RecordedChatCall", "RunCollector", "StepOutput"]

OUTPUT_ROLE = "response of a LangChain chat model"


class RunCollector(BaseTracer):
    """Collects the root runs of traced calls (``original+chat`` schema, inline)."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__(_schema_format="original+chat")
        self.roots: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        self.roots.append(run)


def _message_role(message: Any) -> str:
    kind = getattr(message, "type", None)
    if kind is None and isinstance(message, dict):
        ident = message.get("id", [""])[-1]
        kind = {
            "SystemMessage": "system",
            "HumanMessage": "human",
            "AIMessage": "ai",
        }.get(ident, "chat")
        return {"human": "user", "ai": "assistant"}.get(kind, kind)
    return {"human": "user", "ai": "assistant"}.get(str(kind), str(kind))


def _message_text(message: Any) -> str:
    if isinstance(message, dict):
        content = message.get("kwargs", {}).get("content", "")
    else:
        content = getattr(message, "content", "")
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part)
            for part in content
        )
    return str(content)


def conversation_of(chat_run: Run) -> list[dict[str, str]]:
    """The messages a chat-model run received."""
    batches = chat_run.inputs.get("messages") or [[]]
    return [{"role": _message_role(m), "content": _message_text(m)} for m in batches[0]]


def output_of(chat_run: Run) -> str:
    """The text a chat-model run produced (aggregated when streamed)."""
    generations = (chat_run.outputs or {}).get("generations") or [[{}]]
    first = generations[0][0] if generations and generations[0] else {}
    text = first.get("text") if isinstance(first, dict) else None
    if text:
        return str(text)
    message = first.get("message", {}) if isinstance(first, dict) else {}
    kwargs = message.get("kwargs", {}) if isinstance(message, dict) else {}
    tool_calls = kwargs.get("tool_calls") or kwargs.get("additional_kwargs", {}).get(
        "tool_calls"
    )
    if tool_calls:  # structured output through tool calling
        return json.dumps(tool_calls, default=str)
    return str(kwargs.get("content", ""))
