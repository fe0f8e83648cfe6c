"""``--afnio-record=new --afnio-real-provider``: recording against the provider named
by ``OPENAI_BASE_URL`` with the key in ``OPENAI_API_KEY``, then replaying offline.

No real provider is reachable here (no network, no key), so an HTTP server in this
process stands in for it: it answers Chat Completions only when the request carries
the key from the environment, and remembers every ``Authorization`` it saw. What is
checked is everything the plugin does: the key reaches the provider and nothing else
does, the cassette says which provider answered and holds no trace of the key, and
the replay needs neither the provider nor a key."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

KEY = "sk-proj-Zr8Qw2Lk5Vn9Xc3Bt7Hy1Jm4"

TESTS = """
import json
import os
from pathlib import Path

import openai
import pytest


@pytest.mark.afnio_replay
def test_app(afnio_endpoint):
    client = openai.OpenAI(max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Is the gym open on Sunday? {braces}"}],
    )
    Path(os.environ["APP_OUT"]).write_text(json.dumps({
        "reply": reply.choices[0].message.content,
        "tokens": reply.usage.total_tokens,
        "mode": afnio_endpoint.mode,
        "recorded_with": afnio_endpoint.recorded_with,
    }))
"""


class _Provider(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that wants ``KEY`` (401 otherwise)."""

    seen: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        type(self).seen.append(auth)
        if auth != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "bad key", "type": "auth"}})
            return
        request = json.loads(body)
        words = request["messages"][-1]["content"].split()
        self._send(
            200,
            {
                "id": "chatcmpl-provider",
                "object": "chat.completion",
                "created": 1,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Yes, 6-22."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(words),
                    "completion_tokens": 2,
                    "total_tokens": len(words) + 2,
                },
            },
            extra={"x-request-id": "req_provider_1", "openai-organization": "acme"},
        )

    def _send(
        self, status: int, payload: dict, extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def provider() -> Iterator[str]:
    """The stand-in provider's base URL; its ``Authorization`` headers are in
    ``_Provider.seen``."""
    _Provider.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_recording_against_a_provider_keeps_its_answer_and_never_its_key(
    tmp_path: Path, provider: str
) -> None:
    project = write_project(tmp_path / "proj", {"tests/test_app.py": TESTS})
    out = tmp_path / "out.json"
    env = {
        **clean_env(),
        "APP_OUT": str(out),
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": provider,
    }
    run = run_pytest(
        project, "tests", "--afnio-record=new", "--afnio-real-provider", env=env
    )
    assert run.returncode == 0, output(run)
    recorded = json.loads(out.read_text())
    assert recorded["reply"] == "Yes, 6-22." and recorded["mode"] == "record"
    assert _Provider.seen == [f"Bearer {KEY}"]  # the key went to the provider
    host = provider.split("//")[1].split("/")[0]
    assert recorded["recorded_with"] == f"LM provider (http://{host}/v1)"

    (cassette,) = (project / "tests" / "cassettes").rglob("*.yaml")
    text = cassette.read_text()
    assert KEY not in text and KEY[8:] not in text
    assert "req_provider_1" not in text and "acme" not in text  # volatile headers
    assert "recorded_with: LM provider (http://" in text

    # replay: the provider is gone and the environment holds no key
    out.unlink()
    _Provider.seen = []
    replay_env = {**clean_env(), "APP_OUT": str(out)}
    run = run_pytest(project, "tests", env=replay_env)
    assert run.returncode == 0, output(run)
    replayed = json.loads(out.read_text())
    assert replayed == {**recorded, "mode": "replay"}
    assert _Provider.seen == []


def test_a_provider_recording_is_not_silently_mixed_with_a_simulator_one(
    tmp_path: Path, provider: str
) -> None:
    project = write_project(tmp_path / "proj", {"tests/test_app.py": TESTS})
    env = {**clean_env(), "APP_OUT": str(tmp_path / "out.json")}
    assert run_pytest(project, "tests", "--afnio-record=new", env=env).returncode == 0
    (cassette,) = (project / "tests" / "cassettes").rglob("*.yaml")
    assert "recorded_with: afnio simulator" in cassette.read_text()
    provider_env = {**env, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": provider}
    # --afnio-record=new records only tests without a cassette: this one replays
    run = run_pytest(
        project,
        "tests",
        "--afnio-record=new",
        "--afnio-real-provider",
        env=provider_env,
    )
    assert run.returncode == 0, output(run)
    assert _Provider.seen == []
    # adding provider answers to a simulator cassette is refused, naming the fix
    (project / "tests" / "test_app.py").write_text(TESTS.replace("Sunday", "Monday"))
    run = run_pytest(
        project,
        "tests",
        "--record-mode=new_episodes",
        "--afnio-real-provider",
        env=provider_env,
    )
    assert run.returncode != 0
    assert "re-record all of it with --afnio-record=all" in output(run)
    assert _Provider.seen == []
    assert "Monday" not in cassette.read_text()
    # re-recording all of it against the provider: its label, and no key
    run = run_pytest(
        project,
        "tests",
        "--afnio-record=all",
        "--afnio-real-provider",
        env=provider_env,
    )
    assert run.returncode == 0, output(run)
    text = cassette.read_text()
    assert "recorded_with: LM provider (http://" in text and KEY not in text
    assert _Provider.seen == [f"Bearer {KEY}"]
