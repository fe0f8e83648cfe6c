"""Regressions for what an independent review of the plugin found: a prompt holding a
key-like token keeps the rest of its text for matching (an edited prompt is a miss,
not a stale replay), and a miss in a fixture's teardown fails the test."""

from __future__ import annotations

import json
from pathlib import Path

from afnio_pytest._scrub import body_digest, mask_body, normalized_json
from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project


def test_a_key_inside_a_prompt_is_masked_where_it_stands() -> None:
    body = {"messages": [{"role": "user", "content": "My key sk-test-1234 fails"}]}
    assert mask_body(body) == {
        "messages": [{"role": "user", "content": "My key <redacted> fails"}]
    }
    assert mask_body({"api_key": "plain-value"}) == {"api_key": "<redacted>"}
    assert mask_body({"auth": "Bearer abc.def"}) == {"auth": "<redacted>"}
    # two prompts that differ outside the key are two requests
    one = json.dumps({"content": "Summarise: my key sk-test-1234 fails"}).encode()
    other = json.dumps({"content": "Write a poem about sk-other-9999"}).encode()
    assert body_digest(one, ()) != body_digest(other, ())
    # the same prompt with another key is the same request (keys never matter)
    same = json.dumps({"content": "Summarise: my key sk-live-5678 fails"}).encode()
    assert body_digest(one, ()) == body_digest(same, ())


TEARDOWN_APP = """
import os

import openai
import pytest


def ask(text):
    client = openai.OpenAI(max_retries=0)
    reply = client.chat.completions.create(
        model="afnio-sim-1", messages=[{"role": "user", "content": text}]
    )
    return reply.choices[0].message.content


@pytest.fixture
def teardown_call():
    yield
    try:
        ask(os.environ.get("TD_PROMPT", "teardown"))
    except Exception as exc:  # the user's fixture swallows the error
        print("caught in teardown:", type(exc).__name__)


@pytest.mark.afnio_replay
def test_td(teardown_call):
    assert ask("body")
"""


def test_a_miss_in_a_fixture_teardown_fails_the_test(tmp_path: Path) -> None:
    project = write_project(tmp_path / "td", {"tests/test_td.py": TEARDOWN_APP})
    recorded = run_pytest(project, "-q", "--afnio-record=new")
    assert recorded.returncode == 0, output(recorded)
    replayed = run_pytest(project, "-q")
    assert replayed.returncode == 0, output(replayed)
    edited = run_pytest(project, "-q", "-s", env=clean_env(TD_PROMPT="edited"))
    text = output(edited)
    assert edited.returncode == 1, text
    assert "caught in teardown" in text
    assert "afnio_replay" in text and "--afnio-record=all" in text


NETWORK_APP = """
import socket

import openai
import pytest


@pytest.mark.afnio_replay
def test_net():
    client = openai.OpenAI(max_retries=0)
    client.chat.completions.create(
        model="afnio-sim-1", messages=[{"role": "user", "content": "x"}]
    )
    try:
        socket.create_connection(("10.255.255.1", 80), timeout=0.5)
    except BaseException as exc:  # the code under test swallows the error
        print("caught:", type(exc).__name__)
"""


def test_a_caught_blocked_connection_fails_under_block_network_too(
    tmp_path: Path,
) -> None:
    """pytest-recording's ``--block-network`` installs its own socket guard after
    afnio's; afnio's report of a blocked connection must survive it."""
    project = write_project(tmp_path / "net", {"tests/test_net.py": NETWORK_APP})
    recorded = run_pytest(project, "-q", "--afnio-record=new")
    assert recorded.returncode == 0, output(recorded)
    for extra in ((), ("--block-network",)):
        replayed = run_pytest(project, "-q", "-s", *extra)
        text = output(replayed)
        assert replayed.returncode == 1, (extra, text)
        assert "caught:" in text and "10.255.255.1" in text, (extra, text)


def test_two_ignored_indices_of_one_list_name_the_items_they_say() -> None:
    raw = json.dumps({"messages": ["a", "b", "c", "d"]}).encode()
    ignored = [("messages", 0), ("messages", 1)]
    assert normalized_json(raw, ignored) == {"messages": ["c", "d"]}
