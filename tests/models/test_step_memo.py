"""The step memo: a retried unit of work pays only for requests never answered."""

from __future__ import annotations

import asyncio
import threading

import pytest

from afnio.models.step_memo import (
    StepMemo,
    active_memo,
    memoized,
    reject_answer,
    step_memo,
)


class Counter:
    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self) -> str:
        self.sent += 1
        return f"answer {self.sent}"


def _ask(client: object, request: dict[str, object], counter: Counter) -> str:
    return asyncio.run(memoized(client, "chat", request, counter))


def test_nothing_is_replayed_without_a_memo() -> None:
    counter = Counter()
    assert [_ask(object, {"m": 1}, counter) for _ in range(2)] == [
        "answer 1",
        "answer 2",
    ]


def test_identical_requests_within_one_attempt_are_all_sent() -> None:
    counter = Counter()
    with step_memo():
        answers = [_ask(object, {"m": 1}, counter) for _ in range(3)]
    assert answers == ["answer 1", "answer 2", "answer 3"] and counter.sent == 3


def test_a_new_attempt_replays_the_paid_answers_in_order_then_sends() -> None:
    counter = Counter()
    with step_memo() as memo:
        first = [_ask(object, {"m": 1}, counter) for _ in range(2)]
        memo.begin_attempt()
        second = [_ask(object, {"m": 1}, counter) for _ in range(3)]
    assert first == ["answer 1", "answer 2"]
    assert second == ["answer 1", "answer 2", "answer 3"]
    assert counter.sent == 3 and memo.replayed == 2 and memo.attempts == 2


def test_requests_differ_by_client_kind_and_parameters() -> None:
    counter = Counter()
    a, b = object(), object()
    with step_memo() as memo:
        _ask(a, {"m": 1}, counter)
        memo.begin_attempt()
        assert _ask(b, {"m": 1}, counter) == "answer 2"
        assert _ask(a, {"m": 2}, counter) == "answer 3"
        assert asyncio.run(memoized(a, "embed", {"m": 1}, counter)) == "answer 4"
        assert _ask(a, {"m": 1}, counter) == "answer 1"


def test_a_rejected_answer_is_not_replayed() -> None:
    counter = Counter()
    with step_memo() as memo:
        bad = _ask(object, {"m": 1}, counter)
        reject_answer(bad)
        memo.begin_attempt()
        assert _ask(object, {"m": 1}, counter) == "answer 2"
    assert len(memo) == 1


def test_a_failed_call_stores_nothing() -> None:
    async def fail() -> str:
        raise ConnectionError("down")

    with step_memo() as memo, pytest.raises(ConnectionError):
        asyncio.run(memoized(object, "chat", {}, fail))
    assert len(memo) == 0


def test_the_memo_belongs_to_its_context_only() -> None:
    seen: list[StepMemo | None] = []
    with step_memo() as memo:
        assert active_memo() is memo
        thread = threading.Thread(target=lambda: seen.append(active_memo()))
        thread.start()
        thread.join()
    assert seen == [None] and active_memo() is None


def test_a_request_still_in_flight_is_awaited_not_sent_again() -> None:
    sent: list[int] = []
    release = asyncio.Event()

    async def slow() -> str:
        sent.append(1)
        await release.wait()
        return "late answer"

    async def scenario(memo: StepMemo) -> str:
        first = asyncio.ensure_future(memoized(object, "chat", {"m": 1}, slow))
        await asyncio.sleep(0)  # attempt 1 sent it, then failed elsewhere
        memo.begin_attempt()
        second = asyncio.ensure_future(memoized(object, "chat", {"m": 1}, slow))
        await asyncio.sleep(0)
        release.set()
        assert await first == "late answer"
        return await second

    with step_memo() as memo:
        assert asyncio.run(scenario(memo)) == "late answer"
    assert len(sent) == 1 and memo.replayed == 1


def test_a_request_that_fails_in_flight_is_sent_by_the_retry() -> None:
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("x")
        await asyncio.sleep(0)
        if len(calls) == 1:
            raise ConnectionError("reset")
        return "answer"

    async def scenario(memo: StepMemo) -> str:
        first = asyncio.ensure_future(memoized(object, "chat", {"m": 1}, flaky))
        await asyncio.sleep(0)
        memo.begin_attempt()
        second = await memoized(object, "chat", {"m": 1}, flaky)
        with pytest.raises(ConnectionError):
            await first
        return second

    with step_memo() as memo:
        assert asyncio.run(scenario(memo)) == "answer"
    assert len(calls) == 2 and len(memo) == 1


def test_rejecting_an_answer_drops_that_answer_only() -> None:
    async def same() -> str:
        return "".join(["{", "}"])  # a new, equal object each time

    with step_memo() as memo:
        kept = asyncio.run(memoized(object, "chat", {"m": 1}, same))
        bad = asyncio.run(memoized(object, "chat", {"m": 2}, same))
        assert kept == bad and kept is not bad
        assert memo.reject(bad)
        memo.begin_attempt()
        assert asyncio.run(memoized(object, "chat", {"m": 1}, same)) is kept
        assert len(memo) == 1
        again = asyncio.run(memoized(object, "chat", {"m": 2}, same))
    assert again is not bad and memo.replayed == 1  # request 2 was asked again


def test_forget_drops_every_answer() -> None:
    counter = Counter()
    with step_memo() as memo:
        _ask(object, {"m": 1}, counter)
        memo.forget()
        memo.begin_attempt()
        assert _ask(object, {"m": 1}, counter) == "answer 2"


def test_a_rejected_answer_leaves_the_response_cache() -> None:
    from afnio.models.cache import disable_cache, enable_cache

    cache = enable_cache()
    try:
        cache.put("k1", "cut {json", kind="chat")
        cache.put("k2", "fine", kind="chat")
        found, bad = cache.get("k1", kind="chat")
        assert found
        reject_answer(bad)
        assert cache.get("k1", kind="chat") == (False, None)
        assert cache.get("k2", kind="chat") == (True, "fine")
    finally:
        disable_cache()
