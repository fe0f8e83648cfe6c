"""ChatCompletion and the evaluators' backward, replayed from cassettes recorded
against the simulator (whose feedback answers are deterministic)."""

from __future__ import annotations

import asyncio
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio import cognitive as cog
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.errors import BackwardParseError, GradientCountError, JudgeParseError
from afnio.models.model import ChatCompletionModel
from afnio.testing import SIMULATOR_MODEL
from tests.autodiff.helpers import summarize_step
from tests.conftest import LMEndpoint

EXPECTED_NEGATIVE = (
    'The prediction "neutral" is wrong: the expected value is "negative".'
)
SYSTEM = (
    "Classify the sentiment of the customer message as positive, neutral or negative."
)


def http_exchanges(vcr: Any) -> int:
    return vcr.play_count or len(vcr)


def _classifier(message: Any) -> tuple[Variable, Variable, list[dict[str, Any]]]:
    system = Variable(SYSTEM, role="system prompt", requires_grad=True)
    template = Variable("Customer message: {message}", role="user template")
    messages = [
        {"role": "system", "content": [system]},
        {"role": "user", "content": [template]},
    ]
    return system, template, messages


@pytest.mark.afnio_replay
def test_scalar_forward_and_backward_reach_every_variable(
    backward_lm: LMEndpoint,
) -> None:
    client = backward_lm.client()
    system, template, messages = _classifier(None)
    template.requires_grad_(True)
    message = Variable(
        "I am frustrated and upset: the heating failed again.",
        role="customer message",
        requires_grad=True,
    )
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": message}, model=SIMULATOR_MODEL
    )
    assert reply.data == "neutral"
    assert reply.role == "response to the input messages"
    assert reply.grad_fn.name() == "ChatCompletionBackward0"
    kinds = [type(e.node).__name__ for e in reply.grad_fn.next_functions]
    assert kinds == ["AccumulateGrad"] * 3
    reply.backward(Variable(EXPECTED_NEGATIVE, role="feedback"))
    assert [g.data for g in system.grad] == [
        'If the message mentions "frustrated", the sentiment is negative.'
    ]
    assert system.grad[0].role == "feedback to system prompt"
    assert [g.data for g in template.grad] == [
        'The user template should lead to "negative" for this input.'
    ]
    assert [g.data for g in message.grad] == [
        'The customer message should lead to "negative" for this input.'
    ]


@pytest.mark.afnio_replay
def test_a_variable_that_is_a_whole_message_is_shown_once(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    system, template, messages = _classifier(None)
    template.requires_grad_(True)
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": "It broke."}, model=SIMULATOR_MODEL
    )
    reply.backward(Variable(EXPECTED_NEGATIVE, role="feedback"))
    user = json.loads(vcr.sent_requests[-1].body)["messages"][1]["content"]
    assert user.count(SYSTEM) == 1  # in the conversation, not again as the variable
    assert (
        '<VARIABLE index="1" role="system prompt" location="system" trainable="true">'
        '(the whole content of <MESSAGE> 1 of <LM_CONVERSATION>, role "system")'
        "</VARIABLE>" in user
    )
    # the user template is only part of its rendered message: shown as it is
    assert ">Customer message: {message}</VARIABLE>" in user
    assert len(system.grad) == 1 and len(template.grad) == 1


@pytest.mark.afnio_replay
def test_batched_gradients_follow_difference_13(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    system, _, messages = _classifier(None)
    batch = Variable(
        [
            "The cleaning was excellent, thank you.",
            "Terrible service, I am upset.",
            "Please confirm the Tuesday visit.",
        ],
        role="customer message",
        requires_grad=True,
    )
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": batch}, model=SIMULATOR_MODEL
    )
    assert reply.data == ["neutral", "neutral", "neutral"]
    feedback = [
        'The prediction "neutral" is wrong: the expected value is "positive".',
        EXPECTED_NEGATIVE,
        "",  # no feedback for the third sample: no backward call for it
    ]
    reply.backward(Variable(feedback, role="feedback"))
    assert http_exchanges(vcr) == 3 + 2
    # a shared scalar Variable: one gradient, the list of non-empty per-sample texts
    assert len(system.grad) == 1
    assert system.grad[0].data == [
        'If the message mentions "excellent", the sentiment is positive.',
        'If the message mentions "terrible", the sentiment is negative.',
    ]
    # a batched Variable: one gradient aligned with the samples
    assert batch.grad[0].data == [
        'The customer message should lead to "positive" for this input.',
        'The customer message should lead to "negative" for this input.',
        "",
    ]


@pytest.mark.afnio_replay
def test_a_list_of_variables_gives_each_sample_its_own_gradient(
    backward_lm: LMEndpoint,
) -> None:
    client = backward_lm.client()
    _, _, messages = _classifier(None)
    first = Variable(
        "I love the new schedule.", role="first message", requires_grad=True
    )
    second = Variable("Nothing to report.", role="second message", requires_grad=True)
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": [first, second]}, model=SIMULATOR_MODEL
    )
    assert isinstance(reply.data, list) and len(reply.data) == 2
    reply.backward(
        Variable(
            ['The prediction "neutral" is wrong: the expected value is "positive".', ""]
        )
    )
    assert [g.data for g in first.grad] == [
        'The first message should lead to "positive" for this input.'
    ]
    assert second.grad == []


@pytest.mark.afnio_replay
def test_braces_in_inputs_reach_the_lm_exactly_as_written(
    lm: LMEndpoint, vcr: Any
) -> None:
    client = lm.client()
    _, _, messages = _classifier(None)
    text = "Use {message.__class__} and {0} and {{x}} please"
    ChatCompletion.apply(
        client, messages, inputs={"message": text}, model=SIMULATOR_MODEL
    )
    body = json.loads(vcr.sent_requests[0].body)
    assert body["messages"][1]["content"] == f"Customer message: {text}"


@pytest.mark.afnio_replay
def test_exact_match_backward_skips_correct_samples(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    system, _, messages = _classifier(None)
    batch = Variable(
        ["Thanks, all good.", "I am disappointed with the repair.", "Is the gym open?"],
        role="customer message",
    )
    reply = ChatCompletion.apply(
        client, messages, inputs={"message": batch}, model=SIMULATOR_MODEL
    )
    score, explanation = ExactMatchEvaluator.apply(
        reply, ["neutral", "negative", "neutral"]
    )
    assert score.data == 2
    explanation.backward()
    # 3 forward calls; 1 evaluator backward (one failed sample); 1 chat backward
    assert http_exchanges(vcr) == 3 + 1 + 1
    assert system.grad[0].data == [
        'If the message mentions "disappointed", the sentiment is negative.'
    ]


@pytest.mark.afnio_replay
def test_per_sample_skip_can_be_switched_off(backward_lm: LMEndpoint, vcr: Any) -> None:
    prediction = Variable(["negative", "neutral"], role="sentiment", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(
        prediction, ["negative", "positive"], per_sample_skip=False
    )
    explanation.backward()
    assert http_exchanges(vcr) == 1  # both samples asked, in one group
    body = json.loads(vcr.sent_requests[0].body)
    assert body["messages"][1]["content"].count("<SAMPLE index=") == 2
    assert prediction.grad[0].data[0].startswith('The prediction "negative" is wrong')
    assert prediction.grad[0].data[1].startswith('The prediction "neutral" is wrong')


@pytest.mark.afnio_replay
def test_deterministic_evaluator_backward_gives_feedback_to_the_prediction(
    backward_lm: LMEndpoint,
) -> None:
    prediction = Variable("green", role="color prediction", requires_grad=True)

    def exact(p: str, t: str) -> int:
        return int(p == t)

    _, explanation = DeterministicEvaluator.apply(
        prediction, "red", exact, "exact match"
    )
    explanation.backward()
    assert [g.data for g in prediction.grad] == [
        'The prediction "green" is wrong: the expected value is "red". Change what '
        'produces it so that this input leads to "red".'
    ]
    assert prediction.grad[0].role == "feedback to color prediction"


JUDGE_TASK = "Evaluate if the translation is accurate."
JUDGE_USER = "<PREDICTION>{prediction}</PREDICTION><TARGET>{target}</TARGET>"


@pytest.mark.afnio_replay
def test_lm_judge_scores_and_sends_feedback_to_the_prediction(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    task = Variable(JUDGE_TASK, role="evaluation task", requires_grad=True)
    user = Variable(JUDGE_USER, role="user query")
    messages = [
        {"role": "system", "content": [task]},
        {"role": "user", "content": [user]},
    ]
    prediction = Variable(
        ["Hola Mundo", "Salve a tutti"], role="translated text", requires_grad=True
    )
    score, explanation = LMJudgeEvaluator.apply(
        client,
        messages,
        prediction,
        ["Ciao Mondo", "Salve a tutti"],
        model=SIMULATOR_MODEL,
    )
    assert score.data == 1
    assert explanation.data == (
        "The evaluation function, designed using an LM as the judge, compared the "
        "<DATA> fields of the predicted variable and the target variable across all "
        "samples in the batch. These scores were then aggregated using the reduction "
        "function 'summation', resulting in a final aggregated score: 1."
    )
    explanation.backward()
    assert prediction.grad[0].data[0].startswith('The prediction "Hola Mundo" is wrong')
    assert prediction.grad[0].data[1] == ""
    assert task.grad == []  # eval_mode=True: the judge is not optimized
    # the backward call shows the judge's own explanation of the failed sample
    backward_user = json.loads(vcr.sent_requests[-1].body)["messages"][1]["content"]
    assert '<EXPLANATION>The prediction "Hola Mundo" does not match' in backward_user
    assert backward_user.count("<SAMPLE index=") == 1


@pytest.mark.afnio_replay
def test_lm_judge_eval_mode_false_optimizes_the_judge(backward_lm: LMEndpoint) -> None:
    client = backward_lm.client()
    task = Variable(JUDGE_TASK, role="evaluation task", requires_grad=True)
    user = Variable(JUDGE_USER, role="user query")
    messages = [
        {"role": "system", "content": [task]},
        {"role": "user", "content": [user]},
    ]
    prediction = Variable("Hola Mundo", role="translated text", requires_grad=True)
    score, explanation = LMJudgeEvaluator.apply(
        client,
        messages,
        prediction,
        "Ciao Mondo",
        eval_mode=False,
        model=SIMULATOR_MODEL,
    )
    assert score.data is False
    assert (
        explanation.data
        == 'The prediction "Hola Mundo" does not match the target "Ciao Mondo".'
    )
    explanation.backward()
    assert [g.data for g in task.grad] == [
        'The evaluation task should lead to the expected value "Ciao Mondo" for this '
        "input."
    ]
    assert prediction.grad == []


@pytest.mark.afnio_replay
def test_a_malformed_backward_answer_is_retried(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    client = backward_lm.client()
    system, _, messages = _classifier(None)
    reply = ChatCompletion.apply(
        client,
        messages,
        inputs={"message": "The lobby is awful."},
        model=SIMULATOR_MODEL,
    )
    if backward_lm.simulator is not None:
        from afnio.testing import Fault

        backward_lm.simulator.inject(Fault.MALFORMED_JSON, times=1)
    reply.backward(Variable(EXPECTED_NEGATIVE))
    assert http_exchanges(vcr) == 1 + 2  # forward, a bad answer, then a good one
    retry = json.loads(vcr.sent_requests[2].body)
    assert retry["messages"][-1]["content"].startswith("Your answer could not be used")
    assert [g.data for g in system.grad] == [
        'If the message mentions "awful", the sentiment is negative.'
    ]


@pytest.mark.afnio_replay
def test_backward_gives_up_after_the_retries_and_changes_nothing(
    backward_lm: LMEndpoint,
) -> None:
    client = backward_lm.client()
    system, _, messages = _classifier(None)
    reply = ChatCompletion.apply(
        client,
        messages,
        inputs={"message": "The lobby is awful."},
        model=SIMULATOR_MODEL,
    )
    if backward_lm.simulator is not None:
        from afnio.testing import Fault

        backward_lm.simulator.inject(Fault.MALFORMED_JSON, times=4)
    with pytest.raises(BackwardParseError, match="ChatCompletionBackward0") as info:
        reply.backward(Variable(EXPECTED_NEGATIVE))
    assert isinstance(info.value, RuntimeError)
    assert info.value.node == "ChatCompletionBackward0"
    assert system.grad == []


@pytest.mark.afnio_replay
def test_feedback_reaches_the_first_step_of_a_two_step_pipeline(
    backward_lm: LMEndpoint,
) -> None:
    client = backward_lm.client()
    summarize, summary = summarize_step(client, "I am thrilled with the new gardener.")
    system, _, messages = _classifier(None)
    label = ChatCompletion.apply(
        client, messages, inputs={"message": summary}, model=SIMULATOR_MODEL
    )
    _, explanation = ExactMatchEvaluator.apply(label, "positive")
    explanation.backward()
    assert len(system.grad) == 1 and len(summarize.grad) == 1
    assert "positive" in summarize.grad[0].data


@pytest.mark.afnio_replay
def test_module_and_functional_forms(backward_lm: LMEndpoint) -> None:
    client = backward_lm.client()
    _, _, messages = _classifier(None)
    module = cog.ChatCompletion()
    reply = module(
        client, messages, inputs={"message": "Fantastic work!"}, model=SIMULATOR_MODEL
    )
    again = cog.functional.chat_completion(
        client, messages, inputs={"message": "Fantastic work!"}, model=SIMULATOR_MODEL
    )
    assert reply.data == again.data == "neutral"
    sd = module.state_dict()
    assert sd["completion_args"] == {"model": SIMULATOR_MODEL}
    assert sd["forward_model_client"]["class_type"] == "AsyncOpenAI"
    assert sd["messages"][0]["content"][0].data == SYSTEM
    judge = cog.ExactMatchEvaluator()
    score, _ = judge(reply, "positive")
    assert (
        score.data == 0
        and "summation" in judge.state_dict()["reduction_fn_purpose"].data
    )


# -- errors (no LM) -----------------------------------------------------------------


def test_chat_completion_argument_errors() -> None:
    from afnio.models.openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:9/v1")
    _, _, messages = _classifier(None)
    with pytest.raises(TypeError, match="`forward_model_client`"):
        ChatCompletion.apply(object(), messages)
    with pytest.raises(ValueError, match="missing"):
        ChatCompletion.apply(client, [{"role": "user"}])
    with pytest.raises(TypeError, match="`inputs` must be a dict"):
        ChatCompletion.apply(client, messages, inputs=["x"])
    with pytest.raises(ValueError, match="equal lengths"):
        ChatCompletion.apply(
            client, messages, inputs={"a": ["x", "y"], "b": Variable(["1", "2", "3"])}
        )
    with pytest.raises(ValueError, match=r"must not use the keys \['prediction'\]"):
        LMJudgeEvaluator.apply(
            client, messages, Variable("p"), "t", inputs={"prediction": "x"}
        )


# -- concurrency through real HTTP (live simulator, loopback only) ---------------------


def test_batched_backward_reaches_the_bound_and_never_exceeds_it() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Simulator

    for bound, expected_peak in ((16, 16), (4, 4)):
        afnio.set_max_concurrency(bound)
        with (
            Simulator() as sim,
            AsyncOpenAI(
                base_url=sim.base_url, api_key="sk-test", max_retries=0
            ) as client,
        ):
            afnio.set_backward_model_client(
                client, completion_args={"model": SIMULATOR_MODEL}
            )
            system, _, messages = _classifier(None)
            batch = Variable(
                [f"Message {i} is awful." for i in range(16)], role="messages"
            )
            reply = ChatCompletion.apply(
                client, messages, inputs={"message": batch}, model=SIMULATOR_MODEL
            )
            sim.latency = 0.2
            sim.reset_stats()
            reply.backward(Variable([EXPECTED_NEGATIVE] * 16))
            assert sim.stats.calls == 16
            assert sim.stats.peak_in_flight == expected_peak
            assert len(system.grad[0].data) == 16


def test_failed_samples_are_sent_in_groups_concurrently() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Simulator

    labels = ["negative", "neutral", "positive"]
    predictions = [labels[i % 3] for i in range(20)]
    targets = [labels[(i + (i % 4 != 0)) % 3] for i in range(20)]  # 15 wrong
    wrong = [i for i in range(20) if predictions[i] != targets[i]]
    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as llm,
    ):
        afnio.set_backward_model_client(llm, completion_args={"model": SIMULATOR_MODEL})
        sim.latency = 0.2
        for per_call, calls in ((None, 2), (4, 4), (1, 15)):
            sim.reset_stats()
            prediction = Variable(predictions, role="sentiment", requires_grad=True)
            _, explanation = ExactMatchEvaluator.apply(
                prediction, targets, samples_per_call=per_call
            )
            explanation.backward()
            assert sim.stats.calls == calls
            assert sim.stats.peak_in_flight == calls  # one LM round
            grads = prediction.grad[0].data
            for i in range(20):
                if i in wrong:
                    assert grads[i].startswith(
                        f'The prediction "{predictions[i]}" is wrong: the expected '
                        f'value is "{targets[i]}".'
                    )
                else:
                    assert grads[i] == ""


def test_samples_per_call_must_be_a_positive_int(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="`samples_per_call` must be >= 1"):
            ExactMatchEvaluator.apply(prediction, ["a", "c"], samples_per_call=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="`samples_per_call` must be an int"):
            ExactMatchEvaluator.apply(prediction, ["a", "c"], samples_per_call=bad)
    monkeypatch.setattr(afnio.autodiff.config, "EVALUATOR_SAMPLES_PER_CALL", 0)
    with pytest.raises(ValueError, match="`EVALUATOR_SAMPLES_PER_CALL` must be >= 1"):
        ExactMatchEvaluator.apply(prediction, ["a", "c"])


def test_a_bad_samples_per_call_fails_before_the_judge_is_paid() -> None:
    judge = ScriptedLM('{"score": true, "explanation": "ok"}')
    messages = [{"role": "user", "content": [Variable(JUDGE_USER, role="judge")]}]
    prediction = Variable(["a", "b"], role="label", requires_grad=True)
    with pytest.raises(ValueError, match="`samples_per_call` must be >= 1"):
        LMJudgeEvaluator.apply(
            judge, messages, prediction, ["a", "b"], samples_per_call=0
        )
    assert judge.calls == 0


def test_one_failed_group_among_several_changes_no_gradient() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Fault, Simulator

    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as llm,
    ):
        afnio.set_backward_model_client(llm, completion_args={"model": SIMULATOR_MODEL})
        prediction = Variable(["x"] * 12, role="labels", requires_grad=True)
        _, explanation = ExactMatchEvaluator.apply(
            prediction, ["y"] * 12, samples_per_call=4
        )
        sim.inject(Fault.SERVER_ERROR)  # one of the 3 groups' requests fails
        with pytest.raises(Exception):  # noqa: B017 (the SDK's error, any kind)
            explanation.backward(retain_graph=True)
        assert prediction.grad == []
        explanation.backward()  # the graph was kept: it works when the LM does
        assert len(prediction.grad[0].data) == 12


def test_async_apply_and_backward_inside_an_event_loop() -> None:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Simulator

    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        system, _, messages = _classifier(None)

        async def handler() -> list[Any]:
            reply = await ChatCompletion.aapply(
                client,
                messages,
                inputs={"message": "This is unacceptable."},
                model=SIMULATOR_MODEL,
            )
            await reply.abackward(Variable(EXPECTED_NEGATIVE))
            return [g.data for g in system.grad]

        assert asyncio.run(handler()) == [
            'If the message mentions "unacceptable", the sentiment is negative.'
        ]


# -- unusable answers, with a scripted client (no HTTP) --------------------------------


class ScriptedLM(ChatCompletionModel):
    """Always gives the same answer; counts calls."""

    def __init__(self, answer: str) -> None:
        super().__init__(provider="scripted")
        self.answer = answer
        self.calls = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        return self.answer

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def test_a_wrong_gradient_count_is_retried_then_raises_a_value_error() -> None:
    backward = ScriptedLM('{"gradients": ["one", "two", "three"]}')
    afnio.set_backward_model_client(backward)
    prediction = Variable("green", role="color", requires_grad=True)
    _, explanation = ExactMatchEvaluator.apply(prediction, "red")
    with pytest.raises(
        GradientCountError, match="3 feedback strings, but 1 are asked for"
    ) as info:
        explanation.backward()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert backward.calls == 4  # the first answer and 3 retries
    assert prediction.grad == []


def test_an_unusable_judge_answer_raises_after_the_retries() -> None:
    judge = ScriptedLM("I think it is fine.")
    messages = [{"role": "user", "content": [Variable("{prediction} vs {target}")]}]
    with pytest.raises(JudgeParseError, match="not valid judgement JSON") as info:
        LMJudgeEvaluator.apply(judge, messages, Variable("a"), "b")
    assert isinstance(info.value, RuntimeError)
    assert judge.calls == 4


# -- credentials in completion args ---------------------------------------------------


class RecordingLM(ScriptedLM):
    """A :class:`ScriptedLM` that keeps the keyword arguments of every call."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.kwargs: list[dict[str, Any]] = []

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.kwargs.append(kwargs)
        return await super().achat(messages, **kwargs)


def test_credentials_in_completion_args_never_reach_a_checkpoint(
    tmp_path: Path,
) -> None:
    client = RecordingLM("positive")
    _, _, messages = _classifier(None)
    module = cog.ChatCompletion()
    headers = {"Authorization": "Bearer sk-abc123", "X-Trace": "trace-1"}
    query = {"key": "qk-SECRET", "api-version": "1"}
    module(
        client,
        messages,
        inputs={"message": "Great!"},
        model="m",
        extra_headers=headers,
        extra_query=query,
    )
    # the LM call itself gets the real credentials
    assert client.kwargs[0]["extra_headers"] == headers
    assert client.kwargs[0]["extra_query"] == query
    module.forward_model_client = None  # a scripted client: no checkpoint of it
    sd = module.state_dict()
    assert sd["completion_args"] == {
        "model": "m",
        "extra_headers": {"Authorization": "<redacted>", "X-Trace": "trace-1"},
        "extra_query": {"key": "<redacted>", "api-version": "1"},
    }
    assert module.completion_args["extra_headers"] == headers  # the live slot is intact
    path = tmp_path / "agent.hf"
    afnio.save(sd, path)
    with zipfile.ZipFile(path) as archive:
        text = archive.read("data.json").decode("utf-8")
    assert "abc123" not in text and "qk-SECRET" not in text
    loaded = afnio.load(path)
    # loaded into a module that holds the credentials: it keeps its own
    module.load_state_dict(loaded)
    assert module.completion_args["extra_headers"] == headers
    assert module.completion_args["extra_query"] == query
    # loaded into a fresh module: the credentials are dropped, never set to the mask
    fresh = cog.ChatCompletion()
    fresh.load_state_dict(loaded, strict=False)
    assert fresh.completion_args == {
        "model": "m",
        "extra_headers": {"X-Trace": "trace-1"},
        "extra_query": {"api-version": "1"},
    }
