"""Any DSPy LM as an afnio model client.

``DSPyLM(dspy.LM("openai/gpt-4o-mini"))`` can be afnio's backward client
(``afnio.set_backward_model_client(client)``), TGD's optimizer model, or the forward
client of afnio's own operations. Requests run under afnio's LM-request bound (each
in a worker thread, through DSPy's synchronous path); usage and cost come from the
response (priced with afnio's table by the response's model name). It is registered
for checkpoints.
"""

from __future__ import annotations

from typing import Any

import dspy

from afnio._runtime import request_slot, run_async
from afnio.models.model_registry import register_model_class
from afnio.models.phases import LEDGER
from afnio.models.step_memo import memoized
from afnio_integrations._client import AdapterChatModel, run_blocking
from afnio_integrations._usage import model_name

__all__ = ["DSPyLM", "model_name", "usage_dict"]

_ROLES = ("system", "user", "assistant")


def usage_dict(usage: Any) -> dict[str, Any]:
    """An lm15 ``Usage`` (what a DSPy LM reports) in afnio's usage shape."""
    if usage is None:
        return {}
    return {
        "prompt_tokens": int(getattr(usage, "input_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "output_tokens", 0) or 0),
        "total_tokens": int(getattr(usage, "total_tokens", 0) or 0),
        "prompt_tokens_details": {
            "cached_tokens": int(getattr(usage, "cache_read_tokens", 0) or 0),
            "audio_tokens": int(getattr(usage, "input_audio_tokens", 0) or 0),
        },
        "completion_tokens_details": {
            "reasoning_tokens": int(getattr(usage, "reasoning_tokens", 0) or 0),
            "audio_tokens": int(getattr(usage, "output_audio_tokens", 0) or 0),
        },
    }


@register_model_class
class DSPyLM(AdapterChatModel):
    """An afnio chat client backed by a DSPy LM (``dspy.LM`` or any ``BaseLM``).

    Args:
        lm: the DSPy LM. For recorded tests and to keep every request visible to
            HTTP recorders, build it with ``engine="litellm"`` (DSPy 3.4's default
            engine talks to raw sockets).

    Extra keyword arguments of ``chat``/``achat`` (``temperature``,
    ``response_format``, ``max_tokens``...) go into the request; ``model=`` is ignored
    (the DSPy LM names its model).

    Example::

        client = DSPyLM(dspy.LM("openai/gpt-4o-mini", engine="litellm"))
        afnio.set_backward_model_client(client)
    """

    def __init__(self, lm: dspy.BaseLM) -> None:
        if not isinstance(lm, dspy.BaseLM):
            raise TypeError(
                f"`lm` must be a DSPy LM (dspy.LM or a BaseLM), got "
                f"{type(lm).__name__}."
            )
        self.lm = lm
        super().__init__(provider=f"dspy:{lm.model}")

    def __repr__(self) -> str:
        """``DSPyLM('openai/gpt-4o-mini', api_base='https://...')``: the LM's model
        and, when set, its base URL (a password or key in it masked; never the API
        key), so an error that names this client says where its requests went."""
        from afnio._secrets import mask_url

        kwargs = getattr(self.lm, "kwargs", None)
        base = None
        if isinstance(kwargs, dict):
            base = kwargs.get("api_base") or kwargs.get("base_url")
        text = f"DSPyLM({self.lm.model!r}"
        if isinstance(base, str) and base:
            text += f", api_base={mask_url(base)!r}"
        return text + ")"

    def _request(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> Any:
        for i, message in enumerate(messages):
            if message.get("role") not in _ROLES:
                raise ValueError(
                    f"messages[{i}] has role {message.get('role')!r}; use system, "
                    "user or assistant."
                )
        body = {"model": self.lm.model, "messages": messages, **kwargs}
        return dspy.lm15.request_from_openai_chat(body)

    def _call(self, request: Any) -> Any:
        # afnio's own call: not part of a traced program's graph, usage or slots
        from afnio_integrations.dspy._tracing import CallCollector

        callbacks = [
            c
            for c in (dspy.settings.callbacks or [])
            if not isinstance(c, CallCollector)
        ]
        with dspy.context(callbacks=callbacks, usage_tracker=None):
            return self.lm(request)

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Answer ``messages`` with the DSPy LM; returns the reply's text."""
        kwargs.pop("model", None)
        request = self._request(messages, kwargs)

        async def call() -> str:
            async with request_slot():
                response = await run_blocking(self._call, request)
                self.calls += 1  # answered: billed
            usage = usage_dict(getattr(response, "usage", None))
            name = model_name(str(getattr(response, "model", None) or self.lm.model))
            if usage:
                self.update_usage(usage, name)
            else:
                LEDGER.record(name)  # a call without usage
            return str(response.text or "")

        body = {"messages": messages, **kwargs}
        return await run_async(memoized(self, "chat", body, call))
