"""``Simulator(feedback_words=N)`` (issue 23): every non-empty LM-written feedback
string of a backward answer is padded to at least N words with a neutral filler, on
every route; the optimizer's edits (so the learning) are unchanged while its prompt
grows; optimizer and judge answers are never padded."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import afnio
from afnio import Variable
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_SYSTEM,
    EVALUATOR_BACKWARD_SYSTEM,
    gradients_response_format,
    judge_response_format,
)
from afnio.models.openai import OpenAI
from afnio.optim import TGD
from afnio.optim.tgd import render_feedback
from afnio.testing import SIMULATOR_MODEL, Simulator, world
from afnio.testing.__main__ import _parser, main
from tests.testing.test_grouped_backward_responder import (
    TWO_STAGE_MESSAGES,
    TWO_STAGE_RULES,
    TWO_STAGE_TARGETS,
    Call,
    _sentiment_call,
    group_user,
)
from tests.testing.test_grouped_backward_responder import (
    single_user as chat_backward_user,
)
from tests.testing.test_world_feedback import evaluator_backward_user
from tests.testing.test_world_peers import _llm_backward, _tgd
from tests.testing.test_world_two_stage import FIRST, SECOND, two_stage

REPO = Path(__file__).resolve().parents[2]
SERVE = (sys.executable, "-m", "afnio.testing", "serve")
FILLER_WORDS = len(world.FEEDBACK_FILLER.split())


def _unpadded(text: str) -> str:
    """``text`` without the filler sentences :func:`world.pad_feedback` appended."""
    while text.endswith(" " + world.FEEDBACK_FILLER):
        text = text[: -len(world.FEEDBACK_FILLER) - 1]
    return text


def _request(system: str, user: str, fmt: dict | None = None) -> world.SimRequest:
    return world.SimRequest.from_messages(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        response_format=gradients_response_format() if fmt is None else fmt,
    )


_FRUSTRATED = _sentiment_call("I am frustrated again.", "negative")
CHAT = chat_backward_user(
    Call(
        _FRUSTRATED.conversation,
        _FRUSTRATED.feedback,
        [*_FRUSTRATED.variables, ("message", "user", False, "I am frustrated again.")],
    )
)
GROUP = group_user(
    [
        _sentiment_call("This is awful.", "negative"),
        Call(
            _sentiment_call("Fine.", "neutral").conversation,
            "",  # a blank feedback: empty gradients stay empty
            _sentiment_call("Fine.", "neutral").variables,
        ),
        _sentiment_call("I love it.", "positive"),
    ]
)
EVALUATOR = evaluator_backward_user(
    "neutral",
    "negative",
    [("sentiment prediction", "prediction", False, "(each sample's <PREDICTION>)")],
    more=[("Great!", "neutral", "positive")],
)
FEEDBACK_REQUESTS = {
    "chat_backward": _request(CHAT_BACKWARD_SYSTEM, CHAT),
    "chat_backward_group": _request(CHAT_BACKWARD_SYSTEM, GROUP),
    "evaluator_backward": _request(EVALUATOR_BACKWARD_SYSTEM, EVALUATOR),
}


# -- the padding itself -----------------------------------------------------------


@pytest.mark.parametrize("words", [1, 5, 14, 15, 16, 60, 100])
def test_padding_reaches_at_least_the_words_asked_with_whole_filler_sentences(
    words: int,
) -> None:
    text = 'If the message mentions "awful", the sentiment is negative.'
    padded = world.pad_feedback(text, words)
    count = len(padded.split())
    assert count >= words
    assert count < max(words, len(text.split())) + FILLER_WORDS
    assert _unpadded(padded) == text
    assert world.pad_feedback("", words) == ""
    assert world.pad_feedback("  ", words) == "  "


def test_the_filler_is_invisible_to_every_rule_parser() -> None:
    filler = world.FEEDBACK_FILLER
    assert '"' not in filler and "{" not in filler and "(x" not in filler
    assert world._feedback_edits(filler) == []
    assert world.expected_tools(filler) is None
    assert world.confirmed_tools(filler) is None
    assert world._TARGET_IN_FEEDBACK.search(filler) is None
    assert world.salient_word(filler) is None
    assert world.find_rules(filler) == []
    assert world.improve_value("Classify.", filler) == "Classify."


@pytest.mark.parametrize("name", sorted(FEEDBACK_REQUESTS))
def test_every_feedback_string_of_a_backward_answer_is_padded(name: str) -> None:
    request = FEEDBACK_REQUESTS[name]
    plain = world.answer(request)
    padded = world.answer(request, feedback_words=40)
    assert plain.responder == padded.responder == name
    before, after = plain.values["gradients"], padded.values["gradients"]
    assert len(before) == len(after) >= 2
    for original, text in zip(before, after, strict=True):
        if original == "":
            assert text == ""
        else:
            assert len(text.split()) >= 40
            assert _unpadded(text) == original
    assert any(g == "" for g in before) == (name == "chat_backward_group")
    rendered = json.loads(world.render_content(padded, request.response_format))
    assert rendered == {"gradients": after}


def test_textgrads_feedback_is_padded_and_its_rule_kept() -> None:
    request = _llm_backward(
        "Classify the sentiment.",
        "This is awful.",
        "neutral",
        'The prediction "neutral" is wrong: the expected value is "negative".',
    )
    plain = world.answer(request)
    padded = world.answer(request, feedback_words=50)
    assert padded.responder == "textgrad_backward"
    assert len(padded.label.split()) >= 50
    assert _unpadded(padded.label) == plain.label
    assert 'If the message mentions "awful", the sentiment is negative.' in plain.label


def test_optimizer_judge_and_task_answers_are_never_padded() -> None:
    optimizer_user = (
        "<CURRENT_VALUE>Classify.</CURRENT_VALUE>\n<FEEDBACK>- If the message "
        'mentions "awful", the sentiment is negative.</FEEDBACK>'
    )
    judge = world.SimRequest.from_messages(
        [{"role": "user", "content": "<PREDICTION>a</PREDICTION><TARGET>b</TARGET>"}],
        response_format=judge_response_format(),
    )
    requests = {
        "optimizer": _request("Improve.", optimizer_user, {"type": "text"}),
        "judge": judge,
        "textgrad_optimizer": _tgd(
            "Classify.",
            [("x", 'If the message mentions "awful", the sentiment is negative.')],
        ),
        "task": world.SimRequest.from_messages(
            [
                {
                    "role": "system",
                    "content": 'If the message mentions "a", the x is b.',
                },
                {"role": "user", "content": "a"},
            ]
        ),
    }
    for name, request in requests.items():
        plain = world.answer(request)
        assert plain.responder == name
        assert world.answer(request, feedback_words=200) == plain, name


def test_the_responders_that_write_feedback_are_named() -> None:
    assert {
        "chat_backward",
        "chat_backward_group",
        "evaluator_backward",
        "textgrad_backward",
    } == world.FEEDBACK_RESPONDERS


# -- every route of the HTTP simulator ---------------------------------------------


@pytest.fixture(scope="module")
def padded_sim() -> Iterator[tuple[Simulator, openai.OpenAI]]:
    with (
        Simulator(feedback_words=45) as sim,
        openai.OpenAI(base_url=sim.base_url, api_key="test", max_retries=0) as client,
    ):
        yield sim, client


def _messages(user: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": CHAT_BACKWARD_SYSTEM},
        {"role": "user", "content": user},
    ]


def _assert_padded(content: str, words: int = 45) -> None:
    gradients = json.loads(content)["gradients"]
    assert gradients and all(len(g.split()) >= words for g in gradients)
    assert all(_unpadded(g) != g for g in gradients)


def test_chat_streaming_and_legacy_completions_are_padded(
    padded_sim: tuple[Simulator, openai.OpenAI],
) -> None:
    _, client = padded_sim
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=_messages(CHAT),
        response_format=gradients_response_format(),
    )
    _assert_padded(reply.choices[0].message.content)
    assert reply.usage.completion_tokens == len(
        reply.choices[0].message.content.split()
    )
    stream = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=_messages(GROUP),
        response_format=gradients_response_format(),
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert json.loads(streamed)["gradients"][1] == ""  # the blank feedback's
    gradients = json.loads(streamed)["gradients"]
    assert all(len(g.split()) >= 45 for g in gradients if g)
    legacy = client.completions.create(model=SIMULATOR_MODEL, prompt=CHAT)
    _assert_padded(legacy.choices[0].text)


def test_batch_api_lines_are_padded(
    padded_sim: tuple[Simulator, openai.OpenAI],
) -> None:
    _, client = padded_sim
    line = {
        "custom_id": "backward-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": SIMULATOR_MODEL,
            "messages": _messages(CHAT),
            "response_format": gradients_response_format(),
        },
    }
    upload = client.files.create(
        file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")),
        purpose="batch",
    )
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    output = json.loads(client.files.content(done.output_file_id).text)
    body = output["response"]["body"]
    _assert_padded(body["choices"][0]["message"]["content"])


# -- the learning is unchanged, the optimizer prompt grows -------------------------


def test_padded_feedback_gives_the_same_edits_below_and_above_the_condense_limit() -> (
    None
):
    """TGD's rendering of the feedback (condensed above its character limit, which
    padding may cross) leads the simulator's optimizer to the same value."""
    words = ["awful", "terrible", "frustrated", "disappointed", "great", "love"]
    for size in (2, 6, 40):
        texts = [
            f'If the message mentions "{words[i % len(words)]}", the sentiment is '
            f"{'negative' if i % len(words) < 4 else 'positive'}."
            for i in range(size)
        ] + [f'The user prompt should lead to "{"positive"}" for this input.']
        padded = [world.pad_feedback(t, 60) for t in texts]
        plain_feedback, _ = render_feedback([Variable(texts)])
        padded_feedback, _ = render_feedback([Variable(padded)])
        assert len(padded_feedback) > len(plain_feedback)
        assert world.improve_value("Classify.", padded_feedback) == (
            world.improve_value("Classify.", plain_feedback)
        )


def _two_stage_step(feedback_words: int | None) -> tuple[list[str], str, str, int]:
    """One backward + TGD step of a two-stage program (evaluator backward through
    an LM, chat backward relays, the optimizer): the first prompt's gradients (filler
    removed), both prompts after the step, and the optimizer calls' prompt tokens."""
    with (
        Simulator(feedback_words=feedback_words) as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        first = Variable(FIRST, role="first prompt", requires_grad=True)
        second = Variable(SECOND, role="second prompt", requires_grad=True)
        sentiment = two_stage(client, first, second, TWO_STAGE_MESSAGES)
        _, explanation = ExactMatchEvaluator.apply(sentiment, TWO_STAGE_TARGETS)
        explanation.backward()
        gradients = [_unpadded(t) for g in first.grad for t in g.data]
        sim.reset_stats()
        start = len(sim.requests)
        TGD([first, second], model_client=client, model=SIMULATOR_MODEL).step()
        tokens = sum(
            len(world.message_text(m.get("content")).split()) + 3
            for body in sim.requests[start:]
            for m in body["messages"]
        )
        assert tokens == sim.stats.prompt_tokens
        return gradients, first.data, second.data, tokens


def test_learning_is_unchanged_and_the_optimizer_prompt_grows() -> None:
    plain = _two_stage_step(None)
    padded = _two_stage_step(60)
    assert plain[0] == padded[0] == TWO_STAGE_RULES
    assert plain[1:3] == padded[1:3]
    assert plain[1] != FIRST  # the step did learn
    assert padded[3] > plain[3] + 3 * 40  # three padded feedbacks quoted (at least)


# -- validation and the CLI --------------------------------------------------------


@pytest.mark.parametrize("value", ["60", 1.5, True, [60]])
def test_a_feedback_words_that_is_not_an_int_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=r"feedback_words must be an int >= 1"):
        Simulator(feedback_words=value)  # type: ignore[arg-type]
    sim = Simulator()
    with pytest.raises(TypeError, match=r"feedback_words .* got"):
        sim.feedback_words = value  # type: ignore[assignment]
    assert sim.feedback_words is None


@pytest.mark.parametrize("value", [0, -5])
def test_a_feedback_words_below_one_is_a_value_error(value: int) -> None:
    with pytest.raises(ValueError, match=r"feedback_words must be an int >= 1 .*None"):
        Simulator(feedback_words=value)
    sim = Simulator(feedback_words=10)
    with pytest.raises(ValueError, match="feedback_words"):
        sim.feedback_words = value
    assert sim.feedback_words == 10
    sim.feedback_words = None
    assert sim.feedback_words is None


def test_the_cli_reads_feedback_words() -> None:
    args = _parser().parse_args(["serve", "--feedback-words", "60"])
    assert args.feedback_words == 60
    assert _parser().parse_args(["serve"]).feedback_words is None


def test_the_cli_refuses_a_feedback_words_below_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--port", "0", "--feedback-words", "0"]) == 2
    assert "feedback_words must be an int >= 1" in capsys.readouterr().err


def test_a_served_simulator_pads_feedback() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*SERVE, "--port", "0", "--feedback-words", "33"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("afnio simulator serving at "), proc.stderr.read()
        base_url = line.split(" at ", 1)[1].strip()
        with openai.OpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
            reply = client.chat.completions.create(
                model=SIMULATOR_MODEL,
                messages=_messages(CHAT),
                response_format=gradients_response_format(),
            )
        _assert_padded(reply.choices[0].message.content, 33)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)  # waits, and closes the pipes
    assert proc.returncode == 0
