"""Module forms of the basic operations: :class:`Add`, :class:`Sum`, :class:`Split`."""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable
from afnio.autodiff import basic_ops
from afnio.cognitive.modules.module import Module

__all__ = ["Add", "Split", "Sum"]


class Add(Module):
    """``Add()(x, y)`` is ``x + y`` (see :class:`afnio.autodiff.basic_ops.Add`).

    Example::

        >>> import afnio
        >>> from afnio import cognitive as cog
        >>> cog.Add()(afnio.Variable("a"), afnio.Variable("b")).data
        'ab'
    """

    def forward(self, x: Variable, y: Variable) -> Variable:
        return basic_ops.Add.apply(x, y)


class Sum(Module):
    """``Sum()([a, b, ...])`` aggregates Variables (see
    :class:`afnio.autodiff.basic_ops.Sum`)."""

    def forward(self, x: list[Variable]) -> Variable:
        return basic_ops.Sum.apply(x)


class Split(Module):
    """``Split()(x, sep, maxsplit)`` splits text into parts (see
    :class:`afnio.autodiff.basic_ops.Split`). The last ``sep`` and ``maxsplit`` used
    are kept as buffers, so they are part of ``state_dict``.

    Example::

        >>> import afnio
        >>> from afnio import cognitive as cog
        >>> split = cog.Split()
        >>> [p.data for p in split(afnio.Variable("a,b"), sep=",")]
        ['a', 'b']
        >>> split.sep.data
        ','
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sep", None)
        self.register_buffer("maxsplit", None)

    def forward(
        self,
        x: Variable,
        sep: str | Variable | None = None,
        maxsplit: int | Variable | None = -1,
    ) -> tuple[Variable, ...]:
        self.sep = _as_variable(sep, "separator")
        self.maxsplit = _as_variable(maxsplit, "maximum number of splits")
        return basic_ops.Split.apply(x, self.sep, self.maxsplit)


def _as_variable(value: Any, role: str) -> Variable | None:
    if value is None or isinstance(value, Variable):
        return value
    return Variable(value, role=role)
