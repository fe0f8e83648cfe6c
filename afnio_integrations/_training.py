"""Pieces shared by the integrations' optimization loops (LangChain ``optimize``, DSPy
``AfnioTGD``): a dataset of indices (or of a streamed trainset's rows), an agent that
runs one step per split, and the ``model=`` a client needs (:func:`model_args`),
settled before any LM call; the ``loggers=`` they pass to the Trainer
(:func:`check_loggers`) and the HTML run report written when a run ends
(:func:`write_run_report`)."""

from __future__ import annotations

import inspect
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.options import BackwardOptions, get_backward_options
from afnio.cognitive.modules.module import Module
from afnio.models.phases import LEDGER, PhaseRow
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, Dataset, IterableDataset
from afnio_integrations._recorded import batch_rows
from afnio_integrations._report import OptimizeReport

__all__ = [
    "IndexDataset",
    "LoopOutcome",
    "SplitAgent",
    "StreamRows",
    "stream_rows",
    "check_loggers",
    "client_model",
    "model_args",
    "needs_model",
    "parameter_feedback",
    "train_agent",
    "write_run_report",
]

logger = logging.getLogger("afnio.integrations")

LOGGER_METHODS = ("start", "log_step", "log_validation", "finish", "state_dict")
"""What ``loggers=`` items must have (``afnio.trainer.run_log.Logger``)."""

_LOGGERS_HOW = (
    "pass a list of loggers, e.g. loggers=[MLflowLogger(tracking_uri="
    "'sqlite:///mlflow.db')] (from afnio.trainer.loggers import MLflowLogger), "
    "loggers=[] for the run log only, or None for the defaults (run log and CSV)"
)


class IndexDataset(Dataset):
    """``n`` items, each ``(index, index)``: the loader batches indices and the agent
    looks the rows up (they can be any Python objects)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, index


class StreamRows(IterableDataset):
    """A trainset read as a stream (``source``, an IterableDataset such as a
    ``JsonlDataset`` of dict rows), as the loops read a trainset: items
    ``(index, index)`` like :class:`IndexDataset`, ``index`` counting the rows of
    the epoch from 0; each row is checked when it is read (``check(row, index)``
    returns what the agent looks up, raising on a bad row) and kept in :attr:`rows`
    (by index) only until ``keep`` more rows were read, so memory holds about one
    batch whatever the trainset's size. Each epoch reads ``source`` again, in its
    own order (the DataLoader cannot shuffle a stream).

    When ``source`` has ``state_dict``/``load_state_dict`` (``JsonlDataset``) so
    does this dataset, and a Trainer checkpoint resumes it exactly (see
    :func:`stream_rows`).
    """

    def __init__(
        self, source: IterableDataset, check: Callable[[Any, int], Any], keep: int
    ) -> None:
        self.source = source
        self.check = check
        self.keep = max(1, keep)
        self.rows: dict[int, Any] = {}
        self.epoch_rows: list[int] = []  # rows read by each epoch (this process)
        self._index = 0  # the next row's index in this epoch
        self._resume_index = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        samples = iter(self.source)  # a new epoch (or a restored one) of the source
        self._index, self._resume_index = self._resume_index, 0
        self.rows.clear()
        self.epoch_rows.append(0)
        return self._read(samples)

    def _read(self, samples: Iterator[Any]) -> Iterator[tuple[int, int]]:
        for sample in samples:
            index = self._index
            self.rows[index] = self.check(sample, index)
            self.rows.pop(index - self.keep, None)
            self._index = index + 1
            self.epoch_rows[-1] += 1
            yield index, index

    def __len__(self) -> int:
        return len(self.source)


class _ResumableStreamRows(StreamRows):
    """A :class:`StreamRows` whose position is the source's and the row index."""

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "index": self._index}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])  # type: ignore[attr-defined]
        self._resume_index = int(state["index"])


def stream_rows(
    source: IterableDataset, check: Callable[[Any, int], Any], keep: int
) -> StreamRows:
    """A :class:`StreamRows` over ``source``, resumable when ``source`` is."""
    if hasattr(source, "state_dict") and hasattr(source, "load_state_dict"):
        return _ResumableStreamRows(source, check, keep)
    return StreamRows(source, check, keep)


def _rows_of(batch: Any) -> Any:
    """The row column of a batch of ``(index, index)`` pairs (what the steps run
    on, in order), or ``None``."""
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, list) or (
            isinstance(first, Variable) and isinstance(first.data, list)
        ):
            return first
    return None


class SplitAgent(Module):
    """A Trainer agent whose steps all run :meth:`_step` on a split (``"train"`` for
    training, ``"val"`` for validation and test) and whose optimizer is built by
    ``make_optimizer``."""

    def __init__(self, make_optimizer: Callable[[], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_make_optimizer", make_optimizer)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        raise NotImplementedError  # abstract: every subclass defines its step

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        # the traced batch stacks its samples in the order of the batch's rows:
        # its feedback is credited to them (provenance)
        with batch_rows(_rows_of(batch)):
            return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        """The optimizer built by ``make_optimizer``; before each of its steps, the
        feedback its parameters received is kept (see :attr:`last_feedback`)."""
        optimizer = self._make_optimizer()
        object.__setattr__(self, "last_feedback", {})
        step = optimizer.step

        def step_keeping_feedback(*args: Any, **kwargs: Any) -> Any:
            feedback = parameter_feedback(optimizer)
            if feedback:
                object.__setattr__(self, "last_feedback", feedback)
            return step(*args, **kwargs)

        optimizer.step = step_keeping_feedback
        return optimizer


def parameter_feedback(optimizer: Any) -> dict[str, str]:
    """The feedback (the texts of ``.grad``, non-blank, joined by a blank line) each
    trainable parameter of ``optimizer`` holds, by the parameter's role; parameters
    without feedback are left out."""
    feedback: dict[str, str] = {}
    for group in getattr(optimizer, "param_groups", []):
        for param in group.get("params", []):
            if not getattr(param, "requires_grad", False):
                continue
            texts = [
                str(getattr(g, "data", g)).strip() for g in getattr(param, "grad", [])
            ]
            texts = [t for t in texts if t]
            if texts:
                role = str(getattr(param, "role", "") or "parameter")
                key, n = role, 2
                while key in feedback:
                    key, n = f"{role} ({n})", n + 1
                feedback[key] = "\n\n".join(texts)
    return feedback


def check_loggers(loggers: Any) -> list[Any] | None:
    """``loggers=`` of ``optimize()``/``AfnioTGD`` checked before any LM call: ``None``
    (the Trainer's defaults: the run log ``run_log.jsonl`` and a CSV logger), or a
    logger or a list (or tuple) of objects with the methods ``start``, ``log_step``,
    ``log_validation``, ``finish`` and ``state_dict`` (see
    ``afnio.trainer.run_log.Logger``), returned as a new list.

    Raises:
        TypeError: ``loggers`` is neither a logger nor a list of them, or holds
            an item without those methods (named by its index).
    """
    if loggers is None:
        return None
    one = not isinstance(loggers, (list, tuple))
    if one and all(callable(getattr(loggers, m, None)) for m in LOGGER_METHODS):
        # one logger, as ``Trainer(loggers=...)`` accepts it
        return [loggers]
    if one:
        raise TypeError(
            f"`loggers` must be a list of loggers, got {type(loggers).__name__} "
            f"({loggers!r:.80}): {_LOGGERS_HOW}."
        )
    for i, item in enumerate(loggers):
        missing = [m for m in LOGGER_METHODS if not callable(getattr(item, m, None))]
        if missing:
            raise TypeError(
                f"`loggers[{i}]` is {type(item).__name__} ({item!r:.80}), not a "
                f"logger: it lacks {', '.join(missing)} (a logger has the methods "
                f"{', '.join(LOGGER_METHODS)}, see afnio.trainer.run_log.Logger; "
                f"or use afnio.trainer.loggers.CSVLogger/MLflowLogger); "
                f"{_LOGGERS_HOW}."
            )
    return list(loggers)


def write_run_report(run_dir: str | Path) -> str | None:
    """Write the HTML report of the run in ``run_dir`` (a run folder, or its run-log
    file: :func:`afnio.report.write_report`, ``report.html`` beside it, no LM call);
    its path, or ``None`` when it could not be written: then a warning (logger
    ``afnio.integrations``) says why and how to write it later, and the run's
    results are kept (this never raises an ``Exception``)."""
    try:
        from afnio.report import write_report

        return str(write_report(run_dir))
    except Exception as e:
        logger.warning(
            "The run report could not be written in %s (%s: %s); the run's results "
            "are kept. Write it from the run log with: afnio report %s",
            run_dir,
            type(e).__name__,
            e,
            run_dir,
        )
        return None


def _has_steps(trainer: Trainer) -> bool:
    """Whether the trainer's run log holds at least one optimizer step record."""
    try:
        from afnio.report import load_run_log

        records = load_run_log(trainer.run_log_path)
    except Exception:  # no run log (yet), or unreadable: nothing to report
        return False
    return any(r.get("type") == "step" for r in records)


@dataclass
class LoopOutcome:
    """What :func:`train_agent` measured."""

    score_before: float | None
    score_after: float | None  # None: stopped early, the last texts were not scored
    history: list[dict[str, Any]]
    calls: int
    tokens: int
    cost: float
    stopped_reason: str | None
    phases: list[PhaseRow]
    train_samples: int
    val_samples: int
    steps: int
    # the feedback the parameters held at the last optimizer step that had any
    last_feedback: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None  # the Trainer's root folder (run log, metrics)
    report_path: str | None = None  # the HTML report, None if it was not written
    # the backward options the run's backward passes used (the active ones)
    backward: BackwardOptions | None = None

    def report(
        self,
        prompts_before: dict[str, str],
        prompts_after: dict[str, str],
        failed_samples: int = 0,
    ) -> OptimizeReport:
        """The run's :class:`OptimizeReport`, with the texts before and after."""
        return OptimizeReport(
            last_feedback=dict(self.last_feedback),
            score_before=self.score_before,
            score_after=self.score_after,
            prompts_before=prompts_before,
            prompts_after=prompts_after,
            history=self.history,
            calls=self.calls,
            tokens=self.tokens,
            cost=self.cost,
            stopped_reason=self.stopped_reason,
            failed_samples=failed_samples,
            phases=self.phases,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            steps=self.steps,
            run_dir=self.run_dir,
            report_path=self.report_path,
            backward=self.backward,
        )


def _calls_and_tokens(trainer: Trainer) -> tuple[int, int]:
    meter = trainer._meter
    if meter is None:
        return 0, 0
    rows = meter.per_client()
    return sum(r[3] for r in rows), sum(r[2] for r in rows)


def train_agent(
    agent: SplitAgent,
    *,
    n_train: int,
    n_val: int,
    score_key: str,
    clients: list[Any],
    epochs: int,
    batch_size: int,
    seed: int,
    max_cost: float | None,
    revert_on_regression: bool,
    progress: bool,
    root_dir: str | None,
    train_stream: StreamRows | None = None,
    loggers: list[Any] | None = None,
) -> LoopOutcome:
    """Score the validation split, train with the Trainer, and measure the run.

    ``train_stream``: a trainset read as a stream (``n_train`` is then unused): its
    batches come in the stream's own order (``seed`` does not apply), and the
    samples and steps reported are those read.

    ``clients`` are metered besides the agent's own (a traced program's LM usage), so
    ``max_cost`` and the totals cover every LM call; the first validation counts in
    the budget and in the Trainer's run summary too (its figures are the report's).
    Metrics and checkpoints go to ``root_dir``, or to a new temporary
    folder with no checkpoints (never the current directory; made with
    :func:`tempfile.mkdtemp` as ``<temp dir>/afnio-optimize-*`` and not deleted,
    so its run log and report outlive the call).

    ``loggers``: the Trainer's ``loggers=`` (checked by :func:`check_loggers`;
    ``None``: its defaults). The Trainer always writes the run log
    ``run_log.jsonl`` in the run's folder.

    The HTML run report (:func:`write_run_report`, ``<run dir>/report.html``) is
    written when the run ends: after a completed run, after a ``max_cost`` stop,
    and, when the run failed (an exception from a step) after at least one
    optimizer step was logged, before the exception propagates (a note on the
    exception names the report). A run that failed before any optimizer step
    (e.g. in the first validation) gets no report: there is nothing to show. A
    report that cannot be written only warns.

    The run's backward passes use the :class:`~afnio.BackwardOptions` active when
    this is called (the callers open ``afnio.backward_options(...)`` around it: the
    Trainer runs every step, validation and backward pass in this thread's
    context); the outcome records them (``backward``).
    """
    backward = get_backward_options()
    phase_start = LEDGER.snapshot()
    trainer = Trainer(
        max_epochs=epochs,
        enable_progress_bar=progress,
        enable_agent_summary=False,
        enable_run_summary=progress,  # progress=False: nothing on stdout
        # the bar shows the per-sample score users read (accuracy, score), not the
        # batch's summed score that the Trainer's loss is
        show_metrics=(score_key.removeprefix("val_"),),
        enable_checkpointing=root_dir is not None,
        default_root_dir=root_dir or tempfile.mkdtemp(prefix="afnio-optimize-"),
        max_cost=max_cost,
        revert_on_regression=revert_on_regression,
        loggers=loggers,
    )
    val_loader = DataLoader(IndexDataset(n_val), batch_size=max(1, n_val))
    if train_stream is not None:
        train_loader = DataLoader(train_stream, batch_size=batch_size)
    else:
        train_loader = DataLoader(
            IndexDataset(n_train), batch_size=batch_size, shuffle=True, seed=seed
        )
    try:
        before = trainer.validate(agent, val_loader, llm_clients=clients)
        before = before.get(score_key)
        spent = trainer.total_cost
        calls_before, tokens_before = _calls_and_tokens(trainer)
        if trainer._meter is not None:  # fit's run summary counts the first val
            trainer._summary_prior = (phase_start, trainer._meter.per_client())
        if max_cost is not None:
            trainer.max_cost = max(0.0, max_cost - spent)
        history = trainer.fit(agent, train_loader, val_loader, llm_clients=clients)
    except Exception as e:
        # a run that failed after some steps: its report shows them (named on the
        # exception); one that failed before any step has nothing to show
        if _has_steps(trainer):
            path = write_run_report(trainer.run_log_path)
            if path is not None:
                e.add_note(f"run report (the steps before the failure): {path}")
        raise
    # the run log the Trainer wrote (a custom JsonlLogger file name too)
    report_path = write_run_report(trainer.run_log_path)
    calls, tokens = _calls_and_tokens(trainer)
    after = None
    if trainer.stopped_reason is None:
        after = history[-1].get(score_key) if history else before
    epochs_run = len(history)
    if train_stream is not None:  # what was read
        train_samples = sum(train_stream.epoch_rows)
        steps = sum(math.ceil(n / batch_size) for n in train_stream.epoch_rows)
    else:
        train_samples = n_train * epochs_run
        steps = math.ceil(n_train / batch_size) * epochs_run
    return LoopOutcome(
        train_samples=train_samples,
        val_samples=n_val * (epochs_run + 1),
        steps=steps,
        score_before=before,
        score_after=after,
        history=history,
        calls=calls_before + calls,
        tokens=tokens_before + tokens,
        cost=spent + trainer.total_cost,
        stopped_reason=trainer.stopped_reason,
        phases=LEDGER.since(phase_start),
        last_feedback=dict(getattr(agent, "last_feedback", {})),
        run_dir=str(trainer.default_root_dir),
        report_path=report_path,
        backward=backward,
    )


def needs_model(client: Any) -> bool:
    """Whether ``client.achat`` requires a ``model=`` argument (afnio's OpenAI
    clients do; the LangChain and DSPy adapters name their model themselves)."""
    try:
        params = inspect.signature(client.achat).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    param = params.get("model")
    return (
        param is not None
        and param.default is inspect.Parameter.empty
        and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    )


def client_model(client: Any) -> str | None:
    """The model ``client`` already names, if any: a backward-client singleton's
    ``model``, a LangChain chat model's ``model_name``/``model``, a DSPy LM's
    ``model``, or a ``model``/``model_name`` string attribute of the client."""
    from afnio._model_client import ModelClientSingleton

    if isinstance(client, ModelClientSingleton):
        name = client._completion_args.get("model") or client._model
        return name if isinstance(name, str) and name else None
    candidates = [client, getattr(client, "model", None), getattr(client, "lm", None)]
    for owner in candidates:
        for attr in ("model_name", "model"):
            name = getattr(owner, attr, None)
            if isinstance(name, str) and name:
                return name
    return None


def model_args(
    client: Any,
    args: dict[str, Any],
    *,
    what: str,
    default: str | None = None,
    how: str,
) -> dict[str, Any]:
    """``args`` with a ``model`` when ``client`` needs one (:func:`needs_model`):
    ``args["model"]`` if given, else ``default`` (e.g. the backward client's model),
    else the model the client names itself (:func:`client_model`).

    Args:
        what: the client in a message (``"the optimizer client"``).
        how: what the user passes to name the model (``"model='gpt-4o-mini'"``).

    Raises:
        ValueError: the client needs a model and none was found (before any LM
            call).
    """
    args = dict(args)
    if args.get("model") is not None or not needs_model(client):
        return args
    model = default or client_model(client)
    if model is None:
        raise ValueError(
            f"{what} {client!r} needs a model name and none was given: pass {how} "
            "(no LM call was made)."
        )
    args["model"] = model
    return args
