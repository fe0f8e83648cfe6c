"""The rule world: which label the simulator answers, through the real SDK and through
the pure functions of ``afnio.testing.world``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import openai
import pydantic
import pytest

from afnio.testing import SALIENCE_LEXICON, SIMULATOR_MODEL, Simulator, world


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with (
        Simulator() as sim,
        openai.OpenAI(base_url=sim.base_url, api_key="test", max_retries=0) as c,
    ):
        yield c


def _rule(word: str, label: str, field: str = "sentiment") -> str:
    return f'If the message mentions "{word}", the {field} is {label}.'


def _ask(
    client: openai.OpenAI,
    system: str | None,
    user: str,
    response_format: dict[str, Any] | None = None,
) -> str:
    messages: list[Any] = (
        [] if system is None else [{"role": "system", "content": system}]
    )
    messages.append({"role": "user", "content": user})
    kwargs: dict[str, Any] = {}
    if response_format is not None:
        kwargs["response_format"] = response_format
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=messages, **kwargs
    )
    return reply.choices[0].message.content or ""


RULES = " ".join(
    [
        _rule("refund", "negative"),
        _rule("thanks", "positive"),
        _rule("late", "mildly negative"),
    ]
)


def test_first_matching_rule_wins(client: openai.OpenAI) -> None:
    assert _ask(client, RULES, "Thanks, but I want a refund.") == "negative"
    assert _ask(client, RULES, "It was late. Thanks anyway.") == "positive"
    assert _ask(client, RULES, "It was late again") == "mildly negative"


def test_message_order_decides_between_messages(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=[
            {"role": "system", "content": _rule("box", "first")},
            {"role": "assistant", "content": _rule("box", "second")},
            {"role": "user", "content": "the box"},
        ],
    )
    assert reply.choices[0].message.content == "first"


def test_matching_is_whole_word_and_case_insensitive(client: openai.OpenAI) -> None:
    assert _ask(client, RULES, "I was REFUNDED already") == "neutral"
    assert _ask(client, RULES, "REFUND please!") == "negative"
    assert _ask(client, RULES, "a (Refund)") == "negative"
    assert _ask(client, RULES, "the latest news") == "neutral"
    assert _ask(client, _rule("top-notch", "positive"), "Top-Notch work") == "positive"
    assert _ask(client, _rule("top-notch", "positive"), "top notch work") == "neutral"


def test_rules_in_the_user_message_do_not_match_themselves(
    client: openai.OpenAI,
) -> None:
    assert _ask(client, None, f"{RULES} Hello there.") == "neutral"
    assert _ask(client, None, f"{RULES}\nWhere is my refund?") == "negative"


def test_only_user_messages_are_matched(client: openai.OpenAI) -> None:
    system = f"{RULES} Never mention a refund."
    assert _ask(client, system, "All good") == "neutral"


def test_default_label_is_neutral(client: openai.OpenAI) -> None:
    assert _ask(client, RULES, "Nothing to report") == "neutral"
    assert _ask(client, None, "no rules at all") == "neutral"
    topic = _rule("invoice", "billing", field="topic")
    assert _ask(client, topic, "Where is my parcel?") == "neutral"  # no schema


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


TOPIC_SCHEMA = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "topic": {"type": "string", "enum": ["shipping", "billing", "other"]},
    },
    "required": ["reasoning", "topic"],
    "additionalProperties": False,
}


def test_default_is_the_first_enum_value_for_another_field(
    client: openai.OpenAI,
) -> None:
    rules = _rule("invoice", "billing", field="topic")
    content = _ask(client, rules, "Where is my parcel?", _schema_format(TOPIC_SCHEMA))
    assert json.loads(content) == {"reasoning": "shipping", "topic": "shipping"}
    content = _ask(client, rules, "Wrong invoice!", _schema_format(TOPIC_SCHEMA))
    assert json.loads(content) == {"reasoning": "billing", "topic": "billing"}
    # plain text: the label itself
    assert _ask(client, rules, "Wrong invoice!") == "billing"


def test_json_object_uses_the_field_name(client: openai.OpenAI) -> None:
    fmt = {"type": "json_object"}
    assert json.loads(_ask(client, RULES, "refund", fmt)) == {"sentiment": "negative"}
    assert json.loads(_ask(client, None, "hi", fmt)) == {"answer": "neutral"}


class Priority(StrEnum):
    low = "low"
    high = "high"


class Ticket(pydantic.BaseModel):
    summary: str
    priority: Priority
    escalate: bool


def test_pydantic_schema_field_gets_the_label(client: openai.OpenAI) -> None:
    rules = _rule("outage", "high", field="priority")
    fmt = _schema_format(Ticket.model_json_schema())
    ticket = Ticket.model_validate_json(_ask(client, rules, "Total outage!", fmt))
    assert ticket == Ticket(summary="high", priority=Priority.high, escalate=False)
    ticket = Ticket.model_validate_json(_ask(client, rules, "Minor typo", fmt))
    assert ticket.priority is Priority.low  # no match: the first enum value


def test_multi_word_label_and_content_parts(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": _rule("delay", "a shipping problem", "x")},
                    {"type": "text", "text": "Another delay."},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content == "a shipping problem"


# -- pure functions --------------------------------------------------------------------


def test_find_rules_parses_the_grammar() -> None:
    rules = world.find_rules(
        'Intro. If the message mentions "late", the topic is shipping delay. '
        "If the message mentions late, the topic is nothing. "  # no quotes: no rule
        'If the message mentions "Bad Thing", the customer mood is upset.'
    )
    assert [(r.word, r.field, r.label) for r in rules] == [
        ("late", "topic", "shipping delay"),
        ("Bad Thing", "customer mood", "upset"),
    ]
    assert rules[1].matches("such a bad thing!")
    assert not rules[1].matches("badthing")


def test_user_content_drops_rules_and_non_user_messages() -> None:
    request = world.SimRequest.from_messages(
        [
            {"role": "system", "content": "System text."},
            {"role": "user", "content": f"{_rule('x', 'y')} Keep this."},
            {"role": "assistant", "content": "Not me."},
        ]
    )
    assert world.user_content(request).strip() == "Keep this."


def test_schema_instance_covers_the_json_schema_kinds() -> None:
    schema = {
        "$defs": {
            "Inner": {
                "type": "object",
                "properties": {"mood": {"enum": ["calm", "angry"]}},
            }
        },
        "type": "object",
        "properties": {
            "b": {"type": "boolean"},
            "a": {"type": "integer"},
            "n": {"type": "number"},
            "s": {"type": "string"},
            "arr": {"type": "array", "items": {"type": "string"}},
            "ref": {"$ref": "#/$defs/Inner"},
            "any": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "maybe": {"type": ["string", "null"]},
            "c": {"const": "fixed"},
        },
    }
    assert world.schema_instance(schema, "angry") == {
        "b": False,
        "a": 0,
        "n": 0,
        "s": "angry",
        "arr": [],
        "ref": {"mood": "angry"},
        "any": 0,
        "maybe": "angry",
        "c": "fixed",
    }
    assert world.schema_instance(schema, "other")["ref"] == {"mood": "calm"}
    assert world.schema_instance(schema, "x", {"S": "given", "a": 7})["a"] == 7


def test_responders_are_an_ordered_list() -> None:
    assert [
        world.judge_responder,
        world.chat_backward_group_responder,
        world.chat_backward_responder,
        world.evaluator_backward_responder,
        world.optimizer_responder,
        world.textgrad_optimizer_responder,
        world.textgrad_backward_responder,
        world.optoprime_responder,
        world.dspy_responder,
        world.task_responder,
        world.fallback_responder,
    ] == world.RESPONDERS

    def marker(request: world.SimRequest) -> world.Answer | None:
        texts = " ".join(m.text for m in request.messages)
        return world.Answer("judged", responder="judge") if "JUDGE" in texts else None

    request = world.SimRequest.from_messages([{"role": "user", "content": "JUDGE"}])
    responders = [marker, *world.RESPONDERS]
    assert world.answer(request, responders).label == "judged"
    assert world.answer(request).label == "neutral"
    answer = world.answer(
        world.SimRequest.from_messages([{"role": "user", "content": "JUDGE"}])
    )
    assert answer.responder == "fallback"


def test_embed_is_deterministic_and_normalised() -> None:
    a = world.embed("Great service, great food", 32)
    assert a == world.embed("great SERVICE great food!", 32)
    assert abs(sum(x * x for x in a) - 1) < 1e-12
    assert world.embed("", 8) == [0.0] * 8
    with pytest.raises(ValueError):
        world.embed("x", 0)


def test_salience_lexicon() -> None:
    assert isinstance(SALIENCE_LEXICON, tuple)
    assert list(SALIENCE_LEXICON) == sorted(SALIENCE_LEXICON)
    assert SALIENCE_LEXICON == (
        "angry",
        "annoyed",
        "awful",
        "complaint",
        "delighted",
        "disappointed",
        "disappointing",
        "dissatisfied",
        "excellent",
        "exceptional",
        "fantastic",
        "frustrated",
        "frustrating",
        "frustration",
        "grateful",
        "great",
        "impressed",
        "love",
        "outstanding",
        "poor",
        "terrible",
        "thrilled",
        "top-notch",
        "unacceptable",
        "unsatisfactory",
        "upset",
        "wonderful",
        "worst",
    )
