"""A plain backward running on afnio's loop that waits for *another thread's* afnio
call (a thread pool running ``model.chat``) never deadlocks: once that call has waited
``afnio._runtime.STALL_WARNING_S`` for a loop held all that time by the backward, it
raises a ``RuntimeError`` naming ``blocking = True`` before anything is sent, which
frees the backward, and the engine re-runs the backward in a worker thread.

Every test runs the pass under a deadline (a regression hangs, so it fails instead)
and sets a small stall threshold. Behaviour is checked by counters (requests the
simulator saw, engine re-runs, threads the backward ran in), never by timings.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import afnio
from afnio import Variable, _runtime
from afnio._runtime import run_async, run_sync
from afnio.autodiff import Function, engine
from afnio.testing import SIMULATOR_MODEL, Simulator
from tests.autodiff.helpers import DEADLINE_S, within_deadline

LOOP_THREAD = "afnio-runtime"
STALL_S = 0.3  # the stall threshold the tests use (10 s by default)


@pytest.fixture(autouse=True)
def _small_stall_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "STALL_WARNING_S", STALL_S)


@pytest.fixture
def sim_client() -> Iterator[tuple[Simulator, Any]]:
    from afnio.models.openai import OpenAI

    afnio.set_max_concurrency(16)
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        yield sim, client


def _identity_function(
    name: str, backward: Callable[[Variable], str], blocking: bool | None
) -> type[Function]:
    """A Function named ``name`` whose plain backward returns ``backward(grad)``."""

    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role=x.role)

    def run_backward(ctx: Any, grad: Variable) -> Variable:
        return Variable(backward(grad), role="feedback")

    fn = type(
        name,
        (Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(run_backward),
            "blocking": blocking,
        },
    )
    return fn


def _branches(fn: type[Function], n: int) -> tuple[Variable, list[Variable]]:
    leaves = [Variable(f"x{i}", role=f"leaf {i}", requires_grad=True) for i in range(n)]
    return afnio.functional.sum([fn.apply(leaf) for leaf in leaves]), leaves


def _ask(client: Any, text: str) -> str:
    return client.chat(
        [{"role": "user", "content": f"Critique: {text}"}], model=SIMULATOR_MODEL
    )


def _autodiff_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "afnio.autodiff"]


# -- a backward waiting on a thread pool that calls the model ------------------------


def test_backward_on_the_loop_waiting_on_a_pool_running_model_chat_completes(
    sim_client: tuple[Simulator, Any], caplog: pytest.LogCaptureFixture
) -> None:
    sim, client = sim_client
    threads: list[str] = []

    def pooled(grad: Variable) -> str:
        threads.append(threading.current_thread().name)
        with ThreadPoolExecutor(2) as pool:
            return pool.submit(_ask, client, str(grad.data)).result()

    fn = _identity_function("PooledCritic", pooled, blocking=False)  # on the loop
    total, leaves = _branches(fn, 4)
    sim.reset_stats()
    stalled, reruns = engine._counts.get("stalled", 0), engine._counts["rerun"]
    with caplog.at_level(logging.WARNING, logger="afnio.autodiff"):
        within_deadline(lambda: total.backward(Variable("too long")))

    assert all(len(leaf.grad) == 1 and leaf.grad[0].data for leaf in leaves)
    # the call stopped while the loop was held sent nothing: one request per node
    assert sim.stats.calls == 4
    # one stall: that node is re-run in a worker thread, and so are the others
    assert engine._counts.get("stalled", 0) - stalled == 1
    assert engine._counts["rerun"] - reruns == 1
    assert threads.count(LOOP_THREAD) == 1
    assert len(threads) == 5 and all(
        t.startswith("afnio-bw") for t in threads if t != LOOP_THREAD
    )
    (message,) = _autodiff_warnings(caplog)
    assert "PooledCritic.backward" in message and "blocking = True" in message


def test_the_stopped_call_raises_a_runtime_error_naming_blocking_true(
    sim_client: tuple[Simulator, Any],
) -> None:
    sim, client = sim_client
    errors: list[BaseException] = []

    def pooled(grad: Variable) -> str:
        with ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(_ask, client, str(grad.data)).result()
            except RuntimeError as e:  # a backward that tolerates failed calls
                errors.append(e)
                return "no feedback"

    fn = _identity_function("TolerantCritic", pooled, blocking=False)
    total, leaves = _branches(fn, 1)
    sim.reset_stats()
    within_deadline(lambda: total.backward(Variable("g")))

    (error,) = errors
    text = str(error)
    assert "`blocking = True`" in text and "TolerantCritic" in text
    assert "before anything was sent" in text
    assert "STALL_WARNING_S" in text
    # the backward swallowed the error, yet it is re-run in a worker thread, so its
    # result has the model's answer rather than its fallback
    assert leaves[0].grad[0].data != "no feedback"
    assert sim.stats.calls == 1


def test_function_whose_first_backward_is_plain_and_a_later_one_uses_a_pool(
    sim_client: tuple[Simulator, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The probe (first call, in a worker thread) sees no afnio call and puts the
    Function on the loop; a later call sends failed samples to a pool."""
    sim, client = sim_client
    threads: list[str] = []

    def sometimes_pooled(grad: Variable) -> str:
        threads.append(threading.current_thread().name)
        if "retry" not in str(grad.data):
            return f"plain: {grad.data}"
        with ThreadPoolExecutor(2) as pool:
            return pool.submit(_ask, client, str(grad.data)).result()

    fn = _identity_function("SometimesPooled", sometimes_pooled, blocking=None)
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = fn.apply(leaf)
    within_deadline(lambda: out.backward(Variable("fine")))  # the probe: no call
    assert engine._KINDS[fn] == "inline"

    sim.reset_stats()
    for feedback in ("fine", "retry this"):
        out = fn.apply(leaf)
        with caplog.at_level(logging.WARNING, logger="afnio.autodiff"):
            within_deadline(lambda out=out, f=feedback: out.backward(Variable(f)))

    assert [g.data for g in leaf.grad[:2]] == ["plain: fine", "plain: fine"]
    assert leaf.grad[2].data and not leaf.grad[2].data.startswith("plain")
    assert sim.stats.calls == 1
    # probe thread, the loop twice (the second stalled), then the re-run's thread
    assert threads[1:3] == [LOOP_THREAD, LOOP_THREAD]
    assert threads[3].startswith("afnio-bw") and len(threads) == 4
    assert engine._KINDS[fn] == "thread"  # from then on: worker threads
    (message,) = _autodiff_warnings(caplog)
    assert "SometimesPooled.backward" in message and "blocking = True" in message


def test_a_pool_calling_the_async_api_through_its_own_loop_also_completes(
    sim_client: tuple[Simulator, Any],
) -> None:
    """``asyncio.run(...)`` in a pool thread reaches afnio's loop through run_async:
    the same stall stops it."""
    sim, _client = sim_client
    from afnio.models.openai import AsyncOpenAI

    with AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as aio:

        async def ask(text: str) -> str:
            return await aio.achat(
                [{"role": "user", "content": text}], model=SIMULATOR_MODEL
            )

        def pooled(grad: Variable) -> str:
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, ask(str(grad.data))).result()

        fn = _identity_function("AsyncPooled", pooled, blocking=False)
        total, leaves = _branches(fn, 2)
        sim.reset_stats()
        stalled = engine._counts.get("stalled", 0)
        within_deadline(lambda: total.backward(Variable("g")))
    assert all(len(leaf.grad) == 1 and leaf.grad[0].data for leaf in leaves)
    assert sim.stats.calls == 2
    assert engine._counts.get("stalled", 0) - stalled == 1


# -- what is never stopped -----------------------------------------------------------


def test_a_slow_backward_on_the_loop_does_not_stop_the_backward_call_that_runs_it() -> (
    None
):
    """``x.backward()`` itself waits, started, for the loop the slow backward holds
    past the threshold: a started call is never stopped."""
    threads: list[str] = []

    def slow(grad: Variable) -> str:
        threads.append(threading.current_thread().name)
        time.sleep(STALL_S * 4)  # holds the loop (undeclared blocking code)
        return str(grad.data)

    fn = _identity_function("SlowButHarmless", slow, blocking=False)
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = fn.apply(leaf)
    stalled = engine._counts.get("stalled", 0)
    within_deadline(lambda: out.backward(Variable("g")))
    assert [g.data for g in leaf.grad] == ["g"]
    assert threads == [LOOP_THREAD]  # ran once, on the loop, not re-run
    assert engine._counts.get("stalled", 0) == stalled
    assert engine._KINDS[fn] == "inline"


def test_a_long_chain_of_quick_backwards_on_the_loop_stops_no_call() -> None:
    """Many quick inline backwards run back to back in one turn of the loop; another
    thread's call waits for all of them, longer than the threshold, but no single
    backward held the loop that long, so the call is not stopped."""
    started = threading.Event()
    answers: list[str] = []
    errors: list[BaseException] = []

    def quick(grad: Variable) -> str:
        started.set()
        time.sleep(STALL_S / 10)
        return str(grad.data)

    fn = _identity_function("QuickStep", quick, blocking=False)
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = leaf
    for _ in range(40):  # about 4x the threshold in all
        out = fn.apply(out)

    async def echo() -> str:
        return "echo"

    def other_thread() -> None:
        started.wait(DEADLINE_S)
        try:
            answers.append(run_sync(echo()))
        except BaseException as e:
            errors.append(e)

    caller = threading.Thread(target=other_thread, daemon=True)
    caller.start()
    stalled = engine._counts.get("stalled", 0)
    within_deadline(lambda: out.backward(Variable("g")))
    caller.join(DEADLINE_S)
    assert not caller.is_alive()
    assert errors == [] and answers == ["echo"]
    assert engine._counts.get("stalled", 0) == stalled
    assert [g.data for g in leaf.grad] == ["g"]


def test_a_call_that_raises_timeout_error_is_not_taken_for_a_wait_timeout() -> None:
    """The wait for the loop uses a timeout; the call's own TimeoutError is raised,
    not looped on."""

    async def times_out() -> None:
        await asyncio.sleep(STALL_S * 2)  # outlives the first wait
        raise TimeoutError("the provider took too long")

    with pytest.raises(TimeoutError, match="the provider took too long"):
        within_deadline(lambda: run_sync(times_out()))

    async def from_another_loop() -> None:
        await run_async(times_out())

    with pytest.raises(TimeoutError, match="the provider took too long"):
        within_deadline(lambda: asyncio.run(from_another_loop()))


def test_the_threshold_is_read_at_each_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bigger ``afnio._runtime.STALL_WARNING_S`` lets a backward hold the loop
    longer before another thread's call is stopped."""
    monkeypatch.setattr(_runtime, "STALL_WARNING_S", 30.0)
    done = threading.Event()
    answers: list[str] = []

    async def echo() -> str:
        return "echo"

    def waits_briefly(grad: Variable) -> str:
        # another thread's call waits for the loop; this backward gives up after
        # 3x the small threshold, well under the 30 s one: nothing is stopped
        helper = threading.Thread(
            target=lambda: (answers.append(run_sync(echo())), done.set()),
            daemon=True,
        )
        helper.start()
        helper.join(STALL_S * 3)
        return str(grad.data)

    fn = _identity_function("WaitsBriefly", waits_briefly, blocking=False)
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = fn.apply(leaf)
    stalled = engine._counts.get("stalled", 0)
    within_deadline(lambda: out.backward(Variable("g")))
    assert done.wait(DEADLINE_S) and answers == ["echo"]
    assert engine._counts.get("stalled", 0) == stalled


def test_a_started_call_kept_waiting_by_a_backward_is_named_in_a_warning_not_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another thread's call that the loop had already started when the backward
    took the loop cannot be stopped safely (it may be what runs the backward): past
    twice the threshold afnio names the Function and ``blocking = True`` in a
    warning. (This backward stops waiting after 6x the threshold, so the test ends.)"""
    running = threading.Event()
    answers: list[str] = []

    async def slow_echo() -> str:
        running.set()  # on afnio's loop: the call has started
        await asyncio.sleep(STALL_S / 3)
        return "echo"

    helper = threading.Thread(
        target=lambda: answers.append(run_sync(slow_echo())), daemon=True
    )

    def waits_for_helper(grad: Variable) -> str:
        helper.join(STALL_S * 6)
        return str(grad.data)

    fn = _identity_function("WaitsForStarted", waits_for_helper, blocking=False)
    leaf = Variable("x", role="leaf", requires_grad=True)
    out = fn.apply(leaf)
    stalled = engine._counts.get("stalled", 0)
    helper.start()
    assert running.wait(DEADLINE_S)
    with caplog.at_level(logging.WARNING, logger="afnio.autodiff"):
        within_deadline(lambda: out.backward(Variable("g")))
        helper.join(DEADLINE_S)
    assert answers == ["echo"]  # not stopped: it finished once the loop was free
    assert engine._counts.get("stalled", 0) == stalled
    assert [g.data for g in leaf.grad] == ["g"]
    messages = _autodiff_warnings(caplog)
    assert any(
        "WaitsForStarted.backward" in m and "blocking = True" in m for m in messages
    ), messages


def test_a_busy_inline_backward_that_waits_for_no_thread_stops_no_call(
    sim_client: tuple[Simulator, Any],
) -> None:
    """A plain backward holding the loop with work of its own (sleeping here, as a
    CPU loop or a non-afnio HTTP call would) is only slow: an afnio call from
    another thread (a user's thread, or a blocking node's worker) waits for it,
    and is neither stopped nor the backward re-run."""
    sim, client = sim_client
    ran: list[str] = []
    answers: list[Any] = []

    def busy(grad: Variable) -> str:
        ran.append(threading.current_thread().name)
        time.sleep(4 * STALL_S)  # holds the loop, waits on no thread
        return "busy feedback"

    def critic(grad: Variable) -> str:
        time.sleep(STALL_S / 3)  # the busy backward takes the loop first
        return _ask(client, grad.data)

    def user_thread() -> None:
        time.sleep(STALL_S / 3)
        try:
            answers.append(_ask(client, "from a user thread"))
        except BaseException as e:
            answers.append(e)

    Busy = _identity_function("Busy", busy, blocking=False)
    Critic = _identity_function("Critic", critic, blocking=True)
    busy_leaf = Variable("a", role="a", requires_grad=True)
    critic_leaf = Variable("b", role="b", requires_grad=True)
    total = afnio.functional.sum([Critic.apply(critic_leaf), Busy.apply(busy_leaf)])
    before = dict(engine._counts)
    other = threading.Thread(target=user_thread, name="user")
    other.start()
    within_deadline(lambda: total.backward(Variable("g")))
    other.join(DEADLINE_S)
    assert ran == [LOOP_THREAD]  # ran once, inline: not re-run
    assert engine._counts.get("stalled", 0) == before.get("stalled", 0)
    assert busy_leaf.grad is not None and critic_leaf.grad is not None
    assert len(answers) == 1 and isinstance(answers[0], str)  # answered, not stopped
    assert sim.stats.calls == 2  # the critic's and the user thread's chats
