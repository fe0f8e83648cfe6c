"""The prompts of the TGD optimizer: named, versioned templates (``{name}`` placeholders
only, filled by :func:`afnio._template.render`).

Markers: a TGD call holds ``<VARIABLE_ROLE>``, ``<CURRENT_VALUE>`` and
``<FEEDBACK ...>`` (and, when used, ``<PAST_ITERATIONS>`` and ``<CONSTRAINTS>``), and
asks for the JSON schema named ``afnio_improved_variable``:
``{"improved_value": "..."}``.

Feedback rendering (see :func:`afnio.optim.tgd.render_feedback`): every distinct
feedback text appears once, with ``(xN)`` when N samples gave it. Above
``FEEDBACK_CONDENSE_CHARS`` characters the texts are condensed deterministically: texts
that differ only in their double-quoted parts are written once, with the varying parts
as alternatives ``{"a" (x3) | "b" | "c"}`` (a value given by more than one of them
carries its count, so the line's ``(xN)`` total is split exactly), so the prompt grows
with the number of distinct values, not with the batch, and every distinct value and
how often it was asked for still reach the optimizer.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FEEDBACK_CONDENSE_CHARS",
    "IMPROVED_VARIABLE_SCHEMA_NAME",
    "TGD_PROMPTS_VERSION",
    "TGD_RETRY_USER",
    "TGD_SYSTEM",
    "TGD_USER",
    "improved_variable_response_format",
]

TGD_PROMPTS_VERSION = 1
IMPROVED_VARIABLE_SCHEMA_NAME = "afnio_improved_variable"
FEEDBACK_CONDENSE_CHARS = 1200

TGD_SYSTEM = """\
You are the optimizer of afnio, an optimization system that improves the text \
variables of a language-model program by textual gradient descent.
You receive a variable (<CURRENT_VALUE>), its role (<VARIABLE_ROLE>) and the feedback \
collected on it from the program's runs (<FEEDBACK>); when given, also its past values \
with the feedback they received (<PAST_ITERATIONS>) and constraints the new value must \
respect (<CONSTRAINTS>). Feedback written as {"a" | "b"} stands for several feedbacks \
that differ only in that part.
Write an improved version of the variable that addresses all the feedback while \
keeping what already works. Keep every {placeholder} of the variable exactly as it is.
Answer with a JSON object only: {"improved_value": "<the complete new value>"}."""
"""Default system message of TGD."""

TGD_USER = """\
<VARIABLE_ROLE>{variable_role}</VARIABLE_ROLE>
<CURRENT_VALUE>{variable}</CURRENT_VALUE>
<FEEDBACK count="{feedback_count}">
{feedback}
</FEEDBACK>
{past_iterations}{constraints}Return the complete improved value."""
"""Default user message of TGD. Custom ``messages`` may use the same placeholders:
``variable_role``, ``variable``, ``feedback``, ``feedback_count``,
``past_iterations``, ``constraints`` (plus the keys of ``inputs``); without
``{variable}`` or ``{feedback}`` they get a
:class:`afnio.optim.tgd.TGDMessagesWarning`. Upstream's placeholder messages
(:data:`afnio.optim.tgd.TGD_MESSAGES`) are replaced by this prompt and
:data:`TGD_SYSTEM`."""

PAST_ITERATIONS = """\
<PAST_ITERATIONS>
{iterations}
</PAST_ITERATIONS>
"""
ITERATION = """\
<ITERATION index="{index}">
<VALUE>{value}</VALUE>
<FEEDBACK>
{feedback}
</FEEDBACK>
</ITERATION>"""
CONSTRAINTS = """\
<CONSTRAINTS>
{constraints}
</CONSTRAINTS>
"""

TGD_RETRY_USER = """\
Your answer could not be used: {error}
Answer again with a JSON object only: {"improved_value": "<the complete new value>"}."""
"""Sent after an unusable optimizer answer, with that answer."""


def improved_variable_response_format() -> dict[str, Any]:
    """The ``response_format`` of a TGD call."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": IMPROVED_VARIABLE_SCHEMA_NAME,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"improved_value": {"type": "string"}},
                "required": ["improved_value"],
                "additionalProperties": False,
            },
        },
    }
