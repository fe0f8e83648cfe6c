"""afnio's exceptions.

::

    AfnioError                      base of every error afnio raises on purpose
     └── SerializationError         (also ValueError) a file afnio.load refuses:
                                    not afnio's format, corrupted, or hostile

Where the upstream contract promises a builtin exception, afnio's error subclasses
both, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["AfnioError", "SerializationError"]


class AfnioError(Exception):
    """Base class of afnio's own errors."""


class SerializationError(AfnioError, ValueError):
    """``afnio.load`` refused a file (not afnio's format, corrupted, or unsafe), or
    ``afnio.save`` met a value it cannot store."""
