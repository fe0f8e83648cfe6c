"""The DSPy tracer's links by value (see ``afnio_integrations/dspy/_tracing.py``): a
program output, or a predictor input, equal to several predictions is linked to all of
them, one composed of several predictions to each, and the links (set and order) never
depend on which call finished first.

The programs are written as DSPy's docs write them; the uneven latency of
``dspy.Parallel`` and ``asyncio.gather`` calls comes from two live simulators, a fast
and a slow one, each member predictor talking to one of them.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to a live simulator without closing them; the
# garbage collector may report them while the test runs (see conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

from dspy.utils.callback import ACTIVE_CALL_ID  # noqa: E402

import afnio  # noqa: E402
from afnio import cognitive as cog  # noqa: E402
from afnio import functional as F  # noqa: E402
from afnio.optim import TGD  # noqa: E402
from afnio.testing import SIMULATOR_MODEL, Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioModule, TracedProgram, trace  # noqa: E402
from afnio_integrations.dspy._tracing import CallCollector, PredictorSlot  # noqa: E402
from tests.conftest import DUMMY_KEY, LMEndpoint  # noqa: E402
from tests.integrations.dspy.conftest import make_lm  # noqa: E402

COMPLAINT = "The heater is terrible. The lift is awful. Please fix them."
TERRIBLE = 'If the message mentions "terrible", the sentiment is negative.'
SLOW = 0.4  # seconds the slow simulator waits before each answer


def sentences_of(message: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", message.strip()) if s]


def majority(labels: Sequence[str]) -> str:
    """The most common label (the first one seen among equally common ones)."""
    return Counter(labels).most_common(1)[0][0]


class MajorityLabel(dspy.Module):
    """Classify each sentence of a message; the message's label is the majority."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict("sentence -> sentiment")

    def forward(self, message: str) -> dspy.Prediction:
        labels = [self.classify(sentence=s).sentiment for s in sentences_of(message)]
        return dspy.Prediction(sentiment=majority(labels))


class MajorityThenEscalate(MajorityLabel):
    """The majority label feeds a second predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.escalate = dspy.Predict("sentiment -> escalate: bool")

    def forward(self, message: str) -> dspy.Prediction:
        label = super().forward(message=message).sentiment
        return self.escalate(sentiment=label)


class LabelsThenSummary(MajorityLabel):
    """Every sentence's label, joined, feeds a second predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("labels -> summary")

    def forward(self, message: str) -> dspy.Prediction:
        labels = [self.classify(sentence=s).sentiment for s in sentences_of(message)]
        return self.summarize(labels="; ".join(labels))


class Ensemble(dspy.Module):
    """Three predictors vote on the message in parallel (``dspy.Parallel``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("message -> sentiment")
        self.second = dspy.Predict("message -> sentiment")
        self.third = dspy.Predict("message -> sentiment")
        self.parallel = dspy.Parallel(num_threads=3, disable_progress_bar=True)

    def members(self) -> list[Any]:
        return [self.first, self.second, self.third]

    def forward(self, message: str) -> dspy.Prediction:
        pairs = [(member, {"message": message}) for member in self.members()]
        labels = [p.sentiment for p in self.parallel(pairs)]
        label = majority(labels)
        return dspy.Prediction(
            sentiment=label, agreement=f"{labels.count(label)}/{len(labels)}"
        )


class AsyncEnsemble(Ensemble):
    """The same vote, the members called concurrently with ``asyncio.gather``."""

    async def aforward(self, message: str) -> dspy.Prediction:
        calls = (member.acall(message=message) for member in self.members())
        labels = [p.sentiment for p in await asyncio.gather(*calls)]
        label = majority(labels)
        return dspy.Prediction(
            sentiment=label, agreement=f"{labels.count(label)}/{len(labels)}"
        )


# -- helpers -----------------------------------------------------------------------


def _feedback(param: Any) -> list[str]:
    """Every feedback text a Parameter received (its gradients may hold lists)."""
    return [
        t
        for g in param.grad
        for t in (g.data if isinstance(g.data, list) else [g.data])
    ]


def _recorded_call(node: Any) -> Any:
    """The nearest recorded LM call behind a graph node (breadth first)."""
    queue, seen = [node], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if hasattr(current, "conversation"):
            return current
        queue.extend(e.node for e in getattr(current, "next_functions", ()))
    return None


def _call_label(call: Any) -> str:
    """``<predictor name>: <input values>`` for a recorded DSPy call."""
    name = call.output_role.removeprefix("response of the LM of DSPy predictor ")
    user = call.conversation[-1]["content"]
    values = re.findall(r"\[\[ ## \w+ ## \]\]\n(.*)", user)
    return f"{name}: {' | '.join(values)}"


def linked_calls(var: Any) -> list[str]:
    """The recorded calls a program output is linked to, in link order (one per
    source: the output itself when it is a single prediction's field)."""
    node = var.grad_fn
    if node is None:
        return []
    if getattr(node, "step", None) == "program output":
        return [_call_label(_recorded_call(e.node)) for e in node.next_functions]
    return [_call_label(_recorded_call(node))]


def input_links(call: Any) -> list[str]:
    """The recorded calls linked to the inputs of a recorded call, in link order."""
    return [
        _call_label(_recorded_call(e.node))
        for e, location in zip(
            call.next_functions[-len(call.locations) :], call.locations, strict=True
        )
        if location.startswith("input:")
    ]


@pytest.fixture
def fast() -> Iterator[Simulator]:
    with Simulator() as sim:
        yield sim


@pytest.fixture
def slow() -> Iterator[Simulator]:
    with Simulator(latency=SLOW) as sim:
        yield sim


@pytest.fixture
def sim_backward(fast: Simulator) -> Iterator[LMEndpoint]:
    """The fast simulator, also the backward model (and the optimizer's model)."""
    endpoint = LMEndpoint(fast.base_url, DUMMY_KEY, fast)
    afnio.set_backward_model_client(
        endpoint.client(),
        completion_args={"model": SIMULATOR_MODEL, "temperature": 0},
    )
    yield endpoint
    endpoint.close()


# -- a predictor called in a loop --------------------------------------------------


@pytest.mark.afnio_replay
def test_a_majority_vote_sends_feedback_to_every_prediction_equal_to_it(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(MajorityLabel())
    prediction = traced(message=COMPLAINT)
    assert prediction.sentiment.data == "neutral"  # three "neutral" votes
    assert linked_calls(prediction.sentiment) == [
        f"classify: {s}" for s in sentences_of(COMPLAINT)
    ]
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    (param,) = traced.parameters()
    feedback = _feedback(param)
    assert len(feedback) == 3  # one backward pass per call, in call order
    assert TERRIBLE in feedback[0]  # the call that saw "terrible"
    assert 'If the message mentions "awful"' in feedback[1]
    assert 'should lead to "negative"' in feedback[2]  # "Please fix them."


@pytest.mark.afnio_replay
def test_a_predictor_input_equal_to_several_predictions_is_linked_to_all(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(MajorityThenEscalate())
    prediction = traced(message=COMPLAINT)
    assert prediction.escalate.data == "False"
    escalate = _recorded_call(prediction.escalate.grad_fn)
    assert input_links(escalate) == [f"classify: {s}" for s in sentences_of(COMPLAINT)]
    _, explanation = F.exact_match_evaluator(prediction.escalate, "True")
    explanation.backward()
    classify, escalate_instructions = traced.parameters()
    assert escalate_instructions.grad
    assert len(_feedback(classify)) == 3  # through the second call, to every vote


@pytest.mark.afnio_replay
def test_a_predictor_input_composed_of_several_predictions_is_linked_to_each(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(LabelsThenSummary())
    prediction = traced(message="The heater is terrible. Please fix it.")
    assert prediction.summary.data == "neutral; neutral"
    summary = _recorded_call(prediction.summary.grad_fn)
    assert input_links(summary) == [
        "classify: The heater is terrible.",
        "classify: Please fix it.",
    ]


def test_free_text_that_holds_a_predicted_word_is_not_linked() -> None:
    """A predictor input is composed of predictions only when they make it up: a
    message that happens to hold a label word is not linked to that label."""
    classify = dspy.Predict("message -> sentiment")
    summarize = dspy.Predict("labels -> summary")
    slots = {
        id(p): PredictorSlot(name, p, afnio.Variable(name, requires_grad=True))
        for name, p in (("classify", classify), ("summarize", summarize))
    }
    collector = CallCollector(slots)

    def call(call_id: str, predictor: Any, text: str, **outputs: str) -> list[str]:
        collector.on_module_start(call_id, predictor, {"kwargs": {"text": text}})
        collector.on_module_end(call_id, dspy.Prediction(**outputs))
        (completion,) = collector.frontier()[-1:]
        return [loc for loc in completion.grad_fn.locations if loc.startswith("input:")]

    assert call("a", classify, "The lift is slow.", sentiment="neutral") == []
    assert call("b", classify, "It is terrible.", sentiment="negative") == []
    # free text holding "neutral": not made of predictions
    assert call("c", classify, "I feel neutral about it.", sentiment="neutral") == []
    made_of = '["neutral", "negative", "neutral"]'  # a list of the votes, as JSON
    assert call("d", summarize, made_of, summary="mixed") == ["input:text"] * 3


class FeelThenClassify(dspy.Module):
    """Two stages that both answer "neutral" here."""

    def __init__(self) -> None:
        super().__init__()
        self.feel = dspy.Predict(
            dspy.Signature(
                "message -> feeling",
                'If the message mentions "frustrated", the feeling is unhappy.',
            )
        )
        self.classify = dspy.Predict("feeling -> sentiment")

    def forward(self, message: str) -> dspy.Prediction:
        return self.classify(feeling=self.feel(message=message).feeling)


@pytest.mark.afnio_replay
def test_an_equal_prediction_upstream_of_another_is_left_out(dspy_lm: Any) -> None:
    traced = trace(FeelThenClassify())
    prediction = traced(message="The lift is slow.")
    assert prediction.sentiment.data == "neutral"
    # the output is the second stage's field, not joined with the first stage's,
    # equal to it but upstream of it
    assert linked_calls(prediction.sentiment) == ["classify: neutral"]
    assert prediction.sentiment.grad_fn.step == "parse of the `sentiment` field"
    classify = _recorded_call(prediction.sentiment.grad_fn)
    assert input_links(classify) == ["feel: The lift is slow."]


class Prefix(cog.Module):
    """An afnio Module with a trainable prefix (no LM call)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = cog.Parameter("Label:", role="prefix of the label")

    def forward(self, label: afnio.Variable) -> afnio.Variable:
        return self.prefix + label


class MajorityThenPrefix(MajorityLabel):
    """The majority label goes through an afnio module."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = AfnioModule(Prefix(), outputs=("text",))

    def forward(self, message: str) -> dspy.Prediction:
        return self.prefix(label=super().forward(message=message).sentiment)


@pytest.mark.afnio_replay
def test_an_afnio_module_input_equal_to_several_predictions_is_linked_to_all(
    backward_lm: LMEndpoint, dspy_lm: Any
) -> None:
    traced = trace(MajorityThenPrefix())
    prediction = traced(message=COMPLAINT)
    assert prediction.text.data.endswith("neutral")
    _, explanation = F.exact_match_evaluator(prediction.text, "Label: negative")
    explanation.backward()
    classify, prefix = traced.parameters()
    assert prefix.grad
    assert len(_feedback(classify)) == 3  # the joined input fed back to every vote


def _train(traced: TracedProgram, endpoint: LMEndpoint, epochs: int) -> None:
    optimizer = TGD(
        traced.parameters(), model_client=endpoint.client(), model=SIMULATOR_MODEL
    )
    for _ in range(epochs):
        optimizer.zero_grad()
        for message in TRAIN:
            prediction = traced(message=message)
            _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
            explanation.backward()
        optimizer.step()


CUES = ("awful", "poor", "terrible", "unacceptable", "upset")
TRAIN = [  # every complaint has two cue words; the last sentence never has one
    "The heater is terrible. The lift is awful. Please fix them.",
    "The food was poor. The manager was upset. Nobody called back.",
    "The noise is unacceptable. The carpet is awful. Please send someone.",
]
HELD_OUT = [  # (message, label): new pairs of the cue words
    ("The shower is terrible. The towels are poor. Thanks.", "negative"),
    ("My neighbour is upset. The corridor is unacceptable. Please reply.", "negative"),
    ("The wifi is awful. The desk is terrible. See you.", "negative"),
    ("The parking is poor. The guard was upset. Regards.", "negative"),
    ("The lobby is clean. The lift works. Thanks.", "neutral"),
    ("The room is quiet. The view is nice. Bye.", "neutral"),
]


def test_a_majority_vote_learns_every_cue_word_of_its_complaints(
    fast: Simulator, sim_backward: LMEndpoint
) -> None:
    """Only the last sentence's call got feedback before the fix: no cue word was
    learned (held-out 33.3% -> 33.3%); now every vote equal to the output gets it:
    all five are (33.3% -> 100%)."""
    with dspy.context(lm=make_lm(fast)):
        traced = trace(MajorityLabel())

        def accuracy() -> float:
            hits = [
                traced.program(message=m).sentiment == label for m, label in HELD_OUT
            ]
            return sum(hits) / len(hits)

        before = accuracy()
        _train(traced, sim_backward, epochs=2)
        after = accuracy()
    instructions = traced.instructions()["classify"]
    rules = [f'mentions "{w}", the sentiment is negative' for w in CUES]
    learned = [w for w, rule in zip(CUES, rules, strict=True) if rule in instructions]
    print(
        f"cue words learned {len(learned)}/{len(CUES)}; held-out {before:.1%} -> "
        f"{after:.1%}"
    )
    assert learned == list(CUES)
    assert before == pytest.approx(2 / 6) and after == 1.0


# -- concurrent calls --------------------------------------------------------------


def _ensemble_links(
    program: Ensemble, fast: Simulator, slow: Simulator, slow_member: int
) -> dict[str, Any]:
    """Run the ensemble with one member slow; what its outputs were linked to and
    which members got feedback."""
    for k, member in enumerate(program.members()):
        member.set_lm(make_lm(slow if k == slow_member else fast))
    traced = trace(program)
    with dspy.context(lm=make_lm(fast)):
        if isinstance(program, AsyncEnsemble):
            prediction = asyncio.run(traced.acall(message=COMPLAINT))
        else:
            prediction = traced(message=COMPLAINT)
    _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
    explanation.backward()
    return {
        "sentiment": prediction.sentiment.data,
        "agreement": prediction.agreement.data,
        "sentiment links": linked_calls(prediction.sentiment),
        "agreement links": linked_calls(prediction.agreement),
        "feedback": {
            name: _feedback(param)
            for name, param in traced.named_parameters()
            if param.grad
        },
    }


@pytest.mark.parametrize("program_type", [Ensemble, AsyncEnsemble])
def test_an_ensemble_links_the_same_predictions_whichever_call_finishes_last(
    program_type: type[Ensemble],
    fast: Simulator,
    slow: Simulator,
    sim_backward: LMEndpoint,
) -> None:
    runs = []
    for slow_member in (0, 1, 2):
        program = program_type()
        program.first.signature = program.first.signature.with_instructions(TERRIBLE)
        runs.append(_ensemble_links(program, fast, slow, slow_member))
    first = runs[0]
    for slow_member, run in enumerate(runs):
        assert run == first, f"member {slow_member} slow: other links or feedback"
    assert first["sentiment"] == "neutral" and first["agreement"] == "2/3"
    # both "neutral" votes, in the program's order, never the "negative" one
    assert first["sentiment links"] == [
        f"second: {COMPLAINT}",
        f"third: {COMPLAINT}",
    ]
    # computed from the votes by code: every member may have contributed
    assert first["agreement links"] == [
        f"{name}: {COMPLAINT}" for name in ("first", "second", "third")
    ]
    assert sorted(first["feedback"]) == ["second_instructions", "third_instructions"]


def test_calls_started_on_other_threads_are_ordered_by_content_not_by_start() -> None:
    """dspy.Parallel's workers start in an order that is up to the thread scheduler:
    the links do not follow it (nor the order the calls end in)."""
    first = dspy.Predict("message -> sentiment")
    second = dspy.Predict("message -> sentiment")
    slots = {
        id(p): PredictorSlot(name, p, afnio.Variable(name, requires_grad=True))
        for name, p in (("first", first), ("second", second))
    }
    # (predictor, message) of each call
    calls = [(first, "m0"), (second, "m0"), (first, "m1"), (second, "m1")]

    def links(order: Sequence[int]) -> list[str]:
        collector = CallCollector(slots, positions={id(first): 1, id(second): 2})
        collector.on_module_start("program", object(), {"kwargs": {}})

        def start(k: int) -> None:  # a worker thread of the program's call
            token = ACTIVE_CALL_ID.set("program")
            try:
                predictor, message = calls[k]
                inputs = {"kwargs": {"message": message}}
                collector.on_module_start(f"call{k}", predictor, inputs)
            finally:
                ACTIVE_CALL_ID.reset(token)

        for k in order:  # one thread each, started in this order
            worker = threading.Thread(target=start, args=(k,))
            worker.start()
            worker.join()
        for k in reversed(order):
            collector.on_module_end(f"call{k}", dspy.Prediction(sentiment="neutral"))
        return [
            var.role.removeprefix("`sentiment` field predicted by DSPy predictor ")
            + " "
            + _recorded_call(var.grad_fn).conversation[0]["content"]
            for var in collector.find("neutral")
        ]

    expected = links([0, 1, 2, 3])
    assert expected == [
        'first {"message": "m0"}',
        'first {"message": "m1"}',
        'second {"message": "m0"}',
        'second {"message": "m1"}',
    ]
    assert links([3, 2, 1, 0]) == expected
    assert links([1, 3, 0, 2]) == expected


class FirstThenParallel(dspy.Module):
    """A first call, then three calls in ``dspy.Parallel`` on fewer threads than
    calls; the third takes the first call's label ("neutral" here, as the two
    others answer)."""

    def __init__(self, threads: int = 2) -> None:
        super().__init__()
        self.first = dspy.Predict(dspy.Signature("message -> sentiment", "[mkfirst]"))
        self.pa = dspy.Predict(dspy.Signature("message -> sentiment", "[mkpa]"))
        self.pb = dspy.Predict(dspy.Signature("message -> sentiment", "[mkpb]"))
        self.pc = dspy.Predict(
            dspy.Signature("message, previous -> escalate: bool", "[mkpc]")
        )
        self.parallel = dspy.Parallel(num_threads=threads, disable_progress_bar=True)

    def forward(self, message: str) -> dspy.Prediction:
        previous = self.first(message=message).sentiment
        pairs = [
            (self.pa, {"message": message}),
            (self.pb, {"message": message}),
            (self.pc, {"message": message, "previous": previous}),
        ]
        _, _, c = self.parallel(pairs)
        return c


def _first_then_parallel(
    fast: Simulator, slow_marker: str, threads: int
) -> dict[str, Any]:
    """Run :class:`FirstThenParallel` with the calls of one member slow: what PC's
    input was linked to and which predictors got feedback."""
    fast.clear_delays()
    fast.delay_when(slow_marker, SLOW)
    traced = trace(FirstThenParallel(threads))
    with dspy.context(lm=make_lm(fast)):
        prediction = traced(message="The lift is slow.")
    fast.clear_delays()
    assert prediction.escalate.data == "False"
    pc = _recorded_call(prediction.escalate.grad_fn)
    _, explanation = F.exact_match_evaluator(prediction.escalate, "True")
    explanation.backward()
    return {
        "pc input links": input_links(pc),
        "feedback": sorted(
            name for name, param in traced.named_parameters() if param.grad
        ),
    }


@pytest.mark.parametrize("threads", [2, 1])
def test_a_parallel_call_is_never_linked_to_a_sibling_whichever_finishes_first(
    threads: int, fast: Simulator, sim_backward: LMEndpoint
) -> None:
    """PC's ``previous`` input equals the output of FIRST, PA and PB ("neutral"), but
    only FIRST can have fed it: PA and PB ran beside it in the same ``dspy.Parallel``
    block (PC started when one of them had finished, on the freed thread; on one
    thread DSPy runs the members in turn on the program's own thread)."""
    runs = {
        marker: _first_then_parallel(fast, marker, threads)
        for marker in ("mkpa", "mkpb")
    }
    assert runs["mkpa"] == runs["mkpb"]
    assert runs["mkpa"] == {
        "pc input links": ["first: The lift is slow."],
        "feedback": ["first_instructions", "pc_instructions"],
    }


class FirstThenParallelModule(FirstThenParallel):
    """:class:`FirstThenParallel` whose third member is an afnio module taking the
    first call's label."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = AfnioModule(Prefix(), outputs=("text",))

    def forward(self, message: str) -> dspy.Prediction:
        previous = self.first(message=message).sentiment
        pairs = [
            (self.pa, {"message": message}),
            (self.pb, {"message": message}),
            (self.prefix, {"label": previous}),
        ]
        _, _, text = self.parallel(pairs)
        return text


def test_an_afnio_module_in_a_parallel_block_is_never_linked_to_a_sibling(
    fast: Simulator, sim_backward: LMEndpoint
) -> None:
    """The afnio module's input equals FIRST's, PA's and PB's output; it is linked to
    FIRST alone, whichever of PA and PB finished before it started."""
    feedback = []
    for marker in ("mkpa", "mkpb"):
        fast.clear_delays()
        fast.delay_when(marker, SLOW)
        traced = trace(FirstThenParallelModule())
        with dspy.context(lm=make_lm(fast)):
            prediction = traced(message="The lift is slow.")
        fast.clear_delays()
        assert prediction.text.data == "Label:neutral"
        _, explanation = F.exact_match_evaluator(prediction.text, "Label: negative")
        explanation.backward()
        feedback.append(
            sorted(name for name, param in traced.named_parameters() if param.grad)
        )
    assert feedback == [["afnio_prefix.prefix", "first_instructions"]] * 2


class RuntimePredictor(dspy.Module):
    """Creates a predictor inside ``forward``: not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict("message -> sentiment")

    def forward(self, message: str) -> dspy.Prediction:
        label = self.classify(message=message).sentiment
        explain = dspy.Predict(dspy.Signature("sentiment -> escalate: bool", "[mkrt]"))
        return explain(sentiment=label)


def test_a_predictor_created_at_run_time_is_warned_about_once(
    fast: Simulator, sim_backward: LMEndpoint
) -> None:
    """It has no Parameter: one AfnioTracingWarning per traced program names it and
    says how to make it traceable; feedback still flows through its calls."""
    from afnio_integrations.dspy import AfnioTracingWarning

    traced = trace(RuntimePredictor())
    assert traced.predictor_names == ["classify"]
    with dspy.context(lm=make_lm(fast)):
        with pytest.warns(AfnioTracingWarning) as caught:
            first = traced(message="The lift is slow.")
            traced(message="The heater is broken.")
            traced.batch([{"message": "Hi."}, {"message": "Bye."}])
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "Predict(sentiment -> escalate)" in message and "[mkrt]" in message
        assert "__init__" in message
        assert caught[0].filename == __file__
        with pytest.warns(AfnioTracingWarning):  # another traced program: warned
            trace(RuntimePredictor())(message="Hi.")
    _, explanation = F.exact_match_evaluator(first.escalate, "True")
    explanation.backward()
    (classify,) = traced.parameters()
    assert classify.grad  # through the untraced call's input
