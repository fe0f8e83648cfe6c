"""The backward model client: the LM that writes textual gradients.

Example::

    >>> import afnio
    >>> afnio.set_backward_model_client(
    ...     "openai/gpt-4o-mini",
    ...     client_args={"api_key": "sk-test", "base_url": "http://127.0.0.1:8000/v1"},
    ...     completion_args={"temperature": 0},
    ... )
    >>> afnio.get_backward_model_client().get_provider()
    'openai'
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from afnio.models.model import ChatCompletionModel

__all__ = [
    "ModelClientSingleton",
    "backward_model_client",
    "get_backward_model_client",
    "set_backward_model_client",
]


class ModelClientSingleton:
    """The process-wide backward client: a chat client plus default completion
    arguments (``model`` among them)."""

    def __init__(self) -> None:
        self._client: ChatCompletionModel | None = None
        self._provider: str | None = None
        self._model: str | None = None
        self._client_args: dict[str, Any] = {}
        self._completion_args: dict[str, Any] = {}

    def _call_args(self, override: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**self._completion_args, **override}
        model = kwargs.pop("model", self._model)
        if model is not None:
            kwargs["model"] = model
        return kwargs

    def chat(self, messages: list[dict[str, Any]], **override: Any) -> str:
        """Chat with the backward model; ``override`` beats the completion args."""
        assert self._client is not None
        return self._client.chat(messages, **self._call_args(override))

    async def achat(self, messages: list[dict[str, Any]], **override: Any) -> str:
        """Async :meth:`chat`."""
        assert self._client is not None
        return await self._client.achat(messages, **self._call_args(override))

    @property
    def client(self) -> ChatCompletionModel:
        """The underlying model client."""
        assert self._client is not None
        return self._client

    def get_provider(self) -> str | None:
        return self._provider

    def get_usage(self) -> dict[str, Any]:
        assert self._client is not None
        return self._client.get_usage()

    def clear_usage(self) -> None:
        assert self._client is not None
        self._client.clear_usage()

    def __repr__(self) -> str:
        return (
            f"ModelClientSingleton(provider={self._provider!r}, model={self._model!r}, "
            f"client={self._client!r})"
        )


_lock = threading.Lock()
_singleton: ModelClientSingleton | None = None


def set_backward_model_client(
    model_path: str | ChatCompletionModel = "openai/gpt-4o",
    client_args: dict[str, Any] | None = None,
    completion_args: dict[str, Any] | None = None,
) -> None:
    """Set the LM that computes textual gradients during ``backward()``.

    Args:
        model_path: ``"provider/model"`` (only ``"openai"``, i.e. any
            OpenAI-compatible endpoint: pass ``base_url`` in ``client_args``), or a
            model client instance (any ``ChatCompletionModel``, including the
            integrations' LangChain and DSPy adapters); then give the model name in
            ``completion_args["model"]`` if the client needs one.
        client_args: arguments of :class:`afnio.models.openai.OpenAI`
            (``api_key`` defaults to ``OPENAI_API_KEY``, ``base_url``, ``timeout``...).
        completion_args: defaults for every backward call (``temperature``, ...).

    From a path, the client is an :class:`afnio.models.openai.OpenAI` built from
    ``client_args`` (as upstream's: ``get_backward_model_client()._client`` is an
    ``OpenAI``, whose ``_client`` is the sync ``openai.OpenAI`` SDK client). Backward
    calls still run concurrently: every afnio client sends its requests through the
    async SDK client on afnio's event loop. The client is rebuilt only when something
    changed.

    Raises:
        ValueError: for a malformed path or an unsupported provider.
    """
    global _singleton
    completion_args = dict(completion_args or {})
    if isinstance(model_path, ChatCompletionModel):
        provider = model_path.get_provider() or type(model_path).__name__
        model = completion_args.pop("model", None)
        client: ChatCompletionModel | None = model_path
        args: dict[str, Any] = {}
    elif isinstance(model_path, str):
        if "/" not in model_path:
            raise ValueError("`model_path` must be in the format 'provider/model'")
        provider, model = model_path.split("/", 1)
        if provider != "openai":
            raise ValueError(f"Unsupported provider: {provider}.")
        args = dict(client_args or {})
        if args.get("api_key") is None and os.environ.get("OPENAI_API_KEY"):
            args["api_key"] = os.environ["OPENAI_API_KEY"]
        client = None
    else:
        raise TypeError(
            "`model_path` must be a 'provider/model' string or a ChatCompletionModel, "
            f"got {type(model_path).__name__}."
        )
    with _lock:
        current = _singleton
        unchanged = (
            current is not None
            and current._provider == provider
            and current._model == model
            and current._client_args == args
            and current._completion_args == completion_args
            and (client is None or current._client is client)
        )
        if unchanged:
            return
        if client is None:
            from afnio.models.openai import OpenAI

            client = OpenAI(**args)
        new = ModelClientSingleton()
        new._client = client
        new._provider = provider
        new._model = model
        new._client_args = copy.deepcopy(args)
        new._completion_args = completion_args
        _singleton = new


def get_backward_model_client() -> ModelClientSingleton:
    """The backward client set by :func:`set_backward_model_client`.

    Raises:
        RuntimeError: if none was set.
    """
    if _singleton is None:
        raise RuntimeError(
            "No global model client set for backward pass. Call "
            "`set_backward_model_client` to define one."
        )
    return _singleton


@contextmanager
def backward_model_client(
    client: ChatCompletionModel, completion_args: dict[str, Any] | None = None
) -> Iterator[None]:
    """Use ``client`` as the backward client inside the ``with`` block, then restore
    the previous one (or none). The setting is process-wide, as
    :func:`set_backward_model_client` is.

    Example::

        with backward_model_client(client, {"model": "gpt-4o-mini"}):
            loss.backward()
    """
    global _singleton
    with _lock:
        previous = _singleton
    set_backward_model_client(client, completion_args=completion_args)
    try:
        yield
    finally:
        with _lock:
            _singleton = previous
