"""The rule world reads the task the same way whatever form the program gives it
(issue 18, item 6, review): a structured output's JSON field, DSPy's typed outputs, a
prompt that names no field, a human template with a preamble, header labels, and the
usual ways of listing labels."""

from __future__ import annotations

import json

import pytest

from afnio.testing import world
from afnio.testing.world import DSPyField, DSPyPrompt, Message, SimRequest


def _backward(system: str, message: str, target: str, output: str = "low") -> str:
    """The gradient a chat backward writes for the system prompt (afnio's markup)."""
    prompt = (
        "<LM_CONVERSATION>\n"
        f'<MESSAGE role="system">{system}</MESSAGE>\n'
        f'<MESSAGE role="user">{message}</MESSAGE>\n'
        "</LM_CONVERSATION>\n"
        f'<LM_OUTPUT role="response of a LangChain chat model">{output}</LM_OUTPUT>\n'
        "<FEEDBACK_ON_OUTPUT>"
        f'The prediction "{output}" is wrong: the expected value is "{target}".'
        "</FEEDBACK_ON_OUTPUT>\n"
        '<VARIABLES count="1">\n'
        '<VARIABLE index="1" role="system prompt" location="system" '
        f'trainable="true">{system}</VARIABLE>\n</VARIABLES>'
    )
    req = SimRequest.from_messages([{"role": "user", "content": prompt}])
    return world.answer(req).values["gradients"][0]


# -- item 1: structured output --------------------------------------------------------

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "Ticket",
        "schema": {
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "priority": {"enum": ["low", "high"]},
            },
        },
    },
}


def test_a_structured_outputs_field_is_read_from_the_prediction() -> None:
    gradient = _backward(
        "Triage the support ticket.",
        "Outage: payroll is down",
        "high",
        output='{"summary": "low", "priority": "low"}',
    )
    assert gradient.startswith(
        'If the message begins with "outage", the priority is high.'
    )
    assert "no JSON" not in gradient and "sentiment" not in gradient


def test_a_schema_shown_in_the_conversation_gives_the_labels() -> None:
    system = (
        "Triage the ticket. Answer with JSON matching "
        '{"properties": {"priority": {"enum": ["low", "high"]}}}'
    )
    gradient = _backward(system, "Outage", "high", output='{"priority": "low"}')
    assert gradient == 'If the message begins with "outage", the priority is high.'


def test_the_forward_answers_a_rule_in_the_schemas_json_form() -> None:
    system = (
        "Triage the support ticket. "
        'If the message begins with "outage", the priority is high.'
    )
    for message, expected in [("Outage in Paris", "high"), ("A question", "low")]:
        req = SimRequest.from_messages(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": message},
            ],
            response_format=SCHEMA,
        )
        assert json.loads(world.respond(req))["priority"] == expected


# -- item 3: DSPy typed outputs -------------------------------------------------------


def _dspy(output_type: str, rule: str, message: str) -> dict:
    system = (
        "Your input fields are:\n1. `ticket` (str): \n"
        f"Your output fields are:\n1. `out` ({output_type}): \n"
        "All interactions will be structured in the following way...\n"
        f"In adhering to this structure, your objective is: \n    Decide. {rule}"
    )
    user = (
        f"[[ ## ticket ## ]]\n{message}\n\nRespond with the corresponding output "
        "fields, starting with the field `[[ ## out ## ]]`."
    )
    prompt = DSPyPrompt.parse([Message("system", system), Message("user", user)])
    assert prompt is not None
    return world.dspy_values(prompt)


@pytest.mark.parametrize(
    ("output_type", "label", "hit", "miss"),
    [
        ("bool", "True", True, False),
        ("int", "3", 3, 0),
        ("float", "2", 2.0, 0.0),  # a rule label runs to the first period
        ("Literal['low', 'high']", "high", "high", "low"),
    ],
)
def test_dspy_typed_outputs_never_get_a_value_outside_their_type(
    output_type: str, label: str, hit: object, miss: object
) -> None:
    rule = f'If the message begins with "congratulations", the out is {label}.'
    assert _dspy(output_type, rule, "Congratulations, you won") == {"out": hit}
    assert _dspy(output_type, rule, "Lunch at noon?") == {"out": miss}


def test_a_dspy_rule_whose_label_is_not_of_the_type_is_not_answered() -> None:
    rule = 'If the message begins with "lunch", the out is maybe.'
    assert _dspy("bool", rule, "Lunch at noon?") == {"out": False}
    assert world.dspy_typed(DSPyField("n", "int"), "2.5") == (False, None)


# -- item 4: the field ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("instructions", "field"),
    [
        ("Route the ticket to the right team.", "team"),
        ("Categorize the topic of the ticket.", "topic"),
        ("Categorise the topic of the ticket.", "topic"),
        ("Detect the language of the text.", "language"),
        ("Which language is the text in?", "language"),
        ("Is this message spam?", "spam"),
        ("Triage the priority of the ticket.", "priority"),
        ("Classify the following message.", None),
        ("Classify the given text.", None),
        ("Triage the support ticket.", None),
    ],
)
def test_prompt_field_reads_common_task_phrasings(
    instructions: str, field: str | None
) -> None:
    assert world.prompt_field(instructions) == field


def test_labels_without_a_field_give_the_generic_field_not_sentiment() -> None:
    gradient = _backward(
        "Classify the following message. Categories: billing, technical, account",
        "Refund request for order 1234",
        "billing",
    )
    assert gradient.startswith(
        'If the message begins with "refund", the label is billing.'
    )
    assert "sentiment" not in gradient


# -- items 5 and 6: the lead word -----------------------------------------------------


def test_a_template_preamble_line_is_not_the_lead_word() -> None:
    assert world.lead_word("Customer message:\nRefund request") == "refund"
    assert world.lead_word("Here is what the customer wrote:\nLogin broken") == "login"


def test_only_header_labels_are_skipped_before_a_colon() -> None:
    assert world.lead_word("URGENT: server down") == "urgent"
    assert world.lead_word("Outage: the payroll system") == "outage"
    assert world.lead_word("Subject: Re: Fwd: Lift stuck") == "lift"
    assert world.lead_word("Ticket: printer jams") == "printer"


# -- item 7: label lists --------------------------------------------------------------


TEAMS = ("billing", "technical", "account")


@pytest.mark.parametrize(
    ("instructions", "labels"),
    [
        ("Categories: billing, technical, account", TEAMS),
        ("Labels: spam, ham", ("spam", "ham")),
        ("Answer with one of billing, technical or account.", TEAMS),
        ("Is this spam? Answer yes or no.", ("yes", "no")),
        ("Rate the urgency: high or low.", ("high", "low")),
        ("Pick one:\n- billing: money\n- technical\n- account", TEAMS),
        ("Just read it.", ()),
    ],
)  # fmt: skip
def test_listed_labels_reads_the_usual_forms(
    instructions: str, labels: tuple[str, ...]
) -> None:
    assert world.listed_labels(instructions) == labels


def test_the_default_is_the_first_listed_label_in_the_order_given() -> None:
    req = SimRequest.from_messages(
        [
            {"role": "system", "content": "Rate the urgency: high or low."},
            {"role": "user", "content": "The lift is down."},
        ]
    )
    assert world.respond(req) == "high"
