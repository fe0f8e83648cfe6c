"""An optional response cache for LM calls: in memory, or on disk in SQLite.

Off by default; :func:`enable_cache` turns it on for every afnio model client. The key
is a SHA-256 of the full request (client kind, endpoint, base URL, model, messages and
every parameter, as canonical JSON), so two requests share an answer only if they are
identical. A hit makes no request and costs nothing; hits and misses are counted.
Identical requests made while the first is still in flight wait for it instead of
calling twice.

Example::

    >>> from afnio.models import cache
    >>> c = cache.enable_cache()  # in memory; enable_cache("lm.sqlite") persists
    >>> cache.get_cache() is c
    True
    >>> cache.disable_cache()
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CacheStats",
    "ResponseCache",
    "cache_key",
    "disable_cache",
    "enable_cache",
    "get_cache",
]

T = TypeVar("T")


def cache_key(request: Mapping[str, Any]) -> str:
    """A stable hash of a request: canonical JSON (sorted keys), SHA-256."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """Hits (answered from the cache), misses (real calls) and stored entries."""

    hits: int
    misses: int
    entries: int


class ResponseCache:
    """A response cache; ``path=None`` keeps it in memory only.

    Values are JSON-serialisable answers (texts, vectors). The SQLite file is written
    on every miss, so answers survive a crash.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._memory: dict[str, Any] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(key TEXT PRIMARY KEY, value TEXT)"
            )
            self._db.commit()

    def get(self, key: str) -> tuple[bool, Any]:
        """``(True, value)`` if cached, else ``(False, None)``; does not count."""
        with self._lock:
            if key in self._memory:
                return True, self._memory[key]
            if self._db is not None:
                row = self._db.execute(
                    "SELECT value FROM responses WHERE key = ?", (key,)
                ).fetchone()
                if row is not None:
                    value = json.loads(row[0])
                    self._memory[key] = value
                    return True, value
        return False, None

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``."""
        blob = json.dumps(value)
        with self._lock:
            self._memory[key] = value
            if self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)",
                    (key, blob),
                )
                self._db.commit()

    async def get_or_call(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """The cached answer for ``key``, or ``await call()`` once and store it.
        Concurrent identical requests share the one call. Runs on afnio's loop."""
        found, value = self.get(key)
        if found:
            self.hits += 1
            return value
        pending = self._pending.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            self.misses += 1
            value = await call()
            self.put(key, value)
            fut.set_result(value)
            return value
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._pending.pop(key, None)

    def stats(self) -> CacheStats:
        """Counters since the cache was enabled."""
        with self._lock:
            entries = len(self._memory)
            if self._db is not None:
                entries = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[
                    0
                ]
        return CacheStats(self.hits, self.misses, entries)

    def clear(self) -> None:
        """Forget every stored answer (and reset the counters)."""
        with self._lock:
            self._memory.clear()
            if self._db is not None:
                self._db.execute("DELETE FROM responses")
                self._db.commit()
            self.hits = self.misses = 0

    def close(self) -> None:
        """Close the SQLite file, if any."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


_active: ResponseCache | None = None


def enable_cache(path: str | os.PathLike[str] | None = None) -> ResponseCache:
    """Turn the response cache on for every afnio model client and return it.

    Args:
        path: an SQLite file to persist answers across runs; ``None`` keeps them in
            memory for this process.
    """
    global _active
    if _active is not None:
        _active.close()
    _active = ResponseCache(path)
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
