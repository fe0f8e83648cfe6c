"""Small Functions used by the autodiff tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.testing import SIMULATOR_MODEL


class InFlight:
    """Counts how many backward calls run at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)

    def exit(self) -> None:
        with self.lock:
            self.now -= 1


def make_sleepy(counter: InFlight, delay: float) -> type[Function]:
    """A Function whose async backward sleeps ``delay`` seconds."""

    class SleepyAsync(Function):
        @staticmethod
        def forward(ctx: Any, x: afnio.Variable) -> afnio.Variable:
            ctx.role = x.role
            return afnio.Variable(x.data, role=f"slept {x.role}")

        @staticmethod
        async def backward(ctx: Any, grad: afnio.Variable) -> afnio.Variable:
            counter.enter()
            try:
                await asyncio.sleep(delay)
            finally:
                counter.exit()
            return afnio.Variable(f"{grad.data} via {ctx.role}", role="feedback")

    return SleepyAsync


def make_blocking(counter: InFlight, delay: float) -> type[Function]:
    """A Function whose plain (blocking) backward sleeps ``delay`` seconds."""

    class SleepyBlocking(Function):
        @staticmethod
        def forward(ctx: Any, x: afnio.Variable) -> afnio.Variable:
            return afnio.Variable(x.data, role=f"slept {x.role}")

        @staticmethod
        def backward(ctx: Any, grad: afnio.Variable) -> afnio.Variable:
            counter.enter()
            try:
                time.sleep(delay)
            finally:
                counter.exit()
            return afnio.Variable(f"{grad.data} (blocking)", role="feedback")

    return SleepyBlocking


DEADLINE_S = 60.0  # generous: a regression that deadlocks fails instead of hanging


def within_deadline(fn: Callable[[], Any], seconds: float = DEADLINE_S) -> Any:
    """Run ``fn`` in a daemon thread; fail the test if it has not returned in time
    (join with a timeout: a deadlock would wait for ever here)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"backward did not finish within {seconds:.0f} s (deadlock?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def summarize_step(client: Any, message: Any) -> tuple[Variable, Variable]:
    """The first step of a two-step pipeline: a trainable instruction that summarizes
    ``message`` (a text, or a Variable of a batch of them) in one sentence. Returns
    ``(instruction, summary)``."""
    summarize = Variable(
        "Summarize the customer message in one sentence.",
        role="summarization instruction",
        requires_grad=True,
    )
    summary = ChatCompletion.apply(
        client,
        [
            {"role": "system", "content": [summarize]},
            {
                "role": "user",
                "content": [Variable("{message}", role="message template")],
            },
        ],
        inputs={"message": message},
        model=SIMULATOR_MODEL,
    )
    return summarize, summary
