"""Safe template filling: ``{name}`` placeholders only, nothing is ever evaluated.

Rules (difference 20 of the API contract):

* ``{name}`` (a Python identifier) is replaced by ``values[name]`` when present;
* ``{{`` and ``}}`` render as literal ``{`` and ``}`` (as in f-strings, so templates
  written for LangChain or ``str.format`` render the same);
* anything else in braces stays as written: ``{x.__class__}``, ``{x[0]}``, ``{0}``,
  ``{unknown}``;
* inserted values are never scanned again, so braces inside user data stay literal.

Example::

    >>> from afnio._template import render
    >>> render("Hi {name}! {{literal}} {x.__class__}", {"name": "{0}"})
    'Hi {0}! {literal} {x.__class__}'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["placeholders", "render"]

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``{name}`` placeholders of ``template`` from ``values`` (see the module
    docstring for the exact rules)."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = match.group(1)
        if name in values:
            return str(values[name])
        return token

    return _TOKEN.sub(substitute, template)


def placeholders(template: str) -> list[str]:
    """The ``{name}`` placeholders of ``template``, in order of first appearance."""
    seen: dict[str, None] = {}
    for match in _TOKEN.finditer(template):
        if match.group(1):
            seen.setdefault(match.group(1), None)
    return list(seen)
