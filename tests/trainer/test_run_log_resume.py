"""A killed and resumed run's log equals the uninterrupted run's: the lines of the
interrupted work are cut off at the checkpoint and written again by the redo
(``resume`` records and timestamps aside; costs differ only in the interrupted
step)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afnio.testing import Simulator
from benchmarks import resume_kills
from benchmarks.resume_kills import Kill

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


@pytest.fixture(scope="module")
def full(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    outcome, kills = resume_kills.run(
        tmp_path_factory.mktemp("full"), sim.base_url, iter(()), 0
    )
    assert kills == []
    return outcome


def _types(outcome: dict[str, Any]) -> list[str]:
    return [r["type"] for r in outcome["run_log"]]


def test_the_uninterrupted_run_log_has_one_record_per_step_and_validation(
    full: dict[str, Any],
) -> None:
    epoch = ["step", "step", "validation"]
    assert _types(full) == ["header", *epoch * resume_kills.EPOCHS, "end"]


@pytest.mark.parametrize(
    ("kills", "resumes"),
    [
        pytest.param([Kill("request", 12)], 1, id="mid-step (backward or optimizer)"),
        pytest.param([Kill("request", 30)], 1, id="mid-step of the second epoch"),
        pytest.param([Kill("fsync", 3)], 1, id="step logged, its checkpoint not saved"),
        # the first checkpoint written, "last" not yet: the run starts afresh
        pytest.param([Kill("replace", 2)], 0, id="checkpoint saved, pointer not moved"),
        pytest.param([Kill("validation", 2)], 1, id="mid-validation"),
        pytest.param(
            [Kill("epoch_end", 1)],
            1,
            id="validation logged, epoch checkpoint not saved",
        ),
        pytest.param(
            [Kill("request", 20), Kill("fsync", 2), Kill("epoch_end", 2)],
            3,
            id="three kills in one run",
        ),
    ],
)
def test_a_resumed_run_log_equals_the_uninterrupted_one(
    sim: Simulator,
    full: dict[str, Any],
    tmp_path: Path,
    kills: list[Kill],
    resumes: int,
) -> None:
    outcome, happened = resume_kills.run(tmp_path, sim.base_url, iter(kills), 3)
    assert happened == kills  # every kill fired
    assert resume_kills.run_log_differences(full, outcome, len(happened)) == []
    assert resume_kills.differences(full, outcome, len(happened)) == []
    # a resume from a checkpoint leaves a record marking an exact cut (the
    # checkpoint stored the log's length); a later resume from the same
    # checkpoint cuts an earlier record away
    records = [r for r in outcome["run_log"] if r["type"] == "resume"]
    assert 0 < len(records) <= resumes if resumes else records == []
    assert all(r["exact"] is True for r in records)
    assert _types(outcome).count("header") == 1


def test_seeded_random_kills_leave_the_uninterrupted_run_log(
    sim: Simulator, full: dict[str, Any], tmp_path: Path
) -> None:
    kills = resume_kills.plan(seed=11)
    total = 0
    for run in range(2):
        outcome, happened = resume_kills.run(
            tmp_path / str(run), sim.base_url, kills, 3
        )
        total += len(happened)
        assert resume_kills.run_log_differences(full, outcome, len(happened)) == []
    assert total > 0


def test_the_run_log_comparison_sees_a_repeated_or_changed_record(
    full: dict[str, Any],
) -> None:
    # what an untruncated log would look like: the interrupted step twice
    doubled = copy.deepcopy(full)
    step = next(r for r in doubled["run_log"] if r["type"] == "step")
    doubled["run_log"].insert(2, copy.deepcopy(step))
    assert resume_kills.run_log_differences(full, doubled, 1)
    changed = copy.deepcopy(full)
    step = next(r for r in changed["run_log"] if r["type"] == "step")
    step["params"][0]["before"] += " (changed)"
    assert resume_kills.run_log_differences(full, changed, 1)
    # costs: one record per kill may differ
    costly = copy.deepcopy(full)
    for record in [r for r in costly["run_log"] if r["type"] == "step"][:2]:
        record["cost"]["step_usd"] += 1e-6
    assert resume_kills.run_log_differences(full, costly, 2) == []
    assert resume_kills.run_log_differences(full, costly, 1)
