"""The grouped chat backward with custom Functions (issue 23 review fixes): the node
slot accounting under overlapping submissions of one node (M1), unsent items failed
when a pass ends (M2), a node counted and ordered by its node task whatever ``node``
argument it passes (M3/L6), group calls run in the pass's context (L2), a
BaseException of a group call (L3), call groups kept with the texts instead of the
shared ctx (L4), and ``backward_options`` refusing to decorate (L1).

Every test uses a fake backward client (no HTTP) and guards the pass with a timeout,
so a deadlock fails the test instead of hanging it; nothing asserts on timings."""

from __future__ import annotations

import asyncio
import contextvars
import json
import random
import re
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio._runtime import _Limiter, _runtime, run_sync
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.function import Function
from afnio.autodiff.grouping import NodeSlot, current_grouper, current_node_slot
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_gradients,
    template_key,
)
from afnio.autodiff.provenance import feedback_items
from afnio.models.model import ChatCompletionModel
from afnio_integrations._recorded import StackSamples

TIMEOUT = 20.0  # a guard against hangs only

P = Variable("a long system prompt " * 5, role="system prompt", requires_grad=True)
MARK: contextvars.ContextVar[str] = contextvars.ContextVar("grouping_mark", default="-")


class FakeLM(ChatCompletionModel):
    """Answers any backward prompt with the count it asks for; records each call's
    user prompt, how many ``<FEEDBACK_ON_OUTPUT>`` it holds, the ``MARK`` context
    value and the task it ran in. ``hook(user)`` (async) runs before answering."""

    def __init__(self, hook: Callable[[str], Any] | None = None) -> None:
        super().__init__(provider="fake")
        self.hook = hook
        self.users: list[str] = []
        self.sizes: list[int] = []
        self.marks: list[str] = []
        self.tasks: list[asyncio.Task[Any] | None] = []

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        user = messages[-1]["content"]
        self.users.append(user)
        self.sizes.append(user.count("<FEEDBACK_ON_OUTPUT>"))
        self.marks.append(MARK.get())
        self.tasks.append(asyncio.current_task())
        if self.hook is not None:
            await self.hook(user)
        count = int(re.search(r"Return exactly (\d+) feedback strings", user).group(1))
        return json.dumps({"gradients": [f"g{i}" for i in range(count)]})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def _item(text: str, role: str = "assistant") -> ChatBackwardItem:
    return ChatBackwardItem(
        [{"role": "system", "content": P.data}, {"role": "user", "content": text}],
        role,
        "neutral",
        'the expected value is "t"',
        [VariableInfo("system prompt", "system", True, P.data)],
        template_key(role, [(P, "system")]),
    )


def _function(backward: Callable[..., Any], blocking: bool = False) -> type[Function]:
    """A one-input Function whose backward is ``backward(ctx)``."""

    class Custom(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable("out", role="custom output")

    if asyncio.iscoroutinefunction(backward):

        async def async_backward(ctx: Any, grad: Any) -> Any:
            return await backward(ctx)

        Custom.backward = staticmethod(async_backward)  # type: ignore[method-assign]
    else:

        def sync_backward(ctx: Any, grad: Any) -> Any:
            return backward(ctx)

        Custom.backward = staticmethod(sync_backward)  # type: ignore[method-assign]
    Custom.blocking = blocking  # type: ignore[attr-defined]
    return Custom


def _stacked(*functions: type[Function]) -> tuple[Variable, Variable]:
    """``StackSamples`` of one output per Function (in argument order, which is also
    their order in the pass), and the feedback to back-propagate."""
    x = Variable("x", role="x", requires_grad=True)
    stacked = StackSamples.apply([f.apply(x) for f in functions])
    return stacked, Variable([f"fb{i}" for i in range(len(functions))])


async def _backward(stacked: Variable, feedback: Variable, per_call: int = 8) -> None:
    with afnio.backward_options(chat_samples_per_call=per_call):
        await asyncio.wait_for(
            afnio.autodiff.abackward(stacked, feedback), timeout=TIMEOUT
        )


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (yielding to the loop) until ``condition()``; the pass's timeout guards
    it."""
    while not condition():
        await asyncio.sleep(0.001)


# -- M1: the node slot ---------------------------------------------------------------


def test_a_reclaim_that_races_a_new_wait_gives_the_slot_back() -> None:
    """The reclaim of a node's last wait blocks on a busy bound; meanwhile another
    submission of the same node starts waiting. When the reclaim gets the slot it
    must give it back: the node waits again and must not hold a slot meanwhile."""

    async def scenario() -> None:
        limiter = _Limiter(1)
        slot = NodeSlot(limiter, "X")
        await slot.take()
        slot.lend()  # X's first submission waits: the slot is lent
        await limiter.acquire()  # another node (Y) takes the only slot
        reclaim = asyncio.create_task(slot.reclaim())  # X's first answer came
        await _until(lambda: bool(limiter._waiters))  # it waits for Y's slot
        slot.lend()  # X's second submission starts waiting meanwhile
        limiter.release()  # Y ends: the slot goes to X's reclaim
        await asyncio.wait_for(reclaim, TIMEOUT)
        assert slot.lent == 1
        assert not slot.held and limiter.active == 0  # lent while it waits
        await slot.reclaim()  # the second answer came: now it holds it again
        assert slot.held and limiter.active == 1
        slot.close()
        assert not slot.held and limiter.active == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(40))
def test_overlapping_waits_of_one_node_keep_the_bound_and_end_balanced(
    seed: int,
) -> None:
    """Random overlapping lend/reclaim of one node's sub-tasks against other holders
    of a bound of 1: never more than one unit active, the node never holds its slot
    while one of its waits is going on once things settle, and nothing held after
    close."""
    rng = random.Random(seed)

    async def scenario() -> None:
        limiter = _Limiter(1)
        slot = NodeSlot(limiter, "X")
        await slot.take()
        peak = [0]

        async def wait_once() -> None:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            slot.lend()
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            await slot.reclaim()

        async def other_node() -> None:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            await limiter.acquire()
            peak[0] = max(peak[0], limiter.active)
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            limiter.release()

        async def node_x() -> None:
            waits = [wait_once() for _ in range(rng.randrange(2, 6))]
            await asyncio.gather(*waits)
            assert slot.lent == 0 and slot.held  # all waits over: it holds it
            slot.close()  # the node task ends

        jobs = [node_x()] + [other_node() for _ in range(rng.randrange(1, 4))]
        rng.shuffle(jobs)
        await asyncio.wait_for(asyncio.gather(*jobs), TIMEOUT)
        assert peak[0] <= 1
        assert limiter.active == 0 and not limiter._waiters  # no unit kept

    asyncio.run(scenario())


def test_a_node_submitting_again_while_reclaiming_does_not_deadlock_at_bound_1() -> (
    None
):
    """X submits, and a sub-task of X submits again while X's first reclaim waits
    for the only slot (held by Y). Before the fix X then held the slot while its
    second submission waited, so Z (the stage after Y) could never start: deadlock.
    Events, not timings, order the steps."""
    afnio.set_max_concurrency(1)
    y_has_slot = asyncio.Event()  # used on afnio's loop only
    second_started = [False]

    async def hook(user: str) -> None:
        if "I am X slow." in user:
            await y_has_slot.wait()  # X's answer comes once Y holds the slot

    lm = FakeLM(hook)
    afnio.set_backward_model_client(lm)

    async def x_backward(ctx: Any) -> tuple[None]:
        slot = current_node_slot()
        assert slot is not None

        async def second() -> None:
            # X's first reclaim waits for the slot Y holds (lent 0, not held)
            await _until(lambda: slot.lent == 0 and not slot.held)
            second_started[0] = True  # it lends the slot before its first await
            await chat_backward_gradients(ctx, [_item("I am X second.")])

        later = asyncio.create_task(second())
        await chat_backward_gradients(ctx, [_item("I am X slow.")])
        await later
        return (None,)

    async def y_backward(ctx: Any) -> tuple[Variable]:
        await chat_backward_gradients(ctx, [_item("I am Y.", role="other")])
        y_has_slot.set()  # Y re-took the slot and holds it ...
        await _until(lambda: second_started[0])  # ... until X waits again
        return (Variable("feedback for z", role="feedback"),)

    async def z_backward(ctx: Any) -> tuple[None]:
        await chat_backward_gradients(ctx, [_item("I am Z.")])
        return (None,)

    x = Variable("x", role="x", requires_grad=True)
    z_out = _function(z_backward).apply(x)  # Z runs after Y (its gradient)
    stacked = StackSamples.apply(
        [_function(x_backward).apply(x), _function(y_backward).apply(z_out)]
    )
    asyncio.run(_backward(stacked, Variable(["a", "b"])))
    assert sorted(lm.sizes) == [1, 1, 2]  # X slow, Y; then X second with Z
    assert any("I am X second." in u and "I am Z." in u for u in lm.users)

    async def settled() -> None:
        await _until(lambda: _runtime.nodes.active == 0)

    run_sync(asyncio.wait_for(settled(), TIMEOUT))
    assert not _runtime.nodes._waiters


# -- M2: a pass that ends with unsent items ------------------------------------------


def test_a_blocking_nodes_thread_waiting_for_unsent_items_returns_when_the_pass_fails() -> (  # noqa: E501
    None
):
    """A ``blocking`` node's thread waits in ``run_sync`` for its items while another
    node fails: the pass raises, and the thread must get a RuntimeError (before the
    fix it waited forever, leaking the thread and a task on afnio's loop)."""
    afnio.set_backward_model_client(FakeLM())
    done = threading.Event()
    seen: dict[str, BaseException | str] = {}

    def thread_backward(ctx: Any) -> tuple[None]:
        try:
            run_sync(chat_backward_gradients(ctx, [_item("I am T.")]))
            seen["end"] = "returned"
        except BaseException as e:  # recorded for the assertions
            seen["end"] = e
        finally:
            done.set()
        return (None,)

    async def boom_backward(ctx: Any) -> tuple[None]:
        grouper = current_grouper()
        assert grouper is not None
        await _until(lambda: grouper.waiting() == 1)  # T's items wait, unsent
        raise ValueError("boom")

    stacked, feedback = _stacked(
        _function(thread_backward, blocking=True), _function(boom_backward)
    )
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(_backward(stacked, feedback))
    assert done.wait(TIMEOUT), "the thread node's run_sync never returned"
    error = seen["end"]
    assert isinstance(error, RuntimeError)
    assert "ended" in str(error) and "before" in str(error)

    async def settled() -> None:
        await _until(lambda: _runtime.nodes.active == 0)

    run_sync(asyncio.wait_for(settled(), TIMEOUT))  # no slot kept by the thread
    assert not _runtime.nodes._waiters


# -- M3 / L6: the submitting node is the node task's node ----------------------------


def test_a_node_submitting_under_several_names_counts_as_waiting_once() -> None:
    """X submits two items concurrently under two different ``node`` names. It is one
    node: the grouper must wait for Y too (one call of 3), not count X twice and
    send before Y submits (calls of 2 and 1)."""
    lm = FakeLM()
    afnio.set_backward_model_client(lm)

    async def x_backward(ctx: Any) -> tuple[None]:
        await asyncio.gather(
            chat_backward_gradients("x-first", [_item("I am X one.")]),
            chat_backward_gradients("x-second", [_item("I am X two.")]),
        )
        return (None,)

    async def y_backward(ctx: Any) -> tuple[None]:
        await asyncio.sleep(0.05)  # some work before it submits (any duration)
        await chat_backward_gradients(ctx, [_item("I am Y.")])
        return (None,)

    stacked, feedback = _stacked(_function(x_backward), _function(y_backward))
    asyncio.run(_backward(stacked, feedback))
    assert lm.sizes == [3]


def test_items_are_ordered_by_the_submitting_node_task_not_the_node_argument() -> None:
    """X comes first in the pass but submits last, passing a name string as
    ``node``: its item still comes first in the group (before the fix a name not in
    the pass sorted by submission order, which follows scheduling)."""
    lm = FakeLM()
    afnio.set_backward_model_client(lm)

    async def x_backward(ctx: Any) -> tuple[None]:
        grouper = current_grouper()
        assert grouper is not None
        await _until(lambda: grouper.waiting() == 1)  # Y submitted first
        await chat_backward_gradients("a name", [_item("I am X.")])
        return (None,)

    async def y_backward(ctx: Any) -> tuple[None]:
        await chat_backward_gradients("another name", [_item("I am Y.")])
        return (None,)

    stacked, feedback = _stacked(_function(x_backward), _function(y_backward))
    asyncio.run(_backward(stacked, feedback))
    assert lm.sizes == [2]
    (user,) = lm.users
    assert user.index("I am X.") < user.index("I am Y.")


# -- L2: the group tasks' context ----------------------------------------------------


def test_group_calls_run_in_the_pass_context_not_a_node_tasks() -> None:
    """Each node sets a context variable before it submits; the group call must see
    the pass's value, not that of whichever node triggered the send."""
    lm = FakeLM()
    afnio.set_backward_model_client(lm)

    def marking(name: str) -> Callable[..., Any]:
        async def backward(ctx: Any) -> tuple[None]:
            MARK.set(name)
            await chat_backward_gradients(ctx, [_item(f"I am {name}.")])
            return (None,)

        return backward

    stacked, feedback = _stacked(_function(marking("X")), _function(marking("Y")))

    async def run() -> None:
        MARK.set("the pass")
        await _backward(stacked, feedback)

    asyncio.run(run())
    assert lm.marks == ["the pass"]


# -- L3: errors of a group call ------------------------------------------------------


class _Abort(BaseException):
    """A BaseException that is not an Exception."""


def test_a_base_exception_in_a_group_call_ends_the_pass_and_leaves_the_group_task() -> (
    None
):
    async def hook(user: str) -> None:
        raise _Abort("stop now")

    lm = FakeLM(hook)
    afnio.set_backward_model_client(lm)

    async def submit(ctx: Any) -> tuple[None]:
        await chat_backward_gradients(ctx, [_item("I am X.")])
        return (None,)

    stacked, feedback = _stacked(_function(submit), _function(submit))
    with pytest.raises(_Abort, match="stop now"):
        asyncio.run(_backward(stacked, feedback))
    (group_task,) = lm.tasks
    assert group_task is not None and group_task.done()
    # it propagates from the group task (not only turned into the members' error)
    assert isinstance(group_task.exception(), _Abort)


def test_an_error_in_a_group_call_keeps_the_calls_traceback() -> None:
    async def hook(user: str) -> None:
        raise ConnectionError("the backward model is down")

    afnio.set_backward_model_client(FakeLM(hook))

    async def submit(ctx: Any) -> tuple[None]:
        await chat_backward_gradients(ctx, [_item("I am X.")])
        return (None,)

    stacked, feedback = _stacked(_function(submit), _function(submit))
    with pytest.raises(ConnectionError) as caught:
        asyncio.run(_backward(stacked, feedback))
    frames = [f.name for f in traceback.extract_tb(caught.value.__traceback__)]
    assert "hook" in frames and "achat" in frames and "send_group" in frames


# -- L4: call groups of two concurrent passes ----------------------------------------


def test_a_direct_pass_does_not_erase_a_concurrent_lm_passs_call_groups() -> None:
    """Two passes over one evaluator at once (``retain_graph=True``): an LM-mode one
    waiting for its evaluator-backward calls and a direct one. The LM pass's texts
    must keep their call groups (before the fix the direct pass reset
    ``ctx.call_groups`` on the shared ctx)."""
    release = asyncio.Event()  # used on afnio's loop only

    async def hook(user: str) -> None:
        await release.wait()

    afnio.set_backward_model_client(FakeLM(hook))
    prediction = Variable(["a", "b", "c", "d"], role="prediction", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["w", "x", "y", "z"], samples_per_call=2
    )

    async def passes() -> None:
        async def lm_pass() -> None:
            with afnio.backward_options(evaluator_feedback="lm"):
                await afnio.autodiff.abackward(explanation, retain_graph=True)

        async def direct_pass() -> None:
            with afnio.backward_options(evaluator_feedback="direct"):
                await afnio.autodiff.abackward(explanation, retain_graph=True)
            release.set()  # the LM pass's calls answer after the direct pass

        await asyncio.gather(lm_pass(), direct_pass())

    async def on_afnio_loop() -> None:
        await asyncio.wait_for(passes(), TIMEOUT)

    run_sync(on_afnio_loop())  # both passes, and the event, on afnio's loop
    items = feedback_items(prediction)
    lm_items = [i for i in items if re.fullmatch(r"g\d", i.text)]
    direct_items = [i for i in items if not re.fullmatch(r"g\d", i.text)]
    assert [i.samples for i in lm_items] == [(0,), (1,), (2,), (3,)]
    assert [i.call_samples for i in lm_items] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert len(direct_items) == 4
    assert all(i.call_samples is None for i in direct_items)


# -- L1: backward_options is a `with` block only -------------------------------------


def test_backward_options_refuses_to_decorate_a_function() -> None:
    with pytest.raises(TypeError, match=r"not a decorator.*with afnio\.backward_opt"):

        @afnio.backward_options("cheap")
        async def step() -> None:
            pass

    with pytest.raises(TypeError, match="not a decorator"):

        @afnio.backward_options(chat_samples_per_call=4)
        def sync_step() -> None:
            pass

    assert afnio.get_backward_options() == afnio.BackwardOptions()


def test_backward_options_object_can_be_reentered_and_used_with_async_with() -> None:
    block = afnio.backward_options("cheap")
    with block as outer:
        with block as inner:
            assert inner is outer
        assert afnio.get_backward_options() is outer
    assert afnio.get_backward_options() == afnio.BackwardOptions()

    async def run() -> int:
        async with afnio.backward_options(chat_samples_per_call=3) as options:
            return afnio.get_backward_options().chat_samples_per_call + (
                options.chat_samples_per_call
            )

    assert asyncio.run(run()) == 6


def test_a_thread_started_in_the_block_sees_the_options_in_a_copied_context() -> None:
    """As documented: a plain thread starts with an empty context; running its
    target in ``contextvars.copy_context()`` carries the options."""
    seen: list[afnio.BackwardOptions] = []

    def read() -> None:
        seen.append(afnio.get_backward_options())

    with afnio.backward_options("cheap") as cheap:
        plain = threading.Thread(target=read)
        plain.start()
        plain.join()
        copied = threading.Thread(target=contextvars.copy_context().run, args=(read,))
        copied.start()
        copied.join()
    assert seen == [afnio.BackwardOptions(), cheap]
