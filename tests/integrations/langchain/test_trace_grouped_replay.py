"""A traced LangChain chain's batch in the cheap backward, replayed from a cassette
recorded against the simulator: the recorded calls of the batch (one graph node each)
are grouped across nodes, and the grouped bodies are the same on every run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import afnio
from afnio import functional as F
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import trace
from tests.conftest import LMEndpoint

CLASSIFY = "Classify the sentiment of the message."
ROWS = [
    ("I am frustrated with the heating.", "negative"),
    ("The cleaning was excellent.", "positive"),
    ("Please confirm the Tuesday visit.", "neutral"),
    ("We are delighted with the gardener.", "positive"),
    ("The lift is broken and I am upset.", "negative"),
]


@pytest.mark.afnio_replay
def test_a_traced_batch_sends_its_chat_backward_in_groups(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    llm = ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=backward_lm.base_url,
        api_key=backward_lm.api_key,
        max_retries=0,
    )
    traced = trace(prompt | llm | StrOutputParser())
    prediction = traced.batch([{"message": m} for m, _ in ROWS])
    assert prediction.data == ["neutral"] * len(ROWS)
    _, explanation = F.exact_match_evaluator(prediction, [t for _, t in ROWS])
    with afnio.backward_options("cheap", chat_samples_per_call=2):
        explanation.backward()
    bodies = [json.loads(r.body) for r in vcr.sent_requests]
    backward = [b for b in bodies if "afnio_gradients" in json.dumps(b)]
    # 4 failed rows, each its own recorded call: 2 calls of 2, no evaluator call
    assert len(backward) == 2
    assert all("<LM_CALLS" in b["messages"][-1]["content"] for b in backward)
    assert sorted(g for grad in traced.prompt_0.grad for g in [grad.data]) == sorted(
        [
            'If the message mentions "frustrated", the sentiment is negative.',
            'If the message mentions "excellent", the sentiment is positive.',
            'If the message mentions "delighted", the sentiment is positive.',
            'If the message mentions "upset", the sentiment is negative.',
        ]
    )
