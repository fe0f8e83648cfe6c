"""TGD steps against the simulator (replayed from cassettes) and a scripted client."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.cognitive import Parameter
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD, tgd
from afnio.optim.tgd import OptimizerStepError
from afnio.testing import SIMULATOR_MODEL
from tests.conftest import LMEndpoint

RULE_AWFUL = 'If the message mentions "awful", the sentiment is negative.'
RULE_LOVE = 'If the message mentions "love", the sentiment is positive.'
BASE = "Classify the sentiment of the customer message."


def http_exchanges(vcr: Any) -> int:
    return vcr.play_count or len(vcr)


def _feedback(*texts: str) -> Variable:
    return Variable(list(texts), role="feedback to system prompt")


@pytest.mark.afnio_replay
def test_a_step_turns_feedback_into_the_value_with_one_call_per_parameter(
    lm: LMEndpoint, vcr: Any
) -> None:
    prompt = Parameter(BASE, role="system prompt")
    other = Parameter("Answer with one word.", role="format instruction")
    idle = Parameter("Never changes.", role="idle prompt")
    prompt.append_grad(_feedback(RULE_AWFUL, RULE_AWFUL, ""))
    other.append_grad(Variable(RULE_LOVE, role="feedback"))
    optimizer = TGD(
        [prompt, other, idle], model_client=lm.client(), model=SIMULATOR_MODEL
    )
    assert optimizer.step() is None
    assert http_exchanges(vcr) == 2  # the parameter without feedback made no call
    assert prompt.data == f"{BASE} {RULE_AWFUL}"
    assert other.data == f"Answer with one word. {RULE_LOVE}"
    assert idle.data == "Never changes."
    assert len(prompt.grad) == 1  # step does not clear the gradients
    bodies = [json.loads(r.body) for r in vcr.sent_requests]
    (body,) = [b for b in bodies if "system prompt" in b["messages"][1]["content"]]
    assert body["response_format"]["json_schema"]["name"] == "afnio_improved_variable"
    assert f"- {RULE_AWFUL} (x2)" in body["messages"][1]["content"]


@pytest.mark.afnio_replay
def test_a_new_rule_for_an_already_ruled_word_replaces_it(lm: LMEndpoint) -> None:
    prompt = Parameter(
        f'{BASE} If the message mentions "awful", the sentiment is neutral. Be brief.',
        role="system prompt",
    )
    prompt.append_grad(_feedback(RULE_AWFUL))
    TGD([prompt], model_client=lm.client(), model=SIMULATOR_MODEL).step()
    assert prompt.data == f"{BASE} {RULE_AWFUL} Be brief."
    assert prompt.data.count('"awful"') == 1


@pytest.mark.afnio_replay
def test_momentum_keeps_a_window_of_past_values_and_shows_it(
    lm: LMEndpoint, vcr: Any
) -> None:
    prompt = Parameter(BASE, role="system prompt")
    optimizer = TGD(
        [prompt], model_client=lm.client(), momentum=2, model=SIMULATOR_MODEL
    )
    rules = [
        RULE_AWFUL,
        RULE_LOVE,
        'If the message mentions "worst", the sentiment is negative.',
    ]
    values = [prompt.data]
    for rule in rules:
        optimizer.zero_grad()
        prompt.append_grad(_feedback(rule))
        optimizer.step()
        values.append(prompt.data)
    window = optimizer.state[prompt]["momentum_buffer"]
    assert [snap.data for snap, _ in window] == values[1:3]  # the last two past values
    assert [grads[0].data for _, grads in window] == [[rules[1]], [rules[2]]]
    third = json.loads(vcr.sent_requests[2].body)["messages"][1]["content"]
    assert "<PAST_ITERATIONS>" in third
    assert values[0] in third and values[1] in third
    assert values[2].endswith(RULE_LOVE)


@pytest.mark.afnio_replay
def test_constraints_reach_the_prompt_and_are_honoured(
    lm: LMEndpoint, vcr: Any
) -> None:
    prompt = Parameter(f"{BASE}!", role="system prompt")
    prompt.append_grad(_feedback(RULE_AWFUL))
    constraint = 'Do not use the character "!".'
    TGD(
        [prompt],
        model_client=lm.client(),
        constraints=[constraint],
        model=SIMULATOR_MODEL,
    ).step()
    content = json.loads(vcr.sent_requests[0].body)["messages"][1]["content"]
    assert f"<CONSTRAINTS>\n- {constraint}\n</CONSTRAINTS>" in content
    assert "!" not in prompt.data and RULE_AWFUL in prompt.data


@pytest.mark.afnio_replay
def test_a_malformed_optimizer_answer_is_retried(lm: LMEndpoint, vcr: Any) -> None:
    if lm.simulator is not None:
        from afnio.testing import Fault

        lm.simulator.inject(Fault.MALFORMED_JSON, times=1)
    prompt = Parameter(BASE, role="system prompt")
    prompt.append_grad(_feedback(RULE_AWFUL))
    TGD([prompt], model_client=lm.client(), model=SIMULATOR_MODEL).step()
    assert http_exchanges(vcr) == 2
    retry = json.loads(vcr.sent_requests[1].body)["messages"]
    assert retry[-1]["content"].startswith("Your answer could not be used")
    assert prompt.data == f"{BASE} {RULE_AWFUL}"


@pytest.mark.afnio_replay
def test_functional_tgd_mutates_values_and_buffers_in_place(lm: LMEndpoint) -> None:
    prompt = Parameter(BASE, role="system prompt")
    grads = [
        Variable(RULE_AWFUL, role="feedback"),
        Variable(RULE_LOVE, role="feedback"),
    ]
    buffers: list[list[Any]] = [[]]
    buffer = buffers[0]
    tgd([prompt], [grads], buffers, lm.client(), momentum=2, model=SIMULATOR_MODEL)
    assert prompt.data == f"{BASE} {RULE_AWFUL} {RULE_LOVE}"
    assert buffers[0] is buffer and len(buffer) == 1
    snapshot, saved = buffer[0]
    assert snapshot.data == BASE and saved == grads


# -- atomicity, with a scripted client (no HTTP) ---------------------------------------


class Scripted(ChatCompletionModel):
    """Answers TGD calls: a fixed value, or malformed JSON for chosen parameters."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__(provider="scripted")
        self.broken = broken
        self.calls = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        await asyncio.sleep(0.01)
        content = messages[1]["content"]
        if any(
            f"<VARIABLE_ROLE>{role}</VARIABLE_ROLE>" in content for role in self.broken
        ):
            return '{"improved_value": "cut'
        return json.dumps({"improved_value": "NEW VALUE"})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def _three() -> list[Parameter]:
    params = [Parameter(f"value {i}", role=f"prompt {i}") for i in range(3)]
    for p in params:
        p.append_grad(Variable("make it better", role="feedback"))
    return params


def test_a_failing_step_leaves_every_parameter_unchanged() -> None:
    params = _three()
    client = Scripted(broken={"prompt 1"})
    optimizer = TGD(params, model_client=client)
    with pytest.raises(OptimizerStepError, match="'prompt 1'") as info:
        optimizer.step()
    assert info.value.parameter == "prompt 1"
    assert isinstance(info.value, RuntimeError)
    assert [p.data for p in params] == ["value 0", "value 1", "value 2"]
    assert optimizer.state[params[0]]["momentum_buffer"] == []
    assert client.calls == 2 + 4  # two good calls, and one call with 3 retries


def test_on_error_skip_updates_the_others() -> None:
    params = _three()
    optimizer = TGD(params, model_client=Scripted(broken={"prompt 1"}), on_error="skip")
    optimizer.step()
    assert [p.data for p in params] == ["NEW VALUE", "value 1", "NEW VALUE"]


def test_parameters_of_a_step_are_optimized_concurrently() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Simulator

    params = [Parameter(f"{BASE} ({i})", role=f"prompt {i}") for i in range(6)]
    for p in params:
        p.append_grad(_feedback(RULE_AWFUL))
    with (
        Simulator(latency=0.2) as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        TGD(params, model_client=client, model=SIMULATOR_MODEL).step()
        assert sim.stats.calls == 6
        assert sim.stats.peak_in_flight == 6
    assert all(p.data.endswith(RULE_AWFUL) for p in params)
    afnio.set_max_concurrency(16)


class Answers(ChatCompletionModel):
    """Answers each TGD call with the next text of a list."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__(provider="scripted")
        self.answers = list(answers)
        self.calls = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        return self.answers.pop(0)

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def _wrap(value: str, times: int) -> str:
    for _ in range(times):
        value = json.dumps({"improved_value": value})
    return value


def test_a_double_encoded_answer_is_unwrapped_once() -> None:
    param = Parameter("Customer message: {message}", role="prompt")
    param.append_grad(Variable("name the label", role="feedback"))
    client = Answers([_wrap("Classify. Customer message: {message}", 2)])
    TGD([param], model_client=client).step()
    assert param.data == "Classify. Customer message: {message}"
    assert client.calls == 1


def test_an_answer_wrapped_three_times_never_becomes_the_prompt() -> None:
    param = Parameter("Customer message: {message}", role="prompt")
    param.append_grad(Variable("name the label", role="feedback"))
    bad = _wrap("Customer message: {message}", 3)
    client = Answers([bad, bad, bad, bad])
    with pytest.raises(OptimizerStepError):
        TGD([param], model_client=client).step()
    assert param.data == "Customer message: {message}"
    client = Answers([bad, _wrap("Better. Customer message: {message}", 1)])
    TGD([param], model_client=client).step()  # retried, then a good answer
    assert param.data == "Better. Customer message: {message}"


def test_other_json_texts_may_be_prompts() -> None:
    param = Parameter('{"format": "json"}', role="prompt")
    param.append_grad(Variable("add a key", role="feedback"))
    value = '{"format": "json", "strict": true}'
    TGD([param], model_client=Answers([_wrap(value, 1)])).step()
    assert param.data == value


# -- credentials in completion args ---------------------------------------------------


def test_credentials_in_completion_args_never_reach_a_checkpoint_or_repr() -> None:
    from afnio.models.openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    optimizer = TGD(
        [Parameter("v1", role="prompt")],
        model_client=client,
        model="gpt-4o",
        extra_headers={"Authorization": "Bearer sk-ab12", "X-Trace": "t-1"},
        extra_query={"api_key": "q-SECRET", "api-version": "1"},
    )
    saved = optimizer.state_dict()
    args = saved["param_groups"][0]["completion_args"]
    assert args == {
        "model": "gpt-4o",
        "extra_headers": {"Authorization": "<redacted>", "X-Trace": "t-1"},
        "extra_query": {"api_key": "<redacted>", "api-version": "1"},
    }
    assert "sk-ab12" not in repr(optimizer) and "q-SECRET" not in repr(optimizer)
    live = optimizer.param_groups[0]["completion_args"]
    assert live["extra_headers"]["Authorization"] == "Bearer sk-ab12"  # intact
    buf = io.BytesIO()
    afnio.save(saved, buf)
    with zipfile.ZipFile(buf) as archive:  # the checkpoint's JSON, uncompressed
        text = archive.read("data.json").decode("utf-8")
    assert "sk-ab12" not in text and "q-SECRET" not in text and "<redacted>" in text
    buf.seek(0)
    loaded = afnio.load(buf)
    # loading keeps the live credentials of the optimizer it loads into
    optimizer.load_state_dict(loaded, model_clients={"model_client": client})
    assert optimizer.param_groups[0]["completion_args"] == live
    # an optimizer without them gets none: the mask is dropped, never sent
    other = TGD([Parameter("v1", role="prompt")], model_client=client, model="gpt-4o")
    other.load_state_dict(loaded, model_clients={"model_client": client})
    assert other.param_groups[0]["completion_args"] == {
        "model": "gpt-4o",
        "extra_headers": {"X-Trace": "t-1"},
        "extra_query": {"api-version": "1"},
    }
