"""Fixtures shared by the run-log tests: one simulator per module and an afnio
client on it, set as the backward model client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """One simulator for the test module."""
    with Simulator() as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> Iterator[OpenAI]:
    """An afnio client on ``sim`` (no retries, no faults left from an earlier test),
    set as the backward model client with the simulator's model."""
    sim.clear_faults()
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        afnio.set_backward_model_client(c, completion_args={"model": SIMULATOR_MODEL})
        yield c
