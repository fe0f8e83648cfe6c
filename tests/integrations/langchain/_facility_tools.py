"""The Facility Support tool-routing task of issue 19's learning proof: each message
of the Facility Support dataset (``../shared``, see :mod:`tests._shared_data`) goes to
one of three tools by a fixed rule on its annotated categories, and a support agent
(``langchain.agents.create_agent``) must learn to call that tool.

The routing rule (:func:`route_of`), a pure function of a row's ``categories``, first
match wins:

1. ``repairs`` when the message is about repairs or maintenance
   (:data:`REPAIR_CATEGORIES`: ``emergency_repair_services``,
   ``routine_maintenance_requests``);
2. else ``cleaning`` when it is about cleaning (:data:`CLEANING_CATEGORIES`:
   ``cleaning_services_scheduling``, ``specialized_cleaning_services``);
3. else ``general`` (everything else).

On the 200 rows: 74 ``repairs``, 57 ``cleaning``, 69 ``general``. The held-out set
(:func:`heldout`) is fixed, every :data:`HELDOUT_STRIDE`-th row (indices 0, 3, 6...:
67 rows, 20 / 21 / 26); the training rows of a seed (:func:`training_split`) are drawn
from the other 133 rows by ``random.Random(seed)``, so the seed never changes the
held-out set.

The agent starts from :data:`INITIAL_SYSTEM_PROMPT` and the docstrings of
:func:`make_tools`: plain English, no routing rule of the simulator's grammar (see
``docs/testing.md``, "Tool calling"), so on the simulator it calls no tool at all
(held-out tool-choice accuracy 0%).

Import it after ``pytest.importorskip("langchain_core")``: the tools need LangChain.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, tool

from tests._shared_data import SHARED_DATASET

__all__ = [
    "CLEANING_CATEGORIES",
    "HELDOUT_STRIDE",
    "INITIAL_SYSTEM_PROMPT",
    "REPAIR_CATEGORIES",
    "TOOL_NAMES",
    "FacilityRow",
    "heldout",
    "load_rows",
    "make_tools",
    "route_of",
    "shuffled_tools",
    "tool_choice_correct",
    "training_pool",
    "training_split",
]

TOOL_NAMES: tuple[str, ...] = ("repairs", "cleaning", "general")
"""The three tools, in the order :func:`make_tools` gives them to the agent."""

REPAIR_CATEGORIES: tuple[str, ...] = (
    "emergency_repair_services",
    "routine_maintenance_requests",
)
"""The categories routed to ``repairs`` (checked first)."""

CLEANING_CATEGORIES: tuple[str, ...] = (
    "cleaning_services_scheduling",
    "specialized_cleaning_services",
)
"""The categories routed to ``cleaning`` (when no repair category is set)."""

HELDOUT_STRIDE = 3
"""Every ``HELDOUT_STRIDE``-th row (index 0, 3, 6...) is held out: 67 of 200."""

INITIAL_SYSTEM_PROMPT = (
    "You are the support agent of ProCare Facility Solutions. Read the customer's "
    "e-mail and handle it with the right tool."
)
"""The agent's starting system prompt: no routing rule, so the simulator calls no tool
(the optimizer has everything to learn)."""


@dataclass(frozen=True)
class FacilityRow:
    """One message of the dataset with the tool it must be routed to.

    Attributes:
        index: the row's position in ``dataset.json`` (0-based).
        message: the customer's e-mail (``fields.input``).
        categories: the annotated categories that are set, in the file's order.
        tool: the expected tool (:func:`route_of` of the categories).
        sentiment: the annotated sentiment (``positive``, ``neutral``, ``negative``).
        urgency: the annotated urgency (``low``, ``medium``, ``high``).
    """

    index: int
    message: str
    categories: tuple[str, ...]
    tool: str
    sentiment: str
    urgency: str


def route_of(categories: Mapping[str, bool]) -> str:
    """The tool a message with these ``categories`` must go to (see the module
    docstring): ``repairs``, else ``cleaning``, else ``general``.

    >>> route_of({"routine_maintenance_requests": True,
    ...           "specialized_cleaning_services": True})
    'repairs'
    >>> route_of({"cleaning_services_scheduling": True}), route_of({})
    ('cleaning', 'general')
    """
    if any(categories.get(name) for name in REPAIR_CATEGORIES):
        return "repairs"
    if any(categories.get(name) for name in CLEANING_CATEGORIES):
        return "cleaning"
    return "general"


def _row(index: int, raw: Any) -> FacilityRow:
    """One :class:`FacilityRow` from a raw record of ``dataset.json``."""
    where = f"row {index} of the Facility Support dataset"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} is not a JSON object; the file must hold a list")
    fields = raw.get("fields")
    message = fields.get("input") if isinstance(fields, Mapping) else None
    if not isinstance(message, str) or not message.strip():
        raise ValueError(f"{where} has no text in fields.input")
    try:
        answer = json.loads(raw["answer"])
        categories = answer["categories"]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{where}: 'answer' must be a JSON string holding a 'categories' object "
            f"({error!r})"
        ) from error
    if not isinstance(categories, Mapping):
        raise ValueError(f"{where}: answer.categories must be an object of booleans")
    return FacilityRow(
        index=index,
        message=message,
        categories=tuple(str(k) for k, v in categories.items() if v),
        tool=route_of(categories),
        sentiment=str(answer.get("sentiment", "")),
        urgency=str(answer.get("urgency", "")),
    )


def load_rows(path: Path | str = SHARED_DATASET) -> tuple[FacilityRow, ...]:
    """Every row of the dataset at ``path`` (default: ``../shared``'s copy; tests
    guard with ``needs_shared_dataset``), in file order, each with its tool.

    Raises:
        FileNotFoundError: ``path`` does not exist (a fresh clone has no
            ``../shared``: mark the test with ``needs_shared_dataset``).
        ValueError: the file is not a list of rows with ``fields.input`` and an
            ``answer`` JSON string holding ``categories``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the Facility Support dataset lives in "
            "../shared/data/facility-support/dataset.json beside the repository; "
            "mark the test with tests._shared_data.needs_shared_dataset(...)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of rows, not {type(data)}")
    return tuple(_row(i, raw) for i, raw in enumerate(data))


def heldout(rows: Sequence[FacilityRow]) -> tuple[FacilityRow, ...]:
    """The fixed held-out rows: those whose ``index`` is a multiple of
    :data:`HELDOUT_STRIDE` (67 of the 200)."""
    return tuple(row for row in rows if row.index % HELDOUT_STRIDE == 0)


def training_pool(rows: Sequence[FacilityRow]) -> tuple[FacilityRow, ...]:
    """The rows that are not held out (133 of the 200), in file order."""
    return tuple(row for row in rows if row.index % HELDOUT_STRIDE != 0)


def training_split(
    seed: int, n: int, rows: Sequence[FacilityRow] | None = None
) -> tuple[FacilityRow, ...]:
    """``n`` training rows for ``seed``: ``random.Random(seed).sample`` of
    :func:`training_pool` (of ``rows``, default :func:`load_rows`). Never a held-out
    row; the same seed and ``n`` always give the same rows, in the same order.

    Raises:
        ValueError: ``n`` is not between 1 and the size of the pool (133).
    """
    pool = training_pool(load_rows() if rows is None else rows)
    if not 1 <= n <= len(pool):
        raise ValueError(
            f"n must be between 1 and {len(pool)} (the rows that are not held out), "
            f"got {n}"
        )
    return tuple(random.Random(seed).sample(pool, n))


def shuffled_tools(rows: Sequence[FacilityRow], seed: int) -> tuple[FacilityRow, ...]:
    """``rows`` with their expected tools permuted by ``random.Random(seed)`` (the
    shuffled-label control: same messages, same tool counts, labels unrelated to the
    messages)."""
    tools = [row.tool for row in rows]
    random.Random(seed).shuffle(tools)
    return tuple(replace(row, tool=t) for row, t in zip(rows, tools, strict=True))


def tool_choice_correct(called: Sequence[str], row: FacilityRow) -> bool:
    """The tool-choice metric: exactly one tool called, the row's (an exact
    trajectory match; no call, a wrong call or an extra call are wrong).

    >>> row = FacilityRow(0, "Leak", (), "repairs", "neutral", "high")
    >>> tool_choice_correct(["repairs"], row), tool_choice_correct([], row)
    (True, False)
    >>> tool_choice_correct(["repairs", "general"], row)
    False
    """
    return list(called) == [row.tool]


def make_tools() -> list[BaseTool]:
    """Fresh ``repairs``, ``cleaning`` and ``general`` tools (new objects per call:
    write-back after optimization changes the objects' descriptions, so each run
    needs its own). Their descriptions (the docstrings' first paragraphs, see
    :data:`TOOL_DESCRIPTIONS`) say what each tool does, in plain English without
    routing rules; each has a ``request`` argument with its own description."""

    @tool(parse_docstring=True)
    def repairs(request: str) -> str:
        """Send a technician to fix or maintain equipment.

        Args:
            request: the customer's request, in their words.
        """
        return "A technician has been booked for your request."

    @tool(parse_docstring=True)
    def cleaning(request: str) -> str:
        """Schedule a cleaning.

        Args:
            request: the customer's request, in their words.
        """
        return "A cleaning visit has been scheduled for your request."

    @tool(parse_docstring=True)
    def general(request: str) -> str:
        """Answer any other request.

        Args:
            request: the customer's request, in their words.
        """
        return "Our support team will answer your question."

    return [repairs, cleaning, general]
