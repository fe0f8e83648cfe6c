"""The recorded cassettes: no secrets, a declared server, the compare tool, and the
scrubbing of ``afnio_pytest`` that wrote them (the plugin's own tests, with the miss
report and the missing-cassette report, are in ``tests/pytest_plugin/``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from vcr.request import Request

from afnio._secrets import SECRET_SCAN_PATTERNS
from afnio.testing.cassettes import compare_cassette_dirs, main
from afnio_pytest._scrub import scrub_request
from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

TESTS = Path(__file__).resolve().parent
CASSETTES = TESTS.parent / "cassettes"
ALL = sorted(CASSETTES.rglob("*.yaml"))
FILES = sorted(p for p in CASSETTES.rglob("*") if p.is_file())  # README.md too
SECRET_PATTERNS = [
    *SECRET_SCAN_PATTERNS,
    # not credentials, but never recorded either
    re.compile(r"^[\s-]*(openai-organization|openai-project)\s*:", re.I | re.M),
]


def _leaks(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_there_are_cassettes() -> None:
    assert len(ALL) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CASSETTES)))
def test_no_file_of_the_cassettes_folder_holds_a_secret(path: Path) -> None:
    leaks = _leaks(path.read_text(encoding="utf-8", errors="replace"))
    assert not leaks, f"{path} looks like it holds a secret: {leaks}"


def test_every_file_of_the_cassettes_folder_is_scanned() -> None:
    assert CASSETTES / "README.md" in FILES and set(ALL) <= set(FILES)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CASSETTES)))
def test_cassette_names_its_server_and_keeps_no_request_header(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["metadata"]["recorded_with"], (
        "every cassette says which server answered"
    )
    for item in data["interactions"]:
        assert set(item["request"]["headers"]) <= {"content-type"}


@pytest.mark.parametrize(
    "leaked",
    [
        "headers:\n  authorization:\n  - Bearer sk-abcdefghijklmnopqrstuvwxyz\n",
        "body: 'the key is sk-test-dummy-key'",  # shorter than 16 after sk-
        "body: sk-ab12",
        "value: Bearer tok1234",
        "headers:\n  api-key:\n  - azure-value\n",
        "  x-api-key: anything\n",
        "uri: https://x.invalid/v1/chat/completions?key=AIzaSy-short",
        "uri: https://x.invalid/v1/embeddings?api-version=1&api_key=abc",
        "uri: https://x.invalid/v1/completions?token=abc",
        "uri: https://x.invalid/v1/completions?access_token=abc",
        'string: \'{"api_key": "abc", "model": "m"}\'',
        "AIzaSyA1234567890abcdefghijklmnop",
    ],
)
def test_secret_scan_catches_a_leaked_credential(leaked: str) -> None:
    assert _leaks(leaked), leaked


@pytest.mark.parametrize(
    "clean",
    [
        "uri: http://simulator.invalid/v1/chat/completions",
        "uri: https://x.invalid/v1/chat/completions?api-version=2024-06-01",
        '{"max_tokens": 5, "prompt_cache_key": "c1", "model": "gpt-4o-mini"}',
        "a task-list and a desk-top; asks: be brief",
        "OPENAI_API_KEY=... .venv/bin/python -m pytest --afnio-real-provider",
    ],
)
def test_secret_scan_passes_ordinary_text(clean: str) -> None:
    assert not _leaks(clean), clean


def test_recorded_requests_lose_query_and_header_credentials() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    request = Request(
        "POST",
        "http://127.0.0.1:5123/v1/chat/completions"
        "?key=AIza-SECRET1&api-version=1&sig=SECRET2&x=sk-SECRET3&Api_Key=SECRET4",
        body,
        {
            "Authorization": "Bearer sk-SECRET5",
            "api-key": "SECRET6",
            "Content-Type": "application/json",
        },
    )
    scrubbed = scrub_request(request)
    assert scrubbed.uri == (
        "http://simulator.invalid/v1/chat/completions?api-version=1"
    )
    assert dict(scrubbed.headers) == {"content-type": "application/json"}
    assert scrubbed.body == body.encode()  # a body without credentials is untouched


def test_a_credential_in_a_recorded_body_is_masked() -> None:
    body = json.dumps({"model": "m", "api_key": "SECRET1", "user": "sk-SECRET2"})
    scrubbed = scrub_request(
        Request("POST", "http://127.0.0.1:5123/v1/chat/completions", body, {})
    )
    assert json.loads(scrubbed.body) == {
        "model": "m",
        "api_key": "<redacted>",
        "user": "<redacted>",
    }


# -- afnio's client recorded through the plugin, end to end (a pytest subprocess) -----

PROBE_TEST = """
import pytest

from afnio.models.openai import AsyncOpenAI
from afnio.testing import SIMULATOR_MODEL


@pytest.mark.afnio_replay
def test_probe(afnio_endpoint):
    client = AsyncOpenAI(
        base_url=afnio_endpoint.base_url,
        api_key=afnio_endpoint.api_key,
        max_retries=0,
        default_query={"key": "sk-leak-query1", "api-version": "1"},
        default_headers={"api-key": "azure-leak-header2"},
    )
    try:
        reply = client.chat(
            [{"role": "user", "content": "Say hi."}],
            model=SIMULATOR_MODEL,
            extra_query={"access_token": "leak-token3"},
        )
    finally:
        client.close()
    assert isinstance(reply, str)
"""


def test_recording_afnios_client_keeps_credentials_out_of_the_cassette(
    tmp_path: Path,
) -> None:
    """A user project marks one test ``afnio_replay`` (no copy of this suite's
    conftest): recording afnio's own client with credential query parameters, a
    credential header and a key in the environment writes none of them, keeps the
    ordinary query parameter, and the cassette replays."""
    project = write_project(tmp_path / "probe", {"tests/test_probe.py": PROBE_TEST})
    cassette = project / "tests" / "cassettes" / "test_probe" / "test_probe.yaml"
    env = clean_env(OPENAI_API_KEY="sk-leak-environment4-abcdef")
    record = run_pytest(project, "-q", "--afnio-record=new", env=env, timeout=120)
    assert record.returncode == 0, output(record)
    text = cassette.read_text(encoding="utf-8")
    assert "leak" not in text and not _leaks(text), text
    assert "api-version=1" in text  # ordinary query parameters are kept
    assert "simulator.invalid" in text
    replay = run_pytest(project, "-q", env=env, timeout=120)
    assert replay.returncode == 0, output(replay)


def test_compare_ignores_order_host_and_port_but_not_bodies(tmp_path: Path) -> None:
    source = next(p for p in ALL if "cache_makes" in p.name)
    before, after = tmp_path / "before", tmp_path / "after"
    for root in (before, after):
        (root / "x").mkdir(parents=True)
        shutil.copy(source, root / "x" / "c.yaml")
    data = yaml.safe_load((after / "x" / "c.yaml").read_text())
    data["interactions"].reverse()
    for item in data["interactions"]:
        item["request"]["uri"] = item["request"]["uri"].replace(
            "simulator.invalid", "127.0.0.1:5555"
        )
    (after / "x" / "c.yaml").write_text(yaml.safe_dump(data))
    assert compare_cassette_dirs(before, after) == []
    assert main(["compare", str(before), str(after)]) == 0

    data["interactions"][0]["response"]["body"]["string"] = '{"changed": true}'
    (after / "x" / "c.yaml").write_text(yaml.safe_dump(data))
    problems = compare_cassette_dirs(before, after)
    assert len(problems) == 2 and "newly recorded" in problems[1]
    assert main(["compare", str(before), str(after)]) == 1
    (after / "x" / "extra.yaml").write_text("interactions: []\n")
    assert any("only in after" in p for p in compare_cassette_dirs(before, after))
