"""afnio's exceptions.

::

    AfnioError                      base of every error afnio raises on purpose
     ├── SerializationError         (also ValueError) a file afnio.load refuses:
     │                              not afnio's format, corrupted, or hostile
     ├── BackwardParseError         (also RuntimeError) the backward model's answer
     │    │                         could not be used after the retries
     │    └── GradientCountError    (also ValueError) ... it had the wrong number of
     │                              gradients
     ├── JudgeParseError            (also RuntimeError) an LM judge's answer was not
     │                              the expected JSON after the retries
     └── StepError                  (also RuntimeError) a Trainer step (training,
                                    validation, test) failed: at once for an error
                                    that retrying cannot fix, or after the retries
                                    of a transient one; the original is __cause__

Where the upstream contract promises a builtin exception, afnio's error subclasses
both, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import suppress

__all__ = [
    "AfnioError",
    "BackwardParseError",
    "GradientCountError",
    "JudgeParseError",
    "SerializationError",
    "StepError",
    "error_text",
    "is_provider_error",
    "note_client",
    "request_url",
    "tag_sample",
]


class AfnioError(Exception):
    """Base class of afnio's own errors."""


class SerializationError(AfnioError, ValueError):
    """``afnio.load`` refused a file (not afnio's format, corrupted, or unsafe), or
    ``afnio.save`` met a value it cannot store."""


class BackwardParseError(AfnioError, RuntimeError):
    """The backward model's answer could not be parsed as the gradients JSON after
    ``BACKWARD_PASS_MAX_RETRIES`` retries. ``node`` names the graph node."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class GradientCountError(BackwardParseError, ValueError):
    """The backward model kept returning a number of gradients different from the
    number of variables it was asked about."""


class JudgeParseError(AfnioError, RuntimeError):
    """An LM judge's answer was not ``{"score", "explanation"}`` JSON after the
    retries."""


_SAMPLE_ATTR = "_afnio_sample"


def tag_sample(
    error: BaseException,
    *,
    dataset: str,
    index: int | Sequence[int],
    stage: str | None = None,
) -> BaseException:
    """Mark ``error`` as tied to row ``index`` of ``dataset`` (e.g. ``"trainset"``,
    ``2``), or to one of several rows (a sequence of indices: a batch whose call
    failed without saying for which row), and optionally to a ``stage`` of the step
    (``"metric"``, ``"forward"``...). The error keeps its type; when it ends a
    :class:`~afnio.trainer.Trainer` step, the :class:`StepError` names the row.
    Returns ``error``; re-raise it with a bare ``raise`` (``raise ... from`` would
    change its cause). An error tagged already keeps its first tag (the innermost
    is the most precise).
    """
    if getattr(error, _SAMPLE_ATTR, None) is None:
        rows = (index,) if isinstance(index, int) else tuple(int(i) for i in index)
        with suppress(AttributeError):  # an exception class with __slots__: no tag
            setattr(error, _SAMPLE_ATTR, (dataset, rows, stage))
    return error


def sample_of(
    error: BaseException,
) -> tuple[str, tuple[int, ...], str | None] | None:
    """The ``(dataset, rows, stage)`` :func:`tag_sample` put on ``error`` or on an
    exception it was raised from, else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        tag = getattr(current, _SAMPLE_ATTR, None)
        if tag is not None:
            return tag
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def error_text(error: BaseException) -> str:
    """``"<Type>: <message>"`` for people. A ``KeyError``'s ``str()`` is the
    ``repr`` of its argument, which turns a sentence (LangChain's "Input to
    ChatPromptTemplate is missing variables ...") into a quoted string with escaped
    quotes and ``\\n``: a ``KeyError`` whose argument is a sentence shows it as
    plain text (a bare key keeps its quotes: ``KeyError: 'label'``). Notes added
    with ``add_note`` (e.g. which client failed) to it or to the exceptions it was
    raised from follow, one per line."""
    args = error.args
    if (
        isinstance(error, KeyError)
        and len(args) == 1
        and isinstance(args[0], str)
        and (" " in args[0].strip() or "\n" in args[0])
    ):
        message = args[0].strip()
    else:
        message = str(error).strip()
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    notes: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # the causes' notes too
        seen.add(id(current))
        for note in getattr(current, "__notes__", ()):
            if isinstance(note, str) and note not in notes:
                notes.append(note)
        current = current.__cause__ or current.__context__
    return "\n".join([text, *notes])


_SHOWN_ROWS = 5
"""How many row numbers a :class:`StepError` lists before it only counts them."""


def _rows_text(rows: Sequence[int]) -> str:
    """``"0, 1, 2"``; a long list as its first :data:`_SHOWN_ROWS` numbers and the
    count: ``"0, 1, 2, 3, 4, ... (24 rows)"``."""
    if len(rows) <= _SHOWN_ROWS + 1:
        return ", ".join(str(i) for i in rows)
    shown = ", ".join(str(i) for i in rows[:_SHOWN_ROWS])
    return f"{shown}, ... ({len(rows)} rows)"


class StepError(AfnioError, RuntimeError):
    """A :class:`~afnio.trainer.Trainer` step failed.

    The Trainer retries only transient failures (a connection error or timeout, a
    429 or 5xx answer, an LM answer afnio could not use); anything else (a bug in a
    metric, a wrong input, a 400/401/404 answer) ends the run at once. Either way
    the step raises a ``StepError`` (a ``RuntimeError``, as upstream's "failed after
    3 retries" error was; afnio's says "failed after 3 attempts") whose ``__cause__``
    is the original exception, keeping its type for ``except`` clauses that look at
    ``e.__cause__``. A failure tied to several rows (a batch call that did not say
    which row failed) lists the first five and the count.

    Attributes:
        phase: ``"training step"``, ``"validation"``, ``"validation (revert
            check)"`` or ``"test"``.
        stage: where in the step, when known: ``"forward"`` (the agent's
            ``*_step`` method), ``"metric"``, ``"backward"`` or ``"optimizer"``.
        dataset: the dataset the failing row belongs to (``"trainset"``,
            ``"valset"``), when the agent tagged it (:func:`tag_sample`).
        sample_index: that row's index, when the failure is tied to one row.
        samples: the candidate rows (one, or the rows of a batch that failed
            without saying which).
        batch_index: the batch's index in its loader, when known.
        attempts: how many times the step ran (1: not retried).
        transient: whether the failure was a transient one (retried until the
            attempts ran out).
    """

    def __init__(
        self,
        error: BaseException,
        *,
        phase: str,
        stage: str | None = None,
        batch_index: int | None = None,
        attempts: int = 1,
        transient: bool = False,
    ) -> None:
        tag = sample_of(error)
        self.error = error
        self.phase = phase
        self.dataset = tag[0] if tag else None
        self.samples: tuple[int, ...] = tag[1] if tag else ()
        self.sample_index = self.samples[0] if len(self.samples) == 1 else None
        self.stage = (tag[2] if tag and tag[2] else None) or stage
        self.batch_index = batch_index
        self.attempts = attempts
        self.transient = transient
        super().__init__(self._message())

    def _where(self) -> str:
        parts = []
        if self.stage == "metric":
            parts.append("in the metric")
        elif self.stage is not None:
            parts.append(f"in the {self.stage} pass")
        if self.dataset is not None and len(self.samples) == 1:
            parts.append(f"on {self.dataset}[{self.samples[0]}]")
        elif self.dataset is not None and self.samples:
            parts.append(f"on one of {self.dataset}[{_rows_text(self.samples)}]")
        if self.batch_index is not None:
            parts.append(f"(batch {self.batch_index})")
        return " ".join(parts)

    def _message(self) -> str:
        where = self._where()
        head = f"The {self.phase} failed"
        if self.transient:
            head += f" after {self.attempts} attempts,"
        head += f" {where}" if where else ""
        head = head.rstrip(",")
        text = f"{head}: {error_text(self.error)}"
        if not self.transient:
            text += (
                "\n(Not retried: only transient failures are: connection errors, "
                "timeouts, 429 and 5xx answers, LM answers afnio could not use.)"
            )
        return text


CLIENT_NOTE = "LM client: "
"""How the note naming the client of a failed LM request starts (see
:func:`note_client`)."""


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from (``__cause__``, else
    ``__context__``), each once (internal; also used by the Trainer)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_provider_error(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) came from an LM
    provider's SDK or the network: a ``ConnectionError`` or ``TimeoutError``, any
    ``openai``/``anthropic`` ``APIError`` (any status), an ``httpx`` error, a
    ``requests`` or ``aiohttp`` client error. Only SDKs already imported are looked
    at."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("openai", "APIError"),
        ("anthropic", "APIError"),
        ("httpx", "HTTPError"),
        ("requests.exceptions", "RequestException"),
        ("aiohttp", "ClientError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            kinds.append(cls)
    return any(isinstance(e, tuple(kinds)) for e in error_chain(error))


def request_url(error: BaseException) -> str | None:
    """The URL of the HTTP request that failed, as ``error`` (or an exception it was
    raised from) tells it: the ``request.url`` of an openai/anthropic/httpx error,
    else a ``requests`` error's. ``None`` when no exception says. The URL is as
    sent: mask it (``afnio._secrets.mask_url``) before showing it."""
    for e in error_chain(error):
        try:  # httpx's .request raises RuntimeError when it was never set
            request = getattr(e, "request", None)
            url = getattr(request, "url", None)
        except Exception:
            continue
        if url is not None and str(url):
            return str(url)
    return None


def note_client(error: BaseException, description: str) -> None:
    """Add the note ``"LM client: <description>"`` to ``error`` (e.g. ``"afnio's
    backward client OpenAI(base_url='http://127.0.0.1:8000/v1', ...)"``), unless it
    or an exception it was raised from names its client already (the innermost
    note, nearest to the request, wins). :func:`error_text` and
    :class:`StepError` show it."""
    for e in error_chain(error):
        notes = getattr(e, "__notes__", ())
        if any(isinstance(n, str) and n.startswith(CLIENT_NOTE) for n in notes):
            return
    error.add_note(CLIENT_NOTE + description)
