"""Any LangChain chat model as an afnio model client.

``LangChainChatModel(ChatOpenAI(...))`` can be the forward client of afnio's operations,
the backward client (``afnio.set_backward_model_client(client)``) or TGD's optimizer
model. Requests run on afnio's event loop under its LM-request bound; usage and cost
come from the response's ``usage_metadata`` (priced with afnio's table by the
response's model name); it is registered for checkpoints.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from afnio._runtime import request_slot, run_async
from afnio.models.model_registry import register_model_class
from afnio.models.phases import LEDGER
from afnio.models.step_memo import memoized
from afnio_integrations._client import AdapterChatModel

__all__ = ["LangChainChatModel"]

_ROLES = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}


def _to_langchain(messages: list[dict[str, Any]]) -> list[BaseMessage]:
    converted = []
    for i, message in enumerate(messages):
        cls = _ROLES.get(message.get("role", ""))
        if cls is None:
            raise ValueError(
                f"messages[{i}] has role {message.get('role')!r}; use system, user or "
                "assistant."
            )
        converted.append(cls(content=message.get("content", "")))
    return converted


def _usage(message: AIMessage) -> dict[str, Any]:
    meta = getattr(message, "usage_metadata", None) or {}
    if not meta:
        return {}
    inputs = meta.get("input_token_details") or {}
    outputs = meta.get("output_token_details") or {}
    return {
        "prompt_tokens": meta.get("input_tokens", 0),
        "completion_tokens": meta.get("output_tokens", 0),
        "total_tokens": meta.get("total_tokens", 0),
        "prompt_tokens_details": {
            "cached_tokens": inputs.get("cache_read", 0),
            "audio_tokens": inputs.get("audio", 0),
        },
        "completion_tokens_details": {
            "reasoning_tokens": outputs.get("reasoning", 0),
            "audio_tokens": outputs.get("audio", 0),
        },
    }


@register_model_class
class LangChainChatModel(AdapterChatModel):
    """An afnio chat client backed by a LangChain chat model.

    Args:
        model: any ``BaseChatModel`` (``ChatOpenAI``, ``ChatAnthropic``, a fake...).

    Extra keyword arguments of ``chat``/``achat`` (``temperature``, ``response_format``,
    ...) are passed to the model's call; ``model=`` is ignored (the LangChain model
    already names its model).

    Example::

        client = LangChainChatModel(ChatOpenAI(model="gpt-4o-mini"))
        afnio.set_backward_model_client(client)
    """

    def __init__(self, model: BaseChatModel) -> None:
        if not isinstance(model, BaseChatModel):
            raise TypeError(
                "`model` must be a LangChain BaseChatModel, got "
                f"{type(model).__name__}."
            )
        self.model = model
        super().__init__(provider=f"langchain:{type(model).__name__}")

    def __repr__(self) -> str:
        return f"LangChainChatModel({type(self.model).__name__})"

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Answer ``messages`` with the LangChain model; returns the reply's text."""
        kwargs.pop("model", None)
        lc_messages = _to_langchain(messages)

        async def call() -> str:
            async with request_slot():
                reply = await self.model.ainvoke(lc_messages, **kwargs)
                self.calls += 1  # answered: billed
            usage = _usage(reply)
            name = (getattr(reply, "response_metadata", None) or {}).get(
                "model_name"
            ) or getattr(self.model, "model_name", None)
            if usage:
                self.update_usage(usage, name or "unknown")
            else:
                LEDGER.record(name or "unknown")  # a call without usage
            content = reply.content
            if isinstance(content, list):
                return "".join(
                    part.get("text", "") if isinstance(part, dict) else str(part)
                    for part in content
                )
            return str(content)

        request = {"messages": messages, **kwargs}
        return await run_async(memoized(self, "chat", request, call))
