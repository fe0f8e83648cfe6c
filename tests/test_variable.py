"""Tests for ``afnio.Variable`` (contract: afnio-api.md section 2, plus the deliberate
differences 2 (requires_grad is a property keeping is_leaf consistent), 3 (retain_grad
on a leaf is a no-op), 9 and 17 (grad mode), and the choice that the ``data`` setter
validates like the constructor)."""

from __future__ import annotations

import asyncio
import copy
import re
import threading

import pytest

import afnio
from afnio import Variable
from afnio._variable import (
    _allow_grad_fn_assignment,
    is_scalar_variable,
    is_variable,
)
from afnio.autodiff.basic_ops import Split
from afnio.autodiff.graph import AccumulateGrad, Node

LEAF_BACKWARD_MESSAGE = "Variable does not require grad or does not have a grad_fn."
ADD_TYPE_MESSAGE = "Only Variables can be added to each other."


def combined(role: str, feedback: str) -> str:
    """The gradient text Add gives an input with ``role``."""
    return (
        f"Here is the combined feedback we got for this specific {role} and other "
        f"variables: {feedback}"
    )


def make_non_leaf() -> tuple[Variable, Variable, Variable]:
    """``c = a + b`` with both inputs requiring grad; returns (a, b, c)."""
    a = Variable("a", role="A", requires_grad=True)
    b = Variable("b", role="B", requires_grad=True)
    return a, b, a + b


# -- construction and data validation -------------------------------------------------


def test_constructor_defaults_are_empty_string_empty_role_no_grad():
    v = Variable()
    assert v.data == ""
    assert v.role == ""
    assert v.requires_grad is False
    assert v.is_leaf is True
    assert v.grad == []
    assert v.grad_fn is None
    assert v.output_nr == 0


def test_constructor_stores_data_role_and_requires_grad():
    v = Variable("Hello", role="greeting", requires_grad=True)
    assert v.data == "Hello"
    assert v.role == "greeting"
    assert v.requires_grad is True
    assert v.is_leaf is True


@pytest.mark.parametrize(
    "data",
    ["", "text", 0, 42, -3, 1.5, 0.0],
    ids=["empty-str", "str", "zero", "int", "neg-int", "float", "zero-float"],
)
def test_scalar_data_is_accepted_unchanged(data):
    v = Variable(data)
    assert v.data == data
    assert type(v.data) is type(data)


@pytest.mark.parametrize(
    "data",
    [["a", "b"], [1, 2, 3], [1.5, 2.5]],
    ids=["strings", "ints", "floats"],
)
def test_homogeneous_list_data_is_accepted(data):
    v = Variable(data)
    assert v.data == data
    assert [type(x) for x in v.data] == [type(x) for x in data]


def test_tuple_data_becomes_a_list():
    v = Variable(("a", "b", "c"))
    assert type(v.data) is list
    assert v.data == ["a", "b", "c"]


def test_numeric_tuple_becomes_a_list():
    v = Variable((1, 2))
    assert type(v.data) is list
    assert v.data == [1, 2]


def test_int_float_mix_is_promoted_to_all_float():
    v = Variable([1, 2.5])
    assert v.data == [1.0, 2.5]
    assert [type(x) for x in v.data] == [float, float]


def test_int_float_mix_in_tuple_is_promoted_to_float_list():
    v = Variable((3, 0.5, 7))
    assert v.data == [3.0, 0.5, 7.0]
    assert [type(x) for x in v.data] == [float, float, float]


def test_all_int_list_is_not_promoted_to_float():
    v = Variable([1, 2])
    assert [type(x) for x in v.data] == [int, int]


def test_bool_is_accepted_because_it_is_an_int():
    v = Variable(True)
    assert v.data is True


def test_bool_list_is_accepted_as_numbers():
    v = Variable([True, False])
    assert v.data == [True, False]


def test_empty_list_is_accepted():
    v = Variable([])
    assert v.data == []
    assert type(v.data) is list


def test_empty_tuple_becomes_empty_list():
    v = Variable(())
    assert v.data == []
    assert type(v.data) is list


@pytest.mark.parametrize(
    "data",
    [None, {"a": 1}, {1, 2}, b"bytes", object()],
    ids=["None", "dict", "set", "bytes", "object"],
)
def test_non_str_number_list_data_raises_type_error(data):
    with pytest.raises(TypeError):
        Variable(data)


def test_variable_as_data_raises_type_error():
    with pytest.raises(TypeError):
        Variable(Variable("x"))


@pytest.mark.parametrize(
    "data",
    [[["a"], ["b"]], [[1, 2], [3, 4]], [1, [2]], (("a",),)],
    ids=["nested-str", "nested-num", "partly-nested", "nested-tuple"],
)
def test_nested_list_data_raises_type_error(data):
    with pytest.raises(TypeError):
        Variable(data)


@pytest.mark.parametrize(
    "data",
    [["a", 1], [1.5, "b"], ("a", 2), ["a", None], [None]],
    ids=["str-int", "float-str", "tuple-str-int", "str-None", "None-item"],
)
def test_mixed_or_invalid_list_elements_raise_type_error(data):
    with pytest.raises(TypeError):
        Variable(data)


def test_constructor_copies_list_so_caller_mutation_does_not_leak():
    source = ["a", "b"]
    v = Variable(source)
    source.append("c")
    assert v.data == ["a", "b"]


# -- data setter (validates, a deliberate choice) --------------------------------------


def test_data_setter_accepts_a_new_scalar_of_another_type():
    v = Variable("text")
    v.data = 7
    assert v.data == 7


def test_data_setter_accepts_a_list_on_a_scalar_variable():
    v = Variable("text")
    v.data = ["a", "b"]
    assert v.data == ["a", "b"]


def test_data_setter_turns_tuple_into_list():
    v = Variable("x")
    v.data = ("p", "q")
    assert type(v.data) is list
    assert v.data == ["p", "q"]


def test_data_setter_promotes_int_float_mix():
    v = Variable("x")
    v.data = [1, 2.5]
    assert v.data == [1.0, 2.5]
    assert [type(x) for x in v.data] == [float, float]


@pytest.mark.parametrize(
    "value",
    [None, {"k": "v"}, [["a"]], ["a", 1]],
    ids=["None", "dict", "nested", "mixed"],
)
def test_data_setter_rejects_invalid_value_and_keeps_old_data(value):
    v = Variable("keep me")
    with pytest.raises(TypeError):
        v.data = value
    assert v.data == "keep me"


# -- role -----------------------------------------------------------------------------


def test_role_is_a_plain_assignable_attribute():
    v = Variable("x", role="old")
    v.role = "new role"
    assert v.role == "new role"


def test_role_is_used_by_add_output():
    x = Variable("abc", role="first input")
    y = Variable("def", role="second input")
    assert (x + y).role == "first input and second input"


# -- requires_grad / is_leaf (difference 2) --------------------------------------------


def test_requires_grad_is_a_property_on_the_class():
    assert isinstance(Variable.__dict__["requires_grad"], property)


def test_requires_grad_constructor_value_is_coerced_to_bool():
    v = Variable("x", requires_grad=1)
    assert v.requires_grad is True


def test_setting_requires_grad_on_a_leaf_keeps_it_a_leaf():
    v = Variable("x")
    v.requires_grad = True
    assert v.requires_grad is True
    assert v.is_leaf is True
    v.requires_grad = False
    assert v.requires_grad is False
    assert v.is_leaf is True


def test_setting_requires_grad_true_makes_later_ops_record_the_graph():
    x = Variable("x", role="X")
    y = Variable("y", role="Y")
    x.requires_grad = True
    z = x + y
    assert z.requires_grad is True
    assert z.is_leaf is False
    assert z.grad_fn is not None
    z.backward(Variable("fb"))
    assert [g.data for g in x.grad] == [combined("X", "fb")]
    assert y.grad == []


def test_setting_requires_grad_false_makes_later_ops_untracked():
    x = Variable("x", requires_grad=True)
    x.requires_grad = False
    z = x + Variable("y")
    assert z.requires_grad is False
    assert z.is_leaf is True
    assert z.grad_fn is None


def test_setting_requires_grad_false_on_non_leaf_raises_pointing_to_detach():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="detach"):
        c.requires_grad = False
    assert c.requires_grad is True
    assert c.is_leaf is False


def test_setting_requires_grad_true_on_non_leaf_is_allowed_and_keeps_it_non_leaf():
    _, _, c = make_non_leaf()
    c.requires_grad = True
    assert c.requires_grad is True
    assert c.is_leaf is False


def test_requires_grad_underscore_sets_flag_and_returns_self():
    v = Variable("x")
    assert v.requires_grad_() is v
    assert v.requires_grad is True
    assert v.is_leaf is True
    assert v.requires_grad_(False) is v
    assert v.requires_grad is False
    assert v.is_leaf is True


def test_requires_grad_underscore_false_on_non_leaf_raises():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="detach"):
        c.requires_grad_(False)


def test_user_created_variable_is_a_leaf_with_or_without_grad():
    assert Variable("x").is_leaf is True
    assert Variable("x", requires_grad=True).is_leaf is True


def test_op_output_is_a_non_leaf_when_an_input_requires_grad():
    x = Variable("x", requires_grad=True)
    z = x + Variable("y")
    assert z.requires_grad is True
    assert z.is_leaf is False


def test_op_output_is_a_leaf_when_no_input_requires_grad():
    z = Variable("x") + Variable("y")
    assert z.requires_grad is False
    assert z.is_leaf is True
    assert z.grad_fn is None


def test_op_output_under_no_grad_is_a_leaf_without_grad_fn():
    x = Variable("x", requires_grad=True)
    with afnio.no_grad():
        z = x + Variable("y")
    assert z.requires_grad is False
    assert z.grad_fn is None
    assert z.is_leaf is True


# -- grad ------------------------------------------------------------------------------


def test_grad_defaults_to_empty_list():
    assert Variable("x").grad == []
    assert Variable("x", requires_grad=True).grad == []


def test_grad_default_list_is_not_shared_between_variables():
    a = Variable("a")
    b = Variable("b")
    a.append_grad(Variable("g"))
    assert len(a.grad) == 1
    assert b.grad == []
    assert a.grad is not b.grad


def test_grad_setter_accepts_list_of_variables():
    v = Variable("x", requires_grad=True)
    g1, g2 = Variable("g1"), Variable("g2")
    v.grad = [g1, g2]
    assert len(v.grad) == 2
    assert v.grad[0] is g1
    assert v.grad[1] is g2


def test_grad_setter_accepts_empty_list_to_clear():
    v = Variable("x", requires_grad=True)
    v.append_grad(Variable("g"))
    v.grad = []
    assert v.grad == []


@pytest.mark.parametrize(
    "value",
    [None, Variable("g"), "feedback", (Variable("g"),), [Variable("g"), "x"], [None]],
    ids=["None", "Variable", "str", "tuple", "list-with-str", "list-with-None"],
)
def test_grad_setter_rejects_non_list_of_variables(value):
    v = Variable("x", requires_grad=True)
    with pytest.raises(TypeError):
        v.grad = value
    assert v.grad == []


def test_reading_grad_of_non_leaf_without_retain_grad_raises():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="retain_grad"):
        _ = c.grad


def test_setting_grad_of_non_leaf_without_retain_grad_raises():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="retain_grad"):
        c.grad = [Variable("g")]


def test_reading_grad_of_non_leaf_still_raises_after_backward_without_retain_grad():
    _, _, c = make_non_leaf()
    d = c + Variable("x", role="X")
    d.backward(Variable("fb"))
    with pytest.raises(RuntimeError):
        _ = c.grad


def test_grad_of_non_leaf_can_be_set_after_retain_grad():
    _, _, c = make_non_leaf()
    c.retain_grad()
    g = Variable("g")
    c.grad = [g]
    assert c.grad[0] is g


def test_backward_appends_gradients_to_leaf_grad_list():
    x = Variable("x", role="X", requires_grad=True)
    z = x + Variable("y", role="Y")
    z.backward(Variable("first"), retain_graph=True)
    z.backward(Variable("second"))
    assert [g.data for g in x.grad] == [
        combined("X", "first"),
        combined("X", "second"),
    ]
    assert [g.role for g in x.grad] == ["feedback to X", "feedback to X"]
    assert all(isinstance(g, Variable) for g in x.grad)


def test_backward_leaves_input_without_requires_grad_with_empty_grad():
    x = Variable("x", requires_grad=True)
    y = Variable("y")
    (x + y).backward(Variable("fb"))
    assert y.grad == []


# -- grad_fn ---------------------------------------------------------------------------


def test_grad_fn_of_add_output_is_add_backward():
    _, _, c = make_non_leaf()
    assert isinstance(c.grad_fn, Node)
    assert c.grad_fn.name() == "AddBackward0"


def test_grad_fn_next_functions_point_to_leaf_accumulators():
    a = Variable("a", requires_grad=True)
    b = Variable("b")
    c = a + b
    nodes = [e.node for e in c.grad_fn.next_functions]
    assert isinstance(nodes[0], AccumulateGrad)
    assert nodes[0].variable is a
    assert nodes[1] is None


def test_grad_fn_assignment_outside_context_raises_attribute_error():
    v = Variable("x", requires_grad=True)
    with pytest.raises(AttributeError):
        v.grad_fn = Node()
    assert v.grad_fn is None
    assert v.is_leaf is True


def test_grad_fn_assignment_of_none_outside_context_raises_attribute_error():
    _, _, c = make_non_leaf()
    node = c.grad_fn
    with pytest.raises(AttributeError):
        c.grad_fn = None
    assert c.grad_fn is node


def test_grad_fn_assignment_inside_context_without_requires_grad_raises_runtime():
    v = Variable("x")
    with _allow_grad_fn_assignment(), pytest.raises(RuntimeError):
        v.grad_fn = Node()
    assert v.grad_fn is None


def test_grad_fn_assignment_inside_context_sets_node_and_updates_is_leaf():
    v = Variable("x", requires_grad=True)
    node = Node()
    with _allow_grad_fn_assignment():
        v.grad_fn = node
    assert v.grad_fn is node
    assert v.is_leaf is False
    with _allow_grad_fn_assignment():
        v.grad_fn = None
    assert v.grad_fn is None
    assert v.is_leaf is True


def test_grad_fn_assignment_is_forbidden_again_after_context_exits():
    v = Variable("x", requires_grad=True)
    with _allow_grad_fn_assignment():
        pass
    with pytest.raises(AttributeError):
        v.grad_fn = Node()


def test_grad_fn_assignment_context_is_reset_after_exception():
    v = Variable("x", requires_grad=True)
    with pytest.raises(ValueError), _allow_grad_fn_assignment():
        raise ValueError("boom")
    with pytest.raises(AttributeError):
        v.grad_fn = Node()


# -- output_nr -------------------------------------------------------------------------


def test_output_nr_defaults_to_zero_and_accepts_non_negative_ints():
    v = Variable("x")
    assert v.output_nr == 0
    v.output_nr = 3
    assert v.output_nr == 3
    v.output_nr = 0
    assert v.output_nr == 0


@pytest.mark.parametrize(
    "value", [-1, 1.0, "1", None], ids=["negative", "float", "str", "None"]
)
def test_output_nr_rejects_negative_or_non_int_with_type_error(value):
    v = Variable("x")
    with pytest.raises(TypeError):
        v.output_nr = value
    assert v.output_nr == 0


def test_output_nr_is_the_index_among_the_function_outputs():
    x = Variable("p q r", role="text", requires_grad=True)
    parts = Split.apply(x, sep=" ")
    assert [p.data for p in parts] == ["p", "q", "r"]
    assert [p.output_nr for p in parts] == [0, 1, 2]
    assert parts[0].grad_fn is parts[1].grad_fn is parts[2].grad_fn


# -- retain_grad (difference 3) ------------------------------------------------------


def test_retain_grad_on_a_leaf_is_a_no_op():
    v = Variable("x", requires_grad=True)
    assert v.retain_grad() is None
    assert v.is_leaf is True
    assert v.grad == []


def test_retain_grad_on_a_leaf_without_requires_grad_is_a_no_op():
    v = Variable("x")
    v.retain_grad()
    assert v.is_leaf is True
    assert v.grad == []


def test_leaf_still_receives_gradients_after_retain_grad_call():
    x = Variable("x", role="X", requires_grad=True)
    x.retain_grad()
    (x + Variable("y", role="Y")).backward(Variable("fb"))
    assert [g.data for g in x.grad] == [combined("X", "fb")]


def test_retain_grad_on_non_leaf_makes_grad_readable_and_initially_empty():
    _, _, c = make_non_leaf()
    c.retain_grad()
    assert c.grad == []
    assert c.is_leaf is False


def test_retain_grad_on_non_leaf_holds_gradient_after_backward():
    a, b, c = make_non_leaf()
    c.retain_grad()
    d = c + Variable("x", role="X")
    d.backward(Variable("fb"))
    assert len(c.grad) == 1
    assert c.grad[0].data == combined("A and B", "fb")
    assert c.grad[0].role == "feedback to A and B"
    inner = combined("A and B", "fb")
    assert [g.data for g in a.grad] == [combined("A", inner)]
    assert [g.data for g in b.grad] == [combined("B", inner)]


def test_retain_grad_on_root_holds_the_root_gradient():
    a = Variable("a", role="A", requires_grad=True)
    d = a + Variable("b", role="B")
    d.retain_grad()
    g = Variable("fb", role="feedback")
    d.backward(g)
    assert len(d.grad) == 1
    assert d.grad[0].data == "fb"


# -- append_grad -----------------------------------------------------------------------


def test_append_grad_appends_in_place_keeping_list_identity():
    v = Variable("x", requires_grad=True)
    grads = v.grad
    g1, g2 = Variable("g1"), Variable("g2")
    v.append_grad(g1)
    v.append_grad(g2)
    assert v.grad is grads
    assert grads == [g1, g2]
    assert grads[0] is g1
    assert grads[1] is g2


def test_append_grad_keeps_identity_of_a_list_assigned_through_setter():
    v = Variable("x", requires_grad=True)
    mine: list[Variable] = []
    v.grad = mine
    v.append_grad(Variable("g"))
    assert v.grad is mine
    assert len(mine) == 1


def test_append_grad_on_non_leaf_without_retain_grad_raises():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="retain_grad"):
        c.append_grad(Variable("g"))


def test_append_grad_on_non_leaf_after_retain_grad_appends():
    _, _, c = make_non_leaf()
    c.retain_grad()
    g = Variable("g")
    c.append_grad(g)
    assert len(c.grad) == 1
    assert c.grad[0] is g


@pytest.mark.parametrize(
    "value", ["feedback", None, [Variable("g")]], ids=["str", "None", "list"]
)
def test_append_grad_rejects_non_variable_with_type_error(value):
    v = Variable("x", requires_grad=True)
    with pytest.raises(TypeError):
        v.append_grad(value)
    assert v.grad == []


# -- detach ----------------------------------------------------------------------------


def test_detach_returns_new_leaf_with_same_data_and_role():
    v = Variable("text", role="input", requires_grad=True)
    v.append_grad(Variable("g"))
    d = v.detach()
    assert d is not v
    assert type(d) is Variable
    assert d.data == "text"
    assert d.role == "input"
    assert d.requires_grad is False
    assert d.is_leaf is True
    assert d.grad_fn is None
    assert d.grad == []
    assert len(v.grad) == 1


def test_detach_of_non_leaf_cuts_it_from_the_graph():
    _, _, c = make_non_leaf()
    d = c.detach()
    assert d.data == "ab"
    assert d.role == "A and B"
    assert d.grad_fn is None
    assert d.is_leaf is True
    assert d.requires_grad is False
    assert c.grad_fn is not None


def test_detach_list_data_is_independent_of_original():
    v = Variable(["a", "b"])
    d = v.detach()
    assert d.data == ["a", "b"]
    d.data.append("c")
    assert v.data == ["a", "b"]


def test_ops_on_detached_variable_do_not_record_graph():
    x = Variable("x", requires_grad=True)
    z = x.detach() + Variable("y")
    assert z.requires_grad is False
    assert z.grad_fn is None


# -- copy_ -----------------------------------------------------------------------------


def test_copy_scalar_str_to_str_copies_data_role_and_requires_grad():
    dst = Variable("old", role="old role")
    src = Variable("new", role="new role", requires_grad=True)
    assert dst.copy_(src) is dst
    assert dst.data == "new"
    assert dst.role == "new role"
    assert dst.requires_grad is True
    assert dst.is_leaf is True


def test_copy_scalar_str_to_int_changes_the_type():
    dst = Variable("abc")
    dst.copy_(Variable(5))
    assert dst.data == 5
    assert type(dst.data) is int


def test_copy_scalar_int_to_str_and_float():
    dst = Variable(1)
    dst.copy_(Variable("one"))
    assert dst.data == "one"
    dst.copy_(Variable(2.5))
    assert dst.data == 2.5


def test_copy_turns_requires_grad_off_when_source_does_not_require_grad():
    dst = Variable("x", requires_grad=True)
    dst.copy_(Variable("y", role="r"))
    assert dst.requires_grad is False
    assert dst.is_leaf is True


def test_copy_list_to_list_of_equal_length_copies_the_list():
    dst = Variable(["a", "b"], role="dst")
    src = Variable(["c", "d"], role="src")
    assert dst.copy_(src) is dst
    assert dst.data == ["c", "d"]
    assert dst.data is not src.data
    src.data.append("e")
    assert dst.data == ["c", "d"]
    assert dst.role == "src"


def test_copy_list_to_list_may_change_element_type():
    dst = Variable(["a", "b"])
    dst.copy_(Variable([1, 2]))
    assert dst.data == [1, 2]


def test_copy_list_length_mismatch_raises_value_error_and_keeps_data():
    dst = Variable(["a", "b"], role="dst")
    with pytest.raises(ValueError):
        dst.copy_(Variable(["a", "b", "c"], role="src"))
    assert dst.data == ["a", "b"]
    assert dst.role == "dst"


def test_copy_scalar_to_list_raises_value_error():
    dst = Variable(["a", "b"])
    with pytest.raises(ValueError):
        dst.copy_(Variable("a"))
    assert dst.data == ["a", "b"]


def test_copy_list_to_scalar_raises_value_error():
    dst = Variable("a")
    with pytest.raises(ValueError):
        dst.copy_(Variable(["a"]))
    assert dst.data == "a"


def test_copy_empty_list_to_empty_list_works():
    dst = Variable([], role="d")
    dst.copy_(Variable([], role="s"))
    assert dst.data == []
    assert dst.role == "s"


def test_copy_onto_non_leaf_from_non_grad_source_raises_without_partial_update():
    # copy_ would turn requires_grad off on a non-leaf, which is refused (detach is
    # the way); the refusal must not leave data and role half-copied.
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError, match="detach"):
        c.copy_(Variable("x", role="R"))
    assert c.data == "ab"
    assert c.role == "A and B"
    assert c.requires_grad is True
    assert c.is_leaf is False


def test_copy_onto_non_leaf_from_grad_source_copies_data_and_role():
    _, _, c = make_non_leaf()
    c.copy_(Variable("x", role="R", requires_grad=True))
    assert c.data == "x"
    assert c.role == "R"
    assert c.requires_grad is True


@pytest.mark.parametrize("src", ["text", 1, ["a"], None], ids=str)
def test_copy_from_non_variable_raises_type_error(src):
    dst = Variable("a")
    with pytest.raises(TypeError):
        dst.copy_(src)
    assert dst.data == "a"


# -- is_floating_point -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (1.5, True),
        (0.0, True),
        ([1.0, 2.0], True),
        ([1, 2.5], True),
        (1, False),
        (True, False),
        ("1.5", False),
        ([1, 2], False),
        (["1.0"], False),
        ([], False),
    ],
    ids=[
        "float",
        "zero-float",
        "float-list",
        "promoted-list",
        "int",
        "bool",
        "str",
        "int-list",
        "str-list",
        "empty-list",
    ],
)
def test_is_floating_point(data, expected):
    assert Variable(data).is_floating_point() is expected


# -- to(dtype) -------------------------------------------------------------------------


def test_to_int_converts_scalar_and_keeps_role_and_requires_grad():
    v = Variable("5", role="count", requires_grad=True)
    w = v.to(int)
    assert w is not v
    assert w.data == 5
    assert type(w.data) is int
    assert w.role == "count"
    assert w.requires_grad is True
    assert w.is_leaf is True
    assert v.data == "5"


def test_to_float_converts_each_list_element():
    w = Variable([1, 2]).to(float)
    assert w.data == [1.0, 2.0]
    assert [type(x) for x in w.data] == [float, float]


def test_to_str_converts_numbers_to_text():
    assert Variable(3).to(str).data == "3"
    assert Variable([1, 2]).to(str).data == ["1", "2"]


def test_to_int_truncates_float():
    assert Variable(2.7).to(int).data == 2


def test_to_without_dtype_returns_a_copy_with_same_data():
    v = Variable(["a", "b"], role="r")
    w = v.to()
    assert w is not v
    assert w.data == ["a", "b"]
    assert w.role == "r"
    assert w.requires_grad is False
    w.data.append("c")
    assert v.data == ["a", "b"]


def test_to_with_failing_scalar_conversion_raises_value_error():
    with pytest.raises(ValueError):
        Variable("abc").to(int)


def test_to_with_failing_list_element_conversion_raises_value_error():
    v = Variable(["1", "x"])
    with pytest.raises(ValueError):
        v.to(float)
    assert v.data == ["1", "x"]


@pytest.mark.parametrize(
    "data", [float("inf"), [1.0, float("-inf")]], ids=["scalar", "list"]
)
def test_to_int_of_infinity_raises_value_error(data):
    # int(inf) raises OverflowError; to() reports every failed conversion as
    # ValueError.
    with pytest.raises(ValueError):
        Variable(data).to(int)


def test_to_int_of_nan_raises_value_error():
    with pytest.raises(ValueError):
        Variable(float("nan")).to(int)


def test_to_of_non_leaf_returns_a_leaf():
    _, _, c = make_non_leaf()
    w = c.to(str)
    assert w.data == "ab"
    assert w.grad_fn is None
    assert w.is_leaf is True


# -- __add__ ---------------------------------------------------------------------------


def test_add_concatenates_strings_and_joins_roles():
    z = Variable("abc", role="first input") + Variable("def", role="second input")
    assert z.data == "abcdef"
    assert z.role == "first input and second input"


def test_add_numbers_arithmetically():
    assert (Variable(2) + Variable(3)).data == 5
    assert (Variable(1.5) + Variable(1)).data == 2.5


def test_add_lists_element_wise():
    z = Variable([1, 2, 3]) + Variable([4, 5, 6])
    assert z.data == [5, 7, 9]


def test_add_returns_new_variable_leaving_operands_unchanged():
    x, y = Variable("a"), Variable("b")
    z = x + y
    assert z is not x
    assert x.data == "a"
    assert y.data == "b"


def test_add_output_requires_grad_if_either_input_does():
    assert (Variable("a") + Variable("b", requires_grad=True)).requires_grad is True
    assert (Variable("a", requires_grad=True) + Variable("b")).requires_grad is True
    assert (Variable("a") + Variable("b")).requires_grad is False


@pytest.mark.parametrize("other", ["b", 1, None, ["b"]], ids=str)
def test_add_non_variable_raises_type_error_with_exact_message(other):
    with pytest.raises(TypeError, match=f"^{re.escape(ADD_TYPE_MESSAGE)}$"):
        Variable("a") + other


def test_there_is_no_radd_so_str_plus_variable_raises_type_error():
    assert not hasattr(Variable, "__radd__")
    with pytest.raises(TypeError):
        "a" + Variable("b")
    with pytest.raises(TypeError):
        1 + Variable(2)


def test_add_scalar_and_list_raises_value_error():
    with pytest.raises(ValueError):
        Variable("a") + Variable(["b"])


# -- __iadd__ --------------------------------------------------------------------------


def test_iadd_on_plain_leaf_updates_data_and_role_in_place():
    x = Variable("a", role="A")
    original = x
    x += Variable("b", role="B")
    assert x is original
    assert x.data == "ab"
    assert x.role == "A and B"
    assert x.requires_grad is False
    assert x.is_leaf is True
    assert x.grad_fn is None


def test_iadd_on_lists_is_element_wise():
    x = Variable([1, 2])
    x += Variable([10, 20])
    assert x.data == [11, 22]


def test_iadd_non_variable_raises_type_error_with_exact_message():
    x = Variable("a")
    with pytest.raises(TypeError, match=f"^{re.escape(ADD_TYPE_MESSAGE)}$"):
        x += "b"
    assert x.data == "a"


def test_iadd_on_leaf_requiring_grad_under_grad_mode_raises_and_keeps_data():
    x = Variable("a", role="A", requires_grad=True)
    with pytest.raises(RuntimeError):
        x += Variable("b", role="B")
    assert x.data == "a"
    assert x.role == "A"
    assert x.is_leaf is True
    assert x.grad_fn is None


def test_iadd_on_leaf_requiring_grad_under_no_grad_updates_in_place():
    x = Variable("a", role="A", requires_grad=True)
    original = x
    with afnio.no_grad():
        x += Variable("b", role="B")
    assert x is original
    assert x.data == "ab"
    assert x.role == "A and B"
    assert x.requires_grad is True
    assert x.is_leaf is True
    assert x.grad_fn is None


def test_iadd_under_no_grad_decorator_without_parentheses_works():
    x = Variable("a", requires_grad=True)

    @afnio.no_grad
    def update(v: Variable) -> None:
        v += Variable("b")

    update(x)
    assert x.data == "ab"
    assert x.is_leaf is True


def test_iadd_non_grad_leaf_plus_grad_leaf_becomes_non_leaf():
    x = Variable("a", role="A")
    y = Variable("b", role="B", requires_grad=True)
    x += y
    assert x.data == "ab"
    assert x.requires_grad is True
    assert x.is_leaf is False
    assert x.grad_fn is not None
    assert x.grad_fn.name() == "AddBackward0"
    x.backward(Variable("fb"))
    assert [g.data for g in y.grad] == [combined("B", "fb")]
    assert [g.role for g in y.grad] == ["feedback to B"]


def test_iadd_non_grad_leaf_plus_grad_leaf_under_no_grad_stays_leaf():
    x = Variable("a")
    y = Variable("b", requires_grad=True)
    with afnio.no_grad():
        x += y
    assert x.data == "ab"
    assert x.requires_grad is False
    assert x.is_leaf is True


def test_iadd_on_non_leaf_relinks_grad_fn_to_reach_original_leaves():
    a, b, c = make_non_leaf()
    old_node = c.grad_fn
    original = c
    z = Variable("z", role="Z", requires_grad=True)
    c += z
    assert c is original
    assert c.data == "abz"
    assert c.is_leaf is False
    assert c.grad_fn is not old_node
    assert c.grad_fn.name() == "AddBackward0"
    assert c.grad_fn.next_functions[0].node is old_node
    c.backward(Variable("fb"))
    for leaf, role in ((a, "A"), (b, "B")):
        assert len(leaf.grad) == 1
        assert leaf.grad[0].role == f"feedback to {role}"
        # the older graph still sees the roles it was built with ("A and B")
        assert leaf.grad[0].data == combined(role, combined("A and B", "fb"))
    assert len(z.grad) == 1
    assert z.grad[0].data == combined("Z", "fb")


def test_iadd_on_non_leaf_with_non_grad_operand_still_reaches_leaves():
    a, b, c = make_non_leaf()
    c += Variable("z", role="Z")
    assert c.data == "abz"
    assert c.is_leaf is False
    c.backward(Variable("fb"))
    assert len(a.grad) == 1
    assert len(b.grad) == 1


# -- __deepcopy__ ----------------------------------------------------------------------


def test_deepcopy_of_leaf_copies_data_role_and_flags():
    v = Variable(["a", "b"], role="batch", requires_grad=True)
    c = copy.deepcopy(v)
    assert c is not v
    assert type(c) is Variable
    assert c.data == ["a", "b"]
    assert c.data is not v.data
    assert c.role == "batch"
    assert c.requires_grad is True
    assert c.is_leaf is True
    assert c.grad_fn is None


def test_deepcopy_of_leaf_without_grad_keeps_requires_grad_false():
    c = copy.deepcopy(Variable(3, role="n"))
    assert c.data == 3
    assert c.requires_grad is False


def test_deepcopy_copies_grad_deeply():
    v = Variable("x", requires_grad=True)
    g = Variable("feedback", role="feedback to x")
    v.append_grad(g)
    c = copy.deepcopy(v)
    assert len(c.grad) == 1
    assert c.grad is not v.grad
    assert c.grad[0] is not g
    assert c.grad[0].data == "feedback"
    assert c.grad[0].role == "feedback to x"
    c.append_grad(Variable("more"))
    c.grad[0].data = "changed"
    assert len(v.grad) == 1
    assert g.data == "feedback"


def test_deepcopy_of_non_leaf_raises_runtime_error():
    _, _, c = make_non_leaf()
    with pytest.raises(RuntimeError):
        copy.deepcopy(c)


def test_deepcopy_respects_memo_for_shared_variable():
    v = Variable("x", requires_grad=True)
    a, b = copy.deepcopy([v, v])
    assert a is b
    assert a is not v


def test_deepcopy_of_retained_non_leaf_still_raises():
    _, _, c = make_non_leaf()
    c.retain_grad()
    with pytest.raises(RuntimeError):
        copy.deepcopy(c)


# -- __repr__ / __str__ ----------------------------------------------------------------


def test_repr_of_leaf_shows_data_role_and_requires_grad():
    assert (
        repr(Variable("Hello", role="greeting"))
        == "Variable(data=Hello, role=greeting, requires_grad=False)"
    )
    assert (
        repr(Variable(3, role="n", requires_grad=True))
        == "Variable(data=3, role=n, requires_grad=True)"
    )


def test_repr_of_non_leaf_shows_grad_fn_name():
    _, _, c = make_non_leaf()
    assert repr(c) == "Variable(data=ab, role=A and B, grad_fn=<AddBackward0>)"


def test_repr_of_list_data():
    assert (
        repr(Variable([1, 2], role="r"))
        == "Variable(data=[1, 2], role=r, requires_grad=False)"
    )


def test_str_of_leaf():
    assert (
        str(Variable("Hello", role="greeting", requires_grad=True))
        == "variable(Hello, role=greeting, requires_grad=True)"
    )
    assert str(Variable(2.5)) == "variable(2.5, role=, requires_grad=False)"


def test_str_keeps_a_40_char_string_whole():
    s = "x" * 40
    assert str(Variable(s, role="r")) == f"variable({s}, role=r, requires_grad=False)"


def test_str_truncates_strings_longer_than_40_chars():
    s = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOP"  # 52 chars
    v = Variable(s, role="r")
    assert str(v) == (
        "variable(abcdefghijklmnopqrst...6789ABCDEFGHIJKLMNOP, role=r, "
        "requires_grad=False)"
    )


def test_str_truncates_a_41_char_string():
    s = "a" * 20 + "M" + "z" * 20
    assert str(Variable(s)) == (
        "variable(" + "a" * 20 + "..." + "z" * 20 + ", role=, requires_grad=False)"
    )


def test_str_truncates_a_long_role():
    role = "R" * 20 + "-middle-" + "S" * 20
    assert str(Variable("x", role=role)) == (
        "variable(x, role=" + "R" * 20 + "..." + "S" * 20 + ", requires_grad=False)"
    )


def test_str_shows_lists_of_up_to_six_elements_whole():
    v = Variable([1, 2, 3, 4, 5, 6], role="r")
    assert str(v) == "variable([1, 2, 3, 4, 5, 6], role=r, requires_grad=False)"


def test_str_shows_first_and_last_three_of_longer_lists():
    v = Variable([1, 2, 3, 4, 5, 6, 7], role="r")
    assert str(v) == "variable([1, 2, 3, ..., 5, 6, 7], role=r, requires_grad=False)"


def test_str_of_string_list_is_unquoted_and_truncates_long_elements():
    long = "b" * 20 + "-" + "c" * 20
    v = Variable(["a", long], role="r")
    assert str(v) == (
        "variable([a, " + "b" * 20 + "..." + "c" * 20 + "], role=r, "
        "requires_grad=False)"
    )


# -- is_variable / is_scalar_variable --------------------------------------------------


def test_is_variable():
    assert is_variable(Variable("x")) is True
    assert is_variable("x") is False
    assert is_variable(None) is False


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (Variable("x"), True),
        (Variable(""), True),
        (Variable(1), True),
        (Variable(1.5), True),
        (Variable(["x"]), False),
        (Variable([]), False),
        ("x", False),
        (1, False),
    ],
    ids=[
        "str",
        "empty-str",
        "int",
        "float",
        "list",
        "empty-list",
        "raw-str",
        "raw-int",
    ],
)
def test_is_scalar_variable(obj, expected):
    assert is_scalar_variable(obj) is expected


# -- backward --------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_backward_on_a_leaf_raises_with_exact_message(requires_grad):
    v = Variable("x", requires_grad=requires_grad)
    with pytest.raises(RuntimeError, match=f"^{re.escape(LEAF_BACKWARD_MESSAGE)}$"):
        v.backward(Variable("fb"))
    assert v.grad == []


def test_backward_on_untracked_op_output_raises_leaf_message():
    z = Variable("a") + Variable("b")
    with pytest.raises(RuntimeError, match=f"^{re.escape(LEAF_BACKWARD_MESSAGE)}$"):
        z.backward()


def test_abackward_on_a_leaf_raises_with_exact_message():
    v = Variable("x", requires_grad=True)
    with pytest.raises(RuntimeError, match=f"^{re.escape(LEAF_BACKWARD_MESSAGE)}$"):
        asyncio.run(v.abackward(Variable("fb")))


def test_backward_without_gradient_on_scalar_root_uses_empty_feedback():
    x = Variable("x", role="X", requires_grad=True)
    (x + Variable("y")).backward()
    assert [g.data for g in x.grad] == [combined("X", "")]


def test_abackward_on_non_leaf_accumulates_gradient():
    x = Variable("x", role="X", requires_grad=True)
    z = x + Variable("y")
    asyncio.run(z.abackward(Variable("fb")))
    assert [g.data for g in x.grad] == [combined("X", "fb")]


# -- grad mode is per thread and per task (difference 17) ------------------------------


def test_no_grad_in_one_asyncio_task_does_not_affect_ops_in_another():
    x = Variable("x", requires_grad=True)
    results: dict[str, Variable] = {}

    async def untracked(entered: asyncio.Event, done: asyncio.Event) -> None:
        with afnio.no_grad():
            entered.set()
            await done.wait()
            results["untracked"] = x + Variable("u")

    async def tracked(entered: asyncio.Event, done: asyncio.Event) -> None:
        await entered.wait()
        results["tracked"] = x + Variable("t")
        done.set()

    async def main() -> None:
        entered, done = asyncio.Event(), asyncio.Event()
        await asyncio.gather(untracked(entered, done), tracked(entered, done))

    asyncio.run(main())
    assert results["tracked"].requires_grad is True
    assert results["tracked"].is_leaf is False
    assert results["untracked"].requires_grad is False
    assert results["untracked"].is_leaf is True


def test_new_thread_records_graph_while_main_thread_is_in_no_grad():
    x = Variable("x", requires_grad=True)
    out: list[Variable] = []
    with afnio.no_grad():
        t = threading.Thread(target=lambda: out.append(x + Variable("y")))
        t.start()
        t.join()
        inside = x + Variable("z")
    assert out[0].requires_grad is True
    assert out[0].is_leaf is False
    assert inside.requires_grad is False
