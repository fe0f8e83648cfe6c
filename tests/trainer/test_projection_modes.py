"""Projecting from a pilot that grouped its chat backward (issue 23): the backward
calls are projected per expected group of failed samples of a batch, not per
training sample, when the pilot's failure rate is known; the projection says which
backward mode it assumes."""

from __future__ import annotations

import math

import pytest

import afnio
from afnio.autodiff.options import CHEAP, UPSTREAM
from afnio.models.phases import PhaseRow
from afnio.trainer.projection import (
    RunProfile,
    describe_backward,
    expected_groups,
    project,
)


def groups(batch: int, p: float, n: int = 8) -> float:
    return sum(
        math.comb(batch, k) * p**k * (1 - p) ** (batch - k) * math.ceil(k / n)
        for k in range(batch + 1)
    )


# a cheap pilot: 64 training samples at batch 16 (4 steps), half failing
PILOT = [
    PhaseRow("forward", "m", 128, 12_800, 128, 0.0),
    PhaseRow("backward", "m", 6, 8_000, 1_920, 0.0),  # about 4 x 1.6 groups
    PhaseRow("optimizer", "m", 4, 2_000, 200, 0.0),
]


def test_expected_groups_count_ceil_k_over_n_per_batch() -> None:
    assert expected_groups([16, 16, 4], 0.5, 8) == pytest.approx(
        2 * groups(16, 0.5) + groups(4, 0.5)
    )
    assert expected_groups([32], 1.0, 8) == 4
    assert expected_groups([32], 0.0, 8) == 0


def test_a_grouped_pilot_projects_backward_calls_per_group() -> None:
    profile = RunProfile.from_rows(
        PILOT,
        train_samples=64,
        val_samples=64,
        steps=4,
        failure_rate=0.5,
        batch_size=16,
        backward="cheap",
    )
    assert profile.backward_options == CHEAP
    per_group = 6 / (4 * groups(16, 0.5))
    run = project(
        profile, n_train=64, n_val=0, epochs=2, batch_size=4, validate_first=False
    )
    # batch 4: a group for nearly every batch (about 15 x 2), where scaling per
    # sample would give 2 x 4
    expected = per_group * 2 * 16 * groups(4, 0.5)
    assert run.by_phase["backward"].calls == round(expected)
    assert run.by_phase["backward"].calls > 3 * 8
    # the samples' part of the tokens scales per sample, the frame per call
    assert run.by_phase["backward"].completion_tokens == 2 * 1_920
    assert run.by_phase["backward"].prompt_tokens > 2 * 8_000
    assert run.backward == CHEAP
    assert "backward mode: cheap" in str(run)
    # the same configuration as the pilot reproduces its figures
    same = project(profile, n_train=64, epochs=1, batch_size=16, validate_first=False)
    assert same.by_phase["backward"].calls == 6
    assert same.by_phase["backward"].prompt_tokens == 8_000


def test_without_a_failure_rate_or_in_per_sample_mode_calls_scale_per_sample() -> None:
    for kwargs in (
        {"backward": "cheap"},
        {"backward": "upstream", "failure_rate": 0.5},
    ):
        profile = RunProfile.from_rows(
            PILOT, train_samples=64, val_samples=0, steps=4, **kwargs
        )
        assert profile.grouped is None
        run = project(profile, n_train=64, epochs=2, batch_size=4)
        assert run.by_phase["backward"].calls == 12
    with afnio.backward_options("cheap"):  # the active options by default
        profile = RunProfile.from_rows(
            PILOT, train_samples=64, val_samples=0, steps=4, failure_rate=0.5
        )
    assert profile.backward_options == CHEAP and profile.grouped is not None


def test_the_profile_checks_its_new_arguments() -> None:
    with pytest.raises(ValueError, match="`failure_rate` must be between 0 and 1"):
        RunProfile.from_rows(
            PILOT, train_samples=64, val_samples=0, steps=4, failure_rate=2.0
        )
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        RunProfile.from_rows(
            PILOT, train_samples=64, val_samples=0, steps=4, batch_size=0
        )
    with pytest.raises(ValueError, match="`backward` must be"):
        RunProfile.from_rows(
            PILOT, train_samples=64, val_samples=0, steps=4, backward="fast"
        )


def test_describe_backward_names_the_mode() -> None:
    assert describe_backward(UPSTREAM).startswith("upstream (LM-written")
    assert describe_backward(CHEAP).startswith("cheap (direct evaluator feedback")
