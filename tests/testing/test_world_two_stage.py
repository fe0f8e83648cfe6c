"""Two stages in the rule world: the forward of an intermediate field, the relay of a
downstream call's feedback to its computed input, and the upstream call's rule,
as pure functions (requests rendered from afnio's real templates) and end to end
through afnio's graph on a live simulator."""

from __future__ import annotations

import json
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.autodiff.evaluator import ExactMatchEvaluator
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.autodiff.prompts import CHAT_BACKWARD_SYSTEM, gradients_response_format
from afnio.models.openai import OpenAI
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL, Simulator, world
from tests.testing.test_world_feedback import Var, chat_backward_user

FEELINGS = (
    'If the message mentions "unhappy", the sentiment is negative. '
    'If the message mentions "happy", the sentiment is positive.'
)
SECOND = f"Classify the sentiment of the feeling. {FEELINGS}"
FIRST = (
    "Name the customer's feeling in one word. "
    'If the message mentions "furious", the feeling is unhappy.'
)
MESSAGE = "I am frustrated: the lift is broken again."
EVAL_FEEDBACK = (
    'The prediction "neutral" is wrong: the expected value is "negative". Change what '
    'produces it so that this input leads to "negative".'
)
SECOND_VAR: Var = ("second prompt", "system", True, SECOND)
FEELING_VAR: Var = ("feeling", "input:feeling", False, "neutral")
RELAY = (
    'The feeling should contain "unhappy": the expected value is "unhappy", since the '
    'rule for "unhappy" gives the sentiment "negative".'
)


def gradients_of(user: str) -> list[str]:
    request = world.SimRequest.from_messages(
        [
            {"role": "system", "content": CHAT_BACKWARD_SYSTEM},
            {"role": "user", "content": user},
        ],
        response_format=gradients_response_format(),
    )
    data = json.loads(world.respond(request))
    return data["gradients"]


def second_stage(
    feedback: str = EVAL_FEEDBACK,
    variables: list[Var] | None = None,
    system: str = SECOND,
    feeling: str = "neutral",
) -> str:
    return chat_backward_user(
        [("system", system), ("user", feeling)],
        feedback,
        [SECOND_VAR, FEELING_VAR] if variables is None else variables,
    )


def answer(system: str, user: str) -> str:
    return world.respond(
        world.SimRequest.from_messages(
            [{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
    )


# -- forward -----------------------------------------------------------------------


def test_each_stage_answers_its_own_field_from_its_own_input() -> None:
    learned = f'{FIRST} If the message mentions "frustrated", the feeling is unhappy.'
    assert answer(FIRST, MESSAGE) == "neutral"  # no rule matches: uninformative
    assert answer(learned, MESSAGE) == "unhappy"
    # the second stage reads the first's output only, never the message
    assert answer(SECOND, "neutral") == "neutral"
    assert answer(SECOND, answer(learned, MESSAGE)) == "negative"
    assert answer(SECOND, "happy") == "positive"
    json_answer = world.render_content(
        world.answer(
            world.SimRequest.from_messages(
                [
                    {"role": "system", "content": learned},
                    {"role": "user", "content": MESSAGE},
                ]
            )
        ),
        {"type": "json_object"},
    )
    assert json.loads(json_answer) == {"feeling": "unhappy"}


# -- backward, downstream: the relay -------------------------------------------------


def test_the_computed_input_is_told_the_value_that_leads_to_the_target() -> None:
    assert gradients_of(second_stage()) == [
        # "neutral" holds no lexicon word: the second prompt gets no rule
        'The second prompt should lead to "negative" for inputs like this one. No '
        "rule can be written: the input holds no evaluative word (SALIENCE_LEXICON) "
        "that the rule for the sentiment could name.",
        RELAY,
    ]


def test_the_relay_names_the_first_rule_for_the_target() -> None:
    feedback = EVAL_FEEDBACK.replace('"negative"', '"positive"')
    system = f'{SECOND} If the message mentions "glad", the sentiment is positive.'
    assert gradients_of(second_stage(feedback, system=system))[1] == (
        'The feeling should contain "happy": the expected value is "happy", since the '
        'rule for "happy" gives the sentiment "positive".'
    )


@pytest.mark.parametrize(
    ("why", "system", "feedback", "variables"),
    [
        (
            "the target is the default label",
            SECOND,
            EVAL_FEEDBACK.replace('"negative"', '"neutral"'),
            None,
        ),
        (
            "no rule maps a value to the target",
            'If the message mentions "unhappy", the sentiment is mildly negative.',
            EVAL_FEEDBACK,
            None,
        ),
        (
            "an earlier rule takes the value over",
            'If the message mentions "unhappy", the sentiment is positive. '
            'If the message mentions "unhappy", the sentiment is negative.',
            EVAL_FEEDBACK,
            None,
        ),
        (
            "the rule names another field than the answered one",
            'If the message mentions "happy", the sentiment is positive. '
            'If the message mentions "unhappy", the tone is negative.',
            EVAL_FEEDBACK.replace("expected value", "expected sentiment"),
            [SECOND_VAR, FEELING_VAR, ("notes", "user", False, "x")],
        ),
    ],
)
def test_no_relay_when_no_value_leads_to_the_target(
    why: str, system: str, feedback: str, variables: list[Var] | None
) -> None:
    gradients = gradients_of(second_stage(feedback, variables, system=system))
    assert all("should contain" not in g for g in gradients), why
    target = "neutral" if 'is "neutral"' in feedback else "negative"
    assert gradients[1] == f'The feeling should lead to "{target}" for this input.'


def test_only_computed_inputs_get_the_relay() -> None:
    variables: list[Var] = [
        ("trainable template", "user", True, "{feeling}"),  # a leaf being optimized
        ("frozen instructions", "system", False, "Be brief."),  # not an input
        ("feeling", "user", False, "neutral"),  # a computed user message
        ("feeling", "human", False, "neutral"),  # LangChain's name for "user"
        FEELING_VAR,
    ]
    relay_to = [
        g.startswith("The feeling should contain")
        for g in gradients_of(second_stage(variables=variables))
    ]
    assert relay_to == [False, False, True, True, True]


def test_a_dspy_predictor_relays_from_its_instructions() -> None:
    system = (
        "Your input fields are:\n1. `feeling` (str): \n"
        "Your output fields are:\n1. `sentiment` (str): \n"
        "All interactions will be structured in the following way...\n"
        f"In adhering to this structure, your objective is: \n        {FEELINGS}"
    )
    user = (
        "[[ ## feeling ## ]]\nneutral\n\nRespond with the corresponding output "
        "fields, starting with the field `[[ ## sentiment ## ]]`."
    )
    prompt = chat_backward_user(
        [("system", system), ("user", user)],
        EVAL_FEEDBACK,
        [("instructions", "system", True, FEELINGS), FEELING_VAR],
    )
    assert gradients_of(prompt)[1] == RELAY


# -- backward, upstream: the rule for the intermediate field --------------------------


@pytest.mark.parametrize(
    "feedback",
    [
        RELAY,
        # as it reaches the first call through a parser and a lambda of a chain
        "(feedback on the output of the RunnableLambda step, computed from this "
        "output of the StrOutputParser step) (feedback on the output of the "
        "StrOutputParser step, computed from this response) " + RELAY,
    ],
)
def test_the_upstream_prompt_gets_a_rule_for_its_own_field(feedback: str) -> None:
    prompt = chat_backward_user(
        [("system", FIRST), ("user", MESSAGE)],
        feedback,
        [("first prompt", "system", True, FIRST)],
    )
    rule = 'If the message mentions "frustrated", the feeling is unhappy.'
    assert gradients_of(prompt) == [rule]
    assert answer(world.improve_value(FIRST, rule), MESSAGE) == "unhappy"


# -- end to end through afnio's graph ------------------------------------------------


def two_stage(
    client: Any, first: Variable, second: Variable, messages: list[str]
) -> Variable:
    """The two-stage program on ``messages``: a call with the system prompt ``first``
    names each message's feeling, a second call with ``second`` classifies the
    sentiment of that feeling (its output)."""
    feeling = ChatCompletion.apply(
        client,
        [
            {"role": "system", "content": [first]},
            {"role": "user", "content": [Variable("{message}")]},
        ],
        inputs={"message": messages},
        model=SIMULATOR_MODEL,
    )
    return ChatCompletion.apply(
        client,
        [
            {"role": "system", "content": [second]},
            {"role": "user", "content": [Variable("{feeling}")]},
        ],
        inputs={"feeling": feeling},
        model=SIMULATOR_MODEL,
    )


def test_one_step_teaches_the_first_prompt_what_the_second_needs() -> None:
    with (
        Simulator() as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        first = Variable(FIRST, role="first prompt", requires_grad=True)
        second = Variable(SECOND, role="second prompt", requires_grad=True)
        messages = ["I am frustrated: the lift is broken.", "Great gym, thank you."]

        def run() -> Variable:
            return two_stage(client, first, second, messages)

        assert run().data == ["neutral", "neutral"]
        _, explanation = ExactMatchEvaluator.apply(run(), ["negative", "positive"])
        explanation.backward()
        assert first.grad[0].data == [
            'If the message mentions "frustrated", the feeling is unhappy.',
            'If the message mentions "great", the feeling is happy.',
        ]
        optimizer = TGD([first, second], model_client=client, model=SIMULATOR_MODEL)
        optimizer.step()
        assert second.data == SECOND  # its feedback held no rule
        assert run().data == ["negative", "positive"]
