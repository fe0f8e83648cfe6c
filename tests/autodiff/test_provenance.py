"""Sample provenance of textual gradients (afnio.autodiff.provenance): every feedback
text a parameter receives lists the in-batch positions of the samples it came from.

The LM tests run against the bundled simulator with random batches whose wrong
samples are known by construction (the simulator answers ``neutral`` to every
message and writes each failed sample's feedback from that sample alone)."""

from __future__ import annotations

import copy
import io
import random
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import Function
from afnio.autodiff.evaluator import ExactMatchEvaluator, LMJudgeEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.autodiff.provenance import (
    FeedbackItem,
    feedback_items,
    set_sources,
    sources_of,
)
from afnio.cognitive import Parameter
from afnio.testing import SALIENCE_LEXICON, SIMULATOR_MODEL

LABELS = ("negative", "neutral", "positive")
WORDS = [w for w in SALIENCE_LEXICON if w.isalpha()]  # words rules can name
RULE = re.compile(r'If the message mentions "([^"]+)", the sentiment is (\w+)\.')


# -- the side channel itself (no LM) --------------------------------------------------


def test_feedback_items_flatten_every_grad_and_item_in_order_with_their_sources() -> (
    None
):
    param = Parameter("Be brief.", role="system prompt")
    first = Variable(["  Say why. ", "", "Be polite."], role="feedback")
    set_sources(first, [(2,), (0,), (3, 1)], call_samples=[None, None, (1, 3)])
    second = Variable("Use bullet points.", role="feedback")  # records nothing
    param.append_grad(first)
    param.append_grad(second)
    assert feedback_items(param) == [
        FeedbackItem("Say why.", (2,), None),
        FeedbackItem("Be polite.", (1, 3), (1, 3)),
        FeedbackItem("Use bullet points.", None, None),
    ]
    assert feedback_items([first]) == feedback_items(param)[:2]


def test_set_sources_checks_one_entry_per_item_and_positions() -> None:
    grad = Variable(["a", "b"], role="feedback")
    with pytest.raises(ValueError, match="`sources` has 1 entries but `grad` has 2"):
        set_sources(grad, [(0,)])
    with pytest.raises(ValueError, match="`call_samples` has 1 entries"):
        set_sources(grad, [(0,), (1,)], call_samples=[None])
    with pytest.raises(TypeError, match=r"`sources\[1\]` must hold sample positions"):
        set_sources(grad, [(0,), (-1,)])
    with pytest.raises(TypeError, match=r"`sources\[0\]` must be a tuple"):
        set_sources(grad, ["0", (1,)])
    with pytest.raises(TypeError, match="`grad` must be a Variable"):
        set_sources("text", [(0,)])  # type: ignore[arg-type]


def test_reassigning_grad_data_drops_the_sources() -> None:
    grad = Variable(["a", "b"], role="feedback")
    set_sources(grad, [(0,), (1,)])
    grad.data = ["a", "b", "c"]  # another length: the sources no longer describe it
    assert sources_of(grad) == [None, None, None]
    same_length = Variable(["a", "b"], role="feedback")
    set_sources(same_length, [(0,), (1,)])
    same_length.data = ["x", "y"]  # same length, other texts: dropped too
    assert sources_of(same_length) == [None, None]
    grown = Variable(["a"], role="feedback")
    set_sources(grown, [(5,)])
    grown.data.append("b")  # resized in place
    assert sources_of(grown) == [None, None]


def test_sources_are_never_saved_and_deepcopy_still_works() -> None:
    param = Parameter("Be brief.", role="system prompt")
    grad = Variable(["Say why."], role="feedback")
    set_sources(grad, [(4,)])
    param.append_grad(grad)
    buf = io.BytesIO()
    afnio.save({"p": param, "g": grad}, buf)
    buf.seek(0)
    loaded = afnio.load(buf)
    assert sources_of(loaded["g"]) == [None]
    with zipfile.ZipFile(buf) as z:
        assert "sources" not in z.read("data.json").decode()
    assert copy.deepcopy(grad).data == ["Say why."]
    assert copy.deepcopy(param).data == "Be brief."
    assert feedback_items(param) == [FeedbackItem("Say why.", (4,), None)]


# -- the engine: combined, aligned and passed-on gradients (no LM) -------------------


def _tagged(texts: list[str], sources: list[tuple[int, ...] | None]) -> Variable:
    grad = Variable(texts if len(texts) != 1 else texts[0], role="feedback")
    set_sources(grad, sources)
    return grad


class _Pass(Function):
    """Identity whose backward passes a fresh copy of its feedback (records none)."""

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role=f"passed {x.role}")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return Variable(grad.data, role="feedback")


def _critic(texts: list[str], sources: list[tuple[int, ...] | None]) -> type[Function]:
    class Critic(Function):
        @staticmethod
        def forward(ctx: Any, x: Variable) -> Variable:
            return Variable("ok", role="critique")

        @staticmethod
        def backward(ctx: Any, grad: Variable) -> Variable:
            return _tagged(texts, sources)

    return Critic


def test_gradients_combined_for_one_output_keep_each_texts_sources() -> None:
    rng = random.Random(11)
    param = Parameter("Be brief.", role="system prompt")
    middle = _Pass.apply(param)
    expected: list[FeedbackItem] = []
    roots = []
    for k in range(4):
        positions = tuple(sorted(rng.sample(range(10), rng.randint(1, 3))))
        text = f"critique {k}"
        roots.append(_critic([text], [positions]).apply(middle))
        expected.append(FeedbackItem(text, positions, None))
    afnio.autodiff.backward(roots, [Variable("go")] * 4)
    # the four critiques reach `middle` together (combined), then pass to `param`
    assert feedback_items(param) == expected


def test_a_batched_combination_joins_sources_per_sample() -> None:
    param = Parameter(["a", "b", "c"], role="batch of drafts")
    middle = _Pass.apply(param)
    one = _critic(["x", "", "z"], [(0,), (1,), (2,)]).apply(middle)
    two = _critic(["y", "w", ""], [(0,), None, (2,)]).apply(middle)
    afnio.autodiff.backward([one, two], [Variable("go"), Variable("go")])
    (grad,) = param.grad
    assert grad.data == ["x\n\ny", "w", "z"]
    assert sources_of(grad) == [(0,), None, (2,)]  # one part unknown: unknown


def test_a_gradient_aligned_with_a_batch_is_about_each_sample() -> None:
    batch = Variable(["a", "b", "c"], role="messages", requires_grad=True)
    out = _Pass.apply(batch)
    out.backward(Variable(["fix a", "", "fix c"], role="feedback"))
    assert feedback_items(batch) == [
        FeedbackItem("fix a", (0,), None),
        FeedbackItem("fix c", (2,), None),
    ]


def test_a_node_passes_on_the_sources_of_its_single_incoming_text() -> None:
    param = Parameter("Be brief.", role="system prompt")
    out = _Pass.apply(_Pass.apply(param))
    out.backward(_tagged(["the reply to sample 3 is too long"], [(3,)]))
    assert feedback_items(param) == [
        FeedbackItem("the reply to sample 3 is too long", (3,), None)
    ]


def test_a_gradient_passed_by_hand_has_unknown_samples() -> None:
    param = Parameter("Be brief.", role="system prompt")
    _Pass.apply(param).backward(Variable("shorter", role="feedback"))
    assert feedback_items(param) == [FeedbackItem("shorter", None, None)]


# -- the real paths: ChatCompletion + evaluators against the simulator ----------------


@pytest.fixture
def sim_client() -> Iterator[Any]:
    from afnio.models.openai import AsyncOpenAI
    from afnio.testing import Simulator

    with (
        Simulator() as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as llm,
    ):
        afnio.set_backward_model_client(
            llm, completion_args={"model": SIMULATOR_MODEL, "temperature": 0}
        )
        yield llm


def _random_batch(seed: int) -> tuple[list[str], list[str], list[int]]:
    """Messages with distinct words and targets; the simulator answers ``neutral``,
    so the samples whose target is not ``neutral`` are the wrong ones."""
    rng = random.Random(seed)
    n = rng.randint(5, 10)
    words = rng.sample(WORDS, n)
    messages = [f"Customer {s}: it was {w}." for s, w in enumerate(words)]
    wrong = sorted(rng.sample(range(n), rng.randint(2, n - 1)))
    targets = [
        rng.choice(["negative", "positive"]) if s in wrong else "neutral"
        for s in range(n)
    ]
    return messages, targets, wrong


def _classify(llm: Any, messages: list[str]) -> tuple[Parameter, Variable]:
    system = Parameter(
        "Classify the sentiment of the customer message as positive, neutral or "
        "negative.",
        role="system prompt",
    )
    template = Variable("Customer message: {message}", role="user template")
    reply = ChatCompletion.apply(
        llm,
        [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [template]},
        ],
        inputs={"message": messages},
        model=SIMULATOR_MODEL,
    )
    return system, reply


def _check_rules(
    items: list[FeedbackItem], messages: list[str], targets: list[str], wrong: list[int]
) -> None:
    """Each text is about exactly one wrong sample, every wrong sample has one, and
    the text itself was written from that sample (its word, its target)."""
    assert sorted(s for item in items for s in item.samples) == wrong
    assert all(len(item.samples) == 1 for item in items)
    for item in items:
        (s,) = item.samples
        match = RULE.fullmatch(item.text)
        assert match, item.text
        assert match.group(1) in messages[s]
        assert match.group(2) == targets[s]


@pytest.mark.parametrize("per_call", [1, 3])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_system_prompt_feedback_lists_the_wrong_samples_it_came_from(
    sim_client: Any, seed: int, per_call: int
) -> None:
    messages, targets, wrong = _random_batch(seed)
    system, reply = _classify(sim_client, messages)
    reply.retain_grad()
    _, explanation = ExactMatchEvaluator.apply(
        reply, targets, samples_per_call=per_call
    )
    explanation.backward()
    _check_rules(feedback_items(system), messages, targets, wrong)
    # the prediction's feedback: one text per wrong sample, and the group of the
    # evaluator call that wrote it when that call covered several samples
    items = feedback_items(reply.grad)
    assert [item.samples for item in items] == [(s,) for s in wrong]
    groups = [tuple(wrong[i : i + per_call]) for i in range(0, len(wrong), per_call)]
    for item in items:
        group = next(g for g in groups if item.samples[0] in g)
        assert item.call_samples == (group if len(group) > 1 else None)
        (s,) = item.samples
        assert f'expected value is "{targets[s]}"' in item.text


@pytest.mark.parametrize("per_call", [1, 3])
def test_lm_judge_feedback_lists_the_wrong_samples_and_their_call_group(
    sim_client: Any, per_call: int
) -> None:
    messages, targets, wrong = _random_batch(7)
    system, reply = _classify(sim_client, messages)
    judge_messages = [
        {
            "role": "system",
            "content": [Variable("Judge the sentiment label.", role="evaluation task")],
        },
        {
            "role": "user",
            "content": [
                Variable(
                    "<PREDICTION>{prediction}</PREDICTION><TARGET>{target}</TARGET>",
                    role="user query",
                )
            ],
        },
    ]
    reply.retain_grad()
    _, explanation = LMJudgeEvaluator.apply(
        sim_client,
        judge_messages,
        reply,
        targets,
        samples_per_call=per_call,
        model=SIMULATOR_MODEL,
    )
    explanation.backward()
    _check_rules(feedback_items(system), messages, targets, wrong)
    items = feedback_items(reply.grad)
    assert [item.samples for item in items] == [(s,) for s in wrong]
    if per_call == 3:
        assert [item.call_samples for item in items] == [
            tuple(wrong[(i // 3) * 3 : (i // 3) * 3 + 3])
            if len(wrong[(i // 3) * 3 : (i // 3) * 3 + 3]) > 1
            else None
            for i in range(len(wrong))
        ]
    else:
        assert all(item.call_samples is None for item in items)


def test_feedback_from_two_batches_keeps_each_batchs_positions(
    sim_client: Any,
) -> None:
    """Two backward passes append two gradients; each keeps its own positions."""
    messages, targets, wrong = _random_batch(4)
    system, reply = _classify(sim_client, messages)
    ExactMatchEvaluator.apply(reply, targets)[1].backward()
    first = feedback_items(system)
    half = len(messages) // 2
    reply2 = ChatCompletion.apply(
        sim_client,
        [
            {"role": "system", "content": [system]},
            {
                "role": "user",
                "content": [Variable("Customer message: {message}", role="template")],
            },
        ],
        inputs={"message": messages[half:]},
        model=SIMULATOR_MODEL,
    )
    ExactMatchEvaluator.apply(reply2, targets[half:])[1].backward()
    second = feedback_items(system)[len(first) :]
    _check_rules(first, messages, targets, wrong)
    _check_rules(
        second, messages[half:], targets[half:], [s - half for s in wrong if s >= half]
    )


def test_a_traced_langchain_batch_gives_each_feedback_its_sample() -> None:
    """The integrations' path: per-sample recorded calls stacked into a batch."""
    pytest.importorskip("langchain_openai", reason="needs the langchain test extra")
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from afnio_integrations.langchain import trace
    from benchmarks.common import simulated
    from tests.integrations.langchain._chains import sim_chat

    messages, targets, wrong = _random_batch(5)
    with simulated() as (sim, _):
        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", "Classify the sentiment of the message."),
                ("human", "{message}"),
            ]
        )
        traced = trace(prompt | sim_chat(sim) | StrOutputParser())
        out = traced.batch([{"message": m} for m in messages])
        _, explanation = ExactMatchEvaluator.apply(out, targets, samples_per_call=3)
        explanation.backward()
    (param,) = traced.parameters()
    _check_rules(feedback_items(param), messages, targets, wrong)


def test_feedback_records_the_basis_its_positions_are_numbered_in(
    sim_client: Any,
) -> None:
    """The chat's feedback is numbered in its own (here: reordered) inputs; its
    basis maps it back to the batch it was taken from, the evaluator's feedback
    on repeated targets maps only when it is the batch's own target list."""
    from afnio.autodiff.provenance import basis_of, match_positions

    messages, targets, _ = _random_batch(4)
    order = list(reversed(range(len(messages))))
    scored = [messages[i] for i in order]  # the step scores a reordered batch
    scored_targets = [targets[i] for i in order]
    system, reply = _classify(sim_client, scored)
    reply.retain_grad()
    _, explanation = ExactMatchEvaluator.apply(reply, scored_targets)
    explanation.backward()
    columns = basis_of(messages, targets)
    items = feedback_items(system)
    assert items
    for item in items:
        (s,) = item.samples
        assert match_positions(item.samples, item.basis, columns) == [order[s]]
    for item in feedback_items(reply.grad):  # numbered in repeated labels only
        assert match_positions(item.samples, item.basis, columns) is None
