"""Paid answers of one unit of work, replayed when that unit is retried.

When a training step fails because one LM request exhausted its retries (a 429 storm,
a timeout), the Trainer runs the step again. Without a memo every request of the step
would be sent and billed again, although all but one were answered. Inside
:func:`step_memo`, each answer an afnio model client receives is kept; when the unit
of work is attempted again (:meth:`StepMemo.begin_attempt`), the *n*-th identical
request of the new attempt gets the *n*-th answer paid for that request, without a
call, and only requests that were never answered are sent. So a retry costs exactly
the requests that failed.

Rules:

* A request is identified by the client object, the kind of call (chat, complete,
  embed) and every parameter, as canonical JSON. The memo lives for one unit of work
  (a training step with its retries) and only in the context that opened it (a
  ``ContextVar``: other threads and tasks are unaffected).
* Within one attempt nothing is replayed: identical requests made on purpose (sampling
  twice) are all sent, as without a memo.
* An answer that its consumer rejected (unparsable JSON, a wrong gradient count) is
  dropped with :func:`reject_answer`, so the retry asks again instead of replaying it.
* Failed requests store nothing; a cancelled request stores nothing.

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

import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from afnio.models.cache import cache_key

__all__ = [
    "StepMemo",
    "active_memo",
    "memoized",
    "reject_answer",
    "step_memo",
]

T = TypeVar("T")

_ACTIVE: ContextVar[StepMemo | None] = ContextVar("afnio_step_memo", default=None)


class StepMemo:
    """The answers paid during a unit of work, by request key, in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, list[Any]] = {}
        self._used: dict[str, int] = {}
        self.replayed = 0
        self.attempts = 1

    def begin_attempt(self) -> None:
        """Start a new attempt: every stored answer may be replayed once more."""
        with self._lock:
            self._used.clear()
            self.attempts += 1

    def take(self, key: str) -> tuple[bool, Any]:
        """``(True, answer)`` for the next unused stored answer of ``key``."""
        with self._lock:
            answers = self._answers.get(key, [])
            used = self._used.get(key, 0)
            if used < len(answers):
                self._used[key] = used + 1
                self.replayed += 1
                return True, answers[used]
        return False, None

    def store(self, key: str, answer: Any) -> None:
        """Keep a freshly paid ``answer`` of ``key`` (it counts as used in this
        attempt)."""
        with self._lock:
            self._answers.setdefault(key, []).append(answer)
            self._used[key] = self._used.get(key, 0) + 1

    def reject(self, answer: Any) -> None:
        """Forget every stored copy of ``answer`` (its consumer could not use it)."""
        with self._lock:
            for key, answers in self._answers.items():
                kept = [a for a in answers if a != answer]
                if len(kept) != len(answers):
                    dropped = len(answers) - len(kept)
                    self._answers[key] = kept
                    self._used[key] = max(0, self._used.get(key, 0) - dropped)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(a) for a in self._answers.values())


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
    """``await call()``, unless the active memo holds an unused answer to this very
    request from an earlier attempt. Without an active memo, just ``await call()``."""
    memo = _ACTIVE.get()
    if memo is None:
        return await call()
    key = cache_key({"client": id(client), "kind": kind, "request": dict(request)})
    found, answer = memo.take(key)
    if found:
        return answer  # type: ignore[no-any-return]
    answer = await call()
    memo.store(key, answer)
    return answer


def reject_answer(answer: Any) -> None:
    """Tell the active memo (if any) that ``answer`` was unusable, so that a retry of
    the unit of work asks the model again instead of replaying it."""
    memo = _ACTIVE.get()
    if memo is not None:
        memo.reject(answer)
