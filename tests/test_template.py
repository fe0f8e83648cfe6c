"""Safe template filling: placeholders only, braces in data stay literal."""

from __future__ import annotations

import random

import pytest

from afnio._template import (
    from_mlflow_template,
    placeholders,
    render,
    to_mlflow_template,
)


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


# --- MLflow prompt-registry syntax: {{var}} variables, no escape for literal braces ---

NAMES = ["x", "name", "q_1", "_y", "Answer"]
CANONICAL_PIECES = [
    "{x}",
    "{name}",
    "{q_1}",
    "{{",
    "}}",
    '{{"a": 1}}',  # a JSON literal
    '{{"list": [1, {{"b": {x}}}]}}',  # nested JSON with a placeholder inside
    "{{{name}}}",  # a placeholder in literal braces
    "{{ {x} }}",
    "text ",
    " - ",
    "%",
    ".",
    "\n",
]


def _random_canonical_template(rng: random.Random) -> str:
    """Placeholders, text, and literal braces written doubled (canonical form)."""
    return "".join(rng.choice(CANONICAL_PIECES) for _ in range(rng.randint(0, 12)))


def _random_text(rng: random.Random) -> str:
    """Any text: lone braces, doubled ones, placeholders, '{%' and '%}' sequences."""
    alphabet = [
        "{",
        "}",
        "{",
        "}",
        "x",
        "a",
        " ",
        ".",
        "%",
        '"',
        ":",
        "0",
        "{x}",
        "{name}",
    ]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))


def _random_values(rng: random.Random, template: str) -> dict[str, str]:
    """A value for every placeholder; values hold braces that must stay literal."""
    pool = ["v", "", "{x}", "{{name}}", "{% if x %}", "a b", "}{"]
    return {name: rng.choice(pool) for name in placeholders(template)}


def _naive_mlflow(template: str) -> str:
    """The plain syntax swap ({name} -> {{name}}, {{ -> {, }} -> }), unchecked."""
    doubled = {name: "{{" + name + "}}" for name in placeholders(template)}
    return render(template, doubled)


def test_to_mlflow_template_turns_placeholders_into_double_braces() -> None:
    assert to_mlflow_template("Hi {name}, {x}!") == "Hi {{name}}, {{x}}!"
    assert to_mlflow_template('JSON: {{"a": 1}}') == 'JSON: {"a": 1}'
    assert to_mlflow_template("{{{name}}}") == "{{{name}}}"
    # a lone brace afnio keeps literal is copied
    assert to_mlflow_template("{x.y} {0} {") == "{x.y} {0} {"
    assert to_mlflow_template("") == ""


def test_from_mlflow_template_makes_placeholders_and_doubles_literal_braces() -> None:
    assert from_mlflow_template("Hi {{ name }}, {{x}}!") == "Hi {name}, {x}!"
    assert from_mlflow_template('JSON: {"a": 1}') == 'JSON: {{"a": 1}}'
    assert from_mlflow_template("{{{name}}}") == "{{{name}}}"
    assert from_mlflow_template("{x}") == "{{x}}"


def test_a_literal_that_mlflow_would_read_as_a_variable_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'\{\{\{\{x\}\}\}\}'.*variable 'x'"):
        to_mlflow_template("Write {{{{x}}}} literally, then {name}.")
    with pytest.raises(ValueError, match=r"variable 'a\.b'"):
        to_mlflow_template("{{{{ a.b }}}}")


def test_a_literal_that_mlflow_would_render_with_jinja_raises() -> None:
    with pytest.raises(ValueError, match="Jinja2"):
        to_mlflow_template("{{% if {x} %}}")
    with pytest.raises(ValueError, match="Jinja2"):
        from_mlflow_template("{% if x %}{{ x }}{% endif %}")


def test_from_mlflow_template_refuses_dotted_variables_and_chat_templates() -> None:
    with pytest.raises(ValueError, match=r"'\{\{user\.name\}\}'"):
        from_mlflow_template("Hi {{user.name}}")
    with pytest.raises(TypeError, match="content"):
        from_mlflow_template([{"role": "user", "content": "{{x}}"}])  # type: ignore[arg-type]


def test_random_canonical_templates_round_trip_through_mlflow_syntax() -> None:
    rng = random.Random(20240522)
    converted = 0
    for _ in range(3000):
        template = _random_canonical_template(rng)
        try:
            mlflow_template = to_mlflow_template(template)
        except ValueError:
            continue
        converted += 1
        assert mlflow_template == _naive_mlflow(template), template
        assert from_mlflow_template(mlflow_template) == template, template
        assert to_mlflow_template(from_mlflow_template(mlflow_template)) == (
            mlflow_template
        )
    assert converted > 2000


def test_random_texts_keep_their_rendering_through_mlflow_syntax() -> None:
    rng = random.Random(7)
    converted = 0
    for _ in range(3000):
        template = _random_text(rng)
        values = _random_values(rng, template)
        try:
            mlflow_template = to_mlflow_template(template)
        except ValueError:
            continue
        converted += 1
        back = from_mlflow_template(mlflow_template)
        assert render(back, values) == render(template, values), template
        assert to_mlflow_template(back) == mlflow_template, template
    assert converted > 1500


def _mlflow_format(template: str, values: dict[str, str]) -> str | None:
    """MLflow's own rendering (None when MLflow refuses the template)."""
    from mlflow.entities.model_registry.prompt_version import PromptVersion

    try:
        return PromptVersion("p", 1, template=template).format(**values)
    except Exception:
        return None


@pytest.mark.parametrize("kind", ["canonical", "any text"])
def test_mlflow_prompt_version_format_equals_afnio_render(kind: str) -> None:
    pytest.importorskip("mlflow")
    rng = random.Random(11 if kind == "canonical" else 12)
    make = _random_canonical_template if kind == "canonical" else _random_text
    converted = refused = 0
    for _ in range(1500):
        template = make(rng)
        values = _random_values(rng, template)
        try:
            mlflow_template = to_mlflow_template(template)
        except ValueError:
            # refused only where the plain syntax swap would render differently
            refused += 1
            naive = _naive_mlflow(template)
            assert _mlflow_format(naive, values) != render(template, values), template
            continue
        converted += 1
        assert _mlflow_format(mlflow_template, values) == render(template, values), (
            template,
            values,
        )
        # and back: an MLflow template renders in afnio as MLflow formats it
        assert render(from_mlflow_template(mlflow_template), values) == (
            _mlflow_format(mlflow_template, values)
        )
    assert converted > 500
    assert refused > 0
