"""Safe template filling: placeholders only, braces in data stay literal."""

from __future__ import annotations

from afnio._template import placeholders, render


def test_placeholders_are_filled_and_unknown_ones_kept() -> None:
    assert render("Hi {name}, {unknown}", {"name": "Ann"}) == "Hi Ann, {unknown}"


def test_double_braces_are_literal_braces() -> None:
    assert render("{{name}} is {name}", {"name": "x"}) == "{name} is x"
    assert render("a {{ b }} c", {}) == "a { b } c"


def test_attribute_index_and_positional_syntax_is_never_evaluated() -> None:
    template = "{x.__class__} {x[0]} {0} {x!r} {x:>10}"
    assert render(template, {"x": "value"}) == template


def test_inserted_values_are_not_rescanned() -> None:
    value = "{message.__class__} {0} {{x}} {name}"
    assert render("<{name}>", {"name": value}) == f"<{value}>"


def test_placeholders_lists_names_in_order() -> None:
    assert placeholders("{b} {a} {b} {{c}} {x.y}") == ["b", "a"]
