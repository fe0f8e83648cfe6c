"""A killed and resumed fit over a shuffled ``JsonlDataset`` writes the uninterrupted
fit's run log (issue 22, review finding 4).

The run of ``benchmarks/resume_kills.py`` (the sentiment classifier against the
bundled simulator, each attempt a forked child that SIGKILLs itself at its chosen
moment and resumes with ``fit(ckpt_path="last")``), with its training data streamed
from a JSONL file through a shuffle buffer (``buffer_size=5``, batches of 3: 3, 3, 2
rows per epoch). A checkpoint taken mid-epoch holds buffered rows; the resumed run's
``samples`` of every step (``indices`` and ``indexed_by: "dataset"``) and its
feedback's sample numbers must be the uninterrupted run's, as every other field
(``resume`` records and timestamps aside; costs may differ in the interrupted step).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, JsonlDataset
from benchmarks import resume_kills
from benchmarks.resume_kills import MESSAGES, Kill
from examples.facility_support import SentimentClassifier

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

BUFFER, BATCH = 5, 3


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text, label in rows:
            row = {"text": text, "urgency": "low", "sentiment": label}
            f.write(json.dumps({**row, "categories": "{}"}) + "\n")
    return path


def _stream(path: Path, buffer_size: int) -> JsonlDataset:
    """Samples shaped like ``resume_kills.Messages``'s: ``(message, (urgency,
    sentiment, categories))``."""
    return JsonlDataset(
        path,
        input="text",
        target=("urgency", "sentiment", "categories"),
        roles={"text": "input email or message"},
        buffer_size=buffer_size,
        seed=3,
    )


def _fit_streamed(root: Path, base_url: str, kill: Kill | None, result: Path) -> None:
    """``resume_kills._fit`` with JSONL loaders: one attempt (in a child)."""
    http = resume_kills._arm(kill) if kill is not None else httpx.AsyncClient()
    client = OpenAI(
        base_url=base_url, api_key="sk-test", max_retries=0, http_client=http
    )
    afnio.set_backward_model_client(client, completion_args={"model": SIMULATOR_MODEL})
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    data = root.parent / f"{root.name}-data"
    data.mkdir(exist_ok=True)
    train_path = _write(data / "train.jsonl", MESSAGES[:8])
    val_path = _write(data / "val.jsonl", MESSAGES[8:])
    train = DataLoader(_stream(train_path, BUFFER), batch_size=BATCH)
    val = DataLoader(_stream(val_path, 1), batch_size=4)
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
    )
    resume = "last" if (root / "checkpoints" / "last").exists() else None
    trainer.fit(agent, train, val, ckpt_path=resume)
    run_log = trainer.run_log_path.read_text("utf-8").splitlines()
    result.write_text(
        json.dumps(
            {
                "history": trainer.history,
                "run_log": [json.loads(line) for line in run_log],
                "prompt": agent.system_prompt.data,
                "total_cost": trainer.total_cost,
                "max_step_cost": trainer._max_step_cost,
                "max_eval_cost": trainer._max_eval_cost,
            }
        ),
        "utf-8",
    )


@contextlib.contextmanager
def _streamed() -> Iterator[None]:
    """The harness's attempts fit over the JSONL loaders."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resume_kills, "_fit", _fit_streamed)
        yield


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


@pytest.fixture(scope="module")
def full(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with _streamed():
        outcome, kills = resume_kills.run(
            tmp_path_factory.mktemp("full") / "run", sim.base_url, iter(()), 0
        )
    assert kills == []
    return outcome


def _steps(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in outcome["run_log"] if r["type"] == "step"]


def test_the_uninterrupted_streamed_run_log_indexes_every_step_by_row(
    full: dict[str, Any],
) -> None:
    steps = _steps(full)
    assert [(s["epoch"], s["batch"]) for s in steps] == [
        (e, b) for e in (1, 2) for b in range(3)
    ]
    for epoch in (1, 2):
        rows = [
            i for s in steps if s["epoch"] == epoch for i in s["samples"]["indices"]
        ]
        assert sorted(rows) == list(range(8))  # each row once per epoch
    assert all(s["samples"]["indexed_by"] == "dataset" for s in steps)
    orders = [
        [i for s in steps[k : k + 3] for i in s["samples"]["indices"]] for k in (0, 3)
    ]
    assert orders[0] != list(range(8)) and orders[0] != orders[1]  # shuffled


@pytest.mark.parametrize(
    "kills",
    [
        # each resumes from a checkpoint taken after batch 0 or 1 of an epoch,
        # whose stream position holds rows in the shuffle buffer
        pytest.param([Kill("fsync", 4)], id="mid-save of a checkpoint of epoch 1"),
        pytest.param([Kill("request", 14)], id="mid-step 2 of epoch 1"),
        pytest.param([Kill("request", 30)], id="mid-step 2 of epoch 2"),
        pytest.param(
            [Kill("request", 12), Kill("fsync", 3)], id="two kills in epoch 1"
        ),
    ],
)
def test_a_resumed_streamed_run_log_equals_the_uninterrupted_one(
    sim: Simulator, full: dict[str, Any], tmp_path: Path, kills: list[Kill]
) -> None:
    with _streamed():
        outcome, happened = resume_kills.run(
            tmp_path / "run", sim.base_url, iter(kills), len(kills)
        )
    assert happened == kills  # every kill fired
    resumes = [r for r in outcome["run_log"] if r["type"] == "resume"]
    assert resumes, "the run resumed from a checkpoint"
    # mid-epoch: after batch 0 or 1 of 3, with rows left in the shuffle buffer
    assert all(r["batch"] in (0, 1) for r in resumes), resumes
    # the point of the test: the steps done after the resume index their samples
    # by row, as the uninterrupted run does
    want = [s["samples"] for s in _steps(full)]
    assert [s["samples"] for s in _steps(outcome)] == want
    feedback = [
        [[item.get("samples") for item in p["feedback"]] for p in s["params"]]
        for s in _steps(outcome)
    ]
    assert feedback == [
        [[item.get("samples") for item in p["feedback"]] for p in s["params"]]
        for s in _steps(full)
    ]
    assert resume_kills.run_log_differences(full, outcome, len(happened)) == []
    assert resume_kills.differences(full, outcome, len(happened)) == []
