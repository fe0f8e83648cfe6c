"""Graph shapes: node names, next_functions, GradientEdge, AccumulateGrad."""

from __future__ import annotations

import re

import pytest

import afnio
from afnio import GradientEdge, Node, Variable
from afnio.autodiff.basic_ops import Add, Split, Sum
from afnio.autodiff.graph import AccumulateGrad


def test_add_graph_shape() -> None:
    x = Variable("abc", role="first input", requires_grad=True)
    y = Variable("def", role="second input")
    z = Add.apply(x, y)
    assert z.grad_fn.name() == "AddBackward0"
    assert str(z.grad_fn).startswith("<AddBackward0 object at 0x")
    assert re.fullmatch(
        r"<afnio\.autodiff\.function\.AddBackward0 object at 0x[0-9a-f]+>",
        repr(z.grad_fn),
    )
    edges = z.grad_fn.next_functions
    assert len(edges) == 2
    assert isinstance(edges[0].node, AccumulateGrad)
    assert "AccumulateGrad" in edges[0].node.name()
    assert edges[0].node.variable is x
    assert edges[1] == GradientEdge(None, 0)
    assert z.output_nr == 0 and not z.is_leaf


def test_non_leaf_edges_point_to_the_producer() -> None:
    x = Variable("a b", role="text", requires_grad=True)
    parts = Split.apply(x, sep=" ")
    z = Add.apply(parts[1], parts[0])
    edges = z.grad_fn.next_functions
    assert edges[0].node is parts[0].grad_fn
    assert [e.output_nr for e in edges] == [1, 0]
    assert all(p.grad_fn is parts[0].grad_fn for p in parts)
    assert [p.output_nr for p in parts] == [0, 1]


def test_split_has_one_edge_and_no_edges_for_non_variable_arguments() -> None:
    x = Variable("a b", role="text", requires_grad=True)
    parts = Split.apply(x, sep=" ")
    assert parts[0].grad_fn.name() == "SplitBackward0"
    assert len(parts[0].grad_fn.next_functions) == 1
    assert isinstance(parts[0].grad_fn.next_functions[0].node, AccumulateGrad)


def test_sum_gets_one_edge_per_variable_in_its_list() -> None:
    a = Variable("a", requires_grad=True)
    b = Variable("b")
    c = Variable("c", requires_grad=True)
    s = Sum.apply([a, b, c])
    assert s.grad_fn.name() == "SumBackward0"
    kinds = [
        type(e.node).__name__ if e.node else None for e in s.grad_fn.next_functions
    ]
    assert kinds == ["AccumulateGrad", None, "AccumulateGrad"]


def test_leaf_used_twice_shares_one_accumulator() -> None:
    x = Variable("x", requires_grad=True)
    z1 = x + Variable("a")
    z2 = x + Variable("b")
    assert z1.grad_fn.next_functions[0].node is z2.grad_fn.next_functions[0].node


def test_gradient_edge_repr_is_a_plain_pair() -> None:
    assert repr(GradientEdge(None, 0)) == "(None, 0)"
    x = Variable("x", requires_grad=True)
    edge = (x + x).grad_fn.next_functions[0]
    assert re.fullmatch(r"\(<AccumulateGrad object at 0x[0-9a-f]+>, 0\)", repr(edge))
    node, nr = edge
    assert nr == 0 and node is edge.node


def test_node_basics() -> None:
    n = Node()
    m = Node((GradientEdge(n, 0),))
    assert n.name() == "Node"
    assert m.next_functions == (GradientEdge(n, 0),)
    assert m.node_id != n.node_id
    m.next_functions = [GradientEdge(None, 0)]
    assert m.next_functions == (GradientEdge(None, 0),)
    with pytest.raises(TypeError, match="GradientEdge"):
        m.next_functions = [(n, 0, 1)]  # type: ignore[list-item]
    with pytest.raises(NotImplementedError):
        n.apply()


def test_no_graph_under_no_grad_or_without_grad_inputs() -> None:
    z = Variable("a") + Variable("b")
    assert z.grad_fn is None and z.requires_grad is False
    with afnio.no_grad():
        z = Variable("a", requires_grad=True) + Variable("b")
    assert z.grad_fn is None


def test_graph_nodes_are_collected_when_outputs_die() -> None:
    import gc
    import weakref

    x = Variable("x", requires_grad=True)
    z = x + Variable("y")
    ref = weakref.ref(z.grad_fn)
    del z
    gc.collect()
    assert ref() is None
