"""Plain data of the plugin: constants, the endpoint a test sees, the per-test state and
the problems that fail a test. Standard library only: ``plugin.py`` imports this module
on every pytest run, so it must stay cheap and must not import afnio, vcr or openai.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IGNORED_FIELDS",
    "DUMMY_KEY",
    "KNOWN_LM_HOSTS",
    "PROVIDER_ENV_PREFIXES",
    "REPLAY_BASE_URL",
    "SIMULATOR_HOST",
    "SIMULATOR_RECORDING",
    "TRACING_ENV_PREFIXES",
    "Blocked",
    "CassetteSecretError",
    "Miss",
    "Problem",
    "ReplayEndpoint",
    "ReplayFailure",
    "ReplayNetworkBlocked",
    "ReplayState",
    "ReplayUsageError",
    "Unrecordable",
    "UnrecordedSimulatorCalls",
    "real_provider_label",
]

DUMMY_KEY = "sk-afnio-replay-dummy"
"""The API key a replayed (or simulator-recorded) test gets: never a real credential."""

REPLAY_BASE_URL = "http://127.0.0.1:9/v1"
"""``OPENAI_BASE_URL`` while replaying: an IP (no DNS lookup) on the discard port, so a
request that escapes the cassette is a blocked connection, never a real call."""

SIMULATOR_HOST = "simulator.invalid"
"""What a cassette shows instead of the simulator's ``127.0.0.1:<port>`` (the port
changes every run)."""

SIMULATOR_RECORDING = "afnio simulator (afnio.testing, deterministic stand-in)"
"""The ``recorded_with`` label of a cassette recorded against the bundled simulator."""

DEFAULT_IGNORED_FIELDS: tuple[str, ...] = (
    "user",
    "safety_identifier",
    "prompt_cache_key",
)
"""Top-level JSON request fields that request matching always ignores: identifiers an
app often sets per run. They are stored as sent (scrubbed)."""

KNOWN_LM_HOSTS: tuple[str, ...] = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.groq.com",
    "openrouter.ai",
    "api.together.xyz",
    "api.deepseek.com",
    "api.x.ai",
    "*.openai.azure.com",
)
"""Hosts whose requests are LM requests (recorded and replayed) in every test."""

PROVIDER_ENV_PREFIXES: tuple[str, ...] = (
    "OPENAI_",
    "AZURE_OPENAI_",
    "ANTHROPIC_",
    "GEMINI_",
    "GOOGLE_GENAI_",
    "VERTEXAI_",
    "MISTRAL_",
    "COHERE_",
    "GROQ_",
    "TOGETHER_",
    "OPENROUTER_",
    "DEEPSEEK_",
    "XAI_",
    "FIREWORKS_",
    "PERPLEXITY_",
    "LITELLM_PROXY_",
)
"""Environment variables with these prefixes are dropped inside a replay test."""

TRACING_ENV_PREFIXES: tuple[str, ...] = (
    "LANGSMITH_",
    "LANGCHAIN_",
    "LANGFUSE_",
    "HELICONE_",
    "PHOENIX_",
    "ARIZE_",
    "WANDB_",
    "WEAVE_",
    "OPIK_",
    "BRAINTRUST_",
    "AGENTOPS_",
    "OTEL_EXPORTER_OTLP_",
)
"""Tracing-service variables, dropped too (no trace leaves a replay test)."""

DROPPED_ENV_NAMES: tuple[str, ...] = ("GOOGLE_API_KEY", "CO_API_KEY", "HF_TOKEN")
"""Exact names dropped besides the prefixes and any name ending in ``_API_KEY``."""


def real_provider_label(base_url: str) -> str:
    """The ``recorded_with`` label of a recording against a real provider: its URL
    (scheme, host and path; never a key or user info)."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    name = "OpenAI API" if host == "api.openai.com" else "LM provider"
    return f"{name} ({parts.scheme}://{host}{parts.path.rstrip('/')})"


# -- errors ----------------------------------------------------------------------------


class ReplayUsageError(Exception):
    """The test (or a client it built) is configured in a way that cannot be recorded or
    replayed; the message names the fix."""


class ReplayFailure(AssertionError):
    """A replay test failed because of problems with its LM requests (misses, blocked
    connections, unrecordable clients); the message is the full report."""

    def __init__(self, report: str, also: BaseException | None = None) -> None:
        super().__init__(report)
        self.report = report
        self.also = also


class ReplayNetworkBlocked(RuntimeError):
    """A connection attempt during replay (only LM requests are replayed)."""


class CassetteSecretError(Exception):
    """Saving a cassette was refused because it would hold a credential."""


# -- problems --------------------------------------------------------------------------


@dataclass
class Miss:
    """An LM request the cassette could not answer.

    ``reason`` is ``no_cassette``, ``no_match``, ``already_played`` (k recorded, k+1
    sent) or ``missing_metadata``.
    """

    key: Any
    method: str
    path: str
    body: bytes | None
    reason: str
    closest_index: int | None = None
    recorded: int = 0
    attempts: int = 1


@dataclass
class Blocked:
    """A connection attempt during replay."""

    host: str
    port: int | None


@dataclass
class Unrecordable:
    """A client or configuration that cannot be recorded, and how to fix it."""

    what: str
    fix: str


@dataclass
class UnrecordedSimulatorCalls:
    """Requests the simulator served that vcrpy never saw (a raw-socket client)."""

    calls: int


Problem = Miss | Blocked | Unrecordable | UnrecordedSimulatorCalls


# -- what a test sees ------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayEndpoint:
    """Where a test marked ``@pytest.mark.afnio_replay`` sends its LM requests.

    Attributes:
        mode: ``"replay"`` (answers come from the cassette, the network is blocked)
            or ``"record"`` (requests reach the simulator or the real provider and are
            recorded).
        base_url: the OpenAI-compatible base URL (also in ``OPENAI_BASE_URL``).
        api_key: the API key (also in ``OPENAI_API_KEY``): :data:`DUMMY_KEY` unless
            recording against a real provider.
        recorded_with: the server that answered the cassette (its ``recorded_with``
            metadata).
        cassette_path: the cassette file.
        simulator: the live :class:`afnio.testing.Simulator` while recording against
            it, else ``None``.
        requests: the LM requests the test has sent so far (see :attr:`requests`).
    """

    mode: str
    base_url: str
    api_key: str
    recorded_with: str
    cassette_path: Path
    simulator: Any | None = None
    cassette: Any | None = field(default=None, repr=False, compare=False)

    @property
    def requests(self) -> list[Any]:
        """The LM requests this test has sent so far, in the order they were
        answered, as the cassette stores them (vcrpy ``Request`` objects: ``method``,
        ``uri``, ``body``; credentials scrubbed), whether they were recorded now or
        replayed. Use this rather than the cassette's own list: the file keeps its
        interactions sorted by request, so that re-recording an unchanged program
        writes the same file.

        Example::

            body = json.loads(afnio_endpoint.requests[-1].body)
        """
        return list(getattr(self.cassette, "sent_requests", ()))

    @property
    def recording(self) -> bool:
        """Whether this run records (rather than replays) the cassette."""
        return self.mode == "record"


@dataclass
class ReplayOptions:
    """The keyword arguments of ``@pytest.mark.afnio_replay``, validated."""

    ignore_fields: tuple[str, ...] = ()
    lm_hosts: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    keep_env: tuple[str, ...] = ()

    @classmethod
    def from_marker(
        cls, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ReplayOptions:
        """Validate the marker's arguments; ``ValueError`` names the bad one."""
        if args:
            raise ValueError(
                "afnio_replay takes keyword arguments only (ignore_fields=, lm_hosts=, "
                f"allow_hosts=, keep_env=), got positional {args!r}"
            )
        unknown = sorted(set(kwargs) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(
                f"afnio_replay got unknown argument(s) {', '.join(unknown)}; it takes "
                "ignore_fields, lm_hosts, allow_hosts and keep_env"
            )
        values: dict[str, tuple[str, ...]] = {}
        for name, value in kwargs.items():
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Iterable) or not all(
                isinstance(v, str) and v for v in value
            ):
                raise ValueError(
                    f"afnio_replay({name}=...) must be a list of non-empty strings, "
                    f"got {value!r}"
                )
            values[name] = tuple(value)
        return cls(**values)


class ReplayState:
    """Everything the plugin knows about one marked test: its options, its mode, the
    credentials it holds, and the problems that will fail it.

    Created at collection (the ``vcr`` marker the plugin adds holds its bound
    ``before_record_request``/``before_record_response``), reset at each setup.
    """

    def __init__(
        self,
        nodeid: str,
        options: ReplayOptions,
        record_mode: str,
        real_provider: tuple[str, str] | None,
    ) -> None:
        self.nodeid = nodeid
        self.options = options
        self.record_mode = record_mode  # as given to pytest-recording
        self.real_provider = real_provider  # (base_url, key) captured at configure
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget a previous run of this test (reruns reuse the state object)."""
        self.active = False
        self.phase = "loading"  # "loading" while vcr reads the file, then "live"
        self.mode = "replay"
        self.secrets: set[str] = set()
        self.problems: list[Problem] = []
        self.reported = 0  # problems already reported by the call check
        self.network_guard: Any | None = None  # replay's NetworkGuard
        self._miss_index: dict[Any, Miss] = {}
        self.endpoint: ReplayEndpoint | None = None
        self.endpoint_netloc: str | None = None
        self.simulator: Any | None = None
        self.simulator_netloc: str | None = None
        self.cassette: Any | None = None
        self.recorded_with: str | None = None
        self.expected_env: dict[str, str] = {}
        self.user_before_record_request: list[Callable[[Any], Any]] = []
        self.user_before_record_response: list[Callable[[Any], Any]] = []
        # (name, scope) of the non-function-scoped fixture being set up inside this
        # test, if any (set by the plugin's pytest_fixture_setup hook)
        self.shared_fixture: tuple[str, str] | None = None

    # -- problems --------------------------------------------------------------------

    def add_problem(self, problem: Problem) -> None:
        """Record a problem (thread-safe); blocked hosts are deduplicated."""
        with self._lock:
            if problem not in self.problems:
                self.problems.append(problem)

    def add_miss(self, miss: Miss) -> Miss:
        """Record a miss, deduplicated by request key (a retry counts an attempt)."""
        with self._lock:
            known = self._miss_index.get(miss.key)
            if known is not None:
                known.attempts += 1
                return known
            self._miss_index[miss.key] = miss
            self.problems.append(miss)
            return miss

    def refuse_shared_fixture(self) -> None:
        """An LM request sent while a non-function-scoped fixture is set up inside
        this test: record the problem and raise :class:`ReplayUsageError` naming the
        fixture and the fix (the request is neither sent nor replayed)."""
        if self.shared_fixture is None:
            return
        name, scope = self.shared_fixture
        what = f"the {scope}-scoped fixture {name!r} sent an LM request"
        fix = (
            f"make {name!r} function-scoped (@pytest.fixture without scope=), or move "
            f"its LM call into the test: a {scope}-scoped fixture runs once, inside "
            "whichever test requests it first, so its LM calls would be recorded in "
            "that test's cassette only and missed when another selection or order "
            "of tests runs"
        )
        self.add_problem(Unrecordable(what, fix))
        raise ReplayUsageError(f"afnio_replay: {what}: {fix}")

    def snapshot_problems(self) -> list[Problem]:
        """A copy of the problems so far."""
        with self._lock:
            return list(self.problems)

    # -- credentials ------------------------------------------------------------------

    def add_secret(self, value: Any) -> None:
        """Remember a credential value this test holds (never written anywhere)."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            return
        value = value.strip()
        if len(value) >= 8 and value != DUMMY_KEY:
            with self._lock:
                self.secrets.add(value)

    def held_secrets(self) -> list[str]:
        """The held credentials, longest first (so a longer one is replaced whole)."""
        with self._lock:
            return sorted(self.secrets, key=len, reverse=True)

    # -- vcr hooks (bound into the ``vcr`` marker at collection) -----------------------

    def before_record_request(self, request: Any) -> Any:
        """vcr's request filter: the user's ``vcr_config`` hook, then afnio's scrub
        (``None`` for a request that is not an LM request)."""
        for hook in self.user_before_record_request:
            request = hook(request)
            if request is None:
                return None
        if self.phase == "loading":  # a stored request: already scrubbed
            return request
        from afnio_pytest._scrub import scrub_live_request

        scrubbed = scrub_live_request(request, self)
        if scrubbed is not None and self.shared_fixture is not None:
            self.refuse_shared_fixture()
        return scrubbed

    def before_record_response(self, response: Any) -> Any:
        """vcr's response filter: the user's hook, then afnio's scrub."""
        for hook in self.user_before_record_response:
            response = hook(response)
            if response is None:
                return None
        from afnio_pytest._scrub import scrub_response

        return scrub_response(response, self)
