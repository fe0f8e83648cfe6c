"""The base of the integrations' model clients (a LangChain chat model, a DSPy LM as
an afnio ``ChatCompletionModel``): usage and cost come from their responses."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from afnio._runtime import get_max_concurrency
from afnio.models.model import ChatCompletionModel
from afnio.models.phases import LEDGER
from afnio.models.pricing import cost_of
from afnio.models.usage import add_usage

__all__ = ["AdapterChatModel", "run_blocking"]

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """Threads for another library's blocking calls, never fewer than afnio's bound
    (the default executor has ``cpu + 4``, which would cap the requests in flight)."""
    global _pool, _pool_size
    wanted = max(32, get_max_concurrency())
    with _pool_lock:
        if _pool is None or _pool_size < wanted:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(wanted, thread_name_prefix="afnio-adapter-lm")
            _pool_size = wanted
        return _pool


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a library's blocking call ``fn(*args, **kwargs)`` in a worker thread (with
    the caller's context variables), from afnio's event loop.

    A wrapped model's *async* client cannot be used here: its connection pool belongs
    to the event loop of the user's program (LangChain shares one pool between models
    with the same settings), and afnio's calls run on afnio's own loop."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(
        _executor(), lambda: context.run(fn, *args, **kwargs)
    )


class AdapterChatModel(ChatCompletionModel):
    """A chat client that wraps another library's model; subclasses implement
    ``achat`` and report each response with :meth:`update_usage`."""

    def __init__(self, provider: str) -> None:
        self._usage_lock = threading.Lock()
        super().__init__(provider=provider)

    def update_usage(self, usage: Any, model_name: str | None = None) -> float | None:
        """Add a response's usage; with ``model_name`` also its cost (afnio's price
        table), recorded in the phase ledger too; without (a checkpoint restore),
        set the saved cost."""
        data = dict(usage or {})
        added = None
        with self._usage_lock:
            add_usage(self._usage, data)
            cost = self._usage.setdefault("cost", {"amount": 0.0, "currency": "USD"})
            if model_name is not None:
                added = cost_of(data, model_name)
                cost["amount"] = self._cost_total.add(added, cost["amount"])
            elif isinstance(data.get("cost"), dict) and "amount" in data["cost"]:
                cost["amount"] = float(data["cost"]["amount"])
        if model_name is not None:
            LEDGER.record(model_name, data, added or 0.0)
        return added
