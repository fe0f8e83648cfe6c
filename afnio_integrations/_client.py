"""The base of the integrations' model clients (a LangChain chat model, a DSPy LM as
an afnio ``ChatCompletionModel``): usage and cost come from their responses."""

from __future__ import annotations

import threading
from typing import Any

from afnio.models.model import ChatCompletionModel
from afnio.models.phases import LEDGER
from afnio.models.pricing import cost_of
from afnio.models.usage import add_usage

__all__ = ["AdapterChatModel"]


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
                cost["amount"] += added
            elif isinstance(data.get("cost"), dict) and "amount" in data["cost"]:
                cost["amount"] = float(data["cost"]["amount"])
        if model_name is not None:
            LEDGER.record(model_name, data, added or 0.0)
        return added
