"""The Trainer, on the live simulator (loopback only): loop, checkpoints, resume,
budget, retries, predict."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from benchmarks.common import simulated
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier


@pytest.fixture
def sim_client() -> Iterator[tuple[Simulator, OpenAI]]:
    with simulated() as (sim, client):
        yield sim, client


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=seed)
    val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
    return train, val


def _trainer(root: Path, epochs: int, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        **kwargs,
    )


def test_fit_improves_the_prompt_and_writes_metrics_and_checkpoints(
    sim_client: tuple[Simulator, OpenAI], tmp_path: Path
) -> None:
    _, client = sim_client
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    train, val = _loaders()
    trainer = _trainer(tmp_path, 2)
    history = trainer.fit(agent, train, val)
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"] - 1e-9
    assert "If the message mentions" in agent.system_prompt.data
    assert (
        history[-1]["total_cost"] == pytest.approx(trainer.total_cost)
        and trainer.total_cost > 0
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == history
    if importlib.util.find_spec("matplotlib") is not None:  # the optional `plot` extra
        assert (tmp_path / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.hf")) == [
        "checkpoint_epoch1.hf",
        "checkpoint_epoch2.hf",
    ]
    assert len(list((tmp_path / "checkpoints" / "epoch_1").glob("*.hf"))) == 2
    checkpoint = afnio.load(tmp_path / "checkpoints" / "checkpoint_epoch2.hf")
    assert checkpoint["epoch"] == 2 and checkpoint["batch"] is None
    assert (
        checkpoint["agent_state_dict"]["system_prompt"].data == agent.system_prompt.data
    )


def _run(
    root: Path, epochs: int, ckpt: Path | None = None
) -> tuple[SentimentClassifier, Trainer, int]:
    with simulated() as (sim, client):
        agent = SentimentClassifier(client, SIMULATOR_MODEL)
        train, val = _loaders(seed=3)
        trainer = _trainer(root, epochs)
        trainer.fit(agent, train, val, ckpt_path=ckpt)
        return agent, trainer, sim.stats.calls


def test_resume_reproduces_an_uninterrupted_run_with_only_the_remaining_calls(
    tmp_path: Path,
) -> None:
    full_agent, full, full_calls = _run(tmp_path / "full", 3)
    _, first, first_calls = _run(tmp_path / "part", 1)
    ckpt = tmp_path / "part" / "checkpoints" / "checkpoint_epoch1.hf"
    resumed_agent, resumed, resumed_calls = _run(tmp_path / "part", 3, ckpt)
    assert resumed_agent.system_prompt.data == full_agent.system_prompt.data
    # costs are float sums whose order follows which concurrent call answered first
    assert len(resumed.history) == len(full.history)
    for got, expected in zip(resumed.history, full.history, strict=True):
        assert got == pytest.approx(expected, rel=1e-9)
    assert resumed.total_cost == pytest.approx(full.total_cost)
    assert resumed_calls == full_calls - first_calls
    assert first.history[0] == pytest.approx(full.history[0], rel=1e-9)


def test_max_cost_stops_before_the_budget_with_an_intact_checkpoint(
    tmp_path: Path,
) -> None:
    _, full, _ = _run(tmp_path / "full", 3)
    budget = full.total_cost * 0.5
    with simulated() as (_, client):
        agent = SentimentClassifier(client, SIMULATOR_MODEL)
        train, val = _loaders(seed=3)
        trainer = _trainer(tmp_path / "budget", 3, max_cost=budget)
        trainer.fit(agent, train, val)
    assert trainer.stopped_reason is not None and "max_cost" in trainer.stopped_reason
    assert trainer.total_cost <= budget
    assert trainer.last_checkpoint is not None  # at least one step completed
    checkpoint = afnio.load(trainer.last_checkpoint)
    assert (
        checkpoint["agent_state_dict"]["system_prompt"].data == agent.system_prompt.data
    )
    assert checkpoint["total_cost"] <= budget


def test_revert_on_regression_validates_after_each_step(
    sim_client: tuple[Simulator, OpenAI], tmp_path: Path
) -> None:
    _, client = sim_client
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    train, val = _loaders()
    with pytest.raises(ValueError, match="needs a `val_dataloader`"):
        _trainer(tmp_path, 1, revert_on_regression=True).fit(agent, train)
    history = _trainer(tmp_path, 1, revert_on_regression=True).fit(agent, train, val)
    assert "train_reverted" in history[0]


def test_validate_test_and_predict(
    sim_client: tuple[Simulator, OpenAI], tmp_path: Path
) -> None:
    _, client = sim_client
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    _, val = _loaders()
    trainer = _trainer(tmp_path, 1)
    result = trainer.validate(agent, val)
    assert set(result) == {"val_loss", "val_accuracy", "total_cost"}
    assert trainer.test(agent, val)["test_accuracy"] == result["val_accuracy"]
    outputs = trainer.predict(agent, val)
    assert len(outputs) == 1 and outputs[0].data == ["neutral"] * 4
    assert agent.training is True and outputs[0].requires_grad is False


class Flaky(SentimentClassifier):
    failures = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if Flaky.failures > 0:
            Flaky.failures -= 1
            raise ConnectionError("LM unavailable")
        return super().training_step(batch, batch_idx)


def test_training_steps_are_retried(
    sim_client: tuple[Simulator, OpenAI], tmp_path: Path
) -> None:
    _, client = sim_client
    train, _ = _loaders()
    Flaky.failures = 2
    _trainer(tmp_path, 1).fit(Flaky(client, SIMULATOR_MODEL), train)
    Flaky.failures = 100
    with pytest.raises(RuntimeError, match="failed after 3 attempts"):
        _trainer(tmp_path, 1).fit(Flaky(client, SIMULATOR_MODEL), train)


def test_manual_optimization(
    sim_client: tuple[Simulator, OpenAI], tmp_path: Path
) -> None:
    _, client = sim_client

    class Manual(SentimentClassifier):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            out = super().training_step(batch, batch_idx)
            out["loss"][1].backward()
            optimizer.step()
            return out

    agent = Manual(client, SIMULATOR_MODEL)
    train, _ = _loaders()
    _trainer(tmp_path, 1).fit(agent, train)
    assert "If the message mentions" in agent.system_prompt.data


def test_argument_errors(sim_client: tuple[Simulator, OpenAI], tmp_path: Path) -> None:
    _, client = sim_client
    trainer = _trainer(tmp_path, 1)
    with pytest.raises(TypeError, match="`agent` must be an afnio Module"):
        trainer.fit(object(), [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`train_dataloader` is required"):
        trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL))
    with pytest.raises(TypeError, match="`ckpt_path` must be a path"):
        trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), [1], ckpt_path=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_cost`"):
        Trainer(max_cost=-1.0)
