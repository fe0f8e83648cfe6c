"""The report a failing replay test shows: which LM requests the cassette could not
answer, the closest recorded request with a diff of the bodies, the other problems, and
the command that re-records the cassette. Plain text, standard library only (the JSON
normalisation comes from :mod:`afnio_pytest._scrub`)."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from afnio_pytest._types import (
    SIMULATOR_RECORDING,
    Blocked,
    Miss,
    Problem,
    Unrecordable,
    UnrecordedSimulatorCalls,
)

__all__ = [
    "ReportContext",
    "body_diff",
    "closest",
    "flatten",
    "record_command",
    "render_report",
    "word_diff",
]

MAX_VALUE = 300  # characters of one value shown in a diff
MAX_LINES = 40  # lines of one body diff
WORD_CONTEXT = 8  # words kept either side of a change in a word diff

_REASONS = {
    "no_match": "no recorded request has this body",
    "no_cassette": "this test has no cassette",
    "missing_metadata": (
        "the cassette does not say which server answered it (metadata recorded_with)"
    ),
}


@dataclass
class ReportContext:
    """What the report needs to know about the test and its cassette."""

    nodeid: str
    cassette_path: str
    recorded_with: str | None = None
    stored: Sequence[Any] = ()  # the cassette's vcr requests, in recorded order
    played: Sequence[int] = ()  # play count of each stored request
    ignored: tuple[tuple[str | int, ...], ...] = ()
    rootdir: str | None = None
    invocation_dir: str | None = None
    extra: list[str] = field(default_factory=list)


# -- flattening and closeness ----------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Parsed JSON as ``{pointer: leaf}``: ``{"a": {"b": [1]}}`` → ``{"a.b[0]": 1}``.
    Empty containers are leaves."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data:
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix or "(body)"] = data
    return out


def _normalized(raw: bytes, ignored: tuple[tuple[str | int, ...], ...]) -> Any:
    from afnio_pytest._scrub import normalized_json

    return normalized_json(raw, ignored)


def _fields(raw: bytes, ignored: tuple[tuple[str | int, ...], ...]) -> dict[str, Any]:
    try:
        return flatten(_normalized(raw, ignored))
    except ValueError:
        return {"(body)": raw.decode("utf-8", "replace")}


def _words(text: str) -> set[str]:
    return set(text.split())


def similarity(mine: dict[str, Any], other: dict[str, Any]) -> float:
    """How alike two flattened bodies are: 1 per equal field, the share of common
    words for a changed string field, 0.1 for a field both have with another value."""
    score = 0.0
    for pointer, value in mine.items():
        if pointer not in other:
            continue
        theirs = other[pointer]
        if value == theirs and type(value) is type(theirs):
            score += 1.0
        elif isinstance(value, str) and isinstance(theirs, str):
            a, b = _words(value), _words(theirs)
            score += len(a & b) / len(a | b) if a | b else 1.0
        else:
            score += 0.1
    return score


def _method_path(request: Any) -> tuple[str, str]:
    return str(request.method).upper(), urlsplit(request.uri).path or "/"


def closest(
    method: str,
    path: str,
    raw: bytes,
    stored: Sequence[Any],
    played: Sequence[int] = (),
    ignored: tuple[tuple[str | int, ...], ...] = (),
) -> int | None:
    """The index of the stored request closest to a request: among those with the same
    method and path (else the same method, else all), the one whose body is most alike
    (:func:`similarity`); ties go to the first not yet played."""
    from afnio_pytest._scrub import body_bytes

    if not stored:
        return None
    shapes = [_method_path(r) for r in stored]
    pool = [i for i, s in enumerate(shapes) if s == (method, path)]
    if not pool:
        pool = [i for i, s in enumerate(shapes) if s[0] == method] or list(
            range(len(stored))
        )
    mine = _fields(raw, ignored)
    best: tuple[float, int, int] | None = None  # (similarity, unplayed, -index)
    for i in pool:
        score = similarity(mine, _fields(body_bytes(stored[i]), ignored))
        unplayed = 1 if i >= len(played) or not played[i] else 0
        candidate = (score, unplayed, -i)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else -best[2]


# -- diffs -----------------------------------------------------------------------------


def _short(text: str, limit: int = MAX_VALUE) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _show(value: Any) -> str:
    return _short(value if isinstance(value, str) else json.dumps(value))


def _merge_gaps(
    ops: list[tuple[str, int, int, int, int]], a: list[str]
) -> list[tuple[str, int, int, int, int]]:
    """Opcodes with changes separated only by whitespace merged into one change
    (``[-one sentence-]{+two sentences+}``, not two)."""
    merged: list[tuple[str, int, int, int, int]] = []
    for op in ops:
        tag = op[0]
        if (
            tag != "equal"
            and len(merged) >= 2
            and merged[-1][0] == "equal"
            and merged[-2][0] != "equal"
            and not "".join(a[merged[-1][1] : merged[-1][2]]).strip()
        ):
            merged.pop()
            first = merged.pop()
            op = ("replace", first[1], op[2], first[3], op[4])
        merged.append(op)
    return merged


def word_diff(old: str, new: str, context: int = WORD_CONTEXT) -> str:
    """A one-line word diff, ``[-removed-]{+added+}``, with ``context`` words kept
    either side of each change and ``...`` for the rest."""
    a = re.findall(r"\S+|\s+", old)
    b = re.findall(r"\S+|\s+", new)
    pieces: list[str] = []
    ops = _merge_gaps(
        difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes(), a
    )
    keep = context * 2  # tokens: words and the spaces between them
    for n, (tag, i1, i2, j1, j2) in enumerate(ops):
        if tag == "equal":
            chunk = a[i1:i2]
            first, last = n == 0, n == len(ops) - 1
            if first and len(chunk) > keep:
                pieces.append("..." + "".join(chunk[-keep:]))
            elif last and len(chunk) > keep:
                pieces.append("".join(chunk[:keep]) + "...")
            elif not first and not last and len(chunk) > 2 * keep:
                pieces.append("".join(chunk[:keep]) + " ... " + "".join(chunk[-keep:]))
            else:
                pieces.append("".join(chunk))
            continue
        if i2 > i1:
            pieces.append("[-" + "".join(a[i1:i2]) + "-]")
        if j2 > j1:
            pieces.append("{+" + "".join(b[j1:j2]) + "+}")
    return _short("".join(pieces), MAX_VALUE * 2)


def _value_diff(pointer: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, str) and isinstance(new, str):
        if "\n" in old or "\n" in new:
            lines = list(
                difflib.unified_diff(
                    old.splitlines(), new.splitlines(), lineterm="", n=1
                )
            )[2:]
            return [f"{pointer}:"] + ["  " + _short(line) for line in lines]
        return [f"{pointer}: {word_diff(old, new)}"]
    return [f"{pointer}: {_show(old)} -> {_show(new)}"]


def body_diff(
    new_raw: bytes,
    old_raw: bytes,
    ignored: tuple[tuple[str | int, ...], ...] = (),
    max_lines: int = MAX_LINES,
) -> list[str]:
    """The differences between a request body (``new_raw``) and a recorded one, one
    item per line: ``- pointer: v`` (only recorded), ``+ pointer: v`` (only sent),
    ``pointer: [-old-]{+new+}`` (changed). Capped at ``max_lines``."""
    try:
        new = flatten(_normalized(new_raw, ignored))
        old = flatten(_normalized(old_raw, ignored))
    except ValueError:
        return _text_diff(new_raw, old_raw, max_lines)
    lines: list[str] = []
    pointers = list(old) + [p for p in new if p not in old]
    for pointer in pointers:
        if pointer in old and pointer in new:
            if old[pointer] == new[pointer] and type(old[pointer]) is type(
                new[pointer]
            ):
                continue
            lines.extend(_value_diff(pointer, old[pointer], new[pointer]))
        elif pointer in old:
            lines.append(f"- {pointer}: {_show(old[pointer])}")
        else:
            lines.append(f"+ {pointer}: {_show(new[pointer])}")
    if not lines:
        lines.append("(the bodies match: the request differs in method, path or query)")
    return _cap(lines, max_lines)


def _text_diff(new_raw: bytes, old_raw: bytes, max_lines: int) -> list[str]:
    try:
        new, old = new_raw.decode("utf-8"), old_raw.decode("utf-8")
    except UnicodeDecodeError:
        return [f"binary bodies: {len(old_raw)} bytes recorded, {len(new_raw)} sent"]
    if "\n" not in new and "\n" not in old:
        return [word_diff(old, new)]
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm=""))
    return _cap([_short(line) for line in lines[2:]], max_lines)


def _cap(lines: list[str], max_lines: int) -> list[str]:
    if len(lines) <= max_lines:
        return lines
    return [*lines[:max_lines], f"… {len(lines) - max_lines} more differences"]


# -- the report ------------------------------------------------------------------------


def _quote(nodeid: str) -> str:
    return "'" + nodeid.replace("'", "'\"'\"'") + "'"


def record_command(
    nodeid: str,
    *,
    new: bool,
    real_provider: bool = False,
    rootdir: str | None = None,
    invocation_dir: str | None = None,
) -> str:
    """The command that records this test's cassette: ``--afnio-record=new`` when it
    has none, else ``all`` (an existing cassette is write-protected in ``new``)."""
    command = (
        f"python -m pytest {_quote(nodeid)} --afnio-record={'new' if new else 'all'}"
    )
    if real_provider:
        command += " --afnio-real-provider"
    if (
        rootdir
        and invocation_dir
        and os.path.abspath(rootdir) != os.path.abspath(invocation_dir)
    ):
        command = f"cd {_quote(rootdir)} && {command}"
    return command


def _miss_lines(miss: Miss, ctx: ReportContext) -> list[str]:
    lines = []
    sent = f"{miss.method} {miss.path}"
    if miss.attempts > 1:
        sent += (
            f", sent {miss.attempts} times (the client retried it; the test fails "
            "anyway)"
        )
    if miss.reason != "no_cassette" and miss.reason != "missing_metadata":
        lines.append(f"  request:  {sent}")
    if miss.reason == "already_played":
        lines.append(
            f"  reason:   this test sent the request {miss.recorded + 1} times; the "
            f"cassette holds {miss.recorded}"
        )
    elif miss.reason != "no_cassette":  # the headline says it
        lines.append(f"  reason:   {_REASONS.get(miss.reason, miss.reason)}")
    if miss.reason == "no_match" and miss.body is not None:
        index = miss.closest_index
        if index is None and ctx.stored:
            index = closest(
                miss.method, miss.path, miss.body, ctx.stored, ctx.played, ctx.ignored
            )
        if index is not None:
            from afnio_pytest._scrub import body_bytes

            stored = ctx.stored[index]
            same = _method_path(stored) == (miss.method, miss.path)
            where = "same method and path" if same else " ".join(_method_path(stored))
            lines.append(
                f"  closest recorded request: #{index + 1} of {len(ctx.stored)} "
                f"({where}), body differences:"
            )
            lines += [
                "    " + line
                for line in body_diff(miss.body, body_bytes(stored), ctx.ignored)
            ]
        else:
            lines.append("  the cassette holds no request to compare it with")
            if miss.body:
                text = miss.body.decode("utf-8", "replace")
                lines.append(f"  body: {_short(text)}")
    return lines


def _problem_paragraph(problem: Problem) -> str:
    if isinstance(problem, Blocked):
        where = (
            problem.host if problem.port is None else f"{problem.host}:{problem.port}"
        )
        return (
            f"network access during replay to {where}: only LM requests are "
            "replayed; "
            "mock this call or allow the host with afnio_replay(allow_hosts=[...])"
        )
    if isinstance(problem, Unrecordable):
        return f"{problem.what}: {problem.fix}"
    if isinstance(problem, UnrecordedSimulatorCalls):
        return (
            f"the simulator answered {problem.calls} request(s) that vcrpy never "
            "saw, so they are not in the cassette: a client bypassed httpx/aiohttp "
            "(for example DSPy's native lm15 engine; create dspy.LM(..., "
            'engine="litellm"))'
        )
    return str(problem)


def render_report(problems: Iterable[Problem], ctx: ReportContext) -> str:
    """The plain-text report of a test's problems (see the module docstring)."""
    problems = list(problems)
    misses = [p for p in problems if isinstance(p, Miss)]
    others = [p for p in problems if not isinstance(p, Miss)]
    lines: list[str] = []
    real = bool(ctx.recorded_with) and ctx.recorded_with != SIMULATOR_RECORDING
    with_ = f" (recorded with: {ctx.recorded_with})" if ctx.recorded_with else ""
    if misses:
        n = len(misses)
        if any(m.reason == "no_cassette" for m in misses):
            lines.append("afnio_replay: this test has no cassette (replay mode)")
        elif any(m.reason == "missing_metadata" for m in misses):
            lines.append("afnio_replay: the cassette of this test cannot be replayed")
        else:
            lines.append(
                f"afnio_replay: {n} LM request{'s' if n > 1 else ''} of this test "
                f"{'are' if n > 1 else 'is'} not in its cassette"
            )
        lines.append(f"  cassette: {ctx.cassette_path}{with_}")
        for i, miss in enumerate(misses):
            if i:
                lines.append("")
            lines += _miss_lines(miss, ctx)
    for problem in others:
        if lines:
            lines.append("")
        lines.append("afnio_replay: " + _problem_paragraph(problem))
    if misses:
        new = any(m.reason == "no_cassette" for m in misses)
        verb = "Record" if new else "Re-record"
        lines += [
            f"  {verb} this test's cassette (then review the diff and commit it):",
            "    "
            + record_command(
                ctx.nodeid,
                new=new,
                real_provider=real and not new,
                rootdir=ctx.rootdir,
                invocation_dir=ctx.invocation_dir,
            ),
        ]
    lines += ctx.extra
    return "\n".join(lines)
