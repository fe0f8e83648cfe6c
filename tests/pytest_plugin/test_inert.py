"""The ``afnio`` pytest plugin is inert unless used: importing it imports neither afnio,
openai nor vcr, it adds under 50 ms to pytest's start, it is loaded only through its
entry point (``-p afnio`` is no clash), and a plain pytest-recording project behaves
the same with and without it."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

HEAVY = ("afnio", "openai", "vcr", "httpx", "yaml", "dspy", "langchain_core")

IMPORT_PROBE = f"""
import sys, time
import pytest
start = time.perf_counter()
import afnio_pytest.plugin
took = time.perf_counter() - start
print(took, [m for m in {HEAVY!r} if m in sys.modules])
"""


def test_importing_the_plugin_imports_nothing_heavy_and_takes_under_50_ms() -> None:
    times = []
    for _ in range(5):
        run = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert run.returncode == 0, output(run)
        took, _, loaded = run.stdout.strip().partition(" ")
        assert loaded == "[]", f"importing the plugin imported {loaded}"
        times.append(float(took))
    assert min(times) < 0.05, times


def _empty_project(root: Path) -> Path:
    return write_project(root, {"tests/test_nothing.py": "def test_ok():\n    pass\n"})


def _cpu_seconds(project: Path, *args: str) -> float:
    """CPU time (user + system) of one ``pytest --co`` run: unlike wall time, it
    barely moves when other processes load the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_pytest(project, "--co", "-q", *args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0, output(run)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_the_plugin_adds_under_50_ms_to_pytest_start(tmp_path: Path) -> None:
    """The minimum CPU time of 6 ``pytest --co`` runs with the plugin, minus that of 6
    without it (``-p no:afnio``), is under 50 ms. On a loaded machine one run varies by
    a few hundred ms, so up to 3 rounds are tried; a real regression (importing afnio
    at load costs 250 ms) fails all of them."""
    project = _empty_project(tmp_path / "p")
    differences = []
    for _ in range(3):
        with_plugin, without = [], []
        for i in range(6):  # alternate which goes first: the first of a pair is colder
            pair = [(with_plugin, ()), (without, ("-p", "no:afnio"))]
            for times, args in pair if i % 2 else reversed(pair):
                times.append(_cpu_seconds(project, *args))
        differences.append(min(with_plugin) - min(without))
        if differences[-1] < 0.05:
            break
    assert differences[-1] < 0.05, differences


def test_a_plain_run_leaves_afnio_openai_and_vcr_unimported(tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "p",
        {
            "tests/test_nothing.py": "def test_ok():\n    pass\n",
            "conftest.py": f"""
                import json, sys

                def pytest_sessionfinish(session):
                    loaded = [m for m in {HEAVY!r} if m in sys.modules]
                    with open("modules.json", "w") as f:
                        json.dump(loaded, f)
                """,
        },
    )
    # other installed plugins may import some of them (langsmith's imports httpx
    # when httpx-aiohttp is installed): the plugin must add none to what they import
    loaded = {}
    for label, args in (("with", ()), ("without", ("-p", "no:afnio"))):
        run = run_pytest(project, "-q", *args)
        assert run.returncode == 0, output(run)
        loaded[label] = set(json.loads((project / "modules.json").read_text()))
    assert loaded["with"] - loaded["without"] == set()
    assert not {"afnio", "vcr", "openai"} & loaded["with"]


def test_help_lists_the_afnio_options_only_with_the_plugin(tmp_path: Path) -> None:
    project = _empty_project(tmp_path / "p")
    shown = output(run_pytest(project, "--help"))
    assert "--afnio-record" in shown and "--afnio-real-provider" in shown
    assert "--afnio-record" not in output(
        run_pytest(project, "--help", "-p", "no:afnio")
    )
    markers = output(run_pytest(project, "--markers"))
    assert "afnio_replay(ignore_fields=(), lm_hosts=(), allow_hosts=()" in markers


def test_p_afnio_is_no_clash_and_loads_the_plugin_without_autoload(
    tmp_path: Path,
) -> None:
    project = _empty_project(tmp_path / "p")
    run = run_pytest(project, "-q", "-p", "afnio")
    assert run.returncode == 0, output(run)
    assert "already registered" not in output(run)
    no_autoload = clean_env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    loaded = run_pytest(project, "--help", "-p", "afnio", env=no_autoload)
    assert loaded.returncode == 0 and "--afnio-record" in output(loaded), output(loaded)
    absent = run_pytest(project, "--help", env=no_autoload)
    assert "--afnio-record" not in output(absent)


# -- a plain pytest-recording project gives the same results with and without it ----

PLAIN_CONFTEST = """
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("echo " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server():
    httpd = HTTPServer(("127.0.0.1", int(os.environ["PLAIN_PORT"])), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _drop_volatile(response):
    volatile = ("date", "server")
    response["headers"] = {
        k: v for k, v in response["headers"].items() if k.lower() not in volatile
    }
    return response


@pytest.fixture(scope="session")
def vcr_config():
    return {
        "filter_headers": ["x-token"],
        "before_record_response": _drop_volatile,
        "match_on": ["method", "path", "query"],
    }
"""

PLAIN_TESTS = """
import os

import httpx
import pytest


@pytest.mark.vcr
def test_one(server):
    assert httpx.get(server + "/one", headers={"x-token": "t-1"}).text == "echo /one"


@pytest.mark.vcr
def test_two(server):
    for page in (1, 2):
        assert httpx.get(server + "/two", params={"page": page}).status_code == 200


@pytest.mark.vcr
def test_maybe_missing(server):
    path = "/other" if os.environ.get("PLAIN_MISS") else "/three"
    assert httpx.get(server + path).text == "echo " + path
"""


def _outcomes(junit: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [
            child.tag for child in case if child.tag in ("failure", "error", "skipped")
        ]
        outcomes[case.get("name", "?")] = kinds[0] if kinds else "passed"
    return outcomes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_plain_pytest_recording_project_is_unchanged_by_the_plugin(
    tmp_path: Path,
) -> None:
    port = str(_free_port())
    results = {}
    for variant, extra in (("with", ()), ("without", ("-p", "no:afnio"))):
        project = write_project(
            tmp_path / variant,
            {"tests/conftest.py": PLAIN_CONFTEST, "tests/test_plain.py": PLAIN_TESTS},
        )
        runs = []
        for step, args, env in (
            ("record", ("--record-mode=once",), clean_env(PLAIN_PORT=port)),
            ("replay", (), clean_env(PLAIN_PORT=port)),
            ("miss", (), clean_env(PLAIN_PORT=port, PLAIN_MISS="1")),
        ):
            junit = tmp_path / f"{variant}-{step}.xml"
            run = run_pytest(
                project, "-q", f"--junitxml={junit}", *extra, *args, env=env
            )
            runs.append((run.returncode, _outcomes(junit)))
        cassettes = {
            str(p.relative_to(project)): p.read_bytes()
            for p in sorted(project.rglob("*.yaml"))
        }
        results[variant] = (runs, cassettes)
    with_runs, with_cassettes = results["with"]
    assert with_runs == results["without"][0]
    assert with_cassettes == results["without"][1]
    # the runs did what they say: recorded 3 cassettes, replayed, then one miss
    assert len(with_cassettes) == 3
    assert [code for code, _ in with_runs] == [0, 0, 1]
    assert with_runs[2][1]["test_maybe_missing"] == "failure"
