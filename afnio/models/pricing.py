"""Model prices and cost computation (USD per 1M tokens).

The table ships in ``model_prices.json`` (upstream's structure: per provider, aliases
and prices) and is extended at run time with :func:`register_model_price`. A dated
snapshot name (``gpt-4o-2024-08-06``) falls back to its base model. A model without a
price costs 0, logs one warning per model, and is listed by :func:`unpriced_models`.

Batch API prices (:func:`get_batch_price`) come from the same table: a model's own
``"batch": {"input", "cached", "output"}`` entry, else its synchronous price times the
provider's ``batch_discount`` (``0.5`` for OpenAI: its published batch prices are half
the synchronous ones), else the synchronous price (no discount is assumed).

Example::

    >>> from afnio.models.pricing import calculate_cost, get_model_price
    >>> price = get_model_price("gpt-4o-mini")
    >>> calculate_cost({"prompt_tokens": 1_000_000, "completion_tokens": 0}, price)
    0.15
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "ModelPrice",
    "batch_cost_of",
    "calculate_cost",
    "get_batch_price",
    "get_model_price",
    "register_model_price",
    "unpriced_models",
]

logger = logging.getLogger("afnio.models")

_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens. ``cached`` is the cached-input price (``None``: cached
    input tokens are billed at the input price)."""

    input: float
    output: float
    cached: float | None = None


class _PriceTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aliases: dict[str, dict[str, str]] = {}
        self._prices: dict[str, dict[str, ModelPrice]] = {}
        self._unpriced: set[tuple[str, str]] = set()
        self._batch_discount: dict[str, float] = {}
        self._batch_prices: dict[str, dict[str, ModelPrice]] = {}
        raw = json.loads(
            resources.files("afnio.models")
            .joinpath("model_prices.json")
            .read_text("utf-8")
        )
        for provider, table in raw.items():
            if provider.startswith("_"):
                continue
            self._aliases[provider] = dict(table.get("models", {}))
            self._prices[provider] = {
                name: ModelPrice(p["input"] or 0.0, p["output"] or 0.0, p.get("cached"))
                for name, p in table.get("pricing", {}).items()
            }
            discount = table.get("batch_discount")
            if discount is not None:
                self._batch_discount[provider] = float(discount)
            self._batch_prices[provider] = {
                name: ModelPrice(
                    p["batch"]["input"] or 0.0,
                    p["batch"]["output"] or 0.0,
                    p["batch"].get("cached"),
                )
                for name, p in table.get("pricing", {}).items()
                if isinstance(p.get("batch"), dict)
            }

    def lookup(self, model: str, provider: str) -> ModelPrice | None:
        prices = self._prices.get(provider, {})
        aliases = self._aliases.get(provider, {})
        for name in (model, aliases.get(model), _SNAPSHOT.sub("", model)):
            if name is None:
                continue
            name = aliases.get(name, name)
            if name in prices:
                return prices[name]
        return None

    def lookup_batch(self, model: str, provider: str) -> ModelPrice | None:
        own = self._batch_prices.get(provider, {})
        aliases = self._aliases.get(provider, {})
        for name in (model, aliases.get(model), _SNAPSHOT.sub("", model)):
            if name is not None and aliases.get(name, name) in own:
                return own[aliases.get(name, name)]
        price = self.lookup(model, provider)
        discount = self._batch_discount.get(provider)
        if price is None or discount is None:
            return price
        return ModelPrice(
            price.input * discount,
            price.output * discount,
            None if price.cached is None else price.cached * discount,
        )

    def register(self, model: str, provider: str, price: ModelPrice) -> None:
        with self._lock:
            self._prices.setdefault(provider, {})[model] = price
            self._unpriced.discard((provider, model))

    def note_unpriced(self, model: str, provider: str) -> None:
        with self._lock:
            if (provider, model) in self._unpriced:
                return
            self._unpriced.add((provider, model))
        logger.warning(
            "No price is known for model %r (provider %r): its calls are counted with "
            "cost 0. Register one with afnio.models.register_model_price(%r, "
            "input=..., output=..., cached=...) (USD per 1M tokens).",
            model,
            provider,
            model,
        )


_table = _PriceTable()


def get_model_price(model: str, provider: str = "openai") -> ModelPrice | None:
    """The price of ``model``, or ``None`` if unknown."""
    return _table.lookup(model, provider)


def register_model_price(
    model: str,
    *,
    input: float,
    output: float,
    cached: float | None = None,
    provider: str = "openai",
) -> None:
    """Add or override the price of ``model`` (USD per 1M tokens).

    Example::

        >>> from afnio.models import register_model_price
        >>> register_model_price("my-finetune", input=3.0, output=12.0)
    """
    for name, value in (("input", input), ("output", output), ("cached", cached)):
        if value is not None and (isinstance(value, bool) or value < 0):
            raise ValueError(f"`{name}` must be a price >= 0 (USD per 1M tokens).")
    _table.register(model, provider, ModelPrice(float(input), float(output), cached))


def get_batch_price(model: str, provider: str = "openai") -> ModelPrice | None:
    """The Batch API price of ``model`` (USD per 1M tokens), or ``None`` if unknown:
    the model's ``"batch"`` entry in the table, else its price (registered ones
    included) times the provider's ``batch_discount``, else its synchronous price.

    Example::

        >>> get_batch_price("gpt-4o-mini")
        ModelPrice(input=0.075, output=0.3, cached=0.0375)
    """
    return _table.lookup_batch(model, provider)


def batch_cost_of(
    usage: Mapping[str, Any], model: str, provider: str = "openai"
) -> float:
    """Cost of ``usage`` for ``model`` at its Batch API price
    (:func:`get_batch_price`); 0 (with a one-time warning) if unpriced."""
    price = get_batch_price(model, provider)
    if price is None:
        _table.note_unpriced(model, provider)
        return 0.0
    return calculate_cost(usage, price)


def unpriced_models() -> list[str]:
    """Models that were used without a known price (``"provider/model"``)."""
    return sorted(f"{p}/{m}" for p, m in _table._unpriced)


def calculate_cost(usage: Mapping[str, Any], price: ModelPrice) -> float:
    """Cost in USD of one response's ``usage``:
    ``(prompt - cached) * input + cached * cached_price + completion * output``."""
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    cached_price = price.input if price.cached is None else price.cached
    total = (prompt - cached) * price.input + cached * cached_price
    total += completion * price.output
    return total / 1_000_000


def cost_of(usage: Mapping[str, Any], model: str, provider: str = "openai") -> float:
    """Cost of ``usage`` for ``model``; 0 (with a one-time warning) if unpriced."""
    price = get_model_price(model, provider)
    if price is None:
        _table.note_unpriced(model, provider)
        return 0.0
    return calculate_cost(usage, price)
