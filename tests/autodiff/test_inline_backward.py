"""Where a custom Function's plain ``backward`` runs: on afnio's loop by default, in a
worker thread with ``blocking = True``, and never deadlocking when a backward on the
loop makes a synchronous afnio call (it is re-run in a worker thread)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio._runtime import acquire_request_slot, run_sync
from afnio.autodiff import Function, engine
from afnio.testing import SIMULATOR_MODEL, Simulator
from tests.autodiff.helpers import DEADLINE_S, InFlight, within_deadline

LOOP_THREAD = "afnio-runtime"


def _where(blocking: bool | None, seen: list[str]) -> type[Function]:
    """A trivial Function whose backward records the thread it runs in."""

    class Where(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            seen.append(threading.current_thread().name)
            return grad

    if blocking is not None:
        Where.blocking = blocking
    return Where


def _chain(fn: type[Function], n: int) -> tuple[Variable, Variable]:
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = leaf
    for _ in range(n):
        out = fn.apply(out)
    return leaf, out


# -- where plain backwards run -------------------------------------------------------


def test_plain_backward_runs_on_afnios_loop_after_its_first_call() -> None:
    seen: list[str] = []
    fn = _where(None, seen)
    inline_before = engine._counts["inline"]
    leaf, out = _chain(fn, 20)
    out.backward(Variable("g"))
    # the first call is checked in a worker thread, every later one runs on the loop
    assert seen[0].startswith("afnio-bw")
    assert seen[1:] == [LOOP_THREAD] * 19
    assert engine._counts["inline"] - inline_before == 19
    seen.clear()
    leaf2, out2 = _chain(fn, 5)
    out2.backward(Variable("h"))
    assert seen == [LOOP_THREAD] * 5
    assert [g.data for g in leaf.grad] == ["g"] and [g.data for g in leaf2.grad] == [
        "h"
    ]


def test_blocking_false_runs_on_the_loop_from_the_first_call() -> None:
    seen: list[str] = []
    _, out = _chain(_where(False, seen), 3)
    out.backward(Variable("g"))
    assert seen == [LOOP_THREAD] * 3


def test_blocking_true_runs_every_call_in_a_worker_thread() -> None:
    seen: list[str] = []
    fn = _where(True, seen)
    for _ in range(2):
        _, out = _chain(fn, 4)
        out.backward(Variable("g"))
    assert len(seen) == 8
    assert all(name.startswith("afnio-bw") for name in seen)


def test_deprecated_run_backward_inline_still_decides_where_backward_runs() -> None:
    seen: list[str] = []
    threaded = _where(None, seen)
    threaded.run_backward_inline = False  # the old spelling of blocking = True
    _, out = _chain(threaded, 2)
    out.backward(Variable("g"))
    inline = _where(None, seen)
    inline.run_backward_inline = True  # the old spelling of blocking = False
    _, out = _chain(inline, 2)
    out.backward(Variable("g"))
    assert [name.startswith("afnio-bw") for name in seen] == [True, True, False, False]


def _sleepy(blocking: bool | None, counter: InFlight, delay: float) -> type[Function]:
    import time

    class Sleepy(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            counter.enter()
            try:
                time.sleep(delay)
            finally:
                counter.exit()
            return grad

    Sleepy.blocking = blocking
    return Sleepy


def _branches(fn: type[Function], n: int) -> tuple[Variable, list[Variable]]:
    leaves = [Variable(str(i), role=f"leaf {i}", requires_grad=True) for i in range(n)]
    return afnio.functional.sum([fn.apply(leaf) for leaf in leaves]), leaves


def test_blocking_true_branches_run_concurrently_on_every_pass() -> None:
    counter = InFlight()
    fn = _sleepy(True, counter, 0.1)
    for _ in range(2):  # the second pass too: the declaration is never revised
        counter.peak = 0
        total, _ = _branches(fn, 8)
        within_deadline(lambda total=total: total.backward(Variable("g")))
        assert counter.peak == 8


def test_undeclared_blocking_code_runs_inline_one_node_at_a_time() -> None:
    # time.sleep is not an afnio call: undetected, so it runs on the loop (this is
    # why such a backward must declare blocking = True)
    counter = InFlight()
    fn = _sleepy(False, counter, 0.01)
    total, leaves = _branches(fn, 8)
    within_deadline(lambda: total.backward(Variable("g")))
    assert counter.calls == 8 and counter.peak == 1
    assert all(len(leaf.grad) == 1 for leaf in leaves)


# -- synchronous afnio calls inside a backward on the loop ---------------------------


def _sync_call_function(
    blocking: bool | None, attempts: list[str], call: Callable[[str], str]
) -> type[Function]:
    """A Function whose backward makes the synchronous afnio call ``call``."""

    class Critic(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            attempts.append(threading.current_thread().name)
            return Variable(call(str(grad.data)), role="feedback")

    Critic.blocking = blocking
    return Critic


def _echo(text: str) -> str:
    async def upper() -> str:
        await asyncio.sleep(0)
        return text.upper()

    return run_sync(upper())


def test_sync_afnio_call_on_the_loop_is_rerun_in_a_thread_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts: list[str] = []
    fn = _sync_call_function(False, attempts, _echo)
    reruns = engine._counts["rerun"]
    leaf, out = _chain(fn, 1)
    with caplog.at_level(logging.WARNING, logger="afnio.autodiff"):
        within_deadline(lambda: out.backward(Variable("g")))
    assert [g.data for g in leaf.grad] == ["G"]
    assert attempts[0] == LOOP_THREAD and attempts[1].startswith("afnio-bw")
    assert engine._counts["rerun"] - reruns == 1
    (record,) = [r for r in caplog.records if r.name == "afnio.autodiff"]
    assert "blocking = True" in record.getMessage()
    assert "Critic" in record.getMessage()
    # from then on the Function is treated as blocking: no more attempts on the loop
    attempts.clear()
    leaf2, out2 = _chain(fn, 3)
    within_deadline(lambda: out2.backward(Variable("h")))
    assert all(name.startswith("afnio-bw") for name in attempts)
    assert engine._counts["rerun"] - reruns == 1
    assert [g.data for g in leaf2.grad] == ["H"]


def test_a_backward_that_swallows_the_stop_is_still_rerun_in_a_thread() -> None:
    attempts: list[str] = []

    def careless(text: str) -> str:
        try:
            return _echo(text)
        except BaseException:  # a user's catch-all around the LM call
            return "swallowed"

    leaf, out = _chain(_sync_call_function(False, attempts, careless), 1)
    within_deadline(lambda: out.backward(Variable("g")))
    assert [g.data for g in leaf.grad] == ["G"]  # the thread's answer, not the loop's
    assert len(attempts) == 2


def test_nested_sync_backward_inside_a_backward_on_the_loop_completes() -> None:
    inner_leaf = Variable("i", role="inner", requires_grad=True)
    inner = afnio.functional.sum([inner_leaf, Variable("j", role="j")])

    def nested(text: str) -> str:
        inner.backward(Variable(text))
        return text

    leaf, out = _chain(_sync_call_function(False, [], nested), 1)
    within_deadline(lambda: out.backward(Variable("g")))
    assert len(inner_leaf.grad) == 1 and [g.data for g in leaf.grad] == ["g"]


def test_acquire_request_slot_inside_a_backward_on_the_loop_is_rerun() -> None:
    def take_slot(text: str) -> str:
        release = acquire_request_slot()
        release()
        return text

    attempts: list[str] = []
    leaf, out = _chain(_sync_call_function(False, attempts, take_slot), 1)
    within_deadline(lambda: out.backward(Variable("g")))
    assert [g.data for g in leaf.grad] == ["g"]
    assert attempts[0] == LOOP_THREAD and attempts[1].startswith("afnio-bw")


def test_a_pool_of_sync_calls_is_found_by_the_first_call_then_runs_in_threads() -> None:
    def pooled(text: str) -> str:
        with ThreadPoolExecutor(2) as pool:
            return "".join(pool.map(_echo, [text, text]))

    attempts: list[str] = []
    fn = _sync_call_function(None, attempts, pooled)
    for data in ("a", "b"):  # the second pass runs with the first call's verdict
        leaf, out = _chain(fn, 3)
        within_deadline(lambda out=out, data=data: out.backward(Variable(data)))
        assert [g.data for g in leaf.grad] == [data.upper() * 8]
    assert len(attempts) == 6
    assert all(name.startswith("afnio-bw") for name in attempts)


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [None, False, True])
def test_an_error_in_backward_propagates_with_the_node_and_changes_no_grad(
    blocking: bool | None,
) -> None:
    class Broken(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            raise ValueError("bad feedback")

    Broken.blocking = blocking
    for _ in range(2):  # with None, the first pass probes and the second is inline
        leaf = Variable("x", role="x", requires_grad=True)
        out = Broken.apply(leaf)
        with pytest.raises(ValueError, match="bad feedback") as info:
            within_deadline(lambda out=out: out.backward(Variable("g")))
        assert "(raised during backward by node BrokenBackward0)" in (
            info.value.__notes__
        )
        assert leaf.grad == []


# -- LM calls against the live simulator ---------------------------------------------


def _chat_critic(client: Any) -> Callable[[str], str]:
    def ask(text: str) -> str:
        messages = [{"role": "user", "content": f"Critique: {text}"}]
        return client.chat(messages, model=SIMULATOR_MODEL)

    return ask


def test_sync_chat_inside_a_backward_on_the_loop_completes_with_one_request_each() -> (
    None
):
    from afnio.models.openai import OpenAI

    attempts: list[str] = []
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        fn = _sync_call_function(False, attempts, _chat_critic(client))
        total, leaves = _branches(fn, 4)
        sim.reset_stats()
        within_deadline(lambda: total.backward(Variable("g")))
        # the stopped attempt on the loop sent nothing: one request per node
        assert sim.stats.calls == 4
        assert all(len(leaf.grad) == 1 and leaf.grad[0].data for leaf in leaves)
        assert attempts.count(LOOP_THREAD) == 1


@pytest.mark.parametrize("blocking", [None, True])
def test_sync_chat_backward_nodes_keep_running_concurrently(
    blocking: bool | None,
) -> None:
    from afnio.models.openai import OpenAI

    afnio.set_max_concurrency(16)
    attempts: list[str] = []
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        fn = _sync_call_function(blocking, attempts, _chat_critic(client))
        sim.latency = 0.2
        for _ in range(2):  # first pass (probing with None) and second pass
            total, leaves = _branches(fn, 8)
            sim.reset_stats()
            within_deadline(lambda total=total: total.backward(Variable("g")))
            assert sim.stats.calls == 8
            assert sim.stats.peak_in_flight == 8
            assert all(len(leaf.grad) == 1 for leaf in leaves)
        assert LOOP_THREAD not in attempts


def test_async_lm_backward_nodes_keep_running_concurrently() -> None:
    from afnio.models.openai import AsyncOpenAI

    afnio.set_max_concurrency(16)
    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):

        class AsyncCritic(Function):
            @staticmethod
            def forward(ctx: Any, x: Variable) -> Variable:
                return Variable(x.data, role=x.role)

            @staticmethod
            async def backward(ctx: Any, grad: Variable) -> Variable:
                reply = await client.achat(
                    [{"role": "user", "content": str(grad.data)}],
                    model=SIMULATOR_MODEL,
                )
                return Variable(reply, role="feedback")

        sim.latency = 0.2
        total, leaves = _branches(AsyncCritic, 8)
        sim.reset_stats()
        within_deadline(lambda: total.backward(Variable("g")))
        assert sim.stats.calls == 8 and sim.stats.peak_in_flight == 8
        assert all(len(leaf.grad) == 1 for leaf in leaves)


def test_a_backward_on_the_loop_waiting_on_a_thread_s_sync_call_is_rerun_in_a_thread(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case the first call cannot find: a Function whose first backward makes no
    afnio call and a later one waits for another thread's synchronous afnio call.
    After the stall threshold that call raises an error naming ``blocking = True``,
    which frees the backward; afnio re-runs it in a worker thread, where the
    thread's call goes through. (More cases: test_inline_backward_stall.py.)"""
    from afnio import _runtime

    monkeypatch.setattr(_runtime, "STALL_WARNING_S", 0.3)
    calls: list[str] = []
    answers: list[str] = []
    errors: list[BaseException] = []

    def ask(text: str) -> None:
        try:
            answers.append(_echo(text))
        except BaseException as e:  # the stopped call, seen by the test
            errors.append(e)

    class Waiter(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable(x.data, role=x.role)

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            calls.append(threading.current_thread().name)
            if len(calls) > 1:  # not on the first call: the check cannot see it
                helper = threading.Thread(target=ask, args=(grad.data,), daemon=True)
                helper.start()
                helper.join(DEADLINE_S)  # a real program would wait for ever
            return grad

    for data in ("a", "b"):
        leaf, out = _chain(Waiter, 1)
        with caplog.at_level(logging.WARNING, logger="afnio.autodiff"):
            within_deadline(lambda out=out, data=data: out.backward(Variable(data)))
    assert [g.data for g in leaf.grad] == ["b"]
    # probe (thread), inline on the loop (stalled), re-run in a worker thread
    assert calls[1] == LOOP_THREAD and calls[2].startswith("afnio-bw")
    assert len(errors) == 1 and "blocking = True" in str(errors[0])
    assert "Waiter" in str(errors[0])
    assert answers == ["B"]  # the re-run's call went through
    messages = [r.getMessage() for r in caplog.records if r.name == "afnio.autodiff"]
    assert len(messages) == 1, messages
    assert "Waiter.backward" in messages[0] and "blocking = True" in messages[0]
