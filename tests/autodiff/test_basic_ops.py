"""Add, Sum and Split: the contract's exact forward and backward texts and roles."""

from __future__ import annotations

import pytest

from afnio import Variable
from afnio.autodiff.basic_ops import Add, Split, Sum

PREFIX = "Here is the combined feedback we got for this specific "


def test_add_strings_concatenates_and_joins_roles() -> None:
    z = Add.apply(
        Variable("abc", role="first input", requires_grad=True),
        Variable("def", role="second input"),
    )
    assert (z.data, z.role, z.requires_grad) == (
        "abcdef",
        "first input and second input",
        True,
    )


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1, 2, 3], [4, 5, 6], [5, 7, 9]),
        (1, 2.5, 3.5),
        ("n=", 3, "n=3"),
        (["a", "b"], ["c", "d"], ["ac", "bd"]),
    ],
)
def test_add_values(x: object, y: object, expected: object) -> None:
    assert Add.apply(Variable(x), Variable(y)).data == expected


def test_add_errors() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        Add.apply(Variable([1, 2]), Variable([1]))
    with pytest.raises(ValueError, match="scalar Variable and a batched"):
        Add.apply(Variable(1), Variable([1]))
    with pytest.raises(TypeError, match="`y` must be a Variable"):
        Add.apply(Variable(1), "x")


def test_add_backward_exact_text_and_role() -> None:
    x = Variable("abc", role="first input", requires_grad=True)
    y = Variable("def", role="second input")
    Add.apply(x, y).backward(Variable("MY_FEEDBACK"))
    assert len(x.grad) == 1
    assert x.grad[0].data == f"{PREFIX}first input and other variables: MY_FEEDBACK"
    assert x.grad[0].role == "feedback to first input"
    assert y.grad == []


def test_add_backward_on_a_batch_is_per_sample() -> None:
    x = Variable(["a", "b"], role="answers", requires_grad=True)
    z = Add.apply(x, Variable(["c", "d"], role="suffixes"))
    z.backward(Variable(["fix a", ""]))
    assert x.grad[0].data == [f"{PREFIX}answers and other variables: fix a", ""]


def test_sum_forward_texts_numbers_and_batches() -> None:
    s = Sum.apply(
        [
            Variable("abc", role="input1", requires_grad=True),
            Variable("def", role="input2"),
            Variable("ghi", role="input3"),
        ]
    )
    assert s.data == "<ITEM>abc</ITEM><ITEM>def</ITEM><ITEM>ghi</ITEM>"
    assert s.role == "input1 and input2 and input3"
    assert Sum.apply([Variable(1), Variable(2.5)]).data == 3.5
    assert Sum.apply([Variable([1, 2, 3.5]), Variable([4, 5, 6])]).data == [5, 7, 9.5]
    assert Sum.apply([Variable(["a", "b"]), Variable(["c", "d"])]).data == [
        "<ITEM>a</ITEM><ITEM>c</ITEM>",
        "<ITEM>b</ITEM><ITEM>d</ITEM>",
    ]


def test_sum_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        Sum.apply([])
    with pytest.raises(TypeError, match="list of Variables"):
        Sum.apply(Variable("x"))
    with pytest.raises(TypeError, match=r"`x\[1\]` must be a Variable"):
        Sum.apply([Variable("x"), "y"])
    with pytest.raises(ValueError, match="scalar and batched"):
        Sum.apply([Variable("x"), Variable(["y"])])
    with pytest.raises(ValueError, match="different lengths"):
        Sum.apply([Variable(["x"]), Variable(["y", "z"])])


def test_sum_backward_gives_each_input_the_combined_feedback() -> None:
    a = Variable("abc", role="input1", requires_grad=True)
    b = Variable("def", role="input2")
    c = Variable("ghi", role="input3", requires_grad=True)
    Sum.apply([a, b, c]).backward(Variable("FB"))
    assert a.grad[0].data == f"{PREFIX}input1 and other variables: FB"
    assert c.grad[0].data == f"{PREFIX}input3 and other variables: FB"
    assert c.grad[0].role == "feedback to input3"
    assert b.grad == []


def test_split_scalar_parts_roles_and_flags() -> None:
    x = Variable("a b c", role="sentence", requires_grad=True)
    parts = Split.apply(x, sep=" ", maxsplit=1)
    assert [p.data for p in parts] == ["a", "b c"]
    assert [p.role for p in parts] == [
        "split part 0 of sentence",
        "split part 1 of sentence",
    ]
    assert all(p.requires_grad for p in parts)
    assert [p.data for p in Split.apply(Variable("a  b"))] == ["a", "b"]


def test_split_accepts_variables_for_sep_and_maxsplit() -> None:
    parts = Split.apply(Variable("a,b,c"), Variable(","), Variable(1))
    assert [p.data for p in parts] == ["a", "b,c"]


def test_split_batch_is_padded_and_transposed() -> None:
    parts = Split.apply(Variable(["afnio is great!", "Deep learning"]), maxsplit=2)
    assert [p.data for p in parts] == [
        ["afnio", "Deep"],
        ["is", "learning"],
        ["great!", ""],
    ]


def test_split_errors() -> None:
    with pytest.raises(TypeError, match="text to be split"):
        Split.apply(Variable(3))
    with pytest.raises(TypeError, match="`sep`"):
        Split.apply(Variable("a"), sep=3)
    with pytest.raises(TypeError, match="`maxsplit`"):
        Split.apply(Variable("a"), maxsplit="1")
    with pytest.raises(ValueError, match="`sep` is empty"):
        Split.apply(Variable("a"), sep="")


def test_split_backward_on_a_batch_is_per_sample() -> None:
    x = Variable(["a b", "c d"], role="pairs", requires_grad=True)
    first, _ = Split.apply(x)
    first.backward(Variable(["F0", "F1"]))
    assert x.grad[0].data == [
        f"{PREFIX}pairs and other variables: <ITEM>F0</ITEM><ITEM></ITEM>",
        f"{PREFIX}pairs and other variables: <ITEM>F1</ITEM><ITEM></ITEM>",
    ]


def test_feedback_texts_keep_braces_literal() -> None:
    x = Variable("a", role="{role} {0}", requires_grad=True)
    z = Add.apply(x, Variable("b"))
    z.backward(Variable("{feedback.__class__} {{x}}"))
    assert x.grad[0].data == (
        f"{PREFIX}{{role}} {{0}} and other variables: {{feedback.__class__}} {{{{x}}}}"
    )
