"""Decorators for Function classes."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["evaluator"]

C = TypeVar("C", bound=type)


def evaluator(cls: C) -> C:
    """Mark a Function class as an evaluator.

    Its outputs (``score``, ``explanation``) can start a backward pass with no
    explicit gradient, even when batched: ``explanation.backward()`` uses the empty
    feedback ``""``.

    Example::

        >>> from afnio.autodiff import Function
        >>> from afnio.autodiff.decorators import evaluator
        >>> @evaluator
        ... class MyEvaluator(Function):
        ...     pass
        >>> MyEvaluator._is_evaluator
        True
    """
    cls._is_evaluator = True  # type: ignore[attr-defined]
    return cls
