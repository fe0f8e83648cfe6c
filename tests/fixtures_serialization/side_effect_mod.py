"""A module whose import is visible: it appends ``"imported <name>"`` to
``event_log.EVENTS``. Tests load checkpoints naming :func:`hooked` and check that
this module is imported only when ``allow_functions`` permits it."""

from __future__ import annotations

from tests.fixtures_serialization import event_log

event_log.EVENTS.append(f"imported {__name__}")


def hooked(values: list[int]) -> int:
    """A plain top-level function (importable by path)."""
    return len(values)
