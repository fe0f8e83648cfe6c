"""Fixtures of the DSPy integration tests: a DSPy LM on the cassette endpoint.

Every test LM is pinned to what its cassette recorded: ``engine="litellm"`` (HTTP
through the openai SDK, which the ``afnio_replay`` cassettes see; DSPy 3.4 picks its
native engine on raw sockets, which the plugin refuses, whenever ``OPENAI_BASE_URL``
is unset, as in the live-simulator tests), ``cache=False`` (a cache hit would skip a
recorded request; the plugin also gives each ``afnio_replay`` test a fresh in-memory
DSPy cache) and ``num_retries=0`` (a cassette miss fails at once). ``make_lm`` also
builds LMs on a live simulator for unmarked tests.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
dspy = pytest.importorskip("dspy", reason="needs the dspy extra")

from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from tests.conftest import LMEndpoint  # noqa: E402


def make_lm(endpoint: LMEndpoint | Any, **kwargs: Any) -> Any:
    """A ``dspy.LM`` for ``endpoint`` (a cassette endpoint or a live ``Simulator``)
    that cassettes can record and replay."""
    return dspy.LM(
        f"openai/{SIMULATOR_MODEL}",
        api_base=endpoint.base_url,
        api_key=getattr(endpoint, "api_key", "sk-test"),
        engine="litellm",
        cache=False,
        num_retries=0,
        temperature=0,
        **kwargs,
    )


@pytest.fixture
def dspy_lm(lm: LMEndpoint) -> Iterator[Any]:
    """The program's LM (DSPy), configured for the test through ``dspy.context``."""
    model = make_lm(lm)
    with dspy.context(lm=model, adapter=None):
        yield model


def _current_loop() -> asyncio.AbstractEventLoop | None:
    return getattr(asyncio.get_event_loop_policy()._local, "_loop", None)


def _open_loopback_sockets() -> list[socket.socket]:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket) and obj.fileno() != -1:
            try:
                host = obj.getpeername()[0]
            except (OSError, IndexError, TypeError):
                continue
            if host in ("127.0.0.1", "::1"):
                found.append(obj)
    return found


@pytest.fixture(autouse=True)
def _close_litellm_clients() -> Iterator[None]:
    """LiteLLM keeps openai clients (and their pooled sockets) for the life of the
    process, and its service logger gives the main thread an event loop it never
    closes; a test's endpoint (a simulator port) dies with the test. Close what the
    test left open now, instead of letting the garbage collector report it during
    another test."""
    import litellm
    import openai

    cache = litellm.in_memory_llm_clients_cache
    before = set(cache.cache_dict)
    loop_before = _current_loop()
    sockets_before = {id(s) for s in _open_loopback_sockets()}
    yield
    for key in set(cache.cache_dict) - before:
        client = cache.cache_dict.get(key)
        if isinstance(client, openai.OpenAI):
            client.close()
            cache.delete_cache(key)
    loop = _current_loop()
    if loop is not None and loop is not loop_before and not loop.is_running():
        loop.close()
        asyncio.set_event_loop(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
        for sock in _open_loopback_sockets():
            if id(sock) not in sockets_before:
                sock.close()  # pooled connections to the test's (stopped) server
