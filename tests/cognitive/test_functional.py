"""afnio.functional wrappers behave like the Functions they wrap."""

from __future__ import annotations

import afnio.functional as F

import afnio
from afnio import Variable


def test_functional_wrappers_build_the_same_graph() -> None:
    x = Variable("a b", role="text", requires_grad=True)
    first, second = F.split(x, " ")
    joined = F.add(second, first)
    total = F.sum([joined, Variable("!", role="mark")])
    assert total.data == "<ITEM>ba</ITEM><ITEM>!</ITEM>"
    assert total.grad_fn.name() == "SumBackward0"
    assert joined.grad_fn.name() == "AddBackward0"
    total.backward(Variable("G"))
    assert len(x.grad) == 1
    assert x.grad[0].data.startswith(
        "Here is the combined feedback we got for this specific text and other "
        "variables:"
    )


def test_functional_sum_does_not_shadow_builtin_sum() -> None:
    assert sum([1, 2]) == 3
    assert afnio.functional.sum([Variable(1), Variable(2)]).data == 3
