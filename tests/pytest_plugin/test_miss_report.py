"""A miss explains itself and always fails the test: a tiny user project (its own
tests, only the plugin's marker, fixtures and options) recorded against the bundled
simulator, then replayed in a subprocess with an edited prompt, a missing cassette, a
caught miss and a network call."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from afnio_pytest import SIMULATOR_RECORDING
from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

APP = """
import openai

SYSTEM = open(__file__.replace("app.py", "prompt.txt")).read().strip()


def classify(text):
    client = openai.OpenAI(max_retries=0)  # from OPENAI_BASE_URL / OPENAI_API_KEY
    try:
        reply = client.chat.completions.create(
            model="afnio-sim-1",
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": text}],
        )
        return reply.choices[0].message.content
    finally:
        client.close()
"""

TESTS = """
import os

import httpx
import pytest

from app import classify


@pytest.mark.afnio_replay
def test_classify(afnio_endpoint):
    assert classify("It arrived broken.") == "negative"
    assert afnio_endpoint.api_key == os.environ["OPENAI_API_KEY"]


@pytest.mark.afnio_replay
def test_caught_miss():
    try:
        label = classify("The box was broken.")
    except Exception:
        label = "fallback"
    assert label in ("negative", "fallback")


@pytest.mark.afnio_replay
def test_network():
    if os.environ.get("APP_NETWORK"):
        try:
            httpx.get("http://203.0.113.7:8080/status", timeout=2)
        except Exception:
            pass


def test_unmarked_sees_the_environment_untouched():
    assert os.environ.get("APP_MARKER") == "kept"
"""

PROMPT = 'If the message mentions "broken", the sentiment is negative.\n'


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project, recorded once against the simulator."""
    project = write_project(
        tmp_path_factory.mktemp("user") / "project",
        {"app.py": APP, "prompt.txt": PROMPT, "tests/test_app.py": TESTS},
    )
    run = run_pytest(project, "--afnio-record=new", "-q", env=_env())
    assert run.returncode == 0, output(run)
    return project


def _env(**extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=".", APP_MARKER="kept", **extra)


def _copy(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "project"))


def _cassette(project: Path, name: str) -> Path:
    return project / "tests" / "cassettes" / "test_app" / f"{name}.yaml"


def _failed(out: str) -> set[str]:
    return set(re.findall(r"^FAILED tests/test_app.py::(\w+)", out, re.M))


def test_recording_names_the_simulator_and_replay_passes(
    recorded: Path, tmp_path: Path
) -> None:
    project = _copy(recorded, tmp_path)
    for name in ("test_classify", "test_caught_miss", "test_network"):
        data = yaml.safe_load(_cassette(project, name).read_text(encoding="utf-8"))
        assert data["metadata"]["recorded_with"] == SIMULATOR_RECORDING
    data = yaml.safe_load(_cassette(project, "test_classify").read_text())
    assert len(data["interactions"]) == 1
    run = run_pytest(project, "-q", env=_env())
    assert run.returncode == 0, output(run)


def test_an_edited_prompt_fails_with_the_report_even_when_the_miss_is_caught(
    recorded: Path, tmp_path: Path
) -> None:
    project = _copy(recorded, tmp_path)
    (project / "prompt.txt").write_text(PROMPT.replace("negative", "unhappy"))
    run = run_pytest(project, "-q", env=_env())
    out = output(run)
    assert run.returncode == 1, out
    assert _failed(out) == {"test_classify", "test_caught_miss"}, out
    for name in ("test_classify", "test_caught_miss"):
        assert str(_cassette(project, name)) in out
        assert (
            f"python -m pytest 'tests/test_app.py::{name}' --afnio-record=all" in out
        ), out
    assert "afnio_replay: 1 LM request of this test is not in its cassette" in out
    assert "closest recorded request: #1 of 1 (same method and path)" in out
    assert "the sentiment is [-negative.-]{+unhappy.+}" in out, out
    # the caught miss shows the report, not the assertion about the fallback
    assert "the test also failed with" not in out


def test_a_missing_cassette_gives_the_report_with_the_record_new_command(
    recorded: Path, tmp_path: Path
) -> None:
    project = _copy(recorded, tmp_path)
    cassette = _cassette(project, "test_classify")
    cassette.unlink()
    run = run_pytest(project, "-q", "tests/test_app.py::test_classify", env=_env())
    out = output(run)
    assert run.returncode == 1, out
    assert "afnio_replay: this test has no cassette (replay mode)" in out
    assert str(cassette) in out
    assert (
        "python -m pytest 'tests/test_app.py::test_classify' --afnio-record=new" in out
    )
    assert not cassette.exists()


def test_a_network_call_during_replay_fails_the_test_even_when_caught(
    recorded: Path, tmp_path: Path
) -> None:
    project = _copy(recorded, tmp_path)
    run = run_pytest(
        project, "-q", "tests/test_app.py::test_network", env=_env(APP_NETWORK="1")
    )
    out = output(run)
    assert run.returncode == 1, out
    assert "network access during replay to 203.0.113.7:8080" in out, out
    assert "allow_hosts" in out
