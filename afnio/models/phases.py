"""LM calls, tokens and cost by *phase* of a training step.

Every LM call afnio (or an integration) makes is recorded in one process-wide
:data:`LEDGER` under the model's name and the phase that was current when it was made:

* ``"forward"``: the program's own calls (the default);
* ``"evaluator"``: an LM judge scoring predictions;
* ``"backward"``: the feedback (textual gradient) calls of ``backward()``;
* ``"optimizer"``: the calls of an optimizer step (TGD's rewrites).

The phase is a ``ContextVar`` set by afnio (the backward engine, the judge, TGD), so
concurrent work is attributed correctly. The Trainer prints the calls of a run by
phase and model; anyone can take :meth:`PhaseLedger.snapshot` before some work and
:meth:`PhaseLedger.since` after it.

Example::

    >>> with lm_phase("optimizer"):
    ...     current_phase()
    'optimizer'
    >>> current_phase()
    'forward'
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = [
    "LEDGER",
    "PHASES",
    "PhaseLedger",
    "PhaseRow",
    "current_phase",
    "lm_phase",
]

PHASES = ("forward", "evaluator", "backward", "optimizer")
"""The phases, in the order of a training step."""

_PHASE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "afnio_lm_phase", default="forward"
)


def current_phase() -> str:
    """The phase LM calls made now are recorded under."""
    return _PHASE.get()


@contextmanager
def lm_phase(phase: str) -> Iterator[None]:
    """Record the LM calls made inside the block under ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}.")
    token = _PHASE.set(phase)
    try:
        yield
    finally:
        _PHASE.reset(token)


@dataclass(frozen=True)
class PhaseRow:
    """Calls, tokens and cost of one model in one phase."""

    phase: str
    model: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


def _tokens(usage: Mapping[str, Any] | None, key: str) -> int:
    value = (usage or {}).get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


class _CostTotal(float):
    """A cost total of a snapshot: the exact total rounded to a float, which keeps
    the exact value (``exact``) so that :meth:`PhaseLedger.since` subtracts exactly
    (an unchanged total then gives no row, not a rounding residue)."""

    exact: Fraction

    def __new__(cls, exact: Fraction | float) -> _CostTotal:
        total = super().__new__(cls, exact)
        total.exact = Fraction(exact)
        return total


class PhaseLedger:
    """Totals by (phase, model); thread-safe. Costs are summed exactly (as
    fractions), so the totals do not depend on the order concurrent calls answer
    in: a replayed run reports the recorded run's figures bit for bit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # calls, prompt tokens, completion tokens (ints) and cost (an exact Fraction)
        self._totals: dict[tuple[str, str], list[Any]] = {}
        self._listeners: list[Callable[[PhaseRow], None]] = []

    def subscribe(self, listener: Callable[[PhaseRow], None]) -> Callable[[], None]:
        """Call ``listener(row)`` for every record from now on (``row`` holds that
        record alone); returns the function that unsubscribes it. Listeners run in
        the recording thread and must be quick; their errors are not raised."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def record(
        self,
        model: str | None,
        usage: Mapping[str, Any] | None = None,
        cost: float = 0.0,
        calls: int = 1,
        phase: str | None = None,
    ) -> None:
        """Add ``calls`` LM calls of ``model`` with their ``usage`` (OpenAI shape)
        and ``cost`` to the current phase (or ``phase``)."""
        key = (phase or current_phase(), model or "unknown")
        delta = (
            calls,
            _tokens(usage, "prompt_tokens"),
            _tokens(usage, "completion_tokens"),
            float(cost or 0.0),
        )
        exact = Fraction(delta[3]) if math.isfinite(delta[3]) else Fraction(0)
        with self._lock:
            row = self._totals.setdefault(key, [0, 0, 0, Fraction(0)])
            row[0] += delta[0]
            row[1] += delta[1]
            row[2] += delta[2]
            row[3] += exact
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(PhaseRow(*key, *delta))
            except Exception:  # a listener never breaks an LM call
                logging.getLogger("afnio.models").exception("ledger listener failed")

    def snapshot(self) -> dict[tuple[str, str], tuple[float, ...]]:
        """The totals now (to subtract later with :meth:`since`)."""
        with self._lock:
            return {k: (*v[:3], _CostTotal(v[3])) for k, v in self._totals.items()}

    def since(
        self, snapshot: Mapping[tuple[str, str], tuple[float, ...]] | None = None
    ) -> list[PhaseRow]:
        """The rows added since ``snapshot`` (everything without one), in phase
        order, without empty rows."""
        base = snapshot or {}
        with self._lock:
            totals = {k: list(v) for k, v in self._totals.items()}
        rows = []
        for (phase, model), now in totals.items():
            before = base.get((phase, model), (0, 0, 0, 0.0))
            delta = [a - b for a, b in zip(now[:3], before[:3], strict=True)]
            # subtract the snapshot's exact cost; a plain float (a snapshot copied
            # or rebuilt) is the exact total rounded: if it rounds the same, the cost
            # is unchanged (its rounding residue is no cost)
            exact = getattr(before[3], "exact", None)
            if exact is None:
                exact = Fraction(before[3])
                if float(now[3]) == float(before[3]):
                    exact = now[3]
            delta.append(now[3] - exact)
            if any(delta):
                rows.append(
                    PhaseRow(
                        phase,
                        model,
                        int(delta[0]),
                        int(delta[1]),
                        int(delta[2]),
                        float(delta[3]),
                    )
                )
        order = {p: i for i, p in enumerate(PHASES)}
        return sorted(rows, key=lambda r: (order.get(r.phase, 99), r.model))


LEDGER = PhaseLedger()
"""The process-wide ledger every LM call is recorded in."""
