"""Word-level diff of two parameter texts, for the run report.

:func:`word_diff` splits both texts into tokens (runs of whitespace, runs of word
characters, single punctuation characters), matches them with
:class:`difflib.SequenceMatcher` and returns a list of operations:

* ``["=", text]``: text present in both versions;
* ``["-", text]``: text only in the *before* version (deleted);
* ``["+", text]``: text only in the *after* version (inserted);
* ``["~", start, end]``: a long unchanged run, folded: it is ``before[start:end]``
  (character offsets into the *before* text, which the report already holds), shown
  collapsed with its first and last few tokens kept as ``"="`` operations around it.

Concatenating the ``"="``, ``"~"`` and ``"-"`` pieces gives the before text, and the
``"="``, ``"~"`` and ``"+"`` pieces give the after text (see :func:`replay`).
"""

from __future__ import annotations

import difflib
import re

__all__ = ["FOLD_KEEP", "FOLD_OVER", "DiffOp", "replay", "tokenize", "word_diff"]

FOLD_OVER = 30
"""An unchanged run longer than this many tokens is folded."""
FOLD_KEEP = 10
"""Tokens kept visible at each end of a folded run."""

_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")

DiffOp = list[str | int]


def tokenize(text: str) -> list[str]:
    """Split ``text`` into whitespace runs, word runs and single punctuation
    characters; ``"".join(tokenize(text)) == text`` always holds."""
    return _TOKEN.findall(text)


def _append(ops: list[DiffOp], op: str, text: str) -> None:
    """Append ``[op, text]``, merged into the last op when that has the same kind."""
    if not text:
        return
    if ops and ops[-1][0] == op:
        ops[-1][1] = str(ops[-1][1]) + text
    else:
        ops.append([op, text])


def word_diff(
    before: str,
    after: str,
    *,
    fold_over: int = FOLD_OVER,
    keep: int = FOLD_KEEP,
) -> list[DiffOp]:
    """The word-level diff of ``before`` → ``after`` as a list of operations (see the
    module docstring); unchanged runs of more than ``fold_over`` tokens are folded,
    keeping ``keep`` tokens visible at each end."""
    if fold_over < 2 * keep:
        raise ValueError(
            f"fold_over ({fold_over}) must be at least 2 * keep ({2 * keep}); "
            "raise fold_over or lower keep"
        )
    old, new = tokenize(before), tokenize(after)
    offsets = [0]
    for token in old:
        offsets.append(offsets[-1] + len(token))
    ops: list[DiffOp] = []
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            if i2 - i1 > fold_over:
                _append(ops, "=", "".join(old[i1 : i1 + keep]))
                ops.append(["~", offsets[i1 + keep], offsets[i2 - keep]])
                _append(ops, "=", "".join(old[i2 - keep : i2]))
            else:
                _append(ops, "=", "".join(old[i1:i2]))
            continue
        if tag in ("delete", "replace"):
            _append(ops, "-", "".join(old[i1:i2]))
        if tag in ("insert", "replace"):
            _append(ops, "+", "".join(new[j1:j2]))
    return ops


def replay(ops: list[DiffOp], before: str) -> tuple[str, str]:
    """Rebuild ``(before, after)`` from ``ops`` (the *before* text resolves folded
    runs); used by the tests and handy to check a diff."""
    old: list[str] = []
    new: list[str] = []
    for op in ops:
        kind = op[0]
        if kind == "~":
            piece = before[int(op[1]) : int(op[2])]
            old.append(piece)
            new.append(piece)
        elif kind == "=":
            old.append(str(op[1]))
            new.append(str(op[1]))
        elif kind == "-":
            old.append(str(op[1]))
        elif kind == "+":
            new.append(str(op[1]))
        else:
            raise ValueError(f"unknown diff operation {kind!r} in ops")
    return "".join(old), "".join(new)
