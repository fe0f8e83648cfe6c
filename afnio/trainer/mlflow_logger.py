"""Track a Trainer run in MLflow: params, per-step metrics and cost, each parameter's
text per step, and the final prompts as MLflow prompt-registry versions.

``MLflowLogger`` is a logger of the Trainer's run log (``Trainer(loggers=[...])``): it
receives the run log's records (schema ``afnio.run_log/1``, already masked and
truncated) and writes them to an MLflow tracking store. It needs the ``mlflow`` extra
(``mlflow-skinny``, ``sqlalchemy`` and ``alembic``: a local SQLite store, no server)::

    from afnio.trainer import Trainer
    from afnio.trainer.mlflow_logger import MLflowLogger

    trainer = Trainer(loggers=[MLflowLogger(tracking_uri="sqlite:///mlflow.db")])

What one run logs (one MLflow run per ``fit()``; a resumed fit continues the same run):

* **params**: afnio's version, the epochs, batch and dataset sizes, the optimizer
  (class, momentum, on_error, models, constraints), each parameter's role; secrets
  masked, values cut to 6,000 characters;
* **metrics**, at the run log's global step: ``train_<metric>`` per optimizer step,
  ``val_<metric>`` per validation (step 0 = before training), ``revert_check_<metric>``,
  ``test_<metric>``; ``cost_usd`` (the run's total so far), ``step_cost_usd`` (this
  step), ``cost_<phase>_usd`` (this step's cost in that phase: ``forward``,
  ``evaluator``, ``backward``, ``optimizer``; 0 when the step made no call in it),
  ``val_cost_usd`` (a validation pass's cost), ``step_calls``,
  ``step_prompt_tokens``, ``step_completion_tokens``, ``params_updated``,
  ``params_failed``, ``reverted``, ``epoch``;
* **artifacts**: ``parameters/<name>/step_00000.txt`` (the initial text) and
  ``parameters/<name>/step_<k>.txt`` for each step ``k`` that changed the parameter;
  a step the Trainer reverted (``revert_on_regression``: the record's ``reverted`` is
  1) keeps the parameter at its text before the step, and the text it rejected is
  stored as ``parameters/<name>/step_<k>_reverted.txt``; ``final/<name>.txt`` at the
  end (the ``end`` record's ``final`` texts); with ``log_records=True`` also every
  run-log record as ``records/step_<k>.json``
  (``records/validation_<kind>_step_<k>.json``);
* **prompts**: at the end of a completed (or budget-stopped) run, each parameter's final
  text (the ``end`` record's ``final``) as a new version of the prompt
  ``<prompt_prefix>.<name>`` (the prefix defaults to the experiment's name, so two
  experiments' ``system_prompt`` are two prompts), converted to MLflow's ``{{var}}``
  syntax (:func:`afnio._template.to_mlflow_template`), tagged with the run and the
  parameter, linked to the run, and named in the run's tag ``afnio.prompt.<name>``
  (``prompts:/<prompt name>/<version>``). A text MLflow would read differently (a
  literal ``{{x}}``) is not registered: a warning names it and the text stays an
  artifact.

The run ends FINISHED (status ``completed``/``budget``), FAILED (``failed``) or KILLED
(``interrupted``).

Resume: a resumed fit continues the same MLflow run (its id is in each checkpoint).
MLflow cannot delete a metric point, so the resumed fit reads the run's metric history
once and does not log a metric again at a step it already holds: for each metric, the
points of the steps redone after the checkpoint stay those the interrupted fit logged
(the run log holds the redone values). A redone step that changes a parameter writes
its text artifact again (same path, the redone text).

A failing tracking store never stops training or holds it up for long: the logger's HTTP
requests use ``request_timeout`` seconds and ``max_retries`` retries (the first at once,
the next 2 s, 4 s, ... later) instead of MLflow's defaults (120 s, 7 retries with
backoff: minutes per call). These are MLflow's ``MLFLOW_HTTP_REQUEST_*`` environment
variables, set only while a logger call runs and restored after it (under a lock:
another thread's MLflow request made at that moment sees them too). When the store
cannot be reached (a connection error, a timeout, retries exhausted on server errors)
the logger warns once and is off for the rest of the fit; the run log holds every
record, so :meth:`MLflowLogger.log_run_log` can log the run later. Any other failure (a
rejected value, a bad URI) logs a warning on the ``afnio.trainer`` logger and the next
call tries again."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from afnio._secrets import mask_secrets
from afnio._template import to_mlflow_template
from afnio.models.phases import PHASES

__all__ = ["INSTALL_HINT", "MLflowLogger"]

logger = logging.getLogger("afnio.trainer")

INSTALL_HINT = (
    "MLflowLogger needs the mlflow extra (mlflow-skinny, sqlalchemy, alembic): "
    "pip install 'afnio-local[mlflow]', or from a checkout pip install -e '.[mlflow]'"
)

MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value (``MAX_PARAM_VAL_LENGTH``); longer values are cut."""
MAX_TAG_CHARS = 5000
"""A safe length for a run tag value; longer values are cut."""

_END_STATUS = {
    "completed": "FINISHED",
    "budget": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}
_REGISTER_ON = frozenset({"completed", "budget"})
_PROMPT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_UNSAFE_METRIC = re.compile(r"[^A-Za-z0-9_./ -]+")
MAX_RETRIES_LIMIT = 10
"""MLflow's upper bound on ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``."""
_HTTP_LOCK = threading.RLock()
# SQLAlchemy 2.1 deprecates a loader strategy MLflow's SQL store still configures
_SQLALCHEMY_NOLOAD = r"The ``noload`` loader strategy is deprecated"


def _import_mlflow() -> Any:
    """Import mlflow, or raise an ImportError that says how to install it."""
    try:
        import mlflow
        from mlflow import MlflowClient  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return mlflow


@contextmanager
def _quiet_store_import() -> Iterator[None]:
    """Silence the SQLAlchemy deprecation MLflow's SQL store triggers when it loads."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=_SQLALCHEMY_NOLOAD, category=DeprecationWarning
        )
        yield


@contextmanager
def _http_settings(timeout: int, retries: int) -> Iterator[None]:
    """MLflow's HTTP request settings for the duration of one logger call.

    MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``..._MAX_RETRIES``,
    ``..._BACKOFF_FACTOR`` and ``..._BACKOFF_JITTER`` from the environment at each
    request (``mlflow.utils.rest_utils.http_request``, the HTTP artifact repository);
    they are set here and the previous values (or their absence) restored after, under
    a process-wide lock so two loggers never interleave their settings.
    """
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }
    with _HTTP_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the tracking store
    cannot be reached: a connection error, a timeout, or retries exhausted on
    server errors. MLflow wraps these in an ``MlflowException`` raised while handling
    them, so the cause/context chain is walked."""
    try:
        from requests import exceptions as http
    except ImportError:  # pragma: no cover - mlflow depends on requests
        kinds: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    else:
        kinds = (
            ConnectionError,
            TimeoutError,
            http.ConnectionError,
            http.Timeout,
            http.RetryError,
        )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"…[+{len(text) - limit} chars]"
    return text[: max(0, limit - len(marker))] + marker


def _safe_name(name: str) -> str:
    """A parameter name as a path segment / prompt-name part (``[A-Za-z0-9_.-]``)."""
    return _UNSAFE_NAME.sub("_", str(name)).strip(".") or "_"


def _metric_key(name: str) -> str:
    return _UNSAFE_METRIC.sub("_", str(name))


def _number(value: Any) -> float | None:
    """A finite float for a metric value, or None when it is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return _cut(text, MAX_PARAM_CHARS)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif value is not None:
        out[prefix] = _param_text(value)


class MLflowLogger:
    """A Trainer logger that tracks the run in MLflow (see the module docstring).

    Args:
        tracking_uri: the tracking store. ``None`` = what MLflow itself uses:
            ``mlflow.set_tracking_uri(...)``, else the ``MLFLOW_TRACKING_URI``
            environment variable, else MLflow's default ``sqlite:///mlflow.db`` in the
            working directory. Local stores are SQLite URIs
            (``sqlite:///mlflow.db``; MLflow 3.10+ no longer tracks to ``./mlruns``
            folders); ``http(s)://`` names a tracking server. The prompt registry is
            the same store unless ``MLFLOW_REGISTRY_URI`` says otherwise.
        experiment: the MLflow experiment's name, created when missing.
        run_name: the MLflow run's name (``None``: MLflow picks one).
        register_prompts: register the final parameter texts as prompt versions.
        prompt_prefix: registered prompts are named ``<prompt_prefix>.<parameter
            name>`` (letters, digits, ``_``, ``-`` and ``.``). ``None`` (default):
            the experiment's name with every run of other characters replaced by
            ``_`` (``"Support bot"`` -> ``Support_bot.system_prompt``), so runs of
            different experiments never add versions to each other's prompts.
        artifact_location: where a newly created experiment stores artifacts (a path
            or URI; ``None``: MLflow's default, ``./mlruns`` under the working
            directory for a local store). Ignored, with a warning, when the
            experiment already exists elsewhere.
        log_records: also store every run-log record as a JSON artifact.
        request_timeout: seconds an HTTP request to a tracking server may take
            (connect and read; a positive number, rounded up to whole seconds).
        max_retries: retries of a failed HTTP request (0 to 10): the first at once,
            the next 2 s, 4 s, ... later.
            With the defaults a call to a server that is down gives up within
            seconds, and one that hangs within about ``request_timeout * (max_retries
            + 1)`` seconds; the logger is then off for the rest of the fit.

    Raises:
        ImportError: mlflow is not installed (the message says how to install it).
        TypeError / ValueError: an argument of the wrong type or form (named).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "afnio",
        run_name: str | None = None,
        register_prompts: bool = True,
        prompt_prefix: str | None = None,
        artifact_location: str | os.PathLike[str] | None = None,
        log_records: bool = False,
        request_timeout: float = 10,
        max_retries: int = 2,
    ) -> None:
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise TypeError(
                "MLflowLogger(tracking_uri=...) takes a str such as "
                f"'sqlite:///mlflow.db', got {type(tracking_uri).__name__}"
            )
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError(
                "MLflowLogger(experiment=...) must be a non-empty str, "
                f"got {experiment!r}"
            )
        if run_name is not None and not isinstance(run_name, str):
            raise TypeError(
                f"MLflowLogger(run_name=...) takes a str, got {type(run_name).__name__}"
            )
        if prompt_prefix is not None and (
            not isinstance(prompt_prefix, str) or not _PROMPT_NAME.match(prompt_prefix)
        ):
            raise ValueError(
                "MLflowLogger(prompt_prefix=...) may hold only letters, digits, '_', "
                f"'-' and '.' (MLflow's prompt-name rule), got {prompt_prefix!r}"
            )
        if artifact_location is not None and not isinstance(
            artifact_location, str | os.PathLike
        ):
            raise TypeError(
                "MLflowLogger(artifact_location=...) takes a path or URI, got "
                f"{type(artifact_location).__name__}"
            )
        if (
            isinstance(request_timeout, bool)
            or not isinstance(request_timeout, int | float)
            or not math.isfinite(request_timeout)
            or request_timeout <= 0
        ):
            raise ValueError(
                "MLflowLogger(request_timeout=...) takes a positive number of seconds, "
                f"got {request_timeout!r}"
            )
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or not 0 <= max_retries <= MAX_RETRIES_LIMIT
        ):
            raise ValueError(
                f"MLflowLogger(max_retries=...) takes an int from 0 to "
                f"{MAX_RETRIES_LIMIT} (MLflow's limit), got {max_retries!r}"
            )
        self._mlflow = _import_mlflow()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.register_prompts = bool(register_prompts)
        self.prompt_prefix = (
            _safe_name(experiment.strip()) if prompt_prefix is None else prompt_prefix
        )
        self.request_timeout = max(1, math.ceil(request_timeout))
        self.max_retries = max_retries
        self.artifact_location = (
            None if artifact_location is None else os.fspath(artifact_location)
        )
        self.log_records = bool(log_records)
        self._client: Any = None
        self._run_id: str | None = None
        self._texts: dict[str, str] = {}
        self._last_step = 0
        self._registered: dict[str, str] = {}
        self._uri: str | None = None
        self._run_dir: Path | None = None
        self._disabled = False
        self._kept: dict[str, int] = {}

    # -- public -----------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (``None`` before :meth:`start` or when it failed)."""
        return self._run_id

    @property
    def registered_prompts(self) -> dict[str, str]:
        """Parameter name -> ``prompts:/<name>/<version>`` that :meth:`finish`
        registered."""
        return dict(self._registered)

    @property
    def disabled(self) -> bool:
        """Whether the tracking store could not be reached during this fit, so the
        logger does nothing until the next :meth:`start`."""
        return self._disabled

    def start(self, run_dir: Path, header: dict, state: dict | None = None) -> None:
        """Open (or, on resume, reopen) the MLflow run and log params and step 0."""
        self._run_id = None
        self._disabled = False
        self._kept = {}
        self._run_dir = Path(run_dir)
        with self._guard("start"):
            self._start(Path(run_dir), header or {}, state)

    def log_step(self, record: dict) -> None:
        """Log one optimizer step: metrics, cost, and the texts that changed."""
        if self._run_id is None or self._disabled:
            return
        with self._guard("log_step"):
            self._log_step(record)

    def log_validation(self, record: dict) -> None:
        """Log a validation's (or test's) metrics at its step."""
        if self._run_id is None or self._disabled:
            return
        with self._guard("log_validation"):
            self._log_validation(record)

    def finish(self, record: dict) -> None:
        """Register the final prompts (completed/budget runs) and end the run."""
        if self._run_id is None or self._disabled:
            return
        with self._guard("finish"):
            self._finish(record or {})

    def log_run_log(self, path: str | os.PathLike[str]) -> str | None:
        """Log a finished (or interrupted) run from its run log, as a new MLflow run.

        For a fit whose tracking store was down: ``path`` is the run's
        ``run_log.jsonl`` (or the run directory holding it). Its records are fed to
        this logger as the Trainer would have fed them (``header``, then each
        ``step``/``validation``, then ``end``; ``resume`` records are skipped: the
        log already holds only the redone lines). A log without an ``end`` record (a
        killed run) ends the MLflow run as KILLED. Failures are warned about as
        during training.

        Returns:
            The new MLflow run's id, or ``None`` when the store could not be used.

        Raises:
            FileNotFoundError: ``path`` is neither a run log nor a directory holding
                ``run_log.jsonl``.
            ValueError: a line of the file (other than a torn last line) is not a
                JSON record, or it has no ``header`` record.
        """
        records = _read_run_log(Path(path))
        file = Path(path) if Path(path).is_file() else Path(path) / "run_log.jsonl"
        header = next(r for r in records if r.get("type") == "header")
        self.start(file.parent, header, None)
        ended = False
        for record in records:
            kind = record.get("type")
            if kind == "step":
                self.log_step(record)
            elif kind == "validation":
                self.log_validation(record)
            elif kind == "end":
                self.finish(record)
                ended = True
        if not ended:
            self.finish(
                {
                    "type": "end",
                    "status": "interrupted",
                    "stopped_reason": "the run log has no end record",
                }
            )
        return None if self._disabled else self._run_id

    def state_dict(self) -> dict:
        """``{"run_id": ...}``: saved in each checkpoint so a resumed fit continues
        the same MLflow run."""
        return {"run_id": self._run_id}

    # -- internals ----------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            with (
                _quiet_store_import(),
                _http_settings(self.request_timeout, self.max_retries),
            ):
                yield
        except Exception as exc:
            if _unreachable(exc):
                self._disabled = True
                where = self._run_dir if self._run_dir is not None else "the run dir"
                logger.warning(
                    "MLflowLogger.%s: the tracking store %s cannot be reached "
                    "(%s: %s); MLflow logging is off for the rest of this fit and "
                    "training goes on. The run log (run_log.jsonl in %s) holds "
                    "every record: log the run later with "
                    "MLflowLogger(...).log_run_log(<that file>)",
                    what,
                    self._uri or self.tracking_uri or "(MLflow's default)",
                    type(exc).__name__,
                    _cut(str(exc), 300),
                    where,
                )
                return
            logger.warning(
                "MLflowLogger.%s failed (%s: %s); training goes on without it",
                what,
                type(exc).__name__,
                exc,
            )

    def _start(self, run_dir: Path, header: dict, state: dict | None) -> None:
        from mlflow import MlflowClient

        uri = self.tracking_uri or self._mlflow.get_tracking_uri()
        self._uri = str(uri)
        self._client = client = MlflowClient(tracking_uri=uri)
        header = mask_secrets(header)
        self._texts = {
            str(p["name"]): p["value"]
            for p in header.get("parameters") or []
            if isinstance(p, Mapping) and isinstance(p.get("value"), str)
        }
        resume = header.get("resume")
        if isinstance(resume, Mapping) and _number(resume.get("step")) is not None:
            self._last_step = int(resume["step"])
        previous = (state or {}).get("run_id")
        if previous:
            try:
                run = client.get_run(previous)
                if run.info.lifecycle_stage == "deleted":
                    raise LookupError("the run was deleted")
            except Exception as exc:  # deleted, or another store
                if _unreachable(exc):
                    raise
                logger.warning(
                    "MLflowLogger: cannot resume MLflow run %s (%s); "
                    "starting a new run",
                    previous,
                    exc,
                )
            else:
                self._run_id = run.info.run_id
                self._kept = self._logged_steps(run)
                client.update_run(self._run_id, status="RUNNING")
                resumed = int(run.data.tags.get("afnio.resumes", "0")) + 1
                client.set_tag(self._run_id, "afnio.resumes", str(resumed))
                if self._kept:
                    client.set_tag(
                        self._run_id,
                        f"afnio.resume.{resumed}",
                        f"resumed after step {self._last_step}; metric points up to "
                        f"step {max(self._kept.values())} kept as first logged",
                    )
                return
        experiment_id = self._experiment_id(client)
        tags = {"afnio.run_dir": str(run_dir.resolve()), "mlflow.source.name": "afnio"}
        if header.get("afnio"):
            tags["afnio.version"] = str(header["afnio"])
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self._run_id = run.info.run_id
        self._log_params(header)
        for name, text in self._texts.items():
            client.log_text(self._run_id, text, self._text_path(name, 0))
        if self.log_records:
            client.log_dict(self._run_id, header, "records/header.json")

    def _logged_steps(self, run: Any) -> dict[str, int]:
        """Metric key -> the highest step the run already holds a point at (read
        once when a fit resumes the run)."""
        kept: dict[str, int] = {}
        for key in run.data.metrics:
            history = self._client.get_metric_history(run.info.run_id, key)
            if history:
                kept[key] = max(int(m.step) for m in history)
        return kept

    def _experiment_id(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            return client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if self.artifact_location is not None and not _same_location(
            found.artifact_location, self.artifact_location
        ):
            logger.warning(
                "MLflowLogger: experiment %r already stores its artifacts in %s; "
                "artifact_location=%r is ignored (choose another experiment name to "
                "use it)",
                self.experiment,
                found.artifact_location,
                self.artifact_location,
            )
        return found.experiment_id

    def _log_params(self, header: dict) -> None:
        from mlflow.entities import Param

        params: dict[str, str] = {}
        for key in ("afnio", "max_epochs", "batch_size", "train_size", "val_size"):
            if header.get(key) is not None:
                params["afnio_version" if key == "afnio" else key] = _param_text(
                    header[key]
                )
        optimizer = header.get("optimizer")
        if isinstance(optimizer, Mapping):
            _flatten("optimizer", dict(optimizer), params)
            if "optimizer.class" in params:
                params["optimizer"] = params.pop("optimizer.class")
        names = []
        for parameter in header.get("parameters") or []:
            if isinstance(parameter, Mapping) and "name" in parameter:
                names.append(str(parameter["name"]))
                if parameter.get("role") is not None:
                    params[f"parameter.{_safe_name(parameter['name'])}.role"] = (
                        _param_text(parameter["role"])
                    )
        if names:
            params["parameters"] = _param_text(names)
        items = [Param(_metric_key(k)[:250], v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self._client.log_batch(self._run_id, params=items[start : start + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, v, stamp, step)
            for key, v in ((_metric_key(k), v) for k, v in values.items())
            if step > self._kept.get(key, -1)  # a resumed run's redone step
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self._client.log_batch(self._run_id, metrics=metrics[start : start + 1000])

    def _text_path(self, name: str, step: int, suffix: str = "") -> str:
        return f"parameters/{_safe_name(name)}/step_{step:05d}{suffix}.txt"

    def _log_step(self, record: dict) -> None:
        step = int(record.get("step") or 0)
        self._last_step = max(self._last_step, step)
        values: dict[str, float] = {}
        for key, value in (record.get("metrics") or {}).items():
            number = _number(value)
            if number is not None:
                key = str(key)
                values[key if key.startswith("train_") else f"train_{key}"] = number
        if record.get("epoch") is not None and _number(record["epoch"]) is not None:
            values["epoch"] = float(record["epoch"])
        if _number(record.get("reverted")) is not None:
            values["reverted"] = float(record["reverted"])
        values.update(_cost_metrics(record.get("cost")))
        params = [p for p in record.get("params") or [] if isinstance(p, Mapping)]
        values["params_updated"] = float(
            sum(p.get("status") == "updated" for p in params)
        )
        values["params_failed"] = float(
            sum(p.get("status") == "failed" for p in params)
        )
        self._log_metrics(values, step)
        reverted = _number(record.get("reverted")) == 1.0
        for parameter in params:
            name, after = str(parameter.get("name")), parameter.get("after")
            if reverted:  # the parameter is back at its text before the step
                if isinstance(after, str) and after != parameter.get("before"):
                    path = self._text_path(name, step, "_reverted")
                    self._client.log_text(self._run_id, after, path)
                if isinstance(parameter.get("before"), str):
                    self._texts[name] = parameter["before"]
            elif isinstance(after, str) and after != self._texts.get(name):
                self._client.log_text(self._run_id, after, self._text_path(name, step))
                self._texts[name] = after
        if self.log_records:
            self._client.log_dict(self._run_id, record, f"records/step_{step:05d}.json")

    def _log_validation(self, record: dict) -> None:
        step = int(record.get("step") or 0)
        kind = str(record.get("kind") or "epoch")
        prefix = {"test": "test_", "revert_check": "revert_check_"}.get(kind, "val_")
        values: dict[str, float] = {}
        for key, value in (record.get("metrics") or {}).items():
            number = _number(value)
            if number is None:
                continue
            key = str(key)
            if kind in ("initial", "epoch"):
                name = key if key.startswith("val_") else f"val_{key}"
            elif kind == "test":
                bare = key.removeprefix("test_").removeprefix("val_")
                name = f"test_{bare}"
            else:
                name = f"{prefix}{key}"
            values[name] = number
        cost = record.get("cost")
        if isinstance(cost, Mapping):
            if _number(cost.get("pass_usd")) is not None:
                values[f"{prefix}cost_usd"] = float(cost["pass_usd"])
            elif isinstance(cost.get("by_phase"), list):
                values[f"{prefix}cost_usd"] = sum(
                    _number(r.get("cost")) or 0.0
                    for r in cost["by_phase"]
                    if isinstance(r, Mapping)
                )
            if _number(cost.get("total_usd")) is not None:
                values["cost_usd"] = float(cost["total_usd"])
        self._log_metrics(values, step)
        if self.log_records:
            self._client.log_dict(
                self._run_id, record, f"records/validation_{kind}_step_{step:05d}.json"
            )

    def _finish(self, record: dict) -> None:
        client, run_id = self._client, self._run_id
        status = str(record.get("status") or "completed")
        failure: Exception | None = None
        try:
            for item in record.get("final") or []:
                if isinstance(item, Mapping) and "name" in item:
                    text = item.get("value", item.get("after"))
                    if isinstance(text, str):
                        self._texts[str(item["name"])] = text
            if _number(record.get("total_cost")) is not None:
                self._log_metrics(
                    {"cost_usd": float(record["total_cost"])}, self._last_step
                )
            client.set_tag(run_id, "afnio.status", status)
            if record.get("stopped_reason"):
                client.set_tag(
                    run_id,
                    "afnio.stopped_reason",
                    _cut(str(record["stopped_reason"]), MAX_TAG_CHARS),
                )
            for name, text in self._texts.items():
                client.log_text(run_id, text, f"final/{_safe_name(name)}.txt")
            if self.log_records:
                client.log_dict(run_id, record, "records/end.json")
            if self.register_prompts and status in _REGISTER_ON:
                for name, text in self._texts.items():
                    self._register(name, text)
        except Exception as exc:
            if _unreachable(exc):
                raise  # ending the run would wait for the store again
            failure = exc
        client.set_terminated(run_id, status=_END_STATUS.get(status, "FAILED"))
        if failure is not None:
            raise failure

    def _register(self, name: str, text: str) -> None:
        try:
            template = to_mlflow_template(text)
        except ValueError as exc:
            logger.warning(
                "MLflowLogger: parameter %r is not registered as an MLflow prompt "
                "(its text stays an artifact of run %s): %s",
                name,
                self._run_id,
                exc,
            )
            return
        prompt_name = f"{self.prompt_prefix}.{_safe_name(name)}"
        version = self._client.register_prompt(
            name=prompt_name,
            template=template,
            commit_message=f"afnio run {self._run_id}, step {self._last_step}",
            tags={
                "afnio.parameter": name,
                "afnio.run_id": self._run_id,
                "afnio.step": str(self._last_step),
                "afnio.experiment": self.experiment,
            },
        )
        uri = f"prompts:/{prompt_name}/{version.version}"
        self._registered[name] = uri
        self._client.set_tag(self._run_id, f"afnio.prompt.{_safe_name(name)}", uri)
        self._link_to_run(version)

    def _link_to_run(self, version: Any) -> None:
        """Show the prompt version on the run's page (MLflow's ``mlflow.linkedPrompts``
        tag); best effort: ``MlflowClient.link_prompt_version_to_run`` would use the
        process-wide tracking store, not this logger's."""
        try:
            from mlflow.tracing.constant import TraceTagKey
            from mlflow.tracing.utils.prompt import update_linked_prompts_tag
        except ImportError:  # pragma: no cover - another MLflow layout
            return
        run = self._client.get_run(self._run_id)
        current = run.data.tags.get(TraceTagKey.LINKED_PROMPTS)
        updated = update_linked_prompts_tag(current, [version])
        if updated != current:
            self._client.set_tag(self._run_id, TraceTagKey.LINKED_PROMPTS, updated)


def _cost_metrics(cost: Any) -> dict[str, float]:
    """``cost_usd``, ``step_cost_usd``, ``cost_<phase>_usd`` (0 for each of afnio's
    phases the step did not call) and call/token counts of a step's ``cost``."""
    if not isinstance(cost, Mapping):
        return {}
    values: dict[str, float] = {}
    if _number(cost.get("total_usd")) is not None:
        values["cost_usd"] = float(cost["total_usd"])
    if _number(cost.get("step_usd")) is not None:
        values["step_cost_usd"] = float(cost["step_usd"])
    rows = [r for r in cost.get("by_phase") or [] if isinstance(r, Mapping)]
    for field in ("calls", "prompt_tokens", "completion_tokens"):
        values[f"step_{field}"] = float(sum(_number(r.get(field)) or 0 for r in rows))
    phases = dict.fromkeys(PHASES, 0.0)
    for row in rows:
        phase = _safe_name(str(row.get("phase") or "other"))
        phases[phase] = phases.get(phase, 0.0) + (_number(row.get("cost")) or 0.0)
    for phase, spent in phases.items():
        values[f"cost_{phase}_usd"] = spent
    return values


def _read_run_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run log (a file, or a directory holding ``run_log.jsonl``);
    a torn last line (a killed run) is skipped."""
    file = path / "run_log.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"MLflowLogger.log_run_log: no run log at {file} (pass a run's "
            "run_log.jsonl or the run directory holding it)"
        )
    lines = file.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if number == len(lines):  # no newline after it: a torn last line
                continue
            raise ValueError(
                f"MLflowLogger.log_run_log: {file} line {number} is not a JSON "
                f"record ({exc})"
            ) from None
        if isinstance(record, dict):
            records.append(record)
    if not any(r.get("type") == "header" for r in records):
        raise ValueError(
            f"MLflowLogger.log_run_log: {file} has no header record (is it a run "
            "log written by afnio's Trainer?)"
        )
    return records


def _same_location(stored: str | None, wanted: str) -> bool:
    """Whether an experiment's stored artifact location is the ``wanted`` one."""
    if not stored:
        return False
    if stored == wanted:
        return True
    local = stored.removeprefix("file://")
    try:
        return Path(local).resolve() == Path(wanted.removeprefix("file://")).resolve()
    except (OSError, ValueError):
        return False
