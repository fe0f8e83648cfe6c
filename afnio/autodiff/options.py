"""How a backward pass makes its LM-written feedback: :class:`BackwardOptions`.

Two choices, both off by default (upstream's behaviour):

* ``evaluator_feedback``: ``"lm"`` (an LM call writes a deterministic evaluator's
  feedback on each failed sample, as upstream does) or ``"direct"`` (the evaluator
  writes it itself from the prediction, the target, the metric's name and score: no
  LM call, no LM round). An LM judge's feedback stays LM-written in both modes.
* ``chat_samples_per_call``: ``1`` (one chat-backward call per sample, as upstream
  does) or ``n > 1`` (the samples of a backward pass that went through the same
  prompt template share a call, at most ``n`` per call, the groups sent at once).

The active options live in a context variable: ``with afnio.backward_options(...)``
sets them for the block, and every backward pass started in it (also through
``Trainer.fit`` or from another thread's ``run_sync``, which carries the caller's
context to afnio's loop) reads them. ``optimize()`` (LangChain) and ``AfnioTGD``
(DSPy) run their fit inside ``backward_options("cheap")`` unless told otherwise.

Example::

    >>> import afnio
    >>> afnio.get_backward_options()
    BackwardOptions(evaluator_feedback='lm', chat_samples_per_call=1)
    >>> with afnio.backward_options("cheap") as options:
    ...     options.chat_samples_per_call
    8
    >>> with afnio.backward_options(evaluator_feedback="direct"):
    ...     afnio.get_backward_options().evaluator_feedback
    'direct'
    >>> afnio.get_backward_options().evaluator_feedback
    'lm'
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from afnio.autodiff import config

__all__ = [
    "CHEAP",
    "UPSTREAM",
    "BackwardOptions",
    "backward_options",
    "get_backward_options",
    "resolve_backward_options",
]

EvaluatorFeedback = Literal["lm", "direct"]
_FEEDBACK_MODES = ("lm", "direct")
_PRESETS = ("upstream", "cheap")


def check_evaluator_feedback(value: object, name: str = "evaluator_feedback") -> str:
    """``value`` if it is ``"lm"`` or ``"direct"``; else a ``ValueError`` naming
    ``name``."""
    if not isinstance(value, str) or value not in _FEEDBACK_MODES:
        raise ValueError(
            f'`{name}` must be "lm" (an LM call writes the evaluator\'s feedback, '
            'upstream\'s behaviour) or "direct" (the evaluator writes it itself, no LM '
            f"call), got {value!r}."
        )
    return value


def _check_samples_per_call(value: object, name: str = "chat_samples_per_call") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be an int >= 1 (1 = one chat-backward call per sample), "
            f"got {type(value).__name__}: {value!r}."
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be >= 1 (1 = one chat-backward call per sample, n = at "
            f"most n samples per call), got {value!r}."
        )
    return value


@dataclass(frozen=True)
class BackwardOptions:
    """How a backward pass makes its feedback (see the module docstring).

    Attributes:
        evaluator_feedback: ``"lm"`` (upstream: an LM writes a deterministic
            evaluator's gradient) or ``"direct"`` (the evaluator writes it, no LM
            call).
        chat_samples_per_call: how many samples' chat-backward feedback one call may
            ask for (``1``, upstream: one call per sample; the default is
            :data:`afnio.autodiff.config.CHAT_BACKWARD_SAMPLES_PER_CALL`).

    Raises:
        ValueError, TypeError: a value outside these (the message names it).
    """

    evaluator_feedback: EvaluatorFeedback = "lm"
    chat_samples_per_call: int = config.CHAT_BACKWARD_SAMPLES_PER_CALL

    def __post_init__(self) -> None:
        check_evaluator_feedback(self.evaluator_feedback)
        _check_samples_per_call(self.chat_samples_per_call)


UPSTREAM: BackwardOptions = BackwardOptions()
"""Upstream's behaviour: LM-written evaluator feedback, one chat-backward call per
sample (the core API's default)."""

CHEAP: BackwardOptions = BackwardOptions("direct", config.CHEAP_SAMPLES_PER_CALL)
"""The cheapest step: direct evaluator feedback, chat-backward calls grouped by
prompt template (at most ``config.CHEAP_SAMPLES_PER_CALL`` samples per call); the
default of ``optimize()`` and ``AfnioTGD``."""

_ACTIVE: contextvars.ContextVar[BackwardOptions] = contextvars.ContextVar(
    "afnio_backward_options", default=UPSTREAM
)


def get_backward_options() -> BackwardOptions:
    """The active :class:`BackwardOptions` (``UPSTREAM`` outside any
    :func:`backward_options` block)."""
    return _ACTIVE.get()


def resolve_backward_options(
    value: BackwardOptions | str | None, name: str = "backward"
) -> BackwardOptions:
    """``"upstream"``/``"cheap"`` -> the preset, a :class:`BackwardOptions` as it is,
    ``None`` -> the active options.

    Callers with their own default (``optimize(backward="cheap")``) pass it in.

    Raises:
        ValueError: an unknown preset name (the message names ``name``).
        TypeError: any other type.
    """
    if value is None:
        return get_backward_options()
    if isinstance(value, BackwardOptions):
        return value
    if isinstance(value, str):
        if value == "upstream":
            return UPSTREAM
        if value == "cheap":
            return CHEAP
        raise ValueError(
            f'`{name}` must be "cheap", "upstream" or an afnio.BackwardOptions, got '
            f"{value!r}."
        )
    raise TypeError(
        f'`{name}` must be "cheap", "upstream" or an afnio.BackwardOptions(...), got '
        f"{type(value).__name__}: {value!r}."
    )


@contextlib.contextmanager
def backward_options(
    options: BackwardOptions | Literal["upstream", "cheap"] | None = None,
    *,
    evaluator_feedback: EvaluatorFeedback | None = None,
    chat_samples_per_call: int | None = None,
) -> Iterator[BackwardOptions]:
    """Set the backward options for the block (restored after it, also on error).

    Args:
        options: a preset (``"upstream"``, ``"cheap"``), a
            :class:`BackwardOptions`, or ``None`` (start from the active ones).
        evaluator_feedback, chat_samples_per_call: override one field.

    Yields:
        the options now active.

    Example::

        >>> import afnio
        >>> with afnio.backward_options("cheap", chat_samples_per_call=4) as o:
        ...     (o.evaluator_feedback, o.chat_samples_per_call)
        ('direct', 4)
    """
    base = resolve_backward_options(options, "options")
    changes: dict[str, object] = {}
    if evaluator_feedback is not None:
        changes["evaluator_feedback"] = evaluator_feedback
    if chat_samples_per_call is not None:
        changes["chat_samples_per_call"] = chat_samples_per_call
    active = dataclasses.replace(base, **changes) if changes else base
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)
