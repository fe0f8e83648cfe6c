"""Shared validation helpers and type aliases."""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable

__all__ = [
    "MultiTurnMessages",
    "_validate_multi_turn_messages",
    "_validate_typed_sequence",
]

MultiTurnMessages = list[dict[str, Any]]
"""A chat: ``[{"role": "system", "content": [Variable, ...]}, ...]``."""


def _validate_typed_sequence(
    value: Any, item_type: type | tuple[type, ...], name: str = "value"
) -> list[Any]:
    """Check that ``value`` is a list or tuple whose items are all ``item_type``.

    Returns the items as a list.

    Raises:
        TypeError: naming ``name`` and the first offending item.
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list, got {type(value).__name__}.")
    for i, item in enumerate(value):
        if not isinstance(item, item_type):
            expected = (
                " or ".join(t.__name__ for t in item_type)
                if isinstance(item_type, tuple)
                else item_type.__name__
            )
            raise TypeError(
                f"`{name}[{i}]` must be a {expected}, got {type(item).__name__}."
            )
    return list(value)


def _validate_multi_turn_messages(
    messages: Any, name: str = "messages", raise_error: bool = True
) -> bool:
    """Check that ``messages`` is a list of ``{"role": str, "content": [Variable]}``.

    Returns True when valid. With ``raise_error=False`` returns False instead of
    raising.

    Raises:
        TypeError: wrong container or value types.
        ValueError: a message without ``"role"`` or ``"content"``, or with other keys.
    """
    try:
        if not isinstance(messages, list):
            raise TypeError(
                f"`{name}` must be a list of messages, got {type(messages).__name__}."
            )
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise TypeError(
                    f"`{name}[{i}]` must be a dict with 'role' and 'content', got "
                    f"{type(msg).__name__}."
                )
            missing = [k for k in ("role", "content") if k not in msg]
            if missing:
                raise ValueError(f"`{name}[{i}]` is missing the key(s) {missing}.")
            extra = sorted(set(msg) - {"role", "content"})
            if extra:
                raise ValueError(
                    f"`{name}[{i}]` has unexpected key(s) {extra}; a message has only "
                    "'role' and 'content'."
                )
            if not isinstance(msg["role"], str):
                raise TypeError(
                    f"`{name}[{i}]['role']` must be a str, got "
                    f"{type(msg['role']).__name__}."
                )
            _validate_typed_sequence(
                msg["content"], Variable, f"{name}[{i}]['content']"
            )
    except (TypeError, ValueError):
        if raise_error:
            raise
        return False
    return True
