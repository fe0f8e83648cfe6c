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

The bound ``n`` applies to two kinds of work, counted separately so that neither can
wait on the other: at most ``n`` backward nodes run at once (:func:`node_slot`), and at
most ``n`` LM requests are in flight at once (:func:`request_slot`). A batched node
making 16 LM calls with ``n=16`` therefore has 16 requests in flight; with ``n=1``
everything runs one at a time, and nothing can deadlock.

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
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "ConcurrencyStats",
    "DEFAULT_MAX_CONCURRENCY",
    "LimiterStats",
    "acquire_request_slot",
    "get_concurrency_stats",
    "get_max_concurrency",
    "in_runtime_thread",
    "node_slot",
    "request_slot",
    "reset_concurrency_stats",
    "run_async",
    "run_sync",
    "set_max_concurrency",
]

T = TypeVar("T")

DEFAULT_MAX_CONCURRENCY = 16
"""The default bound on concurrent backward nodes and on LM requests in flight."""

STALL_WARNING_S = 10.0
"""The stall threshold, in seconds. An afnio call made from another thread
(``run_sync``, or ``run_async`` from another event loop) that has waited this long
for afnio's loop, while one plain ``backward`` running inline on that loop has held
it this long, is stopped with a ``RuntimeError`` naming the Function and
``blocking = True``: that backward may be waiting for the calling thread (a thread
pool running ``model.chat``), and neither could ever go on. The error frees such a
backward, and the engine re-runs it in a worker thread (see ``Function.blocking``).
Read at every check, so ``afnio._runtime.STALL_WARNING_S = 2.0`` applies at once."""


@dataclass(frozen=True)
class LimiterStats:
    """One limiter's counters: units running now, the most at once since the last
    reset, and how many started since then."""

    in_flight: int
    peak: int
    total: int


@dataclass(frozen=True)
class ConcurrencyStats:
    """Counters of the concurrency bound, for backward nodes and for LM requests."""

    nodes: LimiterStats
    requests: LimiterStats


class _Limiter:
    """A FIFO counting limiter whose limit can change while work waits. Used only on
    afnio's loop, so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.peak = 0
        self.total = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _start(self) -> None:
        self.total += 1
        self.peak = max(self.peak, self.active)

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            self._start()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the releaser hands its slot over: `active` already counts us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        self._start()

    def release(self) -> None:
        if self.active <= self.limit:
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(None)  # hand the slot over
                    return
        self.active -= 1

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        while self.active < self.limit and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)

    def stats(self) -> LimiterStats:
        return LimiterStats(self.active, self.peak, self.total)

    def reset_stats(self) -> None:
        self.peak = self.active
        self.total = 0


class _SyncCalls:
    """Counts the synchronous afnio calls (:func:`run_sync`) made from threads other
    than the loop's. A thread that sets ``local.record`` (an object with a
    ``sync_calls`` int) has its calls counted there; the others' are ``unattributed``.
    The backward engine reads these to learn whether a plain ``backward`` waits on
    afnio (directly, or through threads it waits on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.unattributed = 0
        self.local = threading.local()

    def note(self) -> None:
        record = getattr(self.local, "record", None)
        if record is not None:
            record.sync_calls += 1  # only this thread writes its record
            return
        with self._lock:
            self.unattributed += 1


class _Runtime:
    """The background thread and loop; created lazily, recreated after ``fork``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.nodes = _Limiter(DEFAULT_MAX_CONCURRENCY)
        self.requests = _Limiter(DEFAULT_MAX_CONCURRENCY)
        # set by the backward engine while a plain backward runs inline on the loop
        # (an ``_InlineGuard``, see afnio.autodiff.engine): called (it raises) by a
        # synchronous afnio call made there, so the engine re-runs that backward in a
        # worker thread instead of deadlocking; and asked, through ``held()`` and
        # ``mark_stalled()``, by calls from other threads kept waiting by that backward
        self.inline_guard: Any = None
        self.sync_calls = _SyncCalls()

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
                    while True:
                        try:
                            loop.run_forever()
                            return
                        except BaseException:
                            # SystemExit/KeyboardInterrupt raised in a task escapes
                            # run_forever; the task holds it and its caller gets it.
                            continue

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
        self.nodes = _Limiter(self.nodes.limit)
        self.requests = _Limiter(self.requests.limit)
        self.inline_guard = None
        self.sync_calls = _SyncCalls()


_runtime = _Runtime()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_runtime._after_fork)


def in_runtime_thread() -> bool:
    """Return True when called from afnio's event-loop thread."""
    return _runtime.in_thread()


def _submit(coro: Coroutine[Any, Any, T]) -> ConcurrentFuture[T]:
    # The task is created from a handle made in the calling thread, so the caller's
    # context variables (grad mode) travel with it; the future stays pending until
    # the task ends, so cancelling either side cancels the other.
    return asyncio.run_coroutine_threadsafe(coro, _runtime.loop)


async def _start(coro: Coroutine[Any, Any, T], ticket: list[bool]) -> T:
    """Run ``coro`` unless its caller gave up before afnio's loop reached it.

    ``ticket`` holds one item; whoever pops it first (this task starting, or the
    caller giving up in :func:`_give_up`) wins, atomically, so a call the caller gave
    up on never starts and sends nothing."""
    try:
        ticket.pop()
    except IndexError:
        coro.close()
        raise asyncio.CancelledError from None
    return await coro


def _give_up(ticket: list[bool]) -> bool:
    """Stop a call from starting; True if it had not started (nothing was sent)."""
    try:
        ticket.pop()
    except IndexError:
        return False
    return True


def _stall_threshold() -> float:
    """:data:`STALL_WARNING_S`, read now (at least 10 ms, so no wait spins)."""
    return max(float(STALL_WARNING_S), 0.01)


_WAIT_FILES = (
    os.sep + "threading.py",  # Condition/Event/Thread.join waits
    os.path.join("concurrent", "futures", "_base.py"),  # Future.result, wait
    os.sep + "queue.py",  # Queue.get
)


def _loop_waits_on_a_thread() -> bool:
    """Whether afnio's loop thread is blocked waiting for another thread now (its
    innermost Python frames are in a lock, future or queue wait), as opposed to
    running code of its own (CPU work, a socket read of a non-afnio client)."""
    thread = _runtime._thread
    ident = thread.ident if thread is not None else None
    frame = sys._current_frames().get(ident) if ident is not None else None
    for _ in range(3):  # the wait itself, and the helper that called it
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(_WAIT_FILES):
            return True
        frame = frame.f_back
    return False


def _stall_verdict(ticket: list[bool], submitted: float) -> float | RuntimeError:
    """Called by a caller in another thread whose call has waited ``STALL_WARNING_S``
    or more since ``submitted``: the time to wait before asking again, or the error
    to raise now (the call was given up before it started).

    The error is due only when afnio's loop has not yet started the call and one
    plain backward running inline on that loop has held it for the whole threshold:
    such a backward may be waiting for this very thread, and neither could go on.
    The error frees it; the engine (told by ``guard.mark_stalled``) re-runs that
    backward in a worker thread. A call that has started is never stopped: it may be
    the very work that runs that backward (``x.backward()`` itself); past twice the
    threshold the engine logs a warning naming the Function instead."""
    threshold = _stall_threshold()
    guard = _runtime.inline_guard
    held = guard.held() if guard is not None else None
    if held is None:
        return threshold  # not held by an inline backward: the call is just slow
    token, since = held
    now = time.monotonic()
    if not ticket:  # started: keep waiting; name the backward if it never ends
        left = 2 * threshold - (now - since)
        if left > 0:
            return max(left, 0.001)
        guard.warn_held(token, now - since)
        return threshold
    left = threshold - min(now - since, now - submitted)
    if left > 0:
        return max(left, 0.001)
    if threading.current_thread().name.startswith("afnio-bw") or not (
        _loop_waits_on_a_thread()
    ):
        # the backward is busy (CPU work, a non-afnio call), not waiting for a
        # thread, or this is one of afnio's own backward workers: only slow
        return threshold
    names = guard.mark_stalled(token)
    if names is None or not _give_up(ticket):
        # that backward ended, or the loop started the call, meanwhile: the loop
        # is turning again
        return threshold
    function, node = names
    return RuntimeError(
        f"An afnio call from thread {threading.current_thread().name!r} waited "
        f"{now - submitted:.1f} s for afnio's event loop, held for "
        f"{now - since:.1f} s by {function}.backward (node {node}), a plain "
        "backward running on the loop. If that backward waits for this thread (a "
        "thread pool running model.chat, say), neither could ever go on, so afnio "
        "stopped this call before anything was sent. Set `blocking = True` on "
        f"{function} so that its backward runs in a worker thread; afnio re-runs "
        f"this one in a worker thread and treats {function} as blocking from now "
        f"on. (The wait is afnio._runtime.STALL_WARNING_S = {threshold:g} s.)"
    )


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on afnio's loop and block the calling thread until it is done.

    The caller's context variables (grad mode) travel with the coroutine. Works from
    any thread, including one whose own event loop is running (a notebook cell).
    ``KeyboardInterrupt`` in the caller cancels the work (before it starts, if the
    loop has not reached it yet).

    Raises:
        RuntimeError: if called from afnio's own loop thread, where blocking would
            deadlock; there, ``await`` the coroutine instead. Also when the call has
            waited :data:`STALL_WARNING_S` for a loop held all that time by one plain
            ``backward`` running inline (a Function that should set
            ``blocking = True``; the message names it): that backward may be
            waiting for this thread, so the call gives up, and the engine re-runs
            the backward in a worker thread.
    """
    if _runtime.in_thread():
        coro.close()
        guard = _runtime.inline_guard
        if guard is not None:
            guard("run_sync")  # raises: the engine re-runs that backward in a thread
        raise RuntimeError(
            "A synchronous afnio call was made from afnio's own event loop (for "
            "example inside an `async def backward`). Blocking there would deadlock: "
            "await the async form of the call instead."
        )
    _runtime.sync_calls.note()
    ticket = [True]
    submitted = time.monotonic()
    fut = _submit(_start(coro, ticket))
    try:
        return _wait(fut, ticket, submitted)
    except BaseException:
        _give_up(ticket)
        fut.cancel()
        raise


def _wait(fut: ConcurrentFuture[T], ticket: list[bool], submitted: float) -> T:
    """``fut.result()``, giving up (see :func:`_stall_verdict`) when an inline
    backward holding afnio's loop keeps the call waiting past the stall threshold."""
    timeout = _stall_threshold()
    while True:
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            if fut.done():  # it ended meanwhile, or itself raised a TimeoutError
                return fut.result()
            verdict = _stall_verdict(ticket, submitted)
            if isinstance(verdict, RuntimeError):
                raise verdict from None
            timeout = verdict


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on afnio's loop from any event loop, without blocking it.
    Cancelling the caller cancels the work.

    Raises:
        RuntimeError: as :func:`run_sync` does, when the call has waited the stall
            threshold for a loop held by one plain ``backward`` running inline.
    """
    if _runtime.in_thread():
        return await coro
    ticket = [True]
    submitted = time.monotonic()
    waiter = asyncio.wrap_future(_submit(_start(coro, ticket)))
    timeout = _stall_threshold()
    try:
        while True:
            done, _ = await asyncio.wait((waiter,), timeout=timeout)
            if done:
                return waiter.result()
            verdict = _stall_verdict(ticket, submitted)
            if isinstance(verdict, RuntimeError):
                raise verdict
            timeout = verdict
    except BaseException:
        _give_up(ticket)
        waiter.cancel()  # cancels the work on afnio's loop
        raise


class _Slot:
    __slots__ = ("_limiter",)

    def __init__(self, limiter: _Limiter) -> None:
        self._limiter = limiter

    async def __aenter__(self) -> None:
        if not _runtime.in_thread():
            raise RuntimeError(
                "afnio concurrency slots are taken on afnio's event loop: run the "
                "work through afnio._runtime.run_sync / run_async."
            )
        await self._limiter.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._limiter.release()


def node_slot() -> _Slot:
    """``async with node_slot():`` holds one of the ``n`` backward-node slots."""
    return _Slot(_runtime.nodes)


def request_slot() -> _Slot:
    """``async with request_slot():`` holds one of the ``n`` LM-request slots.

    Example::

        >>> async def call_lm():
        ...     async with request_slot():
        ...         ...  # one request in flight
    """
    return _Slot(_runtime.requests)


def acquire_request_slot() -> Callable[[], None]:
    """Take one of the ``n`` LM-request slots from a thread other than afnio's loop,
    blocking until one is free; returns the function that gives it back (calling it
    again does nothing).

    For libraries that make their own blocking LM calls in worker threads (a traced
    DSPy program): their requests then count against, and wait for, the same bound
    as afnio's own.

    Example::

        >>> release = acquire_request_slot()
        >>> get_concurrency_stats().requests.in_flight >= 1
        True
        >>> release()

    Raises:
        RuntimeError: on afnio's loop thread (use ``async with request_slot()``).
    """
    if _runtime.in_thread():
        guard = _runtime.inline_guard
        if guard is not None:
            guard("acquire_request_slot")  # raises, as in run_sync
        raise RuntimeError(
            "acquire_request_slot() blocks: on afnio's loop use `async with "
            "request_slot()` instead."
        )
    run_sync(_runtime.requests.acquire())
    loop, limiter = _runtime.loop, _runtime.requests
    lock = threading.Lock()
    released = False

    def release() -> None:
        nonlocal released
        with lock:
            if released:
                return
            released = True
        loop.call_soon_threadsafe(limiter.release)

    return release


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be a positive int, got {type(value).__name__}: {value!r}."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return value


def set_max_concurrency(n: int) -> None:
    """Set how many backward nodes may run at once, and how many LM requests may be
    in flight at once (default 16 each).

    The bound is process-wide and applies immediately, also to work already waiting
    (lowering it lets running work finish, then admits only ``n``).

    Args:
        n: a positive int.

    Example::

        >>> import afnio
        >>> afnio.set_max_concurrency(1)   # strictly one LM call at a time
        >>> afnio.set_max_concurrency(16)
    """
    n = _check_positive_int("n", n)

    def apply() -> None:
        _runtime.nodes.set_limit(n)
        _runtime.requests.set_limit(n)

    if _runtime._loop is None or _runtime.in_thread():
        apply()
    else:
        _runtime._loop.call_soon_threadsafe(apply)
        # make the change visible before returning
        run_sync(asyncio.sleep(0))


def get_max_concurrency() -> int:
    """Return the current process-wide concurrency bound."""
    return _runtime.requests.limit


def get_concurrency_stats() -> ConcurrencyStats:
    """Counters for backward nodes and LM requests: running now, peak since the last
    :func:`reset_concurrency_stats`, and total started since then."""
    return ConcurrencyStats(_runtime.nodes.stats(), _runtime.requests.stats())


def reset_concurrency_stats() -> None:
    """Reset the peak and total counters of both limiters."""
    _runtime.nodes.reset_stats()
    _runtime.requests.reset_stats()
