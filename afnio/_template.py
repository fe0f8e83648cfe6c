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

MLflow's prompt registry writes variables as ``{{name}}`` and has no escape for literal
braces; :func:`to_mlflow_template` and :func:`from_mlflow_template` convert between the
two syntaxes so that a converted template renders the same text in both::

    >>> from afnio._template import from_mlflow_template, to_mlflow_template
    >>> to_mlflow_template('Reply as {{"answer": "..."}} to {question}.')
    'Reply as {"answer": "..."} to {{question}}.'
    >>> from_mlflow_template('Reply as {"answer": "..."} to {{ question }}.')
    'Reply as {{"answer": "..."}} to {question}.'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "from_mlflow_template",
    "placeholders",
    "render",
    "to_mlflow_template",
]

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")

# MLflow's variable syntax, as ``mlflow/prompt/constants.py`` defines it (dotted names
# and blanks inside the braces included); kept here so afnio imports without mlflow.
_MLFLOW_VARIABLE = re.compile(
    r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*(?:\.[a-zA-Z_][a-zA-Z0-9_]*)*)\s*\}\}"
)


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


def _is_mlflow_jinja(template: str) -> bool:
    """MLflow renders a template with Jinja2 when it holds both ``{%`` and ``%}``
    (``mlflow.entities.model_registry.prompt_version._is_jinja2_template``)."""
    return "{%" in template and "%}" in template


def to_mlflow_template(template: str) -> str:
    """Convert an afnio template to MLflow's prompt-registry syntax.

    ``{name}`` becomes ``{{name}}``, the literal braces ``{{`` and ``}}`` become single
    braces, and every other character (a lone brace afnio keeps literal, such as the
    ones of ``{x.y}`` or ``{0}``, included) is copied. For all ``values`` naming every
    placeholder, ``mlflow PromptVersion(template=to_mlflow_template(t)).format(**values)
    == render(t, values)``, and :func:`from_mlflow_template` gives ``t`` back when its
    literal braces are written doubled (lone ones come back doubled, which renders the
    same).

    Raises:
        TypeError: ``template`` is not a string.
        ValueError: MLflow would read literal text of the result as a variable
            (afnio's ``{{{{name}}}}``, the literal text ``{{name}}``, becomes
            ``{{name}}``, which MLflow fills; MLflow has no escape for literal
            braces) or as a Jinja2 template (the result holds both ``{%`` and
            ``%}``). The message names the text.
    """
    if not isinstance(template, str):
        raise TypeError(
            "to_mlflow_template(template=...) takes a str, "
            f"got {type(template).__name__}"
        )
    parts: list[str] = []
    # (start in the result, end in the result, start in template, end in template)
    chunks: list[tuple[int, int, int, int]] = []
    variables: set[tuple[int, int]] = set()
    length = 0
    position = 0

    def emit(text: str, start: int, end: int, variable: bool = False) -> None:
        nonlocal length
        if not text:
            return
        parts.append(text)
        chunks.append((length, length + len(text), start, end))
        if variable:
            variables.add((length, length + len(text)))
        length += len(text)

    for match in _TOKEN.finditer(template):
        emit(template[position : match.start()], position, match.start())
        token, name = match.group(0), match.group(1)
        if name:
            emit("{{" + name + "}}", match.start(), match.end(), variable=True)
        else:
            emit(token[0], match.start(), match.end())
        position = match.end()
    emit(template[position:], position, len(template))
    result = "".join(parts)

    def source(start: int, end: int) -> str:
        first = next(c[2] for c in chunks if c[0] <= start < c[1])
        last = next(c[3] for c in chunks if c[0] < end <= c[1])
        return template[first:last]

    matched: set[tuple[int, int]] = set()
    for match in _MLFLOW_VARIABLE.finditer(result):
        if match.span() not in variables:
            raise ValueError(
                "to_mlflow_template: the literal text "
                f"{source(*match.span())!r} of the template becomes "
                f"{match.group(0)!r} in MLflow's syntax, which MLflow "
                f"reads as the variable {match.group(1)!r} (MLflow has no escape for "
                "literal braces). Change that text (for example, put a space between "
                "the braces) or keep this template out of the MLflow prompt registry."
            )
        matched.add(match.span())
    if matched != variables:  # pragma: no cover - a match never straddles a variable
        raise ValueError(
            "to_mlflow_template: MLflow would not read every placeholder of the "
            f"template {template!r} as a variable"
        )
    if _is_mlflow_jinja(result):
        raise ValueError(
            "to_mlflow_template: the template's literal text holds both '{%' and "
            f"'%}}' after conversion ({result!r}), which MLflow renders as a Jinja2 "
            "template. Change that text or keep this template out of the MLflow "
            "prompt registry."
        )
    return result


def from_mlflow_template(template: str) -> str:
    """Convert an MLflow prompt-registry template to afnio's syntax.

    ``{{name}}`` (blanks inside the braces allowed) becomes ``{name}`` and every
    other brace is doubled, so ``render(from_mlflow_template(m), values) ==
    PromptVersion(template=m).format(**values)`` for all ``values`` naming every
    variable, and ``to_mlflow_template(from_mlflow_template(m)) == m`` when ``m``
    writes its variables without blanks (``{{name}}``).

    Raises:
        TypeError: ``template`` is not a string (MLflow chat templates, lists of
            messages, are not converted: convert each message's ``content``).
        ValueError: a dotted variable (``{{a.b}}``), which afnio placeholders cannot
            name, or a Jinja2 template (``{% ... %}``), which afnio does not render.
    """
    if not isinstance(template, str):
        raise TypeError(
            "from_mlflow_template(template=...) takes a str (for a chat template, "
            f"convert each message's content), got {type(template).__name__}"
        )
    if _is_mlflow_jinja(template):
        raise ValueError(
            "from_mlflow_template: the template holds '{%' and '%}', so MLflow renders "
            "it with Jinja2, which afnio templates do not support"
        )

    def literal(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    parts: list[str] = []
    position = 0
    for match in _MLFLOW_VARIABLE.finditer(template):
        name = match.group(1)
        if "." in name:
            raise ValueError(
                f"from_mlflow_template: the MLflow variable {match.group(0)!r} has a "
                "dotted name, which an afnio placeholder cannot have ({name} takes a "
                "Python identifier); rename the variable"
            )
        parts.append(literal(template[position : match.start()]))
        parts.append("{" + name + "}")
        position = match.end()
    parts.append(literal(template[position:]))
    return "".join(parts)
