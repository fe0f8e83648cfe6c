"""Shared by the trainer tests: fit the Facility Support example classifier against
the simulator (the dataset copied from ../shared into a temporary root)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio.models.openai import OpenAI
from afnio.models.phases import LEDGER, PhaseRow
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from afnio.utils.datasets import FacilitySupport
from examples.facility_support import START_PROMPT, SentimentClassifier

SHARED = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "facility-support"
)
needs_dataset = pytest.mark.skipif(
    not (SHARED / "dataset.json").exists(),
    reason="../shared/data is not available (a fresh clone): the check needs the "
    "Facility Support dataset",
)


def data_root(tmp: Path) -> Path:
    root = tmp / "data"
    raw = root / "FacilitySupport" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "dataset.json", raw / "dataset.json")
    return root


@dataclass
class FitRun:
    rows: list[PhaseRow]
    n_train: int
    n_val: int
    history: list[dict[str, Any]]
    estimate: Any  # what trainer.estimate said before the run (if asked)
    prompt_before: str
    prompt_after: str


def fit(
    root: Path,
    tmp: Path,
    batch: int,
    epochs: int,
    validate_first: bool = False,
    estimate_kwargs: dict[str, Any] | None = None,
) -> FitRun:
    train = FacilitySupport("train", root=root, download=False)
    val = FacilitySupport("val", root=root, download=False)
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        agent = SentimentClassifier(client, SIMULATOR_MODEL, START_PROMPT)
        trainer = Trainer(
            max_epochs=epochs,
            default_root_dir=tmp / f"b{batch}e{epochs}",
            enable_progress_bar=False,
            enable_agent_summary=False,
            enable_checkpointing=False,
        )
        train_loader = DataLoader(train, batch_size=batch, shuffle=True, seed=0)
        val_loader = DataLoader(val, batch_size=len(val))
        estimate = None
        if estimate_kwargs is not None:
            estimate = trainer.estimate(
                agent, train_loader, val_loader, **estimate_kwargs
            )
            assert sim.stats.calls == 0  # the estimate spent nothing
        start = LEDGER.snapshot()
        if validate_first:
            trainer.validate(agent, val_loader)
        history = trainer.fit(agent, train_loader, val_loader)
        return FitRun(
            LEDGER.since(start),
            len(train),
            len(val),
            history,
            estimate,
            START_PROMPT,
            agent.system_prompt.data,
        )
