"""``afnio.cognitive.Parameter``: a Variable that is a trainable part of a Module."""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable, VariableData

__all__ = ["Parameter"]


class Parameter(Variable):
    """A Variable to optimize (a prompt, an instruction). ``requires_grad`` defaults
    to True, also inside ``no_grad()``.

    Args:
        data: as for :class:`~afnio.Variable`; ``None`` is rejected.
        role: what the parameter is ("system prompt for sentiment classification").
        requires_grad: defaults to True.

    Example::

        >>> from afnio.cognitive import Parameter
        >>> p = Parameter("Classify the sentiment.", role="system prompt")
        >>> p.requires_grad, p.is_leaf
        (True, True)
    """

    def __init__(
        self,
        data: VariableData | None = None,
        role: str | None = None,
        requires_grad: bool = True,
    ) -> None:
        if data is None:
            raise TypeError(
                "`data` of a Parameter must be a str, int, float or a list of them; "
                'got None. Pass the initial value, e.g. Parameter("You are ...").'
            )
        super().__init__(
            data, role="" if role is None else role, requires_grad=requires_grad
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Parameter:
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(self._copy_data(), self.role, self.requires_grad)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return "Parameter containing:\n  " + super().__repr__()
