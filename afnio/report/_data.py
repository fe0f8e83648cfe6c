"""Read a run log (``run_log.jsonl``, schema ``afnio.run_log/1``) and turn it into the
compact data the HTML report embeds.

The data keeps each distinct parameter text once (a string table that steps refer to
by index), a word diff per change (:mod:`afnio.report._diff`), the feedback with its
sample indices, scores, validation points, cost by phase, resume markers and notes.
It is kept under :data:`MAX_BYTES` by shortening the feedback evenly across steps
(and, only if the parameter texts alone are too large, by leaving out the diffs).

A step with ``"reverted": 1`` (``Trainer(revert_on_regression=True)`` undid it) keeps
its proposed change, marked ``reverted``, and the parameter's text stays the step's
*before* text; the ``end`` record's ``final`` texts, when present, are the
parameters' texts at the end of the run. A field of an unexpected type (a log edited
by hand or written by another tool) is left out with a note, never an error; every
number in the data is finite (JSON has no NaN or Infinity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from afnio.report._diff import word_diff

__all__ = [
    "MAX_BYTES",
    "MIN_FEEDBACK_CHARS",
    "RUN_LOG_FILE",
    "SCHEMA_PREFIX",
    "build_data",
    "load_run_log",
]

RUN_LOG_FILE = "run_log.jsonl"
SCHEMA_PREFIX = "afnio.run_log/1"
MAX_BYTES = 9_500_000
"""Budget of the embedded JSON data (the page around it adds about 40 KB), so that a
report stays under 10 MB."""
MIN_FEEDBACK_CHARS = 500
"""Feedback characters per step kept when the budget forces cuts."""
_MAX_ERROR_CHARS = 2_000


class _TornLine(Exception):
    """The last line of the run log is incomplete (the run is still writing it or was
    killed mid-line)."""


def load_run_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of the run log at ``path`` (a ``run_log.jsonl`` file), in order.

    An incomplete last line (a run killed or still writing) is skipped. Raises
    :class:`FileNotFoundError` if the file is missing and :class:`ValueError`
    (naming the file) if it cannot be read, if a record is not JSON, if the file has
    no ``header`` record or if its schema is not ``afnio.run_log/1``.
    """
    path = Path(path)
    records, _torn = _read_records(path)
    return records


def _read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of ``path`` and whether a torn last line was skipped."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(
            f"{path}: cannot read the run log ({error.strerror or error})"
        ) from None
    lines = raw.split(b"\n")
    # a file ending with a newline gives one empty last piece; a torn line is
    # a last piece without its newline
    records: list[dict[str, Any]] = []
    torn = False
    last = len(lines) - 1
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number - 1 == last:
                torn = True  # no trailing newline: the writer was cut mid-line
                continue
            raise ValueError(
                f"{path}: line {number} is not a JSON record ({error}); the run log "
                "is damaged: a run log is only ever appended to by afnio's Trainer"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise ValueError(
                f"{path}: line {number} is not a run-log record (a JSON object with "
                'a "type"); is this an afnio run_log.jsonl?'
            )
        records.append(record)
    header = next((r for r in records if r["type"] == "header"), None)
    if header is None:
        raise ValueError(
            f"{path}: no header record; an afnio run log starts with a header "
            "written when trainer.fit(...) starts"
        )
    schema = header.get("schema")
    if not isinstance(schema, str) or not (
        schema == SCHEMA_PREFIX or schema.startswith(SCHEMA_PREFIX + ".")
    ):
        raise ValueError(
            f"{path}: schema {schema!r} is not {SCHEMA_PREFIX!r}; this afnio reads "
            f"{SCHEMA_PREFIX} run logs (upgrade afnio to read newer ones)"
        )
    return records, torn


class _Strings:
    """A table of distinct texts; each text is stored once and referred to by index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, text: str | None) -> int | None:
        if text is None:
            return None
        found = self._ids.get(text)
        if found is None:
            found = self._ids[text] = len(self.items)
            self.items.append(text)
        return found


class _Odd:
    """Fields of the run log that have an unexpected type and were left out: counted
    per description, reported as one note."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, where: str) -> None:
        self.counts[where] = self.counts.get(where, 0) + 1

    def check(self, value: Any, kind: type | tuple[type, ...], where: str) -> bool:
        """Whether ``value`` is missing (None) or of ``kind``; notes it otherwise."""
        if value is None:
            return False
        if isinstance(value, kind) and not (
            isinstance(value, bool) and kind in (int, (int, float))
        ):
            return True
        self(where)
        return False

    def note(self) -> str | None:
        if not self.counts:
            return None
        shown = sorted(self.counts.items())[:_MAX_ODD_LISTED]
        parts = [
            where + (f" (\u00d7{count})" if count > 1 else "") for where, count in shown
        ]
        more = len(self.counts) - len(shown)
        return (
            "Some fields of the run log have an unexpected type and were left out: "
            + "; ".join(parts)
            + (f"; and {more} more" if more > 0 else "")
            + ". (Was the run log edited or written by another tool?)"
        )


_MAX_ODD_LISTED = 12


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _text(value: Any) -> str | None:
    """``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None


def _metrics(raw: Any, odd: _Odd, where: str) -> dict[str, float]:
    """The finite numeric metrics of ``raw`` (other values are not plotted)."""
    if not odd.check(raw, dict, f"{where} (not an object)"):
        return {}
    out: dict[str, float] = {}
    for key, value in raw.items():
        number = _number(value)
        if number is not None:
            out[str(key)] = number
    return out


def _ints(raw: Any) -> list[int] | None:
    if not isinstance(raw, list):
        return None
    return [v for v in raw if _int(v) is not None]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"…[+{len(text) - limit} chars]"


def _phases(raw: Any, odd: _Odd) -> dict[str, float]:
    """Cost per phase of one step (rows of several models of a phase are summed)."""
    out: dict[str, float] = {}
    if not odd.check(raw, list, "step cost.by_phase (not a list)"):
        return out
    for row in raw:
        if not isinstance(row, dict):
            odd("step cost.by_phase row (not an object)")
            continue
        cost = _number(row.get("cost"))
        if cost is None:
            continue
        phase = str(row.get("phase") or "other")
        out[phase] = out.get(phase, 0.0) + cost
    return out


def _feedback(raw: Any, odd: _Odd) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if not odd.check(raw, list, "step params[].feedback (not a list)"):
        return items
    for entry in raw:
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict):
            odd("step params[].feedback item (not an object)")
            continue
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            odd("step params[].feedback[].text (not a string)")
            text = json.dumps(text, ensure_ascii=False, default=str)
        item: dict[str, Any] = {"text": text or ""}
        samples = _ints(entry.get("samples"))
        if samples is not None:
            item["samples"] = samples
        more = _int(entry.get("samples_more"))
        if more is not None and more > 0:
            item["more"] = more
        group = _ints(entry.get("call_samples"))
        if group:
            item["group"] = group
        count = _int(entry.get("count"))
        if count is not None and count > 1:
            item["count"] = count
        items.append(item)
    return items


def _change(
    raw: dict[str, Any],
    index: int,
    current: str | None,
    strings: _Strings,
    odd: _Odd,
    *,
    reverted: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """One parameter entry of a step record as report data, and the parameter's text
    after the step (its *before* text when the step was ``reverted``)."""
    before = raw.get("before")
    if not odd.check(before, str, "step params[].before (not a string)"):
        before = current
    after = raw.get("after")
    if not odd.check(after, str, "step params[].after (not a string)"):
        after = None
    status = _text(raw.get("status")) or (
        "updated" if after is not None else "unchanged"
    )
    if after is not None and after == before and status == "updated":
        status = "unchanged"
    change: dict[str, Any] = {
        "p": index,
        "status": status,
        "before": strings.id(before),
    }
    if after is not None and after != before:
        change["after"] = strings.id(after)
        change["diff"] = word_diff(before or "", after)
        if reverted:
            # the optimizer's proposal stays visible, marked as undone
            change["status"] = "reverted"
            change["proposed"] = status
            change["reverted"] = True
    answer = raw.get("answer")
    if odd.check(answer, dict, "step params[].answer (not an object)"):
        if answer.get("error"):
            change["error"] = _cut(str(answer["error"]), _MAX_ERROR_CHARS)
        raw_answer = answer.get("raw_answer", answer.get("raw"))
        if raw_answer:
            change["raw"] = _cut(str(raw_answer), _MAX_ERROR_CHARS)
        attempts = _int(answer.get("attempts"))
        if attempts is not None:
            change["attempts"] = attempts
    feedback = _feedback(raw.get("feedback"), odd)
    if feedback:
        change["feedback"] = feedback
    elif isinstance(raw.get("feedback_shown"), str) and raw["feedback_shown"]:
        change["feedback"] = [{"text": raw["feedback_shown"], "shown": True}]
    dropped = _int(raw.get("feedback_dropped"))
    if dropped is not None and dropped > 0:
        change["dropped"] = dropped
    if reverted or after is None:
        return change, before
    return change, after


def build_data(
    records: Iterable[dict[str, Any]],
    *,
    source: str = "",
    torn: bool = False,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """The report data for the run-log ``records`` (see the module docstring);
    ``source`` names the run (shown in the page), ``torn`` says a torn last line was
    skipped."""
    strings = _Strings()
    odd = _Odd()
    header: dict[str, Any] = {}
    params: list[dict[str, Any]] = []
    param_index: dict[str, int] = {}
    current: list[str | None] = []
    steps: dict[int, dict[str, Any]] = {}
    validations: list[dict[str, Any]] = []
    resumes: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    phases: list[str] = []
    notes: list[str] = []
    repeated = 0

    def param(name: str, role: str = "", value: str | None = None) -> int:
        if name not in param_index:
            param_index[name] = len(params)
            params.append({"name": name, "role": role, "initial": strings.id(value)})
            current.append(value)
        return param_index[name]

    for record in records:
        if not isinstance(record, dict):
            odd("record (not an object)")
            continue
        kind = record.get("type")
        if kind == "header":
            header = record
            entries = record.get("parameters")
            if not odd.check(entries, list, "header parameters (not a list)"):
                entries = []
            for entry in entries:
                if not isinstance(entry, dict) or not entry.get("name"):
                    odd("header parameters[] (not an object with a name)")
                    continue
                value = entry.get("value")
                if not odd.check(
                    value, str, "header parameters[].value (not a string)"
                ):
                    value = None
                param(
                    str(entry["name"]),
                    _text(entry.get("role")) or "",
                    value,
                )
        elif kind == "step":
            number = _int(record.get("step"))
            if number is None:
                odd("step record without a step number (left out)")
                continue
            if number in steps:
                repeated += 1  # a step redone after an inexact resume: keep the last
            cost = record.get("cost")
            if not odd.check(cost, dict, "step cost (not an object)"):
                cost = {}
            by_phase = _phases(cost.get("by_phase"), odd)
            for name in by_phase:
                if name not in phases:
                    phases.append(name)
            epoch, batch = record.get("epoch"), record.get("batch")
            step: dict[str, Any] = {
                "step": number,
                "epoch": epoch
                if odd.check(epoch, int, "step epoch (not an integer)")
                else None,
                "batch": batch
                if odd.check(batch, int, "step batch (not an integer)")
                else None,
                "metrics": _metrics(record.get("metrics"), odd, "step metrics"),
                "cost": _number(cost.get("step_usd")),
                "total": _number(cost.get("total_usd")),
                "phases": by_phase,
                "changes": [],
            }
            reverted = record.get("reverted") in (1, True)  # 1 (or true): undone
            if reverted:
                step["reverted"] = True
            samples = record.get("samples")
            if odd.check(samples, dict, "step samples (not an object)"):
                indices = _ints(samples.get("indices"))
                if indices is not None:
                    step["samples"] = indices
                step["indexed_by"] = _text(samples.get("indexed_by")) or "batch"
            if isinstance(record.get("ts"), str):
                step["ts"] = record["ts"]
            truncated = record.get("truncated")
            if isinstance(truncated, dict) and truncated:
                step["truncated"] = sorted(str(k) for k in truncated)
            entries = record.get("params")
            if not odd.check(entries, list, "step params (not a list)"):
                entries = []
            for entry in entries:
                if not isinstance(entry, dict) or not entry.get("name"):
                    odd("step params[] (not an object with a name)")
                    continue
                index = param(str(entry["name"]))
                change, current[index] = _change(
                    entry, index, current[index], strings, odd, reverted=reverted
                )
                step["changes"].append(change)
            steps[number] = step
        elif kind == "validation":
            epoch = record.get("epoch")
            validations.append(
                {
                    "step": _int(record.get("step")) or 0,
                    "epoch": epoch
                    if odd.check(epoch, int, "validation epoch (not an integer)")
                    else None,
                    "kind": _text(record.get("kind")) or "epoch",
                    "metrics": _metrics(
                        record.get("metrics"), odd, "validation metrics"
                    ),
                }
            )
        elif kind == "resume":
            after = _int(record.get("step"))
            if after is None:
                after = max(steps) if steps else 0
            resumes.append(
                {
                    "after": after,
                    "ts": _text(record.get("ts")),
                    "epoch": _int(record.get("epoch")),
                    "batch": _int(record.get("batch")),
                    "exact": record.get("exact", True) is not False,
                }
            )
        elif kind == "end":
            end = record

    finals: dict[str, str] = {}
    if end is not None:
        raw_final = end.get("final")
        if odd.check(raw_final, list, "end final (not a list)"):
            for entry in raw_final:
                if (
                    isinstance(entry, dict)
                    and entry.get("name")
                    and isinstance(entry.get("value"), str)
                ):
                    finals[str(entry["name"])] = entry["value"]
                else:
                    odd("end final[] (not an object with a name and a text value)")
    for name, value in finals.items():
        # the end record's texts are the parameters' texts at the end of the run
        current[param(name)] = value
    for index, text in enumerate(current):
        params[index]["final"] = strings.id(text)
        initial = params[index]["initial"]
        if text is not None and initial is not None and strings.items[initial] != text:
            params[index]["diff"] = word_diff(strings.items[initial], text)
    ordered = [steps[k] for k in sorted(steps)]
    if repeated:
        notes.append(
            f"{repeated} step record(s) were written twice (a resume from an older "
            "checkpoint); the report shows the last of each."
        )
    if torn:
        notes.append(
            "The last line of the run log was incomplete (the run was stopped or is "
            "still writing) and is left out."
        )
    if end is None:
        notes.append(
            "The run log has no end record: the run is still going, or was stopped "
            "before it finished."
        )
    optimizer = header.get("optimizer")
    if not odd.check(optimizer, dict, "header optimizer (not an object)"):
        optimizer = {}
    models = optimizer.get("models")
    end = end or {}
    error = end.get("error")
    meta = {
        "source": source,
        "afnio": _text(header.get("afnio")),
        "started": _text(header.get("started")),
        "max_epochs": _int(header.get("max_epochs")),
        "batch_size": _int(header.get("batch_size")),
        "train_size": _int(header.get("train_size")),
        "val_size": _int(header.get("val_size")),
        "optimizer": {
            "class": _text(optimizer.get("class")),
            "momentum": _number(optimizer.get("momentum")),
            "on_error": _text(optimizer.get("on_error")),
            "models": [str(m) for m in models] if isinstance(models, list) else None,
        },
        "status": _text(end.get("status")) or "unfinished",
        "stopped_reason": _text(end.get("stopped_reason")),
        "ended": _text(end.get("ts")),
        "total_cost": _number(end.get("total_cost")),
        "error": _cut(str(error), _MAX_ERROR_CHARS) if error else None,
    }
    note = odd.note()
    if note is not None:
        notes.append(note)
    data = {
        "meta": meta,
        "strings": strings.items,
        "params": params,
        "steps": ordered,
        "validations": validations,
        "resumes": resumes,
        "phases": phases,
        "notes": notes,
    }
    _fit_budget(data, max_bytes)
    return data


def _size(obj: Any) -> int:
    """Bytes of ``obj`` as the page embeds it (``<``, ``>``, ``&`` as ``\\u00XX``)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    escaped = text.count("<") + text.count(">") + text.count("&")
    return len(text.encode()) + 5 * escaped


def _fit_budget(data: dict[str, Any], max_bytes: int) -> None:
    """Shorten the feedback evenly across steps (then, if still needed, leave out the
    diffs) until the JSON of ``data`` fits ``max_bytes``; adds a note when it cuts."""
    total = _size(data)
    if total <= max_bytes:
        return
    items = [
        item
        for step in data["steps"]
        for change in step["changes"]
        for item in change.get("feedback", ())
    ]
    feedback_chars = sum(len(item["text"]) for item in items)
    # bytes of everything except the feedback texts (a UTF-8 char is >= 1 byte: the
    # char budget below is conservative for non-ASCII text by re-measuring after)
    fixed = total - sum(len(item["text"].encode()) for item in items)
    steps_with_feedback = [
        s for s in data["steps"] if any(c.get("feedback") for c in s["changes"])
    ]
    if steps_with_feedback and feedback_chars:
        per_step = max(
            MIN_FEEDBACK_CHARS, (max_bytes - fixed) // len(steps_with_feedback)
        )
        while True:
            for step in steps_with_feedback:
                _cut_step_feedback(step, per_step)
            over = _size(data) - max_bytes
            if over <= 0 or per_step <= MIN_FEEDBACK_CHARS:
                break
            # the cut markers themselves take room: take the overshoot off each step
            per_step = max(
                MIN_FEEDBACK_CHARS,
                per_step - over // len(steps_with_feedback) - 16,
            )
        data["notes"].append(
            f"Feedback was shortened to about {per_step:,} characters per step to keep "
            "this file within its size budget (10 MB); the full texts are in "
            "run_log.jsonl."
        )
    if _size(data) > max_bytes:
        for step in data["steps"]:
            for change in step["changes"]:
                if change.pop("diff", None) is not None:
                    change["nodiff"] = True
        data["notes"].append(
            "The parameter texts are too large for word diffs within the size budget: "
            "changes show the new text only."
        )


def _cut_step_feedback(step: dict[str, Any], budget: int) -> None:
    """Cut the feedback texts of one step so that they total at most ``budget``
    characters, shared evenly (short texts keep their length, the rest share what
    is left)."""
    items = [item for change in step["changes"] for item in change.get("feedback", ())]
    # original lengths (an item cut by an earlier, larger budget keeps its prefix)
    lengths = [len(item["text"]) + item.get("cut", 0) for item in items]
    if sum(lengths) <= budget:
        return
    limits = [0] * len(items)
    remaining = budget
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    for position, i in enumerate(order):
        share = remaining // (len(items) - position)
        limits[i] = min(lengths[i], share)
        remaining -= limits[i]
    for item, limit, length in zip(items, limits, lengths, strict=True):
        if len(item["text"]) > limit:
            item["text"] = item["text"][:limit]
            item["cut"] = length - limit
