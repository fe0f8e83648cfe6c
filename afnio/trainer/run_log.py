"""The run log: ``<run dir>/run_log.jsonl``, what a training run did and why, step by
step (schema ``afnio.run_log/1``).

The :class:`~afnio.trainer.Trainer` writes one JSON object per line, ``"type"``
first, appended and flushed line by line (never ``os.fsync``/``os.replace``: a line
handed to the OS survives a killed process; a torn last line is the only damage a
crash can do, and readers skip it). Records, in order:

* ``header`` (first line of a fresh ``fit``): ``schema`` (:data:`SCHEMA`), ``afnio``
  (version), ``started`` (ISO time), ``max_epochs``, ``batch_size``,
  ``train_size``, ``val_size`` (``null`` when unknown), ``optimizer`` (``class``,
  ``momentum``, ``on_error``, ``models``, ``constraints`` cut to
  :data:`CONSTRAINTS_CHARS`), ``parameters`` (``name``, ``role``, ``value``: each
  trainable parameter's text when the run starts) and ``backward_options``
  (``evaluator_feedback``: ``"lm"`` or ``"direct"``, ``chat_samples_per_call``: the
  :class:`afnio.BackwardOptions` active when the run log started, which the run's
  backward passes use; added within schema ``afnio.run_log/1``, absent from logs
  written before it).
* ``resume`` (a ``fit(ckpt_path=...)`` continuing the log): ``ts``,
  ``from_checkpoint``, ``epoch``, ``batch``, ``step`` (the last step the checkpoint
  holds) and ``exact`` (``false`` when the checkpoint did not store the log's
  length, e.g. one written before the run log existed: the file is kept whole).
* ``validation``: ``step`` (after which optimizer step; 0 = before training),
  ``epoch``, ``kind`` (``"initial"``: a ``validate()`` before ``fit`` on the same
  Trainer; ``"epoch"``; ``"revert_check"``; ``"test"``: a ``test()`` after ``fit``),
  ``metrics`` (the pass's mean metrics, unprefixed), ``cost`` (``total_usd``: the
  fit's spend so far, ``pass_usd``, ``by_phase``), ``ts``.
* ``step`` (one per optimizer step): ``step`` (global, 1-based), ``epoch``,
  ``batch``, ``samples`` (``dataset: "train"``, ``indices``, ``indexed_by``:
  ``"dataset"`` when they are dataset indices, ``"batch"`` when only in-batch
  positions are known), ``metrics`` (the batch's training metrics), ``reverted``
  (1/0 with ``revert_on_regression``, else ``null``), ``params`` (per trainable
  parameter: ``name``, ``before``, ``after`` (``null`` = unchanged), ``status``
  (``updated``, ``unchanged``, ``no_feedback``, ``failed``), ``answer``
  (``{"error", "attempts"}``, plus ``raw_answer`` on failure; ``null`` when the
  optimizer reports nothing), ``feedback`` (``[{"text", "samples", "call_samples",
  "count"}]``: identical texts grouped, most repeated first, ``samples`` the union
  of the samples they were written about, in the ``indexed_by`` numbering,
  ``call_samples`` the samples the one LM call that wrote them covered when it
  covered several; ``null`` = unknown) and ``feedback_shown`` (the feedback text
  the optimizer's prompt showed)), ``cost`` (``total_usd``: the fit's spend so far,
  ``step_usd``, ``by_phase``: ``[{"phase", "model", "calls", "prompt_tokens",
  "completion_tokens", "cost"}]``), ``ts``, and ``truncated`` when something was
  cut.
* ``end``: ``ts``, ``status`` (``completed``, ``budget``, ``failed``,
  ``interrupted``), ``stopped_reason``, ``error`` (failed runs), ``total_cost``,
  ``steps`` and ``final`` (``[{"name", "value"}]``).

Truncation (per ``step`` record; :func:`prepare_record`): the parameter texts
(``before``/``after``) are never cut; the rest of the line is kept within
:data:`STEP_BUDGET` bytes (UTF-8 JSON) by, in order:

1. each feedback text cut to :data:`FEEDBACK_TEXT_CHARS` characters, ending with
   ``…[+N chars]``; ``feedback_shown`` to :data:`FEEDBACK_SHOWN_CHARS`; an
   optimizer error and raw answer, and any string metric, to :data:`ERROR_CHARS`;
2. each list of sample indices (``samples``, ``call_samples``, the step's
   ``indices``) cut to :data:`SAMPLES_MAX` entries, with ``<key>_more: N``;
3. if still over budget, feedback items dropped, the least repeated first (items
   are listed most repeated first, so the list loses its tail), the number dropped
   in the parameter's ``feedback_dropped``;
4. if still over budget, ``feedback_shown`` cut further (down to
   :data:`MIN_SHOWN_CHARS`), then the remaining long strings (errors, metrics) to
   :data:`MIN_SHOWN_CHARS`.

Every cut is listed in the record's ``truncated`` object: ``{path: original length
(characters, list entries or feedback items)}``, e.g.
``{"params[0].feedback[2].text": 5120, "params[0].feedback": 40}``. The entries of
dropped feedback items are removed, and past :data:`TRUNCATED_ITEM_KEYS` cut items
of one parameter the per-item entries collapse into
``"params[i].feedback[*].text": <items cut>``, so the map stays small. Only a step
with so many parameters that their names and statuses alone pass the budget can
exceed it.

Every record is masked (:func:`afnio._secrets.mask_secrets`, and each string
scanned with :func:`afnio._secrets.find_secrets`, hits replaced by ``<redacted>``),
then the serialized line is scanned again: the log never holds an API key.

Resume: each checkpoint stores every logger's :meth:`Logger.state_dict` (the run
log's: its length in bytes) and the global step; ``fit(ckpt_path=...)`` truncates
the log to that length (the lines of the interrupted work are dropped and written
again by the redo) and appends a ``resume`` record. So a resumed run's log equals
the uninterrupted run's once ``resume`` records and timestamps (``ts``,
``started``) are removed, except the costs of the one interrupted step per
interruption (and the cumulative totals after it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from afnio._secrets import REDACTED, find_secrets, mask_secrets, redact_text

__all__ = [
    "CONSTRAINTS_CHARS",
    "ERROR_CHARS",
    "FEEDBACK_SHOWN_CHARS",
    "FEEDBACK_TEXT_CHARS",
    "MIN_SHOWN_CHARS",
    "RUN_LOG_FILE",
    "SAMPLES_MAX",
    "SCHEMA",
    "STEP_BUDGET",
    "Logger",
    "RunLogWriter",
    "prepare_record",
    "serialize_record",
    "step_overhead",
]

SCHEMA = "afnio.run_log/1"
"""The schema version every ``header`` record names."""
RUN_LOG_FILE = "run_log.jsonl"
"""The run log's file name in the run's folder (``Trainer.default_root_dir``)."""
STEP_BUDGET = 20_000
"""Bytes a ``step`` line may take beyond its parameter texts (``before``/``after``)."""
FEEDBACK_TEXT_CHARS = 2_000
"""Characters kept of each feedback text."""
FEEDBACK_SHOWN_CHARS = 4_000
"""Characters kept of the feedback the optimizer's prompt showed (per parameter)."""
ERROR_CHARS = 1_000
"""Characters kept of an optimizer error, of its raw answer and of a string metric."""
SAMPLES_MAX = 200
"""Entries kept of each list of sample indices."""
CONSTRAINTS_CHARS = 500
"""Characters kept of the optimizer's constraints in the header."""
MIN_SHOWN_CHARS = 200
"""What the last resort of the truncation cuts strings down to."""


@runtime_checkable
class Logger(Protocol):
    """What the Trainer hands a run's records to (``Trainer(loggers=[...])``).

    Every record is a dict of the run-log schema (module docstring), already masked
    and truncated (:func:`prepare_record`). An exception raised by a logger is
    logged as a warning and never stops the run.
    """

    def start(self, run_dir: Path, header: dict[str, Any], state: dict | None) -> None:
        """A ``fit`` begins in ``run_dir``. ``state`` is ``None`` for a fresh fit,
        else what :meth:`state_dict` returned when the checkpoint being resumed was
        written (``{}`` when the checkpoint holds none for this logger). On a resume
        ``header["resume"]`` describes it (``from_checkpoint``, ``epoch``,
        ``batch``, ``step``)."""
        ...

    def log_step(self, record: dict[str, Any]) -> None:
        """One ``step`` record."""
        ...

    def log_validation(self, record: dict[str, Any]) -> None:
        """One ``validation`` record (kind ``initial``, ``epoch``,
        ``revert_check`` or ``test``; a ``test`` may come after :meth:`finish`)."""
        ...

    def finish(self, record: dict[str, Any]) -> None:
        """The ``end`` record (status ``completed``, ``budget``, ``failed`` or
        ``interrupted``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able state, stored in every checkpoint and handed back to
        :meth:`start` when a run resumes from it."""
        ...


def backward_options_record() -> dict[str, Any]:
    """The active :class:`afnio.BackwardOptions` as the header's
    ``backward_options``: ``{"evaluator_feedback": ..., "chat_samples_per_call":
    ...}``."""
    from afnio.autodiff.options import get_backward_options

    options = get_backward_options()
    return {
        "evaluator_feedback": options.evaluator_feedback,
        "chat_samples_per_call": options.chat_samples_per_call,
    }


def now() -> str:
    """The current time, ISO 8601 with the UTC offset (what ``ts`` holds)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: dicts (string keys), lists, strings, finite numbers,
    booleans and ``None``; NaN and infinities become ``None``, other objects their
    ``str``; a lone surrogate in a string (not encodable as UTF-8) becomes U+FFFD."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_clean_text(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    data = getattr(value, "data", None)  # a Variable
    if data is not None and data is not value and type(value).__name__ != "ndarray":
        return jsonable(data)
    if hasattr(value, "item"):  # a numpy scalar
        try:
            return jsonable(value.item())
        except Exception:
            pass
    return _clean_text(str(value))


def _clean_text(text: str) -> str:
    """``text`` with every lone surrogate (which UTF-8 cannot encode) replaced by
    U+FFFD and every surrogate pair joined into its character, so that a record
    always reaches the file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def serialize_record(record: Mapping[str, Any]) -> str:
    """One record as its line (without the newline): compact UTF-8 JSON."""
    return json.dumps(
        record, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


# -- masking ---------------------------------------------------------------------------


def _scrub(value: Any) -> Any:
    """``value`` with every stretch of every string (keys too) that
    :func:`find_secrets` flags replaced by ``<redacted>``."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _mask(record: Mapping[str, Any]) -> dict[str, Any]:
    masked = mask_secrets(_scrub(jsonable(record)))
    line = serialize_record(masked)
    if not find_secrets(line):
        return masked
    # a credential only the serialized form shows (across a key and its value):
    # drop every string of the record that takes part in it
    hits = find_secrets(line)

    def drop(value: Any) -> Any:
        if isinstance(value, str):
            text = json.dumps(value, ensure_ascii=False)
            return REDACTED if any(h in text or text in h for h in hits) else value
        if isinstance(value, Mapping):
            return {k: drop(v) for k, v in value.items()}
        if isinstance(value, list):
            return [drop(v) for v in value]
        return value

    masked = drop(masked)
    if find_secrets(serialize_record(masked)):
        return {"type": masked.get("type"), "redacted": True}
    return masked


# -- truncation ------------------------------------------------------------------------


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, the cut marked ``…[+N chars]`` (N: the
    characters dropped); a text within the limit is returned as it is (so cutting
    twice changes nothing)."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(f"…[+{len(text)} chars]"))
    return text[:keep] + f"…[+{len(text) - keep} chars]"


def _bytes(value: Any) -> int:
    return len(serialize_record(value).encode("utf-8"))


def step_overhead(record: Mapping[str, Any]) -> int:
    """The bytes of a ``step`` record's line beyond its parameter texts (what
    :data:`STEP_BUDGET` bounds)."""
    total = _bytes(record)
    for param in record.get("params") or []:
        for key in ("before", "after"):
            value = param.get(key)
            if value is not None:
                total -= _bytes(value)
    return total


def _cut_list(
    owner: dict[str, Any], key: str, path: str, truncated: dict[str, int]
) -> None:
    values = owner.get(key)
    if isinstance(values, list) and len(values) > SAMPLES_MAX:
        owner[f"{key}_more"] = owner.get(f"{key}_more", 0) + len(values) - SAMPLES_MAX
        truncated.setdefault(path, len(values))
        owner[key] = values[:SAMPLES_MAX]


def _cut_field(
    owner: dict[str, Any],
    key: str,
    limit: int,
    path: str,
    truncated: dict[str, int],
) -> None:
    value = owner.get(key)
    if isinstance(value, str) and len(value) > limit:
        truncated.setdefault(path, len(value))
        owner[key] = _cut(value, limit)


_ITEM_KEY = re.compile(r"^params\[(\d+)\]\.feedback\[(\d+)\]\.(\w+)$")
TRUNCATED_ITEM_KEYS = 20
"""Per-item entries the ``truncated`` map keeps per parameter; past it they are
collapsed into ``params[i].feedback[*].<field>: <items cut>``."""


def _compact(truncated: dict[str, int], params: list[dict[str, Any]]) -> dict[str, int]:
    """``truncated`` without the entries of feedback items no longer in the record
    and, for a parameter with more than :data:`TRUNCATED_ITEM_KEYS` cut items, its
    per-item entries collapsed into counts per field."""
    out: dict[str, int] = {}
    per_param: dict[int, list[tuple[str, str]]] = {}
    for key, value in truncated.items():
        m = _ITEM_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        i, j = int(m.group(1)), int(m.group(2))
        if i < len(params) and j < len(params[i].get("feedback") or []):
            per_param.setdefault(i, []).append((key, m.group(3)))
    for i, keys in per_param.items():
        if len(keys) <= TRUNCATED_ITEM_KEYS:
            out.update((key, truncated[key]) for key, _ in keys)
            continue
        for _key, field_name in keys:
            star = f"params[{i}].feedback[*].{field_name}"
            out[star] = out.get(star, 0) + 1
    for key, value in truncated.items():  # earlier collapsed counts stay
        if "[*]" in key:
            out[key] = max(out.get(key, 0), value)
    return out


def _truncate_step(record: dict[str, Any]) -> dict[str, Any]:
    truncated: dict[str, int] = dict(record.get("truncated") or {})
    samples = record.get("samples")
    if isinstance(samples, dict):
        _cut_list(samples, "indices", "samples.indices", truncated)
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        for key in list(metrics):
            _cut_field(metrics, key, ERROR_CHARS, f"metrics.{key}", truncated)
    params = [p for p in record.get("params") or [] if isinstance(p, dict)]
    for i, param in enumerate(params):
        feedback = [f for f in param.get("feedback") or [] if isinstance(f, dict)]
        # most repeated first (stable): the budget drops the tail
        feedback.sort(key=lambda f: -(f.get("count") or 0))
        param["feedback"] = feedback
        for j, item in enumerate(feedback):
            where = f"params[{i}].feedback[{j}]"
            _cut_field(item, "text", FEEDBACK_TEXT_CHARS, f"{where}.text", truncated)
            _cut_list(item, "samples", f"{where}.samples", truncated)
            _cut_list(item, "call_samples", f"{where}.call_samples", truncated)
        _cut_field(
            param,
            "feedback_shown",
            FEEDBACK_SHOWN_CHARS,
            f"params[{i}].feedback_shown",
            truncated,
        )
        answer = param.get("answer")
        if isinstance(answer, dict):
            for key in ("error", "raw_answer"):
                _cut_field(
                    answer, key, ERROR_CHARS, f"params[{i}].answer.{key}", truncated
                )
    if truncated:
        record["truncated"] = _compact(truncated, params)
    over = step_overhead(record) - STEP_BUDGET
    while over > 0 and any(p["feedback"] for p in params):
        # drop feedback items, the least repeated (the lists' tails) first, then
        # forget the cuts of the dropped items (the map never outgrows the budget)
        tails = sorted(
            (
                (item.get("count") or 0, -i, -j, i)
                for i, param in enumerate(params)
                for j, item in enumerate(param["feedback"])
            ),
        )
        drops: dict[int, int] = {}
        for _count, _ni, _nj, i in tails:
            if over <= 0 and drops:
                break
            item = params[i]["feedback"][
                len(params[i]["feedback"]) - 1 - drops.get(i, 0)
            ]
            over -= _bytes(item) + 1
            drops[i] = drops.get(i, 0) + 1
        for i, n in drops.items():
            param = params[i]
            truncated.setdefault(f"params[{i}].feedback", len(param["feedback"]))
            param["feedback"] = param["feedback"][: len(param["feedback"]) - n]
            param["feedback_dropped"] = param.get("feedback_dropped", 0) + n
        truncated = _compact(truncated, params)
        record["truncated"] = truncated
        over = step_overhead(record) - STEP_BUDGET
    if over > 0:  # the feedback shown, shorter
        shown = [p for p in params if isinstance(p.get("feedback_shown"), str)]
        for i, param in enumerate(params):
            if param in shown and over > 0:
                text = param["feedback_shown"]
                limit = max(MIN_SHOWN_CHARS, len(text) - over)
                _cut_field(
                    param,
                    "feedback_shown",
                    limit,
                    f"params[{i}].feedback_shown",
                    truncated,
                )
                record["truncated"] = truncated
                over = step_overhead(record) - STEP_BUDGET
    if over > 0:  # last resort: every other long string
        for i, param in enumerate(params):
            answer = param.get("answer")
            if isinstance(answer, dict):
                for key in ("error", "raw_answer"):
                    _cut_field(
                        answer,
                        key,
                        MIN_SHOWN_CHARS,
                        f"params[{i}].answer.{key}",
                        truncated,
                    )
        if isinstance(metrics, dict):
            for key in list(metrics):
                _cut_field(metrics, key, MIN_SHOWN_CHARS, f"metrics.{key}", truncated)
        record["truncated"] = truncated
    return record


def prepare_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` ready for the loggers: plain JSON, every credential masked, and
    (a ``step`` record) within :data:`STEP_BUDGET` beyond its parameter texts by
    the truncation rules of this module's docstring. ``record`` itself is not
    changed; preparing a prepared record changes nothing. A ``header`` gets the
    active backward options (``backward_options``) when it has none, so every
    logger receives them."""
    prepared = _mask(record)
    if prepared.get("type") == "step":
        prepared = _truncate_step(prepared)
    elif prepared.get("type") == "header":
        prepared.setdefault("backward_options", backward_options_record())
    return prepared


# -- the run-log writer ----------------------------------------------------------------


def check_file_name(filename: Any) -> str:
    """``filename`` of a logger that writes in the run's folder, checked: a plain file
    name (no directories), else a ``ValueError`` naming the argument."""
    if (
        not isinstance(filename, str)
        or not filename
        or Path(filename).name != filename
        or filename in (".", "..")
    ):
        raise ValueError(
            "`filename` must be a plain file name (it is written in the run's "
            f"folder), got {filename!r}."
        )
    return filename


class RunLogWriter:
    """The :class:`Logger` that writes the run log (``<run dir>/run_log.jsonl``).

    A fresh fit starts the file anew with a ``header`` line; a resumed one truncates
    it to the length its checkpoint stored and appends a ``resume`` line. Each line
    is appended and flushed (no ``fsync``, no rename: a killed process loses at
    most a torn last line). Every record goes through :func:`prepare_record`.

    Args:
        filename: the file name in the run's folder (no directories).
    """

    def __init__(self, filename: str = RUN_LOG_FILE) -> None:
        self.filename = check_file_name(filename)
        self.path: Path | None = None
        self._file: Any = None
        self._bytes = 0

    def __repr__(self) -> str:
        return f"RunLogWriter(filename={self.filename!r})"

    def start(self, run_dir: Path, header: dict[str, Any], state: dict | None) -> None:
        """Open the log in ``run_dir``: a new file with ``header`` (``state`` None),
        else the file cut back to ``state["bytes"]`` with a ``resume`` record."""
        self.close()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / self.filename
        header = dict(header)
        resume = header.pop("resume", None)
        header.setdefault("backward_options", backward_options_record())
        if state is None:
            self._file = open(self.path, "wb")  # noqa: SIM115
            self._bytes = 0
            self._write(
                {"type": "header", **header} if "type" not in header else header
            )
            return
        saved = state.get("bytes") if isinstance(state, Mapping) else None
        exact = (
            isinstance(saved, int)
            and not isinstance(saved, bool)
            and saved >= 0
            and state.get("path", self.filename) == self.filename
            and self.path.is_file()
            and self.path.stat().st_size >= saved
        )
        if exact:
            os.truncate(self.path, saved)
        elif self.path.is_file():
            self._drop_torn_line()
        fresh = not self.path.is_file() or self.path.stat().st_size == 0
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._bytes = self._file.tell()
        if fresh:  # the log was lost: a header first, so readers know the schema
            self._write({"type": "header", **header})
        info = dict(resume or {})
        self._write({"type": "resume", "ts": now(), **info, "exact": bool(exact)})

    def _drop_torn_line(self) -> None:
        assert self.path is not None
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            os.truncate(self.path, end)

    def _write(self, record: Mapping[str, Any]) -> None:
        line = (serialize_record(prepare_record(record)) + "\n").encode(
            "utf-8", "replace"
        )
        if self._file is not None:
            self._file.write(line)
            self._file.flush()  # in the OS: a killed process keeps it
            self._bytes += len(line)
            return
        if self.path is None:
            raise RuntimeError(
                "RunLogWriter.start() must be called before records are logged."
            )
        with open(self.path, "ab") as f:  # after finish (a test after fit)
            f.write(line)
            self._bytes = f.tell()

    def log_step(self, record: dict[str, Any]) -> None:
        """Append a ``step`` record."""
        self._write(record)

    def log_validation(self, record: dict[str, Any]) -> None:
        """Append a ``validation`` record (also after :meth:`finish`: a ``test``)."""
        self._write(record)

    def finish(self, record: dict[str, Any]) -> None:
        """Append the ``end`` record and close the file."""
        try:
            self._write(record)
        finally:
            self.close()

    def state_dict(self) -> dict[str, Any]:
        """``{"path": file name, "bytes": length written so far}``."""
        return {"path": self.filename, "bytes": self._bytes}

    def close(self) -> None:
        """Close the file (a later record reopens it to append)."""
        if self._file is not None:
            self._file.close()
            self._file = None


# -- building records (used by the Trainer) --------------------------------------------


def text_of(value: Any) -> Any:
    """A parameter's value as the log holds it: its text, or the JSON of a
    non-string value."""
    if isinstance(value, str) or value is None:
        return value
    return json.dumps(jsonable(value), ensure_ascii=False)


def phase_json(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """:class:`~afnio.models.phases.PhaseRow` objects as ``by_phase`` entries."""
    return [
        {
            "phase": row.phase,
            "model": row.model,
            "calls": row.calls,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "cost": row.cost,
        }
        for row in rows
    ]


def _positions(
    values: Sequence[int] | None,
    basis: Any,
    indices: Sequence[int] | None,
    columns: Sequence[Sequence[str]] | None,
) -> list[int] | None:
    """In-batch ``values`` (numbered in ``basis``) as dataset indices (through
    ``indices``), or as positions in the loader's batch when ``indices`` is
    ``None``; ``None`` when that is not certain.

    With ``columns`` (the fingerprints of the loader batch's columns), the
    positions are first matched to the batch through their basis
    (:func:`afnio.autodiff.provenance.match_positions`): no basis or no unambiguous
    match gives ``None``. A position outside ``indices`` gives ``None`` (never a raw
    position passed off as a dataset index)."""
    if values is None:
        return None
    if columns is not None:
        from afnio.autodiff.provenance import match_positions

        matched = match_positions(values, basis, columns)
        if matched is None:
            return None
        values = matched
    out = []
    for p in values:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            return None
        if indices is not None:
            if p >= len(indices):
                return None
            out.append(indices[p])
        else:
            out.append(p)
    return out


def feedback_entries(
    items: Iterable[Any],
    indices: Sequence[int] | None,
    columns: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Feedback items (``text``, ``samples``, ``call_samples``: in-batch positions
    or ``None``, and ``basis``) grouped by identical text.

    ``samples``/``call_samples`` of a group are the sorted union of its items'
    positions mapped through ``indices`` (dataset indices; ``None``: the loader
    batch's positions are kept). With ``columns`` (fingerprints of the loader
    batch's columns, :func:`afnio.autodiff.provenance.fingerprint`), an item's
    positions count only when its basis matches the batch
    (:func:`_positions`). ``samples`` is ``None`` when any item of the group is
    unknown, and then ``unknown`` says how many were; ``count`` is how many times
    the text came."""
    groups: dict[str, dict[str, Any]] = {}
    for item in items:
        text = getattr(item, "text", item)
        if not isinstance(text, str) or not text.strip():
            continue
        group = groups.setdefault(
            text, {"text": text, "samples": None, "call_samples": None, "count": 0}
        )
        group["count"] += 1
        basis = getattr(item, "basis", None)
        found = _positions(getattr(item, "samples", None), basis, indices, columns)
        if found is None:
            group["unknown"] = group.get("unknown", 0) + 1
            continue
        group["samples"] = sorted(set(group["samples"] or []) | set(found))
        calls = _positions(getattr(item, "call_samples", None), basis, indices, columns)
        if calls is not None:
            group["call_samples"] = sorted(
                set(group["call_samples"] or []) | set(calls)
            )
    out = list(groups.values())
    for group in out:
        if group.get("unknown"):  # part of it unknown: credit no sample
            group["samples"] = None
            group["call_samples"] = None
    return out
