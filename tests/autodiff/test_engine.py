"""The backward engine: accumulation, graph freeing, inputs=, concurrency, loops."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio._runtime import reset_concurrency_stats
from afnio.autodiff import Function
from afnio.autodiff.basic_ops import Add, Split
from afnio.cognitive import Parameter
from tests.autodiff.helpers import InFlight, make_blocking, make_sleepy

PREFIX = "Here is the combined feedback we got for this specific "


class Upper(Function):
    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(str(x.data).upper(), role=f"upper {x.role}")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return Variable(f"up({grad.data})", role="feedback")


def test_leaf_reached_by_two_paths_gets_two_entries() -> None:
    # a -> b -> c -> d, e = Add(a, d): the tested DAG of the contract
    a = Variable("a", role="a", requires_grad=True)
    b = Upper.apply(a)
    c = Upper.apply(b)
    d = Upper.apply(c)
    e = Add.apply(a, d)
    e.backward(Variable("G"))
    assert len(a.grad) == 2
    assert a.grad[0].data == f"{PREFIX}a and other variables: G"
    assert (
        a.grad[1].data
        == f"up(up(up({PREFIX}upper upper upper a and other variables: G)))"
    )


def test_each_backward_call_appends() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = x + Variable("y", role="y")
    y.backward(Variable("one"), retain_graph=True)
    y.backward(Variable("two"))
    assert [g.data for g in x.grad] == [
        f"{PREFIX}x and other variables: one",
        f"{PREFIX}x and other variables: two",
    ]


def test_same_variable_twice_in_one_call_gets_two_entries() -> None:
    x = Variable("x", role="x", requires_grad=True)
    (x + x).backward(Variable("g"))
    assert len(x.grad) == 2


def test_leaf_without_requires_grad_gets_nothing() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = Variable("y", role="y")
    (x + y).backward(Variable("g"))
    assert y.grad == []
    assert len(x.grad) == 1


def test_intermediate_node_runs_once_with_combined_gradients() -> None:
    calls: list[Any] = []

    class Record(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role="recorded")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            calls.append(grad.data)
            return Variable("from record", role="feedback")

    x = Variable("x", role="x", requires_grad=True)
    r = Record.apply(x)
    s = Add.apply(r, r)
    s.backward(Variable("G"))
    assert len(calls) == 1
    assert calls[0] == [
        f"{PREFIX}recorded and other variables: G",
        f"{PREFIX}recorded and other variables: G",
    ]
    assert [g.data for g in x.grad] == ["from record"]


def test_second_backward_through_freed_graph_raises() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = x + Variable("y")
    y.backward(Variable("g"))
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(Variable("g"))
    assert len(x.grad) == 1


def test_retain_graph_allows_split_parts_to_backward_separately() -> None:
    x = Variable("a b", role="sentence", requires_grad=True)
    first, second = Split.apply(x, sep=" ")
    first.backward(Variable("MY_FIRST_FEEDBACK"), retain_graph=True)
    second.backward(Variable("MY_SECOND_FEEDBACK"))
    assert [g.data for g in x.grad] == [
        f"{PREFIX}sentence and other variables: "
        "<ITEM>MY_FIRST_FEEDBACK</ITEM><ITEM></ITEM>",
        f"{PREFIX}sentence and other variables: "
        "<ITEM></ITEM><ITEM>MY_SECOND_FEEDBACK</ITEM>",
    ]
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        first.backward(Variable("again"))


def test_saved_variables_are_freed_without_retain_graph() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = x + Variable("y")
    node = y.grad_fn
    assert len(node.saved_variables) == 2
    y.backward(Variable("g"))
    with pytest.raises(RuntimeError, match="freed"):
        node.saved_variables  # noqa: B018


def test_create_graph_defaults_retain_graph_to_true() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = x + Variable("y")
    y.backward(Variable("g"), create_graph=True)
    y.backward(Variable("g"))
    assert len(x.grad) == 2


def test_inputs_limit_accumulation_and_skip_unneeded_nodes() -> None:
    calls = []

    class Counted(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            calls.append(ctx.needs_input_grad)
            return Variable("fb", role="feedback")

    a = Variable("a", role="a", requires_grad=True)
    b = Variable("b", role="b", requires_grad=True)
    out = Add.apply(a, Counted.apply(b))
    out.backward(Variable("g"), inputs=[a])
    assert len(a.grad) == 1
    assert b.grad == []
    assert calls == []  # the branch that leads only to b never ran

    out2 = Add.apply(a, Counted.apply(b))
    out2.backward(
        Variable("g"), inputs=afnio.GradientEdge(b._get_grad_accumulator(), 0)
    )
    assert [g.data for g in b.grad] == ["fb"]
    assert len(a.grad) == 1
    assert calls == [(True,)]


def test_inputs_must_be_leaves_that_require_grad() -> None:
    a = Variable("a", role="a", requires_grad=True)
    mid = Upper.apply(a)
    out = Upper.apply(mid)
    with pytest.raises(RuntimeError, match="leaf"):
        out.backward(Variable("g"), inputs=[mid])
    with pytest.raises(RuntimeError, match="leaf"):
        out.backward(Variable("g"), inputs=[Variable("no grad")])
    with pytest.raises(RuntimeError, match="cannot be empty"):
        out.backward(Variable("g"), inputs=[])
    with pytest.raises(TypeError, match="GradientEdge"):
        out.backward(Variable("g"), inputs=["a"])
    assert a.grad == []


def test_retain_grad_keeps_the_gradient_of_a_non_leaf() -> None:
    a = Variable("a", role="a", requires_grad=True)
    mid = Upper.apply(a)
    mid.retain_grad()
    out = Upper.apply(mid)
    out.retain_grad()
    out.backward(Variable("G"))
    assert [g.data for g in out.grad] == ["G"]
    assert [g.data for g in mid.grad] == ["up(G)"]
    assert [g.data for g in a.grad] == ["up(up(G))"]


def test_backward_on_leaf_raises_with_contract_message() -> None:
    with pytest.raises(RuntimeError, match="does not require grad or does not have"):
        Variable("x", requires_grad=True).backward()
    with pytest.raises(RuntimeError, match="element 0 of variables"):
        afnio.autodiff.backward(Variable("x"))


def test_implicit_gradient_is_empty_for_scalar_roots() -> None:
    x = Variable("x", role="x", requires_grad=True)
    (x + Variable("y")).backward()
    assert x.grad[0].data == f"{PREFIX}x and other variables: "


def test_implicit_gradient_for_batched_non_evaluator_root_raises() -> None:
    x = Variable(["a", "b"], role="x", requires_grad=True)
    y = x + Variable(["c", "d"])
    with pytest.raises(RuntimeError, match="implicitly"):
        y.backward()


def test_evaluator_root_accepts_implicit_gradient_even_when_batched() -> None:
    from afnio.autodiff.decorators import evaluator

    @evaluator
    class Judge(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, pred: Variable) -> tuple[Variable, Variable]:
            return Variable([1, 0]), Variable(["ok", "bad"], role="explanation")

        @staticmethod
        def backward(ctx: Any, g_score: Variable, g_expl: Variable) -> Variable:
            return Variable(f"seen {g_expl.data!r}", role="feedback")

    pred = Variable(["x", "y"], role="prediction", requires_grad=True)
    _, expl = Judge.apply(pred)
    expl.backward()
    assert pred.grad[0].data == "seen ''"


def test_gradient_arguments_are_validated() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y = x + Variable("y")
    with pytest.raises(TypeError, match="Wrap the text"):
        y.backward("feedback")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 gradients for 1 variables"):
        afnio.autodiff.backward([y], [Variable("a"), Variable("b")])
    with pytest.raises(TypeError, match="grad_variables"):
        afnio.autodiff.backward([y], [3])  # type: ignore[list-item]
    assert x.grad == []


def test_multiple_roots_in_one_call() -> None:
    x = Variable("x", role="x", requires_grad=True)
    y1 = Upper.apply(x)
    y2 = Upper.apply(x)
    afnio.autodiff.backward([y1, y2], [Variable("one"), Variable("two")])
    assert [g.data for g in x.grad] == ["up(one)", "up(two)"]


def test_wrong_number_of_gradients_names_the_node() -> None:
    class Bad(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable, y: Variable) -> Variable:
            return Variable("z")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            return Variable("only one")

    x = Variable("x", requires_grad=True)
    z = Bad.apply(x, Variable("y"))
    with pytest.raises(
        RuntimeError, match=r"BadBackward0 returned an incorrect number"
    ):
        z.backward(Variable("g"))
    assert x.grad == []


def test_extra_trailing_none_gradients_are_accepted() -> None:
    class Extra(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable("z")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> tuple[Any, ...]:
            return Variable("g"), None, None

    x = Variable("x", requires_grad=True)
    Extra.apply(x).backward(Variable("g"))
    assert [g.data for g in x.grad] == ["g"]


def test_failed_backward_changes_no_grad_and_keeps_the_graph() -> None:
    state = {"fail": True}

    class Flaky(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        async def backward(ctx: Any, grad: Variable) -> Variable:
            if state["fail"]:
                raise ConnectionError("LM unavailable")
            return Variable("ok", role="feedback")

    a = Variable("a", role="a", requires_grad=True)
    b = Variable("b", role="b", requires_grad=True)
    out = Add.apply(a, Flaky.apply(b))
    with pytest.raises(ConnectionError) as info:
        out.backward(Variable("g"))
    assert any("FlakyBackward0" in note for note in info.value.__notes__)
    assert a.grad == [] and b.grad == []
    state["fail"] = False
    out.backward(Variable("g"))  # the graph was kept: a retry works
    assert len(a.grad) == 1 and [g.data for g in b.grad] == ["ok"]


def test_gradient_order_is_deterministic_across_concurrent_branches() -> None:
    class Delayed(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable, delay: float) -> Variable:
            ctx.delay = delay
            return Variable(x.data, role=x.role)

        @staticmethod
        async def backward(ctx: Any, grad: Variable) -> tuple[Variable, None]:
            await asyncio.sleep(ctx.delay)
            return Variable(f"after {ctx.delay}", role="feedback"), None

    x = Variable("x", role="x", requires_grad=True)
    # the first branch finishes last; entries still follow the graph's order
    delays = [0.06, 0.04, 0.02, 0.0]
    total = afnio.functional.sum([Delayed.apply(x, d) for d in delays])
    total.backward(Variable("G"))
    assert [g.data for g in x.grad] == [f"after {d}" for d in delays]


# -- concurrency ------------------------------------------------------------------


def _eight_branches(fn: type[Function]) -> tuple[Variable, list[Variable]]:
    leaves = [
        Variable(f"p{i}", role=f"prompt {i}", requires_grad=True) for i in range(8)
    ]
    outs = [fn.apply(leaf) for leaf in leaves]
    return afnio.functional.sum(outs), leaves


def test_independent_async_branches_run_concurrently() -> None:
    counter = InFlight()
    total, leaves = _eight_branches(make_sleepy(counter, 0.2))
    start = time.perf_counter()
    total.backward(Variable("G"))
    elapsed = time.perf_counter() - start
    assert counter.calls == 8
    assert counter.peak == 8
    assert elapsed < 0.5 * 8 * 0.2
    assert all(len(leaf.grad) == 1 for leaf in leaves)


def test_concurrency_bound_of_one_serialises_backward_nodes() -> None:
    afnio.set_max_concurrency(1)
    counter = InFlight()
    total, leaves = _eight_branches(make_sleepy(counter, 0.02))
    total.backward(Variable("G"))
    assert counter.calls == 8
    assert counter.peak == 1
    assert all(len(leaf.grad) == 1 for leaf in leaves)


def test_concurrency_bound_caps_peak() -> None:
    afnio.set_max_concurrency(3)
    reset_concurrency_stats()
    counter = InFlight()
    total, _ = _eight_branches(make_sleepy(counter, 0.05))
    total.backward(Variable("G"))
    assert counter.peak == 3
    stats = afnio.get_concurrency_stats()
    assert stats.nodes.in_flight == 0 and stats.nodes.peak == 3


def test_blocking_backward_functions_run_in_threads_concurrently() -> None:
    counter = InFlight()
    total, leaves = _eight_branches(make_blocking(counter, 0.2))
    start = time.perf_counter()
    total.backward(Variable("G"))
    assert counter.peak == 8
    assert time.perf_counter() - start < 0.5 * 8 * 0.2
    assert [g.data for g in leaves[0].grad] == [
        f"{PREFIX}slept prompt 0 and other variables: G (blocking)"
    ]


def test_blocking_backward_respects_the_bound() -> None:
    afnio.set_max_concurrency(2)
    counter = InFlight()
    total, _ = _eight_branches(make_blocking(counter, 0.02))
    total.backward(Variable("G"))
    assert counter.peak == 2


def test_backward_works_inside_a_running_event_loop() -> None:
    counter = InFlight()

    async def notebook_cell() -> list[int]:
        total, leaves = _eight_branches(make_sleepy(counter, 0.01))
        total.backward(Variable("G"))  # the sync API, called with a loop running
        return [len(leaf.grad) for leaf in leaves]

    assert asyncio.run(notebook_cell()) == [1] * 8


def test_abackward_awaits_without_blocking_the_callers_loop() -> None:
    counter = InFlight()

    async def handler() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        total, leaves = _eight_branches(make_sleepy(counter, 0.2))
        await total.abackward(Variable("G"))
        tick_task.cancel()
        return [len(leaf.grad) for leaf in leaves], ticks

    lengths, ticks = asyncio.run(handler())
    assert lengths == [1] * 8
    assert ticks >= 5  # the caller's loop kept running during the pass


def test_sync_backward_from_inside_an_async_backward_raises_clearly() -> None:
    inner_x = Variable("i", role="inner", requires_grad=True)
    inner = Upper.apply(inner_x)

    class Nested(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data)

        @staticmethod
        async def backward(ctx: Any, grad: Variable) -> Variable:
            inner.backward(Variable("nested"))
            return grad

    x = Variable("x", requires_grad=True)
    with pytest.raises(RuntimeError, match="await the async form"):
        Nested.apply(x).backward(Variable("g"))


def test_backward_from_many_threads_at_once() -> None:
    results: list[int] = []
    lock = threading.Lock()
    counter = InFlight()
    sleepy = make_sleepy(counter, 0.01)

    def worker() -> None:
        x = Variable("x", role="x", requires_grad=True)
        sleepy.apply(x).backward(Variable("g"))
        with lock:
            results.append(len(x.grad))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [1] * 8


def test_parameters_receive_gradients_like_leaves() -> None:
    p = Parameter("Be concise.", role="system prompt")
    out = p + Variable(" Answer:", role="suffix")
    out.backward(Variable("too terse"))
    assert p.grad[0].role == "feedback to system prompt"


# -- overlapping passes and nested work ---------------------------------------------


class TwoInputJudge(Function):
    @staticmethod
    def forward(ctx: Any, a: Variable, b: Variable) -> Variable:
        return Variable("verdict", role="verdict")

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> tuple[Any, Any]:
        await asyncio.sleep(0.05)
        needs = ctx.needs_input_grad
        return (
            Variable("to a") if needs[0] else None,
            Variable("to b") if needs[1] else None,
        )


def test_overlapping_passes_with_different_inputs_do_not_interfere() -> None:
    a = Variable("a", role="a", requires_grad=True)
    b = Variable("b", role="b", requires_grad=True)
    out = TwoInputJudge.apply(a, b)

    async def main() -> None:
        await asyncio.gather(
            out.abackward(Variable("g"), retain_graph=True, inputs=[a]),
            out.abackward(Variable("g"), retain_graph=True, inputs=[b]),
        )

    asyncio.run(main())
    assert [g.data for g in a.grad] == ["to a"]
    assert [g.data for g in b.grad] == ["to b"]
    assert out.grad_fn.needs_input_grad == (True, True)
    out.backward(Variable("g"))
    assert len(a.grad) == 2 and len(b.grad) == 2


def test_two_overlapping_passes_that_free_the_graph_cannot_both_run() -> None:
    a = Variable("a", role="a", requires_grad=True)
    b = Variable("b", role="b", requires_grad=True)
    out = TwoInputJudge.apply(a, b)

    async def main() -> list[Any]:
        return await asyncio.gather(
            out.abackward(Variable("g")),
            out.abackward(Variable("g")),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, RuntimeError)]
    assert len(errors) == 1 and "Another backward pass" in str(errors[0])
    assert len(a.grad) == 1 and len(b.grad) == 1


def test_blocking_backward_making_requests_from_its_own_threads_never_deadlocks() -> (
    None
):
    from concurrent.futures import ThreadPoolExecutor

    from afnio._runtime import request_slot, run_sync

    async def fake_lm_call(text: str) -> str:
        async with request_slot():
            await asyncio.sleep(0.01)
            return text.upper()

    class Critic(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            with ThreadPoolExecutor(2) as pool:
                texts = list(pool.map(lambda t: run_sync(fake_lm_call(t)), ["a", "b"]))
            return Variable("".join(texts), role="feedback")

    for bound, branches in ((16, 16), (1, 2)):
        afnio.set_max_concurrency(bound)
        leaves = [Variable(str(i), requires_grad=True) for i in range(branches)]
        total = afnio.functional.sum([Critic.apply(leaf) for leaf in leaves])
        done = threading.Event()
        worker = threading.Thread(
            target=lambda total=total, done=done: (
                total.backward(Variable("g")),
                done.set(),
            )
        )
        worker.start()
        worker.join(timeout=20)
        assert done.is_set(), f"deadlock with bound {bound}"
        assert all([g.data for g in leaf.grad] == ["AB"] for leaf in leaves)


def test_a_captured_leaf_returned_by_forward_is_not_rewired() -> None:
    prompt = Variable("You are helpful.", role="system prompt", requires_grad=True)

    class PickPrompt(Function):
        run_backward_inline = True

        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return prompt

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            return grad

    x = Variable("q", requires_grad=True)
    out = PickPrompt.apply(x)
    assert out is not prompt
    assert prompt.is_leaf and prompt.grad == []
    out.backward(Variable("g"))
    assert [g.data for g in x.grad] == ["g"]


def test_retain_grad_follows_an_in_place_add() -> None:
    a = Variable("a", role="a", requires_grad=True)
    x = a + Variable("b", role="b")
    x.retain_grad()
    x += Variable("c", role="c")
    (x + Variable("d", role="d")).backward(Variable("G"))
    assert [g.data for g in x.grad] == [f"{PREFIX}a and b and c and other variables: G"]
