"""afnio's event loop and the process-wide concurrency bound."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import afnio
from afnio._runtime import (
    in_runtime_thread,
    node_slot,
    request_slot,
    reset_concurrency_stats,
    run_async,
    run_sync,
)


class Peak:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def request(self, delay: float) -> None:
        async with request_slot():
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(delay)
            self.now -= 1


async def _node_with_requests(peak: Peak, requests: int, delay: float) -> None:
    # a backward node that fans out LM requests, like a batched LM backward
    async with node_slot():
        await asyncio.gather(*(peak.request(delay) for _ in range(requests)))


def test_a_node_making_16_requests_reaches_the_full_bound() -> None:
    afnio.set_max_concurrency(16)
    peak = Peak()
    reset_concurrency_stats()
    run_sync(_node_with_requests(peak, 16, 0.1))
    assert peak.peak == 16
    stats = afnio.get_concurrency_stats()
    assert (stats.requests.peak, stats.requests.total) == (16, 16)
    assert (stats.nodes.peak, stats.nodes.total) == (1, 1)
    assert stats.requests.in_flight == 0 and stats.nodes.in_flight == 0


def test_nested_requests_with_bound_one_do_not_deadlock() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()

    async def main() -> None:
        await asyncio.gather(*(_node_with_requests(peak, 3, 0.01) for _ in range(3)))

    run_sync(asyncio.wait_for(main(), timeout=10))
    assert peak.peak == 1


def test_requests_from_several_nodes_share_the_bound() -> None:
    afnio.set_max_concurrency(4)
    peak = Peak()
    reset_concurrency_stats()

    async def main() -> None:
        await asyncio.gather(
            _node_with_requests(peak, 6, 0.02), _node_with_requests(peak, 6, 0.02)
        )

    run_sync(asyncio.wait_for(main(), timeout=10))
    assert peak.peak == 4
    assert afnio.get_concurrency_stats().requests.peak == 4


def test_raising_the_bound_releases_waiters() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()

    async def main() -> None:
        tasks = [asyncio.create_task(peak.request(0.2)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert peak.peak == 1
        threading.Thread(target=afnio.set_max_concurrency, args=(4,)).start()
        await asyncio.gather(*tasks)

    run_sync(asyncio.wait_for(main(), timeout=10))
    assert peak.peak == 4


def test_lowering_the_bound_applies_to_waiting_work() -> None:
    afnio.set_max_concurrency(8)
    peak = Peak()

    async def main() -> int:
        first = [asyncio.create_task(peak.request(0.1)) for _ in range(8)]
        rest = [asyncio.create_task(peak.request(0.05)) for _ in range(8)]
        await asyncio.sleep(0.02)
        afnio.set_max_concurrency(2)  # from the loop itself: applies at once
        assert afnio.get_max_concurrency() == 2
        await asyncio.gather(*first)
        peak.peak = peak.now  # measure only after the first wave is done
        await asyncio.gather(*rest)
        return peak.peak

    assert run_sync(asyncio.wait_for(main(), timeout=10)) <= 2


def test_cancelled_waiters_do_not_leak_slots() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()

    async def main() -> None:
        holder = asyncio.create_task(peak.request(0.1))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(peak.request(0.1))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        await asyncio.wait_for(peak.request(0.0), timeout=2)  # the slot is free again

    run_sync(main())
    assert afnio.get_concurrency_stats().requests.in_flight == 0


def test_slots_are_only_taken_on_afnios_loop() -> None:
    async def elsewhere() -> None:
        async with request_slot():
            pass

    with pytest.raises(RuntimeError, match="afnio's event loop"):
        asyncio.run(elsewhere())


@pytest.mark.parametrize("bad", [0, -3])
def test_set_max_concurrency_rejects_non_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        afnio.set_max_concurrency(bad)


@pytest.mark.parametrize("bad", [2.5, "4", True, None])
def test_set_max_concurrency_rejects_non_int(bad: object) -> None:
    with pytest.raises(TypeError, match="`n` must be a positive int"):
        afnio.set_max_concurrency(bad)  # type: ignore[arg-type]


def test_default_bound_is_16() -> None:
    import afnio._runtime as rt

    assert rt.DEFAULT_MAX_CONCURRENCY == 16


def test_run_sync_and_run_async_use_one_background_loop() -> None:
    async def where() -> tuple[bool, int]:
        return in_runtime_thread(), id(asyncio.get_running_loop())

    inside, loop_a = run_sync(where())
    assert inside is True and in_runtime_thread() is False

    async def caller() -> tuple[bool, int]:
        return await run_async(where())

    inside_b, loop_b = asyncio.run(caller())
    assert inside_b is True and loop_a == loop_b


def test_run_sync_propagates_errors_and_context() -> None:
    async def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        run_sync(boom())

    async def mode() -> bool:
        return afnio.is_grad_enabled()

    with afnio.no_grad():
        assert run_sync(mode()) is False
    assert run_sync(mode()) is True


def test_a_task_that_ends_cancelled_does_not_hang_the_caller() -> None:
    async def cancelled() -> None:
        raise asyncio.CancelledError()

    with pytest.raises(BaseException) as info:
        run_sync(asyncio.wait_for(cancelled(), timeout=5))
    assert isinstance(info.value, (asyncio.CancelledError, Exception))


def test_cancelling_run_async_cancels_the_work() -> None:
    finished = threading.Event()

    async def slow() -> None:
        await asyncio.sleep(0.3)
        finished.set()

    async def caller() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_async(slow()), 0.05)

    asyncio.run(caller())
    time.sleep(0.4)
    assert not finished.is_set()


def test_system_exit_in_a_task_reaches_the_caller_and_the_loop_survives() -> None:
    async def quit_() -> None:
        raise SystemExit("bye")

    with pytest.raises(SystemExit):
        run_sync(quit_())

    async def ok() -> int:
        return 1

    assert run_sync(ok()) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_runtime_works_in_a_forked_child() -> None:
    async def ok() -> int:
        return 7

    assert run_sync(ok()) == 7  # the parent's loop thread exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            code = 0 if run_sync(asyncio.wait_for(ok(), 5)) == 7 else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
