"""The response cache: keys, storage, single-flight."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from afnio._runtime import run_sync
from afnio.models.cache import (
    ResponseCache,
    cache_key,
    disable_cache,
    enable_cache,
    get_cache,
)


def test_cache_key_is_stable_and_sensitive_to_every_parameter() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**a, "temperature": 1})
    assert cache_key(a) != cache_key({**a, "seed": 1})


def test_enable_and_disable() -> None:
    cache = enable_cache()
    assert get_cache() is cache and cache.path is None
    disable_cache()
    assert get_cache() is None


def test_sqlite_cache_persists(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.sqlite"
    first = ResponseCache(path)
    first.put("k", {"text": "hello", "vector": [0.5, 1.0]})
    first.close()
    second = ResponseCache(path)
    assert second.get("k") == (True, {"text": "hello", "vector": [0.5, 1.0]})
    assert second.get("missing") == (False, None)
    assert second.stats().entries == 1
    second.clear()
    assert second.stats().entries == 0
    second.close()


def test_concurrent_identical_calls_share_one_call() -> None:
    cache = ResponseCache()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "answer"

    async def main() -> list[str]:
        return await asyncio.gather(*(cache.get_or_call("k", slow) for _ in range(5)))

    assert run_sync(main()) == ["answer"] * 5
    assert calls == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (4, 1)


def test_a_failed_call_is_not_cached() -> None:
    cache = ResponseCache()

    async def boom() -> str:
        raise ConnectionError("down")

    async def ok() -> str:
        return "fine"

    with contextlib.suppress(ConnectionError):
        run_sync(cache.get_or_call("k", boom))
    assert cache.get("k") == (False, None)
    assert run_sync(cache.get_or_call("k", ok)) == "fine"
