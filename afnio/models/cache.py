"""An optional response cache for LM calls: in memory, or on disk in SQLite.

Off by default; :func:`enable_cache` turns it on for every afnio model client. A hit
makes no request and costs nothing; hits and misses are counted.

**The key** is a SHA-256 of the full request as canonical JSON: the client kind
(``chat``, ``complete``, ``embed``), the base URL, the model, the messages and every
parameter, and the **account** that pays for it. Two requests share an answer only if
all of these are identical. The account is itself a SHA-256
(:func:`account_fingerprint`) of the API key, the organization, the project and the
client's default headers and query parameters that carry a credential (by name:
``Authorization``, ``api-key``, ``x-api-key``, ``Cookie``, ``X-Auth-Token``, ``?key=``
...; or by value: ``sk-...``, ``Bearer ...``; see :func:`account_fingerprint`); other
headers such as ``Accept-Encoding`` do not fork the cache. So two clients with
different keys at one base URL never share answers, and **rotating a key starts a
fresh cache** (the old entries stay in the file, unreachable). Nothing secret is
stored: the file holds only the hashed key and the answer.

**Concurrency.** Identical requests made while the first is still in flight share it
instead of calling twice. The request runs as its own task on afnio's loop; each caller
waits for it through :func:`asyncio.shield`, so one waiter's cancellation (an
``asyncio.wait_for`` timeout) never reaches the others: they get the answer, and it is
stored. When *every* waiter has gone before the answer arrived (a sole caller cancelled,
say), the request is cancelled, as the OpenAI SDK does when its caller is cancelled;
once the answer has arrived it is always stored.

**Storage.** Answers are kept in memory and, with a path, in an SQLite file, in WAL
mode (readers never wait for a writer) with a busy timeout (default 5 s, Python's and
most tools' default) for locks held by other processes. The file is read and written
in the cache's own two threads (a reader and a writer, one connection each), never on
afnio's event loop. An answer is returned as soon as it arrives, and written right
after, in the background: queued answers are written in batches, one transaction each
(so a locked file costs one busy timeout per batch, not one per answer);
:meth:`ResponseCache.flush`, :meth:`~ResponseCache.close`, :func:`disable_cache` and a
normal interpreter exit wait for the writes. Every row is an envelope
``{"v": 1, "kind": ..., "value": ...}`` and the value is checked against its kind
(``chat``/``complete``: a string; ``embed``: a list of lists of numbers): a row that
is not valid JSON, not an envelope (rows of older afnio versions included) or of the
wrong shape is a miss, and the fresh answer overwrites it.

**Failures never lose a paid answer.** A file that cannot be read (locked by another
process beyond the busy timeout, corrupt) is a miss, and reads skip the file for the
next busy timeout; a file that cannot be written (locked, read-only, disk full) keeps
the answer in memory, and the answer is returned either way. Failures log one warning
on the ``afnio.models.cache`` logger per run of failures, and are counted
(:class:`CacheStats`). Opening a locked file waits up to the busy timeout, in the
calling thread, and sets it up later.

Example::

    >>> from afnio.models import cache
    >>> c = cache.enable_cache()  # in memory; enable_cache("lm.sqlite") persists
    >>> cache.get_cache() is c
    True
    >>> cache.disable_cache()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from afnio._secrets import is_credential_name, looks_like_credential

__all__ = [
    "CacheStats",
    "DEFAULT_TIMEOUT",
    "ResponseCache",
    "account_fingerprint",
    "cache_key",
    "disable_cache",
    "enable_cache",
    "get_cache",
]

T = TypeVar("T")

logger = logging.getLogger("afnio.models.cache")

DEFAULT_TIMEOUT = 5.0
"""Seconds an SQLite operation waits for another connection's lock (SQLite's busy
timeout; Python's ``sqlite3`` default too)."""

_ENVELOPE_VERSION = 1


def cache_key(request: Mapping[str, Any]) -> str:
    """A stable hash of a request: canonical JSON (sorted keys), SHA-256."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _is_account_entry(name: object, value: object) -> bool:
    """Whether a default header or query parameter carries a credential, by the
    rules that mask credentials (:mod:`afnio._secrets`): by its name (as a header
    or a query parameter) or by its value (a provider key, ``Bearer ...``)."""
    if not isinstance(name, str) or not isinstance(value, (str, int, float)):
        return False  # unset (None, the SDK's Omit)
    return (
        is_credential_name(name, header=True)
        or is_credential_name(name, query=True)
        or looks_like_credential(value)
    )


def account_fingerprint(
    api_key: str | None = None,
    organization: str | None = None,
    project: str | None = None,
    headers: Mapping[str, object] | None = None,
    query: Mapping[str, object] | None = None,
) -> str:
    """A SHA-256 of the account a request is made (and paid) with.

    It covers the API key, the organization, the project, and the default headers
    and query parameters that carry a credential: a name that contains ``auth``,
    ``key``, ``token``, ``secret``, ``passw``, ``cookie``, ``session``,
    ``credential`` or ``signature`` (``Authorization``, ``api-key``, ``x-api-key``,
    ``Cookie``, ``X-Auth-Token``, ``?key=``), any other name :mod:`afnio._secrets`
    counts as a credential (``?sig=``), or a value that looks like one (``sk-...``,
    ``Bearer ...``). Other entries (``Accept-Encoding``, ``User-Agent``, the SDK's
    ``X-Stainless-*``) are ignored, so they do not fork the cache; so are unset
    values (``None``, the SDK's ``Omit``). Folded into the cache key, so only a hash
    of a hash is ever stored.

    Example::

        >>> a = account_fingerprint("sk-a", headers={"Accept-Encoding": "gzip"})
        >>> a == account_fingerprint("sk-a") != account_fingerprint("sk-b")
        True
        >>> a != account_fingerprint("sk-a", headers={"X-Api-Key": "k2"})
        True
    """

    def credentials(entries: Mapping[str, object] | None) -> dict[str, str]:
        return {
            name.lower(): str(value)
            for name, value in (entries or {}).items()
            if _is_account_entry(name, value)
        }

    return cache_key(
        {
            "afnio-account": 1,
            "api_key": api_key or "",
            "organization": organization or "",
            "project": project or "",
            "headers": credentials(headers),
            "query": credentials(query),
        }
    )


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_vectors(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        for row in value
    )


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "chat": _is_text,
    "complete": _is_text,
    "embed": _is_vectors,
}


def _encode(kind: str | None, value: Any) -> str:
    return json.dumps({"v": _ENVELOPE_VERSION, "kind": kind, "value": value})


def _decode(text: Any, kind: str | None) -> tuple[bool, Any]:
    """``(True, value)`` for a valid row of ``kind`` (any kind when ``None``)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return False, None
    if (
        not isinstance(data, dict)
        or data.get("v") != _ENVELOPE_VERSION
        or "value" not in data
        or (kind is not None and data.get("kind") != kind)
    ):
        return False, None
    value, stored_kind = data["value"], data.get("kind")
    check = _CHECKS.get(stored_kind) if isinstance(stored_kind, str) else None
    if check is not None and not check(value):
        return False, None
    return True, value


@dataclass(frozen=True)
class CacheStats:
    """Hits (answered from the cache), misses (real calls) and stored entries; and
    how many reads and writes of the SQLite file failed (each a miss, or an answer
    kept in memory only)."""

    hits: int
    misses: int
    entries: int
    read_errors: int = 0
    write_errors: int = 0


class _Closed(Exception):
    """The cache was closed: its file is no longer read or written."""


class _Flight:
    """One request in flight: its task, and how many callers wait for it."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None
        self.waiters = 0


_Report = Callable[[str, "BaseException | None", int], None]


class _Store:
    """The SQLite file, off the event loop: a reader and a writer thread, each with
    its own connection (in WAL mode a reader never waits for a writer).

    Writes are queued and written in batches, one transaction each, so a locked file
    costs one busy timeout per batch, not one per answer. After a read fails on a
    lock, reads are misses without waiting for ``timeout`` seconds. Failures go to
    ``report(operation, error, count)`` (``error`` is ``None`` for a read skipped
    during that back-off); successes to ``report(operation, None, 0)``.
    """

    def __init__(self, path: Path, timeout: float, report: _Report) -> None:
        self.path = path
        self.timeout = timeout
        self._report = report
        self._lock = threading.Lock()
        self._threads = {
            role: concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"afnio-cache-{role}"
            )
            for role in ("read", "write")
        }
        self._conns: dict[str, sqlite3.Connection] = {}  # each used by its thread only
        self._journal_set = False
        self._tuned: set[str] = set()  # connections set to synchronous=NORMAL
        self._table = False
        self._pending: dict[str, tuple[str | None, Any]] = {}
        self._flush: concurrent.futures.Future[None] | None = None  # queued, unstarted
        self._reads_blocked_until = 0.0
        self._closed = False

    def submit(self, role: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._closed:
                raise _Closed
            return self._threads[role].submit(fn, *args)

    # -- in the threads ---------------------------------------------------------------

    def open(self) -> None:
        """Connect (errors raise) and set the file up; a locked or read-only file is
        set up later, by the first operation that gets through."""
        self._connection("write")
        with contextlib.suppress(sqlite3.OperationalError):
            self._setup("write")

    def _connection(self, role: str) -> sqlite3.Connection:
        conn = self._conns.get(role)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None
            )
            self._conns[role] = conn
        return conn

    def _setup(self, role: str) -> sqlite3.Connection:
        conn = self._connection(role)
        if not self._journal_set:
            try:
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    raise  # retried by the next operation
                # read-only, or a file system without WAL: keep the file's journal
            self._journal_set = True
        if role not in self._tuned:
            # WAL's recommended setting: durable across an application crash
            conn.execute("PRAGMA synchronous=NORMAL")
            self._tuned.add(role)
        if not self._table:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(key TEXT PRIMARY KEY, value TEXT)"
            )
            self._table = True
        return conn

    def read(self, key: str, kind: str | None) -> tuple[bool, Any]:
        """The stored answer, or a miss; never raises."""
        if time.monotonic() < self._reads_blocked_until:
            self._report("read", None, 1)
            return False, None
        try:
            # fetchall: no statement left open, so no read transaction lingers
            rows = (
                self._setup("read")
                .execute("SELECT value FROM responses WHERE key = ?", (key,))
                .fetchall()
            )
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                self._reads_blocked_until = time.monotonic() + self.timeout
            self._report("read", e, 1)
            return False, None
        self._report("read", None, 0)
        return _decode(rows[0][0], kind) if rows else (False, None)

    def _write_batch(self) -> None:
        """Write every queued answer in one transaction; never raises."""
        with self._lock:
            batch, self._pending, self._flush = self._pending, {}, None
        rows = []
        for key, (kind, value) in batch.items():
            try:
                rows.append((key, _encode(kind, value)))
            except (TypeError, ValueError) as e:  # not JSON-serialisable
                self._report("write", e, 1)
        if not rows:
            return
        try:
            conn = self._setup("write")
            conn.execute("BEGIN IMMEDIATE")  # waits up to `timeout` for the lock
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", rows
                )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self._report("write", e, len(rows))
            return
        self._report("write", None, 0)

    def count(self) -> int | None:
        try:
            rows = self._setup("read").execute("SELECT COUNT(*) FROM responses")
            return int(rows.fetchall()[0][0])
        except sqlite3.Error:
            return None

    def delete(self, keys: list[str]) -> None:
        try:
            self._setup("write").executemany(
                "DELETE FROM responses WHERE key = ?", [(k,) for k in keys]
            )
        except sqlite3.Error as e:
            self._report("write", e, 0)

    def delete_all(self) -> None:
        try:
            self._setup("write").execute("DELETE FROM responses")
        except sqlite3.Error as e:
            self._report("write", e, 0)

    def _close_connection(self, role: str) -> None:
        conn = self._conns.pop(role, None)
        if conn is not None:
            conn.close()

    # -- from any thread ----------------------------------------------------------

    def write(self, key: str, kind: str | None, value: Any) -> Future[None]:
        """Queue an answer; the future is done once the batch holding it is written
        (or failed)."""
        with self._lock:
            if self._closed:
                raise _Closed
            self._pending[key] = (kind, value)
            if self._flush is None:
                self._flush = self._threads["write"].submit(self._write_batch)
            return self._flush

    def forget_pending(self, keys: list[str] | None = None) -> None:
        """Drop queued writes (of ``keys``, or all)."""
        with self._lock:
            if keys is None:
                self._pending.clear()
            for key in keys or ():
                self._pending.pop(key, None)

    def close(self) -> None:
        """Write what is queued, then close both connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for role, thread in self._threads.items():
            thread.submit(self._close_connection, role)
            thread.shutdown(wait=True)


class ResponseCache:
    """A response cache; ``path=None`` keeps it in memory only.

    Values are JSON-serialisable answers (texts, vectors). With a path, answers are
    also written to the SQLite file: in the background, in batches, right after each
    miss (:meth:`flush` and :meth:`close` wait for the writes; so does a normal
    interpreter exit); the file is read and written in the cache's own threads (see
    the module docstring for the failure behaviour). The synchronous methods
    (:meth:`get`, :meth:`put`, :meth:`stats`, :meth:`clear`, :meth:`flush`) block
    the calling thread for the file I/O; :meth:`get_or_call` never blocks the event
    loop.

    Args:
        path: the SQLite file (created, with its folder, if missing).
        timeout: seconds an SQLite operation waits for another process's lock before
            it counts as failed (SQLite's busy timeout).

    Raises:
        sqlite3.Error: if ``path`` cannot be opened, or is not an SQLite file. A
            file that is merely locked is not an error (opening waits up to
            ``timeout`` for it, in the calling thread, then proceeds).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.timeout = float(timeout)
        self._lock = threading.Lock()  # the memory layer and the error counters
        self._memory: dict[str, tuple[str | None, Any]] = {}  # key: (kind, value)
        self._flights: dict[str, _Flight] = {}
        self.hits = 0
        self.misses = 0
        self._read_errors = 0
        self._write_errors = 0
        self._failing: set[str] = set()  # operations in a run of failures (warned)
        self._pid = os.getpid()
        _CACHES.add(self)
        self._stale: list[_Store] = []  # inherited through fork: never used or closed
        self._store: _Store | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._store = _Store(self.path, self.timeout, self._report)
            try:
                self._store.submit("write", self._store.open).result()
            except BaseException:
                self._store.close()
                raise

    # -- the file -------------------------------------------------------------------

    def _file(self) -> _Store | None:
        if self._pid != os.getpid():  # a forked child: none of the parent's I/O
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._flights = {}
            if self._store is not None:
                self._stale.append(self._store)
                self._store = _Store(self._store.path, self.timeout, self._report)
        return self._store

    def _report(self, operation: str, error: BaseException | None, count: int) -> None:
        """Count a failed read or write (``count`` answers) and warn at the first of
        a run of failures; ``count == 0`` ends the run."""
        with self._lock:
            if operation == "read":
                self._read_errors += count
            else:
                self._write_errors += count
            if count == 0 and error is None:
                self._failing.discard(operation)
                return
            first = operation not in self._failing
            self._failing.add(operation)
        if first:
            what = (
                "treating it as a miss"
                if operation == "read"
                else "the answer is kept in memory only"
            )
            logger.warning(
                "afnio response cache: could not %s %s (%s); %s. Further failures "
                "are counted in get_cache().stats() until one succeeds.",
                operation,
                self.path,
                f"{type(error).__name__}: {error}" if error else "locked",
                what,
            )

    def _sync(self, role: str, fn: Callable[..., T], *args: Any, default: T) -> T:
        """Run ``fn`` in the file's ``role`` thread and wait for it."""
        store = self._file()
        if store is None:
            return default
        try:
            return store.submit(role, fn, *args).result()
        except _Closed:
            return default

    async def _read_async(self, key: str, kind: str | None) -> tuple[bool, Any]:
        store = self._file()
        if store is None:
            return False, None
        try:
            future = store.submit("read", store.read, key, kind)
        except _Closed:
            return False, None
        return await asyncio.wrap_future(future)

    def _write(self, key: str, kind: str | None, value: Any) -> Future[None] | None:
        store = self._file()
        if store is None:
            return None
        try:
            return store.write(key, kind, value)
        except _Closed:
            return None

    # -- the memory layer -----------------------------------------------------------

    def _recall(self, key: str, kind: str | None) -> tuple[bool, Any]:
        with self._lock:
            entry = self._memory.get(key)
        if entry is None or (kind is not None and entry[0] != kind):
            return False, None
        return True, entry[1]

    def _remember(self, key: str, kind: str | None, value: Any) -> None:
        with self._lock:
            self._memory[key] = (kind, value)

    # -- the API --------------------------------------------------------------------

    def get(self, key: str, kind: str | None = None) -> tuple[bool, Any]:
        """``(True, value)`` if cached, else ``(False, None)``; does not count.

        Args:
            key: the cache key.
            kind: the kind of answer expected (``"chat"``, ``"embed"``, ...); a
                stored answer of another kind, or of the wrong shape, is a miss.
        """
        found, value = self._recall(key, kind)
        if found:
            return True, value
        store = self._file()
        if store is None:
            return False, None
        found, value = self._sync("read", store.read, key, kind, default=(False, None))
        if found:
            self._remember(key, kind, value)
        return found, value

    def put(self, key: str, value: Any, kind: str | None = None) -> None:
        """Store ``value`` (JSON-serialisable) under ``key`` and wait for the file;
        a write that fails keeps it in memory, with a warning."""
        self._remember(key, kind, value)
        written = self._write(key, kind, value)
        if written is not None:
            written.result()

    def flush(self) -> None:
        """Wait until every answer stored so far is written to the file (or its
        write has failed, with a warning)."""
        self._sync("write", lambda: None, default=None)

    async def get_or_call(
        self,
        key: str,
        call: Callable[[], Awaitable[T]],
        *,
        kind: str | None = None,
    ) -> T:
        """The cached answer for ``key``, or ``await call()`` once and store it.

        Concurrent identical requests share the one call; a waiter's cancellation
        leaves the others waiting (the call is cancelled only when no waiter is left
        before it answers). Runs on afnio's loop; the file is read in the cache's
        reader thread, and the answer returned without waiting for its write.

        Args:
            key: the cache key.
            call: makes the request (a miss).
            kind: the kind of answer (``"chat"``, ``"complete"``, ``"embed"``): a
                stored answer of another kind or of the wrong shape is a miss.
        """
        self._file()  # after a fork, forget the parent's requests in flight
        found, value = self._recall(key, kind)
        if found:
            self.hits += 1
            return value
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            self._flights[key] = flight
            task = asyncio.ensure_future(self._fly(key, call, kind))
            task.add_done_callback(functools.partial(self._landed, key, flight))
            flight.task = task
        else:
            self.hits += 1
        task = flight.task
        assert task is not None
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not task.done():
                self._landed(key, flight)  # a new caller starts a new request
                task.cancel()

    async def _fly(
        self,
        key: str,
        call: Callable[[], Awaitable[Any]],
        kind: str | None,
    ) -> Any:
        """The shared request: the file, else the call; then store the answer."""
        found, value = await self._read_async(key, kind)
        if found:
            self.hits += 1
            self._remember(key, kind, value)
            return value
        self.misses += 1
        value = await call()
        # paid for: from here on nothing awaits, so it is kept whatever the waiters do
        self._remember(key, kind, value)
        self._write(key, kind, value)  # in the background
        return value

    def _landed(self, key: str, flight: _Flight, task: Any = None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if task is not None and not task.cancelled():
            task.exception()  # every waiter may have gone: mark it retrieved

    def forget_answer(self, answer: Any) -> int:
        """Forget every stored copy of ``answer``, an answer its consumer found
        unusable (afnio's parsers call this through
        :func:`afnio.models.step_memo.reject_answer`), so that the request is sent
        again instead of being answered with it. Answers that are the very object
        are dropped; failing that, equal ones. Returns how many were dropped."""
        with self._lock:
            keys = [k for k, (_, v) in self._memory.items() if v is answer]
            if not keys:
                keys = [
                    k
                    for k, (_, v) in self._memory.items()
                    if type(v) is type(answer) and v == answer
                ]
            for key in keys:
                del self._memory[key]
        store = self._file()
        if keys and store is not None:
            store.forget_pending(keys)
            with contextlib.suppress(_Closed):
                store.submit("write", store.delete, keys)
        return len(keys)

    def stats(self) -> CacheStats:
        """Counters since the cache was enabled (entries: the rows of the file, or
        the answers in memory when it has none or cannot be read)."""
        store = self._file()
        rows = None
        if store is not None:
            self.flush()
            rows = self._sync("read", store.count, default=None)
        with self._lock:
            entries = len(self._memory) if rows is None else rows
            read_errors, write_errors = self._read_errors, self._write_errors
        return CacheStats(self.hits, self.misses, entries, read_errors, write_errors)

    def clear(self) -> None:
        """Forget every stored answer (and reset the counters)."""
        with self._lock:
            self._memory.clear()
        store = self._file()
        if store is not None:
            store.forget_pending()
            self._sync("write", store.delete_all, default=None)
        with self._lock:
            self._read_errors = self._write_errors = 0
        self.hits = self.misses = 0

    def close(self) -> None:
        """Write the queued answers and close the SQLite file, if any. Requests still
        in flight keep their answers in memory."""
        store = self._file()
        if store is not None:
            store.close()


_CACHES: weakref.WeakSet[ResponseCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # a lock held by another thread at fork time would never be released in the
    # child: give every cache a fresh one (its file is reopened on first use)
    for cache in list(_CACHES):
        cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


_active: ResponseCache | None = None


def enable_cache(
    path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> ResponseCache:
    """Turn the response cache on for every afnio model client and return it.

    Args:
        path: an SQLite file to persist answers across runs; ``None`` keeps them in
            memory for this process.
        timeout: seconds an SQLite operation waits for another process's lock
            (default 5) before it fails: a failed read is a miss, a failed write
            keeps the answer in memory; either logs a warning.
    """
    global _active
    if _active is not None:
        _active.close()
    _active = ResponseCache(path, timeout=timeout)
    return _active


def disable_cache() -> None:
    """Turn the response cache off (a persisted file is kept)."""
    global _active
    if _active is not None:
        _active.close()
    _active = None


def get_cache() -> ResponseCache | None:
    """The active cache, or ``None`` when caching is off."""
    return _active
