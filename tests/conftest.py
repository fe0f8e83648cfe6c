"""Shared test fixtures: every test is offline and leaves afnio's global state as it
found it.

LM tests are marked ``@pytest.mark.afnio_replay`` and replay HTTP cassettes from the
top-level ``cassettes/`` folder (one YAML file per test:
``cassettes/<test module path>/<test name>.yaml``) with no network. The recording and
replaying is afnio's own pytest plugin, ``afnio_pytest`` (the one a user's project
uses: scrubbing, matching, the simulator, the network guard, the miss report); this
file only puts the cassettes in ``cassettes/`` (``vcr_cassette_dir``) and gives the
tests an :class:`LMEndpoint` with an afnio client helper. To record:

* ``pytest <tests> --afnio-record=new`` (new cassettes only) or
  ``--afnio-record=all`` (re-record) runs the bundled simulator (``afnio.testing``)
  and records what it answers;
* add ``--afnio-real-provider`` (with ``OPENAI_API_KEY`` set) to record against OpenAI.

See ``cassettes/README.md`` and ``docs/offline-tests.md``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio_pytest import DUMMY_KEY, ReplayEndpoint

__all__ = ["CASSETTES_DIR", "DUMMY_KEY", "TESTS_DIR", "LMEndpoint"]

TESTS_DIR = Path(__file__).resolve().parent
CASSETTES_DIR = TESTS_DIR.parent / "cassettes"


@pytest.fixture(autouse=True)
def _hermetic_env(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test may reach a real provider: drop provider variables, set a dummy key.

    Tests marked ``afnio_replay`` are left alone: the plugin owns their environment
    (and fails a test whose ``OPENAI_BASE_URL`` a fixture changed after it set it).
    """
    if request.node.get_closest_marker("afnio_replay") is not None:
        return
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "LANGSMITH_", "LANGCHAIN_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)


@pytest.fixture(autouse=True, scope="session")
def _temp_files_under_pytest(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """``optimize()``/``AfnioTGD`` without ``root_dir`` keep their run folder (run log,
    report) in a ``mkdtemp`` folder that outlives the call: under tests those folders go
    to pytest's own temporary root (pruned after three sessions), not the system's."""
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = before


@pytest.fixture(autouse=True)
def _restore_concurrency() -> Iterator[None]:
    before = afnio.get_max_concurrency()
    yield
    afnio.set_max_concurrency(before)


@pytest.fixture(autouse=True)
def _no_response_cache() -> Iterator[None]:
    yield
    afnio.models.disable_cache()


@pytest.fixture(autouse=True)
def _no_backward_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without a backward model client (and leaves none behind)."""
    import afnio._model_client as model_client

    monkeypatch.setattr(model_client, "_singleton", None)


# -- cassettes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vcr_cassette_dir(request: pytest.FixtureRequest) -> str:
    """pytest-recording's cassette folder, moved to ``cassettes/<module path>/``."""
    module = Path(str(request.node.fspath)).resolve()
    return str(CASSETTES_DIR / module.relative_to(TESTS_DIR).with_suffix(""))


@dataclass
class LMEndpoint:
    """Where a cassette-backed test sends its LM requests."""

    base_url: str
    api_key: str
    simulator: Any | None  # the live simulator while recording against it
    clients: list[Any] = field(default_factory=list)

    def client(self, cls: type | None = None, **kwargs: Any) -> Any:
        """An afnio OpenAI client for this endpoint (no SDK retries by default, so a
        cassette miss fails at once); closed when the test ends."""
        from afnio.models.openai import AsyncOpenAI

        kwargs.setdefault("max_retries", 0)
        client = (cls or AsyncOpenAI)(
            base_url=self.base_url, api_key=self.api_key, **kwargs
        )
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def lm(afnio_endpoint: ReplayEndpoint) -> Iterator[LMEndpoint]:
    """The LM endpoint of a cassette test (mark it ``@pytest.mark.afnio_replay``).

    Built from the plugin's ``afnio_endpoint``: replaying, the address is never
    contacted (the cassette answers); recording, it is the bundled simulator, or
    OpenAI with ``--afnio-real-provider``.
    """
    endpoint = LMEndpoint(
        afnio_endpoint.base_url, afnio_endpoint.api_key, afnio_endpoint.simulator
    )
    yield endpoint
    endpoint.close()


@pytest.fixture
def backward_lm(lm: LMEndpoint) -> LMEndpoint:
    """``lm``, also set as the backward model client (the simulator's model, T=0)."""
    from afnio.testing import SIMULATOR_MODEL

    client = lm.client()
    afnio.set_backward_model_client(
        client, completion_args={"model": SIMULATOR_MODEL, "temperature": 0}
    )
    return lm
