"""The usage dict every model client keeps: token counts by kind, and cost."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

__all__ = ["ExactSum", "add_usage", "clear_usage_values", "default_usage"]

_DEFAULT_USAGE: dict[str, Any] = {
    "completion_tokens": 0,
    "prompt_tokens": 0,
    "total_tokens": 0,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
    "cost": {"amount": 0.0, "currency": "USD"},
}


def default_usage() -> dict[str, Any]:
    """A fresh zeroed usage dict (upstream's exact shape)."""
    return copy.deepcopy(_DEFAULT_USAGE)


def clear_usage_values(usage: dict[str, Any]) -> None:
    """Reset every number (nested ones too) to 0 in place, keeping the structure."""
    for key, value in usage.items():
        if isinstance(value, dict):
            clear_usage_values(value)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, float):
            usage[key] = 0.0
        elif isinstance(value, int):
            usage[key] = 0


def add_usage(target: dict[str, Any], usage: Mapping[str, Any]) -> None:
    """Add the token counts of ``usage`` into ``target`` in place (recursively).

    ``None`` values are skipped; the ``cost`` entry is not touched (cost is computed
    by the client from its pricing table)."""
    for key, value in usage.items():
        if key == "cost" or value is None:
            continue
        if isinstance(value, Mapping):
            add_usage(target.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            target[key] = target.get(key, 0) + value


class ExactSum:
    """A running total of costs that does not depend on the order of the additions.

    Concurrent LM calls answer in any order, and float addition is not associative:
    ``(a + b) + c`` and ``(a + c) + b`` can differ in the last bits. The total is kept
    exactly (a :class:`fractions.Fraction`: every float is one) and rounded once, so a
    replayed run reports the very same figures as the recorded one, bit for bit.

    The float it last returned is remembered: when the value it is asked to add to
    is another (a usage dict cleared, or restored from a checkpoint), the total
    restarts from that value. Not thread-safe: callers hold their usage lock.

    Example::

        >>> (0.1 + 0.2) + 0.3, (0.3 + 0.2) + 0.1  # float sums depend on the order
        (0.6000000000000001, 0.6)
        >>> def total(amounts):
        ...     exact, value = ExactSum(), 0.0
        ...     for amount in amounts:
        ...         value = exact.add(amount, value)
        ...     return value
        >>> total([0.1, 0.2, 0.3]), total([0.3, 0.2, 0.1])
        (0.6, 0.6)
        >>> ExactSum().add(1.0, current=2.5)  # the usage was set meanwhile
        3.5
    """

    __slots__ = ("_exact", "_value")

    def __init__(self) -> None:
        self._exact = Fraction(0)
        self._value = 0.0

    def add(self, amount: float, current: float) -> float:
        """The total ``current + amount``, rounded once from the exact sum of every
        amount added since the total was last set to ``current``."""
        if not (math.isfinite(amount) and math.isfinite(current)):
            self._exact, self._value = Fraction(0), 0.0
            return current + amount  # nothing exact about inf or nan
        if current != self._value:
            self._exact = Fraction(current)
        self._exact += Fraction(amount)
        self._value = float(self._exact)
        return self._value
