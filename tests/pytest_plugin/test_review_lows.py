"""Regressions for the low-severity findings of the plugin review: a credential in the
URL path is redacted (so such a client can be recorded, and its replay matches), a
``Basic`` auth password is held and redacted from the body, an LM call in a shared
(module-, class- or session-scoped) fixture fails with the fix instead of landing in one
test's cassette, and the live ``afnio_simulator`` fixture isolates DSPy's disk cache
(every run reaches the simulator)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pytest
from vcr.request import Request

from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_pytest._scrub import request_key, scrub_live_request
from tests.pytest_plugin._cassettes import new_state, open_cassette
from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

pytest.importorskip("pytest_recording", reason="needs the pytest extra")

PATH_KEY = "sk-PATHKEY1-abcdefgh"  # looks like a provider key
HELD_KEY = "FAKEKEY9-heldinpath"  # does not look like one: held from x-api-key
PASSWORD = "Zq8-basic-pw-Lm4Xv8"  # a Basic auth password (does not look like a key)


def _traces(secret: str) -> tuple[str, ...]:
    """The value, its halves and its percent-encoded form."""
    return (secret, secret[:8], secret[-8:], secret.replace("-", "%2D"))


# -- L1: a credential in the URL path --------------------------------------------------


def test_a_key_in_the_url_path_is_redacted_before_the_key_is_computed() -> None:
    state = new_state()
    state.endpoint_netloc, state.phase = "127.0.0.1:9", "live"
    one = scrub_live_request(
        Request(
            "POST",
            f"http://127.0.0.1:9/v1/keys/{PATH_KEY}/chat/completions?page=2",
            b"{}",
            {},
        ),
        state,
    )
    assert one.uri == ("http://127.0.0.1:9/v1/keys/<redacted>/chat/completions?page=2")
    # another key in the same place (the dummy key of a replay) is the same request
    other = scrub_live_request(
        Request(
            "POST",
            "http://127.0.0.1:9/v1/keys/sk-afnio-replay-dummy/chat/completions?page=2",
            b"{}",
            {},
        ),
        state,
    )
    assert request_key(one) == request_key(other)
    # a held credential that does not look like a key, also percent-encoded
    held = scrub_live_request(
        Request(
            "GET",
            f"http://127.0.0.1:9/v1/t/{HELD_KEY}/x/{HELD_KEY.replace('-', '%2D')}"
            f"?tenant={HELD_KEY}&api-version=1",
            None,
            {"x-api-key": HELD_KEY},
        ),
        state,
    )
    assert held.uri == (
        "http://127.0.0.1:9/v1/t/<redacted>/x/<redacted>"
        "?tenant=<redacted>&api-version=1"
    )
    assert PATH_KEY in state.held_secrets()  # so the body loses it too


def test_a_recording_with_a_key_in_the_url_path_is_saved_clean_and_replays(
    tmp_path: Path,
) -> None:
    """Recording against the simulator with a provider-like key and a held key in the
    path (the save guard refused such a cassette before), then replaying with another
    key where the first one stood."""
    path = tmp_path / "c.yaml"
    body = {
        "model": SIMULATOR_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    }
    recorded: list[tuple[int, str]] = []
    with Simulator() as sim:
        netloc = f"127.0.0.1:{sim.port}"
        with (
            open_cassette(path, new_state(), "once", simulator_netloc=netloc),
            httpx.Client(base_url=f"http://{netloc}") as client,
        ):
            for target in (f"/v1/models/{PATH_KEY}", f"/v1/keys/{HELD_KEY}/models"):
                reply = client.get(target, headers={"x-api-key": HELD_KEY})
                recorded.append((reply.status_code, reply.text))
            reply = client.post(
                f"/v1/projects/{PATH_KEY}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {PATH_KEY}"},
            )
            recorded.append((reply.status_code, reply.text))
    text = path.read_text(encoding="utf-8")
    assert text.count("uri: ") == 3  # all three recorded (the simulator 404s some)
    for secret in (PATH_KEY, HELD_KEY):
        for trace in _traces(secret):
            assert trace not in text
    assert "/v1/models/<redacted>" in text and "/v1/keys/<redacted>/models" in text

    replay_key = "sk-another-key-9876"  # replay holds another (or the dummy) key
    state = new_state()
    replayed: list[tuple[int, str]] = []
    with (
        open_cassette(path, state, "none"),
        httpx.Client(base_url="http://127.0.0.1:9") as client,
    ):
        for target in (f"/v1/models/{replay_key}", f"/v1/keys/{HELD_KEY}/models"):
            reply = client.get(target, headers={"x-api-key": HELD_KEY})
            replayed.append((reply.status_code, reply.text))
        reply = client.post(
            f"/v1/projects/{replay_key}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {replay_key}"},
        )
        replayed.append((reply.status_code, reply.text))
    assert state.snapshot_problems() == []
    # the recorded answers, with the held keys the simulator echoed redacted
    assert replayed == [
        (code, body.replace(PATH_KEY, "<redacted>").replace(HELD_KEY, "<redacted>"))
        for code, body in recorded
    ]


# -- L2: Basic auth --------------------------------------------------------------------


def test_a_basic_auth_password_is_held_and_redacted_from_the_body() -> None:
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode().rstrip("=")
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": f"my password is {PASSWORD}"}],
            "metadata": {"login": f"alice:{PASSWORD}"},
        }
    )
    state = new_state()
    state.endpoint_netloc, state.phase = "127.0.0.1:9", "live"
    scrubbed = scrub_live_request(
        Request(
            "POST",
            "http://127.0.0.1:9/v1/chat/completions",
            body,
            {"Authorization": f"Basic {token}"},  # unpadded: decoded tolerantly
        ),
        state,
    )
    data = json.loads(scrubbed.body)
    assert data["messages"][0]["content"] == "my password is <redacted>"
    assert data["metadata"]["login"] == "<redacted>"
    assert PASSWORD in state.held_secrets()
    assert f"alice:{PASSWORD}" in state.held_secrets()
    assert "alice" not in state.held_secrets()  # the user name is not a secret


def test_a_recording_with_basic_auth_never_writes_the_password(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    with Simulator() as sim:
        netloc = f"127.0.0.1:{sim.port}"
        with (
            open_cassette(path, new_state(), "once", simulator_netloc=netloc),
            httpx.Client(
                base_url=f"http://{netloc}/v1", auth=("alice", PASSWORD)
            ) as client,
        ):
            reply = client.post(
                "/chat/completions",
                json={
                    "model": SIMULATOR_MODEL,
                    "messages": [{"role": "user", "content": f"echo {PASSWORD}"}],
                },
            )
            assert reply.status_code == 200
    text = path.read_text(encoding="utf-8")
    assert "echo <redacted>" in text
    for trace in _traces(PASSWORD):
        assert trace not in text


# -- L5: LM calls in shared fixtures ---------------------------------------------------

SHARED_CONFTEST = """
import openai
import pytest


def ask(text):
    client = openai.OpenAI(max_retries=0)
    reply = client.chat.completions.create(
        model="afnio-sim-1", messages=[{"role": "user", "content": text}]
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="session")
def session_warmup():
    return ask("session warm-up")
"""

SHARED_TESTS = """
import openai
import pytest

from conftest import ask


@pytest.fixture(scope="module")
def module_warmup():
    return ask("module warm-up")


@pytest.fixture(scope="module")
def module_client_factory():
    # a shared fixture with no LM call is fine
    return lambda: openai.OpenAI(max_retries=0)


@pytest.fixture
def function_warmup():
    return ask("function warm-up")


@pytest.mark.afnio_replay
def test_module_fixture(module_warmup):
    assert ask("body")


@pytest.mark.afnio_replay
def test_session_fixture(session_warmup):
    assert ask("body")


class TestShared:
    @pytest.fixture(scope="class")
    def class_warmup(self):
        return ask("class warm-up")

    @pytest.mark.afnio_replay
    def test_class_fixture(self, class_warmup):
        assert ask("body")


@pytest.mark.afnio_replay
def test_function_fixture(function_warmup, module_client_factory):
    assert function_warmup
    assert module_client_factory().chat.completions.create(
        model="afnio-sim-1", messages=[{"role": "user", "content": "body"}]
    )
"""


def test_an_lm_call_in_a_shared_fixture_fails_naming_the_fixture_and_the_fix(
    tmp_path: Path,
) -> None:
    project = write_project(
        tmp_path / "shared",
        {"tests/conftest.py": SHARED_CONFTEST, "tests/test_shared.py": SHARED_TESTS},
    )
    recorded = run_pytest(project, "-q", "-rA", "--afnio-record=new")
    text = output(recorded)
    assert recorded.returncode == 1, text
    for scope, name, test in (
        ("module", "module_warmup", "test_module_fixture"),
        ("session", "session_warmup", "test_session_fixture"),
        ("class", "class_warmup", "TestShared::test_class_fixture"),
    ):
        assert f"ERROR tests/test_shared.py::{test}" in text, text
        assert f"the {scope}-scoped fixture '{name}' sent an LM request" in text, text
        assert f"make '{name}' function-scoped" in text, text
    assert "PASSED tests/test_shared.py::test_function_fixture" in text, text
    # the function-scoped fixture's call is in its test's cassette, which replays
    # whatever else is selected
    replayed = run_pytest(project, "-q", "-k", "test_function_fixture")
    assert replayed.returncode == 0, output(replayed)


# -- L6: afnio_simulator and DSPy's disk cache -----------------------------------------

DSPY_EAGER = """
import os

import dspy


def test_counts_one_call(afnio_simulator):
    lm = dspy.LM("openai/afnio-sim-1")  # DSPy's defaults: cache=True
    with dspy.context(lm=lm):
        dspy.Predict("message -> sentiment")(message="I want a refund.")
    print("SIMULATOR_CALLS", afnio_simulator.stats.calls)


def test_restored_after():
    print("DSPY_CACHEDIR_AFTER", os.environ.get("DSPY_CACHEDIR"))
"""

DSPY_LAZY = """
import os


def test_counts_one_call(afnio_simulator):
    import dspy  # imported during the test: DSPy builds its cache lazily

    lm = dspy.LM("openai/afnio-sim-1")
    with dspy.context(lm=lm):
        dspy.Predict("message -> sentiment")(message="I want a refund.")
    print("SIMULATOR_CALLS", afnio_simulator.stats.calls)


def test_restored_after():
    import dspy

    print("DSPY_CACHEDIR_AFTER", os.environ.get("DSPY_CACHEDIR"))
    # the cache the test built lazily (in its temporary folder) was dropped
    print("TEST_CACHE_KEPT", "cache" in vars(dspy))
"""


@pytest.mark.parametrize("variant", ["eager", "lazy"])
def test_the_live_simulator_fixture_counts_every_dspy_call_on_every_run(
    tmp_path: Path, variant: str
) -> None:
    """``afnio_simulator.stats.calls`` is the same on a second run: DSPy's answers do
    not come from a disk cache (the user's ``~/.dspy_cache`` here is a temporary
    HOME), whether DSPy was imported before the fixture or inside the test."""
    pytest.importorskip("dspy", reason="needs the dspy extra")
    home = tmp_path / "home"
    home.mkdir()
    source = DSPY_EAGER if variant == "eager" else DSPY_LAZY
    project = write_project(tmp_path / "proj", {"tests/test_dspy.py": source})
    env = clean_env(HOME=str(home))
    env.pop("DSPY_CACHEDIR", None)
    counts, texts = [], []
    for _ in range(2):
        run = run_pytest(project, "-q", "-s", env=env)
        text = output(run)
        assert run.returncode == 0, text
        counts.append(re.findall(r"SIMULATOR_CALLS (\d+)", text))
        texts.append(text)
    assert counts == [["1"], ["1"]], texts[1]
    for text in texts:  # everything is restored after the fixture
        assert "DSPY_CACHEDIR_AFTER None" in text, text
        assert "TEST_CACHE_KEPT True" not in text, text


# -- a credential field of a JSON body -------------------------------------------------


def test_a_recording_with_an_api_key_field_in_the_body_is_saved_masked_and_replays(
    tmp_path: Path,
) -> None:
    """A client that sends its key as a JSON field (``{"api_key": ...}``): the field is
    masked to ``<redacted>`` and the cassette is written (the save guard took the
    masked field for a credential and refused it before), and the replay matches."""
    path = tmp_path / "c.yaml"
    recorded_key, replay_key = "Qx7-field-key-Wm2Lp9", "another-field-key-77"

    def body(key: str) -> dict:
        return {
            "model": SIMULATOR_MODEL,
            "api_key": key,
            "messages": [{"role": "user", "content": "hi"}],
        }

    with Simulator() as sim:
        netloc = f"127.0.0.1:{sim.port}"
        with (
            open_cassette(path, new_state(), "once", simulator_netloc=netloc),
            httpx.Client(base_url=f"http://{netloc}") as client,
        ):
            recorded = client.post("/v1/chat/completions", json=body(recorded_key))
    text = path.read_text(encoding="utf-8")
    assert recorded_key not in text
    assert '"api_key": "<redacted>"' in text
    state = new_state()
    with (
        open_cassette(path, state, "none"),
        httpx.Client(base_url="http://127.0.0.1:9") as client,
    ):
        replayed = client.post("/v1/chat/completions", json=body(replay_key))
    assert state.snapshot_problems() == []
    assert (replayed.status_code, replayed.text) == (
        recorded.status_code,
        recorded.text,
    )
