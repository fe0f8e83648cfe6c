"""The rule world's answers to prompts rendered by DSPy's own adapters (ChatAdapter,
JSONAdapter), checked by parsing them back with DSPy, and the chat-backward gradients
for a DSPy conversation. Pure functions: no network, no HTTP."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
dspy = pytest.importorskip("dspy", reason="needs the dspy extra")

from afnio._template import render  # noqa: E402
from afnio.autodiff.lm_backward import format_conversation  # noqa: E402
from afnio.autodiff.prompts import (  # noqa: E402
    CHAT_BACKWARD_SYSTEM,
    CHAT_BACKWARD_USER,
    VARIABLE_ELEMENT,
    gradients_response_format,
)
from afnio.testing import world  # noqa: E402

REFUND_RULE = 'If the message mentions "refund", the sentiment is negative.'
LOVE_RULE = 'If the message mentions "love", the sentiment is positive.'
RULES = f"Classify the customer message. {REFUND_RULE} {LOVE_RULE}"

Sentiment3 = Literal["positive", "negative", "neutral"]


class Classify(dspy.Signature):
    """Classify the customer message."""

    message: str = dspy.InputField()
    sentiment: Sentiment3 = dspy.OutputField()


class Polar(dspy.Signature):
    """Classify the customer message."""

    message: str = dspy.InputField()
    sentiment: Literal["positive", "negative"] = dspy.OutputField()


class Everything(dspy.Signature):
    """Read the customer message."""

    message: str = dspy.InputField()
    summary: str = dspy.OutputField(desc="a short summary")
    sentiment: str = dspy.OutputField()
    urgent: bool = dspy.OutputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    extra: dict[str, int] = dspy.OutputField()


def classify(instructions: str = RULES) -> Any:
    return Classify.with_instructions(instructions)


def chain_of_thought(signature: Any) -> Any:
    """The signature a ``dspy.ChainOfThought`` predictor really formats."""
    return dspy.ChainOfThought(signature).predict.signature


def messages(
    signature: Any,
    inputs: dict[str, Any],
    *,
    adapter: Any = None,
    demos: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    adapter = adapter or dspy.ChatAdapter()
    return adapter.format(signature, demos=list(demos), inputs=inputs)


def request(
    signature: Any,
    inputs: dict[str, Any],
    *,
    adapter: Any = None,
    demos: Sequence[Any] = (),
    response_format: dict[str, Any] | None = None,
) -> world.SimRequest:
    return world.SimRequest.from_messages(
        messages(signature, inputs, adapter=adapter, demos=demos),
        response_format=response_format,
    )


def chat_round_trip(signature: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
    """What DSPy's ChatAdapter parses from the world's answer."""
    text = world.respond(request(signature, inputs, **kwargs))
    return dspy.ChatAdapter().parse(signature, text)


def json_round_trip(signature: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
    """What DSPy's JSONAdapter parses from the world's answer to its prompt."""
    text = world.respond(
        request(signature, inputs, adapter=dspy.JSONAdapter(), **kwargs)
    )
    return dspy.JSONAdapter().parse(signature, text)


# -- the rules of the instructions decide the answer ----------------------------------


def test_rule_in_instructions_decides_the_sentiment() -> None:
    assert chat_round_trip(classify(), {"message": "I want a refund."}) == {
        "sentiment": "negative"
    }
    assert chat_round_trip(classify(), {"message": "I love it"}) == {
        "sentiment": "positive"
    }


def test_rule_word_matches_case_insensitively() -> None:
    assert chat_round_trip(classify(), {"message": "REFUND NOW!"}) == {
        "sentiment": "negative"
    }


def test_rule_word_matches_whole_words_only() -> None:
    for text in ("Two refunds, please.", "It is nonrefundable.", "lovely"):
        assert chat_round_trip(classify(), {"message": text}) == {
            "sentiment": "neutral"
        }, text


def test_first_matching_rule_in_instruction_order_wins() -> None:
    # the message names "refund" first, but the "love" rule comes first
    instructions = f"Classify. {LOVE_RULE} {REFUND_RULE}"
    text = "A refund? I love this shop."
    assert chat_round_trip(classify(instructions), {"message": text}) == {
        "sentiment": "positive"
    }
    assert chat_round_trip(classify(RULES), {"message": text}) == {
        "sentiment": "negative"
    }


def test_no_matching_rule_gives_neutral() -> None:
    assert chat_round_trip(classify(), {"message": "Where is my parcel?"}) == {
        "sentiment": "neutral"
    }


def test_no_rule_at_all_gives_neutral() -> None:
    assert chat_round_trip(Classify, {"message": "I love it"}) == {
        "sentiment": "neutral"
    }


def test_literal_without_neutral_defaults_to_its_first_choice() -> None:
    polar = Polar.with_instructions(RULES)
    assert chat_round_trip(polar, {"message": "Where is my parcel?"}) == {
        "sentiment": "positive"
    }
    assert chat_round_trip(polar, {"message": "A refund."}) == {"sentiment": "negative"}


def test_rules_naming_another_field_decide_that_field() -> None:
    signature = dspy.Signature(
        {
            "message": (str, dspy.InputField()),
            "topic": (Literal["billing", "shipping"], dspy.OutputField()),
        },
        'If the message mentions "late", the topic is shipping. '
        'If the message mentions "charged", the topic is billing.',
    )
    assert chat_round_trip(signature, {"message": "Charged twice!"}) == {
        "topic": "billing"
    }
    assert chat_round_trip(signature, {"message": "It came late."}) == {
        "topic": "shipping"
    }
    assert chat_round_trip(signature, {"message": "Hello"}) == {"topic": "billing"}


def test_chain_of_thought_reasoning_names_the_rule_that_applies() -> None:
    cot = chain_of_thought(classify())
    assert chat_round_trip(cot, {"message": "I want a refund"}) == {
        "reasoning": 'The rule for "refund" applies: the sentiment is negative.',
        "sentiment": "negative",
    }


def test_chain_of_thought_reasoning_when_no_rule_applies() -> None:
    cot = chain_of_thought(classify())
    assert chat_round_trip(cot, {"message": "Where is my parcel?"}) == {
        "reasoning": "No rule of the instructions applies to this input.",
        "sentiment": "neutral",
    }


def test_typed_fields_get_empty_values_and_free_text_echoes_the_input() -> None:
    signature = Everything.with_instructions(REFUND_RULE)
    expected = {
        "summary": "My refund is late.",
        "sentiment": "negative",
        "urgent": False,
        "count": 0,
        "score": 0.0,
        "tags": [],
        "extra": {},
    }
    assert chat_round_trip(signature, {"message": "My refund is late."}) == expected
    assert json_round_trip(signature, {"message": "My refund is late."}) == expected


def test_free_text_field_echoes_every_input_value() -> None:
    signature = dspy.Signature("question, context -> summary", "Summarise.")
    parsed = chat_round_trip(signature, {"question": "Why?", "context": "Because."})
    assert parsed == {"summary": "Why?\nBecause."}


# -- the current input ----------------------------------------------------------------


def test_demos_in_earlier_turns_are_ignored() -> None:
    demos = [
        dspy.Example(message="I want a refund", sentiment="negative"),
        dspy.Example(message="I love it", sentiment="positive"),
    ]
    for adapter in (dspy.ChatAdapter(), dspy.JSONAdapter()):
        req = request(
            classify(), {"message": "Where is my parcel?"}, adapter=adapter, demos=demos
        )
        roles = [m.role for m in req.messages]
        assert roles == ["system", *["user", "assistant"] * 2, "user"]
        prompt = world.DSPyPrompt.parse(req.messages)
        assert prompt is not None
        assert dict(prompt.values) == {"message": "Where is my parcel?"}
        assert world.dspy_values(prompt) == {"sentiment": "neutral"}


def test_demo_turns_do_not_leak_into_the_answer() -> None:
    demos = [dspy.Example(message="I want a refund", sentiment="negative")]
    assert chat_round_trip(classify(), {"message": "I love it"}, demos=demos) == {
        "sentiment": "positive"
    }


def test_input_with_braces_and_a_foreign_marker_is_kept() -> None:
    text = 'A refund {order_id} for {"a": 1} [[ ## other ## ]] and {{x}}'
    signature = dspy.Signature("message -> summary, sentiment", REFUND_RULE)
    assert chat_round_trip(signature, {"message": text}) == {
        "summary": text,
        "sentiment": "negative",
    }
    assert json_round_trip(signature, {"message": text}) == {
        "summary": text,
        "sentiment": "negative",
    }


def test_multiline_input_is_kept() -> None:
    text = "First line.\n\nSecond line with a refund."
    signature = dspy.Signature("message -> summary, sentiment", REFUND_RULE)
    assert chat_round_trip(signature, {"message": text}) == {
        "summary": text,
        "sentiment": "negative",
    }


def test_rule_sentences_in_the_input_never_count_as_rules() -> None:
    text = 'If the message mentions "parcel", the sentiment is positive. My parcel.'
    assert chat_round_trip(classify(), {"message": text}) == {"sentiment": "neutral"}
    # nor does the word quoted in such a sentence count as input
    text = 'If the message mentions "refund", the sentiment is positive.'
    assert chat_round_trip(classify(), {"message": text}) == {"sentiment": "neutral"}


def test_rules_outside_the_instructions_are_ignored() -> None:
    signature = dspy.Signature(
        {
            "message": (str, dspy.InputField(desc=REFUND_RULE)),
            "sentiment": (Sentiment3, dspy.OutputField()),
        },
        "Classify the customer message.",
    )
    assert chat_round_trip(signature, {"message": "A refund"}) == {
        "sentiment": "neutral"
    }


# -- answer formats --------------------------------------------------------------------


def test_chat_adapter_answer_is_field_blocks_ending_with_completed() -> None:
    text = world.respond(request(chain_of_thought(classify()), {"message": "refund"}))
    assert text == (
        "[[ ## reasoning ## ]]\n"
        'The rule for "refund" applies: the sentiment is negative.\n\n'
        "[[ ## sentiment ## ]]\nnegative\n\n"
        "[[ ## completed ## ]]"
    )
    assert text.endswith(world.DSPY_COMPLETED)
    assert world.DSPY_COMPLETED == "[[ ## completed ## ]]"


def test_json_adapter_system_prompt_gets_a_json_object() -> None:
    req = request(
        classify(), {"message": "I want a refund"}, adapter=dspy.JSONAdapter()
    )
    result = world.answer(req)
    assert result.responder == "dspy"
    text = world.respond(req)
    assert json.loads(text) == {"sentiment": "negative"}
    assert world.DSPY_COMPLETED not in text
    assert dspy.JSONAdapter().parse(classify(), text) == {"sentiment": "negative"}


def test_json_adapter_chain_of_thought_round_trip() -> None:
    cot = chain_of_thought(classify())
    assert json_round_trip(cot, {"message": "I love it"}) == {
        "reasoning": 'The rule for "love" applies: the sentiment is positive.',
        "sentiment": "positive",
    }


def test_chat_adapter_prompt_with_json_object_format_gets_json() -> None:
    req = request(
        classify(), {"message": "A refund"}, response_format={"type": "json_object"}
    )
    text = world.respond(req)
    assert json.loads(text) == {"sentiment": "negative"}
    assert world.DSPY_COMPLETED not in text


def test_json_schema_format_gets_the_same_object() -> None:
    # what DSPy's JSONAdapter sends with structured outputs
    cot = chain_of_thought(classify())
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "DSPyProgramOutputs",
            "schema": {
                "type": "object",
                "properties": {
                    "reasoning": {"type": "string"},
                    "sentiment": {
                        "type": "string",
                        "enum": ["positive", "negative", "neutral"],
                    },
                },
                "required": ["reasoning", "sentiment"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
    req = request(
        cot,
        {"message": "A refund"},
        adapter=dspy.JSONAdapter(),
        response_format=response_format,
    )
    assert json.loads(world.respond(req)) == {
        "reasoning": 'The rule for "refund" applies: the sentiment is negative.',
        "sentiment": "negative",
    }


def test_dspy_prompt_parse_reads_fields_instructions_and_format() -> None:
    req = request(chain_of_thought(classify()), {"message": "Hi"})
    prompt = world.DSPyPrompt.parse(req.messages)
    assert prompt is not None
    assert [f.name for f in prompt.inputs] == ["message"]
    assert [(f.name, f.type) for f in prompt.outputs] == [
        ("reasoning", "str"),
        ("sentiment", "Literal['positive', 'negative', 'neutral']"),
    ]
    assert prompt.outputs[1].choices == ("positive", "negative", "neutral")
    assert prompt.instructions == RULES
    assert prompt.json_answer is False
    json_req = request(classify(), {"message": "Hi"}, adapter=dspy.JSONAdapter())
    json_prompt = world.DSPyPrompt.parse(json_req.messages)
    assert json_prompt is not None and json_prompt.json_answer is True


def test_non_dspy_prompts_are_not_dspy_prompts() -> None:
    plain = world.SimRequest.from_messages(
        [{"role": "system", "content": RULES}, {"role": "user", "content": "refund"}]
    )
    assert world.DSPyPrompt.parse(plain.messages) is None
    assert world.dspy_responder(plain) is None
    assert world.answer(plain).responder == "task"
    user_first = world.SimRequest.from_messages(
        messages(classify(), {"message": "x"})[1:]
    )
    assert world.dspy_responder(user_first) is None


# -- responder order -------------------------------------------------------------------


def test_dspy_responder_comes_after_afnios_prompts_and_before_the_task() -> None:
    names = [r.__name__ for r in world.RESPONDERS]
    dspy_at = names.index("dspy_responder")
    for own in (
        "judge_responder",
        "chat_backward_responder",
        "evaluator_backward_responder",
        "optimizer_responder",
    ):
        assert names.index(own) < dspy_at
    assert dspy_at < names.index("task_responder") < names.index("fallback_responder")


def test_a_dspy_prompt_with_rules_is_answered_by_the_dspy_responder() -> None:
    req = request(classify(), {"message": "A refund"})
    assert world.task_responder(req) is not None  # it holds rules...
    assert world.answer(req).responder == "dspy"  # ...but DSPy's format comes first


# -- the chat backward of a DSPy conversation ------------------------------------------


def backward_user(
    conversation: list[dict[str, Any]],
    feedback: str,
    *,
    instructions: str = RULES,
) -> str:
    variable = render(
        VARIABLE_ELEMENT,
        {
            "index": 1,
            "role": "instructions",
            "location": "system",
            "trainable": "true",
            "text": instructions,
        },
    )
    return render(
        CHAT_BACKWARD_USER,
        {
            "conversation": format_conversation(conversation),
            "output_role": "assistant",
            "output": "[[ ## sentiment ## ]]\nneutral\n\n[[ ## completed ## ]]",
            "feedback": feedback,
            "count": 1,
            "variables": variable,
        },
    )


def backward_request(user: str, system: str = CHAT_BACKWARD_SYSTEM) -> world.SimRequest:
    return world.SimRequest.from_messages(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        response_format=gradients_response_format(),
    )


def gradients(
    signature: Any,
    inputs: dict[str, Any],
    feedback: str,
    *,
    demos: Sequence[Any] = (),
    adapter: Any = None,
) -> list[str]:
    conversation = messages(signature, inputs, adapter=adapter, demos=demos)
    req = backward_request(backward_user(conversation, feedback))
    assert world.answer(req).responder == "chat_backward"
    data = json.loads(world.respond(req))
    assert list(data) == ["gradients"]
    return data["gradients"]


EXPECTED_NEGATIVE = 'The expected value is "negative".'


def test_backward_prompt_quoting_a_dspy_conversation_is_a_chat_backward() -> None:
    conversation = messages(classify(), {"message": "I am upset"})
    req = backward_request(backward_user(conversation, EXPECTED_NEGATIVE))
    assert world.answer(req).responder == "chat_backward"


def test_chat_backward_wins_over_a_dspy_shaped_system_message() -> None:
    # even when the first message itself looks like a DSPy prompt
    conversation = messages(classify(), {"message": "I am upset"})
    user = backward_user(conversation, EXPECTED_NEGATIVE)
    req = backward_request(user, system=conversation[0]["content"])
    assert world.dspy_responder(req) is not None
    assert world.answer(req).responder == "chat_backward"
    assert json.loads(world.respond(req)) == {
        "gradients": ['If the message mentions "upset", the sentiment is negative.']
    }


NO_LABELS = (
    " The signature lists no labels for the label (no Literal type), so inputs that "
    'no rule matches get "neutral".'
)


def test_chat_backward_rule_names_the_predictors_output_field() -> None:
    # the instructions rule "the sentiment", but this predictor outputs `label`: not
    # an affect field, so the rule names the input's lead word (and says that the
    # predictor lists no labels)
    label = dspy.Signature("message -> label", RULES)
    assert gradients(label, {"message": "So upset."}, EXPECTED_NEGATIVE) == [
        'If the message begins with "upset", the label is negative.' + NO_LABELS
    ]


def test_chat_backward_rule_for_chain_of_thought_names_sentiment() -> None:
    cot = chain_of_thought(classify())
    assert gradients(cot, {"message": "So upset."}, EXPECTED_NEGATIVE) == [
        'If the message mentions "upset", the sentiment is negative.'
    ]
    reason_first = dspy.Signature("message -> reasoning, label", "Classify.")
    assert gradients(reason_first, {"message": "So upset."}, EXPECTED_NEGATIVE) == [
        'If the message begins with "upset", the label is negative.' + NO_LABELS
    ]


def test_chat_backward_prefers_a_declared_sentiment_field() -> None:
    signature = dspy.Signature("message -> topic, sentiment", "Classify.")
    assert gradients(signature, {"message": "So upset."}, EXPECTED_NEGATIVE) == [
        'If the message mentions "upset", the sentiment is negative.'
    ]


def test_chat_backward_word_comes_from_the_current_input_only() -> None:
    # the demo and the instructions hold lexicon words ("angry", "excellent")
    demos = [dspy.Example(message="I am angry", sentiment="negative")]
    signature = classify("Do an excellent job.")
    result = gradients(
        signature, {"message": "Terrible service."}, EXPECTED_NEGATIVE, demos=demos
    )
    assert result == ['If the message mentions "terrible", the sentiment is negative.']


def test_chat_backward_of_a_json_adapter_conversation() -> None:
    result = gradients(
        classify(),
        {"message": "Terrible service."},
        EXPECTED_NEGATIVE,
        adapter=dspy.JSONAdapter(),
    )
    assert result == ['If the message mentions "terrible", the sentiment is negative.']


def test_chat_backward_without_an_expected_value_gives_no_rule() -> None:
    feedback = "The answer is wrong."
    assert gradients(classify(), {"message": "So upset."}, feedback) == [
        "The instructions should address this feedback: The answer is wrong."
    ]


def test_chat_backward_default_target_gives_no_rule() -> None:
    feedback = 'The expected sentiment is "neutral".'
    assert gradients(classify(), {"message": "So upset."}, feedback) == [
        'The instructions should lead to "neutral" for inputs like this one. No '
        'rule can be written: "neutral" is the default label (what the task answers '
        "when no rule matches), so no word is evidence for it."
    ]


@pytest.mark.parametrize(
    "feedback",
    [
        'The expected sentiment is "negative"',
        'Expected sentiment: "negative"',
        'expected sentiment "negative", got "neutral"',
        'The prediction "neutral" is wrong: the expected value is "negative".',
        'EXPECTED VALUE "negative"',
    ],
)
def test_metric_feedback_naming_the_field_gives_the_target(feedback: str) -> None:
    assert gradients(classify(), {"message": "So upset."}, feedback) == [
        'If the message mentions "upset", the sentiment is negative.'
    ]


@pytest.mark.parametrize(
    ("feedback", "target"),
    [
        ('The expected sentiment is "negative"', "negative"),
        ('Expected sentiment: "negative"', "negative"),
        ('Expected label is "very upset" (got "calm")', "very upset"),
        ('the expected value is "positive"', "positive"),
        ("Expected: negative", None),
        ('The prediction was "negative".', None),
    ],
)
def test_target_in_feedback_pattern(feedback: str, target: str | None) -> None:
    found = world._TARGET_IN_FEEDBACK.search(feedback)
    assert (found[1] if found else None) == target


# -- known bugs ------------------------------------------------------------------------


def test_multiline_field_description_keeps_the_later_fields() -> None:
    signature = dspy.Signature(
        {
            "message": (str, dspy.InputField()),
            "sentiment": (str, dspy.OutputField(desc="one word,\nlowercase")),
            "urgent": (bool, dspy.OutputField()),
        },
        REFUND_RULE,
    )
    assert chat_round_trip(signature, {"message": "A refund"}) == {
        "sentiment": "negative",
        "urgent": False,
    }


def test_field_description_with_parenthesis_colon_keeps_the_type() -> None:
    signature = dspy.Signature(
        {
            "message": (str, dspy.InputField()),
            "urgent": (bool, dspy.OutputField(desc="Urgent (yes/no): the answer")),
        },
        "Triage.",
    )
    assert chat_round_trip(signature, {"message": "A refund"}) == {"urgent": False}


def test_literal_of_ints_defaults_to_its_first_choice() -> None:
    signature = dspy.Signature(
        {
            "message": (str, dspy.InputField()),
            "stars": (Literal[1, 2, 3], dspy.OutputField()),
        },
        "Rate the message.",
    )
    assert chat_round_trip(signature, {"message": "A refund"}) == {"stars": 1}
