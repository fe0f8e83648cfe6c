"""Paid answers of one unit of work, replayed when that unit is retried.

When a training step fails because one LM request exhausted its retries (a 429 storm,
a timeout), the Trainer runs the step again. Without a memo every request of the step
would be sent and billed again, although all but one were answered. Inside
:func:`step_memo`, each request an afnio model client makes is kept with its answer;
when the unit of work is attempted again (:meth:`StepMemo.begin_attempt`), the *n*-th
identical request of the new attempt gets the *n*-th answer of that request from the
earlier attempts, without a call, and only requests that never got an answer are
sent. A request of an earlier attempt that is still in flight when the retry asks
for it is awaited, not sent twice. So a retry costs exactly the requests that failed.

Rules:

* A request is identified by the client object, the kind of call (chat, complete,
  embed) and every parameter, as canonical JSON. The memo lives for one unit of work
  (a training step with its retries) and only in the context that opened it (a
  ``ContextVar``: other threads and tasks are unaffected; afnio's event loop inherits
  the caller's context).
* Within one attempt nothing is replayed: identical requests made on purpose (sampling
  twice) are all sent, as without a memo.
* An answer that its consumer rejected (unparsable JSON, a wrong gradient count) is
  dropped with :func:`reject_answer` (the very answer handed out, not every equal
  text), so the retry asks again instead of replaying it; the response cache, if on,
  forgets it too.
* Failed and cancelled requests store nothing.
* :meth:`StepMemo.forget` drops everything: the Trainer does so when an attempt
  failed for a reason other than the LM service (a bug, or a check on an answer's
  content), so that the retry asks the model afresh, as without a memo.

Example::

    >>> import asyncio
    >>> from afnio.models.step_memo import StepMemo, step_memo, memoized
    >>> sent = []
    >>> async def call():
    ...     sent.append(1)
    ...     return "answer"
    >>> memo = StepMemo()
    >>> with step_memo(memo):
    ...     asyncio.run(memoized(object, "chat", {"messages": []}, call))
    ...     memo.begin_attempt()  # the step failed elsewhere: try again
    ...     asyncio.run(memoized(object, "chat", {"messages": []}, call))
    'answer'
    'answer'
    >>> len(sent), memo.replayed
    (1, 1)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from afnio.models.cache import cache_key, get_cache

__all__ = [
    "StepMemo",
    "active_memo",
    "memoized",
    "reject_answer",
    "step_memo",
]

T = TypeVar("T")

_ACTIVE: ContextVar[StepMemo | None] = ContextVar("afnio_step_memo", default=None)


class _Entry:
    """One request's answer: pending while the request is in flight."""

    __slots__ = ("done", "event", "failed", "value")

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self.value: Any = None
        # set (from afnio's loop) when the request answered or failed
        self.event = asyncio.Event()

    def settle(self, value: Any = None, *, failed: bool = False) -> None:
        self.done, self.failed, self.value = True, failed, value
        self.event.set()


class StepMemo:
    """The answers paid during a unit of work, by request key, in request order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, list[_Entry]] = {}
        self._used: dict[str, int] = {}
        self.replayed = 0
        self.attempts = 1

    def begin_attempt(self) -> None:
        """Start a new attempt: every stored answer may be replayed once more."""
        with self._lock:
            self._used.clear()
            self.attempts += 1

    def forget(self) -> None:
        """Drop every stored answer (the next attempt asks the model afresh)."""
        with self._lock:
            self._entries.clear()
            self._used.clear()

    def _take(self, key: str) -> _Entry | None:
        """The next entry of ``key`` not yet used in this attempt, or ``None``."""
        with self._lock:
            entries = self._entries.get(key, [])
            used = self._used.get(key, 0)
            if used < len(entries):
                self._used[key] = used + 1
                return entries[used]
        return None

    def _add(self, key: str) -> _Entry:
        """A new pending entry of ``key``, used in this attempt."""
        entry = _Entry()
        with self._lock:
            self._entries.setdefault(key, []).append(entry)
            self._used[key] = self._used.get(key, 0) + 1
        return entry

    def _drop(self, key: str, entry: _Entry) -> None:
        """Remove ``entry`` (failed or rejected); it was used in this attempt."""
        with self._lock:
            entries = self._entries.get(key, [])
            for i, candidate in enumerate(entries):
                if candidate is entry:
                    del entries[i]
                    if i < self._used.get(key, 0):
                        self._used[key] -= 1
                    return

    def reject(self, answer: Any) -> bool:
        """Forget the stored ``answer`` (the very object a request returned; else the
        last equal answer handed out in this attempt). Returns whether one was
        found."""
        with self._lock:
            found: tuple[str, _Entry] | None = None
            for key, entries in self._entries.items():
                for entry in entries[: self._used.get(key, 0)]:
                    if entry.done and not entry.failed and entry.value is answer:
                        found = (key, entry)
            if found is None:
                for key, entries in self._entries.items():
                    for entry in entries[: self._used.get(key, 0)]:
                        if entry.done and not entry.failed and entry.value == answer:
                            found = (key, entry)
        if found is None:
            return False
        self._drop(*found)
        return True

    def __len__(self) -> int:
        with self._lock:
            return sum(
                1
                for entries in self._entries.values()
                for e in entries
                if e.done and not e.failed
            )


def active_memo() -> StepMemo | None:
    """The memo of the unit of work running in this context, if any."""
    return _ACTIVE.get()


@contextmanager
def step_memo(memo: StepMemo | None = None) -> Iterator[StepMemo]:
    """Keep the answers paid inside the block in ``memo`` (a new one by default).

    LM calls made from this context (afnio's event loop inherits it) record into and
    replay from the memo; call :meth:`StepMemo.begin_attempt` before each retry.
    """
    memo = memo if memo is not None else StepMemo()
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)


async def memoized(
    client: object,
    kind: str,
    request: Mapping[str, Any],
    call: Callable[[], Awaitable[T]],
) -> T:
    """``await call()``, unless the active memo holds an answer to this very request
    from an earlier attempt (awaited if that request is still in flight). Without an
    active memo, just ``await call()``. Runs on one event loop (afnio's)."""
    memo = _ACTIVE.get()
    if memo is None:
        return await call()
    key = cache_key({"client": id(client), "kind": kind, "request": dict(request)})
    earlier = memo._take(key)
    if earlier is not None:
        await earlier.event.wait()
        if not earlier.failed:
            memo.replayed += 1
            return earlier.value  # type: ignore[no-any-return]
        memo._drop(key, earlier)  # that request failed: send it now
    entry = memo._add(key)
    try:
        value = await call()
    except BaseException:
        memo._drop(key, entry)
        entry.settle(failed=True)
        raise
    entry.settle(value)
    return value


def reject_answer(answer: Any) -> None:
    """Tell the active memo (if any) and the response cache (if on) that ``answer``
    was unusable, so that a retry asks the model again instead of replaying it."""
    memo = _ACTIVE.get()
    if memo is not None:
        memo.reject(answer)
    cache = get_cache()
    if cache is not None:
        cache.forget_answer(answer)
