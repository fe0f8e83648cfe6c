"""Grouped chat backward (issue 23): with ``chat_samples_per_call = n > 1`` the
chat-backward calls of samples that went through the same prompt template share
calls (at most n per call, one round), across the nodes of a pass, deterministically,
and every sample keeps its own feedback."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_gradients,
    chat_backward_group_user,
    chat_backward_user,
    split_evenly,
    template_key,
)
from afnio.autodiff.lm_ops import OUTPUT_ROLE, ChatCompletion
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_GROUP_SYSTEM,
    CHAT_BACKWARD_SYSTEM,
)
from afnio.autodiff.provenance import sources_of
from afnio.errors import GradientCountError
from afnio.models.model import ChatCompletionModel
from afnio.testing import SALIENCE_LEXICON, SIMULATOR_MODEL, Fault, Simulator
from afnio_integrations._recorded import RecordedChatCall, StackSamples

LONG_SYSTEM = (
    "Classify the customer message. Answer with one label only, in lowercase, "
    "and nothing else: no explanation, no punctuation."
)
_LEFT_OUT = frozenset(
    # other forms of a word kept (no two of one family)...
    {"disappointing", "frustrating", "frustration", "unsatisfactory"}
    # ...and three words these messages leave out
    | {"great", "love", "top-notch"}
)
WORDS = [w for w in SALIENCE_LEXICON if w not in _LEFT_OUT]
"""The words of the simulator's salience lexicon the messages use, one per sample."""


@pytest.fixture
def sim() -> Iterator[Simulator]:
    from afnio.models.openai import AsyncOpenAI

    with (
        Simulator() as simulator,
        AsyncOpenAI(base_url=simulator.base_url, api_key="sk-test", max_retries=0) as c,
    ):
        afnio.set_backward_model_client(c, completion_args={"model": SIMULATOR_MODEL})
        simulator.client = c  # type: ignore[attr-defined]
        yield simulator


def _user(body: dict[str, Any]) -> str:
    return body["messages"][1]["content"]


def _system(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"]


def _classify(
    client: Any, messages_in: list[str], system: Variable | None = None
) -> tuple[Variable, Variable]:
    system = system or Variable(LONG_SYSTEM, role="system prompt", requires_grad=True)
    template = Variable("Customer message: {message}", role="user template")
    reply = ChatCompletion.apply(
        client,
        [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [template]},
        ],
        inputs={"message": messages_in},
        model=SIMULATOR_MODEL,
    )
    return system, reply


# -- units ---------------------------------------------------------------------------


def test_split_evenly_makes_ceil_n_over_k_groups_as_equal_as_possible() -> None:
    assert split_evenly(19, 8) == [7, 6, 6]
    assert split_evenly(16, 8) == [8, 8]
    assert split_evenly(9, 8) == [5, 4]
    assert split_evenly(1, 8) == [1]
    assert split_evenly(0, 8) == []
    assert split_evenly(5, 1) == [1] * 5
    for n in range(40):
        for k in range(1, 10):
            sizes = split_evenly(n, k)
            assert sum(sizes) == n and len(sizes) == -(-n // k)
            assert all(1 <= s <= k for s in sizes)
            assert sizes == sorted(sizes, reverse=True)
            assert not sizes or sizes[0] - sizes[-1] <= 1
    with pytest.raises(ValueError, match="`per_call` must be >= 1"):
        split_evenly(3, 0)


def test_template_key_identifies_a_trainable_leaf_by_identity_only() -> None:
    p = Variable("x", role="system prompt", requires_grad=True)
    q = Variable("x", role="system prompt", requires_grad=True)
    data = Variable("y", role="input")
    assert template_key("out", [(p, "system")]) == template_key("out", [(p, "system")])
    assert template_key("out", [(p, "system")]) != template_key("out", [(q, "system")])
    assert template_key("out", [(p, "system")]) != template_key("out", [(p, "user")])
    assert template_key("out", [(p, "system")]) != template_key("o2", [(p, "system")])
    other = Variable("z", role="input")
    assert template_key("o", [(data, "input:m")]) == template_key(
        "o", [(other, "input:m")]
    )


def _item(user_text: str, value: str, feedback: str, output: str) -> ChatBackwardItem:
    conversation = [
        {"role": "system", "content": LONG_SYSTEM},
        {"role": "user", "content": user_text},
    ]
    infos = [
        VariableInfo("system prompt", "system", True, LONG_SYSTEM),
        VariableInfo("message", "input:message", False, value),
    ]
    return ChatBackwardItem(conversation, "reply", output, feedback, infos, "k")


def test_the_group_prompt_shows_shared_messages_and_variables_once() -> None:
    items = [
        _item("Msg: I am upset about it all", "I am upset about it all", "fb0", "o0"),
        _item("Msg: tiny", "tiny", "fb1", "o1"),
    ]
    text = chat_backward_group_user(items)
    assert text.count(LONG_SYSTEM) == 1  # once, in <SHARED_MESSAGES>
    assert ('<MESSAGE index="1" role="system">' + LONG_SYSTEM + "</MESSAGE>") in text
    assert text.count('<MESSAGE role="system" shared="1"></MESSAGE>') == 2
    assert (
        '<VARIABLE index="1" role="system prompt" location="system" '
        'trainable="true">(the whole content of shared <MESSAGE> 1, role "system")'
        "</VARIABLE>"
    ) in text
    assert (
        '<VARIABLE index="2" role="message" location="input:message" '
        'trainable="false">(differs per call: see each <LM_CALL>\'s '
        '<VALUE variable="2">)</VARIABLE>'
    ) in text
    assert '<VALUE variable="2">I am upset about it all</VALUE>' in text
    assert '<VALUE variable="2">tiny</VALUE>' in text
    assert text.startswith('<SHARED_MESSAGES count="1">')
    assert '<LM_CALLS count="2">' in text
    assert text.endswith(
        "Return exactly 4 feedback strings: 2 per call, for 2 calls, in order."
    )
    for i in range(2):
        assert f"<FEEDBACK_ON_OUTPUT>fb{i}</FEEDBACK_ON_OUTPUT>" in text
        assert f'<LM_OUTPUT role="reply">o{i}</LM_OUTPUT>' in text


def test_a_value_that_is_a_whole_message_of_its_call_points_at_it() -> None:
    long_value = "A long per-call system prompt that differs between the calls, #"
    items = []
    for i in range(2):
        conversation = [
            {"role": "system", "content": long_value + str(i)},
            {"role": "user", "content": "same user text"},
        ]
        infos = [VariableInfo("prompt", "system", False, long_value + str(i))]
        items.append(ChatBackwardItem(conversation, "r", "o", "f", infos, "k"))
    text = chat_backward_group_user(items)
    assert text.count(long_value) == 2  # each call's own message, never repeated
    assert (
        '<VALUE variable="1">(the whole content of this call\'s <MESSAGE> 1, role '
        '"system")</VALUE>'
    ) in text
    # the user message is shared (same position, role and content in both calls)
    assert '<MESSAGE index="2" role="user">same user text</MESSAGE>' in text


def test_the_group_prompt_needs_two_items_of_one_template() -> None:
    item = _item("u", "v", "f", "o")
    with pytest.raises(ValueError, match="at least two items"):
        chat_backward_group_user([item])
    other = ChatBackwardItem([], "r", "o", "f", [], "k")
    with pytest.raises(ValueError, match="same variables"):
        chat_backward_group_user([item, other])


# -- through the simulator -----------------------------------------------------------


@pytest.mark.parametrize(("failed", "per_call"), [(19, 8), (16, 8), (5, 2), (3, 8)])
def test_grouped_calls_number_ceil_failed_over_n_in_one_round(
    sim: Simulator, failed: int, per_call: int
) -> None:
    messages_in = [f"Message {i}: I am {WORDS[i]}." for i in range(failed)] + [
        "Message ok: fine."
    ]
    targets = [f"label{i}" for i in range(failed)] + ["neutral"]
    system, reply = _classify(sim.client, messages_in)
    _, explanation = ExactMatchEvaluator.apply(reply, targets, feedback_mode="direct")
    sim.latency = 0.2
    sim.reset_stats()
    with afnio.backward_options(chat_samples_per_call=per_call):
        explanation.backward()
    bodies = sim.requests
    expected = split_evenly(failed, per_call)
    assert sim.stats.calls == len(expected)
    assert sim.stats.peak_in_flight == len(expected)  # one LM round
    sizes = []
    for body in bodies:
        user = _user(body)
        if "<LM_CALLS" not in user:  # a group of one: the single-call prompt
            assert _system(body) == CHAT_BACKWARD_SYSTEM
            assert user.count(LONG_SYSTEM) == 1
            sizes.append(1)
            continue
        assert _system(body) == CHAT_BACKWARD_GROUP_SYSTEM
        assert user.count(LONG_SYSTEM) == 1  # the shared system prompt once per call
        sizes.append(int(re.search(r'<LM_CALLS count="(\d+)">', user).group(1)))
    assert sorted(sizes, reverse=True) == expected
    every = "\n".join(_user(b) for b in bodies)
    for i in range(failed):  # each sample's own message and output once
        assert every.count(f"Customer message: Message {i}: I am {WORDS[i]}.<") == 1
        assert every.count(f'the expected value is "label{i}"') == 1
    assert every.count("Message ok") == 0
    grad = system.grad[0]
    assert sources_of(grad) == [(i,) for i in range(failed)]
    for i, text in enumerate(grad.data):
        assert f'"{WORDS[i]}"' in text and f"label{i}." in text


def _per_sample_bodies(sim: Simulator, per_call: int, failed: int = 3) -> list[Any]:
    messages_in = [f"I am {WORDS[i]}." for i in range(failed)]
    _, reply = _classify(sim.client, messages_in)
    feedback = Variable([f'the expected value is "t{i}"' for i in range(failed)])
    sim.reset_stats()
    with afnio.backward_options(chat_samples_per_call=per_call):
        reply.backward(feedback)
    return sim.requests


def test_per_sample_mode_sends_todays_single_call_prompts(sim: Simulator) -> None:
    bodies = _per_sample_bodies(sim, 1)
    expected = {
        chat_backward_user(
            [
                {"role": "system", "content": LONG_SYSTEM},
                {"role": "user", "content": f"Customer message: I am {WORDS[i]}."},
            ],
            OUTPUT_ROLE,
            "neutral",
            f'the expected value is "t{i}"',
            [VariableInfo("system prompt", "system", True, LONG_SYSTEM)],
        )
        for i in range(3)
    }
    assert {_user(b) for b in bodies} == expected
    assert {_system(b) for b in bodies} == {CHAT_BACKWARD_SYSTEM}


def test_a_group_of_one_is_byte_identical_to_the_per_sample_request(
    sim: Simulator,
) -> None:
    one = _per_sample_bodies(sim, 1, failed=1)
    grouped = _per_sample_bodies(sim, 8, failed=1)
    assert len(one) == len(grouped) == 1
    assert json.dumps(one[0], sort_keys=True) == json.dumps(grouped[0], sort_keys=True)


class EchoLM(ChatCompletionModel):
    """Answers each call's feedback back: one ``<feedback>|var<v>`` per call and
    variable, in order (grouped or single-call prompt); records every call."""

    def __init__(self, wrong_count: bool = False) -> None:
        super().__init__(provider="echo")
        self.wrong_count = wrong_count
        self.users: list[str] = []
        self.in_flight = 0
        self.peak = 0

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        user = messages[1]["content"]
        self.users.append(user)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        feedbacks = re.findall(r"<FEEDBACK_ON_OUTPUT>(.*?)</FEEDBACK_ON_OUTPUT>", user)
        k = int(re.search(r'<VARIABLES count="(\d+)">', user).group(1))
        texts = [f"{f}|var{v}" for f in feedbacks for v in range(k)]
        if self.wrong_count:
            texts = texts[:-1]
        return json.dumps({"gradients": texts})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


class _Forward(ChatCompletionModel):
    def __init__(self) -> None:
        super().__init__(provider="fwd")

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return "out:" + messages[-1]["content"]

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


@pytest.mark.parametrize("seed", range(4))
def test_every_call_position_maps_to_its_own_sample_with_an_echo_client(
    seed: int,
) -> None:
    rng = random.Random(seed)
    n = rng.randint(5, 23)
    per_call = rng.choice([2, 3, 5, 8])
    echo = EchoLM()
    afnio.set_backward_model_client(echo)
    system = Variable(LONG_SYSTEM, role="system prompt", requires_grad=True)
    message = Variable([f"msg {i}" for i in range(n)], role="msg", requires_grad=True)
    order = list(range(n))
    rng.shuffle(order)
    skipped = set(rng.sample(range(n), n // 4))
    reply = ChatCompletion.apply(
        _Forward(),
        [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [Variable("{m}", role="t")]},
        ],
        inputs={"m": message},
    )
    feedback = ["" if s in skipped else f"fb-{s}-{order[s]}" for s in range(n)]
    with afnio.backward_options(chat_samples_per_call=per_call):
        reply.backward(Variable(feedback))
    sent = n - len(skipped)
    assert len(echo.users) == len(split_evenly(sent, per_call))
    (sys_grad,) = system.grad
    (msg_grad,) = message.grad
    kept = [s for s in range(n) if s not in skipped]
    assert sources_of(sys_grad) == [(s,) for s in kept]
    assert sys_grad.data == [f"{feedback[s]}|var0" for s in kept]
    assert msg_grad.data == [
        "" if s in skipped else f"{feedback[s]}|var1" for s in range(n)
    ]


def test_a_wrong_count_is_retried_then_raises_and_no_grad_changes() -> None:
    echo = EchoLM(wrong_count=True)
    afnio.set_backward_model_client(echo)
    system = Variable(LONG_SYSTEM, role="system prompt", requires_grad=True)
    reply = ChatCompletion.apply(
        _Forward(),
        [{"role": "system", "content": [system]}, {"role": "user", "content": [
            Variable("{m}", role="t")]}],
        inputs={"m": [f"m{i}" for i in range(6)]},
    )  # fmt: skip
    with (
        afnio.backward_options(chat_samples_per_call=3),
        pytest.raises(
            GradientCountError,
            match=r"ChatCompletionBackward0: .* 2 feedback strings, but 3 are asked",
        ),
    ):
        reply.backward(Variable([f"f{i}" for i in range(6)]), retain_graph=True)
    assert len(echo.users) == 2 * 4  # two groups, each asked 1 + 3 retries
    assert system.grad == []


def test_an_error_in_one_group_changes_no_gradient(sim: Simulator) -> None:
    system, reply = _classify(sim.client, [f"I am {w}." for w in WORDS[:12]])
    feedback = Variable([f'the expected value is "t{i}"' for i in range(12)])
    sim.inject(Fault.SERVER_ERROR)  # one of the 3 groups' requests fails
    with afnio.backward_options(chat_samples_per_call=4):
        with pytest.raises(Exception):  # noqa: B017 (the SDK's error, any kind)
            reply.backward(feedback, retain_graph=True)
        assert system.grad == []
        time.sleep(0.3)  # the cancelled groups' requests may still reach the server
        sim.reset_stats()
        reply.backward(feedback)  # the graph was kept: it works when the LM does
    assert sim.stats.calls == 3
    assert len(system.grad[0].data) == 12


# -- across nodes --------------------------------------------------------------------


def _recorded_two_stage(n: int) -> tuple[Variable, Variable, Variable, Variable]:
    """Two recorded calls per sample (stage A writes a summary from prompt P1, stage
    B classifies it with prompt P2), stacked and scored: stage B's nodes run first
    in backward, then stage A's."""
    p1 = Variable("Summarize the message in a few words, keep its tone.", role="p1",
                  requires_grad=True)  # fmt: skip
    p2 = Variable(LONG_SYSTEM, role="p2", requires_grad=True)
    outs = []
    for i in range(n):
        conv_a = [
            {"role": "system", "content": p1.data},
            {"role": "user", "content": f"I am {WORDS[i]} about order {i}."},
        ]
        a = RecordedChatCall.apply(conv_a, f"summary {i}: {WORDS[i]}", [p1], ["system"])
        conv_b = [
            {"role": "system", "content": p2.data},
            {"role": "user", "content": a.data},
        ]
        b = RecordedChatCall.apply(conv_b, "neutral", [p2, a], ["system", "user"])
        outs.append(b)
    stacked = StackSamples.apply(outs)
    _, explanation = ExactMatchEvaluator.apply(
        stacked, [f"label{i}" for i in range(n)], feedback_mode="direct"
    )
    return p1, p2, stacked, explanation


def test_recorded_calls_of_one_pass_are_grouped_across_nodes(sim: Simulator) -> None:
    p1, p2, _, explanation = _recorded_two_stage(10)
    sim.reset_stats()
    with afnio.backward_options(chat_samples_per_call=4):
        explanation.backward()
    # stage B: 10 nodes -> 3 calls; then stage A: 10 nodes -> 3 calls
    assert sim.stats.calls == 6
    sizes = sorted(
        int(re.search(r'<LM_CALLS count="(\d+)">', _user(b)).group(1))
        for b in sim.requests
    )
    assert sizes == [3, 3, 3, 3, 4, 4]
    assert len(p2.grad) == 10 and len(p1.grad) == 10  # one per recorded call
    texts = [g.data for g in p2.grad]
    for i in range(10):
        (text,) = [t for t in texts if f'"{WORDS[i]}"' in t]
        assert f"label{i}." in text


def test_groups_never_depend_on_which_answer_came_first(sim: Simulator) -> None:
    runs = []
    for slow in ("I am angry about order 0", "I am complaint about order 3", None):
        sim.clear_delays()
        if slow is not None:
            sim.delay_when(slow, 0.4)  # one stage-B group answers last
        _, _, _, explanation = _recorded_two_stage(9)
        sim.reset_stats()
        with afnio.backward_options(chat_samples_per_call=4):
            explanation.backward()
        bodies = [json.dumps(b, sort_keys=True) for b in sim.requests]
        runs.append(collections.Counter(bodies))
    assert runs[0] == runs[1] == runs[2]
    assert sum(runs[0].values()) == 6  # 9 -> [3, 3, 3] twice


def test_two_chat_completions_sharing_a_parameter_share_calls(sim: Simulator) -> None:
    system = Variable(LONG_SYSTEM, role="system prompt", requires_grad=True)
    _, r1 = _classify(sim.client, ["I am angry.", "I am upset."], system)
    _, r2 = _classify(sim.client, ["I am thrilled.", "I am poor."], system)
    sim.reset_stats()
    with afnio.backward_options(chat_samples_per_call=8):
        afnio.autodiff.backward(
            [r1, r2],
            [
                Variable(['the expected value is "a"', 'the expected value is "b"']),
                Variable(['the expected value is "c"', 'the expected value is "d"']),
            ],
        )
    assert sim.stats.calls == 1
    assert '<LM_CALLS count="4">' in _user(sim.requests[0])
    texts = [t for g in system.grad for t in g.data]
    assert len(texts) == 4
    for word, label in zip(["angry", "upset", "thrilled", "poor"], "abcd", strict=True):
        assert any(f'"{word}"' in t and f"is {label}." in t for t in texts)


def test_lent_node_slots_let_every_node_join_under_a_small_bound(
    sim: Simulator,
) -> None:
    for bound in (2, 1):
        afnio.set_max_concurrency(bound)
        p = Variable(LONG_SYSTEM, role="p", requires_grad=True)
        outs = [
            RecordedChatCall.apply(
                [
                    {"role": "system", "content": p.data},
                    {"role": "user", "content": f"I am {WORDS[i]}."},
                ],
                "neutral",
                [p],
                ["system"],
            )
            for i in range(6)
        ]
        stacked = StackSamples.apply(outs)
        feedback = Variable([f'the expected value is "t{i}"' for i in range(6)])
        sim.reset_stats()

        async def run(
            stacked: Variable = stacked, feedback: Variable = feedback
        ) -> None:
            with afnio.backward_options(chat_samples_per_call=8):
                await asyncio.wait_for(
                    afnio.autodiff.abackward(stacked, feedback), timeout=30
                )

        asyncio.run(run())  # a deadlock would time out
        assert sim.stats.calls == 1  # all 6 nodes joined one call
        assert len(p.grad) == 6


def test_outside_a_pass_the_items_are_grouped_among_themselves(sim: Simulator) -> None:
    items = [_item(f"Msg {i}: I am {WORDS[i]}.", "v", f'expected value is "t{i}"',
                   "neutral") for i in range(5)]  # fmt: skip

    async def run() -> list[list[str]]:
        with afnio.backward_options(chat_samples_per_call=2):
            return await chat_backward_gradients("node", items)

    sim.reset_stats()
    answers = afnio._runtime.run_sync(run())
    assert sim.stats.calls == 3
    assert [len(a) for a in answers] == [2] * 5
    for i, (first, _) in enumerate(answers):
        assert f'"{WORDS[i]}"' in first and f"t{i}." in first


# -- grouping keeps samples apart (acceptance) ---------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_grouping_keeps_samples_apart_with_distinct_targets_permuted(
    sim: Simulator, seed: int
) -> None:
    rng = random.Random(seed)
    n = rng.randint(9, len(WORDS))
    words = rng.sample(WORDS, n)
    targets = [f"code{rng.randint(100, 999)}x{i}" for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # the samples permuted: groups hold other neighbours
    words = [words[j] for j in order]
    targets = [targets[j] for j in order]
    ok = set(rng.sample(range(n), 2))  # two samples right: skipped
    per_call = rng.choice([2, 3, 4, 8])
    system = Variable(LONG_SYSTEM, role="system prompt", requires_grad=True)
    message = Variable(
        [f"Order {i}: I am {w} with it." for i, w in enumerate(words)],
        role="customer message",
        requires_grad=True,
    )
    reply = ChatCompletion.apply(
        sim.client,
        [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [Variable("Message: {m}", role="template")]},
        ],
        inputs={"m": message},
        model=SIMULATOR_MODEL,
    )
    labels = ["neutral" if s in ok else targets[s] for s in range(n)]
    _, explanation = ExactMatchEvaluator.apply(reply, labels, feedback_mode="direct")
    sim.reset_stats()
    with afnio.backward_options(chat_samples_per_call=per_call):
        explanation.backward()
    failed = [s for s in range(n) if s not in ok]
    assert sim.stats.calls == len(split_evenly(len(failed), per_call))
    (sys_grad,) = system.grad
    (msg_grad,) = message.grad
    assert sources_of(sys_grad) == [(s,) for s in failed]
    for s, text in zip(failed, sys_grad.data, strict=True):
        assert text.startswith(
            f'If the message mentions "{words[s]}", the sentiment is {targets[s]}.'
        )
        for other in failed:
            if other != s:
                assert f'"{words[other]}"' not in text
                assert targets[other] not in text
    for s in range(n):
        text = msg_grad.data[s]
        if s in ok:
            assert text == ""
            continue
        assert f'"{targets[s]}"' in text
        assert all(targets[o] not in text for o in failed if o != s)
