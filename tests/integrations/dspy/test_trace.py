"""Tracing DSPy programs (DSPy -> LiteLLM -> HTTP, replayed from cassettes recorded
against the simulator), backward through them, and writing the optimized instructions
back into the user's program."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# while recording against the live simulator, LiteLLM drops pooled connections
# without closing them; the garbage collector may report them mid-test
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

import afnio  # noqa: E402
from afnio import functional as F  # noqa: E402
from afnio.optim import TGD  # noqa: E402
from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio_integrations.dspy import TracedProgram, trace  # noqa: E402
from tests.conftest import LMEndpoint  # noqa: E402

FRUSTRATED = "I am frustrated: the heating has been broken for a week."
RULE = 'If the message mentions "frustrated", the sentiment is negative.'


class SummarizeThenClassify(dspy.Module):
    """Two predictors: a summary, then a sentiment with reasoning."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("message -> summary")
        self.classify = dspy.ChainOfThought("summary -> sentiment")

    def forward(self, message: str) -> Any:
        summary = self.summarize(message=message).summary
        return self.classify(summary=summary)


class ClassifyEach(dspy.Module):
    """One predictor called in a loop, once per message."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict("message -> sentiment")

    def forward(self, messages: list[str]) -> Any:
        labels = [self.classify(message=m).sentiment for m in messages]
        return dspy.Prediction(sentiments=", ".join(labels))


def _bodies_of(vcr: Any, action: Any) -> list[dict[str, Any]]:
    """The JSON bodies of the requests ``action`` made (recorded now, or replayed
    from the cassette)."""
    before = len(vcr.sent_requests)  # sent by the test, recorded or replayed
    action()
    return [json.loads(r.body) for r in vcr.sent_requests[before:]]


def _system_prompts(bodies: list[dict[str, Any]]) -> list[str]:
    return [b["messages"][0]["content"] for b in bodies if "messages" in b]


def _feedback(param: Any) -> list[str]:
    """Every feedback text a Parameter received (its gradients may hold lists)."""
    return [
        t
        for g in param.grad
        for t in (g.data if isinstance(g.data, list) else [g.data])
    ]


def _step(traced: TracedProgram, lm: LMEndpoint) -> None:
    TGD(traced.parameters(), model_client=lm.client(), model=SIMULATOR_MODEL).step()
    traced.write_back()


@pytest.mark.afnio_replay
def test_predict_program_learns_and_the_next_request_carries_the_new_instructions(
    backward_lm: LMEndpoint, dspy_lm: Any, vcr: Any
) -> None:
    program = dspy.Predict("message -> sentiment")
    traced = trace(program)
    assert [n for n, _ in traced.named_parameters()] == ["self_instructions"]
    prediction = traced(message=FRUSTRATED)
    assert prediction.sentiment.data == "neutral"
    assert prediction.sentiment.requires_grad
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    (param,) = traced.parameters()
    assert param.grad and RULE in param.grad[0].data
    _step(traced, backward_lm)
    assert RULE in program.signature.instructions  # written into the user's program
    bodies = _bodies_of(vcr, lambda: program(message=FRUSTRATED))
    assert any(RULE in text for text in _system_prompts(bodies))
    assert program(message=FRUSTRATED).sentiment == "negative"


@pytest.mark.afnio_replay
def test_chain_of_thought_program_gets_feedback_through_the_parsed_field(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    program = dspy.ChainOfThought("message -> sentiment")
    traced = trace(program)
    assert traced.predictor_names == ["predict"]
    prediction = traced(message=FRUSTRATED)
    assert set(prediction) == {"reasoning", "sentiment"}
    assert "No rule" in prediction.reasoning.data
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    (param,) = traced.parameters()
    assert param.grad and RULE in param.grad[0].data
    _step(traced, backward_lm)
    after = program(message=FRUSTRATED)
    assert after.sentiment == "negative" and "frustrated" in after.reasoning


@pytest.mark.afnio_replay
def test_two_predictor_program_sends_feedback_to_both_predictors(
    backward_lm: LMEndpoint, dspy_lm: Any, vcr: Any
) -> None:
    program = SummarizeThenClassify()
    traced = trace(program)
    assert traced.predictor_names == ["summarize", "classify.predict"]
    prediction = traced(message=FRUSTRATED)
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    summarize, classify = traced.parameters()
    assert summarize.grad, "the first stage got no feedback through the second"
    assert classify.grad and RULE in classify.grad[0].data
    # the first stage's feedback names no expected value: it gets no rule
    assert "If the message mentions" not in summarize.grad[0].data
    _step(traced, backward_lm)
    bodies = _bodies_of(vcr, lambda: program(message=FRUSTRATED))
    assert len(bodies) == 2
    assert RULE in _system_prompts(bodies)[1]


@pytest.mark.afnio_replay
def test_a_predictor_called_in_a_loop_gets_feedback_from_every_call(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(ClassifyEach())
    prediction = traced(messages=[FRUSTRATED, "The new lobby is great."])
    assert prediction.sentiments.data == "neutral, neutral"
    _, explanation = F.exact_match_evaluator(
        prediction.sentiments, "negative, positive"
    )
    explanation.backward()
    (param,) = traced.parameters()
    # one gradient per backward pass of the node: both calls' feedback in one list
    assert len(_feedback(param)) == 2


@pytest.mark.afnio_replay
def test_json_adapter_programs_are_traced_too(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    program = dspy.Predict("message -> sentiment")
    traced = trace(program)
    with dspy.context(adapter=dspy.JSONAdapter()):
        prediction = traced(message=FRUSTRATED)
    assert prediction.sentiment.data == "neutral"
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    assert next(iter(traced.parameters())).grad


@pytest.mark.afnio_replay
def test_batch_gives_aligned_batched_fields_and_per_sample_feedback(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(dspy.Predict("message -> sentiment"))
    examples = [
        dspy.Example(message=FRUSTRATED, sentiment="negative").with_inputs("message"),
        {"message": "All fine, thanks."},
    ]
    prediction = traced.batch(examples)
    assert prediction.sentiment.data == ["neutral", "neutral"]
    assert [p.sentiment for p in prediction.prediction] == ["neutral", "neutral"]
    _, explanation = F.exact_match_evaluator(
        prediction.sentiment, ["negative", "neutral"]
    )
    explanation.backward()
    (param,) = traced.parameters()
    assert _feedback(param) == [RULE]  # only the failed sample asked for feedback


@pytest.mark.afnio_replay
def test_output_field_descriptions_are_optional_parameters(
    backward_lm: LMEndpoint, dspy_lm: Any, vcr: Any
) -> None:
    program = dspy.Predict("message -> sentiment")
    traced = trace(program, descriptions=True)
    names = [n for n, _ in traced.named_parameters()]
    assert names == ["self_instructions", "self_sentiment_description"]
    description = list(traced.parameters())[1]
    assert description.data == ""  # DSPy's placeholder description counts as none
    description.data = "one of positive, negative, neutral"
    bodies = _bodies_of(vcr, lambda: traced(message=FRUSTRATED))
    assert "one of positive, negative, neutral" in _system_prompts(bodies)[0]
    assert program.signature.output_fields["sentiment"].json_schema_extra["desc"] == (
        "one of positive, negative, neutral"
    )


def test_write_back_uses_a_new_signature_and_never_mutates_shared_classes() -> None:
    class Sentiment(dspy.Signature):
        """Classify the sentiment."""

        message: str = dspy.InputField()
        sentiment: str = dspy.OutputField()

    first, second = dspy.Predict(Sentiment), dspy.Predict(Sentiment)
    traced = trace(first)
    next(iter(traced.parameters())).data = f"Classify the sentiment. {RULE}"
    traced.write_back()
    assert first.signature.instructions == f"Classify the sentiment. {RULE}"
    assert Sentiment.instructions == "Classify the sentiment."
    assert second.signature.instructions == "Classify the sentiment."


def test_the_written_program_saves_and_loads_with_dspy(tmp_path: Path) -> None:
    program = SummarizeThenClassify()
    traced = trace(program)
    for param in traced.parameters():
        param.data = f"{param.data} {RULE}"
    traced.write_back()
    path = tmp_path / "program.json"
    program.save(str(path))
    fresh = SummarizeThenClassify()
    fresh.load(str(path))
    assert [p.signature.instructions for _, p in fresh.named_predictors()] == [
        p.signature.instructions for _, p in program.named_predictors()
    ]
    assert RULE in fresh.classify.predict.signature.instructions


def test_a_program_loaded_after_tracing_updates_the_parameters(tmp_path: Path) -> None:
    saved = dspy.Predict("message -> sentiment")
    saved.signature = saved.signature.with_instructions(RULE)
    path = tmp_path / "program.json"
    saved.save(str(path))
    program = dspy.Predict("message -> sentiment")
    traced = trace(program)
    program.load(str(path))
    traced._sync()  # what every call does first
    assert next(iter(traced.parameters())).data == RULE


def test_write_back_rejects_empty_instructions_and_changes_nothing() -> None:
    program = SummarizeThenClassify()
    traced = trace(program)
    first, second = traced.parameters()
    first.data = "Summarize briefly."
    second.data = "  "
    with pytest.raises(ValueError, match=r"classify\.predict"):
        traced.write_back()
    assert program.summarize.signature.instructions.startswith("Given the fields")


def test_trace_needs_a_dspy_module_with_something_to_optimize() -> None:
    with pytest.raises(TypeError, match=r"`program` must be a dspy\.Module"):
        trace(object())

    class Empty(dspy.Module):
        def forward(self, x: str) -> Any:
            return dspy.Prediction(y=x)

    with pytest.raises(ValueError, match="nothing to optimize"):
        trace(Empty())


def test_prediction_fields_are_named_in_errors() -> None:
    from afnio_integrations.dspy import TracedPrediction

    prediction = TracedPrediction({"a": afnio.Variable("x")}, None, [])
    with pytest.raises(AttributeError, match=r"no field 'b'.*\['a'\]"):
        _ = prediction.b


class AsyncSummarizeThenClassify(SummarizeThenClassify):
    async def aforward(self, message: str) -> Any:
        summary = (await self.summarize.acall(message=message)).summary
        return await self.classify.acall(summary=summary)


@pytest.mark.afnio_replay
def test_an_async_call_is_traced_like_a_sync_one(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(AsyncSummarizeThenClassify())
    prediction = asyncio.run(traced.acall(message=FRUSTRATED))
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    summarize, classify = traced.parameters()
    assert summarize.grad and classify.grad
