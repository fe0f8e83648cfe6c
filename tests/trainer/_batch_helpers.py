"""Shared by the Batch API trainer tests (``test_batch_api.py``,
``test_batch_api_fit.py``, ``test_batch_api_streams.py``): the live simulator and a
client on it as fixtures (import them into a test module to use them), the
sentiment rules, a quiet :class:`~afnio.trainer.Trainer`, and the second stage of a
two-round program."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio import cognitive as cog
from afnio.models.batch import BatchOptions
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer

__all__ = [
    "FAST",
    "RULES",
    "SecondStage",
    "backward_client",
    "client",
    "quiet_trainer",
    "sim",
    "without_cost",
]

RULES = (
    "Classify the sentiment of the message. "
    'If the message mentions "wonderful", the sentiment is positive. '
    'If the message mentions "awful", the sentiment is negative. '
    'If the message mentions "love", the sentiment is positive. '
    'If the message mentions "worst", the sentiment is negative.'
)
"""A system prompt under which the simulator labels the messages of
``benchmarks.resume_kills.MESSAGES``."""

FAST = BatchOptions(poll_interval=0)
"""Batch API options that poll without waiting."""


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A latency-free simulator for one test."""
    with Simulator() as sim:
        yield sim


@pytest.fixture
def client(sim: Simulator) -> Iterator[OpenAI]:
    """An afnio client on ``sim`` (no retries)."""
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def backward_client(sim: Simulator) -> Iterator[OpenAI]:
    """An afnio client on ``sim`` (no retries), set as the backward model client
    with the simulator's model."""
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        yield client


def quiet_trainer(root: Path, **kwargs: Any) -> Trainer:
    """A :class:`Trainer` in ``root`` without progress bar or summaries; ``kwargs``
    go to the Trainer."""
    return Trainer(
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
        **kwargs,
    )


def without_cost(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without its ``total_cost`` (which a Batch API pass halves)."""
    return {k: v for k, v in row.items() if k != "total_cost"}


class SecondStage:
    """Mixed in before a :class:`SentimentClassifier` (or a subclass): a second LM
    call that depends on the first one's answer, so a pass takes two rounds. Its
    prompt relabels the first answer (``negative`` stays negative, ``positive``
    stays positive)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer(
            "confirm",
            afnio.Variable(
                'If the message mentions "negative", the sentiment is negative. '
                'If the message mentions "positive", the sentiment is positive.',
                role="second stage prompt",
            ),
        )
        self.second = cog.ChatCompletion()

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        return self.second_stage(super().forward(emails))

    def second_stage(self, first: afnio.Variable) -> afnio.Variable:
        """The second call, on the first stage's answer ``first``."""
        messages = [
            {"role": "system", "content": [self.confirm]},
            {"role": "user", "content": [self.user_template]},
        ]
        return self.second(
            self.client, messages, inputs={"message": first}, **self.completion_args
        )
