"""The LM usage of a traced program's own calls (a LangChain chain's chat models, a
DSPy program's LMs): calls, tokens and cost, metered like a model client."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from afnio.models.phases import LEDGER
from afnio.models.pricing import cost_of
from afnio.models.usage import ExactSum, add_usage, default_usage

__all__ = ["ProgramUsage", "model_name"]


def model_name(model: str) -> str:
    """A LiteLLM/DSPy model string without its provider prefix (for pricing).

    >>> model_name("openai/gpt-4o-mini"), model_name("gpt-4o")
    ('gpt-4o-mini', 'gpt-4o')
    """
    return model.split("/", 1)[1] if "/" in model else model


class ProgramUsage:
    """LM calls, tokens and cost of a traced program's own LM calls. It has the
    client interface the Trainer meters (``get_usage()``, ``calls``), so budgets
    (``max_cost``) and run summaries include them; every call is also recorded in
    the phase ledger (phase ``forward``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls = 0
        self._usage: dict[str, Any] = default_usage()
        self._cost_total = ExactSum()  # exact whatever order the calls answer in
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return self.label

    def count_call(self, model: str | None = None) -> None:
        """One LM call (its tokens come later, through :meth:`add`)."""
        with self._lock:
            self.calls += 1
        LEDGER.record(model_name(model or "unknown"), phase="forward")

    def add(self, by_model: Mapping[str, Mapping[str, Any]]) -> None:
        """Add per-model usage (``{model: usage}``), priced by afnio's table."""
        for model, usage in by_model.items():
            data = {k: v for k, v in dict(usage).items() if v is not None}
            cost = cost_of(data, model_name(model))
            with self._lock:
                add_usage(self._usage, data)
                amount = self._usage["cost"]["amount"]
                self._usage["cost"]["amount"] = self._cost_total.add(cost, amount)
            LEDGER.record(model_name(model), data, cost, calls=0, phase="forward")

    def record(self, model: str, usage: Mapping[str, Any] | None) -> None:
        """One LM call of ``model`` with its ``usage`` (OpenAI shape)."""
        self.count_call(model)
        if usage:
            self.add({model: usage})

    def get_usage(self) -> dict[str, Any]:
        with self._lock:
            return {**self._usage, "cost": dict(self._usage["cost"])}
