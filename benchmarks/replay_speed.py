"""How fast a recorded ``Trainer.fit`` replays offline (issue 20: a recorded
1,000-call fit replays in under 10 s).

A throwaway USER project is written into a temporary folder: its own afnio agent
(``app/agent.py``: a trainable system prompt, an exact-match loss, TGD) and its own
``tests/test_fit.py``, marked ``@pytest.mark.afnio_replay``, whose ``Trainer.fit``
trains on ``--train`` messages and validates on ``--val`` for ``--epochs`` epochs
(forward, backward and optimizer calls: about ``(train + val) x epochs`` LM calls and
a few more). pytest runs it twice in a subprocess with a clean environment: once with
``--afnio-record=new`` against the bundled simulator, then in replay with every socket
connection refused by a ``sitecustomize.py`` (independent of the plugin). The user's
test times ``fit`` with ``perf_counter`` and writes the figure.

Run: ``python benchmarks/replay_speed.py`` (the full size, at least 1,000 calls), or
``python benchmarks/replay_speed.py --train 40 --val 40 --epochs 2 --json out.json``.
``python -m benchmarks run`` reports the full-size figure among its overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGET_S = 10.0
"""The issue's bound on the replayed fit's wall time."""

TARGET_CALLS = 1000
"""The size the target is stated for."""

DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_EPOCHS = 168, 168, 3
"""The full size: (168 + 168) x 3 = 1,008 forward calls plus backward and optimizer
calls."""

AGENT = """
import afnio
from afnio import cognitive as cog
from afnio.optim import TGD
from afnio.utils.data import Dataset

PROMPT = "Classify the sentiment of the message: positive, negative or neutral."
CUES = [
    ("refund", "negative"),
    ("broken", "negative"),
    ("love", "positive"),
    ("thanks", "positive"),
    ("schedule", "neutral"),
    ("invoice", "neutral"),
]
PLACES = ["heater", "lift", "garden", "lobby", "gym", "parking", "roof"]


def messages(n, offset=0):
    \"\"\"``n`` distinct support messages with their sentiment labels.\"\"\"
    rows = []
    for i in range(offset, offset + n):
        cue, label = CUES[i % len(CUES)]
        place = PLACES[(i // len(CUES)) % len(PLACES)]
        rows.append((f"Ticket {i} about the {place}: {cue} please.", label))
    return rows


class Messages(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        text, label = self.rows[i]
        return (
            afnio.Variable(text, role="input message"),
            afnio.Variable(label, role="output sentiment"),
        )


class Classifier(cog.Module):
    def __init__(self, client, model):
        super().__init__()
        self.system_prompt = cog.Parameter(
            PROMPT, role="system prompt for sentiment classification"
        )
        self.register_buffer(
            "user_template", afnio.Variable("{message}", role="message template")
        )
        self.client = client
        self.completion_args = {"model": model, "temperature": 0}
        self.chat = cog.ChatCompletion()
        self.exact_match = cog.ExactMatchEvaluator()

    def forward(self, messages):
        chat = [
            {"role": "system", "content": [self.system_prompt]},
            {"role": "user", "content": [self.user_template]},
        ]
        return self.chat(
            self.client, chat, inputs={"message": messages}, **self.completion_args
        )

    def _step(self, batch):
        messages, sentiment = batch
        score, explanation = self.exact_match(self(messages), sentiment)
        return {
            "loss": (score, explanation),
            "accuracy": score.data / len(sentiment.data),
        }

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return TGD(
            [self.system_prompt], model_client=self.client, **self.completion_args
        )
"""

TEST = """
import json
import os
import time
from pathlib import Path

import afnio
import pytest
from afnio.models.openai import OpenAI
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader

from app.agent import Classifier, Messages, messages

TRAIN = int(os.environ["FIT_TRAIN"])
VAL = int(os.environ["FIT_VAL"])
EPOCHS = int(os.environ["FIT_EPOCHS"])
OUT = Path(os.environ["APP_OUT"])


def rounded(value):
    # afnio sums costs in the order concurrent calls answer: the last bits vary
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


@pytest.mark.afnio_replay
def test_fit(tmp_path):
    client = OpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY
    afnio.set_backward_model_client(
        client, completion_args={"model": "afnio-sim-1", "temperature": 0}
    )
    agent = Classifier(client, "afnio-sim-1")
    train = DataLoader(Messages(messages(TRAIN)), batch_size=16, shuffle=True, seed=0)
    val = DataLoader(Messages(messages(VAL, offset=TRAIN)), batch_size=16)
    trainer = Trainer(
        max_epochs=EPOCHS,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_checkpointing=False,
    )
    started = time.perf_counter()
    trainer.fit(agent, train, val)
    seconds = time.perf_counter() - started
    result = {
        "fit_s": seconds,
        "prompt": agent.system_prompt.data,
        "history": rounded(trainer.history),
        "total_cost": rounded(trainer.total_cost),
    }
    (OUT / "fit.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
"""

BLOCKER = """
import os
import socket

_LOG = os.environ.get("AFNIO_BLOCK_LOG")
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _refuse(address):
    if isinstance(address, tuple):
        host, port = address[0], address[1]
    else:
        host, port = address, ""
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(f"{host}:{port}\\n")
    raise OSError(f"sitecustomize blocked a connection to {host}:{port}")


def connect(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    _refuse(address)


def connect_ex(self, address):
    if self.family == socket.AF_UNIX:
        return _connect_ex(self, address)
    _refuse(address)


if _LOG:
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.create_connection = lambda address, *a, **k: _refuse(address)
    socket.getaddrinfo = lambda host, port, *a, **k: _refuse((host, port))
"""

_DROPPED_PREFIXES = ("OPENAI_", "LANGSMITH_", "LANGCHAIN_", "PYTEST_", "AFNIO_")


@dataclass(frozen=True)
class ReplaySpeed:
    """One measurement: the size, what the cassette holds, and the times."""

    train: int
    val: int
    epochs: int
    interactions: int
    record_s: float
    """The recording run's wall time (the pytest process, against the simulator)."""
    replay_fit_s: float
    """``Trainer.fit``'s wall time in the replay, timed by the user's test."""
    replay_process_s: float
    """The replay run's wall time (the pytest process: imports, load, fit)."""
    blocked: list[str]
    """Connection attempts the socket blocker refused during the replay."""
    same_result: bool
    """Whether the replay ended with the recorded prompt, history and cost."""

    @property
    def met(self) -> bool:
        return (
            self.replay_fit_s < TARGET_S
            and self.interactions >= TARGET_CALLS
            and not self.blocked
            and self.same_result
        )


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without provider, tracing and pytest variables (as a user's CI
    has it), with ``LITELLM_LOCAL_MODEL_COST_MAP`` set."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_DROPPED_PREFIXES) and not name.endswith("_API_KEY")
    }
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def write_project(root: Path) -> Path:
    """The user project: ``app/agent.py``, ``tests/test_fit.py``, a ``pytest.ini``
    and an empty root ``conftest.py`` (so ``app`` is importable)."""
    return write_files(
        root,
        {
            "pytest.ini": "[pytest]\naddopts = -p no:cacheprovider\n",
            "conftest.py": "",
            "app/__init__.py": "",
            "app/agent.py": AGENT,
            "tests/test_fit.py": TEST,
        },
    )


def write_files(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path under ``root``: dedented text) into ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


def _pytest(
    project: Path, out: Path, env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=project,
        env={**env, "APP_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(
            f"pytest {' '.join(args)} failed in {project}:\n"
            f"{(run.stdout + run.stderr)[-4000:]}"
        )
    return run, seconds


def measure(
    root: Path,
    train: int = DEFAULT_TRAIN,
    val: int = DEFAULT_VAL,
    epochs: int = DEFAULT_EPOCHS,
) -> ReplaySpeed:
    """Record the user project's fit in ``root`` against the simulator, replay it
    with sockets blocked, and return the figures.

    Raises:
        RuntimeError: a run failed (its output is in the message).
    """
    import yaml

    project = write_project(root / "project")
    env = clean_env(FIT_TRAIN=str(train), FIT_VAL=str(val), FIT_EPOCHS=str(epochs))
    _, record_s = _pytest(project, root / "record", env, "--afnio-record=new")
    site = root / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    log = root / "blocked.log"
    log.write_text("", encoding="utf-8")
    blocked_env = {**env, "PYTHONPATH": str(site), "AFNIO_BLOCK_LOG": str(log)}
    _, replay_s = _pytest(project, root / "replay", blocked_env)
    cassette = project / "tests" / "cassettes" / "test_fit" / "test_fit.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    interactions = len(
        yaml.load(cassette.read_text("utf-8"), Loader=loader)["interactions"]
    )
    recorded = json.loads((root / "record" / "fit.json").read_text("utf-8"))
    replayed = json.loads((root / "replay" / "fit.json").read_text("utf-8"))
    same = all(recorded[k] == replayed[k] for k in ("prompt", "history", "total_cost"))
    return ReplaySpeed(
        train=train,
        val=val,
        epochs=epochs,
        interactions=interactions,
        record_s=record_s,
        replay_fit_s=replayed["fit_s"],
        replay_process_s=replay_s,
        blocked=log.read_text("utf-8").split(),
        same_result=same,
    )


def summary(result: ReplaySpeed) -> str:
    """The figure, one line, and the verdict."""
    verdict = "met" if result.met else "MISSED"
    return (
        f"replayed fit: {result.interactions} LM calls in {result.replay_fit_s:.2f} s "
        f"(process {result.replay_process_s:.1f} s; recording took "
        f"{result.record_s:.1f} s; blocked connections {len(result.blocked)}; same "
        f"result {result.same_result})\n"
        f"target (>= {TARGET_CALLS} calls replayed in < {TARGET_S:.0f} s, offline, "
        f"same result): {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN)
    parser.add_argument("--val", type=int, default=DEFAULT_VAL)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    for name in ("train", "val", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    with tempfile.TemporaryDirectory(prefix="afnio-replay-") as tmp:
        result = measure(Path(tmp), args.train, args.val, args.epochs)
    print(summary(result), flush=True)
    if args.json is not None:
        payload: dict[str, Any] = {**asdict(result), "met": result.met}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0 if result.met else 1


if __name__ == "__main__":
    raise SystemExit(main())
