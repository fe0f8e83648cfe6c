"""``afnio.Variable``: a piece of text (or a number) that gradients can flow through.

A Variable holds ``data`` (a ``str``, ``int`` or ``float`` scalar, or a flat list of
them: a *batch*, one element per sample), a ``role`` describing what it is (used in
the prompts of backward LM calls), and graph bookkeeping like a ``torch.Tensor``.
Gradients are **text**: ``grad`` is a list of Variables holding feedback, one entry
appended per backward path (never summed).

Example::

    >>> import afnio
    >>> x = afnio.Variable("Hello", role="greeting", requires_grad=True)
    >>> y = afnio.Variable(" world", role="addressee")
    >>> z = x + y
    >>> z.data, z.role
    ('Hello world', 'greeting and addressee')
    >>> z.backward(afnio.Variable("Be more formal."))
    >>> x.grad[0].data
    'Here is the combined feedback we got for this specific greeting and other variables: Be more formal.'
"""  # noqa: E501

from __future__ import annotations

import contextlib
import contextvars
import copy
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afnio.autodiff.graph import AccumulateGrad, GradientEdge, Node

__all__ = [
    "Variable",
    "VariableData",
    "is_scalar_variable",
    "is_variable",
]

VariableData = str | int | float | list[str] | list[int] | list[float]

_grad_fn_assignment_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "afnio_grad_fn_assignment_allowed", default=False
)


@contextlib.contextmanager
def _allow_grad_fn_assignment() -> Iterator[None]:
    """Allow assigning ``Variable.grad_fn`` inside the block (engine use only)."""
    token = _grad_fn_assignment_allowed.set(True)
    try:
        yield
    finally:
        _grad_fn_assignment_allowed.reset(token)


def _validate_data(data: Any, argument: str = "data") -> Any:
    """Check and normalise Variable data: tuples become lists, int/float mixes
    become floats."""
    if isinstance(data, (str, int, float)):
        return data
    if isinstance(data, (list, tuple)):
        items = list(data)
        if all(isinstance(d, str) for d in items):
            return items
        if all(isinstance(d, (int, float)) for d in items):
            if any(isinstance(d, float) for d in items) and not all(
                isinstance(d, float) for d in items
            ):
                return [float(d) for d in items]
            return items
        kinds = sorted({type(d).__name__ for d in items})
        raise TypeError(
            f"`{argument}` as a list must be flat and hold only strings or only "
            f"numbers (a batch, one element per sample); got element types {kinds}."
        )
    raise TypeError(
        f"`{argument}` must be a str, int, float, or a list/tuple of them; got "
        f'{type(data).__name__}. For an empty value use "".'
    )


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value if len(value) <= 40 else f"{value[:20]}...{value[-20:]}"
    if isinstance(value, list):
        items = [_short(v) for v in value]
        if len(items) > 6:
            items = [*items[:3], "...", *items[-3:]]
        return "[" + ", ".join(items) + "]"
    return str(value)


class Variable:
    """A node of a textual computation graph.

    Args:
        data: a ``str``, ``int`` or ``float``, or a flat list/tuple of only strings
            or only numbers (a batch). Tuples become lists; int/float mixes become
            floats.
        role: what this value is, in words ("system prompt", "customer message");
            backward prompts use it.
        requires_grad: whether gradients should be computed for it.

    Raises:
        TypeError: for any other ``data`` (``None``, dicts, nested lists, mixed lists).
    """

    def __init__(
        self,
        data: VariableData | tuple[Any, ...] = "",
        role: str = "",
        requires_grad: bool = False,
    ) -> None:
        self._data = _validate_data(data)
        if not isinstance(role, str):
            raise TypeError(f"`role` must be a str, got {type(role).__name__}.")
        self.role = role
        self._requires_grad = bool(requires_grad)
        self._grad: list[Variable] = []
        self._grad_fn: Node | None = None
        self._output_nr = 0
        self._retain_grad = False
        self._grad_accumulator: weakref.ref[AccumulateGrad] | None = None

    # -- data and flags --------------------------------------------------------------

    @property
    def data(self) -> Any:
        """The value: a scalar, or a list with one element per sample."""
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = _validate_data(value)

    @property
    def requires_grad(self) -> bool:
        """Whether gradients are computed for this Variable.

        Setting it on a leaf changes ``is_leaf`` consistently. A non-leaf always
        requires grad; to cut it from the graph use :meth:`detach`.
        """
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, mode: bool) -> None:
        mode = bool(mode)
        if not mode and self._grad_fn is not None:
            raise RuntimeError(
                "You can only change requires_grad of leaf Variables. To use a "
                "computed Variable without gradients, use var.detach()."
            )
        self._requires_grad = mode

    @property
    def is_leaf(self) -> bool:
        """True for Variables the user created (and for any that does not require
        grad); False for outputs of a Function recorded in the graph."""
        return not self._requires_grad or self._grad_fn is None

    @property
    def grad_fn(self) -> Node | None:
        """The Node that produced this Variable, or ``None`` for a leaf."""
        return self._grad_fn

    @grad_fn.setter
    def grad_fn(self, node: Node | None) -> None:
        if not _grad_fn_assignment_allowed.get():
            raise AttributeError(
                "grad_fn is set by the autodiff engine and cannot be assigned."
            )
        if not self._requires_grad:
            raise RuntimeError(
                "Cannot set grad_fn on a Variable that does not require grad."
            )
        self._grad_fn = node

    @property
    def output_nr(self) -> int:
        """This Variable's index among the outputs of the Function that made it."""
        return self._output_nr

    @output_nr.setter
    def output_nr(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"output_nr must be an int >= 0, got {n!r}.")
        self._output_nr = n

    def _set_grad_fn(self, node: Node, output_nr: int) -> None:
        self._requires_grad = True
        self._grad_fn = node
        self._output_nr = output_nr

    # -- gradients -------------------------------------------------------------------

    def _check_grad_access(self, what: str) -> None:
        if not (self.is_leaf or self._retain_grad):
            raise RuntimeError(
                f"Cannot {what} .grad of a non-leaf Variable: its gradients are not "
                "retained by the backward pass. Call .retain_grad() on it before "
                "calling .backward() if you need them."
            )

    @property
    def grad(self) -> list[Variable]:
        """The gradients (feedback Variables) accumulated so far, one per path and
        backward call."""
        self._check_grad_access("read")
        return self._grad

    @grad.setter
    def grad(self, gradient: list[Variable]) -> None:
        self._check_grad_access("set")
        if not isinstance(gradient, list) or not all(
            isinstance(g, Variable) for g in gradient
        ):
            raise TypeError(
                f"`.grad` must be a list of Variables, got {type(gradient).__name__}."
            )
        self._grad = gradient

    def append_grad(self, gradient: Variable) -> None:
        """Append one gradient to ``.grad`` in place (the list keeps its identity).

        Raises:
            TypeError: if ``gradient`` is not a Variable.
            RuntimeError: on a non-leaf without :meth:`retain_grad`.
        """
        if not isinstance(gradient, Variable):
            raise TypeError(
                f"`gradient` must be a Variable, got {type(gradient).__name__}."
            )
        self._check_grad_access("append to")
        self._grad.append(gradient)

    def retain_grad(self) -> None:
        """Keep the gradients of this non-leaf Variable in ``.grad`` during backward.
        On a leaf it does nothing (leaves always keep theirs)."""
        if self.is_leaf:
            return
        self._retain_grad = True
        self._grad_fn._retained[self._output_nr] = weakref.ref(self)  # type: ignore[union-attr]

    def requires_grad_(self, mode: bool = True) -> Variable:
        """Set :attr:`requires_grad` in place and return ``self``."""
        self.requires_grad = mode
        return self

    def _get_grad_accumulator(self) -> AccumulateGrad:
        from afnio.autodiff.graph import AccumulateGrad

        acc = self._grad_accumulator() if self._grad_accumulator else None
        if acc is None:
            acc = AccumulateGrad(self)
            self._grad_accumulator = weakref.ref(acc)
        return acc

    def backward(
        self,
        gradient: Variable | None = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs: Variable
        | GradientEdge
        | Sequence[Variable | GradientEdge]
        | None = None,
    ) -> None:
        """Compute textual gradients of this Variable with respect to the graph leaves.

        Args:
            gradient: the feedback on this Variable. May be omitted for a scalar
                Variable and for an evaluator's outputs: the empty feedback ``""``
                is used.
            retain_graph: keep the graph for another backward; defaults to
                ``create_graph``.
            create_graph: record the graph of the backward computation itself.
            inputs: leaves to accumulate into; others are left untouched and work
                that only serves them is skipped.

        Raises:
            RuntimeError: if this Variable is a leaf (it has no graph to go through).
        """
        if self.is_leaf:
            raise RuntimeError(
                "Variable does not require grad or does not have a grad_fn."
            )
        from afnio.autodiff.engine import backward

        backward(self, gradient, retain_graph, create_graph, inputs=inputs)

    async def abackward(
        self,
        gradient: Variable | None = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs: Variable
        | GradientEdge
        | Sequence[Variable | GradientEdge]
        | None = None,
    ) -> None:
        """Async :meth:`backward`, for use inside a running event loop."""
        if self.is_leaf:
            raise RuntimeError(
                "Variable does not require grad or does not have a grad_fn."
            )
        from afnio.autodiff.engine import abackward

        await abackward(self, gradient, retain_graph, create_graph, inputs=inputs)

    # -- copies and conversions ------------------------------------------------------

    def detach(self) -> Variable:
        """A new leaf Variable with the same data and role, outside any graph."""
        return Variable(self._copy_data(), role=self.role, requires_grad=False)

    def _copy_data(self) -> Any:
        return list(self._data) if isinstance(self._data, list) else self._data

    def copy_(self, src: Variable) -> Variable:
        """Copy ``src``'s data, role and ``requires_grad`` into this Variable.

        Scalar to scalar (types may differ) and list to list of equal length.

        Raises:
            TypeError: if ``src`` is not a Variable.
            ValueError: for scalar/list mismatches and lists of different lengths.
        """
        if not isinstance(src, Variable):
            raise TypeError(f"`src` must be a Variable, got {type(src).__name__}.")
        self_list, src_list = isinstance(self._data, list), isinstance(src.data, list)
        if self_list != src_list:
            raise ValueError(
                f"Cannot copy data from {type(src.data).__name__} to "
                f"{type(self._data).__name__}: both must be scalars or both lists."
            )
        if self_list and len(self._data) != len(src.data):
            raise ValueError(
                f"Cannot copy list data of different lengths: {len(self._data)} "
                f"(this Variable) vs {len(src.data)} (`src`)."
            )
        self.requires_grad = src.requires_grad  # first: it may refuse (non-leaf)
        self._data = src._copy_data()
        self.role = src.role
        return self

    def is_floating_point(self) -> bool:
        """True if ``data`` is a float, or a non-empty list of floats."""
        if isinstance(self._data, float):
            return True
        return (
            isinstance(self._data, list)
            and bool(self._data)
            and all(isinstance(d, float) for d in self._data)
        )

    def to(self, dtype: Callable[[Any], Any] | None = None) -> Variable:
        """A new Variable with ``dtype`` (e.g. ``int``, ``float``, ``str``) applied to
        the scalar or to each element; role and ``requires_grad`` are kept.

        Raises:
            ValueError: if an element cannot be converted.
        """
        if dtype is None:
            new = self._copy_data()
        else:
            try:
                if isinstance(self._data, list):
                    new = [dtype(d) for d in self._data]
                else:
                    new = dtype(self._data)
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(
                    f"Variable.to(dtype={getattr(dtype, '__name__', dtype)}) "
                    f"failed: {e}"
                ) from e
        return Variable(new, role=self.role, requires_grad=self.requires_grad)

    # -- operators -------------------------------------------------------------------

    def __add__(self, other: Variable) -> Variable:
        if not isinstance(other, Variable):
            raise TypeError("Only Variables can be added to each other.")
        from afnio.autodiff.basic_ops import Add

        return Add.apply(self, other)

    def __iadd__(self, other: Variable) -> Variable:
        if not isinstance(other, Variable):
            raise TypeError("Only Variables can be added to each other.")
        from afnio.autodiff.basic_ops import Add
        from afnio.autodiff.grad_mode import is_grad_enabled

        if is_grad_enabled() and self.is_leaf and self.requires_grad:
            raise RuntimeError(
                "A leaf Variable that requires grad is being used in an in-place "
                "operation (+=). Use `x = x + y` instead, or do it under "
                "afnio.no_grad()."
            )
        result = Add.apply(self, other)
        self._data = result.data
        self.role = result.role
        if result.requires_grad:
            old_fn, old_nr = self._grad_fn, self._output_nr
            self._set_grad_fn(result.grad_fn, result.output_nr)  # type: ignore[arg-type]
            if self._retain_grad:
                # keep retaining the gradient of the current value, not the old one
                if old_fn is not None:
                    old_fn._retained.pop(old_nr, None)  # type: ignore[attr-defined]
                self._grad_fn._retained[self._output_nr] = weakref.ref(self)  # type: ignore[union-attr]
        return self

    # -- copying and printing --------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Variable:
        if not self.is_leaf:
            raise RuntimeError(
                "Only Variables created explicitly by the user (graph leaves) support "
                "deepcopy. Use .detach() to copy a computed Variable."
            )
        if id(self) in memo:
            return memo[id(self)]
        new = Variable(
            copy.deepcopy(self._data, memo),
            role=self.role,
            requires_grad=self._requires_grad,
        )
        new._retain_grad = self._retain_grad
        new._grad = copy.deepcopy(self._grad, memo)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        head = f"Variable(data={_short(self._data)}, role={_short(self.role)}, "
        if self._grad_fn is not None:
            return head + f"grad_fn=<{self._grad_fn.name()}>)"
        return head + f"requires_grad={self._requires_grad})"

    def __str__(self) -> str:
        return (
            f"variable({_short(self._data)}, role={_short(self.role)}, "
            f"requires_grad={self._requires_grad})"
        )


def is_variable(obj: Any) -> bool:
    """Return True if ``obj`` is a :class:`Variable`."""
    return isinstance(obj, Variable)


def is_scalar_variable(obj: Any) -> bool:
    """Return True if ``obj`` is a Variable whose data is a ``str``, ``int`` or
    ``float`` (not a batch)."""
    return isinstance(obj, Variable) and isinstance(obj.data, (str, int, float))
