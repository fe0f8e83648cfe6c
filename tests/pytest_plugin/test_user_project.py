"""Acceptance of ``afnio_pytest`` on a throwaway USER project (issue 20, design §10 T3).

The project is built from strings in a temporary folder: its own LangChain app
(``app/chain.py``), its own DSPy program with all of DSPy's defaults
(``app/program.py``) and its own ``tests/test_app.py``, which uses only the plugin's
public surface (the ``afnio_replay`` marker, pytest-recording's ``default_cassette``,
the ``--afnio-record`` option) and nothing from this repository's ``tests/``. Every
user test writes what it got to ``$APP_OUT/<test>.json``.

pytest runs on it in a subprocess with a clean environment: it is recorded once against
the bundled simulator (``--afnio-record=new``), then replayed with sockets blocked by a
``sitecustomize.py`` that is independent of the plugin (any connection attempt is
logged and refused), and the outputs must be identical, an ``optimize()`` run and an
``AfnioTGD.compile`` run included. The destructive checks (an edited prompt, a deleted
cassette) work on copies of the recorded project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.pytest_plugin._runner import clean_env, output, run_pytest, write_project

pytest.importorskip("langchain_openai", reason="needs the langchain extra")
pytest.importorskip("dspy", reason="needs the dspy extra")
pytest.importorskip("pytest_recording", reason="needs the pytest extra")

SYSTEM_WORD, EDITED_WORD = "Classify", "Categorize"

CHAIN = f'''
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

SYSTEM = (
    "{SYSTEM_WORD} the sentiment of the message: positive, negative or neutral. "
    'If the message mentions "refund", the sentiment is negative.'
)


def build_chain():
    prompt = ChatPromptTemplate.from_messages(
        [("system", SYSTEM), ("human", "{{message}}")]
    )
    llm = ChatOpenAI(model="afnio-sim-1", max_retries=0)
    return prompt | llm | StrOutputParser()
'''

PROGRAM = """
import dspy


def build_lm(**kwargs):
    return dspy.LM("openai/afnio-sim-1", **kwargs)  # DSPy's defaults


def build_program():
    return dspy.Predict("message -> sentiment")
"""

TESTS = '''
import asyncio
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import afnio
import dspy
import openai
import pytest
from afnio_integrations.dspy import AfnioTGD
from afnio_integrations.langchain import optimize

from app.chain import build_chain
from app.program import build_lm, build_program

OUT = Path(os.environ["APP_OUT"])
VOLATILE = ("time", "duration", "elapsed", "wall", "started", "finished")
VOLATILE += ("run_dir", "report_path")  # a new temporary run folder per run
FAKE = {
    "FAKE1": "fake1-Kq7Wz2Rt9Lm4Xv8Pn3Bc",
    "FAKE2": "fake2-Hd6Js1Gy5Tu0Qe7Ra2Zw",
    "FAKE3": "fake3-Mc9Vb4Nx8Lk3Jh2Gf1Ds",
    "FAKE4": "fake4-Pw0Oe9Iu8Yt7Rq6Aa5Sd",
}
CHAT = [{"role": "user", "content": "Is the gym open on Sunday?"}]


def dump(name, data):
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    (OUT / f"{name}.json").write_text(text, encoding="utf-8")


def stable(value):
    """``value`` without its timestamps and durations (they differ run to run)."""
    if isinstance(value, dict):
        return {
            k: stable(v)
            for k, v in value.items()
            if not any(word in str(k).lower() for word in VOLATILE)
        }
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    return value


@pytest.mark.afnio_replay
def test_chain_invoke_batch():
    chain = build_chain()
    one = chain.invoke({"message": "I want a refund."})
    many = chain.batch(
        [{"message": "I love the new lobby!"}, {"message": "My badge works."}]
    )
    dump("test_chain_invoke_batch", {"invoke": one, "batch": many})


@pytest.mark.afnio_replay
def test_chain_ainvoke_astream():
    async def main():
        chain = build_chain()
        one = await chain.ainvoke({"message": "The refund never came."})
        chunks = [c async for c in chain.astream({"message": "Hello there."})]
        return one, chunks

    one, chunks = asyncio.run(main())
    dump("test_chain_ainvoke_astream", {"ainvoke": one, "astream": "".join(chunks)})


@pytest.mark.afnio_replay
def test_openai_sdk_sync_async():
    sync = openai.OpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY
    reply = sync.chat.completions.create(model="afnio-sim-1", messages=CHAT)

    async def main():
        client = openai.AsyncOpenAI(max_retries=0)
        return await client.chat.completions.create(
            model="afnio-sim-1",
            messages=[{"role": "user", "content": "I want a refund, now."}],
        )

    areply = asyncio.run(main())
    dump(
        "test_openai_sdk_sync_async",
        {
            "sync": reply.choices[0].message.content,
            "async": areply.choices[0].message.content,
            "usage": [reply.usage.total_tokens, areply.usage.total_tokens],
        },
    )


@pytest.mark.afnio_replay
def test_dspy_defaults():
    program = build_program()
    with dspy.context(lm=build_lm()):
        sync = program(message="I want a refund.")
        again = program(message="I want a refund.")  # DSPy's cache answers it
        asynchronous = asyncio.run(program.acall(message="I love the new lobby!"))
    dump(
        "test_dspy_defaults",
        {
            "sync": sync.sentiment,
            "again": again.sentiment,
            "acall": asynchronous.sentiment,
        },
    )


ROWS = [
    ({"message": "I want a refund."}, "negative"),
    ({"message": "I love the new lobby!"}, "positive"),
    ({"message": "I am frustrated with the heating."}, "negative"),
    ({"message": "My badge works."}, "neutral"),
]


def accuracy(prediction, target):
    return int(prediction.strip() == target)


@pytest.mark.afnio_replay
def test_optimize():
    afnio.set_backward_model_client(
        "openai/afnio-sim-1", completion_args={"temperature": 0}
    )
    chain, report = optimize(
        build_chain(), ROWS, accuracy, epochs=2, batch_size=4, seed=0, progress=False
    )
    after = chain.invoke({"message": "So frustrated with the noise!"})
    dump(
        "test_optimize",
        {
            "prompts_after": report.prompts_after,
            "scores": [report.score_before, report.score_after],
            "cost": [report.calls, report.tokens, report.cost],
            "report": stable(dataclasses.asdict(report)),
            "after": after,
        },
    )


TRAINSET = [
    dspy.Example(message=m, sentiment=s).with_inputs("message")
    for m, s in [
        ("I am frustrated with the heating.", "negative"),
        ("I love the new lobby!", "positive"),
        ("My badge works.", "neutral"),
    ]
]


def metric(example, pred, trace=None):
    return example.sentiment == pred.sentiment


@pytest.mark.afnio_replay
def test_afnio_tgd_compile():
    with dspy.context(lm=build_lm()):
        tgd = AfnioTGD(metric=metric, epochs=2, batch_size=3, progress=False)
        optimized = tgd.compile(build_program(), trainset=TRAINSET)
        after = optimized(message="So frustrated!").sentiment
    dump(
        "test_afnio_tgd_compile",
        {
            "instructions": [p.signature.instructions for p in optimized.predictors()],
            "scores": [tgd.report.score_before, tgd.report.score_after],
            "cost": [tgd.report.calls, tgd.report.tokens, tgd.report.cost],
            "after": after,
        },
    )


N = 64


@pytest.mark.afnio_replay
@pytest.mark.default_cassette("concurrent_threads.yaml")
@pytest.mark.parametrize("run", range(20))
def test_threads(run):
    client = openai.OpenAI(max_retries=0)

    def ask(_):
        reply = client.chat.completions.create(model="afnio-sim-1", messages=CHAT)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(ask, range(N)))
    dump(f"test_threads_{run}", answers)


@pytest.mark.afnio_replay
@pytest.mark.default_cassette("concurrent_asyncio.yaml")
@pytest.mark.parametrize("run", range(20))
def test_asyncio(run):
    async def main():
        client = openai.AsyncOpenAI(max_retries=0)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(model="afnio-sim-1", messages=CHAT)
                for _ in range(N)
            )
        )
        return [r.choices[0].message.content for r in replies]

    dump(f"test_asyncio_{run}", asyncio.run(main()))


@pytest.mark.afnio_replay
def test_fake_key():
    client = openai.OpenAI(
        api_key=FAKE["FAKE1"],
        default_headers={"x-api-key": FAKE["FAKE2"]},
        default_query={"api_key": FAKE["FAKE3"], "key": FAKE["FAKE4"]},
        max_retries=0,
    )
    reply = client.chat.completions.create(model="afnio-sim-1", messages=CHAT)
    dump("test_fake_key", reply.choices[0].message.content)


@pytest.mark.afnio_replay
def test_one_more():
    client = openai.OpenAI(max_retries=0)
    sends = 3 if os.environ.get("APP_EXTRA") == "1" else 2
    answers = [
        client.chat.completions.create(model="afnio-sim-1", messages=CHAT)
        .choices[0]
        .message.content
        for _ in range(sends)
    ]
    dump("test_one_more", answers)


@pytest.mark.afnio_replay
def test_caught_miss():
    try:
        answer = build_chain().invoke({"message": "The lift is broken."})
    except Exception:  # the app's own fallback: the plugin fails the test anyway
        answer = "fallback"
    dump("test_caught_miss", answer)
'''

LM15 = """
import json
import os
import time
from pathlib import Path

import dspy
import pytest

from app.program import build_program

OUT = Path(os.environ["APP_OUT"])


@pytest.mark.afnio_replay
def test_lm15(afnio_simulator):
    started = time.perf_counter()
    lm = dspy.LM(
        "openai/afnio-sim-1", engine="lm15", api_base=os.environ["OPENAI_BASE_URL"]
    )
    try:
        with dspy.context(lm=lm):
            build_program()(message="I want a refund.")
    finally:
        (OUT / "lm15.json").write_text(
            json.dumps(
                {
                    "calls": afnio_simulator.stats.calls,
                    "seconds": time.perf_counter() - started,
                }
            ),
            encoding="utf-8",
        )
"""

BLOCKER = """
import os
import socket

_LOG = os.environ.get("AFNIO_BLOCK_LOG")
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _log(host, port):
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(f"{host}:{port}\\n")
    raise OSError(f"sitecustomize blocked a connection to {host}:{port}")


def _address(address):
    if isinstance(address, tuple) and address:
        return address[0], address[1] if len(address) > 1 else ""
    return address, ""


def connect(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    _log(*_address(address))


def connect_ex(self, address):
    if self.family == socket.AF_UNIX:
        return _connect_ex(self, address)
    _log(*_address(address))


def create_connection(address, *args, **kwargs):
    _log(*_address(address))


def getaddrinfo(host, port, *args, **kwargs):
    _log(host, port)


if _LOG:
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.create_connection = create_connection
    socket.getaddrinfo = getaddrinfo
"""

FAKES = {
    "FAKE1": "fake1-Kq7Wz2Rt9Lm4Xv8Pn3Bc",
    "FAKE2": "fake2-Hd6Js1Gy5Tu0Qe7Ra2Zw",
    "FAKE3": "fake3-Mc9Vb4Nx8Lk3Jh2Gf1Ds",
    "FAKE4": "fake4-Pw0Oe9Iu8Yt7Rq6Aa5Sd",
}

CASSETTES = Path("tests") / "cassettes" / "test_app"


def run_user_pytest(
    project: Path,
    out: Path,
    *args: str,
    block: bool = False,
    **env: str,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """pytest on ``project`` in a clean environment, outputs into ``out``; with
    ``block``, every socket connection is refused by an independent
    ``sitecustomize.py``. Returns the run and the blocked ``host:port`` list."""
    out.mkdir(parents=True, exist_ok=True)
    extra = {"APP_OUT": str(out), **env}
    log = out.parent / f"{out.name}.blocked"
    if block:
        blocker = out.parent / f"{out.name}.site"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
        log.write_text("", encoding="utf-8")
        extra.update(PYTHONPATH=str(blocker), AFNIO_BLOCK_LOG=str(log))
    run = run_pytest(project, *args, env=clean_env(**extra), timeout=600)
    blocked = log.read_text(encoding="utf-8").split() if block else []
    return run, blocked


def outputs(folder: Path) -> dict[str, object]:
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(folder.glob("*.json"))
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The user project, recorded once against the simulator (run 1), then replayed
    with sockets blocked (run 2)."""
    root = tmp_path_factory.mktemp("user_project")
    project = write_project(
        root / "project",
        {
            "app/__init__.py": "",
            "app/chain.py": CHAIN,
            "app/program.py": PROGRAM,
            "tests/test_app.py": TESTS,
            "lm15/test_lm15.py": LM15,
        },
    )
    (project / "conftest.py").write_text("", encoding="utf-8")  # rootdir on sys.path
    record, _ = run_user_pytest(
        project, root / "record", "tests", "-q", "--afnio-record=new"
    )
    replay, blocked = run_user_pytest(project, root / "replay", "tests", block=True)
    return {
        "root": root,
        "project": project,
        "record": record,
        "replay": replay,
        "blocked": blocked,
    }


def test_the_project_records_against_the_simulator(recorded: dict) -> None:
    record = recorded["record"]
    assert record.returncode == 0, output(record)[-4000:]
    assert "49 passed" in record.stdout, record.stdout[-2000:]
    folder = recorded["project"] / CASSETTES
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert "concurrent_threads.yaml" in names and "test_optimize.yaml" in names
    assert len(names) == 11, names
    for path in folder.glob("*.yaml"):
        meta = yaml.safe_load(path.read_text(encoding="utf-8")).get("metadata") or {}
        assert str(meta.get("recorded_with", "")).startswith("afnio simulator"), path
    threads = yaml.safe_load((folder / "concurrent_threads.yaml").read_text("utf-8"))
    assert len(threads["interactions"]) == 64


def test_replay_with_sockets_blocked_gives_identical_outputs(recorded: dict) -> None:
    replay = recorded["replay"]
    assert replay.returncode == 0, output(replay)[-4000:]
    assert recorded["blocked"] == []
    before = outputs(recorded["root"] / "record")
    after = outputs(recorded["root"] / "replay")
    assert len(before) == 9 + 40  # threads and asyncio write one file a run
    assert after == before
    optimized = before["test_optimize"]
    assert optimized["scores"][1] > optimized["scores"][0]  # the run learned
    assert optimized["cost"][0] > 0 and optimized["report"]["phases"]
    compiled = before["test_afnio_tgd_compile"]
    assert compiled["scores"] == [pytest.approx(1 / 3), 1.0]
    for kind in ("threads", "asyncio"):
        assert all(len(before[f"test_{kind}_{i}"]) == 64 for i in range(20))


def test_the_recording_holds_no_trace_of_the_fake_keys(recorded: dict) -> None:
    folder = recorded["project"] / CASSETTES
    fake = (folder / "test_fake_key.yaml").read_text(encoding="utf-8")
    assert "/v1/chat/completions" in fake
    for value in FAKES.values():
        for piece in (value, value[:8], value[-8:]):
            assert piece not in fake, piece
    for path in folder.glob("*.yaml"):
        text = path.read_text(encoding="utf-8").lower()
        assert "authorization" not in text and "x-api-key" not in text, path
        assert not any(v[-8:].lower() in text for v in FAKES.values()), path


@pytest.fixture(scope="module")
def broken(recorded: dict) -> dict[str, object]:
    """A copy of the recorded project with three defects, replayed with sockets
    blocked (runs 4, 5 and 6 in one subprocess): one word of the chain's system
    prompt edited, ``test_fake_key``'s cassette deleted, and ``APP_EXTRA=1`` so that
    ``test_one_more`` sends one request more than it recorded. ``test_dspy_defaults``
    (untouched) is the control. Meanwhile (run 7), another copy records the lm15
    test."""
    root = Path(recorded["root"])
    project = Path(shutil.copytree(recorded["project"], root / "broken"))
    chain = project / "app" / "chain.py"
    text = chain.read_text("utf-8")
    assert text.count(SYSTEM_WORD) == 1
    chain.write_text(text.replace(SYSTEM_WORD, EDITED_WORD), "utf-8")
    deleted = project / CASSETTES / "test_fake_key.yaml"
    deleted.unlink()
    lm15 = Path(shutil.copytree(recorded["project"], root / "lm15_project"))
    selected = "invoke_batch or caught_miss or dspy_defaults or fake_key or one_more"
    with ThreadPoolExecutor(2) as pool:
        replay = pool.submit(
            run_user_pytest,
            project,
            root / "broken_out",
            "tests/test_app.py",
            "-k",
            selected,
            block=True,
            APP_EXTRA="1",
        )
        record = pool.submit(
            run_user_pytest, lm15, root / "lm15_out", "lm15", "-q", "--afnio-record=new"
        )
        (run, blocked), (lm15_run, _) = replay.result(), record.result()
    return {
        "project": project,
        "run": run,
        "out": output(run),
        "blocked": blocked,
        "deleted": deleted,
        "outputs": root / "broken_out",
        "lm15_run": lm15_run,
        "lm15_outputs": root / "lm15_out",
    }


def test_replaying_the_broken_copy_fails_and_touches_no_socket(broken: dict) -> None:
    out = broken["out"]
    assert broken["run"].returncode == 1, out
    assert broken["blocked"] == []
    assert "3 failed, 1 passed, 44 deselected, 1 error" in out, out[-3000:]
    assert "ERROR tests/test_app.py::test_fake_key" in out  # at setup: no cassette
    assert "FAILED tests/test_app.py::test_dspy_defaults" not in out


@pytest.mark.parametrize("test", ["test_chain_invoke_batch", "test_caught_miss"])
def test_an_edited_prompt_fails_with_the_miss_report_and_its_word_diff(
    broken: dict, test: str
) -> None:
    section = _section(broken["out"], test)
    assert "afnio_replay: 1 LM request of this test is not in its cassette" in section
    assert str(broken["project"] / CASSETTES / f"{test}.yaml") in section, section
    assert f"[-{SYSTEM_WORD}-]{{+{EDITED_WORD}+}}" in section, section
    assert f"tests/test_app.py::{test}' --afnio-record=all" in section, section


def test_a_miss_the_app_caught_still_fails_the_test(broken: dict) -> None:
    assert "FAILED tests/test_app.py::test_caught_miss" in broken["out"]
    caught = broken["outputs"] / "test_caught_miss.json"
    assert json.loads(caught.read_text("utf-8")) == "fallback"  # the app's fallback


def test_a_deleted_cassette_gives_the_report_with_record_new(broken: dict) -> None:
    section = _section(broken["out"], "test_fake_key")
    assert "has no cassette" in section, section
    assert str(broken["deleted"]) in section, section
    assert "tests/test_app.py::test_fake_key' --afnio-record=new" in section, section


def test_one_request_more_than_recorded_is_an_already_played_miss(
    broken: dict,
) -> None:
    section = _section(broken["out"], "test_one_more")
    assert "this test sent the request 3 times; the cassette holds 2" in section


def test_dspy_native_lm15_engine_fails_at_once_naming_litellm(broken: dict) -> None:
    run = broken["lm15_run"]
    out = output(run)
    assert run.returncode == 1, out
    assert 'engine="litellm"' in out, out
    figures = json.loads((broken["lm15_outputs"] / "lm15.json").read_text("utf-8"))
    assert figures["calls"] == 0  # refused before anything reached the simulator
    assert figures["seconds"] < 30  # at once: no retries against a raw socket


def _section(out: str, test: str) -> str:
    """The failure section of ``test`` in pytest's output (the failure or the
    error at its setup)."""
    head = rf"_{{3,}} (?:ERROR at setup of )?{test} _{{3,}}\n"
    pattern = head + r"(.*?)(?=\n_{3,} |\n={3,} )"
    match = re.search(pattern, out, re.S)
    assert match is not None, out[-3000:]
    return match.group(1)
