"""Tests for ``afnio.cognitive.Parameter`` (contract: afnio-api.md section 2,
"afnio.cognitive.Parameter(Variable)")."""

from __future__ import annotations

import copy

import pytest

import afnio
from afnio import Variable
from afnio.cognitive import Parameter


def test_parameter_is_exported_from_cognitive_and_is_a_variable_subclass():
    assert afnio.cognitive.Parameter is Parameter
    assert issubclass(Parameter, Variable)
    assert isinstance(Parameter("x"), Variable)


def test_parameter_defaults_to_requires_grad_true_and_empty_role():
    p = Parameter("Classify the sentiment.")
    assert p.data == "Classify the sentiment."
    assert p.requires_grad is True
    assert p.is_leaf is True
    assert p.grad_fn is None
    assert p.grad == []
    assert p.role == ""


def test_parameter_stores_role_and_explicit_requires_grad_false():
    p = Parameter("x", role="system prompt", requires_grad=False)
    assert p.role == "system prompt"
    assert p.requires_grad is False
    assert p.is_leaf is True


def test_parameter_accepts_positional_role_and_requires_grad():
    p = Parameter("x", "instruction", False)
    assert p.role == "instruction"
    assert p.requires_grad is False


def test_parameter_without_data_raises_type_error():
    with pytest.raises(TypeError):
        Parameter()


def test_parameter_with_explicit_none_data_raises_type_error():
    with pytest.raises(TypeError):
        Parameter(None, role="prompt")


@pytest.mark.parametrize(
    "data",
    [{"a": 1}, [["a"]], ["a", 1]],
    ids=["dict", "nested", "mixed"],
)
def test_parameter_rejects_invalid_data_like_variable(data):
    with pytest.raises(TypeError):
        Parameter(data)


def test_parameter_normalises_data_like_variable():
    assert Parameter(("a", "b")).data == ["a", "b"]
    p = Parameter([1, 2.5])
    assert p.data == [1.0, 2.5]
    assert [type(x) for x in p.data] == [float, float]
    assert Parameter(3).data == 3


def test_parameter_created_inside_no_grad_still_requires_grad():
    with afnio.no_grad():
        p = Parameter("xyz")
    assert p.requires_grad is True
    assert p.is_leaf is True


def test_parameter_gradient_flows_through_add():
    p = Parameter("You are helpful.", role="system prompt")
    out = p + Variable(" Answer briefly.", role="suffix")
    assert out.is_leaf is False
    assert out.grad_fn.name() == "AddBackward0"
    out.backward(Variable("Be more formal."))
    assert len(p.grad) == 1
    assert p.grad[0].data == (
        "Here is the combined feedback we got for this specific system prompt and "
        "other variables: Be more formal."
    )
    assert p.grad[0].role == "feedback to system prompt"


def test_parameter_iadd_under_grad_mode_raises():
    p = Parameter("a")
    with pytest.raises(RuntimeError):
        p += Variable("b")
    assert p.data == "a"


def test_parameter_iadd_under_no_grad_updates_in_place_and_stays_a_parameter():
    p = Parameter("a", role="prompt")
    original = p
    with afnio.no_grad():
        p += Variable("b", role="suffix")
    assert p is original
    assert type(p) is Parameter
    assert p.data == "ab"
    assert p.requires_grad is True
    assert p.is_leaf is True


def test_parameter_deepcopy_returns_parameter_with_same_data_role_and_flag():
    p = Parameter(["a", "b"], role="prompts", requires_grad=False)
    c = copy.deepcopy(p)
    assert c is not p
    assert type(c) is Parameter
    assert c.data == ["a", "b"]
    assert c.data is not p.data
    assert c.role == "prompts"
    assert c.requires_grad is False
    assert c.is_leaf is True


def test_parameter_deepcopy_does_not_copy_grads():
    p = Parameter("x", role="prompt")
    p.append_grad(Variable("feedback"))
    c = copy.deepcopy(p)
    assert c.grad == []
    assert len(p.grad) == 1
    assert c.requires_grad is True


def test_parameter_deepcopy_respects_memo_for_shared_parameter():
    p = Parameter("x")
    a, b = copy.deepcopy([p, p])
    assert a is b
    assert type(a) is Parameter
    assert a is not p


def test_parameter_repr_wraps_variable_repr():
    p = Parameter("Hello", role="greeting")
    assert repr(p) == (
        "Parameter containing:\n  Variable(data=Hello, role=greeting, "
        "requires_grad=True)"
    )
    assert repr(p).startswith("Parameter containing:\n  Variable(")


def test_parameter_repr_with_requires_grad_false():
    p = Parameter(3, role="n", requires_grad=False)
    assert repr(p) == (
        "Parameter containing:\n  Variable(data=3, role=n, requires_grad=False)"
    )


def test_parameter_detach_returns_plain_variable_without_grad():
    p = Parameter("x", role="prompt")
    d = p.detach()
    assert type(d) is Variable
    assert d.data == "x"
    assert d.role == "prompt"
    assert d.requires_grad is False


def test_parameter_copy_from_variable_copies_data_role_and_requires_grad():
    p = Parameter("old", role="old role")
    assert p.copy_(Variable("new", role="new role", requires_grad=True)) is p
    assert type(p) is Parameter
    assert p.data == "new"
    assert p.role == "new role"
    assert p.requires_grad is True


def test_parameter_requires_grad_can_be_toggled_and_stays_leaf():
    p = Parameter("x")
    p.requires_grad = False
    assert p.requires_grad is False
    assert p.is_leaf is True
    assert p.requires_grad_() is p
    assert p.requires_grad is True
    assert p.is_leaf is True
