"""``python -m afnio.testing serve``: one line printed, real answers, clean exit."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from afnio.testing import SIMULATOR_MODEL

REPO = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "afnio.testing", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _first_line(proc: subprocess.Popen[str], timeout: float = 90.0) -> str:
    """The server's first line. The bound is generous: a loaded CI machine may take
    many seconds to start an interpreter; a server that died says why."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"the simulator printed nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(
            f"the simulator exited ({proc.returncode}) before serving:\n{stderr}"
        )
    return line


@pytest.fixture
def servers() -> Iterator[dict[signal.Signals, subprocess.Popen[str]]]:
    """Two servers started at once (interpreter start-up dominates), one to stop with
    SIGINT and one with SIGTERM."""
    procs = {
        sig: _spawn("serve", "--port", "0", "--latency", "0.01")
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def test_serve_answers_and_exits_cleanly(
    servers: dict[signal.Signals, subprocess.Popen[str]],
) -> None:
    rule = 'If the message mentions "late", the sentiment is negative.'
    pattern = r"afnio simulator serving at (http://127\.0\.0\.1:(\d+)/v1)\n"
    for sig, proc in servers.items():
        line = _first_line(proc)
        match = re.fullmatch(pattern, line)
        assert match, line
        assert int(match[2]) > 0
        with openai.OpenAI(base_url=match[1], api_key="test", max_retries=0) as c:
            reply = c.chat.completions.create(
                model=SIMULATOR_MODEL,
                messages=[
                    {"role": "system", "content": rule},
                    {"role": "user", "content": "It came late."},
                ],
            )
        assert reply.choices[0].message.content == "negative"
        proc.send_signal(sig)
    for proc in servers.values():
        # the server polls its stop flag every 0.2 s; the bound only catches a hang
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # exactly one line was printed


def test_serve_refuses_a_public_host(capsys: pytest.CaptureFixture[str]) -> None:
    from afnio.testing.__main__ import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_usage_without_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    from afnio.testing.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err
