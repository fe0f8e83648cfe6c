"""afnio's exceptions.

::

    AfnioError                      base of every error afnio raises on purpose
     ├── SerializationError         (also ValueError) a file afnio.load refuses:
     │                              not afnio's format, corrupted, or hostile
     ├── BackwardParseError         (also RuntimeError) the backward model's answer
     │    │                         could not be used after the retries
     │    └── GradientCountError    (also ValueError) ... it had the wrong number of
     │                              gradients
     └── JudgeParseError            (also RuntimeError) an LM judge's answer was not
                                    the expected JSON after the retries

Where the upstream contract promises a builtin exception, afnio's error subclasses
both, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "AfnioError",
    "BackwardParseError",
    "GradientCountError",
    "JudgeParseError",
    "SerializationError",
]


class AfnioError(Exception):
    """Base class of afnio's own errors."""


class SerializationError(AfnioError, ValueError):
    """``afnio.load`` refused a file (not afnio's format, corrupted, or unsafe), or
    ``afnio.save`` met a value it cannot store."""


class BackwardParseError(AfnioError, RuntimeError):
    """The backward model's answer could not be parsed as the gradients JSON after
    ``BACKWARD_PASS_MAX_RETRIES`` retries. ``node`` names the graph node."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class GradientCountError(BackwardParseError, ValueError):
    """The backward model kept returning a number of gradients different from the
    number of variables it was asked about."""


class JudgeParseError(AfnioError, RuntimeError):
    """An LM judge's answer was not ``{"score", "explanation"}`` JSON after the
    retries."""
