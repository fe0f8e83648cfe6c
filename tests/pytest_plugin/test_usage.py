"""The plugin's public surface used right and wrong: the ``afnio_simulator`` fixture
in an unmarked test, ``afnio_endpoint`` without the marker, a fixture that clobbers
``OPENAI_BASE_URL``, bad marker arguments, and the option checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

TESTS = """
import os

import openai
import pytest


@pytest.mark.afnio_simulator(faults=[("rate_limit", 1)])
def test_live_simulator(afnio_simulator):
    assert os.environ["OPENAI_BASE_URL"] == afnio_simulator.base_url
    client = openai.OpenAI(max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="afnio-sim-1", messages=[{"role": "user", "content": "hi"}])
    reply = client.chat.completions.create(
        model="afnio-sim-1", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "neutral"
    assert afnio_simulator.stats.calls == 2


def test_endpoint_without_marker(afnio_endpoint):
    pass


@pytest.mark.afnio_replay
def test_recorded_fault(afnio_simulator):
    if afnio_simulator:  # recording against the simulator
        afnio_simulator.inject("rate_limit")
    client = openai.OpenAI(max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="afnio-sim-1", messages=[{"role": "user", "content": "hi"}])
"""

CLOBBER = """
import os

import pytest


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")


@pytest.mark.afnio_replay
def test_clobbered():
    raise AssertionError("the body must not run")
"""

BAD_MARKER = """
import pytest


@pytest.mark.afnio_replay(ignore_field=("x",))
def test_bad():
    pass
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_project(
        tmp_path_factory.mktemp("usage") / "project",
        {
            "tests/test_usage.py": TESTS,
            "clobber/test_clobber.py": CLOBBER,
            "bad/test_bad.py": BAD_MARKER,
        },
    )


def test_the_live_simulator_fixture_and_a_recorded_fault_replay(project: Path) -> None:
    env = clean_env(OPENAI_API_KEY="sk-real-looking-key-1234")
    record = run_pytest(project, "tests", "-q", "--afnio-record=new", env=env)
    out = output(record)
    assert "2 passed, 1 error" in out, out
    assert "afnio_endpoint needs @pytest.mark.afnio_replay on the test" in out
    cassette = (
        project / "tests" / "cassettes" / "test_usage" / "test_recorded_fault.yaml"
    )
    text = cassette.read_text(encoding="utf-8")
    assert "code: 429" in text and "sk-real-looking-key-1234" not in text
    replay = run_pytest(project, "tests", "-q", "-k", "recorded_fault", env=env)
    assert replay.returncode == 0, output(replay)


def test_a_fixture_that_changes_openai_base_url_fails_the_test_at_once(
    project: Path,
) -> None:
    run = run_pytest(project, "clobber", "-q", "--afnio-record=new")
    out = output(run)
    assert run.returncode == 1, out
    assert "a fixture changed OPENAI_BASE_URL after afnio_replay set it" in out
    assert "the body must not run" not in out


def test_a_bad_marker_argument_is_a_usage_error_naming_it(project: Path) -> None:
    run = run_pytest(project, "bad", "-q")
    out = output(run)
    assert run.returncode == 4, out
    assert "unknown argument(s) ignore_field" in out and "test_bad" in out


def test_real_provider_needs_a_recording_mode_and_a_key(project: Path) -> None:
    run = run_pytest(project, "tests", "--afnio-real-provider")
    assert run.returncode == 4
    assert "--afnio-real-provider only applies when recording" in output(run)
    run = run_pytest(project, "tests", "--afnio-real-provider", "--afnio-record=new")
    assert run.returncode == 4
    assert "--afnio-real-provider needs OPENAI_API_KEY" in output(run)


def test_without_autoload_the_usage_error_says_to_add_p_recording(
    project: Path,
) -> None:
    """Both plugins installed, autoload off, only ``-p afnio``: the error names the
    missing ``-p recording`` (not the extra, which is installed), and adding it
    works."""
    no_autoload = clean_env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    run = run_pytest(project, "tests", "--co", "-q", "-p", "afnio", env=no_autoload)
    out = output(run)
    assert run.returncode == 4, out
    assert "PYTEST_DISABLE_PLUGIN_AUTOLOAD is set" in out, out
    assert "add -p recording" in out and "pip install" not in out, out
    plugins = ("-p", "afnio", "-p", "recording")
    both = run_pytest(project, "tests", "--co", "-q", *plugins, env=no_autoload)
    assert both.returncode == 0, output(both)
    disabled = run_pytest(project, "tests", "--co", "-q", "-p", "no:recording")
    assert disabled.returncode == 4
    assert "was disabled with -p no:recording" in output(disabled), output(disabled)
