"""The simulator's grouped chat-backward rule (issue 23): a grouped prompt
(``CHAT_BACKWARD_GROUP_USER``) is answered, call by call, exactly as the single-call
prompts its calls stand for, so the single-call rules (rules, relays to computed
inputs, the two-stage credit assignment, the task-independent rule words) hold for
grouped calls.

Grouped prompts are rendered here from the templates of ``afnio.autodiff.prompts``
by the issue's rendering rules (an independent renderer, checked against
``afnio.autodiff.lm_backward.chat_backward_group_user``, which the property test
also uses); single-call prompts with the single-call pointer rule of
``afnio.autodiff.lm_backward.chat_backward_user`` (checked against it too).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest

from afnio._template import render
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_group_user,
    chat_backward_user,
)

# -- the grouped templates (afnio.autodiff.prompts, issue 23) --------------------------
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_GROUP_SYSTEM,
    CHAT_BACKWARD_GROUP_USER,
    CHAT_BACKWARD_SYSTEM,
    CHAT_BACKWARD_USER,
    LM_CALL_ELEMENT,
    LM_CALL_VALUE,
    MESSAGE_ELEMENT,
    SHARED_MESSAGE_ELEMENT,
    SHARED_MESSAGE_POINTER,
    VALUE_IN_MESSAGE,
    VARIABLE_IN_MESSAGE,
    VARIABLE_IN_SHARED_MESSAGE,
    VARIABLE_PER_CALL,
    gradients_response_format,
)
from afnio.testing import world
from tests.testing.test_world_feedback import Var, _variables, evaluator_backward_user
from tests.testing.test_world_two_stage import FIRST, SECOND, two_stage


@dataclass
class Call:
    """One sample's chat-backward request (what ``ChatBackwardItem`` holds)."""

    conversation: list[tuple[str, str]]
    feedback: str
    variables: list[Var]
    output: str = "neutral"
    output_role: str = "assistant"
    extra: dict[str, str] = field(default_factory=dict)


def single_user(call: Call) -> str:
    """The single-call prompt, as ``lm_backward.chat_backward_user`` renders it (a
    variable that is the whole content of a message points at the first such
    message when the pointer is shorter)."""
    where: dict[str, tuple[int, str]] = {}
    for i, (role, content) in enumerate(call.conversation, start=1):
        if content.strip():
            where.setdefault(content, (i, role))
    shown = []
    for role, location, trainable, text in call.variables:
        if text in where:
            index, message_role = where[text]
            pointer = render(
                VARIABLE_IN_MESSAGE, {"index": index, "role": message_role}
            )
            if len(pointer) < len(text):
                text = pointer
        shown.append((role, location, trainable, text))
    return render(
        CHAT_BACKWARD_USER,
        {
            "conversation": "\n".join(
                render(MESSAGE_ELEMENT, {"role": r, "content": c})
                for r, c in call.conversation
            ),
            "output_role": call.output_role,
            "output": call.output,
            "feedback": call.feedback,
            "count": len(shown),
            "variables": _variables(shown),
        },
    )


def group_user(calls: list[Call]) -> str:
    """The grouped prompt of >= 2 calls, by the issue's rendering rules."""
    assert len(calls) >= 2
    first = calls[0]
    shared: dict[int, tuple[str, str]] = {}
    for position, (role, content) in enumerate(first.conversation, start=1):
        if content.strip() and all(
            len(c.conversation) >= position
            and c.conversation[position - 1] == (role, content)
            for c in calls
        ):
            shared[position] = (role, content)
    variables: list[Var] = []
    values: list[list[tuple[int, str]]] = [[] for _ in calls]
    for j, (role, location, trainable, text) in enumerate(first.variables, start=1):
        texts = [c.variables[j - 1][3] for c in calls]
        if all(t == text for t in texts):
            shown = text
            for position, (message_role, content) in shared.items():
                if content == text:
                    pointer = render(
                        VARIABLE_IN_SHARED_MESSAGE,
                        {"index": position, "role": message_role},
                    )
                    if len(pointer) < len(text):
                        shown = pointer
                    break
            variables.append((role, location, trainable, shown))
            continue
        variables.append(
            (role, location, trainable, render(VARIABLE_PER_CALL, {"index": j}))
        )
        for k, call in enumerate(calls):
            value = texts[k]
            for position, (message_role, content) in enumerate(
                call.conversation, start=1
            ):
                if position not in shared and content == value:
                    pointer = render(
                        VALUE_IN_MESSAGE, {"index": position, "role": message_role}
                    )
                    if len(pointer) < len(value):
                        value = pointer
                    break
            values[k].append((j, value))
    rendered_calls = []
    for k, call in enumerate(calls):
        conversation = "\n".join(
            render(SHARED_MESSAGE_POINTER, {"role": role, "index": position})
            if position in shared
            else render(MESSAGE_ELEMENT, {"role": role, "content": content})
            for position, (role, content) in enumerate(call.conversation, start=1)
        )
        rendered_calls.append(
            render(
                LM_CALL_ELEMENT,
                {
                    "index": k + 1,
                    "conversation": conversation,
                    "output_role": call.output_role,
                    "output": call.output,
                    "feedback": call.feedback,
                    "values": "".join(
                        render(LM_CALL_VALUE, {"index": j, "text": text})
                        for j, text in values[k]
                    ),
                },
            )
        )
    return render(
        CHAT_BACKWARD_GROUP_USER,
        {
            "shared_count": len(shared),
            "shared": "\n".join(
                render(
                    SHARED_MESSAGE_ELEMENT,
                    {"index": position, "role": role, "content": content},
                )
                for position, (role, content) in shared.items()
            ),
            "variable_count": len(variables),
            "variables": _variables(variables),
            "call_count": len(calls),
            "calls": "\n".join(rendered_calls),
            "count": len(variables) * len(calls),
        },
    )


def _request(user: str, system: str = CHAT_BACKWARD_GROUP_SYSTEM) -> world.SimRequest:
    return world.SimRequest.from_messages(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        response_format=gradients_response_format(),
    )


def grouped_answer(calls: list[Call]) -> world.Answer:
    return world.answer(_request(group_user(calls)))


def single_gradients(call: Call) -> list[str]:
    result = world.answer(_request(single_user(call), CHAT_BACKWARD_SYSTEM))
    assert result.responder == "chat_backward"
    return json.loads(world.render_content(result, gradients_response_format()))[
        "gradients"
    ]


def _concatenated(calls: list[Call]) -> list[str]:
    return [g for call in calls for g in single_gradients(call)]


# -- fixtures of the rule world --------------------------------------------------------

SENTIMENT = (
    "Classify the sentiment of the message: positive, negative or neutral. "
    'If the message mentions "refund", the sentiment is negative.'
)
PRIORITY = (
    "Route the ticket to the right priority: low, medium or high. "
    'If the message begins with "urgent", the priority is high.'
)
TWO_STAGE_MESSAGES = [
    "I am frustrated: the lift is broken.",
    "Great gym, thank you.",
    "Terrible showers.",
]
TWO_STAGE_TARGETS = ["negative", "positive", "negative"]
TWO_STAGE_RULES = [
    'If the message mentions "frustrated", the feeling is unhappy.',
    'If the message mentions "great", the feeling is happy.',
    'If the message mentions "terrible", the feeling is unhappy.',
]
"""The first prompt's feedback after one backward pass of the two-stage program
(:func:`tests.testing.test_world_two_stage.two_stage`) on ``TWO_STAGE_MESSAGES``
with the targets ``TWO_STAGE_TARGETS``: one rule per message."""


def _wrong(prediction: str, target: str) -> str:
    return (
        f'The prediction "{prediction}" is wrong: the expected value is "{target}". '
        f'Change what produces it so that this input leads to "{target}".'
    )


def _sentiment_call(message: str, target: str, *, prompt: str = SENTIMENT) -> Call:
    return Call(
        [("system", prompt), ("user", message)],
        _wrong("neutral", target),
        [("system prompt", "system", True, prompt)],
    )


# -- marker precedence -----------------------------------------------------------------


def test_the_grouped_responder_comes_before_the_single_call_responder() -> None:
    names = [r.__name__ for r in world.RESPONDERS]
    assert names.index("chat_backward_group_responder") < names.index(
        "chat_backward_responder"
    )
    assert names.index("chat_backward_group_responder") < names.index(
        "evaluator_backward_responder"
    )


def test_a_grouped_prompt_is_answered_by_the_grouped_responder() -> None:
    calls = [
        _sentiment_call("I am frustrated with this.", "negative"),
        _sentiment_call("What a great gym!", "positive"),
    ]
    result = grouped_answer(calls)
    assert result.responder == "chat_backward_group"
    assert result.values["gradients"] == [
        'If the message mentions "frustrated", the sentiment is negative.',
        'If the message mentions "great", the sentiment is positive.',
    ]
    # the single-call responder would answer it too (its markers are all there),
    # wrongly (no <VARIABLES> after the first feedback): the order of the list decides
    request = _request(group_user(calls))
    wrong = world.chat_backward_responder(request)
    assert wrong is not None and wrong.values["gradients"] != result.values["gradients"]
    assert world.evaluator_backward_responder(request) is None


def test_single_call_and_evaluator_prompts_are_not_taken_by_the_grouped_responder() -> (
    None
):
    single = _request(single_user(_sentiment_call("Awful.", "negative")))
    assert world.chat_backward_group_responder(single) is None
    assert world.answer(single).responder == "chat_backward"
    evaluator = _request(
        evaluator_backward_user(
            "neutral", "negative", [("p", "prediction", False, "x")]
        )
    )
    assert world.chat_backward_group_responder(evaluator) is None
    assert world.answer(evaluator).responder == "evaluator_backward"


def test_a_prompt_that_only_mentions_the_group_tags_falls_through() -> None:
    """The markers without any ``<LM_CALL>`` element (a single-call prompt whose
    conversation quotes ``<LM_CALLS>``) go on to the single-call responder."""
    call = _sentiment_call("Our <LM_CALLS> log is awful.", "negative")
    result = world.answer(_request(single_user(call)))
    assert result.responder == "chat_backward"
    assert result.values["gradients"] == [
        'If the message mentions "awful", the sentiment is negative.'
    ]


# -- the rule: each call as its single-call prompt ---------------------------------


def test_each_call_parses_to_its_single_call_prompt() -> None:
    calls = [
        _sentiment_call('I am frustrated {with} "this".', "negative"),
        _sentiment_call("Great, thanks.", "positive"),
        _sentiment_call("Nothing to say.", "neutral"),
    ]
    text = group_user(calls)
    assert '<MESSAGE role="system" shared="1"></MESSAGE>' in text
    assert "(the whole content of shared <MESSAGE> 1" in text  # listed once, by pointer
    parsed = world.ChatBackwardGroupPrompt.parse(text)
    assert parsed.calls == tuple(
        world.ChatBackwardPrompt.parse(single_user(c)) for c in calls
    )


def test_distinct_targets_stay_with_their_own_call_in_any_order() -> None:
    """Grouping keeps samples apart: each call's gradient names its own expected
    value, whatever the order of the calls in the group."""
    calls = [
        _sentiment_call("This is awful.", "negative"),
        _sentiment_call("I love it.", "positive"),
        _sentiment_call("Frustrated again.", "mixed"),
    ]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        group = [calls[i] for i in order]
        gradients = grouped_answer(group).values["gradients"]
        assert gradients == _concatenated(group)
        for call, gradient in zip(group, gradients, strict=True):
            target = world._TARGET_IN_FEEDBACK.search(call.feedback)[1]
            assert gradient.endswith(f"the sentiment is {target}.")


def test_per_call_values_and_message_pointers_are_the_calls_own_texts() -> None:
    """A computed input differing per call is shown as ``<VALUE>`` (a pointer to the
    call's message when shorter); the relay names each call's own value."""
    long_a = "unhappy " + "and very much so " * 8
    calls = [
        Call(
            [("system", SECOND), ("user", feeling)],
            _wrong("neutral", target),
            [
                ("second prompt", "system", True, SECOND),
                ("feeling", "input:feeling", False, feeling),
            ],
        )
        for feeling, target in ((long_a, "negative"), ("neutral", "positive"))
    ]
    text = group_user(calls)
    assert "(the whole content of this call's <MESSAGE> 2" in text
    assert '<VALUE variable="2">neutral</VALUE>' in text
    gradients = grouped_answer(calls).values["gradients"]
    assert gradients == _concatenated(calls)
    assert gradients[1].startswith('The feeling should contain "unhappy"')
    assert gradients[3].startswith('The feeling should contain "happy"')


def test_two_stages_grouped_answer_as_the_single_calls() -> None:
    """The two-stage credit assignment holds for grouped calls: a group of
    second-stage calls relays to each computed input, and a group of first-stage
    calls given those relays writes each call's own rule."""
    second = [
        Call(
            [("system", SECOND), ("user", "neutral")],
            _wrong("neutral", t),
            [
                ("second prompt", "system", True, SECOND),
                ("feeling", "input:feeling", False, "neutral"),
            ],
        )
        for t in TWO_STAGE_TARGETS
    ]
    relays = grouped_answer(second).values["gradients"]
    assert relays == _concatenated(second)
    feeling_feedback = relays[1::2]
    assert feeling_feedback == [
        'The feeling should contain "unhappy": the expected value is "unhappy", since '
        'the rule for "unhappy" gives the sentiment "negative".',
        'The feeling should contain "happy": the expected value is "happy", since the '
        'rule for "happy" gives the sentiment "positive".',
        'The feeling should contain "unhappy": the expected value is "unhappy", since '
        'the rule for "unhappy" gives the sentiment "negative".',
    ]
    first = [
        Call(
            [("system", FIRST), ("user", message)],
            feedback,
            [("first prompt", "system", True, FIRST)],
        )
        for message, feedback in zip(TWO_STAGE_MESSAGES, feeling_feedback, strict=True)
    ]
    rules = grouped_answer(first).values["gradients"]
    assert rules == _concatenated(first)
    assert rules == TWO_STAGE_RULES


def test_task_independent_rule_words_hold_per_call() -> None:
    """A non-affect field gets ``begins with`` rules for each call's lead word (the
    task-independent rule), whatever label each call's target is."""
    calls = [
        Call(
            [("system", PRIORITY), ("user", message)],
            _wrong("low", target),
            [("router prompt", "system", True, PRIORITY)],
            output="low",
        )
        for message, target in (
            ("Subject: Broken heater in room 4", "high"),
            ("Inquiry about opening hours", "low"),
            ("Hello! Elevator stuck", "medium"),
        )
    ]
    gradients = grouped_answer(calls).values["gradients"]
    assert gradients == _concatenated(calls)
    assert gradients == [
        'If the message begins with "broken", the priority is high.',
        'If the message begins with "inquiry", the priority is low.',
        'If the message begins with "elevator", the priority is medium.',
    ]


# -- the property: grouped == concatenation of the single answers --------------------

_MESSAGES = (
    "I am frustrated: the lift is broken again.",
    'The "refund" {never} came; awful service.',
    "What a great gym, I love it!",
    "Subject: Urgent repair needed in room {4}",
    'Inquiry about the "pool" hours',
    "Nothing special to report.",
    "not impressed, disappointing staff",
    "Hello! Elevator stuck on floor 3",
    "{}",
)
_FEELING_VALUES = ("neutral", "unhappy", "happy", 'a "happy" {one}', "neutral " * 12)
_TARGETS = ("negative", "positive", "neutral", "high", "low", "mixed {x}", "unhappy")


def _random_feedback(rng: random.Random, target: str) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return ""
    if kind == 1:
        return "   "
    if kind == 2:
        return 'Be more careful with {braces} and "quotes".'  # no target
    if kind == 3:
        return f'Expected sentiment: "{target}".'
    return _wrong(rng.choice(("neutral", "low", '{"a": 1}')), target)


def _random_group(rng: random.Random) -> list[Call]:
    """2-5 calls through one template (the same variables, in order): a random
    prompt and header, a computed input or not, per-call user texts (sometimes the
    same in every call: then a shared message), outputs and feedback."""
    prompt = rng.choice((SENTIMENT, PRIORITY, SECOND, FIRST, "Answer {briefly}."))
    header = rng.choice((None, "Customer message:", 'Read the "ticket" below {raw}.'))
    computed = rng.choice((None, "input:feeling", "user"))
    header_trainable = header is not None and rng.random() < 0.4
    style = rng.random() < 0.3
    same_user = rng.random() < 0.25
    shared_user = rng.choice(_MESSAGES)
    calls = []
    for _ in range(rng.randrange(2, 6)):
        user = shared_user if same_user else rng.choice(_MESSAGES)
        value = rng.choice(_FEELING_VALUES) if computed else user
        conversation = [("system", prompt)]
        if header is not None:
            conversation.append(("user", header))
        conversation.append(("user", value))
        variables: list[Var] = [("system prompt", "system", True, prompt)]
        if header_trainable:
            variables.append(("header", "user", True, header))
        if computed:
            variables.append(("feeling", computed, False, value))
        if style:
            variables.append(("style guide", "system", False, "Be brief {always}."))
        output = rng.choice(("neutral", '{"priority": "low"}', "low", "x {y}"))
        feedback = _random_feedback(rng, rng.choice(_TARGETS))
        calls.append(Call(conversation, feedback, variables, output=output))
    return calls


@pytest.mark.parametrize("seed", range(120))
def test_grouped_answer_is_the_concatenation_of_the_single_answers(seed: int) -> None:
    rng = random.Random(seed)
    calls = _random_group(rng)
    text = group_user(calls)
    result = world.answer(_request(text))
    assert result.responder == "chat_backward_group"
    assert result.values["gradients"] == _concatenated(calls)
    parsed = world.ChatBackwardGroupPrompt.parse(text)
    assert parsed.calls == tuple(
        world.ChatBackwardPrompt.parse(single_user(c)) for c in calls
    )


def test_the_random_groups_cover_every_case() -> None:
    """The property test's groups hold shared and non-shared messages, per-call
    values and message pointers, computed inputs, blank feedback and braces."""
    texts = [group_user(_random_group(random.Random(seed))) for seed in range(120)]
    for needle in (
        'shared="2"',
        "(the whole content of shared <MESSAGE> 1",
        "(differs per call",
        "(the whole content of this call's <MESSAGE>",
        '<VALUE variable="',
        "<FEEDBACK_ON_OUTPUT></FEEDBACK_ON_OUTPUT>",
        'location="input:feeling" trainable="false"',
        "{never}",
    ):
        assert any(needle in t for t in texts), needle
    assert any('<SHARED_MESSAGES count="1">' in t for t in texts)  # the system only
    assert any('<SHARED_MESSAGES count="3">' in t for t in texts)  # every message


def test_the_single_call_renderer_matches_afnios() -> None:
    """The single-call prompts of this file are afnio's own (pointer rule included)."""
    for seed in range(20):
        for call in _random_group(random.Random(seed)):
            assert single_user(call) == chat_backward_user(
                [{"role": r, "content": c} for r, c in call.conversation],
                call.output_role,
                call.output,
                call.feedback,
                [VariableInfo(*v) for v in call.variables],
            )


def test_the_simulator_pointer_wording_is_afnios() -> None:
    assert world.SINGLE_CALL_VARIABLE_POINTER == VARIABLE_IN_MESSAGE


def _items(calls: list[Call]) -> list[ChatBackwardItem]:
    return [
        ChatBackwardItem(
            conversation=[{"role": r, "content": c} for r, c in call.conversation],
            output_role=call.output_role,
            output=call.output,
            feedback=call.feedback,
            variables=[VariableInfo(*v) for v in call.variables],
            key="template",
        )
        for call in calls
    ]


def test_the_group_renderer_of_this_file_is_afnios() -> None:
    for seed in range(120):
        calls = _random_group(random.Random(seed))
        assert group_user(calls) == chat_backward_group_user(_items(calls)), seed


@pytest.mark.parametrize("seed", range(120, 200))
def test_afnios_grouped_prompt_is_answered_as_its_single_calls(seed: int) -> None:
    calls = _random_group(random.Random(seed))
    result = world.answer(_request(chat_backward_group_user(_items(calls))))
    assert result.responder == "chat_backward_group"
    assert result.values["gradients"] == _concatenated(calls)


# -- end to end: afnio's grouped backward on a live simulator ------------------------


@pytest.mark.parametrize("mode", ["upstream", "cheap"])
def test_two_stage_training_learns_the_same_with_grouped_backward(mode: str) -> None:
    """The two-stage credit assignment through afnio's graph: the cheap mode (direct
    evaluator feedback, grouped chat backward) sends grouped prompts and gives the
    first prompt the same rules as the per-sample mode."""
    import afnio
    from afnio import Variable
    from afnio.autodiff.evaluator import ExactMatchEvaluator
    from afnio.models.openai import OpenAI
    from afnio.optim import TGD
    from afnio.testing import SIMULATOR_MODEL, Simulator

    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
        afnio.backward_options(mode),
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        first = Variable(FIRST, role="first prompt", requires_grad=True)
        second = Variable(SECOND, role="second prompt", requires_grad=True)

        def run() -> Variable:
            return two_stage(client, first, second, TWO_STAGE_MESSAGES)

        _, explanation = ExactMatchEvaluator.apply(run(), TWO_STAGE_TARGETS)
        explanation.backward()
        grouped = [
            body
            for body in sim.requests
            if "<LM_CALLS" in json.dumps(body.get("messages", ""))
        ]
        assert bool(grouped) == (mode == "cheap")
        assert first.grad[0].data == TWO_STAGE_RULES
        TGD([first, second], model_client=client, model=SIMULATOR_MODEL).step()
        assert second.data == SECOND
        assert run().data == TWO_STAGE_TARGETS
