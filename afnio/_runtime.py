"""afnio's event loop and its one process-wide concurrency bound.

Every piece of asynchronous work afnio does (running the ready nodes of a backward
pass, and every LM call) runs on **one** event loop that afnio owns, in a daemon
background thread. That gives three guarantees:

* the synchronous API (``Variable.backward()``, ``client.chat()``) works everywhere,
  including inside a running event loop (a Jupyter cell, an async web handler): the
  caller's thread just waits for afnio's loop;
* one bound, :func:`set_max_concurrency`, holds for the whole process;
* async callers can await the same work without blocking their own loop
  (:func:`run_async`).

The bound is counted in *slots*. A backward node or an LM call holds one slot while it
runs. Work started from inside a slot holder (for example the 16 LM calls a batched
node makes) may **borrow** the holder's slot for one of them, so nested work never
deadlocks and never counts twice: with a bound of 16, a node making 16 LM calls has 16
requests in flight, not 15; with a bound of 1, everything runs one at a time.

Example::

    >>> import afnio
    >>> afnio.set_max_concurrency(4)
    >>> afnio.get_max_concurrency()
    4
    >>> afnio.set_max_concurrency(16)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, TypeVar

__all__ = [
    "ConcurrencyStats",
    "DEFAULT_MAX_CONCURRENCY",
    "concurrency_slot",
    "get_concurrency_stats",
    "get_max_concurrency",
    "in_runtime_thread",
    "reset_concurrency_stats",
    "run_async",
    "run_sync",
    "set_max_concurrency",
]

T = TypeVar("T")

DEFAULT_MAX_CONCURRENCY = 16
"""The default bound on concurrent backward nodes and LM calls."""


class _Lease:
    """A held slot that the holder's descendants may borrow, one at a time."""

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.waiters: collections.deque[asyncio.Future[str]] = collections.deque()


_current_lease: contextvars.ContextVar[_Lease | None] = contextvars.ContextVar(
    "afnio_current_lease", default=None
)


class ConcurrencyStats:
    """Counters of the concurrency bound: slots in use now (``in_flight``), the most
    ever in use at once (``peak``), and how many work units took or borrowed a slot
    (``total``)."""

    __slots__ = ("in_flight", "peak", "total")

    def __init__(self, in_flight: int = 0, peak: int = 0, total: int = 0) -> None:
        self.in_flight = in_flight
        self.peak = peak
        self.total = total

    def __repr__(self) -> str:
        return (
            f"ConcurrencyStats(in_flight={self.in_flight}, peak={self.peak}, "
            f"total={self.total})"
        )


class _Limiter:
    """A FIFO counting limiter with slot borrowing. Used only on afnio's loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.owned = 0  # slots taken from the bound: the work in flight
        self.peak = 0
        self.total = 0  # work units started (owned or borrowed slots)
        self._waiters: collections.deque[asyncio.Future[str]] = collections.deque()

    def _start(self) -> None:
        self.total += 1
        self.peak = max(self.peak, self.owned)

    @staticmethod
    def _hand_over(queue: collections.deque[asyncio.Future[str]], how: str) -> bool:
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(how)
                return True
        return False

    async def acquire(self) -> str:
        """Take a slot; returns ``"own"`` or ``"borrow"``."""
        lease = _current_lease.get()
        if lease is not None and not lease.busy:
            lease.busy = True
            self._start()
            return "borrow"
        if self.owned < self.limit and not self._waiters:
            self.owned += 1
            self._start()
            return "own"
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if lease is not None:
            lease.waiters.append(fut)
        try:
            how = await fut
        except asyncio.CancelledError:
            served = fut.done() and not fut.cancelled()
            self._discard(fut, lease, served=fut.result() if served else None)
            if served:
                self._release(fut.result(), lease)
            raise
        self._discard(fut, lease, served=how)
        self._start()
        return how

    def _discard(
        self, fut: asyncio.Future[str], lease: _Lease | None, served: str | None
    ) -> None:
        # A waiter sits in up to two queues; the one that served it already popped
        # it, so only the other is searched (the main queue can be long).
        queues = []
        if served != "own":
            queues.append(self._waiters)
        if lease is not None and served != "borrow":
            queues.append(lease.waiters)
        for queue in queues:
            with contextlib.suppress(ValueError):
                queue.remove(fut)

    def _release(self, how: str, lease: _Lease | None) -> None:
        if how == "borrow":
            assert lease is not None
            if not self._hand_over(lease.waiters, "borrow"):
                lease.busy = False
            return
        if not self._hand_over(self._waiters, "own"):
            self.owned -= 1

    def release(self, how: str, lease: _Lease | None) -> None:
        self._release(how, lease)

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        while self.owned < self.limit and self._hand_over(self._waiters, "own"):
            self.owned += 1


class _Runtime:
    """The background thread and loop; created lazily, recreated after ``fork``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.limiter = _Limiter(DEFAULT_MAX_CONCURRENCY)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="afnio-runtime", daemon=True)
                thread.start()
                ready.wait()
                self._thread = thread
                self._loop = loop
            return self._loop

    def in_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self.limiter = _Limiter(self.limiter.limit)


_runtime = _Runtime()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_runtime._after_fork)


def in_runtime_thread() -> bool:
    """Return True when called from afnio's event-loop thread."""
    return _runtime.in_thread()


def _submit(coro: Coroutine[Any, Any, T]) -> ConcurrentFuture[T]:
    ctx = contextvars.copy_context()
    loop = _runtime.loop
    fut: ConcurrentFuture[T] = ConcurrentFuture()

    def start() -> None:
        task = ctx.run(loop.create_task, coro)

        def done(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                fut.cancel()
            elif (exc := t.exception()) is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(t.result())

        task.add_done_callback(done)
        fut.add_done_callback(
            lambda f: loop.call_soon_threadsafe(task.cancel) if f.cancelled() else None
        )

    if fut.set_running_or_notify_cancel():
        loop.call_soon_threadsafe(start)
    return fut


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on afnio's loop and block the calling thread until it is done.

    The caller's context variables (grad mode, a held concurrency slot) travel with
    the coroutine. Works from any thread, including one whose own event loop is
    running (a notebook cell). ``KeyboardInterrupt`` cancels the work.

    Raises:
        RuntimeError: if called from afnio's own loop thread, where blocking would
            deadlock; there, ``await`` the coroutine instead.
    """
    if _runtime.in_thread():
        coro.close()
        raise RuntimeError(
            "A synchronous afnio call was made from afnio's own event loop (for "
            "example inside an `async def backward`). Blocking there would deadlock: "
            "await the async form of the call instead."
        )
    fut = _submit(coro)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on afnio's loop from any event loop, without blocking it."""
    if _runtime.in_thread():
        return await coro
    return await asyncio.wrap_future(_submit(coro))


class concurrency_slot:  # lower case: used like a function, ``async with``
    """Hold one slot of the process-wide bound while the block runs.

    Must be entered on afnio's loop (anything run through :func:`run_sync` or
    :func:`run_async` is). Work started inside the block may borrow this slot for
    one task at a time, so nested bounded work never deadlocks.

    Example::

        >>> async def call_lm():
        ...     async with concurrency_slot():
        ...         ...  # one request in flight
    """

    __slots__ = ("_how", "_parent", "_token")

    async def __aenter__(self) -> None:
        self._parent = _current_lease.get()
        self._how = await _runtime.limiter.acquire()
        self._token = _current_lease.set(_Lease())

    async def __aexit__(self, *exc: object) -> None:
        _current_lease.reset(self._token)
        _runtime.limiter.release(self._how, self._parent)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be a positive int, got {type(value).__name__}: {value!r}."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return value


def set_max_concurrency(n: int) -> None:
    """Set how many backward nodes and LM calls may run at once (default 16).

    The bound is process-wide and applies immediately, also to work already
    waiting for a slot.

    Args:
        n: a positive int.

    Example::

        >>> import afnio
        >>> afnio.set_max_concurrency(1)   # strictly one LM call at a time
        >>> afnio.set_max_concurrency(16)
    """
    n = _check_positive_int("n", n)
    limiter = _runtime.limiter
    if limiter.limit == n:
        return
    if _runtime._loop is None:
        limiter.set_limit(n)
    else:
        _runtime._loop.call_soon_threadsafe(limiter.set_limit, n)
        if not _runtime.in_thread():
            # make the change visible before returning
            run_sync(asyncio.sleep(0))


def get_max_concurrency() -> int:
    """Return the current process-wide concurrency bound."""
    return _runtime.limiter.limit


def get_concurrency_stats() -> ConcurrencyStats:
    """Return slots in use now, the peak since the last reset, and the total count."""
    lim = _runtime.limiter
    return ConcurrencyStats(lim.owned, lim.peak, lim.total)


def reset_concurrency_stats() -> None:
    """Reset the peak and total counters (the in-flight count is kept)."""
    lim = _runtime.limiter
    lim.peak = lim.owned
    lim.total = 0
