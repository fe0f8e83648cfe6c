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

A pilot that ran with grouped chat backward (``BackwardOptions.chat_samples_per_call``
``n > 1``, e.g. inside ``afnio.backward_options("cheap")``) does not make its
chat-backward calls per failed sample but per group of at most ``n`` failed samples
of a batch: give :meth:`RunProfile.from_rows` the pilot's ``failure_rate`` (and its
``backward`` options, default the active ones) and the backward calls are projected
per expected group (``ceil(k / n)`` for ``k`` failed samples of a batch, ``k`` a
binomial draw), the backward prompt tokens as a part per call (the grouped prompt's
instructions) plus a part per failed sample. Without a failure rate they scale per
training sample, as for per-sample mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from afnio.autodiff.options import BackwardOptions, resolve_backward_options
from afnio.models.phases import PHASES, PhaseRow

__all__ = [
    "PhaseProjection",
    "PhaseRate",
    "RunProfile",
    "RunProjection",
    "describe_backward",
    "project",
]


def describe_backward(options: BackwardOptions) -> str:
    """One line saying what a run's backward does under ``options``.

    >>> from afnio.autodiff.options import CHEAP, UPSTREAM
    >>> describe_backward(UPSTREAM)
    'upstream (LM-written evaluator feedback, one chat-backward call per sample)'
    >>> describe_backward(CHEAP)
    'cheap (direct evaluator feedback, up to 8 samples per chat-backward call)'
    """
    from afnio.autodiff.options import CHEAP, UPSTREAM

    feedback = (
        "LM-written evaluator feedback"
        if options.evaluator_feedback == "lm"
        else "direct evaluator feedback"
    )
    n = options.chat_samples_per_call
    chat = (
        "one chat-backward call per sample"
        if n == 1
        else f"up to {n} samples per chat-backward call"
    )
    name = {UPSTREAM: "upstream", CHEAP: "cheap"}.get(options, "custom")
    return f"{name} ({feedback}, {chat})"


def _binomial(n: int, p: float) -> list[float]:
    """P(k of n samples fail), k = 0..n (in log space: no overflow for large n)."""
    if p <= 0.0:
        return [1.0] + [0.0] * n
    if p >= 1.0:
        return [0.0] * n + [1.0]
    log_p, log_q = math.log(p), math.log1p(-p)
    return [
        math.exp(
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * log_p
            + (n - k) * log_q
        )
        for k in range(n + 1)
    ]


def expected_groups(
    batch_sizes: Iterable[int], failure_rate: float, per_call: int
) -> float:
    """The expected number of grouped calls over batches of ``batch_sizes``: a batch
    with ``k`` failed samples (a binomial draw) makes ``ceil(k / per_call)``."""
    total = 0.0
    cache: dict[int, float] = {}
    for size in batch_sizes:
        if size not in cache:
            cache[size] = sum(
                prob * math.ceil(k / per_call)
                for k, prob in enumerate(_binomial(size, failure_rate))
            )
        total += cache[size]
    return total


def _batches(n_train: int, batch_size: int) -> list[int]:
    full, rest = divmod(n_train, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _group_call_tokens(tokenizer: Callable[[str], int]) -> float:
    """Prompt tokens every grouped chat-backward call sends whatever its samples:
    the system prompt and the user prompt's frame (3 tokens per message)."""
    from afnio.autodiff.prompts import (
        CHAT_BACKWARD_GROUP_SYSTEM,
        CHAT_BACKWARD_GROUP_USER,
    )

    frame = CHAT_BACKWARD_GROUP_USER
    for name in ("shared", "variables", "calls"):
        frame = frame.replace("{" + name + "}", "")
    return tokenizer(CHAT_BACKWARD_GROUP_SYSTEM) + tokenizer(frame) + 2 * 3


@dataclass(frozen=True)
class _GroupedBackward:
    """A grouped pilot's backward: calls per expected group, prompt tokens per call
    (the frame) and per training sample (the samples' part), completion tokens and
    cost per training sample."""

    calls_per_group: float
    prompt_tokens_per_call: float
    prompt_tokens_per_sample: float
    completion_tokens_per_sample: float
    cost_per_token: float
    failure_rate: float
    per_call: int


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
    training sample, ``optimizer`` per optimizer step. ``backward_options``: the
    pilot's :class:`~afnio.autodiff.options.BackwardOptions` (a projection assumes
    the same); ``grouped``: the grouped-backward model (see the module docstring),
    when the pilot grouped its chat backward and its failure rate is known."""

    rates: dict[str, PhaseRate]
    backward_options: BackwardOptions | None = None
    grouped: _GroupedBackward | None = None

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[PhaseRow],
        *,
        train_samples: int,
        val_samples: int,
        steps: int,
        failure_rate: float | None = None,
        batch_size: int | None = None,
        backward: BackwardOptions | str | None = None,
        tokenizer: Callable[[str], int] | None = None,
    ) -> RunProfile:
        """A profile from a pilot's phase rows (e.g. ``trainer.phase_rows()``) and
        what the pilot ran: training samples (over all its epochs), validation
        samples, optimizer steps.

        Args:
            failure_rate: the share of the pilot's training samples that failed
                (``1 -`` its training accuracy). With grouped chat backward it lets
                the backward calls be projected per group (see the module
                docstring); else unused.
            batch_size: the pilot's batch size (default ``train_samples / steps``).
            backward: the options the pilot ran with (``"cheap"``, ``"upstream"``
                or :class:`~afnio.autodiff.options.BackwardOptions`; default the
                active ones, read now).
            tokenizer: counts the grouped prompt's frame (default
                :func:`afnio.trainer.estimate.approx_tokens`; pass the model's).
        """
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
        if failure_rate is not None and not 0.0 <= failure_rate <= 1.0:
            raise ValueError(
                f"`failure_rate` must be between 0 and 1, got {failure_rate!r}."
            )
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size < 1
        ):
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        options = resolve_backward_options(backward)
        rates = {}
        for phase, (calls, prompt, completion, cost) in totals.items():
            unit = units.get(phase, 0)
            if not calls or not unit:
                continue
            rates[phase] = PhaseRate(
                calls / unit, prompt / calls, completion / calls, cost / calls
            )
        grouped = None
        back = totals.get("backward")
        per_call = options.chat_samples_per_call
        if (
            per_call > 1
            and failure_rate
            and back
            and back[0]
            and train_samples
            and steps
        ):
            size = batch_size or max(1, round(train_samples / steps))
            groups = expected_groups(
                _batches(train_samples, size), failure_rate, per_call
            )
            if groups > 0:
                if tokenizer is None:
                    from afnio.trainer.estimate import approx_tokens as tokenizer
                calls, prompt, completion, cost = back
                frame = min(_group_call_tokens(tokenizer), prompt / calls)
                tokens = prompt + completion
                grouped = _GroupedBackward(
                    calls_per_group=calls / groups,
                    prompt_tokens_per_call=frame,
                    prompt_tokens_per_sample=(prompt - frame * calls) / train_samples,
                    completion_tokens_per_sample=completion / train_samples,
                    cost_per_token=cost / tokens if tokens else 0.0,
                    failure_rate=failure_rate,
                    per_call=per_call,
                )
        return cls(rates, options, grouped)


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
    backward: BackwardOptions | None = None
    """The backward options the figures assume (``None``: not known)."""

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
        if self.backward is not None:
            lines.append(f"  backward mode: {describe_backward(self.backward)}")
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
    ``n_val`` samples after each epoch (and one before, with ``validate_first``),
    in the backward mode the pilot ran in (``profile.backward_options``; the
    result's ``backward``)."""
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
        grouped = profile.grouped
        if phase == "backward" and grouped is not None:
            groups = epochs * expected_groups(
                _batches(n_train, batch_size), grouped.failure_rate, grouped.per_call
            )
            exact = grouped.calls_per_group * groups
            prompt = (
                exact * grouped.prompt_tokens_per_call
                + train * grouped.prompt_tokens_per_sample
            )
            completion = train * grouped.completion_tokens_per_sample
            by_phase[phase] = PhaseProjection(
                round(exact),
                round(prompt),
                round(completion),
                (prompt + completion) * grouped.cost_per_token,
            )
            continue
        calls = round(rate.calls_per_unit * units[phase])
        by_phase[phase] = PhaseProjection(
            calls,
            round(calls * rate.prompt_tokens_per_call),
            round(calls * rate.completion_tokens_per_call),
            calls * rate.cost_per_call,
        )
    return RunProjection.of_phases(by_phase, backward=profile.backward_options)
