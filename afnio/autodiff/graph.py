"""The backward graph: :class:`Node`, :class:`GradientEdge` and :class:`AccumulateGrad`.

Every Variable produced by a Function while grad mode is on has a ``grad_fn``: the
Node that will compute the gradients of that Function's inputs. ``next_functions``
holds one :class:`GradientEdge` per Variable argument of the Function, in argument
order: the producer's Node for a non-leaf, an :class:`AccumulateGrad` for a leaf that
requires grad, and ``None`` for a Variable that does not.

Example::

    >>> import afnio
    >>> x = afnio.Variable("abc", role="first input", requires_grad=True)
    >>> y = afnio.Variable("def", role="second input")
    >>> z = x + y
    >>> z.grad_fn.name()
    'AddBackward0'
    >>> [type(e.node).__name__ if e.node else None for e in z.grad_fn.next_functions]
    ['AccumulateGrad', None]
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from afnio._variable import Variable

__all__ = ["AccumulateGrad", "GradientEdge", "Node"]

_node_ids = itertools.count()


class Node:
    """A node of the backward graph.

    Attributes:
        node_id: a process-unique integer.
    """

    __module__ = "afnio.autodiff.function"

    def __init__(self, next_functions: tuple[GradientEdge, ...] | None = None) -> None:
        self._next_functions: tuple[GradientEdge, ...] = tuple(next_functions or ())
        self._name = type(self).__name__
        self.node_id = next(_node_ids)

    def name(self) -> str:
        """The node's name, e.g. ``"AddBackward0"`` or ``"AccumulateGrad"``."""
        return self._name

    @property
    def next_functions(self) -> tuple[GradientEdge, ...]:
        """One :class:`GradientEdge` per Variable input of the Function, in order."""
        return self._next_functions

    @next_functions.setter
    def next_functions(
        self, edges: tuple[GradientEdge, ...] | list[GradientEdge]
    ) -> None:
        edges = tuple(edges)
        for e in edges:
            if not isinstance(e, GradientEdge):
                raise TypeError(
                    f"next_functions must hold GradientEdge values, got "
                    f"{type(e).__name__}."
                )
        self._next_functions = edges

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Compute this node's input gradients (implemented by subclasses)."""
        raise NotImplementedError(  # abstract: subclasses implement apply
            f"{type(self).__name__}.apply is not implemented."
        )

    def __repr__(self) -> str:
        return f"<afnio.autodiff.function.{self.name()} object at {hex(id(self))}>"

    def __str__(self) -> str:
        return f"<{self.name()} object at {hex(id(self))}>"


class GradientEdge(NamedTuple):
    """An edge of the backward graph: the gradient of output ``output_nr`` of
    ``node``'s Function flows along it (``node`` is ``None`` when no gradient is
    needed)."""

    node: Node | None
    output_nr: int

    def __repr__(self) -> str:
        return f"({self.node if self.node is not None else None}, {self.output_nr})"


class AccumulateGrad(Node):
    """The sink of a leaf Variable that requires grad: gradients reaching it are
    appended to ``variable.grad`` (one entry per path, never summed)."""

    __module__ = "afnio.autodiff.function"

    def __init__(self, variable: Variable) -> None:
        super().__init__(())
        self.variable = variable

    def apply(self, gradient: Variable) -> None:  # type: ignore[override]
        """Append ``gradient`` to the leaf's ``.grad``."""
        self.variable.append_grad(gradient)
