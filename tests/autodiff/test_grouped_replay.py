"""The cheap backward (direct evaluator feedback, grouped chat backward) replayed from
cassettes recorded against the simulator: the grouped request bodies are the same on
every run, so a recorded pass replays offline."""

from __future__ import annotations

import json
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import SIMULATOR_MODEL
from tests.autodiff.helpers import summarize_step
from tests.conftest import LMEndpoint

SYSTEM = (
    "Classify the sentiment of the customer message as positive, neutral or negative."
)
MESSAGES = [
    "I am disappointed with the repair.",
    "The cleaning was excellent, thank you.",
    "Is the gym open on Sunday?",
    "I am frustrated: the heating failed again.",
    "We are delighted with the new gardener.",
    "The lift is broken and I am upset.",
]
TARGETS = ["negative", "positive", "neutral", "negative", "positive", "negative"]


def _bodies(vcr: Any) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in vcr.sent_requests]


def _user(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"]


@pytest.mark.afnio_replay
def test_a_cheap_pass_groups_the_failed_samples_and_makes_no_evaluator_call(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    system = Variable(SYSTEM, role="system prompt", requires_grad=True)
    messages = [
        {"role": "system", "content": [system]},
        {"role": "user", "content": [Variable("{message}", role="user template")]},
    ]
    batch = Variable(MESSAGES, role="customer message")
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": batch}, model=SIMULATOR_MODEL
    )
    score, explanation = ExactMatchEvaluator.apply(reply, TARGETS)
    assert score.data == 1  # the start answers "neutral" to every message
    with afnio.backward_options("cheap", chat_samples_per_call=2):
        explanation.backward()
    backward = [b for b in _bodies(vcr) if "afnio_gradients" in json.dumps(b)]
    # 5 failed samples, no evaluator call, groups of 2 + 2 + 1: three calls
    assert len(backward) == 3
    grouped = [b for b in backward if "<LM_CALLS" in _user(b)]
    assert len(grouped) == 2 and all(_user(b).count(SYSTEM) == 1 for b in grouped)
    assert not any("<EVALUATION" in _user(b) for b in backward)
    rules = system.grad[0].data
    assert rules == [
        'If the message mentions "disappointed", the sentiment is negative.',
        'If the message mentions "excellent", the sentiment is positive.',
        'If the message mentions "frustrated", the sentiment is negative.',
        'If the message mentions "delighted", the sentiment is positive.',
        'If the message mentions "upset", the sentiment is negative.',
    ]


@pytest.mark.afnio_replay
def test_a_cheap_pass_through_two_stages_groups_each_stage(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    summarize, summary = summarize_step(
        client, Variable(MESSAGES[:4], role="customer message")
    )
    system = Variable(SYSTEM, role="system prompt", requires_grad=True)
    label = ChatCompletion.apply(
        client,
        [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [Variable("{message}", role="template")]},
        ],
        inputs={"message": summary},
        model=SIMULATOR_MODEL,
    )
    _, explanation = ExactMatchEvaluator.apply(label, TARGETS[:4])
    with afnio.backward_options("cheap"):
        explanation.backward()
    backward = [b for b in _bodies(vcr) if "afnio_gradients" in json.dumps(b)]
    # 3 failed samples: one grouped call per stage
    assert len(backward) == 2
    assert all("<LM_CALLS" in _user(b) for b in backward)
    assert len(system.grad) == 1 and len(summarize.grad) == 1
    assert len(summarize.grad[0].data) == 3
