"""Any LangChain chat model as an afnio model client.

``LangChainChatModel(ChatOpenAI(...))`` can be the forward client of afnio's operations,
the backward client (``afnio.set_backward_model_client(client)``) or TGD's optimizer
model. Requests run on afnio's event loop under its LM-request bound; usage and cost
come from the response's ``usage_metadata`` (priced with afnio's table by the
response's model name); it is registered for checkpoints.

**Not part of a traced chain.** An afnio Module that runs inside a LangChain chain
(``AfnioRunnable``) calls this client in the chain's run context, and LangChain hands
nested calls the running chain's callbacks. The client's calls are afnio's own: they
are metered by the client (``calls``, ``get_usage()``, the phase ledger), so they are
kept out of afnio's chain tracer (``_tracing.RunCollector``), which would count
them a second time as the chain's own LM calls and put them in its graph (the
traced chain meters the clients of the modules it holds instead, see
:meth:`TracedChain.llm_clients`). Every other callback stays: the model's own
``callbacks`` and the handlers of the chain's config (a LangSmith tracer passed there
or enabled globally still records the call, nested under the module's run).
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config

from afnio._runtime import request_slot, run_async
from afnio.models.model_registry import register_model_class
from afnio.models.phases import LEDGER
from afnio.models.step_memo import memoized
from afnio_integrations._client import AdapterChatModel, run_blocking
from afnio_integrations.langchain._tracing import RunCollector

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


def _without_tracer(callbacks: Any) -> Any:
    """``callbacks`` (a list of handlers or a callback manager) without afnio's chain
    tracers (:class:`RunCollector`); a manager is copied, never changed."""
    if isinstance(callbacks, BaseCallbackManager):
        manager = callbacks.copy()
        for handler in [*manager.handlers, *manager.inheritable_handlers]:
            if isinstance(handler, RunCollector):
                manager.remove_handler(handler)
        return manager
    if isinstance(callbacks, (list, tuple)):
        return [h for h in callbacks if not isinstance(h, RunCollector)]
    return callbacks


def _own_call_config(config: RunnableConfig | None) -> RunnableConfig:
    """The config of afnio's own call: ``config`` (the caller's, if any) with the
    callbacks it would inherit (its own, else those of the LangChain run it is made
    in) minus afnio's chain tracers, so a traced chain neither counts nor graphs it.

    LangChain's ``ensure_config`` starts from the running chain's child config and
    lets the given keys replace it; the ``callbacks`` given here therefore replace the
    parent's, keeping every handler of it but the tracers."""
    own = dict(config or {})
    inherited = own.get("callbacks")
    if inherited is None:
        inherited = (var_child_runnable_config.get() or {}).get("callbacks")
    own["callbacks"] = [] if inherited is None else _without_tracer(inherited)
    return RunnableConfig(**own)  # type: ignore[typeddict-item]


@register_model_class
class LangChainChatModel(AdapterChatModel):
    """An afnio chat client backed by a LangChain chat model.

    Args:
        model: any ``BaseChatModel`` (``ChatOpenAI``, ``ChatAnthropic``, a fake...).

    Extra keyword arguments of ``chat``/``achat`` (``temperature``, ``response_format``,
    ...) are passed to the model's call; ``model=`` is ignored (the LangChain model
    already names its model); ``config=`` is the call's ``RunnableConfig`` (afnio's
    chain tracers are taken out of its callbacks, see the module docstring).

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
        """``LangChainChatModel(ChatOpenAI, model='gpt-4o-mini',
        base_url='https://api.openai.com/v1')``: the model class, its model name and
        base URL (a password or key in the URL masked; never the API key), so an
        error that names this client says where its requests went."""
        from afnio._secrets import mask_url

        model = self.model
        parts = [type(model).__name__]
        name = getattr(model, "model_name", None) or getattr(model, "model", None)
        if isinstance(name, str) and name:
            parts.append(f"model={name!r}")
        url = None
        for attr in ("openai_api_base", "base_url", "anthropic_api_url", "api_base"):
            value = getattr(model, attr, None)
            if isinstance(value, str) and value:
                url = value
                break
        if url is None:  # ChatOpenAI without base_url: its SDK client's default
            value = getattr(getattr(model, "root_client", None), "base_url", None)
            url = str(value) if value is not None else None
        if url:
            parts.append(f"base_url={mask_url(url)!r}")
        return f"LangChainChatModel({', '.join(parts)})"

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Answer ``messages`` with the LangChain model; returns the reply's text."""
        kwargs.pop("model", None)
        config = _own_call_config(kwargs.pop("config", None))
        lc_messages = _to_langchain(messages)

        async def call() -> str:
            async with request_slot():
                # afnio's own call: not counted again by a traced chain it runs in
                # the blocking call in a worker thread: the model's async client
                # belongs to the user's event loop, not afnio's
                reply = await run_blocking(
                    self.model.invoke, lc_messages, config, **kwargs
                )
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
