"""The simulator's optimizer answers, on prompts rendered from afnio's real TGD
templates."""

from __future__ import annotations

import json

from afnio import Variable
from afnio._template import render
from afnio.optim import prompts
from afnio.optim.tgd import _render_constraints, render_feedback
from afnio.testing import world

A = 'If the message mentions "awful", the sentiment is negative.'
B = 'If the message mentions "love", the sentiment is positive.'


def _request(
    value: str, feedback: list[str], constraints: list[str] | None = None
) -> world.SimRequest:
    text, count = render_feedback([Variable(feedback)])
    user = render(
        prompts.TGD_USER,
        {
            "variable_role": "system prompt",
            "variable": value,
            "feedback": text,
            "feedback_count": count,
            "past_iterations": "",
            "constraints": _render_constraints(constraints or []),
        },
    )
    return world.SimRequest.from_messages(
        [
            {"role": "system", "content": prompts.TGD_SYSTEM},
            {"role": "user", "content": user},
        ],
        response_format=prompts.improved_variable_response_format(),
    )


def _improved(request: world.SimRequest) -> str:
    return json.loads(world.respond(request))["improved_value"]


def test_rules_are_appended_once_in_order() -> None:
    assert _improved(_request("Classify.", [A, A, B])) == f"Classify. {A} {B}"


def test_a_rule_for_a_ruled_word_replaces_it_in_place() -> None:
    old = 'If the message mentions "awful", the sentiment is neutral.'
    value = f"Classify. {old} Be brief."
    assert _improved(_request(value, [A])) == f"Classify. {A} Be brief."


def test_condensed_alternatives_are_all_applied() -> None:
    words = [f"w{i:02d}" for i in range(40)]
    feedback = [
        f'If the message mentions "{w}", the sentiment is negative.' for w in words
    ]
    request = _request("Classify.", feedback)
    assert " | " in request.messages[1].text  # the feedback was condensed
    improved = _improved(request)
    assert all(f'"{w}"' in improved for w in words)
    assert improved.count("If the message mentions") == 40


def test_forbidden_characters_are_removed() -> None:
    request = _request("Classify!", [A], ['Do not use the character "!".'])
    assert _improved(request) == f"Classify {A}"


def test_no_rules_keeps_the_value() -> None:
    assert _improved(_request("Classify.", ["Be more specific."])) == "Classify."


def test_the_optimizer_comes_before_the_task_responder() -> None:
    request = _request(f"Classify. {A}", [B])
    assert world.answer(request).responder == "optimizer"
