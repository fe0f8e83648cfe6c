"""Shared by the cheap-backward tests of the integrations (``test_*cheap*.py``): the
simulator's recorded requests classified by the responder that answered them
(:func:`afnio.testing.world.answer`), the chat-backward calls split by step and by
prompt template, and rows whose targets are all distinct (each row's feedback must
name its own expected value).

Kinds (the responders' names): ``chat_backward`` (one sample's chat-backward call),
``chat_backward_group`` (several samples' grouped call), ``evaluator_backward``,
``optimizer``; the forward calls are ``task``/``fallback`` (LangChain) or ``dspy``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afnio.testing import SALIENCE_LEXICON, calls_by_responder, responder_of, world

__all__ = [
    "CHAT_BACKWARD",
    "CODE_ROWS",
    "BackwardCall",
    "backward_calls",
    "ceil8",
    "code_rows",
    "kind",
    "kinds",
    "run_log",
    "steps",
]

CHAT_BACKWARD = ("chat_backward", "chat_backward_group")
"""The kinds of a chat-backward call (one sample, or a group of them)."""

_OTHER_FORMS = frozenset(
    {"disappointing", "frustrating", "frustration", "unsatisfactory"}
)
"""Lexicon words of a family another word already stands for."""

_WORDS = tuple(w for w in SALIENCE_LEXICON if w not in _OTHER_FORMS)
"""Words of the simulator's salience lexicon, one per row (no two of one family)."""

_CODES = (
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "heron",
    "indigo",
    "jasper",
    "kelp",
    "lotus",
    "maple",
    "nectar",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "sage",
    "tundra",
    "umber",
    "violet",
    "willow",
    "yarrow",
)
"""Distinct targets, one per row."""

CODE_ROWS = tuple(zip(_WORDS, _CODES, strict=True))
"""``(word, code)``: the word each row's message holds and the code it must get."""


def code_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` rows ``(message, word, code)``, every code distinct, in an order
    shuffled with ``seed`` (the words and codes are paired at random too). Each
    message begins with its word (the simulator keys a rule for a field such as
    the code on a message's first word)."""
    rng = random.Random(seed)
    words = rng.sample([w for w, _ in CODE_ROWS], n)
    codes = rng.sample([c for _, c in CODE_ROWS], n)
    return [
        (f"{w.capitalize()} about the lift, said visitor {i + 1}.", w, c)
        for i, (w, c) in enumerate(zip(words, codes, strict=True))
    ]


kind = responder_of
"""The responder that answered a request body (:func:`afnio.testing.responder_of`)."""

kinds = calls_by_responder
"""How many of some requests each responder answered
(:func:`afnio.testing.calls_by_responder`)."""


def _user_text(body: Mapping[str, Any]) -> str:
    return "\n".join(
        world.message_text(m.get("content"))
        for m in body.get("messages", [])
        if isinstance(m, Mapping) and m.get("role") == "user"
    )


@dataclass(frozen=True)
class BackwardCall:
    """One chat-backward request: its kind, how many samples it asked about and
    the whole text of its user message."""

    kind: str
    samples: int
    text: str

    def mentions(self, marker: str) -> bool:
        return marker in self.text


def backward_calls(requests: Sequence[Mapping[str, Any]]) -> list[BackwardCall]:
    """The chat-backward requests among ``requests``, in order."""
    calls = []
    for body in requests:
        k = kind(body)
        if k not in CHAT_BACKWARD:
            continue
        text = _user_text(body)
        n = len(re.findall(r"<LM_CALL index=", text)) if k != "chat_backward" else 1
        calls.append(BackwardCall(k, n, text))
    return calls


def steps(requests: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The requests of each optimizer step: cut after each run of optimizer calls
    (one per parameter that got feedback; a step's backward calls all come before
    them, validation forwards may sit in any part). A trailing part without an
    optimizer call is dropped."""
    parts: list[list[Mapping[str, Any]]] = [[]]
    optimizing = False
    for body in requests:
        is_optimizer = kind(body) == "optimizer"
        if optimizing and not is_optimizer:
            parts.append([])
        parts[-1].append(body)
        optimizing = is_optimizer
    if not optimizing:
        parts.pop()
    return parts


def run_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/run_log.jsonl``."""
    path = Path(run_dir) / "run_log.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def ceil8(n: int) -> int:
    """The chat-backward calls ``n`` samples of one template take in cheap mode."""
    return math.ceil(n / 8)


def failed_per_step(records: list[dict[str, Any]], metric: str) -> list[int]:
    """Each step's failed rows, from its run-log record (the ``metric`` that is the
    share of rows right, and the batch size)."""
    return [
        round(len(r["samples"]["indices"]) * (1 - float(r["metrics"][metric])))
        for r in records
        if r["type"] == "step"
    ]
