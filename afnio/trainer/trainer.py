"""``afnio.trainer.Trainer``: fit, validate, test and predict an afnio Module.

The module implements the trainer protocol of :class:`afnio.cognitive.Module`:
``training_step``/``validation_step``/``test_step`` return ``(score, explanation)`` or
``{"loss": (score, explanation), **extra_metrics}``, and ``configure_optimizers``
returns the optimizer. With ``automatic_optimization`` (the default) the Trainer runs,
per batch: ``clear_grad``, ``training_step``, ``explanation.backward()``,
``optimizer.step()``; otherwise the module does it itself with ``self.optimizers()``.

Everything is local (difference 1): metrics are printed, kept in memory, returned, and
appended to ``<root>/metrics.jsonl`` (one JSON object per epoch), with a PNG plot when
matplotlib is installed. Checkpoints (``afnio.save`` format, no pickle) are written per
batch and per epoch under ``<root>/checkpoints/``; ``fit(ckpt_path=...)`` really resumes
(difference 8): parameters, optimizer state with momentum, the epoch and batch
position (the data order included), the metric history and the accumulated cost.
Every fit also writes the run log ``<root>/run_log.jsonl`` (each optimizer step: the
parameters before and after, their feedback and its samples, the optimizer's answer,
the cost by phase; see :mod:`afnio.trainer.run_log`) and hands its records to the
``loggers`` (:mod:`afnio.trainer.loggers`); a resume cuts them back to its checkpoint.

Example::

    trainer = Trainer(max_epochs=3, max_cost=0.50, default_root_dir="runs/sentiment")
    history = trainer.fit(agent, train_loader, val_loader)
    trainer.test(agent, test_loader)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from afnio._variable import Variable
from afnio.autodiff.grad_mode import no_grad
from afnio.cognitive.modules.module import Module
from afnio.errors import (
    SerializationError,
    StepError,
    error_chain,
    error_text,
    is_provider_error,
    note_client,
)
from afnio.models.batch import (
    BATCH_STATE_FILE,
    BatchDeferred,
    BatchOptions,
    BatchRun,
    BatchStore,
    MemoryStore,
    ReplayLoader,
    active_collector,
)
from afnio.models.model import BaseModel
from afnio.models.phases import LEDGER, PhaseRow
from afnio.models.step_memo import StepMemo, active_memo, step_memo
from afnio.serialization import load, save, write_atomic
from afnio.trainer.run_log import (
    RUN_LOG_FILE,
    SCHEMA,
    Logger,
    RunLogWriter,
    feedback_entries,
    jsonable,
    now,
    phase_json,
    prepare_record,
    text_of,
)

if TYPE_CHECKING:
    from afnio.serialization import LoadLimits
    from afnio.trainer.estimate import Assumptions, GraphShape, RunEstimate, Tokenizer

__all__ = ["BudgetExceeded", "Trainer"]

logger = logging.getLogger("afnio.trainer")


def _logger_list(loggers: Any) -> list[Logger]:
    """The loggers of ``Trainer(loggers=...)``: the defaults for ``None``, else the
    given ones with a :class:`RunLogWriter` first when they hold none."""
    from afnio.trainer.loggers import CSVLogger

    if loggers is None:
        return [RunLogWriter(), CSVLogger()]
    if isinstance(loggers, Logger) or not isinstance(loggers, Iterable):
        loggers = [loggers]
    found: list[Logger] = []
    for item in loggers:
        missing = [
            name
            for name in ("start", "log_step", "log_validation", "finish", "state_dict")
            if not callable(getattr(item, name, None))
        ]
        if missing:
            raise TypeError(
                "`loggers` must hold loggers (objects with start, log_step, "
                "log_validation, finish and state_dict, e.g. "
                f"afnio.trainer.loggers.CSVLogger()); {item!r} has no "
                f"{', '.join(missing)}."
            )
        found.append(item)
    if not any(isinstance(item, RunLogWriter) for item in found):
        found.insert(0, RunLogWriter())
    # the run log first: a resume cuts it back before the others (the CSV logger
    # rebuilds its rows from it)
    found.sort(key=lambda item: not isinstance(item, RunLogWriter))
    for item in found:  # which file a CSV logger rebuilds its rows from
        if isinstance(item, CSVLogger) and item.run_log_file is None:
            item.run_log_file = found[0].filename  # type: ignore[attr-defined]
    return found


MAX_RETRIES = 3
_LAST = "last"  # the file under checkpoints/ naming the newest checkpoint


class BudgetExceeded(Exception):
    """Raised inside the Trainer to stop before ``max_cost`` would be exceeded."""


def _mean(values: list[Any]) -> Any:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _parse_step_output(
    output: Any, method: str
) -> tuple[tuple[Variable, Variable], dict[str, Any]]:
    if isinstance(output, dict):
        if "loss" not in output:
            raise ValueError(f"{method}() returned a dict without a 'loss' key.")
        loss, extra = output["loss"], {k: v for k, v in output.items() if k != "loss"}
    else:
        loss, extra = output, {}
    if not isinstance(loss, (tuple, list)) or len(loss) != 2:
        raise ValueError(
            f"{method}() must return (score, explanation) or a dict with "
            f"'loss': (score, explanation); got {type(loss).__name__}."
        )
    score, explanation = loss
    if not isinstance(score, Variable) or not isinstance(explanation, Variable):
        raise TypeError(
            f"{method}()'s loss must be two Variables (score, explanation)."
        )
    return (score, explanation), extra


def _metric_labels(
    keys: Iterable[str], shown: Sequence[str] | None
) -> list[tuple[str, str]]:
    """``(key, label)`` of the metrics to display, in display order: the keys of
    ``shown`` that are present, or (``shown is None``) every key, ``loss`` first.
    The loss is a score (higher is better), so it is labelled ``score``
    (``loss_score`` when a metric is itself named ``score``); other metrics keep
    their key."""
    keys = list(keys)
    if shown is None:
        order = (["loss"] if "loss" in keys else []) + [k for k in keys if k != "loss"]
    else:
        order = [k for k in shown if k in keys]
    loss_label = "loss_score" if "score" in keys else "score"
    return [(key, loss_label if key == "loss" else key) for key in order]


def _progress_text(
    collected: Mapping[str, list[Any]], shown: Sequence[str] | None, cost: float
) -> str:
    """What a progress bar shows after its metrics: the means of the batches so far
    (by :func:`_metric_labels`) and the run's cost so far."""
    parts = []
    for key, label in _metric_labels(collected, shown):
        mean = _mean(collected[key])
        if mean is not None:
            parts.append(f"{label}: {mean:.4f}")
    parts.append(f"cost: ${cost:.4f}")
    return " ".join(parts)


def _history_text(row: Mapping[str, Any], shown: Sequence[str] | None) -> str:
    """An epoch's history row as displayed (``train_accuracy=0.7500 ...``): the
    ``train_``/``val_`` metrics by :func:`_metric_labels` (``train_loss`` is shown as
    ``train_score``), then ``total_cost``."""
    parts = []
    for prefix in ("train", "val"):
        metrics = {
            key[len(prefix) + 1 :]: value
            for key, value in row.items()
            if key.startswith(prefix + "_")
        }
        for key, label in _metric_labels(metrics, shown):
            value = metrics[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not math.isnan(value):
                parts.append(f"{prefix}_{label}={value:.4f}")
    cost = row.get("total_cost")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool):
        parts.append(f"total_cost=${cost:.4f}")
    return " ".join(parts)


def _batch_metrics(
    loss: tuple[Variable, Variable], extra: dict[str, Any]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"loss": loss[0].data}
    for key, value in extra.items():
        metrics[key] = value.data if isinstance(value, Variable) else value
    return metrics


def _check_checkpoint(checkpoint: Any, path: Path) -> None:
    """Raise ``SerializationError`` unless ``checkpoint`` has the shape of what
    :meth:`Trainer._checkpoint` writes (a file that ``afnio.load`` accepts may still
    hold anything)."""

    def bad(what: str) -> SerializationError:
        return SerializationError(f"{path} is not a Trainer checkpoint: {what}.")

    if not isinstance(checkpoint, dict):
        raise bad(f"it holds a {type(checkpoint).__name__}, not a dict")
    if not isinstance(checkpoint.get("agent_state_dict"), dict):
        raise bad("no agent_state_dict")
    epoch, batch = checkpoint.get("epoch"), checkpoint.get("batch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise bad(f"epoch is {epoch!r}")
    if batch is not None and (
        isinstance(batch, bool) or not isinstance(batch, int) or batch < 0
    ):
        raise bad(f"batch is {batch!r}")
    history = checkpoint.get("history")
    if history is not None and not (
        isinstance(history, list) and all(isinstance(r, dict) for r in history)
    ):
        raise bad("history is not a list of dicts")
    for key in ("total_cost", "max_step_cost", "max_eval_cost", "best_val"):
        value = checkpoint.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise bad(f"{key} is {value!r}")
    metrics = checkpoint.get("epoch_metrics")
    if metrics is not None and not (
        isinstance(metrics, dict)
        and all(isinstance(k, str) and isinstance(v, list) for k, v in metrics.items())
    ):
        raise bad("epoch_metrics is not a dict of lists")
    for key in (
        "optimizer_state_dict",
        "sampler_state",
        "spend_log",
        "data_state",
        "val_data_state",
        "batch_api_state",
        "loggers_state",
        "run_log",
    ):
        value = checkpoint.get(key)
        if value is not None and not isinstance(value, dict):
            raise bad(f"{key} is a {type(value).__name__}")


def _first_samples(dataset: Any, n: int) -> list[Any]:
    """Up to ``n`` samples from the start of ``dataset`` (an IterableDataset is read
    in a pass of its own, its position restored after, so the next epoch is the one
    it would have been)."""
    from afnio.utils.data import IterableDataset

    if not isinstance(dataset, IterableDataset):
        return [dataset[i] for i in range(min(len(dataset), n))]
    state = dataset.state_dict() if hasattr(dataset, "state_dict") else None
    try:
        samples = []
        for sample in dataset:
            if len(samples) == n:
                break
            samples.append(sample)
        return samples
    finally:
        if state is not None:
            dataset.load_state_dict(state)


def _stream_of(loader: Any) -> Any:
    """``loader`` when it is a DataLoader over an IterableDataset whose position can
    be saved (``state_dict``/``load_state_dict``, e.g. ``JsonlDataset``): its
    position after each batch goes in the checkpoints (``data_state``) and a resume
    continues from it, without reading the stream again. None otherwise (a
    map-style loader resumes through its sampler's state and skips the batches
    done)."""
    from afnio.utils.data import DataLoader, IterableDataset

    dataset = getattr(loader, "dataset", None)
    if (
        isinstance(loader, DataLoader)
        and isinstance(dataset, IterableDataset)
        and hasattr(dataset, "state_dict")
        and hasattr(dataset, "load_state_dict")
    ):
        return loader
    return None


_RETRIED_STATUS = frozenset({408, 409, 429})
"""HTTP statuses worth retrying, besides 5xx (the openai SDK retries the same)."""

# errors that retrying cannot fix; an exception of these types is transient only
# when it was explicitly raised from a transient one (``raise X from e``)
_PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    LookupError,
    TypeError,
    ValueError,
    AttributeError,
    NameError,
    ArithmeticError,
    AssertionError,
    NotImplementedError,
    ImportError,
)


def _loaded_classes(*names: tuple[str, str]) -> tuple[type[BaseException], ...]:
    """The exception classes ``module.name`` of the modules already imported (an SDK
    that was never imported raised nothing)."""
    found: list[type[BaseException]] = []
    for module, name in names:
        loaded = sys.modules.get(module)
        cls = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


_STATUS_ATTRS = ("status_code", "status", "code")


def _as_status(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 100 <= value <= 599 else None


def _status_of(error: BaseException) -> int | None:
    """The HTTP status an exception carries, whatever its library: its
    ``status_code``, ``status`` or ``code`` (an int from 100 to 599), else its
    ``response.status_code`` (``requests``, ``httpx``); ``None`` when none."""
    for name in _STATUS_ATTRS:
        try:
            status = _as_status(getattr(error, name, None))
        except Exception:  # a property that fails (httpx's .request, ...)
            status = None
        if status is not None:
            return status
    try:
        response = getattr(error, "response", None)
        return _as_status(getattr(response, "status_code", None))
    except Exception:
        return None


def _retried_status(status: int) -> bool:
    return status in _RETRIED_STATUS or status >= 500


# exceptions of LM libraries that mean "the model's answer could not be parsed"; a
# class in an exception's MRO is matched by (top-level package, class name), so the
# libraries need not be imported (or installed)
_UNUSABLE_ANSWER_CLASSES = frozenset(
    {
        ("langchain_core", "OutputParserException"),
        ("dspy", "AdapterParseError"),
    }
)
_VALIDATION_ERRORS = frozenset(
    {("pydantic_core", "ValidationError"), ("pydantic", "ValidationError")}
)
# a pydantic ValidationError is an unusable answer only when an LM library was
# validating (its innermost frame outside pydantic is in one of these packages); one
# raised by the user's own code (a metric, a lambda of the chain) is a bug
_LM_PACKAGES = frozenset(
    {
        "openai",
        "anthropic",
        "langchain",
        "langchain_core",
        "langchain_openai",
        "langchain_anthropic",
        "langchain_community",
        "dspy",
        "litellm",
        "instructor",
    }
)


def _top_package(module: Any) -> str:
    return str(module or "").split(".")[0]


def _class_is(error: BaseException, names: frozenset[tuple[str, str]]) -> bool:
    return any(
        (_top_package(cls.__module__), cls.__name__) in names
        for cls in type(error).__mro__
    )


def _is_unusable_answer(error: BaseException) -> bool:
    """Whether ``error`` is an LM library's refusal of a model's answer: LangChain's
    ``OutputParserException``, DSPy's ``AdapterParseError``, or a pydantic
    ``ValidationError`` raised while an LM library (the openai SDK's structured
    output, a LangChain parser...) validated an answer. Matched by class name and
    module: nothing is imported."""
    if _class_is(error, _UNUSABLE_ANSWER_CLASSES):
        return True
    if not _class_is(error, _VALIDATION_ERRORS):
        return False
    innermost = None
    tb = error.__traceback__
    while tb is not None:  # the frame nearest to the raise, outside pydantic
        package = _top_package(tb.tb_frame.f_globals.get("__name__"))
        if package not in ("pydantic", "pydantic_core"):
            innermost = package
        tb = tb.tb_next
    return innermost in _LM_PACKAGES


def _is_service_failure(error: BaseException) -> bool:
    """Whether ``error`` is a *transient* failure, the only kind the Trainer retries:

    * a connection error or timeout: ``ConnectionError``, ``TimeoutError``, the
      openai/anthropic SDKs' errors, httpx transport errors, ``requests``'
      ``ConnectionError``/``Timeout``, aiohttp's ``ClientConnectionError`` (a
      ``ServerDisconnectedError`` among them) and ``ServerTimeoutError``;
    * an HTTP answer worth retrying (408, 409, 429, 5xx; not 400/401/403/404/422,
      which will not get better), read from any exception's ``status_code``,
      ``status`` or ``code``, or its ``response.status_code``;
    * an LM answer that could not be used: afnio's ``BackwardParseError``,
      ``JudgeParseError``, an ``OptimizerStepError`` of its own (already dropped
      from the memo), or an LM library's parse failure (:func:`_is_unusable_answer`:
      LangChain's ``OutputParserException``, DSPy's ``AdapterParseError``, pydantic's
      ``ValidationError`` of a structured output).

    A wrapper counts as its cause: the chain of ``__cause__`` (and, for other than
    programming errors, ``__context__``) is followed; an exception group is transient
    when all its members are. Only libraries already imported are looked at."""
    from afnio.errors import BackwardParseError, JudgeParseError
    from afnio.optim.tgd import OptimizerStepError

    unusable = (BackwardParseError, JudgeParseError)
    statuses = _loaded_classes(
        ("openai", "APIStatusError"),
        ("anthropic", "APIStatusError"),
        ("httpx", "HTTPStatusError"),
    )
    transport = (
        ConnectionError,
        TimeoutError,
        *_loaded_classes(
            ("openai", "APIError"),  # APIConnectionError, APITimeoutError, ...
            ("anthropic", "APIError"),
            ("httpx", "TransportError"),
            ("requests.exceptions", "ConnectionError"),
            ("requests.exceptions", "Timeout"),
            ("aiohttp", "ClientConnectionError"),  # ServerDisconnectedError, ...
            ("aiohttp", "ServerTimeoutError"),
        ),
    )
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            return all(_is_service_failure(e) for e in current.exceptions)
        if isinstance(current, unusable) or _is_unusable_answer(current):
            return True
        if isinstance(current, OptimizerStepError) and current.__cause__ is None:
            return True  # the optimizer's answer was unusable (else: its cause)
        if statuses and isinstance(current, statuses):
            status = _status_of(current)
            return status is None or _retried_status(status)
        status = _status_of(current)
        if status is not None and not isinstance(current, _PROGRAMMING_ERRORS):
            return _retried_status(status)  # any library's HTTP error
        if isinstance(current, transport):
            return True
        if isinstance(current, _PROGRAMMING_ERRORS):
            current = current.__cause__
        else:
            current = current.__cause__ or current.__context__
    return False


def _keep_or_forget(memo: StepMemo, error: BaseException) -> None:
    """After a failed attempt: keep the paid answers for the retry when the LM
    service failed; otherwise (a bug, a check on an answer's content, an answer an
    LM library could not parse, which afnio's memo may hold) forget them, so that
    the retry asks the model afresh."""
    if not _is_service_failure(error) or any(
        _is_unusable_answer(e) for e in error_chain(error)
    ):
        memo.forget()


def _name_client(error: BaseException, stage: str | None, optimizer: Any) -> None:
    """Add a note naming the client that failed to a provider error of the backward
    pass (the backward client) or of the optimizer step (the optimizer's client),
    unless the client already named itself (afnio's OpenAI clients do)."""
    if stage not in ("backward", "optimizer") or not is_provider_error(error):
        return
    clients: list[Any] = []
    if stage == "backward":
        try:
            from afnio._model_client import get_backward_model_client

            clients.append(get_backward_model_client().client)
        except (RuntimeError, AssertionError):
            return
    else:
        for group in getattr(optimizer, "param_groups", []):
            client = group.get("model_client")
            if client is not None and all(client is not c for c in clients):
                clients.append(client)
    if clients:
        names = " or ".join(repr(c) for c in clients)
        note_client(error, f"the {stage} client {names}")


@contextmanager
def _unit_memo() -> Iterator[StepMemo]:
    """The active step memo (a retry nested in a step shares the step's), or a new
    one for this unit of work."""
    memo = active_memo()
    if memo is not None:
        yield memo
        return
    with step_memo() as memo:
        yield memo


def _batch_len(batch: Any) -> int | None:
    """How many samples ``batch`` holds (a collated batch: a Variable of a list, a
    tuple/list/dict of them), or ``None`` when it cannot tell."""
    if isinstance(batch, Variable):
        return len(batch.data) if isinstance(batch.data, list) else 1
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, (Variable, tuple, list, dict)):
            return _batch_len(first)
        return len(batch)
    return None


def _feedback_items(param: Any) -> list[Any]:
    """The feedback texts of ``param``'s gradients with the in-batch samples they
    are about (:func:`afnio.autodiff.provenance.feedback_items`; plain texts when
    that is unavailable)."""
    try:
        from afnio.autodiff.provenance import feedback_items
    except ImportError:
        feedback_items = None
    if feedback_items is not None:
        return list(feedback_items(param))
    texts: list[Any] = []
    for grad in getattr(param, "_grad", None) or []:
        data = getattr(grad, "data", None)
        for item in data if isinstance(data, list) else [data]:
            text = str(item).strip() if item is not None else ""
            if text:
                texts.append(text)
    return texts


def _batch_columns(batch: Any, n: int | None) -> list[tuple[str, ...]]:
    """Each column of the loader's ``batch`` holding ``n`` items (a Variable with
    list data, or a list of plain values; found in nested tuples, lists and dicts)
    as :func:`afnio.autodiff.provenance.basis_of` describes it (its list's id, one
    fingerprint per item): what a feedback's positions are matched against."""
    from afnio.autodiff.provenance import basis_of

    columns: list[tuple[str, ...]] = []
    if not n:
        return columns

    def scalar(x: Any) -> bool:
        return not isinstance(x, (Variable, list, tuple, dict))

    def walk(value: Any, depth: int) -> None:
        if depth > 6:
            return
        if isinstance(value, Variable):
            data = value.data
            if isinstance(data, list) and len(data) == n:
                columns.extend(basis_of(data) or ())
            return
        if isinstance(value, dict):
            for v in value.values():
                walk(v, depth + 1)
            return
        if isinstance(value, (list, tuple)):
            if len(value) == n and all(scalar(x) for x in value):
                if isinstance(value, list):
                    columns.extend(basis_of(value) or ())
                else:  # a tuple (no list object to recognize): by value only
                    columns.extend(col[1:] for col in basis_of(list(value)) or ())
                return
            for v in value:
                walk(v, depth + 1)

    walk(batch, 0)
    return columns


def _is_answer_list(value: Any) -> bool:
    """``value`` is a list of step answers (objects with ``.param``), as
    :attr:`afnio.optim.TGD.last_step` holds (an empty list counts)."""
    return isinstance(value, list) and all(hasattr(a, "param") for a in value)


def _reports_answers(optimizer: Any) -> bool:
    """The optimizer's ``last_step`` is TGD's per-parameter answers: a TGD, or a
    list of objects with ``.param``; anything else (an int counter of a custom
    optimizer...) is never read nor reset."""
    from afnio.optim.tgd import TGD

    if isinstance(optimizer, TGD):
        return True
    return _is_answer_list(getattr(optimizer, "last_step", None))


def _rendered_feedback(param: Any) -> str:
    """The feedback of ``param`` as TGD's prompt shows it (for an optimizer that
    reports no ``last_step``)."""
    grads = list(getattr(param, "_grad", None) or [])
    if not grads:
        return ""
    from afnio.optim.tgd import render_feedback

    try:
        return render_feedback(grads)[0]
    except Exception:
        return ""


def _resumed_step(info: Mapping[str, Any], loader: Any) -> int:
    """The optimizer steps done up to a resumed checkpoint: what it stored, else
    (a checkpoint written before the run log) counted from its epoch and batch."""
    step = info.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return step
    try:
        per_epoch = len(loader)
    except TypeError:
        return 0
    epoch, batch = int(info.get("epoch") or 1), info.get("batch")
    done = batch + 1 if isinstance(batch, int) else per_epoch
    return (epoch - 1) * per_epoch + done


class _SpendLog:
    """``checkpoints/spend.log``: the cost of every LM call of a run, one line each,
    appended as it is recorded, so that what a killed process paid after its last
    checkpoint is still counted when the run resumes (a checkpoint stores the log's
    length when it was written; what follows was spent after it)."""

    NAME = "spend.log"
    MAX_READ = 64 << 20  # bytes read after a checkpoint (about 2.5 million calls)

    def __init__(self, folder: Path, *, fresh: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.NAME
        self._lock = threading.Lock()
        mode = "w" if fresh else "a"  # a resumed run continues the log
        self._file: IO[str] | None = open(self.path, mode, encoding="utf-8")  # noqa: SIM115
        self._unsubscribe = LEDGER.subscribe(self._record)

    def _record(self, row: PhaseRow) -> None:
        if not row.cost:
            return
        with self._lock:
            if self._file is not None:
                self._file.write(f"{row.cost!r}\n")
                self._file.flush()  # in the OS: a killed process loses nothing

    def position(self, checkpoint: Path) -> dict[str, Any]:
        """Where the log stands now, as stored in ``checkpoint``: its path relative
        to the checkpoint's folder, and its length."""
        with self._lock:
            offset = self._file.tell() if self._file is not None else 0
        return {
            "path": os.path.relpath(self.path, checkpoint.parent),
            "offset": offset,
        }

    @classmethod
    def spent_after(cls, checkpoint: Path, position: Any) -> float:
        """What the log named by a checkpoint's ``position`` holds after it (a cut
        last line is ignored; a missing log holds nothing).

        The position comes from a file: only ``spend.log`` beside the checkpoint or
        one folder up is read, only a regular file (never blocking on a FIFO), and
        at most ``MAX_READ`` bytes of it; anything else holds nothing."""
        if not isinstance(position, dict):
            return 0.0
        relative, offset = position.get("path"), position.get("offset")
        if relative not in (cls.NAME, f"../{cls.NAME}") or not isinstance(offset, int):
            return 0.0
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(checkpoint.parent / relative, flags)
        except OSError:
            return 0.0
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0.0
            f.seek(max(0, offset))
            blob = f.read(cls.MAX_READ)
        lines = blob.decode("utf-8", "replace").splitlines()
        values = []
        for line in lines:
            try:
                value = float(line)
            except ValueError:
                continue
            if math.isfinite(value) and value > 0:
                values.append(value)
        return math.fsum(values)  # exact: whatever order the calls answered in

    def close(self) -> None:
        self._unsubscribe()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _usage_source(client: Any) -> Any:
    """The object whose usage ``client`` reports. The backward-client singleton
    (what ``afnio.get_backward_model_client()`` returns) reports the usage of the
    model client it wraps, so it is metered as that client: passing both, as
    upstream's ``llm_clients=[fw, afnio.get_backward_model_client(), optim]`` does
    beside the client the Trainer finds itself, counts its calls once."""
    from afnio._model_client import ModelClientSingleton

    seen: set[int] = set()
    while isinstance(client, ModelClientSingleton) and id(client) not in seen:
        seen.add(id(client))
        client = client._client
    return client


class _CostMeter:
    """Per-client cost, tokens and calls since the meter started (usage deltas).

    Each underlying client is counted once: wrappers are unwrapped to the client
    whose usage they report (:func:`_usage_source`), then clients are deduplicated
    by identity (a client passed twice, or an agent's model that is also the
    optimizer's or the backward client)."""

    def __init__(self, clients: Iterable[Any]) -> None:
        self.clients: list[Any] = []
        self._base: dict[int, tuple[float, int, int]] = {}
        for client in clients:
            self.add(client)

    @staticmethod
    def _read(client: Any) -> tuple[float, int, int]:
        usage = client.get_usage()
        return (
            float(usage.get("cost", {}).get("amount", 0.0)),
            int(usage.get("total_tokens", 0)),
            int(getattr(client, "calls", 0)),
        )

    def add(self, client: Any) -> None:
        """Meter ``client`` (its usage from now on), unless it or the client it
        wraps is metered already; objects without ``get_usage`` are ignored."""
        client = _usage_source(client)
        if client is None or not hasattr(client, "get_usage"):
            return
        if any(c is client for c in self.clients):
            return
        self.clients.append(client)
        self._base[id(client)] = self._read(client)

    def rebase(self) -> None:
        for client in self.clients:
            self._base[id(client)] = self._read(client)

    def per_client(self) -> list[tuple[Any, float, int, int]]:
        rows = []
        for client in self.clients:
            cost, tokens, calls = self._read(client)
            b_cost, b_tokens, b_calls = self._base[id(client)]
            rows.append((client, cost - b_cost, tokens - b_tokens, calls - b_calls))
        return rows

    def cost(self) -> float:
        return sum(row[1] for row in self.per_client())


class Trainer:
    """Runs the training loop of an afnio Module.

    Args:
        max_epochs: epochs to train (a falsy value means 10).
        enable_checkpointing: write batch and epoch checkpoints.
        enable_progress_bar: show the live progress on stdout: a rich progress bar
            per loop with the step's metrics and the running cost, the
            ``Epoch e/N`` lines, the ``Validation``/``Testing`` headers and the
            ``Resumed from ...`` line. ``False``: none of these is printed.
        enable_agent_summary: print the module before training (Lightning's
            ``enable_model_summary``).
        enable_run_summary: print the run summary after :meth:`fit` (LM calls,
            tokens and cost by model client and by phase, the last epoch's metrics,
            and why the run stopped early, if it did). ``False``: nothing is printed;
            the same figures stay in :attr:`history`, :attr:`total_cost`,
            :meth:`phase_rows` and :attr:`stopped_reason` (an early stop is logged
            as a warning on the ``afnio.trainer`` logger). With
            ``enable_progress_bar``, ``enable_agent_summary`` and
            ``enable_run_summary`` all ``False`` the Trainer prints nothing on stdout.
        show_metrics: which of the step's metrics the progress bar and the run
            summary show, by the key the step returns them under (``"loss"``,
            ``"accuracy"``...), in this order. Default: every metric, the loss first.
            Display only: :attr:`history`, ``metrics.jsonl`` and the returned dicts
            keep every metric under its own key (``train_loss``, ``val_accuracy``).
            The loss is a score (higher is better; with ExactMatch, the *sum* over
            the batch), so it is shown as ``score`` (``loss_score`` when the step
            also returns a metric named ``score``).
        default_root_dir: where metrics and checkpoints go (default: the cwd).
        max_cost: a budget in USD for the run (training and validation LM calls,
            counted from the clients' usage). Before each step the Trainer checks that
            the most expensive step so far still fits; if not it stops cleanly, saves a
            checkpoint and says so. ``None``: no budget.
        revert_on_regression: after each optimizer step, validate; if the validation
            loss (a score: higher is better) dropped below the best so far, restore
            the parameters from before the step. Needs a validation loader.
        loggers: where the run's records go (:mod:`afnio.trainer.loggers`): each
            optimizer step (every parameter before and after, its feedback with the
            samples it came from, the optimizer's answer, metrics, cost by phase),
            each validation and the end of the run. ``None`` (the default):
            ``[JsonlLogger(), CSVLogger()]``, i.e. ``run_log.jsonl`` and
            ``metrics_steps.csv`` in ``default_root_dir``. A list without a
            :class:`~afnio.trainer.run_log.RunLogWriter` (``JsonlLogger``) gets one
            put first (the run log is always written: ``afnio report`` reads it);
            ``[]`` writes the run log only. A logger that raises is logged as a
            warning and never stops the run.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        enable_checkpointing: bool = True,
        enable_progress_bar: bool = True,
        enable_agent_summary: bool = True,
        default_root_dir: str | os.PathLike[str] | None = None,
        max_cost: float | None = None,
        revert_on_regression: bool = False,
        enable_run_summary: bool = True,
        show_metrics: Sequence[str] | None = None,
        loggers: Sequence[Logger] | Logger | None = None,
    ) -> None:
        if max_epochs is not None and (
            isinstance(max_epochs, bool)
            or not isinstance(max_epochs, int)
            or max_epochs < 0
        ):
            raise ValueError(
                f"`max_epochs` must be a positive int, got {max_epochs!r}."
            )
        if max_cost is not None and (isinstance(max_cost, bool) or max_cost < 0):
            raise ValueError(
                f"`max_cost` must be a cost in USD >= 0, got {max_cost!r}."
            )
        self.max_epochs = max_epochs or 10
        self.enable_checkpointing = enable_checkpointing
        self.enable_progress_bar = enable_progress_bar
        self.enable_agent_summary = enable_agent_summary
        self.enable_run_summary = enable_run_summary
        if show_metrics is not None and not isinstance(show_metrics, str):
            with contextlib.suppress(TypeError):  # not iterable: refused below
                show_metrics = tuple(show_metrics)  # a generator is read once
        if show_metrics is not None and (
            not isinstance(show_metrics, tuple)
            or not all(isinstance(k, str) for k in show_metrics)
        ):
            raise TypeError(
                "`show_metrics` must be a list of metric names (the keys the steps "
                f'return, e.g. ["accuracy"]), got {show_metrics!r}.'
            )
        self.show_metrics: tuple[str, ...] | None = (
            None if show_metrics is None else tuple(show_metrics)
        )
        self.default_root_dir = Path(default_root_dir or os.getcwd())
        self.max_cost = max_cost
        self.revert_on_regression = revert_on_regression
        self.total_cost = 0.0
        self.history: list[dict[str, Any]] = []
        self.stopped_reason: str | None = None
        self.last_checkpoint: Path | None = None
        self._meter: _CostMeter | None = None
        # spend made before ``fit`` that its run summary counts (optimize()'s first
        # validation): the LEDGER snapshot taken before it and its per-client rows
        self._summary_prior: tuple[Any, list[tuple[Any, float, int, int]]] | None = None
        self._cost_before = 0.0
        self._max_step_cost = 0.0
        self._max_eval_cost = 0.0
        self._best_val: float | None = None
        self._epoch_metrics: dict[str, list[Any]] = {}
        self._spend_log: _SpendLog | None = None
        self.last_batch_run: BatchRun | None = None
        """The Batch API run of the last ``batch_api`` pass (its ``stats``)."""
        # the run of the last standalone validate/test/predict through the Batch API
        # (its prior_cost counts in max_cost; a fit's is in its checkpoint's cost)
        self._standalone_batch_run: BatchRun | None = None
        # fit(batch_api=...): the options, the state of the last checkpoint written
        # or resumed from (where a Batch API state is checkpointed), and the Batch
        # API state a resumed checkpoint held (taken by the next validation)
        self._fit_batch: BatchOptions | None = None
        self._position: dict[str, Any] | None = None
        self._batch_resume: dict[str, Any] | None = None
        self.loggers: list[Logger] = _logger_list(loggers)
        """The loggers the run's records go to (the run log first)."""
        # the run log's bookkeeping: the global optimizer step, the loggers that
        # started (index -> logger), the spend of a logged initial validation
        # (counted in every total_usd), a validate() waiting for the next fit, the
        # step record (and its revert check) waiting for after_batch, and where the
        # last fit ended (for a test() after it)
        self._global_step = 0
        self._started: dict[int, Logger] = {}
        self._prior_usd = 0.0
        self._pending_initial: tuple[dict[str, Any], float] | None = None
        self._pending_records: list[tuple[str, dict[str, Any]]] = []
        self._fit_end: dict[str, Any] | None = None
        self._loggers_resume: dict[str, Any] | None = None
        self._run_log_resume: dict[str, Any] | None = None

    @property
    def run_log_path(self) -> Path:
        """The run log of this Trainer's fits (``<default_root_dir>/run_log.jsonl``;
        see :mod:`afnio.trainer.run_log`)."""
        writer = next((lg for lg in self.loggers if isinstance(lg, RunLogWriter)), None)
        name = writer.filename if writer is not None else RUN_LOG_FILE
        return self.default_root_dir / name

    # -- the run log -----------------------------------------------------------------

    def _logger_failed(self, target: Any, method: str, error: BaseException) -> None:
        logger.warning(
            "The logger %r failed in %s() (the run goes on): %s",
            target,
            method,
            error_text(error),
        )

    def _logger_states(self) -> dict[str, Any]:
        """Every started logger's state, keyed ``"<index>.<class name>"``."""
        states: dict[str, Any] = {}
        for i, target in self._started.items():
            try:
                states[f"{i}.{type(target).__name__}"] = jsonable(target.state_dict())
            except Exception as e:
                self._logger_failed(target, "state_dict", e)
        return states

    def _emit(self, method: str, record: dict[str, Any]) -> None:
        """Hand ``record`` (prepared once: masked, truncated) to every started
        logger's ``method``; a logger that raises only warns."""
        if not self._started:
            return
        try:
            prepared = prepare_record(record)
        except Exception as e:  # never fail the run for its log
            self._logger_failed("run log", "prepare_record", e)
            return
        for target in self._started.values():
            try:
                getattr(target, method)(prepared)
            except Exception as e:
                self._logger_failed(target, method, e)

    def _flush_records(self) -> None:
        """Write the records waiting for the end of the batch (the step's, then
        its revert check's)."""
        pending, self._pending_records = self._pending_records, []
        for method, record in pending:
            self._emit(method, record)

    def _run_header(
        self, agent: Module, optimizer: Any, train: Any, val: Any
    ) -> dict[str, Any]:
        """The ``header`` record of a fit (see :mod:`afnio.trainer.run_log`)."""
        from afnio import __version__

        def size(loader: Any) -> int | None:
            try:
                return len(loader.dataset) if loader is not None else None
            except (AttributeError, TypeError):
                return None

        groups = [
            g for g in getattr(optimizer, "param_groups", []) if isinstance(g, dict)
        ]
        models: list[str] = []
        constraints: list[str] = []
        for group in groups:
            args = group.get("completion_args") or {}
            client = group.get("model_client")
            model = args.get("model") if isinstance(args, dict) else None
            if model is None and client is not None:
                model = getattr(client, "model", None) or type(client).__name__
            if model is not None and str(model) not in models:
                models.append(str(model))
            for c in group.get("constraints") or []:
                constraints.append(str(c.data if isinstance(c, Variable) else c))
        shown = "\n".join(constraints)
        if len(shown) > 500:
            shown = shown[:480] + f"…[+{len(shown) - 480} chars]"
        batch_size = getattr(train, "batch_size", None)
        return {
            "type": "header",
            "schema": SCHEMA,
            "afnio": __version__,
            "started": now(),
            "max_epochs": self.max_epochs,
            "batch_size": batch_size if isinstance(batch_size, int) else None,
            "train_size": size(train),
            "val_size": size(val),
            "optimizer": {
                "class": type(optimizer).__name__ if optimizer is not None else None,
                "momentum": groups[0].get("momentum") if groups else None,
                "on_error": getattr(optimizer, "on_error", None),
                "models": models,
                "constraints": shown,
            },
            "parameters": [
                {"name": name, "role": p.role, "value": text_of(p.data)}
                for name, p in agent.named_parameters()
                if p.requires_grad
            ],
        }

    def _start_loggers(
        self,
        agent: Module,
        optimizer: Any,
        train: Any,
        val: Any,
        resumed: Path | None,
    ) -> None:
        """Start every logger: fresh (state ``None``), or with the state the
        resumed checkpoint saved for it (``{}`` when it saved none)."""
        self._started = {}
        try:
            header = self._run_header(agent, optimizer, train, val)
            if resumed is not None:
                try:
                    where = str(
                        resumed.resolve().relative_to(self.default_root_dir.resolve())
                    )
                except ValueError:
                    where = str(resumed)
                info = self._run_log_resume or {}
                header["resume"] = {
                    "from_checkpoint": where,
                    "epoch": info.get("epoch"),
                    "batch": info.get("batch"),
                    "step": self._global_step,
                }
            header = prepare_record(header)
        except Exception as e:
            self._logger_failed("run log", "header", e)
            header = {"type": "header", "schema": SCHEMA}
        saved = self._loggers_resume or {}
        for i, target in enumerate(self.loggers):
            state = None
            if resumed is not None:
                state = saved.get(f"{i}.{type(target).__name__}")
                state = state if isinstance(state, dict) else {}
            try:
                target.start(self.default_root_dir, dict(header), state)
            except Exception as e:
                self._logger_failed(target, "start", e)
                continue
            self._started[i] = target

    def _step_begin(
        self, agent: Module, optimizer: Any, loader: Any, batch: Any
    ) -> dict[str, Any]:
        """What a step record needs from before the step: the trainable parameters
        and their texts, the batch's dataset indices, a LEDGER snapshot."""
        answers = False
        with contextlib.suppress(Exception):
            answers = _reports_answers(optimizer)
            if answers:  # never a stale answer
                optimizer.last_step = []
        indices = getattr(loader, "last_indices", None)
        if indices is not None:
            try:
                indices = [int(i) for i in indices]
            except (TypeError, ValueError):
                indices = None
        size = _batch_len(batch)
        try:  # what feedback positions are matched against (provenance)
            columns: list[tuple[str, ...]] | None = _batch_columns(
                batch, len(indices) if indices is not None else size
            )
        except Exception:
            columns = []
        return {
            "answers": answers,
            "columns": columns,
            "params": [
                (name, p, text_of(p.data))
                for name, p in agent.named_parameters()
                if p.requires_grad
            ],
            "indices": indices,
            "size": size,
            "snapshot": LEDGER.snapshot(),
        }

    def _step_record(
        self,
        begin: dict[str, Any],
        optimizer: Any,
        metrics: dict[str, Any],
        epoch: int,
        idx: int,
        step: int,
    ) -> dict[str, Any]:
        """The ``step`` record of step ``step``, just done (``begin``: what
        :meth:`_step_begin` saw)."""
        rows = LEDGER.since(begin["snapshot"])
        reported = getattr(optimizer, "last_step", None) if begin["answers"] else None
        answers = {
            id(a.param): a
            for a in (reported if _is_answer_list(reported) else [])
            if hasattr(a, "param")
        }
        indices = begin["indices"]
        columns = begin["columns"]
        params = []
        for name, p, before in begin["params"]:
            after = text_of(p.data)
            feedback = feedback_entries(_feedback_items(p), indices, columns)
            answer = answers.get(id(p))
            if answer is not None:
                status = answer.status
                shown = answer.feedback_shown
                reply: dict[str, Any] | None = {
                    "error": answer.error,
                    "attempts": answer.attempts,
                }
                if answer.raw_answer is not None:
                    reply["raw_answer"] = answer.raw_answer
            else:
                if after != before:
                    status = "updated"
                else:
                    status = "unchanged" if feedback else "no_feedback"
                shown = _rendered_feedback(p)
                reply = None
            params.append(
                {
                    "name": name,
                    "before": before,
                    "after": after if after != before else None,
                    "status": status,
                    "answer": reply,
                    "feedback": feedback,
                    "feedback_shown": shown,
                }
            )
        if indices is not None:
            samples = {"dataset": "train", "indices": indices, "indexed_by": "dataset"}
        else:
            size = begin["size"]
            samples = {
                "dataset": "train",
                "indices": list(range(size)) if size is not None else [],
                "indexed_by": "batch",
            }
        return {
            "type": "step",
            "step": step,
            "epoch": epoch,
            "batch": idx,
            "samples": samples,
            "metrics": {k: v for k, v in metrics.items() if k != "reverted"},
            "reverted": None,
            "params": params,
            "cost": {
                "total_usd": self._prior_usd + self._cost(),
                "step_usd": math.fsum(r.cost for r in rows),
                "by_phase": phase_json(rows),
            },
            "ts": now(),
        }

    def _validation_record(
        self,
        kind: str,
        metrics: Mapping[str, Any],
        rows: list[PhaseRow],
        epoch: int,
        step: int,
        total: float,
    ) -> dict[str, Any]:
        """A ``validation`` record (kind ``initial``, ``epoch``, ``revert_check``
        or ``test``)."""
        return {
            "type": "validation",
            "step": step,
            "epoch": epoch,
            "kind": kind,
            "metrics": dict(metrics),
            "cost": {
                "total_usd": total,
                "pass_usd": math.fsum(r.cost for r in rows),
                "by_phase": phase_json(rows),
            },
            "ts": now(),
        }

    def _finish_loggers(
        self, agent: Module, status: str, error: BaseException | None
    ) -> None:
        """Write the ``end`` record and finish every logger."""
        if not self._started:
            return
        self._flush_records()  # a step done before a stop in its revert check
        total = self._prior_usd + self.total_cost
        record: dict[str, Any] = {
            "type": "end",
            "ts": now(),
            "status": status,
            "stopped_reason": self.stopped_reason,
            "total_cost": total,
            "steps": self._global_step,
            "final": [
                {"name": name, "value": text_of(p.data)}
                for name, p in agent.named_parameters()
                if p.requires_grad
            ],
        }
        if error is not None:
            record["error"] = error_text(error)
        self._emit("finish", record)
        epoch = self.history[-1].get("epoch") if self.history else 0
        self._fit_end = {"step": self._global_step, "epoch": epoch, "total": total}

    # -- helpers ---------------------------------------------------------------------

    def _print(self, *parts: Any) -> None:
        """Print on stdout (rich markup). Every caller checks the flag that governs
        what it prints (``enable_progress_bar``, ``enable_agent_summary``,
        ``enable_run_summary``)."""
        from rich.console import Console

        Console().print(*parts)

    def _status(self, message: str) -> None:
        """A line of the live progress (``Epoch 1/3``, ``Validation``...): printed
        with the progress bar, else only logged (``afnio.trainer``, INFO)."""
        if self.enable_progress_bar:
            self._print(message)
        else:
            logger.info("%s", message)

    def _clients(
        self, agent: Module, optimizer: Any, llm_clients: Sequence[Any] | None
    ) -> list[Any]:
        clients: list[Any] = list(llm_clients or [])
        clients.extend(agent.models())
        for group in getattr(optimizer, "param_groups", []):
            client = group.get("model_client")
            if isinstance(client, BaseModel):
                clients.append(client)
        try:
            from afnio._model_client import get_backward_model_client

            clients.append(get_backward_model_client().client)
        except RuntimeError:
            pass
        return clients

    def _shown_cost(self) -> float:
        """The cost a progress bar shows: the run's so far, plus what was spent
        before ``fit`` that its summary counts too (``_summary_prior``)."""
        prior = self._summary_prior
        before = sum(row[1] for row in prior[1]) if prior is not None else 0.0
        return self._cost() + before

    def _cost(self) -> float:
        assert self._meter is not None
        return self._cost_before + self._meter.cost()

    def _check_batch_budget(
        self, projected: float, requests: int, prior: float = 0.0
    ) -> None:
        """Refuse a Batch API round whose new batches, at their projected cost
        (batch prices), might not fit in ``max_cost``: nothing is submitted.
        ``prior``: what an earlier, interrupted call of the same standalone pass
        paid (not in this call's meter)."""
        if self.max_cost is None:
            return
        spent = self._cost() + prior
        if spent + projected > self.max_cost:
            raise BudgetExceeded(
                f"Stopped before exceeding max_cost=${self.max_cost:.4f}: spent "
                f"${spent:.4f}, and the next Batch API batch ({requests} requests) "
                f"is projected to cost ${projected:.4f} at batch prices; nothing was "
                "submitted. Raise max_cost, or lower BatchOptions(answer_tokens=...) "
                "if the answers are shorter; the Batch API state keeps the answers "
                "paid so far."
            )

    def _check_spent(self) -> None:
        """During a Batch API round, stop the pass once what it spent so far is past
        ``max_cost``. The round's chat calls cost nothing until their batch, which
        is priced before it is submitted (:meth:`_check_batch_budget`), but its
        synchronous calls are paid as they are made (``complete``/``embed``,
        LangChain or DSPy clients, anything not batched): checked before each
        batch of the pass, with no estimate (a round's batch spends nothing here).
        A standalone pass counts what an earlier, interrupted call of it accounted
        too, as the Batch API check does."""
        if self.max_cost is None or self._meter is None:
            return
        run = self.last_batch_run
        standalone = run is not None and run is self._standalone_batch_run
        spent = self._cost() + (run.prior_cost if standalone and run else 0.0)
        if spent > self.max_cost:
            raise BudgetExceeded(
                f"Stopped at max_cost=${self.max_cost:.4f}: a Batch API pass spent "
                f"${spent:.4f} so far, past the budget, in calls made synchronously "
                "during its rounds (complete/embed, LangChain or DSPy clients; only "
                "the chat calls of afnio's OpenAI clients are batched). Nothing more "
                "was submitted; raise max_cost, or enable the response cache "
                "(afnio.models.enable_cache()) so that each round does not pay for "
                "them again. The Batch API state keeps the answers paid so far."
            )

    def _check_budget(self, estimate: float | None = None) -> None:
        """Stop if the next unit of work (a step, or a validation batch) might not
        fit in ``max_cost``; the estimate is the most expensive one seen so far."""
        if self.max_cost is None:
            return
        estimate = self._max_step_cost if estimate is None else estimate
        if self._cost() + estimate > self.max_cost:
            raise BudgetExceeded(
                f"Stopped before exceeding max_cost=${self.max_cost:.4f}: spent "
                f"${self._cost():.4f}, and the next step may cost up to "
                f"${estimate:.4f}. The last checkpoint holds the state so far."
            )

    def _retry(
        self,
        fn: Any,
        what: str,
        *,
        phase: str,
        batch_idx: int | None = None,
        where: list[str] | None = None,
        optimizer: Any = None,
    ) -> Any:
        """Run ``fn``; retry it, up to ``MAX_RETRIES`` attempts in all, only after a
        transient failure (:func:`_is_service_failure`). Any other failure raises a
        :class:`~afnio.errors.StepError` at once, from the original exception: a
        programming error does not go away by calling the LM again. LM answers paid
        in a failed attempt are replayed to the next one
        (:mod:`afnio.models.step_memo`), so a retry only re-sends the requests that
        failed. ``where[0]`` is the stage ``fn`` is in when it fails (default
        ``"forward"``); a ``StepError`` from a nested retry is final."""
        where = where if where is not None else ["forward"]
        with _unit_memo() as memo:
            last: Exception | None = None
            for attempt in range(1, MAX_RETRIES + 1):
                if attempt > 1:
                    memo.begin_attempt()
                try:
                    return fn()
                except (BudgetExceeded, StepError):
                    raise
                except Exception as e:
                    _name_client(e, where[0], optimizer)
                    if not _is_service_failure(e):
                        raise StepError(
                            e, phase=phase, stage=where[0], batch_index=batch_idx
                        ) from e
                    last = e
                    _keep_or_forget(memo, e)
                    logger.warning(
                        "%s failed (attempt %d/%d): %s",
                        what,
                        attempt,
                        MAX_RETRIES,
                        error_text(e),
                    )
            assert last is not None
            raise StepError(
                last,
                phase=phase,
                stage=where[0],
                batch_index=batch_idx,
                attempts=MAX_RETRIES,
                transient=True,
            ) from last

    def _checkpoint(
        self, name: str, agent: Module, optimizer: Any, state: dict[str, Any]
    ) -> Path | None:
        if not self.enable_checkpointing:
            return None
        # where the run stands: what a Batch API state is checkpointed with
        self._position = {k: v for k, v in state.items() if k != "batch_api_state"}
        folder = self.default_root_dir / "checkpoints"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save(
            {
                **state,
                "agent_state_dict": agent.state_dict(keep_vars=True),
                "optimizer_state_dict": optimizer.state_dict()
                if optimizer is not None
                else None,
                "history": self.history,
                "total_cost": self._cost(),
                # what a resume needs to continue exactly (format: see _resume)
                "epoch_metrics": {
                    key: [v if isinstance(v, (int, float)) else None for v in values]
                    for key, values in self._epoch_metrics.items()
                },
                "max_step_cost": self._max_step_cost,
                "max_eval_cost": self._max_eval_cost,
                "best_val": self._best_val,
                "spend_log": self._spend_log.position(path)
                if self._spend_log is not None
                else None,
                # the loggers' states (the run log's length) and the step count:
                # a resume cuts the logs back to this point
                "loggers_state": self._logger_states(),
                "run_log": {"step": self._global_step, "prior_usd": self._prior_usd},
            },
            path,
        )
        # the pointer moves only once the checkpoint is complete (both atomic)
        write_atomic(folder / _LAST, path.relative_to(folder).as_posix().encode())
        self.last_checkpoint = path
        return path

    def _write_metrics(self) -> None:
        self.default_root_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        write_atomic(self.default_root_dir / "metrics.jsonl", text.encode("utf-8"))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        keys = sorted({k for row in self.history for k in row if k not in ("epoch",)})
        if not self.history or not keys:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [
                (r["epoch"], r[key])
                for r in self.history
                if isinstance(r.get(key), (int, float))
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.legend()
        fig.savefig(self.default_root_dir / "metrics.png", dpi=100)
        plt.close(fig)

    def _loop(
        self,
        agent: Module,
        loader: Any,
        method: str,
        label: str,
        on_batch: Any,
        skip_until: int = -1,
        collected: dict[str, list[Any]] | None = None,
        after_batch: Any = None,
        start: int = 0,
    ) -> dict[str, Any]:
        """Run ``on_batch(idx, batch)`` over ``loader`` with a progress bar; returns the
        per-batch metric means. ``collected`` holds the per-batch metrics so far (a
        resumed epoch's, restored from its checkpoint) and is extended in place;
        ``after_batch(idx)`` runs once a batch's metrics are collected. ``start``:
        the index of the loader's first batch (a stream restored mid-epoch)."""
        collected = {} if collected is None else collected
        try:
            total = len(loader) if hasattr(loader, "__len__") else None
        except TypeError:  # a stream of unknown length (an IterableDataset)
            total = None
        progress = None
        task = None
        if self.enable_progress_bar:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                refresh_per_second=5,
                console=Console(),  # today's stdout and terminal width
            )
            progress.start()
            task = progress.add_task(label, total=total, metrics="", completed=start)
        try:
            for idx, batch in enumerate(loader, start):
                if idx <= skip_until:
                    continue  # resumed: this batch was done before the checkpoint
                metrics = on_batch(idx, batch)
                for key, value in metrics.items():
                    collected.setdefault(key, []).append(value)
                if after_batch is not None:
                    after_batch(idx)
                if progress is not None and task is not None:
                    progress.update(
                        task,
                        advance=1,
                        metrics=_progress_text(
                            collected, self.show_metrics, self._shown_cost()
                        ),
                    )
        finally:
            if progress is not None:
                progress.stop()
        return {key: _mean(values) for key, values in collected.items()}

    # -- the public API --------------------------------------------------------------

    def estimate(
        self,
        agent: Module,
        train_dataloader: Any,
        val_dataloader: Any = None,
        *,
        assumptions: Assumptions | None = None,
        models: str | Mapping[str, str] | None = None,
        shape: GraphShape | None = None,
        momentum: int = 0,
        constraints: Sequence[str] = (),
        tokenizer: Tokenizer | None = None,
        batch_api: bool = False,
    ) -> RunEstimate:
        """Estimate what :meth:`fit` with these loaders would spend, **before any LM
        call** (a dry run): LM calls, tokens and cost by phase, from the dataset
        sizes, the batch size, ``max_epochs``, the agent's graph shape
        (:meth:`~afnio.trainer.estimate.GraphShape.of_module`, or ``shape=``) and the
        prices of ``models``, with a validation after every step when
        ``revert_on_regression`` is set; ``momentum`` and ``constraints``: those of
        the agent's TGD. See :mod:`afnio.trainer.estimate` for the model and its
        ``assumptions``. ``batch_api``: price the validation passes at the Batch API
        rate of the pricing table (as ``validate(..., batch_api=True)`` pays); for
        a standalone pass see :func:`afnio.trainer.estimate.estimate_pass`.

        Example::

            run = trainer.estimate(agent, train_loader, val_loader, models="gpt-5")
            print(run)  # estimated: 412 LM calls, ... $0.0123
            if run.cost > 1.0:
                ...
        """
        from afnio.trainer.estimate import GraphShape, approx_tokens, estimate

        if not isinstance(agent, Module):
            raise TypeError(
                f"`agent` must be an afnio Module, got {type(agent).__name__}."
            )

        def size(loader: Any, name: str) -> tuple[int, int, Any]:
            dataset = getattr(loader, "dataset", None)
            batch = getattr(loader, "batch_size", None)
            if dataset is None or not isinstance(batch, int):
                raise TypeError(
                    f"`{name}` must be a DataLoader (with a dataset and a batch_size)."
                )
            try:
                n = len(dataset)
            except TypeError as e:  # an IterableDataset of unknown length
                raise TypeError(
                    f"`{name}`'s dataset has no length, and estimate() needs the "
                    f"number of samples: {e}"
                ) from e
            if getattr(loader, "drop_last", False):
                n = n // batch * batch
            return n, batch, dataset

        n_train, batch_size, train = size(train_dataloader, "train_dataloader")
        n_val = size(val_dataloader, "val_dataloader")[0] if val_dataloader else 0
        if shape is None:
            shape = GraphShape.of_module(agent, _first_samples(train, 500))
        return estimate(
            shape,
            n_train=n_train,
            n_val=n_val,
            epochs=self.max_epochs,
            batch_size=batch_size,
            validate_every_step=self.revert_on_regression and n_val > 0,
            momentum=momentum,
            constraints=constraints,
            assumptions=assumptions,
            models=models,
            tokenizer=tokenizer or approx_tokens,
            batch_api=batch_api,
        )

    def fit(
        self,
        agent: Module,
        train_dataloader: Any = None,
        val_dataloader: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        llm_clients: Sequence[Any] | None = None,
        *,
        allow_functions: bool | Iterable[str] = False,
        load_limits: LoadLimits | None = None,
        batch_api: bool | BatchOptions = False,
    ) -> list[dict[str, Any]]:
        """Train ``agent``; returns the metric history (one dict per epoch).

        Args:
            agent: the Module to train.
            train_dataloader: the training batches.
            val_dataloader: validation batches, run after every epoch.
            ckpt_path: a checkpoint to resume from, or ``"last"`` for the newest one
                this Trainer's ``default_root_dir`` holds. A resumed run continues
                exactly where the checkpoint was written: parameters, optimizer
                state, data order, the metric history and the current epoch's
                per-batch metrics, the spend and the per-step cost estimate (so
                ``max_cost`` holds across the resume).
            llm_clients: extra model clients whose usage counts in the cost.
            allow_functions: passed to :func:`afnio.load` and
                :meth:`~afnio.cognitive.Module.load_state_dict` when resuming:
                functions saved in the checkpoint fill only the slots that already
                hold that very function unless ``True`` (import any) or a list of
                module names (import from those only). Only for checkpoints you
                trust.
            load_limits: the size limits of :func:`afnio.load` for the checkpoint
                (defaults admit every checkpoint afnio writes).
            batch_api: run the validation passes of the run (after each epoch, and
                the ``revert_on_regression`` checks) through the provider's Batch
                API, as :meth:`validate` does (``True``, or a
                :class:`~afnio.models.batch.BatchOptions`); training steps stay
                synchronous. The Batch API state (batch ids, answers) is kept in a
                checkpoint (``checkpoints/epoch_<n>/checkpoint_batch_api.hf``,
                written at the position of the last checkpoint, before the first
                poll), so a run interrupted while a batch is polled resumes polling
                it with ``fit(ckpt_path="last", batch_api=...)`` instead of paying
                again. ``max_cost`` is checked before each batch is submitted, and
                what a validation spends synchronously (calls not batched) before
                each of its loader's batches.

        Raises:
            TypeError: ``agent`` is not a Module, or a wrong argument type.
            ValueError: no training loader, ``revert_on_regression`` without a
                validation loader, or ``val_dataloader`` is the ``train_dataloader``
                object itself (a second DataLoader may share its dataset).
            FileNotFoundError: ``ckpt_path="last"`` and there is no checkpoint yet.
            afnio.errors.StepError: a step failed (a ``RuntimeError``; the original
                exception is its ``__cause__``): at once for an error retrying
                cannot fix, after ``MAX_RETRIES`` attempts for a transient one
                (:func:`_is_service_failure`). ``total_cost`` and the summary still
                count what was spent.
        """
        if not isinstance(agent, Module):
            raise TypeError(
                f"`agent` must be an afnio Module, got {type(agent).__name__}."
            )
        if train_dataloader is None:
            raise ValueError("`train_dataloader` is required to fit.")
        for name, loader in (
            ("train_dataloader", train_dataloader),
            ("val_dataloader", val_dataloader),
        ):
            if loader is not None and not hasattr(loader, "__iter__"):
                raise TypeError(
                    f"`{name}` must be an iterable of batches (a DataLoader)."
                )
        if ckpt_path is not None and not isinstance(ckpt_path, (str, os.PathLike)):
            raise TypeError(
                f'`ckpt_path` must be a path or "last", got {type(ckpt_path).__name__}.'
            )
        if self.revert_on_regression and val_dataloader is None:
            raise ValueError("`revert_on_regression` needs a `val_dataloader`.")
        if val_dataloader is train_dataloader and hasattr(train_dataloader, "__next__"):
            raise ValueError(
                f"`val_dataloader` is the same {type(val_dataloader).__name__} object "
                "as `train_dataloader`: it is its own iterator, so a validation pass "
                "would restart the training epoch (and a checkpoint could not keep "
                "both positions). Pass a second loader, which may read the same "
                "dataset: DataLoader(train_dataloader.dataset, batch_size=...)."
            )
        if ckpt_path == "last":
            ckpt_path = self.last_checkpoint_path()
        if self.enable_agent_summary:
            self._print(str(agent) + "\n")
        optimizer = agent.configure_optimizers()
        agent._optimizers = optimizer
        self._meter = _CostMeter(self._clients(agent, optimizer, llm_clients))
        self._phase_start = LEDGER.snapshot()
        self._cost_before = 0.0
        self._max_step_cost = self._max_eval_cost = 0.0
        self._best_val = None
        self._epoch_metrics = {}
        self.history = []
        self.stopped_reason = None
        self.total_cost = 0.0
        self._fit_batch = BatchOptions.of(batch_api)
        self._position = self._batch_resume = None
        self._global_step = 0
        self._prior_usd = 0.0
        self._pending_records = []
        self._loggers_resume = self._run_log_resume = None
        self._started = {}
        self._fit_end = None
        # a validate() before this fit: its record opens the run log (kind
        # "initial", step 0); a resumed run's log already holds its first one
        initial, self._pending_initial = self._pending_initial, None
        status, failure = "completed", None
        start_epoch, skip_until = 1, -1
        sampler = getattr(train_dataloader, "sampler", None)
        stream = _stream_of(train_dataloader)
        val_stream = _stream_of(val_dataloader)
        try:
            if ckpt_path is not None:
                start_epoch, skip_until = self._resume(
                    agent,
                    optimizer,
                    Path(ckpt_path),
                    sampler,
                    allow_functions=allow_functions,
                    load_limits=load_limits,
                    stream=stream,
                    val_stream=val_stream,
                )
            if self.enable_checkpointing:
                folder = self.default_root_dir / "checkpoints"
                if ckpt_path is None:
                    # a new run: "last" must never name an earlier run's checkpoint
                    (folder / _LAST).unlink(missing_ok=True)
                self._spend_log = _SpendLog(folder, fresh=ckpt_path is None)
            if ckpt_path is not None and self._run_log_resume is not None:
                self._global_step = _resumed_step(
                    self._run_log_resume, train_dataloader
                )
            self._start_loggers(
                agent,
                optimizer,
                train_dataloader,
                val_dataloader,
                Path(ckpt_path) if ckpt_path is not None else None,
            )
            if initial is not None and ckpt_path is None:
                record, spent = initial
                self._prior_usd = spent
                self._emit("log_validation", record)
            self._fit_epochs(
                agent,
                optimizer,
                train_dataloader,
                val_dataloader,
                sampler,
                start_epoch,
                skip_until,
                stream=stream,
                val_stream=val_stream,
            )
        except BudgetExceeded as e:
            status = "budget"
            self.stopped_reason = str(e)
            if self.enable_run_summary:
                from rich.text import Text

                self._print(Text(str(e), style="yellow"))
            else:
                logger.warning("%s", e)
            self._write_metrics()
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            failure = e
            raise
        finally:
            # also when a step failed for good: what was spent is reported
            if self._spend_log is not None:
                self._spend_log.close()
                self._spend_log = None
            self.total_cost = self._cost()
            self._finish_loggers(agent, status, failure)
            self._summary()
        return self.history

    def _fit_epochs(
        self,
        agent: Module,
        optimizer: Any,
        train_dataloader: Any,
        val_dataloader: Any,
        sampler: Any,
        start_epoch: int,
        skip_until: int,
        *,
        stream: Any = None,
        val_stream: Any = None,
    ) -> None:
        def data_state() -> dict[str, Any]:
            # a stream's position after the batch just done (see _stream_of), and
            # a streaming validation loader's (between two passes), so that a
            # resumed run validates on the epochs an uninterrupted one would
            if not self.enable_checkpointing:
                return {}
            state = {}
            if stream is not None:
                state["data_state"] = stream.state_dict()
            if val_stream is not None:
                state["val_data_state"] = val_stream.state_dict()
            return state

        for epoch in range(start_epoch, self.max_epochs + 1):
            self._status(f"Epoch {epoch}/{self.max_epochs}")
            sampler_state = (
                sampler.state_dict() if hasattr(sampler, "state_dict") else None
            )
            if epoch != start_epoch or skip_until < 0:
                self._epoch_metrics = {}  # a resumed epoch keeps its batches' metrics
            agent.train()

            def train_batch(idx: int, batch: Any, epoch: int = epoch) -> dict[str, Any]:
                self._check_budget()
                before = self._cost()
                begin = self._step_begin(agent, optimizer, train_dataloader, batch)
                snapshot = (
                    [(p, p.data) for p in agent.parameters()]
                    if self.revert_on_regression
                    else None
                )
                metrics = self._train_step(agent, optimizer, batch, idx)
                # the step's record, written (after its revert check's) by
                # after_batch, before the batch checkpoint; the log never fails
                # the run: a record that cannot be built is only warned about
                self._global_step += 1
                record: dict[str, Any] | None = None
                try:
                    record = self._step_record(
                        begin, optimizer, metrics, epoch, idx, self._global_step
                    )
                except Exception as e:
                    self._logger_failed("run log", "step record", e)
                self._pending_records = (
                    [("log_step", record)] if record is not None else []
                )
                if snapshot is not None:
                    phases = LEDGER.snapshot()
                    val = self._fit_validation(
                        agent, optimizer, val_dataloader, "[Revert check]", epoch
                    )
                    score = val.get("loss")
                    best = self._best_val
                    if best is not None and score is not None and score < best:
                        for p, data in snapshot:
                            p.data = data
                        metrics["reverted"] = 1
                    else:
                        self._best_val = score if score is not None else best
                        metrics["reverted"] = 0
                    if record is not None:
                        record["reverted"] = metrics["reverted"]
                    check = self._validation_record(
                        "revert_check",
                        val,
                        LEDGER.since(phases),
                        epoch,
                        self._global_step,
                        self._prior_usd + self._cost(),
                    )
                    self._pending_records.append(("log_validation", check))
                self._max_step_cost = max(self._max_step_cost, self._cost() - before)
                return metrics

            def after_batch(
                idx: int, epoch: int = epoch, sampler_state: Any = sampler_state
            ) -> None:
                self._flush_records()  # before the checkpoint that counts them
                self._checkpoint(
                    f"epoch_{epoch}/checkpoint_batch{idx}.hf",
                    agent,
                    optimizer,
                    {
                        "epoch": epoch,
                        "batch": idx,
                        "sampler_state": sampler_state,
                        **data_state(),
                    },
                )

            skip = skip_until if epoch == start_epoch else -1
            # a stream restored mid-epoch continues at batch skip + 1: nothing to skip
            start = skip + 1 if stream is not None and skip >= 0 else 0
            train = self._loop(
                agent,
                train_dataloader,
                "training_step",
                "[Training]",
                train_batch,
                -1 if start else skip,
                collected=self._epoch_metrics,
                after_batch=after_batch,
                start=start,
            )
            row: dict[str, Any] = {"epoch": epoch}
            row.update({f"train_{k}": v for k, v in train.items()})
            val_record = None
            if val_dataloader is not None:
                phases = LEDGER.snapshot()
                val = self._fit_validation(
                    agent, optimizer, val_dataloader, "[Validation]", epoch
                )
                row.update({f"val_{k}": v for k, v in val.items()})
                val_record = self._validation_record(
                    "epoch",
                    val,
                    LEDGER.since(phases),
                    epoch,
                    self._global_step,
                    self._prior_usd + self._cost(),
                )
            row["total_cost"] = self._cost()
            self.history.append(row)
            self._epoch_metrics = {}
            if val_record is not None:
                self._emit("log_validation", val_record)
            self._write_metrics()
            self._checkpoint(
                f"checkpoint_epoch{epoch}.hf",
                agent,
                optimizer,
                {
                    "epoch": epoch,
                    "batch": None,
                    "sampler_state": sampler.state_dict()
                    if hasattr(sampler, "state_dict")
                    else None,
                    **data_state(),
                },
            )

    def _fit_validation(
        self, agent: Module, optimizer: Any, loader: Any, label: str, epoch: int
    ) -> dict[str, Any]:
        """A validation pass of ``fit``: synchronous, or through the Batch API with
        ``fit(batch_api=...)``.

        The state of the validation after an epoch is written into a checkpoint at
        the run's position (the last checkpoint's state: nothing changed since)
        after every change, so that a resume from it polls the batches already
        submitted. A revert check runs mid-step (the parameters already moved), so
        no checkpoint can hold it: its state is the ``"fit_revert_check"`` entry of
        :data:`BATCH_STATE_FILE`; a run resumed after an interruption redoes the
        step, and its check polls the same batch when the step made the same
        requests (else that batch is cancelled)."""
        if self._fit_batch is None:
            entry, self._batch_resume = self._batch_resume, None
            running = [
                str(b.get("id") or b.get("input_file_id") or "?")
                for b in (entry or {}).get("batches", [])
                if isinstance(b, dict)
                and b.get("status") in ("submitted", "creating", "cancelling")
            ]
            if running:
                logger.warning(
                    "The checkpoint holds Batch API batches of this validation (%s) "
                    "and the run resumed without batch_api: the validation runs "
                    "synchronously and they are not polled (resume with "
                    "fit(..., batch_api=True) to use them).",
                    ", ".join(running),
                )
            return self._evaluate(agent, loader, "validation_step", label)
        store: BatchStore
        if "revert" in label.lower():
            store = BatchStore(
                self.default_root_dir / BATCH_STATE_FILE, "fit_revert_check"
            )
        else:
            entry, self._batch_resume = self._batch_resume, None  # taken once
            name = f"epoch_{epoch}/checkpoint_batch_api.hf"

            def keep(state: dict[str, Any]) -> None:
                if self._position is not None:  # else no checkpoint to resume from
                    self._checkpoint(
                        name,
                        agent,
                        optimizer,
                        {**self._position, "batch_api_state": state},
                    )

            store = MemoryStore(
                "fit",
                entry=entry,
                on_save=keep,
                path=self.default_root_dir / "checkpoints" / name,
            )
        run = BatchRun(
            store,
            self._fit_batch,
            progress=self.enable_progress_bar,
            label=label.strip("[]"),
            budget=self._check_batch_budget,
        )
        self.last_batch_run = run
        # what a resumed state accounted is in the checkpoint's total_cost (or in
        # the spend log after it): run.prior_cost is not added again
        replay = ReplayLoader(loader)  # the same batches in every round
        return run.run(lambda: self._evaluate(agent, replay, "validation_step", label))

    def last_checkpoint_path(self) -> Path:
        """The newest checkpoint written under ``default_root_dir`` (what
        ``fit(ckpt_path="last")`` resumes from).

        Raises:
            FileNotFoundError: no checkpoint was written there yet.
        """
        pointer = self.default_root_dir / "checkpoints" / _LAST
        try:
            name = pointer.read_text("utf-8").strip()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No checkpoint to resume from in {pointer.parent}: "
                "fit(ckpt_path='last') needs a run that wrote checkpoints there "
                "(enable_checkpointing=True)."
            ) from None
        path = pointer.parent / name
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise FileNotFoundError(f"{pointer} does not name a checkpoint: {name!r}.")
        if not path.is_file():
            raise FileNotFoundError(
                f"{pointer} names {name!r}, which does not exist any more."
            )
        return path

    def _train_step(
        self, agent: Module, optimizer: Any, batch: Any, idx: int
    ) -> dict[str, Any]:
        where = ["forward"]  # the stage the step is in, for the error message

        def attempt() -> dict[str, Any]:
            where[0] = "forward"
            if agent.automatic_optimization:
                optimizer.clear_grad()
            output = self._retry(
                lambda: agent.training_step(batch, idx),
                "training_step()",
                phase="training step",
                batch_idx=idx,
            )
            loss, extra = _parse_step_output(output, "training_step")
            if agent.automatic_optimization:
                where[0] = "backward"
                loss[1].backward()
                where[0] = "optimizer"
                optimizer.step()
            return _batch_metrics(loss, extra)

        if not agent.automatic_optimization:
            return attempt()
        # the forward pass has its own retries (in attempt); these retry the step
        # after a transient failure of its backward pass or optimizer step
        return self._retry(
            attempt,
            "training step",
            phase="training step",
            batch_idx=idx,
            where=where,
            optimizer=optimizer,
        )

    def _evaluate(
        self, agent: Module, loader: Any, method: str, label: str
    ) -> dict[str, Any]:
        was_training = agent.training
        phase = "test" if method == "test_step" else "validation"
        if "revert" in label.lower():
            phase = "validation (revert check)"
        agent.eval()
        try:
            with no_grad():

                def one(idx: int, batch: Any) -> dict[str, Any]:
                    # through the Batch API the chat calls are priced before their
                    # batch is submitted (a round's batch costs nothing here), and
                    # what the round spent synchronously is checked here
                    if self._meter is not None and active_collector() is None:
                        self._check_budget(self._max_eval_cost or self._max_step_cost)
                    elif self._meter is not None:
                        self._check_spent()
                    before = self._cost() if self._meter is not None else 0.0
                    try:
                        output = self._retry(
                            lambda: getattr(agent, method)(batch, idx),
                            f"{method}()",
                            phase=phase,
                            batch_idx=idx,
                        )
                    except BatchDeferred:
                        return {}  # a Batch API round: its calls were collected
                    loss, extra = _parse_step_output(output, method)
                    if self._meter is not None:
                        self._max_eval_cost = max(
                            self._max_eval_cost, self._cost() - before
                        )
                    return _batch_metrics(loss, extra)

                return self._loop(agent, loader, method, label, one)
        finally:
            agent.train(was_training)

    def _model_clients(
        self, agent: Module, optimizer: Any, state: Any
    ) -> dict[str, Any]:
        """The live client for every model slot of a checkpoint: the agent's client
        at that key, else the first known client of the saved class (slots such as a
        ChatCompletion module's are filled only when it first runs)."""
        from afnio.models.model_registry import MODEL_REGISTRY

        current = dict(agent.named_models())
        known = self._clients(agent, optimizer, None)
        clients: dict[str, Any] = {}
        for key, value in state.items():
            if not (
                isinstance(value, dict)
                and isinstance(value.get("class_type"), str)
                and value["class_type"] in MODEL_REGISTRY
            ):
                continue
            cls = MODEL_REGISTRY[value["class_type"]]
            if isinstance(current.get(key), cls):
                clients[key] = current[key]
            else:
                match = next((c for c in known if isinstance(c, cls)), None)
                if match is not None:
                    clients[key] = match
        return clients

    def _resume(
        self,
        agent: Module,
        optimizer: Any,
        path: Path,
        sampler: Any,
        *,
        allow_functions: bool | Iterable[str] = False,
        load_limits: LoadLimits | None = None,
        stream: Any = None,
        val_stream: Any = None,
    ) -> tuple[int, int]:
        # by default functions come back as references: they load only into slots
        # that already hold the same functions, and nothing named in the file is
        # imported
        checkpoint = load(path, allow_functions=allow_functions, limits=load_limits)
        _check_checkpoint(checkpoint, path)
        state = checkpoint["agent_state_dict"]
        agent.load_state_dict(
            state,
            model_clients=self._model_clients(agent, optimizer, state),
            allow_functions=allow_functions,
        )
        if optimizer is not None and checkpoint.get("optimizer_state_dict") is not None:
            group_clients = {
                key: value
                for group in optimizer.param_groups
                for key, value in group.items()
                if isinstance(value, BaseModel)
            }
            optimizer.load_state_dict(
                checkpoint["optimizer_state_dict"], model_clients=group_clients
            )
        assert self._meter is not None
        self._meter.rebase()  # restored usage is not new spending
        self.history = list(checkpoint.get("history") or [])
        self._cost_before = float(checkpoint.get("total_cost") or 0.0)
        # paid by an interrupted process after this checkpoint: paid all the same
        self._cost_before += _SpendLog.spent_after(path, checkpoint.get("spend_log"))
        self._max_step_cost = float(checkpoint.get("max_step_cost") or 0.0)
        self._max_eval_cost = float(checkpoint.get("max_eval_cost") or 0.0)
        self._best_val = checkpoint.get("best_val")
        metrics = checkpoint.get("epoch_metrics") or {}
        self._epoch_metrics = {
            str(k): list(v) for k, v in metrics.items() if isinstance(v, list)
        }
        state = checkpoint.get("sampler_state")
        if state is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(state)
        data_state = checkpoint.get("data_state")
        if data_state is not None and stream is None:
            raise ValueError(
                f"{path} holds the position of a streaming train_dataloader (over an "
                "IterableDataset with state_dict, e.g. JsonlDataset), and this "
                "train_dataloader is not one: resume with the loader the run began "
                "with."
            )
        if data_state is None and stream is not None:
            raise ValueError(
                f"{path} holds no stream position (it was written by a fit over "
                "another kind of train_dataloader), so this streaming one cannot "
                "resume exactly: resume with the loader the run began with."
            )
        if stream is not None:
            stream.load_state_dict(data_state)  # the next batch continues from it
        # a streaming validation loader: its next pass reads the epoch it would
        # have read without the interruption (a checkpoint of a fit without one,
        # or an older one, holds none: its passes start from its first epoch)
        val_data_state = checkpoint.get("val_data_state")
        if val_data_state is not None and val_stream is not None:
            val_stream.load_state_dict(val_data_state)
        elif val_data_state is not None:
            logger.warning(
                "%s holds the position of a streaming val_dataloader, and this "
                "val_dataloader is not one: its validations are not those of the "
                "interrupted run's loader.",
                path,
            )
        epoch, batch = int(checkpoint["epoch"]), checkpoint.get("batch")
        # a checkpoint written while a validation polled a batch: the next one polls
        # it again (fit(batch_api=...)); the position is where further Batch API
        # states are checkpointed
        self._batch_resume = checkpoint.get("batch_api_state")
        # the loggers' states and the step count: the logs are cut back to them
        self._loggers_resume = checkpoint.get("loggers_state")
        run_log = checkpoint.get("run_log")
        self._run_log_resume = {
            "epoch": epoch,
            "batch": batch,
            "step": run_log.get("step") if isinstance(run_log, dict) else None,
        }
        prior = run_log.get("prior_usd") if isinstance(run_log, dict) else None
        if isinstance(prior, (int, float)) and not isinstance(prior, bool):
            self._prior_usd = float(prior) if math.isfinite(prior) else 0.0
        self._position = {
            "epoch": epoch,
            "batch": batch,
            "sampler_state": checkpoint.get("sampler_state"),
        }
        if data_state is not None:
            self._position["data_state"] = data_state
        if val_data_state is not None:
            self._position["val_data_state"] = val_data_state
        self._status(f"Resumed from {path} (epoch {epoch}, batch {batch}).")
        if batch is None:
            return epoch + 1, -1
        return epoch, int(batch)

    def validate(
        self,
        agent: Module,
        val_dataloader: Any = None,
        llm_clients: Sequence[Any] | None = None,
        *,
        batch_api: bool | BatchOptions = False,
    ) -> dict[str, Any]:
        """Run ``validation_step`` over the loader under ``no_grad``; returns the mean
        metrics (``val_<name>``).

        Args:
            batch_api: send the pass's chat calls (afnio OpenAI clients) through the
                provider's Batch API, at the batch price, in one batch per round of
                dependent calls (``True``, or a
                :class:`~afnio.models.batch.BatchOptions` for the poll interval and
                retries); see :mod:`afnio.models.batch`. The batch ids are kept in
                ``<default_root_dir>/batch_api_state.json``
                (:data:`~afnio.models.batch.BATCH_STATE_FILE`), so calling
                ``validate`` again after an interruption polls the same batches
                instead of paying again; the entry is removed when the pass ends.
        """
        return self._run_eval(
            agent,
            val_dataloader,
            llm_clients,
            "validation_step",
            "val",
            "Validation",
            batch_api=batch_api,
        )

    def test(
        self,
        agent: Module,
        test_dataloader: Any = None,
        llm_clients: Sequence[Any] | None = None,
        *,
        batch_api: bool | BatchOptions = False,
    ) -> dict[str, Any]:
        """Run ``test_step`` over the loader under ``no_grad``; returns the mean metrics
        (``test_<name>``). ``batch_api``: as for :meth:`validate` (its state entry is
        ``"test"``)."""
        return self._run_eval(
            agent,
            test_dataloader,
            llm_clients,
            "test_step",
            "test",
            "Test",
            batch_api=batch_api,
        )

    def _batch_run(self, name: str, batch_api: Any, label: str) -> BatchRun | None:
        """The Batch API run of a standalone pass (``None`` without ``batch_api``);
        its state is the ``name`` entry of :data:`BATCH_STATE_FILE` in the root.
        ``max_cost`` is checked before each batch is submitted, counting what this
        call spent (the Trainer's meter) and what an earlier, interrupted call of
        the pass accounted (the state's cost); so is the spend so far, with no
        estimate, before each of the loader's batches in every round
        (:meth:`_check_spent`: the calls a round makes synchronously)."""
        options = BatchOptions.of(batch_api)
        if options is None:
            return None
        store = BatchStore(self.default_root_dir / BATCH_STATE_FILE, name)
        run = BatchRun(store, options, progress=self.enable_progress_bar, label=label)

        def budget(projected: float, requests: int) -> None:
            self._check_batch_budget(projected, requests, run.prior_cost)

        run.budget = budget
        self.last_batch_run = self._standalone_batch_run = run
        return run

    def _run_eval(
        self,
        agent: Module,
        loader: Any,
        llm_clients: Sequence[Any] | None,
        method: str,
        prefix: str,
        title: str,
        *,
        batch_api: bool | BatchOptions = False,
    ) -> dict[str, Any]:
        if not isinstance(agent, Module):
            raise TypeError(
                f"`agent` must be an afnio Module, got {type(agent).__name__}."
            )
        if loader is None:
            raise ValueError(f"a dataloader is required to {title.lower()}.")
        self._phase_start = LEDGER.snapshot()
        self._meter = _CostMeter(
            self._clients(agent, getattr(agent, "_optimizers", None), llm_clients)
        )
        self._cost_before = 0.0
        self._status("Validation" if prefix == "val" else "Testing")
        run = self._batch_run(
            "validate" if prefix == "val" else "test", batch_api, title
        )
        if run is None:
            metrics = self._evaluate(agent, loader, method, f"[{title}]")
        else:
            # every round sees the batches of the first, in its order (a stream
            # or a shuffling sampler is rewound to the start of the pass's epoch)
            replay = ReplayLoader(loader)
            metrics = run.run(
                lambda: self._evaluate(agent, replay, method, f"[{title}]")
            )
            # what an interrupted earlier call accounted for this pass's batches
            self._cost_before = run.prior_cost
        result = {f"{prefix}_{k}": v for k, v in metrics.items()}
        result["total_cost"] = self._cost()
        self.total_cost = self._cost()
        self._log_pass(prefix, metrics)
        return result

    def _log_pass(self, prefix: str, metrics: Mapping[str, Any]) -> None:
        """The run-log record of a standalone pass: a ``validate()`` waits for the
        next ``fit`` (its ``initial`` record); a ``test()`` after a fit is
        appended to that fit's log (kind ``test``)."""
        try:
            rows = self.phase_rows()
            if prefix == "val":
                record = self._validation_record(
                    "initial", metrics, rows, 0, 0, self.total_cost
                )
                self._pending_initial = (record, self.total_cost)
            elif prefix == "test" and self._fit_end is not None:
                end = self._fit_end
                end["total"] += self.total_cost
                record = self._validation_record(
                    "test", metrics, rows, end["epoch"], end["step"], end["total"]
                )
                self._emit("log_validation", record)
        except Exception as e:  # never fail the pass for its log
            self._logger_failed("run log", prefix, e)

    def predict(
        self,
        agent: Module,
        dataloader: Any,
        *,
        batch_api: bool | BatchOptions = False,
    ) -> list[Any]:
        """Run the forward pass over ``dataloader`` under ``no_grad`` and return the
        outputs, one per batch. Uses ``agent.predict_step(batch, idx)`` when defined,
        else ``agent(inputs)`` with the batch's first element when the batch is a
        tuple or list (``(inputs, targets)``), or the batch itself. ``batch_api``:
        as for :meth:`validate` (its state entry is ``"predict"``)."""
        if not isinstance(agent, Module):
            raise TypeError(
                f"`agent` must be an afnio Module, got {type(agent).__name__}."
            )
        run = self._batch_run("predict", batch_api, "Predict")
        if run is None:
            return self._predict(agent, dataloader)
        # the meter max_cost is checked against before each batch is submitted
        self._meter = _CostMeter(
            self._clients(agent, getattr(agent, "_optimizers", None), None)
        )
        self._cost_before = 0.0
        replay = ReplayLoader(dataloader)  # the same batches in every round
        # what a round spends synchronously is checked before each of its batches
        return run.run(lambda: self._predict(agent, replay, check=self._check_spent))

    def _predict(
        self,
        agent: Module,
        dataloader: Any,
        *,
        check: Callable[[], None] | None = None,
    ) -> list[Any]:
        """The outputs of ``agent`` over ``dataloader``; ``check`` (a budget check)
        runs before each batch."""
        was_training = agent.training
        agent.eval()
        outputs = []
        try:
            with no_grad():
                for idx, batch in enumerate(dataloader):
                    if check is not None:
                        check()
                    try:
                        if hasattr(agent, "predict_step"):
                            outputs.append(agent.predict_step(batch, idx))
                        elif isinstance(batch, (tuple, list)) and batch:
                            outputs.append(agent(batch[0]))
                        else:
                            outputs.append(agent(batch))
                    except BatchDeferred:
                        outputs.append(None)  # a Batch API round: calls collected
        finally:
            agent.train(was_training)
        return outputs

    def phase_rows(self) -> list[PhaseRow]:
        """The LM calls, tokens and cost of the last ``fit``/``validate``/``test`` by
        phase (forward, evaluator, backward, optimizer) and model."""
        start = getattr(self, "_phase_start", None)
        return LEDGER.since(start) if start is not None else []

    def _summary(self) -> None:
        from rich.table import Table

        if self._meter is None or not self.enable_run_summary:
            return
        rows = self._meter.per_client()
        phases = self.phase_rows()
        title = "Run summary"
        if self._summary_prior is not None:  # count the spend made before fit too
            start, prior = self._summary_prior
            merged = {id(row[0]): list(row) for row in prior}
            for client, cost, tokens, calls in rows:
                row = merged.setdefault(id(client), [client, 0.0, 0, 0])
                row[1:] = [row[1] + cost, row[2] + tokens, row[3] + calls]
            rows = [(c, cost, tok, calls) for c, cost, tok, calls in merged.values()]
            phases = LEDGER.since(start)
            title = "Run summary (the first validation included)"
        table = Table(title=title)
        table.add_column("model client")
        table.add_column("LM calls", justify="right")
        table.add_column("tokens", justify="right")
        table.add_column("cost (USD)", justify="right")
        for client, cost, tokens, calls in rows:
            table.add_row(repr(client), str(calls), str(tokens), f"{cost:.6f}")
        if len(rows) > 1:
            table.add_row(
                "total",
                str(sum(r[3] for r in rows)),
                str(sum(r[2] for r in rows)),
                f"{sum(r[1] for r in rows):.6f}",
                style="bold",
            )
        if self.history:
            last = dict(self.history[-1])
            if self._summary_prior is not None and "total_cost" in last:
                last["total_cost"] += sum(row[1] for row in self._summary_prior[1])
            table.caption = _history_text(last, self.show_metrics) or None
        self._print(table)
        if phases:
            by_phase = Table(title="LM calls by phase")
            for name in ("phase", "model", "LM calls", "prompt tokens"):
                by_phase.add_column(
                    name, justify="left" if name in ("phase", "model") else "right"
                )
            by_phase.add_column("completion tokens", justify="right")
            by_phase.add_column("cost (USD)", justify="right")
            for row in phases:
                by_phase.add_row(
                    row.phase,
                    row.model,
                    str(row.calls),
                    str(row.prompt_tokens),
                    str(row.completion_tokens),
                    f"{row.cost:.6f}",
                )
            self._print(by_phase)
        from afnio.models.pricing import unpriced_models

        unpriced = unpriced_models()
        if unpriced:
            self._print(
                f"Models without a price (counted as $0): {', '.join(unpriced)}"
            )
