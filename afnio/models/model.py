"""The base class of model clients."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

from afnio.models.usage import ExactSum, clear_usage_values, default_usage

__all__ = [
    "BaseModel",
    "ChatCompletionModel",
    "EmbeddingModel",
    "TextCompletionModel",
]


class BaseModel(ABC):
    """A model client: a provider, a config, and a running usage/cost account.

    Args:
        provider: e.g. ``"openai"``.
        config: the client's construction settings (secrets are never part of a
            checkpoint: see :meth:`__deepcopy__`).
        usage: a starting usage dict; defaults to all zeros.

    A checkpoint stores a client as ``{"class_type", "provider", "usage"}`` (what
    ``copy.deepcopy(client)`` returns); loading one needs the live client back (see
    ``Module.load_state_dict(model_clients=...)``).
    """

    def __init__(
        self,
        provider: str | None = None,
        config: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        self.provider = provider
        self._config: dict[str, Any] = dict(config or {})
        self._usage: dict[str, Any] = (
            copy.deepcopy(usage) if usage is not None else default_usage()
        )
        self._usage.setdefault("cost", {"amount": 0.0, "currency": "USD"})
        # the cost total, exact whatever order concurrent calls answer in
        self._cost_total = ExactSum()
        self.model_id = id(self)
        self.calls = 0
        """LM requests this client sent (cache hits excluded); not part of usage."""

    def get_provider(self) -> str | None:
        """The provider name."""
        return self.provider

    def get_config(self) -> dict[str, Any]:
        """A copy of the client's configuration."""
        return dict(self._config)

    def get_usage(self) -> dict[str, Any]:
        """A copy of the usage so far: token counts by kind and ``cost``."""
        return copy.deepcopy(self._usage)

    def clear_usage(self) -> None:
        """Reset every count and the cost to 0, keeping the dict's structure."""
        clear_usage_values(self._usage)

    @abstractmethod
    def update_usage(self, usage: Any, model_name: str | None = None) -> float | None:
        """Add a response's ``usage``; with ``model_name``, add its cost too (and
        return it); without (a checkpoint restore), set the cost to the saved
        amount."""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:  # type: ignore[override]
        from afnio.models.model_registry import model_class_name

        return {
            "class_type": model_class_name(type(self)),
            "provider": self.provider,
            "usage": copy.deepcopy(self._usage),
        }


class TextCompletionModel(BaseModel):
    """A client for text completion (prompt in, text out).

    Subclasses implement :meth:`acomplete`; :meth:`complete` runs it on afnio's event
    loop and waits (so it works in notebooks and async apps too).
    """

    @abstractmethod
    async def acomplete(self, prompt: str, **kwargs: Any) -> str:
        """Complete ``prompt`` and return the text."""

    def complete(self, prompt: str, **kwargs: Any) -> str:
        """Synchronous :meth:`acomplete`."""
        from afnio._runtime import run_sync

        return run_sync(self.acomplete(prompt, **kwargs))


class ChatCompletionModel(BaseModel):
    """A client for chat completion (messages in, the reply's text out).

    Subclasses implement :meth:`achat`; :meth:`chat` runs it on afnio's event loop
    and waits. ``messages`` are ``[{"role": ..., "content": str}, ...]``.
    """

    @abstractmethod
    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Answer the conversation ``messages``; return the reply's text."""

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """Synchronous :meth:`achat`."""
        from afnio._runtime import run_sync

        return run_sync(self.achat(messages, **kwargs))


class EmbeddingModel(BaseModel):
    """A client for embeddings (texts in, one vector per text out).

    Subclasses implement :meth:`aembed`; :meth:`embed` runs it on afnio's event loop
    and waits.
    """

    @abstractmethod
    async def aembed(self, input: list[str], **kwargs: Any) -> list[list[float]]:
        """Embed each text of ``input``."""

    def embed(self, input: list[str], **kwargs: Any) -> list[list[float]]:
        """Synchronous :meth:`aembed`."""
        from afnio._runtime import run_sync

        return run_sync(self.aembed(input, **kwargs))
