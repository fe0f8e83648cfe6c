"""Basic differentiable operations: :class:`Add`, :class:`Sum`, :class:`Split`.

Their gradients are fixed texts (no LM call): each input that requires grad receives
``"Here is the combined feedback we got for this specific <role> and other
variables: <feedback>"`` with role ``"feedback to <role>"``.

Example::

    >>> import afnio
    >>> from afnio.autodiff.basic_ops import Add, Split, Sum
    >>> Add.apply(afnio.Variable("abc", role="first input"),
    ...           afnio.Variable("def", role="second input")).data
    'abcdef'
    >>> Sum.apply([afnio.Variable("abc"), afnio.Variable("def")]).data
    '<ITEM>abc</ITEM><ITEM>def</ITEM>'
    >>> [p.data for p in Split.apply(afnio.Variable("a b c", role="text"), sep=" ")]
    ['a', 'b', 'c']
"""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable
from afnio.autodiff.function import Function

__all__ = ["Add", "Split", "Sum"]

_COMBINED_FEEDBACK = (
    "Here is the combined feedback we got for this specific {role} and other "
    "variables: {feedback}"
)
"""The gradient text of Add, Sum and Split (version 1; TextGrad's wording)."""


def _combined_feedback(role: str, feedback: Any) -> Any:
    """The combined-feedback text for a gradient's data (element-wise for a list;
    an element without feedback stays ``""``)."""
    if isinstance(feedback, list):
        return [
            _COMBINED_FEEDBACK.replace("{role}", role).replace("{feedback}", str(f))
            if f != ""
            else ""
            for f in feedback
        ]
    return _COMBINED_FEEDBACK.replace("{role}", role).replace(
        "{feedback}", str(feedback)
    )


def _feedback_to(role: str, grad: Variable) -> Variable:
    return Variable(_combined_feedback(role, grad.data), role=f"feedback to {role}")


def _add_values(a: Any, b: Any) -> Any:
    # numbers add; anything involving text concatenates
    if isinstance(a, str) or isinstance(b, str):
        return f"{a}{b}"
    return a + b


def _check_variable(value: Any, argument: str) -> Variable:
    if not isinstance(value, Variable):
        raise TypeError(
            f"`{argument}` must be a Variable, got {type(value).__name__}. Wrap it: "
            f"afnio.Variable(...)."
        )
    return value


class Add(Function):
    """``x + y``: concatenation for text, arithmetic for numbers, element-wise for
    batches of equal length. ``role = "<x.role> and <y.role>"``.

    Example::

        >>> import afnio
        >>> from afnio.autodiff.basic_ops import Add
        >>> Add.apply(afnio.Variable([1, 2, 3]), afnio.Variable([4, 5, 6])).data
        [5, 7, 9]
    """

    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, x: Variable, y: Variable) -> Variable:
        _check_variable(x, "x")
        _check_variable(y, "y")
        x_list, y_list = isinstance(x.data, list), isinstance(y.data, list)
        if x_list != y_list:
            raise ValueError(
                "Cannot add a scalar Variable and a batched (list) Variable: both "
                "must be scalars or both lists of the same length."
            )
        if x_list:
            if len(x.data) != len(y.data):
                raise ValueError(
                    f"Cannot add batches of different lengths: {len(x.data)} (`x`) "
                    f"vs {len(y.data)} (`y`)."
                )
            data: Any = [_add_values(a, b) for a, b in zip(x.data, y.data, strict=True)]
        else:
            data = _add_values(x.data, y.data)
        # roles, not the Variables: an in-place `x += y` must not change them
        ctx.save_for_backward(x.role, y.role)
        return Variable(data, role=f"{x.role} and {y.role}")

    @staticmethod
    def backward(ctx: Any, grad_output: Variable) -> tuple[Variable | None, ...]:
        roles, needs = ctx.saved_variables, ctx.needs_input_grad
        return tuple(
            _feedback_to(role, grad_output) if need else None
            for role, need in zip(roles, needs, strict=True)
        )


class Sum(Function):
    """Aggregate a list of Variables: text is wrapped in ``<ITEM>…</ITEM>`` and
    concatenated, numbers are summed, batches combine element-wise.

    Example::

        >>> import afnio
        >>> from afnio.autodiff.basic_ops import Sum
        >>> Sum.apply([afnio.Variable([1, 2, 3.5]), afnio.Variable([4, 5, 6])]).data
        [5.0, 7.0, 9.5]
    """

    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, x: list[Variable]) -> Variable:
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"`x` must be a list of Variables, got {type(x).__name__}.")
        if not x:
            raise ValueError("`x` is empty: Sum needs at least one Variable.")
        for i, v in enumerate(x):
            _check_variable(v, f"x[{i}]")
        lists = {isinstance(v.data, list) for v in x}
        if len(lists) > 1:
            raise ValueError(
                "Cannot sum scalar and batched (list) Variables together: all must be "
                "scalars or all lists of the same length."
            )
        if lists == {True}:
            lengths = {len(v.data) for v in x}
            if len(lengths) > 1:
                raise ValueError(
                    f"Cannot sum batches of different lengths: {sorted(lengths)}."
                )
            data: Any = [
                _sum_values([v.data[i] for v in x]) for i in range(lengths.pop())
            ]
        else:
            data = _sum_values([v.data for v in x])
        ctx.save_for_backward(*(v.role for v in x))
        return Variable(data, role=" and ".join(v.role for v in x))

    @staticmethod
    def backward(ctx: Any, grad_output: Variable) -> tuple[Variable | None, ...]:
        roles, needs = ctx.saved_variables, ctx.needs_input_grad
        return tuple(
            _feedback_to(role, grad_output) if need else None
            for role, need in zip(roles, needs, strict=True)
        )


def _sum_values(values: list[Any]) -> Any:
    if any(isinstance(v, str) for v in values):
        return "".join(f"<ITEM>{v}</ITEM>" for v in values)
    return sum(values)


class Split(Function):
    """Split text like ``str.split(sep, maxsplit)``; one output per part, with role
    ``"split part <i> of <x.role>"``. A batch is split per sample, shorter results
    padded with ``""``, and transposed (output ``i`` holds part ``i`` of every
    sample).

    Example::

        >>> import afnio
        >>> from afnio.autodiff.basic_ops import Split
        >>> parts = Split.apply(afnio.Variable(["afnio is great!", "Deep learning"]),
        ...                     maxsplit=2)
        >>> [p.data for p in parts]
        [['afnio', 'Deep'], ['is', 'learning'], ['great!', '']]
    """

    run_backward_inline = True

    @staticmethod
    def forward(
        ctx: Any,
        x: Variable,
        sep: str | Variable | None = None,
        maxsplit: int | Variable | None = -1,
    ) -> tuple[Variable, ...]:
        _check_variable(x, "x")
        sep_value = sep.data if isinstance(sep, Variable) else sep
        if sep_value is not None and not isinstance(sep_value, str):
            raise TypeError(
                f"`sep` must be a str, a Variable holding a str, or None; got "
                f"{type(sep_value).__name__}."
            )
        if sep_value == "":
            raise ValueError("`sep` is empty: use None to split on whitespace.")
        max_value = maxsplit.data if isinstance(maxsplit, Variable) else maxsplit
        if max_value is None:
            max_value = -1
        if isinstance(max_value, bool) or not isinstance(max_value, int):
            raise TypeError(
                f"`maxsplit` must be an int, a Variable holding an int, or None; got "
                f"{type(max_value).__name__}."
            )
        if isinstance(x.data, list):
            if not all(isinstance(s, str) for s in x.data):
                raise TypeError("`x` must hold text to be split; got numbers.")
            rows = [s.split(sep_value, max_value) for s in x.data]
            width = max((len(r) for r in rows), default=0)
            columns: list[Any] = [
                [r[i] if i < len(r) else "" for r in rows] for i in range(width)
            ]
            ctx.batch_size = len(x.data)
        else:
            if not isinstance(x.data, str):
                raise TypeError(
                    f"`x` must hold text to be split; got {type(x.data).__name__}."
                )
            columns = x.data.split(sep_value, max_value)
            ctx.batch_size = None
        ctx.save_for_backward(x.role)
        return tuple(
            Variable(part, role=f"split part {i} of {x.role}")
            for i, part in enumerate(columns)
        )

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Variable) -> tuple[Variable | None, ...]:
        (role,) = ctx.saved_variables
        nones = (None,) * (len(ctx.needs_input_grad) - 1)
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        prefix = _combined_feedback(role, "")
        n = ctx.batch_size
        if n is None:
            items = "".join(f"<ITEM>{_text(g.data)}</ITEM>" for g in grad_outputs)
            data: Any = prefix + items
        else:
            data = [
                prefix
                + "".join(
                    f"<ITEM>{_text(_sample(g.data, s, n))}</ITEM>" for g in grad_outputs
                )
                for s in range(n)
            ]
        return (Variable(data, role=f"feedback to {role}"), *nones)


def _sample(data: Any, s: int, n: int) -> Any:
    return data[s] if isinstance(data, list) and len(data) == n else data


def _text(data: Any) -> str:
    if isinstance(data, list):
        return "\n".join(str(d) for d in data if d != "")
    return str(data)
