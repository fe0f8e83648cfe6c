"""Project the LM calls, tokens and cost of a training run before making it.

A :class:`RunProfile` holds per-unit rates, by phase (forward, evaluator, backward,
optimizer): LM calls per sample (forward and evaluator calls per sample run,
backward calls per training sample, which folds in how often samples fail), LM calls
per optimizer step, and prompt/completion tokens and cost per call. Take it from a
pilot run (:meth:`RunProfile.from_rows` with ``trainer.phase_rows()`` of a ``fit``
on a small configuration, or of the same program on a cheaper model) and
:func:`project` any other configuration: dataset sizes, epochs, batch size, with or
without a validation pass per epoch.

Example::

    >>> profile = RunProfile.from_rows(
    ...     [PhaseRow("forward", "m", 20, 2000, 40, 0.02),
    ...      PhaseRow("backward", "m", 10, 4000, 300, 0.05),
    ...      PhaseRow("optimizer", "m", 2, 600, 80, 0.01)],
    ...     train_samples=10, val_samples=10, steps=2)
    >>> p = project(profile, n_train=100, n_val=20, epochs=3, batch_size=10)
    >>> p.calls, p.by_phase["forward"].calls, p.by_phase["optimizer"].calls
    (710, 380, 30)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from afnio.models.phases import PHASES, PhaseRow

__all__ = ["PhaseProjection", "PhaseRate", "RunProfile", "RunProjection", "project"]


@dataclass(frozen=True)
class PhaseRate:
    """One phase of a profile: calls per unit (sample or step) and averages per call."""

    calls_per_unit: float
    prompt_tokens_per_call: float
    completion_tokens_per_call: float
    cost_per_call: float


@dataclass(frozen=True)
class RunProfile:
    """Rates by phase (see the module docstring). Units: ``forward`` and
    ``evaluator`` per sample run (training and validation), ``backward`` per
    training sample, ``optimizer`` per optimizer step."""

    rates: dict[str, PhaseRate]

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[PhaseRow],
        *,
        train_samples: int,
        val_samples: int,
        steps: int,
    ) -> RunProfile:
        """A profile from a pilot's phase rows (e.g. ``trainer.phase_rows()``) and
        what the pilot ran: training samples (over all its epochs), validation
        samples, optimizer steps."""
        for name, value in (
            ("train_samples", train_samples),
            ("val_samples", val_samples),
            ("steps", steps),
        ):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        totals: dict[str, list[float]] = {}
        for row in rows:
            t = totals.setdefault(row.phase, [0, 0, 0, 0.0])
            t[0] += row.calls
            t[1] += row.prompt_tokens
            t[2] += row.completion_tokens
            t[3] += row.cost
        units = {
            "forward": train_samples + val_samples,
            "evaluator": train_samples + val_samples,
            "backward": train_samples,
            "optimizer": steps,
        }
        rates = {}
        for phase, (calls, prompt, completion, cost) in totals.items():
            unit = units.get(phase, 0)
            if not calls or not unit:
                continue
            rates[phase] = PhaseRate(
                calls / unit, prompt / calls, completion / calls, cost / calls
            )
        return cls(rates)


@dataclass(frozen=True)
class PhaseProjection:
    """The projected calls, tokens and cost of one phase."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


@dataclass(frozen=True)
class RunProjection:
    """A projected run: totals and ``by_phase``."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    by_phase: dict[str, PhaseProjection] = field(default_factory=dict)

    @classmethod
    def of_phases(cls, by_phase: dict[str, PhaseProjection], **fields: Any) -> Self:
        """A run whose totals are the sums of ``by_phase`` (``fields``: a
        subclass's own)."""
        return cls(
            calls=sum(p.calls for p in by_phase.values()),
            prompt_tokens=sum(p.prompt_tokens for p in by_phase.values()),
            completion_tokens=sum(p.completion_tokens for p in by_phase.values()),
            cost=sum(p.cost for p in by_phase.values()),
            by_phase=by_phase,
            **fields,
        )

    def __str__(self) -> str:
        lines = [
            f"projected: {self.calls} LM calls, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion tokens, ${self.cost:.4f}"
        ]
        lines += [
            f"  {phase}: {p.calls} calls, {p.prompt_tokens} + {p.completion_tokens} "
            f"tokens, ${p.cost:.4f}"
            for phase, p in self.by_phase.items()
        ]
        return "\n".join(lines)


def project(
    profile: RunProfile,
    *,
    n_train: int,
    n_val: int = 0,
    epochs: int = 1,
    batch_size: int = 1,
    validate_first: bool = True,
) -> RunProjection:
    """The calls, tokens and cost of ``epochs`` over ``n_train`` samples in batches
    of ``batch_size`` (one optimizer step per batch), with a validation pass over
    ``n_val`` samples after each epoch (and one before, with ``validate_first``)."""
    if epochs < 1 or batch_size < 1 or n_train < 1 or n_val < 0:
        raise ValueError(
            "`n_train`, `epochs` and `batch_size` must be >= 1 and `n_val` >= 0."
        )
    train = epochs * n_train
    val = (epochs + (1 if validate_first else 0)) * n_val if n_val else 0
    units = {
        "forward": train + val,
        "evaluator": train + val,
        "backward": train,
        "optimizer": epochs * math.ceil(n_train / batch_size),
    }
    by_phase = {}
    for phase in PHASES:
        rate = profile.rates.get(phase)
        if rate is None:
            continue
        calls = round(rate.calls_per_unit * units[phase])
        by_phase[phase] = PhaseProjection(
            calls,
            round(calls * rate.prompt_tokens_per_call),
            round(calls * rate.completion_tokens_per_call),
            calls * rate.cost_per_call,
        )
    return RunProjection.of_phases(by_phase)
