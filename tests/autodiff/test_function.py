"""Custom Functions: apply, both ways of writing forward, ctx, slots, outputs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function
from afnio.autodiff.graph import AccumulateGrad


class Shout(Function):
    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, x: Variable, suffix: str = "!") -> Variable:
        ctx.save_for_backward(x, suffix)
        ctx.note = "kept"
        return Variable(str(x.data).upper() + suffix, role=f"shouted {x.role}")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable, None]:
        x, suffix = ctx.saved_variables
        assert ctx.note == "kept"
        return Variable(f"{grad.data} [{x.role}{suffix}]", role="feedback"), None


class Echo(Function):
    """Usage 2: forward without ctx, plus setup_context."""

    run_backward_inline = True
    seen_inputs: tuple[Any, ...] = ()

    @staticmethod
    def forward(x: Variable, times: int = 2) -> Variable:
        return Variable(str(x.data) * times, role=x.role)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Variable) -> None:
        Echo.seen_inputs = inputs
        ctx.times = inputs[1]
        ctx.output_data = output.data

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable, None]:
        return Variable(f"{grad.data} x{ctx.times}", role="feedback"), None


def test_usage_one_forward_with_ctx() -> None:
    x = Variable("hi", role="greeting", requires_grad=True)
    y = Shout.apply(x)
    assert (y.data, y.role) == ("HI!", "shouted greeting")
    y.backward(Variable("quieter"))
    assert [g.data for g in x.grad] == ["quieter [greeting!]"]


def test_usage_two_setup_context_gets_inputs_with_defaults_applied() -> None:
    x = Variable("ab", role="r", requires_grad=True)
    y = Echo.apply(x)
    assert y.data == "abab"
    assert Echo.seen_inputs == (x, 2)
    y.backward(Variable("g"))
    assert [g.data for g in x.grad] == ["g x2"]


def test_keyword_arguments_are_bound_to_the_signature() -> None:
    x = Variable("ab", role="r", requires_grad=True)
    assert Echo.apply(x=x, times=3).data == "ababab"
    with pytest.raises(TypeError, match=r"Echo\.apply\(\)"):
        Echo.apply(x, 1, 2)


def test_function_cannot_be_instantiated() -> None:
    with pytest.raises(RuntimeError, match=r"Shout\.apply"):
        Shout()


def test_base_methods_raise_clearly() -> None:
    message = r"setup_context is not implemented\."
    with pytest.raises(NotImplementedError, match=message):
        Function.setup_context(None, (), None)  # type: ignore[arg-type]

    class NoForward(Function):
        pass

    with pytest.raises(NotImplementedError, match="forward"):
        NoForward.apply(Variable("x"))


def test_forward_runs_with_grad_mode_off() -> None:
    class Inner(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            inner = x + Variable("y")
            ctx.inner_recorded = inner.requires_grad
            ctx.mode = afnio.is_grad_enabled()
            return inner

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            return grad

    x = Variable("x", requires_grad=True)
    y = Inner.apply(x)
    assert y.grad_fn.inner_recorded is False
    assert y.grad_fn.mode is False
    assert afnio.is_grad_enabled() is True


def test_multiple_outputs_share_the_node_with_their_output_nr() -> None:
    class Two(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> list[Variable]:
            return [Variable("a", role="first"), Variable("b", role="second")]

        @staticmethod
        def backward(ctx: Any, g1: Variable, g2: Variable) -> Variable:
            return Variable(f"{g1.data}|{g2.data}", role="feedback")

    x = Variable("x", requires_grad=True)
    out = Two.apply(x)
    assert isinstance(out, tuple)
    a, b = out
    assert a.grad_fn is b.grad_fn and (a.output_nr, b.output_nr) == (0, 1)
    b.backward(Variable("B"))
    assert [g.data for g in x.grad] == ["|B"]  # the missing one is materialised as ""


def test_set_materialize_grads_false_passes_none() -> None:
    seen: list[Any] = []

    class Two(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> tuple[Variable, Variable]:
            ctx.set_materialize_grads(False)
            return Variable("a"), Variable("b")

        @staticmethod
        def backward(ctx: Any, g1: Any, g2: Any) -> Variable:
            seen.extend([g1, g2])
            return Variable("fb")

    x = Variable("x", requires_grad=True)
    a, _ = Two.apply(x)
    a.backward(Variable("A"))
    assert seen[1] is None and seen[0].data == "A"


def test_variables_inside_lists_and_dicts_get_edges_in_flattened_order() -> None:
    received: list[Any] = []

    class Chat(Function):
        run_backward_inline = True

        @staticmethod
        def forward(
            ctx: Any,
            client: Any,
            messages: list[dict[str, Any]],
            inputs: dict[str, Any],
        ) -> Variable:
            received.append(ctx.needs_input_grad)
            return Variable("reply", role="response")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> tuple[Any, ...]:
            return (
                None,
                Variable("to system"),
                Variable("to user template"),
                Variable("to question"),
            )

    system = Variable("Be nice.", role="system prompt", requires_grad=True)
    template = Variable("Q: {question}", role="user template")
    question = Variable("why?", role="question", requires_grad=True)
    messages = [
        {"role": "system", "content": [system]},
        {"role": "user", "content": [template]},
    ]
    out = Chat.apply(None, messages, {"question": question, "style": "plain"})
    edges = out.grad_fn.next_functions
    assert len(edges) == 3
    assert (
        isinstance(edges[0].node, AccumulateGrad) and edges[0].node.variable is system
    )
    assert edges[1].node is None
    assert edges[2].node.variable is question
    # slots: client, 3 Variables (the plain string inside the dict has no slot)
    assert received == [(False, True, False, True)]
    out.backward(Variable("g"))
    assert [g.data for g in system.grad] == ["to system"]
    assert [g.data for g in question.grad] == ["to question"]
    assert template.grad == []


def test_dict_slot_order_follows_the_signature_not_the_call() -> None:
    class Pair(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, a: Variable, b: Variable) -> Variable:
            return Variable(f"{a.data}{b.data}")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> tuple[Variable, Variable]:
            return Variable("to a"), Variable("to b")

    a = Variable("a", requires_grad=True)
    b = Variable("b", requires_grad=True)
    out = Pair.apply(b=b, a=a)
    assert out.data == "ab"
    out.backward(Variable("g"))
    assert [g.data for g in a.grad] == ["to a"]
    assert [g.data for g in b.grad] == ["to b"]


def test_output_that_is_an_input_is_copied_not_rewired() -> None:
    class Identity(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return x

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            return grad

    x = Variable("x", requires_grad=True)
    y = Identity.apply(x)
    assert y is not x and x.is_leaf and not y.is_leaf
    y.backward(Variable("g"))
    assert [g.data for g in x.grad] == ["g"]


def test_forward_must_return_variables() -> None:
    class Bad(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Any:
            return "text"

    with pytest.raises(TypeError, match="must return a Variable"):
        Bad.apply(Variable("x"))


def test_backward_returning_a_non_variable_names_the_node() -> None:
    class Bad(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable("y")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Any:
            return "feedback"

    x = Variable("x", requires_grad=True)
    with pytest.raises(TypeError, match="BadBackward0 returned a str"):
        Bad.apply(x).backward(Variable("g"))


class AsyncForward(Function):
    @staticmethod
    async def forward(ctx: Any, x: Variable) -> Variable:
        await asyncio.sleep(0)
        ctx.mode = afnio.is_grad_enabled()
        return Variable(f"async {x.data}", role=x.role)

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> Variable:
        return Variable(f"async fb {grad.data}")


def test_async_forward_runs_through_apply_and_aapply() -> None:
    x = Variable("x", requires_grad=True)
    y = AsyncForward.apply(x)
    assert y.data == "async x" and y.grad_fn.mode is False

    async def main() -> Variable:
        return await AsyncForward.aapply(x)

    z = asyncio.run(main())
    assert z.data == "async x" and z.requires_grad
    z.backward(Variable("g"))
    assert [g.data for g in x.grad] == ["async fb g"]


def test_needs_input_grad_and_outputs_without_grad() -> None:
    x = Variable("x")
    y = Shout.apply(x)
    assert y.requires_grad is False and y.grad_fn is None
    z = Shout.apply(Variable("x", requires_grad=True))
    assert z.grad_fn.needs_input_grad == (True, False)
