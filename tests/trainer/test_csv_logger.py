"""CSVLogger: ``metrics_steps.csv``, one row per optimizer step and per validation,
with a stable header; a resumed fit keeps the rows of its checkpoint."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest

from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.trainer.loggers import CSVLogger
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _run_log_helpers

FIXED = [
    "type",
    "kind",
    "step",
    "epoch",
    "batch",
    "reverted",
    "cost_usd",
    "total_usd",
    "cost_forward_usd",
    "cost_evaluator_usd",
    "cost_backward_usd",
    "cost_optimizer_usd",
]


sim, client = _run_log_helpers.sim, _run_log_helpers.client  # the fixtures


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(path.read_text("utf-8")))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_csv_logger_writes_one_row_per_step_and_validation(
    client: OpenAI, tmp_path: Path
) -> None:
    train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=3)
    val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
    )
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    trainer.fit(agent, train, val)
    trainer.test(agent, val)
    columns, rows = _rows(tmp_path / "metrics_steps.csv")
    assert columns == [
        *FIXED,
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "test_loss",
        "test_accuracy",
    ]
    assert [(r["type"], r["kind"], r["step"], r["epoch"]) for r in rows] == [
        ("step", "", "1", "1"),
        ("step", "", "2", "1"),
        ("validation", "epoch", "2", "1"),
        ("step", "", "3", "2"),
        ("step", "", "4", "2"),
        ("validation", "epoch", "4", "2"),
        ("validation", "test", "4", "2"),
    ]
    for row, epoch in zip([rows[2], rows[5]], trainer.history, strict=True):
        assert float(row["val_accuracy"]) == epoch["val_accuracy"]
    assert float(rows[5]["total_usd"]) == pytest.approx(
        trainer.history[-1]["total_cost"]
    )
    phases = [float(rows[0][f"cost_{p}_usd"]) for p in ("forward", "backward")]
    assert all(cost > 0 for cost in phases)
    assert float(rows[0]["cost_usd"]) == pytest.approx(
        sum(float(rows[0][c]) for c in FIXED[8:])
    )


def _step(step: int, **metrics: Any) -> dict[str, Any]:
    return {
        "type": "step",
        "step": step,
        "epoch": 1,
        "batch": step - 1,
        "metrics": metrics,
        "reverted": None,
        "cost": {
            "total_usd": 0.1 * step,
            "step_usd": 0.1,
            "by_phase": [{"phase": "backward", "model": "m", "cost": 0.1}],
        },
    }


def test_a_metric_first_seen_late_widens_the_header(tmp_path: Path) -> None:
    logger = CSVLogger()
    logger.start(tmp_path, {}, None)
    logger.log_step(_step(1, loss=1))
    logger.log_step(_step(2, loss=2, f1=0.5))
    logger.finish({"type": "end"})
    columns, rows = _rows(tmp_path / "metrics_steps.csv")
    assert columns == [*FIXED, "train_loss", "train_f1"]
    assert [(r["train_loss"], r["train_f1"]) for r in rows] == [("1", ""), ("2", "0.5")]
    assert rows[1]["cost_backward_usd"] == "0.1"


def test_a_resumed_csv_logger_keeps_the_rows_of_its_checkpoint(tmp_path: Path) -> None:
    logger = CSVLogger("steps.csv")
    logger.start(tmp_path, {}, None)
    logger.log_step(_step(1, loss=1))
    state = logger.state_dict()  # what a checkpoint after step 1 holds
    logger.log_step(_step(2, loss=2, f1=0.5))  # widens the file: rewritten
    logger.close()
    with open(tmp_path / "steps.csv", "a", encoding="utf-8") as f:
        f.write("step,,3,1,2")  # a torn last line of a killed process

    resumed = CSVLogger("steps.csv")
    resumed.start(tmp_path, {"resume": {"epoch": 1}}, state)
    resumed.log_step(_step(2, loss=2, f1=0.5))
    resumed.finish({"type": "end"})
    _, rows = _rows(tmp_path / "steps.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    assert rows[1]["train_f1"] == "0.5"
    assert state == {"path": "steps.csv", "rows": 1}


def test_a_csv_torn_while_written_again_is_repaired_from_the_run_log_on_resume(
    tmp_path: Path,
) -> None:
    """A kill during the rewrite that widens the header (simulated: the CSV cut
    mid-way) loses rows the CSV alone cannot bring back; the resume rebuilds them
    from the run log, which the Trainer starts (and cuts back) first."""
    from afnio.trainer.run_log import RunLogWriter

    def run(loggers: list[Any], steps: range) -> None:
        for step in steps:
            metrics: dict[str, Any] = {"loss": step}
            if step >= 3:
                metrics["f1"] = step / 10  # a late metric: the CSV is written again
            for target in loggers:
                target.log_step(_step(step, **metrics))

    whole = tmp_path / "whole"
    log, csv_logger = RunLogWriter(), CSVLogger()
    for target in (log, csv_logger):
        target.start(whole, {"max_epochs": 1}, None)
    run([log, csv_logger], range(1, 6))
    for target in (log, csv_logger):
        target.finish({"type": "end"})

    killed = tmp_path / "killed"
    log, csv_logger = RunLogWriter(), CSVLogger()
    for target in (log, csv_logger):
        target.start(killed, {"max_epochs": 1}, None)
    run([log, csv_logger], range(1, 4))
    states = (log.state_dict(), csv_logger.state_dict())  # the checkpoint
    log.close()
    csv_logger.close()
    path = killed / "metrics_steps.csv"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # killed during the rewrite

    log, csv_logger = RunLogWriter(), CSVLogger()
    log.start(killed, {"max_epochs": 1, "resume": {"epoch": 1}}, states[0])
    csv_logger.start(killed, {"max_epochs": 1, "resume": {"epoch": 1}}, states[1])
    run([log, csv_logger], range(4, 6))
    for target in (log, csv_logger):
        target.finish({"type": "end"})
    assert path.read_text("utf-8") == (whole / "metrics_steps.csv").read_text("utf-8")
    header, rows = _rows(path)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert header[-2:] == ["train_loss", "train_f1"]


def _resume_after_a_step_past_the_checkpoint(
    run_dir: Path, order: str, csv_logger: CSVLogger, writer: Any
) -> list[str]:
    """Steps 1-3 checkpointed, step 4 logged, killed; a resume (the loggers in
    ``order`` as the user gave them) redoes 4 and does 5; the CSV's step column."""
    from afnio.trainer.trainer import _logger_list

    loggers = _logger_list([csv_logger, writer] if order == "csv" else [writer])
    for target in loggers:
        target.start(run_dir, {"max_epochs": 1}, None)
    for n in (1, 2, 3):
        for target in loggers:
            target.log_step(_step(n, x=n))
    states = [target.state_dict() for target in loggers]
    for target in loggers:
        target.log_step(_step(4, x=4))
        target.close()
    fresh = [type(t)(t.filename) for t in loggers]
    resumed = _logger_list(fresh)
    assert resumed == fresh  # the run log was first already
    for target, state in zip(resumed, states, strict=True):
        target.start(run_dir, {"max_epochs": 1, "resume": {}}, state)
    for n in (4, 5):
        for target in resumed:
            target.log_step(_step(n, x=n))
    for target in resumed:
        target.finish({"type": "end", "status": "completed"})
    text = (run_dir / csv_logger.filename).read_text("utf-8")
    return [row["step"] for row in csv.DictReader(io.StringIO(text))]


def test_the_run_log_is_started_first_whatever_order_the_user_gives(
    tmp_path: Path,
) -> None:
    from afnio.trainer.loggers import JsonlLogger
    from afnio.trainer.trainer import _logger_list

    csv_logger, writer = CSVLogger(), JsonlLogger()
    assert _logger_list([csv_logger, writer]) == [writer, csv_logger]
    steps = _resume_after_a_step_past_the_checkpoint(
        tmp_path, "csv", CSVLogger(), JsonlLogger()
    )
    assert steps == ["1", "2", "3", "4", "5"]


def test_a_csv_rebuilds_from_the_trainers_own_run_log_not_a_stale_one(
    tmp_path: Path,
) -> None:
    from afnio.trainer.loggers import JsonlLogger

    # an earlier run's log under the default name, with other steps
    stale = JsonlLogger()
    stale.start(tmp_path, {"max_epochs": 1}, None)
    for n in (7, 8, 9, 10, 11, 12):
        stale.log_step(_step(n, x=n))
    stale.finish({"type": "end", "status": "completed"})
    steps = _resume_after_a_step_past_the_checkpoint(
        tmp_path, "csv", CSVLogger(), JsonlLogger("custom.jsonl")
    )
    assert steps == ["1", "2", "3", "4", "5"]
