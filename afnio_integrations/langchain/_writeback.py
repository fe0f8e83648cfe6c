"""Writing optimized texts back into the user's own prompt templates, safely.

A new text keeps the template format and partial variables of the old one. Literal
braces (anything in braces that is not one of the template's variables, e.g. JSON an
optimizer wrote) are escaped as ``{{ }}`` so they never become variables; a text whose
set of variables differs from the old one (a dropped or added placeholder) is rejected.
"""

from __future__ import annotations

import re

from langchain_core.prompts import PromptTemplate
from langchain_core.prompts.string import get_template_variables

from afnio_integrations.langchain._discovery import PromptSlot

__all__ = [
    "PlaceholderMismatchError",
    "apply_template",
    "checked_template",
    "heal_braces",
    "write_back",
]

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{|\}")


class PlaceholderMismatchError(ValueError):
    """A new prompt text would drop or add template variables."""


def heal_braces(text: str, variables: set[str]) -> str:
    """Escape every brace of ``text`` that is not part of ``{var}`` for a known
    variable (or already escaped), so literal braces stay literal.

    >>> heal_braces('Answer {"a": 1} about {topic}', {"topic"})
    'Answer {{"a": 1}} about {topic}'
    """

    def fix(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token
        if match.group(1) is not None:
            return (
                token if match.group(1) in variables else "{{" + match.group(1) + "}}"
            )
        return token * 2

    return _TOKEN.sub(fix, text)


def checked_template(slot: PromptSlot, text: str) -> PromptTemplate:
    """A new ``PromptTemplate`` for ``slot`` holding ``text``.

    Raises:
        PlaceholderMismatchError: if ``text`` drops or adds a variable.
    """
    old = slot.template
    fmt = old.template_format
    before = set(get_template_variables(old.template, fmt))
    if fmt == "f-string":
        text = heal_braces(text, before)
    after = set(get_template_variables(text, fmt))
    if after != before:
        missing, extra = sorted(before - after), sorted(after - before)
        raise PlaceholderMismatchError(
            f"The new text of {slot.key} must keep the variables {sorted(before)}"
            + (f"; it drops {missing}" if missing else "")
            + (f"; it adds {extra}" if extra else "")
            + "."
        )
    return PromptTemplate.from_template(
        text, template_format=fmt, partial_variables=dict(old.partial_variables)
    )


def apply_template(slot: PromptSlot, template: PromptTemplate) -> None:
    """Put a checked template into the user's prompt object: a chat message gets the
    new template; a plain ``PromptTemplate`` (the chain holds that very object) gets
    its text in place, its variables being unchanged."""
    if slot.index < 0:
        slot.prompt.template = template.template
    else:
        slot.message.prompt = template


def write_back(slot: PromptSlot, text: str) -> None:
    """Replace the text of ``slot`` in the user's prompt object (the chain holds that
    same object, so its next call uses the new text)."""
    apply_template(slot, checked_template(slot, text))
