"""The response cache: keys, storage, single-flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from afnio._runtime import run_sync
from afnio.models.cache import (
    ResponseCache,
    cache_key,
    disable_cache,
    enable_cache,
    get_cache,
)
from afnio.models.openai import OpenAI


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


def test_a_stored_answer_counts_only_for_its_kind_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "lm.sqlite"
    first = ResponseCache(path)
    first.put("vectors", [[0.5, 1]], kind="embed")
    first.put("text", "hello", kind="chat")
    first.close()
    cache = ResponseCache(path)
    assert cache.get("vectors", kind="embed") == (True, [[0.5, 1]])
    assert cache.get("vectors", kind="chat") == (False, None)  # another kind
    assert cache.get("text", kind="chat") == (True, "hello")
    cache.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        bad = json.dumps({"v": 1, "kind": "embed", "value": [["not", "floats"]]})
        conn.execute("UPDATE responses SET value = ? WHERE key = 'vectors'", (bad,))
        conn.commit()
    again = ResponseCache(path)
    assert again.get("vectors", kind="embed") == (False, None)  # the wrong shape
    again.close()


# -- a shared request survives one waiter's cancellation -----------------------------


def test_a_shared_request_survives_one_waiters_cancellation() -> None:
    cache = ResponseCache()
    calls = 0

    async def main() -> str:
        started, release = asyncio.Event(), asyncio.Event()

        async def call() -> str:
            nonlocal calls
            calls += 1
            started.set()
            await release.wait()
            return "answer"

        a = asyncio.ensure_future(cache.get_or_call("k", call))  # makes the call
        await started.wait()
        b = asyncio.ensure_future(cache.get_or_call("k", call))  # shares it
        while cache.hits < 1:  # B has joined the request in flight
            await asyncio.sleep(0)
        a.cancel()  # e.g. A's asyncio.wait_for timed out
        with pytest.raises(asyncio.CancelledError):
            await a
        release.set()
        return await b

    assert run_sync(main()) == "answer"
    assert calls == 1
    assert cache.get("k") == (True, "answer")  # paid for once, and kept


def test_a_request_every_waiter_abandons_is_cancelled() -> None:
    """The documented choice: like the SDK, a request nobody waits for any more is
    cancelled (a sole caller's cancellation cancels the work)."""
    cache = ResponseCache()
    cancelled = threading.Event()

    async def call() -> str:
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "unreachable"

    async def main() -> None:
        a = asyncio.ensure_future(cache.get_or_call("k", call))
        b = asyncio.ensure_future(cache.get_or_call("k", call))
        while cache.hits + cache.misses < 2:  # both are waiting, the call started
            await asyncio.sleep(0)
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not cancelled.is_set()  # B still waits: the request goes on
        b.cancel()
        # a caller arriving while the abandoned request winds down starts afresh
        c = asyncio.ensure_future(cache.get_or_call("k", ok))
        await asyncio.gather(b, return_exceptions=True)
        assert await c == "fine"

    async def ok() -> str:
        return "fine"

    run_sync(main())
    assert cancelled.wait(5)
    assert cache.stats().misses == 2


def test_an_answer_that_arrived_is_stored_even_if_its_caller_leaves(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lm.sqlite"
    cache = ResponseCache(path)

    async def main() -> None:
        caller: asyncio.Future[str] | None = None

        async def call() -> str:
            assert caller is not None
            caller.cancel()  # the caller leaves just as the (paid) answer arrives
            return "paid answer"

        caller = asyncio.ensure_future(cache.get_or_call("k", call))
        with pytest.raises(asyncio.CancelledError):
            await caller

    with locked_by_another_process(path):
        run_sync(main())
        assert cache.get("k") == (True, "paid answer")  # kept in memory
        assert _stored(path, "k") is None  # its write waits for the lock
    cache.close()  # waits for the write, which got the lock once it was released
    assert _stored(path, "k") is not None


# -- a locked SQLite file ------------------------------------------------------------

_LOCKER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
"""


@contextlib.contextmanager
def locked_by_another_process(path: Path) -> Iterator[None]:
    """Hold a write transaction (``BEGIN EXCLUSIVE``) on ``path`` in another process
    until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.communicate("\n", timeout=30)  # commit, exit, close the pipes


def _noop_seconds() -> float:
    """How long a no-op task takes to run on afnio's loop."""
    start = time.perf_counter()
    run_sync(asyncio.sleep(0))
    return time.perf_counter() - start


def _stored(path: Path, key: str) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT value FROM responses WHERE key = ?", (key,))
        found = row.fetchone()
    return None if found is None else found[0]


def test_a_locked_cache_file_never_blocks_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "lm.sqlite"
    cache = enable_cache(path)  # the default busy timeout: 5 s
    answered = threading.Event()

    async def call() -> str:
        answered.set()
        return "answer"

    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(1) as pool:
        with locked_by_another_process(path):
            request = pool.submit(run_sync, cache.get_or_call("k", call))
            waits = [_noop_seconds()]  # while the cache reads
            assert answered.wait(10)
            assert request.result(10) == "answer"  # not held back by the write
            waits.append(_noop_seconds())  # while the write waits for the lock
            assert _stored(path, "k") is None  # yes: it is still waiting
            assert max(waits) < 1.0, waits
        # the lock is released before the busy timeout: the write goes through
        cache.flush()
    assert _stored(path, "k") is not None
    assert not caplog.records  # nothing failed, nothing to warn about


def test_a_cache_that_cannot_be_written_returns_the_answer_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "lm.sqlite"
    cache = ResponseCache(path, timeout=0.2)
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        return "paid answer"

    with caplog.at_level(logging.WARNING), locked_by_another_process(path):
        assert run_sync(cache.get_or_call("k", call)) == "paid answer"
        assert run_sync(cache.get_or_call("k", call)) == "paid answer"  # from memory
        assert run_sync(cache.get_or_call("other", call)) == "paid answer"
        cache.flush()  # the writes fail after the busy timeout
    assert calls == 2
    assert cache.stats().write_errors == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # warned once
    assert "could not write" in caplog.text and "locked" in caplog.text
    assert _stored(path, "k") is None  # not on disk, but not lost either
    cache.put("k2", "later")  # the lock is gone: writing works again
    assert _stored(path, "k2") is not None
    cache.close()


def test_a_locked_read_is_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "lm.sqlite"
    with caplog.at_level(logging.WARNING), locked_by_another_process(path):
        # the other process holds the file in rollback mode: even reads are locked
        cache = ResponseCache(path, timeout=0.2)

        async def call() -> str:
            return "answer"

        assert run_sync(cache.get_or_call("k", call)) == "answer"
        assert cache.stats().misses == 1
    assert "could not read" in caplog.text and "could not write" in caplog.text
    caplog.clear()
    cache.put("k2", "later")  # the lock is gone: the file is set up and written
    assert _stored(path, "k2") is not None
    assert not caplog.records
    cache.close()


# -- invalid rows are misses, and get overwritten ------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        "not json {",  # invalid JSON
        '{"role": "assistant", "content": "hi"}',  # JSON, not a response
        "null",
        '"an answer stored without the envelope"',  # an old row
    ],
)
def test_an_invalid_row_is_a_miss_and_gets_overwritten(
    tmp_path: Path, row: str
) -> None:
    path = tmp_path / "lm.sqlite"
    ResponseCache(path).close()  # creates the table
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO responses (key, value) VALUES ('k', ?)", (row,))
        conn.commit()
    cache = ResponseCache(path)
    assert cache.get("k") == (False, None)

    async def call() -> str:
        return "fresh"

    assert run_sync(cache.get_or_call("k", call)) == "fresh"
    assert (cache.stats().hits, cache.stats().misses) == (0, 1)
    cache.close()
    again = ResponseCache(path)
    assert again.get("k") == (True, "fresh")
    again.close()


# -- through a client: the key carries the account, rows are checked per endpoint -----


class _Server:
    """An OpenAI-compatible endpoint in memory: counts requests and the API keys."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("authorization", ""))
        reply = f"answer {len(self.keys)}"
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
            },
        )

    def client(self, **kwargs: Any) -> OpenAI:
        kwargs.setdefault("api_key", "sk-account-a-0123456789")
        transport = httpx.MockTransport(self.handle)
        return OpenAI(
            base_url="http://lm.test/v1",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
            **kwargs,
        )


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_clients_of_different_accounts_do_not_share_answers() -> None:
    server = _Server()
    cache = enable_cache()
    a = server.client(api_key="sk-account-a-0123456789")
    b = server.client(api_key="sk-account-b-0123456789")
    assert a.chat(MESSAGES, model="m") == "answer 1"
    assert b.chat(MESSAGES, model="m") == "answer 2"  # another account: its own call
    assert a.chat(MESSAGES, model="m") == "answer 1"  # a hit for the first account
    same = server.client(api_key="sk-account-a-0123456789")
    assert same.chat(MESSAGES, model="m") == "answer 1"  # same account, other client
    assert (cache.stats().hits, cache.stats().misses) == (2, 2)
    for other in (
        server.client(organization="org-other"),
        server.client(project="proj-other"),
        server.client(default_headers={"api-key": "azure-key-2"}),
        server.client(default_headers={"X-Gateway-Token": "gw-2"}),
    ):
        assert other.chat(MESSAGES, model="m") not in {"answer 1", "answer 2"}
    assert cache.stats().misses == 6
    # headers that carry no credential do not fork the cache
    plain = server.client(default_headers={"Accept-Encoding": "br", "X-Trace": "1"})
    assert plain.chat(MESSAGES, model="m") == "answer 1"
    assert len(server.keys) == 6


def test_no_secret_reaches_the_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "lm.sqlite"
    enable_cache(path)
    secrets = ["sk-secret-key-0123456789", "org-secret-42", "proj-secret-7", "hdr-s3c"]
    client = _Server().client(
        api_key=secrets[0],
        organization=secrets[1],
        project=secrets[2],
        default_headers={"x-api-key": secrets[3]},
    )
    client.chat(MESSAGES, model="m")
    disable_cache()  # closes the file
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"answer 1" in blob
    for secret in secrets:
        assert secret.encode() not in blob


def test_a_stored_value_of_the_wrong_shape_for_the_endpoint_is_a_miss(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lm.sqlite"
    server = _Server()
    enable_cache(path)
    client = server.client()
    assert client.chat(MESSAGES, model="m") == "answer 1"
    disable_cache()
    # a vector where a chat answer belongs (a well-formed envelope, the wrong type)
    wrong = json.dumps({"v": 1, "kind": "chat", "value": [[0.5, 1.0]]})
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("UPDATE responses SET value = ?", (wrong,)).rowcount == 1
        conn.commit()
    enable_cache(path)
    assert client.chat(MESSAGES, model="m") == "answer 2"  # a miss, answered afresh
    enable_cache(path)  # a fresh cache reads the overwritten row
    assert client.chat(MESSAGES, model="m") == "answer 2"
    assert len(server.keys) == 2
