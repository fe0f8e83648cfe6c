"""Plain top-level functions (no import-time side effects) for function slots."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures_serialization import event_log


def shout(text: str) -> str:
    """Upper-case ``text``."""
    return text.upper()


def whisper(text: str) -> str:
    """Lower-case ``text``."""
    return text.lower()


def payload(marker: str) -> str:
    """What a hostile pickle would run: log the call and write a marker file."""
    event_log.EVENTS.append(f"payload ran: {marker}")
    Path(marker).write_text("pwned", encoding="utf-8")
    return marker


class Exploit:
    """An object whose unpickling calls :func:`payload` (``__reduce__``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (payload, (self.marker,))
