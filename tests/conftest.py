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
changes between runs). Credentials never reach a cassette: every request header but
``content-type`` is dropped before recording (volatile response headers too), and so
are URL user info and every query parameter that is a credential (``?key=``,
``?api_key=``, ``?access_token=``, ``?sig=``, any value like ``sk-...``; the rules are
``afnio._secrets``); a credential in a JSON request body is masked.

Replaying, a test whose cassette does not exist, or whose request is not in it, fails
with a "Cassette miss" report naming the cassette and the command that records it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import afnio
from afnio._secrets import mask_query_string, mask_secrets

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


def _scrub_body(body: Any) -> Any:
    """A JSON body with its credentials masked; any other body as it is. A body with
    nothing to mask is returned unchanged (byte for byte)."""
    if not isinstance(body, (str, bytes)) or not body:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    masked = mask_secrets(data)
    return body if masked == data else json.dumps(masked)


def _scrub_request(request: Any) -> Any:
    """What a cassette records of a request: no header but ``content-type``, no user
    info or credential query parameter in the URL, no credential in a JSON body, and
    the simulator under one stable host. Replaying applies it to live requests too
    (before matching), so it never changes what matches."""
    request.headers = {
        k: v for k, v in request.headers.items() if k.lower() == "content-type"
    }
    parts = urlsplit(request.uri)
    netloc = parts.netloc.rpartition("@")[2]  # user info never reaches a cassette
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        # the simulator's port changes every run: record one stable address
        netloc = SIMULATOR_HOST
    query = mask_query_string(parts.query, drop=True)
    request.uri = urlunsplit(parts._replace(netloc=netloc, query=query))
    if isinstance(request.body, (str, bytes)):  # never a file or an iterator
        request.body = _scrub_body(request.body)
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
        _check_replayable(vcr, request.node.nodeid)
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


def _miss_report(what: str, cassette_path: Any, nodeid: str) -> str:
    """The project's "Cassette miss" report: what is missing, the cassette, and the
    command that records it (``once`` creates a missing cassette; an existing one is
    write-protected in that mode, so it is re-recorded with ``rewrite``)."""
    if Path(str(cassette_path)).is_file():
        command, note = "rewrite", "(re-records the whole cassette; then compare it)"
    else:
        command, note = "once", "(records only cassettes that do not exist yet)"
    return (
        f"Cassette miss: {what}\n"
        f"  cassette: {cassette_path}\n"
        f"Record it against the simulator with:\n"
        f"  python -m pytest '{nodeid}' --record-mode={command}\n"
        f"{note}"
    )


def _check_replayable(cassette: Any, nodeid: str) -> None:
    """Replaying: fail with a cassette-miss report unless the cassette file exists and
    names the server that answered it (metadata ``recorded_with``)."""
    from vcr.errors import CannotOverwriteExistingCassetteException

    path = Path(cassette._path)
    if not path.is_file():
        pytest.fail(
            _miss_report("this test has no cassette (replay mode).", path, nodeid),
            pytrace=False,
        )
    try:
        cassette.get_metadata("recorded_with", None)
    except CannotOverwriteExistingCassetteException:
        pytest.fail(
            _miss_report(
                "the cassette does not say which server answered it (metadata "
                "recorded_with): re-record it.",
                path,
                nodeid,
            ),
            pytrace=False,
        )


def _cassette_miss(excinfo: Any) -> BaseException | None:
    """vcrpy's "can't record in this mode" error (or a subclass) behind a failure."""
    from vcr.errors import CannotOverwriteExistingCassetteException

    seen: set[int] = set()
    stack = [excinfo.value] if excinfo is not None else []
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, CannotOverwriteExistingCassetteException):
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
            path = getattr(miss.cassette, "_path", "?")
            request = getattr(miss, "failed_request", None)
            said = ""
            if not Path(str(path)).is_file():
                what = "this test has no cassette (replay mode)."
            elif request is None:  # vcrpy's MissingMetadataError
                what = (
                    f"the cassette lacks the metadata {getattr(miss, 'key', '?')!r}: "
                    "re-record it."
                )
            else:
                raw = request.body or b""
                body = (
                    raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                )[:400]
                what = (
                    f"the request {request.method} {request.path} is not recorded.\n"
                    f"  body: {body}"
                )
                said = f"\n\nvcrpy said: {str(miss)[:1500]}"
            report.longrepr = _miss_report(what, path, item.nodeid) + said
