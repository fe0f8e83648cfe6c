"""Loggers for :class:`~afnio.trainer.Trainer` (``Trainer(loggers=[...])``).

Every logger receives the records of the run log (:mod:`afnio.trainer.run_log`):
``start`` when a fit begins or resumes, one ``log_step`` per optimizer step,
``log_validation`` per validation pass, ``finish`` at the end; its ``state_dict`` is
saved in every checkpoint and handed back to ``start`` when the run resumes.

* :class:`JsonlLogger` (= :class:`~afnio.trainer.run_log.RunLogWriter`): the run log
  ``run_log.jsonl``, always present (``afnio report`` reads it).
* :class:`CSVLogger`: ``metrics_steps.csv``, one row per step and per validation.
* :class:`MLflowLogger` (:mod:`afnio.trainer.mlflow_logger`, extra ``mlflow``):
  params, per-step metrics and cost, parameter texts and the final prompts in an
  MLflow tracking store (``mlflow`` is imported only when one is created).

``Trainer(loggers=None)`` uses ``[JsonlLogger(), CSVLogger()]``; a list without a
``JsonlLogger`` gets one put first; ``loggers=[]`` writes the run log only.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from afnio.models.phases import PHASES
from afnio.trainer.mlflow_logger import MLflowLogger
from afnio.trainer.run_log import (
    RUN_LOG_FILE,
    SCHEMA,
    Logger,
    RunLogWriter,
    check_file_name,
)

__all__ = ["CSVLogger", "JsonlLogger", "Logger", "MLflowLogger", "RunLogWriter"]

JsonlLogger = RunLogWriter
"""The run-log writer under the name of its format."""

_FIXED = (
    "type",
    "kind",
    "step",
    "epoch",
    "batch",
    "reverted",
    "cost_usd",
    "total_usd",
    *(f"cost_{phase}_usd" for phase in PHASES),
)


def _run_log_in(run_dir: Path) -> Path | None:
    """The run log in ``run_dir``: ``run_log.jsonl``, else the one ``*.jsonl`` file
    whose first line is an ``afnio.run_log`` header (a custom file name)."""
    default = run_dir / RUN_LOG_FILE
    if default.is_file():
        return default
    found = []
    for path in sorted(run_dir.glob("*.jsonl")):
        try:
            with open(path, "rb") as f:
                first = json.loads(f.readline() or b"null")
        except (OSError, ValueError):
            continue
        if isinstance(first, dict) and first.get("schema") == SCHEMA:
            found.append(path)
    return found[0] if len(found) == 1 else None


class CSVLogger:
    """One CSV row per optimizer step and per validation pass, in
    ``<run dir>/<filename>`` (default ``metrics_steps.csv``).

    Columns, in this order: ``type`` (``step`` or ``validation``), ``kind`` (a
    validation's: ``initial``, ``epoch``, ``revert_check``, ``test``), ``step``,
    ``epoch``, ``batch``, ``reverted``, ``cost_usd`` (the step's or the pass's),
    ``total_usd`` (the fit's spend so far), ``cost_<phase>_usd`` for the phases
    ``forward``, ``evaluator``, ``backward``, ``optimizer``, then the metrics as they
    first appear: ``train_<name>`` for a step, ``val_<name>`` for a validation,
    ``test_<name>`` for a test. A metric first seen late adds its column (the file is
    written again with the wider header; earlier rows leave it empty).

    A resumed fit keeps the rows written up to its checkpoint and drops the rest, as
    the run log does: it rebuilds them from the run log (started, and cut back to
    the checkpoint, before this logger), so a CSV torn by a kill while it was being
    written again is repaired; without a run log in the folder it keeps the first
    rows of the CSV itself. Nothing is fsynced or renamed.

    Args:
        filename: the file name in the run's folder (no directories).
    """

    def __init__(self, filename: str = "metrics_steps.csv") -> None:
        self.filename = check_file_name(filename)
        self.run_log_file: str | None = None
        """The run log's file name in the run folder, which a resume rebuilds the
        rows from (the Trainer sets it; ``None``: found as :func:`_run_log_in`)."""
        self.path: Path | None = None
        self.columns: list[str] = list(_FIXED)
        self.rows: list[dict[str, Any]] = []
        self._new: list[str] = []
        self._file: Any = None

    def __repr__(self) -> str:
        return f"CSVLogger(filename={self.filename!r})"

    def start(self, run_dir: Path, header: dict[str, Any], state: dict | None) -> None:
        """A fresh fit starts the file anew; a resumed one keeps the first
        ``state["rows"]`` rows (every complete row without a count)."""
        self.close()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / self.filename
        self.columns = list(_FIXED)
        self.rows = []
        if state is not None:
            if not self._replay_run_log(run_dir):
                self._read_rows(state)
            keep = state.get("rows") if isinstance(state, Mapping) else None
            if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0:
                self.rows = self.rows[:keep]  # never more rows than the checkpoint
        self._rewrite()

    def _read_rows(self, state: Mapping[str, Any]) -> None:
        """The rows of the CSV file itself (when no run log can be replayed)."""
        assert self.path is not None
        if not self.path.is_file():
            return
        text = self.path.read_text("utf-8", errors="replace")
        if text and not text.endswith("\n"):  # a torn last line
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        for name in reader.fieldnames or []:
            if name not in self.columns:
                self.columns.append(name)
        self.rows = [dict(row) for row in reader]

    def _replay_run_log(self, run_dir: Path) -> bool:
        """Rebuild the rows from the run's log (already cut back to the checkpoint
        when it resumes: the Trainer starts it first): a CSV torn by a kill during
        its rewrite is repaired. ``False`` when the folder holds no run log."""
        if self.run_log_file is not None:
            log: Path | None = run_dir / self.run_log_file
            if not log.is_file():  # type: ignore[union-attr]
                return False
        else:
            log = _run_log_in(run_dir)
        if log is None:
            return False
        rows, self.rows = self.rows, []
        self._file = None
        path, self.path = self.path, None  # rows only: _add must not write
        try:
            for line in log.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if not isinstance(record, dict):
                    continue
                if record.get("type") == "step":
                    self._row_of_step(record)
                elif record.get("type") == "validation":
                    self._row_of_validation(record)
        except OSError:
            self.rows = rows
            return False
        finally:
            self.path = path
        return True

    def _rewrite(self) -> None:
        assert self.path is not None
        self.close()
        self._file = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        writer = csv.DictWriter(self._file, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        self._file.flush()

    def _add(self, row: dict[str, Any]) -> None:
        if self.path is None:
            raise RuntimeError(
                "CSVLogger.start() must be called before rows are logged."
            )
        self._append(row)
        new = self._new
        if new:
            finished = self._file is None
            self._rewrite()
            if finished:
                self.close()
            return
        if self._file is None:  # after finish (a test after fit)
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, self.columns, lineterminator="\n").writerow(row)
            return
        csv.DictWriter(self._file, self.columns, lineterminator="\n").writerow(row)
        self._file.flush()

    def _append(self, row: dict[str, Any]) -> None:
        """Keep ``row`` and widen the columns (``self._new``: the added ones)."""
        self.rows.append(row)
        self._new = [key for key in row if key not in self.columns]
        self.columns.extend(self._new)

    @staticmethod
    def _costs(row: dict[str, Any], cost: Any, own: str) -> None:
        if not isinstance(cost, Mapping):
            return
        row["cost_usd"] = cost.get(own)
        row["total_usd"] = cost.get("total_usd")
        for phase in PHASES:
            row[f"cost_{phase}_usd"] = sum(
                float(r.get("cost") or 0.0)
                for r in cost.get("by_phase") or []
                if isinstance(r, Mapping) and r.get("phase") == phase
            )

    def log_step(self, record: dict[str, Any]) -> None:
        """A ``step`` row: its training metrics as ``train_<name>``."""
        self._add(self._step_row(record))

    def _row_of_step(self, record: dict[str, Any]) -> None:
        self._append(self._step_row(record))

    def _row_of_validation(self, record: dict[str, Any]) -> None:
        self._append(self._validation_row(record))

    def _step_row(self, record: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "type": "step",
            "step": record.get("step"),
            "epoch": record.get("epoch"),
            "batch": record.get("batch"),
            "reverted": record.get("reverted"),
        }
        self._costs(row, record.get("cost"), "step_usd")
        for key, value in (record.get("metrics") or {}).items():
            row[f"train_{key}"] = value
        return row

    def log_validation(self, record: dict[str, Any]) -> None:
        """A ``validation`` row: its metrics as ``val_<name>`` (``test_<name>``
        for a test)."""
        self._add(self._validation_row(record))

    def _validation_row(self, record: dict[str, Any]) -> dict[str, Any]:
        kind = record.get("kind")
        row: dict[str, Any] = {
            "type": "validation",
            "kind": kind,
            "step": record.get("step"),
            "epoch": record.get("epoch"),
        }
        self._costs(row, record.get("cost"), "pass_usd")
        prefix = "test" if kind == "test" else "val"
        for key, value in (record.get("metrics") or {}).items():
            row[f"{prefix}_{key}"] = value
        return row

    def finish(self, record: dict[str, Any]) -> None:
        """Close the file (the end of a run adds no row)."""
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """``{"path": file name, "rows": rows written so far}``."""
        return {"path": self.filename, "rows": len(self.rows)}

    def close(self) -> None:
        """Close the file (a later row reopens it to append)."""
        if self._file is not None:
            self._file.close()
            self._file = None
