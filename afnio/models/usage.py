"""The usage dict every model client keeps: token counts by kind, and cost."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["add_usage", "clear_usage_values", "default_usage"]

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
