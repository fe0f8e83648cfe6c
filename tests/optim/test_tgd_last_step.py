"""TGD.last_step: what the optimizer did with each parameter at the last step."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from afnio import Variable
from afnio.autodiff.config import BACKWARD_PASS_MAX_RETRIES
from afnio.cognitive import Parameter
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD
from afnio.optim.tgd import OptimizerStepError, StepAnswer, render_feedback
from afnio.testing import SIMULATOR_MODEL

MALFORMED = '{"improved_value": "cut'


class Scripted(ChatCompletionModel):
    """Answers each parameter (found by its role in the prompt) by its script: a list
    of answers, the last one repeated; records every prompt."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        super().__init__(provider="scripted")
        self.scripts = scripts
        self.calls: dict[str, int] = {}
        self.prompts: dict[str, str] = {}

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        content = messages[1]["content"]
        role = next(
            r for r in self.scripts if f"<VARIABLE_ROLE>{r}</VARIABLE_ROLE>" in content
        )
        k = self.calls.get(role, 0)
        self.calls[role] = k + 1
        self.prompts.setdefault(role, content)
        script = self.scripts[role]
        return script[min(k, len(script) - 1)]

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def _value(text: str) -> str:
    return json.dumps({"improved_value": text})


@pytest.mark.parametrize("seed", range(5))
def test_last_step_lists_each_parameters_status_attempts_and_feedback(
    seed: int,
) -> None:
    rng = random.Random(seed)
    n = rng.randint(4, 8)
    params = [Parameter(f"value {i}", role=f"prompt {i}") for i in range(n)]
    kinds = [
        rng.choice(["updated", "retried", "unchanged", "failed", "none"])
        for _ in range(n)
    ]
    scripts: dict[str, list[str]] = {}
    for i, (p, kind) in enumerate(zip(params, kinds, strict=True)):
        if kind != "none":
            texts = [f"fix {i}.{j}" for j in range(rng.randint(1, 3))]
            p.append_grad(Variable(texts, role="feedback"))
        scripts[p.role] = {
            "updated": [_value(f"new {i}")],
            "retried": [MALFORMED, _value(f"new {i}")],
            "unchanged": [_value(f"value {i}")],
            "failed": [MALFORMED],
            "none": [_value("never asked")],
        }[kind]
    client = Scripted(scripts)
    optimizer = TGD(params, model_client=client, on_error="skip")
    assert optimizer.last_step == []
    optimizer.step()
    answers = optimizer.last_step
    assert [a.param for a in answers] == params
    for i, (p, kind, a) in enumerate(zip(params, kinds, answers, strict=True)):
        assert isinstance(a, StepAnswer)
        shown = render_feedback(p.grad)[0]
        assert a.feedback_shown == shown
        if kind == "none":
            assert (a.status, a.value, a.error, a.attempts) == (
                "no_feedback",
                None,
                None,
                0,
            )
            assert a.feedback_shown == "" and p.role not in client.calls
            continue
        assert shown in client.prompts[p.role]  # what the optimizer LM was shown
        assert a.attempts == client.calls[p.role]
        if kind == "failed":
            assert a.status == "failed"
            assert a.attempts == BACKWARD_PASS_MAX_RETRIES + 1
            assert a.raw_answer == MALFORMED
            assert "unusable" in a.error and a.value is None
            assert p.data == f"value {i}"
        else:
            expected = f"value {i}" if kind == "unchanged" else f"new {i}"
            assert a.value == expected == p.data
            assert a.status == ("unchanged" if kind == "unchanged" else "updated")
            assert a.attempts == (2 if kind == "retried" else 1)
            assert a.error is None and a.raw_answer is None


def test_last_step_is_reset_at_every_step() -> None:
    p = Parameter("value", role="prompt")
    p.append_grad(Variable("fix it", role="feedback"))
    optimizer = TGD([p], model_client=Scripted({"prompt": [_value("new")]}))
    optimizer.step()
    assert [a.status for a in optimizer.last_step] == ["updated"]
    p.grad = []
    optimizer.step()
    assert [(a.status, a.attempts) for a in optimizer.last_step] == [("no_feedback", 0)]


def test_a_raising_step_reports_every_parameter_failed_and_applies_nothing() -> None:
    params = [Parameter(f"value {i}", role=f"prompt {i}") for i in range(3)]
    for p in params:
        p.append_grad(Variable("fix it", role="feedback"))
    client = Scripted(
        {"prompt 0": [_value("a")], "prompt 1": [MALFORMED], "prompt 2": [_value("c")]}
    )
    optimizer = TGD(params, model_client=client)
    with pytest.raises(OptimizerStepError):
        optimizer.step()
    assert [a.status for a in optimizer.last_step] == ["failed"] * 3
    assert optimizer.last_step[1].raw_answer == MALFORMED
    assert optimizer.last_step[0].error.startswith("not applied: ")
    assert [p.data for p in params] == ["value 0", "value 1", "value 2"]


def test_last_step_against_the_simulator_counts_a_retried_malformed_answer() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Fault, Simulator

    prompt = Parameter(
        "Classify the sentiment of the customer message.", role="system prompt"
    )
    other = Parameter("Answer briefly.", role="style prompt")
    rule = 'If the message mentions "awful", the sentiment is negative.'
    prompt.append_grad(Variable([rule, rule], role="feedback"))
    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as llm,
    ):
        sim.inject(Fault.MALFORMED_JSON, times=1)
        optimizer = TGD([prompt, other], model_client=llm, model=SIMULATOR_MODEL)
        optimizer.step()
    first, second = optimizer.last_step
    assert (first.status, first.attempts, first.value) == ("updated", 2, prompt.data)
    assert rule in prompt.data
    assert first.feedback_shown == f"- {rule} (x2)"
    assert (second.status, second.attempts) == ("no_feedback", 0)
