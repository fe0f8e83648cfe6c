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
context to afnio's loop) reads them. It is a ``with`` block only, not a decorator;
a thread you start in the block sees the options only if it runs in a copy of the
block's context (``contextvars.copy_context().run``; see
:class:`backward_options`). ``optimize()`` (LangChain) and ``AfnioTGD``
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

import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Literal, NoReturn

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


class backward_options:  # lower case: used like a function (as torch.no_grad)
    """Set the backward options for a ``with`` block (restored after it, also on
    error).

    Use it only as ``with afnio.backward_options(...):`` (or ``async with``). It is
    not a decorator: applied to a function it raises a ``TypeError`` (a decorated
    ``async def`` would only have covered the creation of its coroutine, not its
    run); open the block inside the function instead.

    The options live in a context variable: code awaited or called inside the block
    sees them, and so does every backward pass started in it, also through
    ``run_sync``/``Trainer.fit`` (afnio carries the caller's context to its loop). A
    ``threading.Thread`` (or an executor's worker) that you start inside the block
    does **not** see them: a new thread starts with an empty context. Run its target
    in a copy of the block's context::

        with afnio.backward_options("cheap"):
            ctx = contextvars.copy_context()
            threading.Thread(target=ctx.run, args=(train_step,)).start()

    Args:
        options: a preset (``"upstream"``, ``"cheap"``), a
            :class:`BackwardOptions`, or ``None`` (start from the options active when
            this is called).
        evaluator_feedback, chat_samples_per_call: override one field.

    Entering yields the options now active. The arguments are checked when
    ``backward_options(...)`` is called.

    Raises:
        ValueError, TypeError: an invalid argument (the message names it).

    Example::

        >>> import afnio
        >>> with afnio.backward_options("cheap", chat_samples_per_call=4) as o:
        ...     (o.evaluator_feedback, o.chat_samples_per_call)
        ('direct', 4)
    """

    __slots__ = ("_tokens", "options")

    def __init__(
        self,
        options: BackwardOptions | Literal["upstream", "cheap"] | None = None,
        *,
        evaluator_feedback: EvaluatorFeedback | None = None,
        chat_samples_per_call: int | None = None,
    ) -> None:
        base = resolve_backward_options(options, "options")
        changes: dict[str, object] = {}
        if evaluator_feedback is not None:
            changes["evaluator_feedback"] = evaluator_feedback
        if chat_samples_per_call is not None:
            changes["chat_samples_per_call"] = chat_samples_per_call
        self.options: BackwardOptions = (
            dataclasses.replace(base, **changes) if changes else base
        )
        self._tokens: list[contextvars.Token[BackwardOptions]] = []

    def __enter__(self) -> BackwardOptions:
        self._tokens.append(_ACTIVE.set(self.options))
        return self.options

    def __exit__(self, *exc_info: object) -> None:
        _ACTIVE.reset(self._tokens.pop())

    async def __aenter__(self) -> BackwardOptions:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)

    def __call__(self, func: object) -> NoReturn:
        name = getattr(func, "__qualname__", None) or repr(func)
        raise TypeError(
            "afnio.backward_options(...) is a context manager, not a decorator "
            f"(applied to {name}): open it with `with afnio.backward_options(...):` "
            "inside the function (a decorated `async def` would not have run with "
            "the options)."
        )

    def __repr__(self) -> str:
        return f"backward_options({self.options!r})"
