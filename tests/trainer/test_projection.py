"""Projecting a run's LM calls and tokens from a pilot run's profile: rates and
arguments, and the acceptance check on Facility Support (a profile taken from a
batch-16, 1-epoch pilot projects a batch-8, 3-epoch run within 20%, in both
backward modes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from afnio.models.phases import PhaseRow
from afnio.trainer.projection import RunProfile, project
from tests.trainer._facility import data_root, fit, needs_dataset


def test_rates_are_per_sample_and_per_step() -> None:
    rows = [
        PhaseRow("forward", "m", 40, 4000, 40, 0.04),
        PhaseRow("evaluator", "m", 40, 8000, 400, 0.08),
        PhaseRow("backward", "m", 15, 6000, 300, 0.06),
        PhaseRow("optimizer", "m", 4, 800, 100, 0.02),
    ]
    profile = RunProfile.from_rows(rows, train_samples=30, val_samples=10, steps=4)
    assert profile.rates["forward"].calls_per_unit == 1.0
    assert profile.rates["backward"].calls_per_unit == 0.5  # per training sample
    assert profile.rates["optimizer"].prompt_tokens_per_call == 200
    run = project(
        profile, n_train=60, n_val=20, epochs=2, batch_size=15, validate_first=False
    )
    assert run.by_phase["forward"].calls == 2 * 60 + 2 * 20
    assert run.by_phase["evaluator"].calls == 160
    assert run.by_phase["backward"].calls == 60
    assert run.by_phase["optimizer"].calls == 2 * 4
    assert run.calls == 160 + 160 + 60 + 8
    assert run.cost == pytest.approx(160 * 0.001 + 160 * 0.002 + 60 * 0.004 + 8 * 0.005)
    assert "projected: 388 LM calls" in str(run)


def test_project_checks_its_arguments() -> None:
    profile = RunProfile.from_rows([], train_samples=1, val_samples=0, steps=1)
    with pytest.raises(ValueError, match="`n_train`, `epochs` and `batch_size`"):
        project(profile, n_train=10, epochs=0)
    with pytest.raises(ValueError, match="`steps` must be >= 0"):
        RunProfile.from_rows([], train_samples=1, val_samples=0, steps=-1)


@needs_dataset
@pytest.mark.parametrize("mode", ["upstream", "cheap"])
def test_a_pilot_profile_projects_another_configuration_within_20_percent(
    tmp_path: Path, mode: str
) -> None:
    root = data_root(tmp_path)
    pilot = fit(root, tmp_path, batch=16, epochs=1, mode=mode)
    rows, n_train, n_val = pilot.rows, pilot.n_train, pilot.n_val
    profile = RunProfile.from_rows(
        rows,
        train_samples=n_train,
        val_samples=n_val,
        steps=math.ceil(n_train / 16),
        failure_rate=1 - pilot.history[0]["train_accuracy"],
        backward=mode,
        tokenizer=lambda text: len(text.split()),  # the simulator's tokens
    )
    projected = project(profile, n_train=n_train, n_val=n_val, epochs=3, batch_size=8)
    measured = fit(
        root, tmp_path, batch=8, epochs=3, validate_first=True, mode=mode
    ).rows
    calls = sum(r.calls for r in measured)
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in measured)
    projected_tokens = projected.prompt_tokens + projected.completion_tokens
    report = f"{mode}: projected {projected.calls} calls / {projected_tokens} tokens, "
    report += f"measured {calls} / {tokens}"
    print(report)
    assert abs(projected.calls - calls) <= 0.2 * calls, report
    assert abs(projected_tokens - tokens) <= 0.2 * tokens, report
