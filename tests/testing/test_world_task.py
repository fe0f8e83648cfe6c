"""The rule world reads the task from the request (field, labels, default) and picks a
rule word from the input without looking at labels (issue 18, item 6)."""

from __future__ import annotations

import random

from afnio.testing import world
from afnio.testing.world import SimRequest

URGENCY_PROMPT = "Classify the urgency of the message: low, medium or high."
TICKETS = [
    "Subject: Outage in the data centre, fix ASAP",
    "Subject: Inquiry about cleaning schedules",
    "Server down since 9am!!",
    "Not urgent: the printer on floor 2 jams",
    "Olá, preciso de ajuda com o ar condicionado",
    "Hi team, routine check of the lifts please",
]


def _backward_prompt(system: str, message: str, target: str) -> str:
    return (
        "<LM_CONVERSATION>\n"
        f'<MESSAGE role="system">{system}</MESSAGE>\n'
        f'<MESSAGE role="user">{message}</MESSAGE>\n'
        "</LM_CONVERSATION>\n"
        "<FEEDBACK_ON_OUTPUT>"
        f'The prediction "low" is wrong: the expected value is "{target}".'
        "</FEEDBACK_ON_OUTPUT>\n"
        '<VARIABLES count="1">\n'
        '<VARIABLE index="1" role="system prompt" location="system" '
        f'trainable="true">{system}</VARIABLE>\n</VARIABLES>'
    )


def _gradient(system: str, message: str, target: str) -> str:
    req = SimRequest.from_messages(
        [{"role": "user", "content": _backward_prompt(system, message, target)}]
    )
    return world.answer(req).values["gradients"][0]


def test_rule_words_do_not_depend_on_the_labels() -> None:
    labels = ["high", "low", "high", "low", "medium", "medium"]
    permuted = labels[:]
    random.Random(7).shuffle(permuted)
    assert permuted != labels

    def words(targets: list[str]) -> list[str | None]:
        found = []
        for message, target in zip(TICKETS, targets, strict=True):
            rules = world.find_rules(_gradient(URGENCY_PROMPT, message, target))
            found.append(rules[0].word if rules else None)
        return found

    assert (
        words(labels)
        == words(permuted)
        == [
            "outage",
            "inquiry",
            "server",
            "printer",
            "olá",
            "team",  # greetings are stopwords, "team" is not
        ]
    )


def test_the_rule_names_the_prompts_field_and_the_lead_word() -> None:
    gradient = _gradient(URGENCY_PROMPT, TICKETS[0], "high")
    assert gradient == 'If the message begins with "outage", the urgency is high.'


def test_lead_word_rules() -> None:
    assert world.lead_word("Subject: Urgent: boiler broken") == "urgent"
    assert world.lead_word("Ticket: the lift is down") == "lift"
    assert world.lead_word("Never mind, the outage is over") == "outage"
    assert world.lead_word("We don't need help, thanks") == "help"  # "need" negated
    assert world.lead_word("Is it? Yes, it is.") is None
    assert world.lead_word("") is None


def test_the_default_label_is_the_tasks_own() -> None:
    def forward(system: str, response_format: dict | None = None) -> str:
        req = SimRequest.from_messages(
            [{"role": "system", "content": system}, {"role": "user", "content": "x"}],
            response_format=response_format,
        )
        return world.respond(req)

    assert forward(URGENCY_PROMPT) == "low"  # the first listed label
    assert forward("Rate the sentiment: positive, negative or neutral.") == "neutral"
    assert forward("Classify the sentiment of the message.") == "neutral"  # no labels
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "t",
            "schema": {
                "type": "object",
                "properties": {"priority": {"enum": ["p2", "p1"]}},
            },
        },
    }
    assert forward("Triage the ticket.", schema) == '{"priority": "p2"}'


def test_a_begins_with_rule_answers_by_the_lead_word() -> None:
    system = (
        f"{URGENCY_PROMPT} "
        'If the message begins with "outage", the urgency is high. '
        'If the message begins with "inquiry", the urgency is medium.'
    )
    for message, expected in [
        ("Subject: OUTAGE of the lifts", "high"),
        ("An inquiry about invoices", "medium"),  # "an" is a stopword
        ("A question: is there an outage?", "low"),  # the lead word: "question"
    ]:
        req = SimRequest.from_messages(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": message},
            ]
        )
        assert world.respond(req) == expected, message


def test_the_optimizer_replaces_a_begins_with_rule_of_the_same_word() -> None:
    current = 'Classify. If the message begins with "request", the urgency is medium.'
    feedback = 'If the message begins with "request", the urgency is low.'
    assert world.improve_value(current, feedback) == (
        'Classify. If the message begins with "request", the urgency is low.'
    )
    # a mentions rule for the same word is another rule
    feedback = 'If the message mentions "request", the urgency is high.'
    assert world.improve_value(current, feedback).count("request") == 2


def test_when_nothing_can_be_learned_the_feedback_says_why() -> None:
    gradient = _gradient(URGENCY_PROMPT, "Hello? Is it me?", "high")
    assert gradient.startswith('The system prompt should lead to "high"')
    assert "No rule can be written: the input holds no content word" in gradient
    unlabelled = _gradient("Classify the urgency of the ticket.", "Server down", "high")
    assert unlabelled.startswith(
        'If the message begins with "server", the urgency is high.'
    )
    assert "lists no labels for the urgency" in unlabelled
    nameless = _gradient("Be helpful.", "I am so frustrated", "negative")
    assert "The prompt names no field" in nameless


def test_affect_fields_keep_the_lexicon() -> None:
    gradient = _gradient(
        "Classify the sentiment of the message.", "Hi, I am frustrated", "negative"
    )
    assert (
        gradient == 'If the message mentions "frustrated", the sentiment is negative.'
    )
    assert world.is_affect_field("feeling") and not world.is_affect_field("urgency")
