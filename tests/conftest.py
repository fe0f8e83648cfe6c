"""Shared test fixtures: every test is offline and leaves afnio's global state as it
found it.

LM tests replay HTTP cassettes from the top-level ``cassettes/`` folder (one YAML file
per test: ``cassettes/<test module path>/<test name>.yaml``) with no network. To record:

* ``pytest <tests> --record-mode=once`` (new cassettes only) or
  ``--record-mode=rewrite`` (re-record) runs the bundled simulator
  (``afnio.testing``) and records what it answers;
* add ``--real-provider`` (with ``OPENAI_API_KEY`` set) to record against OpenAI.

Each cassette stores which server answered it (metadata ``recorded_with``). Requests
match on method, path and JSON body only (never host or port: the simulator's port
changes between runs). Auth headers never reach a cassette: every request header but
``content-type`` is dropped before recording, and volatile response headers too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import afnio

TESTS_DIR = Path(__file__).resolve().parent
CASSETTES_DIR = TESTS_DIR.parent / "cassettes"

# captured before the hermetic fixture removes it (only --real-provider uses it)
_REAL_OPENAI_KEY = os.environ.get("OPENAI_API_KEY")
DUMMY_KEY = "sk-test-dummy-key"
SIMULATOR_RECORDING = "afnio simulator (afnio.testing, deterministic stand-in)"
_KEPT_RESPONSE_HEADERS = {"content-type", "retry-after", "x-afnio-simulator"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--real-provider",
        action="store_true",
        default=False,
        help="When recording (--record-mode), record against the real OpenAI API "
        "(needs OPENAI_API_KEY) instead of the bundled simulator.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lm: the test makes LM calls (replays a cassette)"
    )


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real provider: drop provider variables, set a dummy key."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "LANGSMITH_", "LANGCHAIN_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)


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


SIMULATOR_HOST = "simulator.invalid"  # what a cassette shows for the local simulator


def _scrub_request(request: Any) -> Any:
    request.headers = {
        k: v for k, v in request.headers.items() if k.lower() == "content-type"
    }
    parts = urlsplit(request.uri)
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        # the simulator's port changes every run: record one stable address
        request.uri = urlunsplit(parts._replace(netloc=SIMULATOR_HOST))
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    response["headers"] = {
        k: v
        for k, v in response["headers"].items()
        if k.lower() in _KEPT_RESPONSE_HEADERS
    }
    return response


class _AtomicPersister:
    """Cassettes on disk, written atomically (an interrupted recording never leaves a
    half-written cassette), with vcrpy's cassette metadata (``recorded_with``)."""

    @classmethod
    def load_cassette(cls, cassette_path: Any, serializer: Any) -> Any:
        from vcr.persisters.filesystem import FilesystemPersister

        return FilesystemPersister.load_cassette(cassette_path, serializer)

    @staticmethod
    def save_cassette(cassette_path: Any, cassette_dict: Any, serializer: Any) -> None:
        from vcr.serialize import serialize

        data = serialize(cassette_dict, serializer)
        path = Path(cassette_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)


def pytest_recording_configure(config: pytest.Config, vcr: Any) -> None:
    # replaces pytest-recording's persister, which predates cassette metadata
    vcr.register_persister(_AtomicPersister)


@pytest.fixture(scope="session")
def vcr_config() -> dict[str, Any]:
    # no "record_mode" key here: it would override --record-mode
    return {
        "filter_headers": [
            "authorization",
            "api-key",
            "x-api-key",
            "openai-organization",
            "openai-project",
            "cookie",
        ],
        "before_record_request": _scrub_request,
        "before_record_response": _scrub_response,
        "decode_compressed_response": True,
        "match_on": ["method", "path", "body"],
    }


@pytest.fixture(scope="module")
def vcr_cassette_dir(request: pytest.FixtureRequest) -> str:
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
def lm(
    request: pytest.FixtureRequest, record_mode: str, vcr: Any
) -> Iterator[LMEndpoint]:
    """The LM endpoint of a cassette test (mark it ``@pytest.mark.vcr``).

    Replaying, the address is never contacted (the cassette answers). Recording, the
    bundled simulator is started, or OpenAI is used with ``--real-provider``.
    """
    if vcr is None:
        pytest.fail("the `lm` fixture needs @pytest.mark.vcr on the test")
    if record_mode == "none":
        vcr.get_metadata("recorded_with", None)  # every cassette names its server
        endpoint = LMEndpoint("http://127.0.0.1:9/v1", DUMMY_KEY, None)
        yield endpoint
        endpoint.close()
        return
    if request.config.getoption("--real-provider"):
        if not _REAL_OPENAI_KEY:
            pytest.fail("--real-provider needs OPENAI_API_KEY in the environment")
        vcr.get_metadata("recorded_with", "OpenAI API (https://api.openai.com/v1)")
        endpoint = LMEndpoint("https://api.openai.com/v1", _REAL_OPENAI_KEY, None)
        yield endpoint
        endpoint.close()
        return
    from afnio.testing import Simulator

    with Simulator() as sim:
        vcr.get_metadata("recorded_with", SIMULATOR_RECORDING)
        endpoint = LMEndpoint(sim.base_url, DUMMY_KEY, sim)
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


def _cassette_miss(excinfo: Any) -> BaseException | None:
    seen: set[int] = set()
    stack = [excinfo.value] if excinfo is not None else []
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if type(err).__name__ == "CannotOverwriteExistingCassetteException":
            return err
        stack.extend([err.__cause__, err.__context__])
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        miss = _cassette_miss(call.excinfo)
        if miss is not None:
            request = getattr(miss, "failed_request", None)
            what = f"{request.method} {request.path}" if request is not None else "?"
            body = ""
            if request is not None and request.body:
                raw = request.body
                body = (
                    raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                )[:400]
            report.longrepr = (
                f"Cassette miss: the request {what} is not recorded.\n"
                f"  body: {body}\n"
                f"  cassette: {getattr(miss.cassette, '_path', '?')}\n"
                f"Record it against the simulator with:\n"
                f"  python -m pytest '{item.nodeid}' --record-mode=once\n"
                f"(or --record-mode=rewrite to re-record the whole cassette).\n\n"
                f"vcrpy said: {str(miss)[:1500]}"
            )
