"""A shared, importable log that the other fixture modules append to, so a test can
see whether their code ran (an import, or a pickle payload)."""

from __future__ import annotations

EVENTS: list[str] = []
