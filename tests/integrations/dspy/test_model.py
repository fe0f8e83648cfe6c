"""DSPy LMs as afnio model clients (``DSPyLM``), afnio Modules as DSPy modules
(``AfnioModule``), and the concurrency bound over a traced program's LM calls."""

from __future__ import annotations

from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

import afnio  # noqa: E402
from afnio import cognitive as cog  # noqa: E402
from afnio import functional as F  # noqa: E402
from afnio._runtime import reset_concurrency_stats  # noqa: E402
from afnio.models.model_registry import MODEL_REGISTRY  # noqa: E402
from afnio.optim import TGD  # noqa: E402
from afnio.testing import Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioModule, DSPyLM, trace  # noqa: E402
from tests.conftest import LMEndpoint  # noqa: E402
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

FRUSTRATED = "I am frustrated: the heating has been broken for a week."
RULE = 'If the message mentions "frustrated", the sentiment is negative.'


@pytest.mark.afnio_replay
def test_a_dspy_lm_as_backward_and_optimizer_client_counts_usage_and_cost(
    lm: LMEndpoint, dspy_lm: Any
) -> None:
    client = DSPyLM(make_lm(lm))
    afnio.set_backward_model_client(client)
    program = dspy.Predict("message -> sentiment")
    traced = trace(program)
    _, explanation = F.exact_match_evaluator(
        traced(message=FRUSTRATED).sentiment, "negative"
    )
    explanation.backward()
    TGD(traced.parameters(), model_client=client).step()
    traced.write_back()
    assert RULE in program.signature.instructions
    assert client.calls == 3  # evaluator backward, chat backward, optimizer
    usage = client.get_usage()
    assert usage["total_tokens"] > 0 and usage["cost"]["amount"] > 0
    assert traced.usage.calls == 1  # the program's own call
    assert traced.usage.get_usage()["cost"]["amount"] > 0


def test_dspy_lm_is_registered_for_checkpoints_and_checks_its_arguments() -> None:
    assert MODEL_REGISTRY["DSPyLM"] is DSPyLM
    with pytest.raises(TypeError, match="`lm` must be a DSPy LM"):
        DSPyLM("openai/gpt-4o")  # type: ignore[arg-type]
    client = DSPyLM(dspy.LM("openai/x", engine="litellm"))
    assert repr(client) == "DSPyLM('openai/x')"
    with pytest.raises(ValueError, match=r"messages\[0\] has role 'tool'"):
        client.chat([{"role": "tool", "content": "x"}])


class Shout(cog.Module):
    """An afnio Module with a trainable prefix (no LM call)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = cog.Parameter("Message:", role="prefix of the message")

    def forward(self, message: afnio.Variable) -> afnio.Variable:
        return self.prefix + message


class PrefixThenClassify(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prefix = AfnioModule(Shout(), outputs=("text",))
        self.classify = dspy.Predict("text -> sentiment")

    def forward(self, message: str) -> Any:
        return self.classify(text=self.prefix(message=message).text)


def test_an_afnio_module_runs_as_a_dspy_module() -> None:
    module = AfnioModule(Shout(), outputs=("text",))
    prediction = module(message="hello")
    assert isinstance(prediction, dspy.Prediction)
    assert prediction.text == "Message: hello" or prediction.text == "Message:hello"
    with pytest.raises(TypeError, match="`module` must be an afnio Module"):
        AfnioModule(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`outputs` must be a non-empty sequence"):
        AfnioModule(Shout(), outputs="text")


@pytest.mark.afnio_replay
def test_an_afnio_module_inside_a_traced_program_gets_feedback_and_trains(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    program = PrefixThenClassify()
    traced = trace(program)
    names = [n for n, _ in traced.named_parameters()]
    assert names == ["classify_instructions", "afnio_prefix.prefix"]
    prediction = traced(message=FRUSTRATED)
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    instructions, prefix = traced.parameters()
    assert instructions.grad and prefix.grad  # feedback crossed into afnio's graph


def test_a_traced_batch_keeps_every_dspy_request_under_afnios_bound() -> None:
    inputs = [{"message": f"message {k}"} for k in range(8)]
    with Simulator(latency=0.3) as sim:
        model = make_lm(sim)
        traced = trace(dspy.Predict("message -> sentiment"))
        with dspy.context(lm=model):
            afnio.set_max_concurrency(3)
            reset_concurrency_stats()
            out = traced.batch(inputs)
            assert out.sentiment.data == ["neutral"] * 8
            assert afnio.get_concurrency_stats().requests.peak == 3
            assert sim.stats.peak_in_flight == 3
            afnio.set_max_concurrency(16)
            sim.reset_stats()
            traced.batch(inputs)
            assert sim.stats.peak_in_flight == 8  # all at once under a bound of 16


def test_a_failing_sample_is_reported_not_raised_when_asked() -> None:
    class Flaky(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classify = dspy.Predict("message -> sentiment")

        def forward(self, message: str) -> Any:
            if message == "boom":
                raise RuntimeError("the program failed on this input")
            return dspy.Prediction(sentiment="neutral")

    traced = trace(Flaky())
    out = traced.batch(
        [{"message": "fine"}, {"message": "boom"}], return_exceptions=True
    )
    assert out.sentiment.data == ["neutral", ""]
    assert out.errors[0] is None and isinstance(out.errors[1], RuntimeError)
    assert out.prediction[1] is None
    with pytest.raises(RuntimeError, match="failed on this input"):
        traced.batch([{"message": "boom"}])
