"""Fixtures of the simulator's HTTP tests: one live server and one pair of clients
per test module, its state reset before each test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from afnio.testing import Simulator


@pytest.fixture(scope="module")
def _shared() -> Iterator[tuple[Simulator, openai.OpenAI, httpx.Client]]:
    """One server and one pair of clients for the module (creating an SDK client
    costs ~70 ms); the ``sim`` fixture resets the server's state between tests."""
    with (
        Simulator() as simulator,
        openai.OpenAI(base_url=simulator.base_url, api_key="test", max_retries=0) as c,
        httpx.Client(base_url=simulator.base_url, timeout=10) as h,
    ):
        yield simulator, c, h


@pytest.fixture
def sim(_shared: tuple[Simulator, openai.OpenAI, httpx.Client]) -> Iterator[Simulator]:
    simulator = _shared[0]
    simulator.latency = 0.0
    simulator.clear_faults()
    simulator.clear_delays()
    simulator.reset_stats()
    yield simulator
    assert simulator.stats.in_flight == 0


@pytest.fixture
def client(
    sim: Simulator, _shared: tuple[Simulator, openai.OpenAI, httpx.Client]
) -> openai.OpenAI:
    return _shared[1]


@pytest.fixture
def http(
    sim: Simulator, _shared: tuple[Simulator, openai.OpenAI, httpx.Client]
) -> httpx.Client:
    return _shared[2]
