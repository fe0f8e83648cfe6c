"""afnio's event loop and the process-wide concurrency bound (with slot borrowing)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import afnio
from afnio._runtime import (
    concurrency_slot,
    in_runtime_thread,
    reset_concurrency_stats,
    run_async,
    run_sync,
)


class Peak:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def work(self, delay: float) -> None:
        async with concurrency_slot():
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(delay)
            self.now -= 1


async def _node_with_children(peak: Peak, children: int, delay: float) -> None:
    # a node holds a slot and fans out bounded work, like a batched LM backward
    async with concurrency_slot():
        await asyncio.gather(*(peak.work(delay) for _ in range(children)))


def test_nested_work_borrows_the_parents_slot_to_reach_the_full_bound() -> None:
    afnio.set_max_concurrency(16)
    peak = Peak()
    reset_concurrency_stats()
    run_sync(_node_with_children(peak, 16, 0.1))
    assert peak.peak == 16
    stats = afnio.get_concurrency_stats()
    assert stats.peak == 16  # 15 own slots + 1 borrowed, never 17
    assert stats.in_flight == 0


def test_nested_work_with_bound_one_does_not_deadlock() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()
    run_sync(asyncio.wait_for(_node_with_children(peak, 5, 0.01), timeout=10))
    assert peak.peak == 1


def test_two_parents_share_the_bound() -> None:
    afnio.set_max_concurrency(4)
    peak = Peak()
    reset_concurrency_stats()

    async def main() -> None:
        await asyncio.gather(
            _node_with_children(peak, 6, 0.02), _node_with_children(peak, 6, 0.02)
        )

    run_sync(asyncio.wait_for(main(), timeout=10))
    assert peak.peak <= 4
    assert afnio.get_concurrency_stats().peak <= 4


def test_raising_the_bound_releases_waiters() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()

    async def main() -> None:
        tasks = [asyncio.create_task(peak.work(0.2)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert peak.peak == 1
        threading.Thread(target=afnio.set_max_concurrency, args=(4,)).start()
        await asyncio.gather(*tasks)

    run_sync(asyncio.wait_for(main(), timeout=10))
    assert peak.peak == 4


def test_cancelled_waiters_do_not_leak_slots() -> None:
    afnio.set_max_concurrency(1)
    peak = Peak()

    async def main() -> None:
        holder = asyncio.create_task(peak.work(0.1))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(peak.work(0.1))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        await asyncio.wait_for(peak.work(0.0), timeout=2)  # the slot is free again

    run_sync(main())
    assert afnio.get_concurrency_stats().in_flight == 0


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
