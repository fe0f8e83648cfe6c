"""What the Trainer prints (issue 18, item 4): nothing on stdout when its displays
are off, and, when they are on, the scores named as such (the loss is a score, and
ExactMatch's is the batch's *sum*) rather than a "loss" that rises as the agent
improves. Runs on the live simulator (loopback), as tests/trainer/test_trainer.py."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from benchmarks.two_stage import simulated
from examples.facility_support import SentimentClassifier
from tests import _console


@pytest.fixture
def agent() -> Iterator[SentimentClassifier]:
    """The example classifier on a live simulator."""
    with simulated() as (_, client):
        yield SentimentClassifier(client, SIMULATOR_MODEL)


@pytest.fixture
def wide_plain_console(monkeypatch: pytest.MonkeyPatch) -> None:
    _console.wide_plain_console(monkeypatch)


def _loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=0)
    val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
    return train, val


def _lines(text: str) -> list[str]:
    return _console.plain_lines(text)


def _bar_lines(text: str, label: str) -> list[str]:
    return [line for line in _lines(text) if line.startswith(label)]


# -- silence --------------------------------------------------------------------------


def test_a_quiet_trainer_prints_nothing_on_stdout_in_fit_validate_and_test(
    agent: SentimentClassifier,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    train, val = _loaders()
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
    )
    history = trainer.fit(agent, train, val)
    result = trainer.validate(agent, val)
    tested = trainer.test(agent, val)
    out = capfd.readouterr().out
    assert out == ""
    # the figures are all still there
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(
        history[-1]
    )
    assert "val_accuracy" in result and "test_accuracy" in tested
    assert trainer.total_cost > 0 and trainer.phase_rows()


def test_a_quiet_trainer_logs_a_budget_stop_instead_of_printing_it(
    agent: SentimentClassifier,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    train, val = _loaders()
    trainer = Trainer(
        max_epochs=3,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
        max_cost=0.0005,
    )
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        trainer.fit(agent, train, val)
    assert capfd.readouterr().out == ""
    assert trainer.stopped_reason is not None
    assert trainer.stopped_reason in caplog.text


def test_without_the_progress_bar_no_epoch_lines_but_the_run_summary_by_default(
    agent: SentimentClassifier,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    wide_plain_console: None,
) -> None:
    train, val = _loaders()
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
    )
    trainer.validate(agent, val)
    trainer.fit(agent, train, val)
    lines = _lines(capfd.readouterr().out)
    assert not [line for line in lines if line.startswith(("Epoch", "Validation"))]
    assert not [line for line in lines if line.startswith(("[Training]", "[Valid"))]
    text = "\n".join(lines)
    assert "Run summary" in text and "LM calls by phase" in text


# -- what the displays show ----------------------------------------------------------


def test_the_progress_bar_and_summary_show_scores_named_as_such(
    agent: SentimentClassifier,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    wide_plain_console: None,
) -> None:
    train, val = _loaders()
    trainer = Trainer(
        max_epochs=2, default_root_dir=tmp_path, enable_agent_summary=False
    )
    history = trainer.fit(agent, train, val)
    out = capfd.readouterr().out
    lines = _lines(out)
    assert [line for line in lines if line.startswith("Epoch")] == [
        "Epoch 1/2",
        "Epoch 2/2",
    ]
    training = _bar_lines(out, "[Training]")
    validation = _bar_lines(out, "[Validation]")
    assert len(training) == 2 and len(validation) == 2
    for line in training + validation:
        assert "loss" not in line
        assert re.search(r"score: \d+\.\d{4} accuracy: \d\.\d{4} cost: \$\d", line)
    # the bar shows the epoch's means, as the history keeps them (under their keys)
    last = validation[-1]
    assert f"score: {history[-1]['val_loss']:.4f}" in last
    assert f"accuracy: {history[-1]['val_accuracy']:.4f}" in last
    summary = "\n".join(
        lines[lines.index(next(x for x in lines if "Run summary" in x)) :]
    )
    assert f"val_accuracy={history[-1]['val_accuracy']:.4f}" in summary
    assert f"train_score={history[-1]['train_loss']:.4f}" in summary
    assert "_loss=" not in summary


def test_show_metrics_chooses_what_the_bar_shows_and_keeps_the_history(
    agent: SentimentClassifier,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    wide_plain_console: None,
) -> None:
    train, val = _loaders()
    trainer = Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_agent_summary=False,
        show_metrics=["accuracy"],
    )
    history = trainer.fit(agent, train, val)
    out = capfd.readouterr().out
    for line in _bar_lines(out, "[Training]") + _bar_lines(out, "[Validation]"):
        assert re.search(r"\] \S+ \S+ accuracy: \d\.\d{4} cost: \$\d", line), line
        assert "score" not in line and "loss" not in line
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(
        history[0]
    )


def test_show_metrics_must_name_metrics() -> None:
    assert Trainer(show_metrics=["accuracy"]).show_metrics == ("accuracy",)
    assert Trainer().show_metrics is None
    with pytest.raises(TypeError, match="show_metrics"):
        Trainer(show_metrics="accuracy")
    with pytest.raises(TypeError, match="show_metrics"):
        Trainer(show_metrics=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="show_metrics"):
        Trainer(show_metrics=5)  # type: ignore[arg-type]
    # a generator is read once, and kept
    assert Trainer(show_metrics=(k for k in ["accuracy"])).show_metrics == ("accuracy",)


@pytest.mark.parametrize(
    ("keys", "shown", "expected"),
    [
        (["loss", "accuracy"], None, [("loss", "score"), ("accuracy", "accuracy")]),
        (["accuracy", "loss"], None, [("loss", "score"), ("accuracy", "accuracy")]),
        (["loss", "score"], None, [("loss", "loss_score"), ("score", "score")]),
        (["loss", "score"], ["score"], [("score", "score")]),
        (["loss", "accuracy"], ["accuracy", "missing"], [("accuracy", "accuracy")]),
        (
            ["loss", "accuracy", "reverted"],
            ["reverted", "loss"],
            [
                ("reverted", "reverted"),
                ("loss", "score"),
            ],
        ),
    ],
)
def test_metric_labels_name_the_loss_a_score(
    keys: list[str], shown: list[str] | None, expected: list[tuple[str, str]]
) -> None:
    from afnio.trainer.trainer import _metric_labels

    assert _metric_labels(keys, shown) == expected


def test_progress_and_history_texts() -> None:
    from afnio.trainer.trainer import _history_text, _progress_text

    collected: dict[str, list[Any]] = {"loss": [2, 4], "accuracy": [0.5, 1.0]}
    assert _progress_text(collected, None, 0.01234) == (
        "score: 3.0000 accuracy: 0.7500 cost: $0.0123"
    )
    assert _progress_text(collected, ["accuracy"], 0.0) == (
        "accuracy: 0.7500 cost: $0.0000"
    )
    assert _progress_text({"note": ["text"]}, None, 0.0) == "cost: $0.0000"
    row = {
        "epoch": 2,
        "train_loss": 12.0,
        "train_accuracy": 0.75,
        "val_loss": 26.0,
        "val_accuracy": 0.8125,
        "total_cost": 0.0123,
    }
    assert _history_text(row, None) == (
        "train_score=12.0000 train_accuracy=0.7500 val_score=26.0000 "
        "val_accuracy=0.8125 total_cost=$0.0123"
    )
    assert _history_text(row, ["accuracy"]) == (
        "train_accuracy=0.7500 val_accuracy=0.8125 total_cost=$0.0123"
    )
