"""The ``afnio`` pytest plugin (entry point ``pytest11: afnio = afnio_pytest.plugin``).

Inert unless used: importing it imports neither afnio, vcrpy nor openai; it adds no
autouse fixture and no ``vcr_config``; its hooks return at once for tests without
``@pytest.mark.afnio_replay``. Never list it in ``pytest_plugins`` (the entry point
loads it; a second registration under another name is an error); with
``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` load it with ``-p afnio``.

For a marked test, the collection hook prepends a ``vcr`` marker (afnio's persister,
scrubbing, matcher and record mode), so pytest-recording's own ``vcr`` fixture opens the
cassette where pytest-recording would (``vcr_cassette_dir``, ``default_cassette_name``),
and puts the private fixture ``_afnio_replay`` first, which upgrades that cassette,
sets the environment, starts the simulator when recording and blocks the network when
replaying. Problems (misses, blocked connections, unrecordable clients) fail the test
after its body, even when the code under test caught the error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from afnio_pytest._types import (
    DUMMY_KEY,
    REPLAY_BASE_URL,
    SIMULATOR_RECORDING,
    Miss,
    ReplayEndpoint,
    ReplayFailure,
    ReplayNetworkBlocked,
    ReplayOptions,
    ReplayState,
    ReplayUsageError,
    UnrecordedSimulatorCalls,
    real_provider_label,
)

if TYPE_CHECKING:
    from afnio_pytest._types import Problem

STATE_KEY = pytest.StashKey[ReplayState]()
REAL_PROVIDER_KEY = pytest.StashKey["tuple[str, str] | None"]()

RECORD_MODES = {"new": "once", "all": "rewrite"}
"""``--afnio-record`` values and the pytest-recording record modes they select."""

DEFAULT_PROVIDER_URL = "https://api.openai.com/v1"
_MARKER_HELP = (
    "afnio_replay(ignore_fields=(), lm_hosts=(), allow_hosts=(), keep_env=()): record "
    "and replay every LM request of the test (see afnio_pytest)"
)
_SIMULATOR_HELP = (
    "afnio_simulator(latency=0.0, faults=None): options of the afnio simulator the "
    "test records against (or the afnio_simulator fixture starts)"
)

# the state of the test whose cassette is being opened (read by
# pytest_recording_configure, which registers the afnio_body matcher for it only)
_OPENING: ReplayState | None = None

# the state of the marked test that is live now (from the end of _afnio_replay's setup
# to the start of its teardown): pytest_fixture_setup flags the shared fixtures set up
# inside it
_LIVE: ReplayState | None = None


# -- options, markers ------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("afnio", "afnio replay tests (@pytest.mark.afnio_replay)")
    group.addoption(
        "--afnio-record",
        choices=tuple(RECORD_MODES),
        default=None,
        dest="afnio_record",
        help="Record the cassettes of afnio_replay tests: 'new' records tests that "
        "have none (existing ones replay), 'all' re-records every selected one. "
        "Records against the bundled simulator unless --afnio-real-provider.",
    )
    group.addoption(
        "--afnio-real-provider",
        action="store_true",
        default=False,
        dest="afnio_real_provider",
        help="While recording afnio_replay tests, answer from the provider in the "
        "environment (OPENAI_API_KEY, OPENAI_BASE_URL, default "
        f"{DEFAULT_PROVIDER_URL}) instead of the simulator.",
    )


def effective_record_mode(config: pytest.Config) -> str:
    """The pytest-recording record mode of afnio tests: ``--afnio-record`` when given,
    else ``--record-mode``, else ``"none"`` (replay)."""
    chosen = config.getoption("afnio_record", None)
    if chosen:
        return RECORD_MODES[chosen]
    return config.getoption("--record-mode", None) or "none"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    config.addinivalue_line("markers", _SIMULATOR_HELP)
    real: tuple[str, str] | None = None
    if config.getoption("afnio_real_provider", False):
        if effective_record_mode(config) == "none":
            raise pytest.UsageError(
                "--afnio-real-provider only applies when recording: add "
                "--afnio-record=new|all"
            )
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise pytest.UsageError(
                "--afnio-real-provider needs OPENAI_API_KEY in the environment (and "
                f"OPENAI_BASE_URL for a provider other than {DEFAULT_PROVIDER_URL})"
            )
        base = os.environ.get("OPENAI_BASE_URL") or DEFAULT_PROVIDER_URL
        real = (base.rstrip("/"), key)  # captured now: a fixture may delete them later
    config.stash[REAL_PROVIDER_KEY] = real


# -- collection ------------------------------------------------------------------------


def _recording_missing(config: pytest.Config) -> str:
    """Why pytest-recording is not loaded, and the fix: install the extra when it is
    not installed; add ``-p recording`` when plugin autoload is disabled; drop
    ``-p no:recording`` when it was disabled."""
    from importlib.util import find_spec

    needs = "@pytest.mark.afnio_replay needs vcrpy and pytest-recording"
    if find_spec("pytest_recording") is None or find_spec("vcr") is None:
        return f"{needs}: pip install 'afnio-local[pytest]'"
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return (
            f"{needs}; both are installed, but PYTEST_DISABLE_PLUGIN_AUTOLOAD is set, "
            "so pytest-recording is not loaded: add -p recording (next to -p afnio)"
        )
    if config.pluginmanager.is_blocked("recording"):
        return (
            f"{needs}; both are installed, but pytest-recording was disabled with "
            "-p no:recording: remove that option, or deselect these tests with "
            "-m 'not afnio_replay'"
        )
    return (
        f"{needs}; both are installed, but pytest-recording is not loaded: load it "
        "with -p recording"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    marked = [item for item in items if item.get_closest_marker("afnio_replay")]
    if not marked:
        return
    if not config.pluginmanager.has_plugin("recording"):
        raise pytest.UsageError(_recording_missing(config))
    if config.getoption("--disable-recording", False):
        raise pytest.UsageError(
            "--disable-recording turns off the cassettes that tests marked "
            "afnio_replay replay; deselect them (-m 'not afnio_replay') instead"
        )
    from afnio_pytest._cassette import AtomicPersister
    from afnio_pytest._scrub import parse_field_path

    mode = effective_record_mode(config)
    real = config.stash.get(REAL_PROVIDER_KEY, None)
    for item in marked:
        fixturenames = getattr(item, "fixturenames", None)
        if fixturenames is None:
            continue
        marker = item.get_closest_marker("afnio_replay")
        assert marker is not None
        try:
            options = ReplayOptions.from_marker(marker.args, dict(marker.kwargs))
            for path in options.ignore_fields:
                parse_field_path(path)
        except ValueError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
        state = ReplayState(item.nodeid, options, mode, real)
        item.stash[STATE_KEY] = state
        item.add_marker(
            pytest.mark.vcr(
                record_mode=mode,
                persister=AtomicPersister,
                before_record_request=state.before_record_request,
                before_record_response=state.before_record_response,
                decode_compressed_response=True,
                match_on=("method", "path", "afnio_body"),
                allow_playback_repeats=False,
                ignore_localhost=False,
                ignore_hosts=(),
            ),
            append=False,  # first: pytest-recording merges markers so the first wins
        )
        if "_afnio_replay" not in fixturenames:  # shared by parametrized siblings
            fixturenames.insert(0, "_afnio_replay")


@pytest.hookimpl(optionalhook=True)
def pytest_recording_configure(config: pytest.Config, vcr: Any) -> None:
    state = _OPENING
    if state is None:  # a plain pytest-recording test: its VCR stays untouched
        return
    from afnio_pytest._cassette import make_body_matcher

    vcr.register_matcher("afnio_body", make_body_matcher(state))


# -- running ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: Any, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """While a marked test is live, a module-, class-, package- or session-scoped
    fixture set up inside it is marked on its state: an LM request sent during that
    setup is refused (:meth:`ReplayState.refuse_shared_fixture`). Such a fixture runs
    once, inside whichever test needs it first, so its LM calls would land in that
    test's cassette only, and another selection or order would miss them."""
    state = _LIVE
    if state is None or not state.active or fixturedef.scope == "function":
        return (yield)
    outer = state.shared_fixture
    state.shared_fixture = (str(fixturedef.argname), str(fixturedef.scope))
    try:
        return (yield)
    finally:
        state.shared_fixture = outer


def _report_text(item: pytest.Item, state: ReplayState, problems: list[Problem]) -> str:
    from afnio_pytest._report import ReportContext, render_report
    from afnio_pytest._scrub import ignored_paths

    cassette = state.cassette
    stored: list[Any] = []
    played: list[int] = []
    path = "?"
    if cassette is not None:
        path = str(cassette._path)
        stored = [request for request, _ in cassette.data]
        played = [cassette.play_counts[i] for i in range(len(stored))]
    ctx = ReportContext(
        nodeid=item.nodeid,
        cassette_path=path,
        recorded_with=state.recorded_with,
        stored=stored,
        played=played,
        ignored=ignored_paths(state.options.ignore_fields),
        rootdir=str(item.config.rootpath),
        invocation_dir=str(item.config.invocation_params.dir),
    )
    return render_report(problems, ctx)


def _caused_by_replay(exc: BaseException | None) -> bool:
    """Whether ``exc`` is (or was raised while handling) a replay problem."""
    names = {
        "CannotOverwriteExistingCassetteException",
        "MissingMetadataError",
    }
    seen: set[int] = set()
    stack = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, (ReplayNetworkBlocked, ReplayUsageError, ReplayFailure)):
            return True
        if type(err).__name__ in names:
            return True
        stack.extend([err.__cause__, err.__context__])
    return False


def _check_after_call(state: ReplayState) -> None:
    """Recording against the simulator: every request it served must be in the
    cassette (else a client bypassed vcrpy)."""
    sim, cassette = state.simulator, state.cassette
    if state.mode != "record" or sim is None or cassette is None:
        return
    recorded = len(cassette.data) - cassette._loaded_count
    unseen = sim.stats.calls - recorded
    if unseen > 0:
        state.add_problem(UnrecordedSimulatorCalls(unseen))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    state = item.stash.get(STATE_KEY, None)
    if state is None or not state.active:
        return (yield)
    changed = [
        name
        for name, value in state.expected_env.items()
        if os.environ.get(name) != value
    ]
    if changed:
        raise ReplayFailure(
            f"afnio_replay: a fixture changed {' and '.join(changed)} after "
            "afnio_replay set it; let that fixture skip tests marked afnio_replay "
            "(request.node.get_closest_marker('afnio_replay'))"
        )
    guard = getattr(state, "network_guard", None)
    if guard is not None:
        guard.ensure()  # --block-network's fixture may have replaced it
    try:
        result = yield
    except (pytest.skip.Exception, pytest.xfail.Exception, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _check_after_call(state)
        problems = state.snapshot_problems()
        state.reported = len(problems)
        if problems:
            raise ReplayFailure(_report_text(item, state, problems), also=exc) from exc
        raise
    _check_after_call(state)
    problems = state.snapshot_problems()
    state.reported = len(problems)
    if problems:
        raise ReplayFailure(_report_text(item, state, problems))
    return result


def _summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    report = yield
    state = item.stash.get(STATE_KEY, None)
    if state is None or call.excinfo is None or not report.failed:
        return report
    exc = call.excinfo.value
    if isinstance(exc, ReplayFailure):
        text = exc.report
        if exc.also is not None and not _caused_by_replay(exc.also):
            text += f"\n\nthe test also failed with: {_summary(exc.also)}"
        report.longrepr = text
    elif call.when == "setup" and state.problems:  # a fixture's LM call missed
        problems = state.snapshot_problems()
        state.reported = len(problems)  # the teardown check must not repeat them
        text = _report_text(item, state, problems)
        if not _caused_by_replay(exc):
            text += f"\n\nthe setup also failed with: {_summary(exc)}"
        report.longrepr = text
    return report


# -- fixtures --------------------------------------------------------------------------


def _hooks(value: Any) -> list[Any]:
    if value is None:
        return []
    if callable(value):
        return [value]
    return list(value)


def _simulator_options(node: pytest.Item) -> dict[str, Any]:
    marker = node.get_closest_marker("afnio_simulator")
    if marker is None:
        return {}
    if marker.args or set(marker.kwargs) - {"latency", "faults"}:
        pytest.fail(
            "afnio_simulator takes the keyword arguments latency= and faults= only, "
            f"got {marker.args!r} {marker.kwargs!r}",
            pytrace=False,
        )
    return dict(marker.kwargs)


def _fail_setup(item: pytest.Item, state: ReplayState, miss: Miss) -> None:
    pytest.fail(_report_text(item, state, [miss]), pytrace=False)


@pytest.fixture
def _afnio_replay(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplayEndpoint | None]:
    """Opens the test's cassette through pytest-recording and runs the test replaying
    it (or recording it); set up before every other fixture of a marked test."""
    global _OPENING, _LIVE
    item = request.node
    state = item.stash.get(STATE_KEY, None)
    if state is None:  # a parametrized sibling without the marker
        yield None
        return
    from afnio_pytest._cassette import upgrade
    from afnio_pytest._env import EnvPatch, credential_values, names_to_drop
    from afnio_pytest._guards import AfnioGuard, DspyGuard, NetworkGuard

    state.reset()
    user_config = request.getfixturevalue("vcr_config") or {}
    state.user_before_record_request = _hooks(user_config.get("before_record_request"))
    state.user_before_record_response = _hooks(
        user_config.get("before_record_response")
    )
    for value in credential_values(os.environ):
        state.add_secret(value)
    if state.real_provider is not None:
        state.add_secret(state.real_provider[1])

    env = EnvPatch()
    guards: list[Any] = []
    simulator = None
    try:
        _OPENING, state.phase = state, "loading"
        try:
            cassette = request.getfixturevalue("vcr")
        finally:
            _OPENING = None
        if cassette is None:
            pytest.fail(
                "afnio_replay: pytest-recording opened no cassette for this test "
                "(is recording disabled?)",
                pytrace=False,
            )
        upgrade(cassette, state)
        state.cassette = cassette
        record_mode = getattr(cassette.record_mode, "value", cassette.record_mode)
        loaded = bool(cassette.rewound)
        replay = record_mode == "none" or (record_mode == "once" and loaded)

        if replay:
            if not loaded:
                _fail_setup(item, state, Miss(None, "", "", None, "no_cassette"))
            try:
                label = cassette.get_metadata("recorded_with", None)
            except Exception as exc:
                if type(exc).__name__ != "MissingMetadataError":
                    raise
                _fail_setup(item, state, Miss(None, "", "", None, "missing_metadata"))
            state.recorded_with = label
            base_url, api_key = REPLAY_BASE_URL, DUMMY_KEY
        else:
            if state.real_provider is not None:
                base_url, api_key = state.real_provider
                label = real_provider_label(base_url)
            else:
                from afnio.testing import Simulator

                options = _simulator_options(item)
                simulator = Simulator(
                    latency=options.get("latency", 0.0), faults=options.get("faults")
                ).start()
                base_url, api_key = simulator.base_url, DUMMY_KEY
                label = SIMULATOR_RECORDING
                state.simulator = simulator
                state.simulator_netloc = f"127.0.0.1:{simulator.port}"
            existing = getattr(cassette, "_metadata", {}).get("recorded_with")
            if loaded and existing and existing != label:
                pytest.fail(
                    f"afnio_replay: {cassette._path} was recorded with {existing}, now "
                    f"recording with {label}: re-record all of it with "
                    "--afnio-record=all",
                    pytrace=False,
                )
            cassette.get_metadata("recorded_with", label)
            state.recorded_with = label
        from urllib.parse import urlsplit

        state.endpoint_netloc = urlsplit(base_url).netloc.rpartition("@")[2].lower()
        state.mode = "replay" if replay else "record"

        dspy_dir = tmp_path_factory.getbasetemp() / "afnio-dspy-cache"
        dspy_dir.mkdir(exist_ok=True)
        env.drop(names_to_drop(os.environ, state.options.keep_env))
        state.expected_env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": api_key}
        env.set(
            {
                **state.expected_env,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "DSPY_CACHEDIR": str(dspy_dir),
            }
        )
        if replay:
            state.network_guard = NetworkGuard(state, state.options.allow_hosts)
            guards.append(state.network_guard)
        guards += [DspyGuard(state), AfnioGuard()]
        for guard in guards:
            try:
                guard.start()
            except ReplayUsageError as exc:
                pytest.fail(f"afnio_replay: {exc}", pytrace=False)
        from pathlib import Path

        state.endpoint = ReplayEndpoint(
            mode=state.mode,
            base_url=base_url,
            api_key=api_key,
            recorded_with=state.recorded_with or "",
            cassette_path=Path(str(cassette._path)),
            simulator=simulator,
            cassette=cassette,
        )
        state.phase, state.active = "live", True
        _LIVE = state
        yield state.endpoint
        _LIVE = None
        # the other fixtures' teardowns ran (this one was set up first): a miss
        # there fails the test too, even when that teardown caught it
        late = state.snapshot_problems()[state.reported :]
        if late:
            pytest.fail(_report_text(item, state, late), pytrace=False)
    finally:
        state.active = False
        if _LIVE is state:
            _LIVE = None
        for guard in reversed(guards):
            guard.stop()
        env.restore()
        if simulator is not None:
            simulator.stop()


@pytest.fixture
def afnio_endpoint(request: pytest.FixtureRequest) -> ReplayEndpoint:
    """Where this test's LM requests go (``mode``, ``base_url``, ``api_key``,
    ``recorded_with``, ``cassette_path``, ``simulator``); needs
    ``@pytest.mark.afnio_replay``. ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` hold the
    same values, so clients built from the environment need nothing from it."""
    if request.node.stash.get(STATE_KEY, None) is None:
        pytest.fail(
            "afnio_endpoint needs @pytest.mark.afnio_replay on the test", pytrace=False
        )
    return request.getfixturevalue("_afnio_replay")


@pytest.fixture
def afnio_simulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The afnio simulator (``afnio.testing.Simulator``).

    In a test marked ``afnio_replay``: the simulator being recorded against (faults
    injected into it are recorded, and replayed), else ``None`` (replaying, or
    recording against a real provider). In any other test: a live simulator
    (``@pytest.mark.afnio_simulator(latency=, faults=)``), with ``OPENAI_BASE_URL`` and
    ``OPENAI_API_KEY`` pointing at it and provider variables dropped until the test
    ends. DSPy's response cache is isolated for the test (a fresh in-memory cache,
    ``DSPY_CACHEDIR`` in a temporary folder of the test), so every DSPy call reaches
    the simulator and ``stats.calls`` counts the same on every run; all is restored
    after the test.
    """
    if request.node.stash.get(STATE_KEY, None) is not None:
        endpoint = request.getfixturevalue("_afnio_replay")
        yield endpoint.simulator if endpoint is not None else None
        return
    from afnio.testing import Simulator
    from afnio_pytest._env import EnvPatch, names_to_drop
    from afnio_pytest._guards import DspyGuard

    options = _simulator_options(request.node)
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    dspy_dir = factory.mktemp("afnio-simulator-dspy-cache")
    simulator = Simulator(
        latency=options.get("latency", 0.0), faults=options.get("faults")
    ).start()
    env = EnvPatch()
    guard = DspyGuard(None)  # lm15's raw sockets reach a live simulator: only the cache
    try:
        env.drop(names_to_drop(os.environ))
        env.set(
            {
                "OPENAI_BASE_URL": simulator.base_url,
                "OPENAI_API_KEY": DUMMY_KEY,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "DSPY_CACHEDIR": str(dspy_dir),
            }
        )
        try:
            guard.start()
        except ReplayUsageError as exc:
            pytest.fail(f"afnio_simulator: {exc}", pytrace=False)
        yield simulator
    finally:
        guard.stop()
        env.restore()
        simulator.stop()
