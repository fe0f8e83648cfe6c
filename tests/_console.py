"""Reading what afnio prints (the Trainer's and ``optimize()``'s progress bars and
tables) as a user's wide terminal shows it."""

from __future__ import annotations

import re

import pytest

__all__ = ["ANSI", "plain_lines", "wide_plain_console"]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""A terminal escape sequence (colours, cursor moves) in captured output."""


def wide_plain_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make rich render for a wide, plain console (no colours or TTY forced by the
    environment), so that no progress line or table cell is cut or wrapped."""
    monkeypatch.setenv("COLUMNS", "250")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def plain_lines(text: str) -> list[str]:
    """``text`` without escape sequences, split at newlines, each line without its
    trailing white space."""
    return [line.rstrip() for line in ANSI.sub("", text).split("\n")]
