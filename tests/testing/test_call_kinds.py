"""``afnio.testing.call_kind`` and friends: the simulator's received requests counted
by the responder that answers them and by the kind of LM call they are."""

from __future__ import annotations

from typing import Any

from afnio.autodiff.prompts import (
    CHAT_BACKWARD_GROUP_SYSTEM,
    CHAT_BACKWARD_SYSTEM,
    EVALUATOR_BACKWARD_SYSTEM,
    gradients_response_format,
)
from afnio.testing import (
    CALL_KINDS,
    call_kind,
    calls_by_kind,
    calls_by_responder,
    responder_of,
    world,
)
from afnio.testing.calls import KIND_OF_RESPONDER, kind_of_responder
from tests.testing.test_grouped_backward_responder import (
    _sentiment_call,
    group_user,
    single_user,
)
from tests.testing.test_world_feedback import evaluator_backward_user


def _body(system: str, user: str) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
        "response_format": gradients_response_format(),
    }


FORWARD = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
SINGLE = _body(CHAT_BACKWARD_SYSTEM, single_user(_sentiment_call("Awful.", "negative")))
GROUPED = _body(
    CHAT_BACKWARD_GROUP_SYSTEM,
    group_user(
        [
            _sentiment_call("I am frustrated.", "negative"),
            _sentiment_call("Great gym.", "positive"),
        ]
    ),
)
EVALUATOR = _body(
    EVALUATOR_BACKWARD_SYSTEM,
    evaluator_backward_user("neutral", "negative", [("p", "prediction", False, "x")]),
)


def test_each_request_is_named_by_the_responder_the_simulator_answers_it_with() -> None:
    for body in (FORWARD, SINGLE, GROUPED, EVALUATOR):
        expected = world.answer(world.SimRequest.from_body(body)).responder
        assert responder_of(body) == expected
    assert [responder_of(b) for b in (FORWARD, SINGLE, GROUPED, EVALUATOR)] == [
        "fallback",
        "chat_backward",
        "chat_backward_group",
        "evaluator_backward",
    ]


def test_a_grouped_call_is_a_chat_backward_call_and_the_rest_are_forwards() -> None:
    assert call_kind(SINGLE) == call_kind(GROUPED) == "chat backward"
    assert call_kind(EVALUATOR) == "evaluator backward"
    assert call_kind(FORWARD) == "forward"
    for name in ("task", "dspy", "fallback", "tool_result", "unknown"):
        assert kind_of_responder(name) == "forward"


def test_every_kind_is_listed_and_every_feedback_responder_is_a_backward() -> None:
    assert set(KIND_OF_RESPONDER.values()) | {"forward"} == set(CALL_KINDS)
    for name in world.FEEDBACK_RESPONDERS:
        assert kind_of_responder(name) in {
            "evaluator backward",
            "chat backward",
            "backward",
        }


def test_counts_by_kind_follow_the_kinds_order_and_leave_out_empty_kinds() -> None:
    bodies = [GROUPED, FORWARD, EVALUATOR, SINGLE, FORWARD]
    counts = calls_by_kind(bodies)
    assert counts == {"forward": 2, "evaluator backward": 1, "chat backward": 2}
    assert list(counts) == ["forward", "evaluator backward", "chat backward"]
    assert calls_by_kind([]) == {}


def test_counts_by_responder_keep_the_order_of_first_answer() -> None:
    counts = calls_by_responder([GROUPED, FORWARD, SINGLE, FORWARD])
    assert dict(counts) == {
        "chat_backward_group": 1,
        "fallback": 2,
        "chat_backward": 1,
    }
    assert list(counts) == ["chat_backward_group", "fallback", "chat_backward"]
