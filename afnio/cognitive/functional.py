"""Functional forms of afnio's differentiable operations (``afnio.functional``).

Example::

    >>> import afnio
    >>> import afnio.functional as F
    >>> F.add(afnio.Variable("a"), afnio.Variable("b")).data
    'ab'
"""

from __future__ import annotations

from afnio._variable import Variable
from afnio.autodiff.basic_ops import Add, Split, Sum

__all__ = ["add", "split", "sum"]


def add(x: Variable, y: Variable) -> Variable:
    """``x + y`` (see :class:`afnio.autodiff.basic_ops.Add`)."""
    return Add.apply(x, y)


def sum(x: list[Variable]) -> Variable:
    """Aggregate Variables (see :class:`afnio.autodiff.basic_ops.Sum`)."""
    return Sum.apply(x)


def split(
    x: Variable,
    sep: str | Variable | None = None,
    maxsplit: int | Variable | None = -1,
) -> tuple[Variable, ...]:
    """Split text into parts (see :class:`afnio.autodiff.basic_ops.Split`)."""
    return Split.apply(x, sep, maxsplit)
