"""The judge and feedback responders of the rule world, with requests rendered from
afnio's real prompt templates (``afnio.autodiff.prompts``), as pure functions and
through the HTTP simulator with the real ``openai`` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from afnio._template import render
from afnio.autodiff import prompts
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_SYSTEM,
    CHAT_BACKWARD_USER,
    EVALUATOR_BACKWARD_SYSTEM,
    EVALUATOR_BACKWARD_USER,
    EVALUATOR_SAMPLE_ELEMENT,
    MESSAGE_ELEMENT,
    RETRY_USER,
    VARIABLE_ELEMENT,
    gradients_response_format,
    judge_response_format,
)
from afnio.testing import SIMULATOR_MODEL, Fault, Simulator, world

# -- rendering afnio's templates -------------------------------------------------------

Var = tuple[str, str, bool, str]  # role, location, trainable, text


def _conversation(messages: list[tuple[str, str]]) -> str:
    return "\n".join(
        render(MESSAGE_ELEMENT, {"role": role, "content": content})
        for role, content in messages
    )


def _variables(variables: list[Var]) -> str:
    return "\n".join(
        render(
            VARIABLE_ELEMENT,
            {
                "index": i,
                "role": role,
                "location": location,
                "trainable": "true" if trainable else "false",
                "text": text,
            },
        )
        for i, (role, location, trainable, text) in enumerate(variables, start=1)
    )


def chat_backward_user(
    conversation: list[tuple[str, str]],
    feedback: str,
    variables: list[Var],
    *,
    output: str = "neutral",
    count: int | None = None,
) -> str:
    return render(
        CHAT_BACKWARD_USER,
        {
            "conversation": _conversation(conversation),
            "output_role": "assistant",
            "output": output,
            "feedback": feedback,
            "count": len(variables) if count is None else count,
            "variables": _variables(variables),
        },
    )


def evaluator_backward_user(
    prediction: str,
    target: str,
    variables: list[Var],
    *,
    input: str = "It broke.",
    more: list[tuple[str, str, str]] = (),  # further samples: input, prediction, target
    explanation: str = "The scores were summed: 0.",
) -> str:
    samples = [(input, prediction, target), *more]
    return render(
        EVALUATOR_BACKWARD_USER,
        {
            "purpose": "exact match",
            "explanation": explanation,
            "feedback": "Make the score higher.",
            "variable_count": len(variables),
            "variables": _variables(variables),
            "sample_count": len(samples),
            "samples": "\n".join(
                render(
                    EVALUATOR_SAMPLE_ELEMENT,
                    {
                        "index": i,
                        "input": sample_input,
                        "prediction_role": "sentiment prediction",
                        "prediction": sample_prediction,
                        "target": sample_target,
                        "score": 0,
                        "details": "",
                    },
                )
                for i, (sample_input, sample_prediction, sample_target) in enumerate(
                    samples, start=1
                )
            ),
            "count": len(variables) * len(samples),
        },
    )


def _chat_messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _request(
    system: str, user: str, response_format: dict[str, Any] | None = None
) -> world.SimRequest:
    return world.SimRequest.from_messages(
        _chat_messages(system, user), response_format=response_format
    )


def gradients_of(user: str, system: str = CHAT_BACKWARD_SYSTEM) -> list[str]:
    """The gradients the pure world answers (the content parsed as the real client
    does)."""
    content = world.respond(_request(system, user, gradients_response_format()))
    data = json.loads(content)
    assert list(data) == ["gradients"]
    return data["gradients"]


TASK_SYSTEM = "Classify the sentiment of the customer message."
SYSTEM_VAR: Var = ("system prompt", "system", True, TASK_SYSTEM)
TEMPLATE_VAR: Var = ("user message template", "user", False, "{message}")
COMPLAINT = "Frustrated and upset: the parcel is late again."
EVAL_FEEDBACK = (
    'The prediction "neutral" is wrong: the expected value is "negative". Change what '
    'produces it so that this input leads to "negative".'
)


def complaint_prompt(feedback: str = EVAL_FEEDBACK, **kwargs: Any) -> str:
    return chat_backward_user(
        [("system", TASK_SYSTEM), ("user", COMPLAINT)],
        feedback,
        kwargs.pop("variables", [SYSTEM_VAR, TEMPLATE_VAR]),
        **kwargs,
    )


# -- the markers are afnio's -----------------------------------------------------------


def test_schema_names_are_afnios() -> None:
    assert world.JUDGE_SCHEMA_NAME == prompts.JUDGE_SCHEMA_NAME == "afnio_judgement"
    assert world.GRADIENTS_SCHEMA_NAME == prompts.GRADIENTS_SCHEMA_NAME
    assert judge_response_format()["json_schema"]["name"] == world.JUDGE_SCHEMA_NAME


def test_each_responder_recognises_its_template_only() -> None:
    chat = _request(CHAT_BACKWARD_SYSTEM, complaint_prompt())
    evaluator = _request(
        EVALUATOR_BACKWARD_SYSTEM, evaluator_backward_user("x", "y", [SYSTEM_VAR])
    )
    assert world.chat_backward_responder(chat) is not None
    assert world.evaluator_backward_responder(chat) is None
    assert world.evaluator_backward_responder(evaluator) is not None
    assert world.chat_backward_responder(evaluator) is None
    assert world.judge_responder(chat) is None
    assert world.answer(chat).responder == "chat_backward"
    assert world.answer(evaluator).responder == "evaluator_backward"
    # the markers must be in a user message: the system prompt alone names them
    only_system = _request(CHAT_BACKWARD_SYSTEM + EVALUATOR_BACKWARD_SYSTEM, "hi")
    assert world.answer(only_system).responder == "fallback"


# -- ChatCompletion backward -----------------------------------------------------------


def test_trainable_system_prompt_gets_a_rule() -> None:
    assert gradients_of(complaint_prompt()) == [
        'If the message mentions "frustrated", the sentiment is negative.',
        'The user message template should lead to "negative" for this input.',
    ]


NO_FIELD = (
    " The prompt names no field (no rule, no JSON object in the output, no "
    '"classify the <field>" phrase), so the rule names the sentiment.'
)


def test_the_rule_word_is_the_first_lexicon_word_alphabetically() -> None:
    # "upset" comes first in the text, "angry" first in the alphabet
    user = "Upset, angry and TOP-NOTCH-ly confused."
    prompt = chat_backward_user([("user", user)], EVAL_FEEDBACK, [SYSTEM_VAR])
    assert gradients_of(prompt) == [
        'If the message mentions "angry", the sentiment is negative.' + NO_FIELD
    ]
    # a hyphenated lexicon word matches as a whole word, any case
    prompt = chat_backward_user(
        [("user", "A Top-Notch job")], EVAL_FEEDBACK, [SYSTEM_VAR]
    )
    assert gradients_of(prompt) == [
        'If the message mentions "top-notch", the sentiment is negative.' + NO_FIELD
    ]
    prompt = chat_backward_user(
        [("user", "My great-grandson")], EVAL_FEEDBACK, [SYSTEM_VAR]
    )
    assert gradients_of(prompt) == [
        'The system prompt should lead to "negative" for inputs like this one. No '
        "rule can be written: the input holds no evaluative word (SALIENCE_LEXICON) "
        "that the rule for the sentiment could name." + NO_FIELD
    ]
    assert world.salient_word("so-called great-ish, non-upset") is None
    assert world.salient_word("Great, (UPSET)") == "great"


def test_the_field_comes_from_an_existing_rule() -> None:
    system = (
        "Sort the ticket. "
        'If the message mentions "invoice", the topic is billing. '
        'If the message mentions "refund", the mood is angry.'
    )
    # the rule in the user message mentions "great": rule sentences are not input
    user = 'If the message mentions "great", the topic is praise. Awful delay!'
    prompt = chat_backward_user(
        [("system", system), ("user", user)],
        'The prediction "billing" is wrong: the expected value is "shipping".',
        [("system prompt", "system", True, system)],
    )
    # "topic" is no affect field: the rule names the input's lead word
    assert gradients_of(prompt) == [
        'If the message begins with "awful", the topic is shipping.'
    ]


def test_only_the_first_trainable_system_variable_gets_the_rule() -> None:
    variables: list[Var] = [
        ("frozen instructions", "system", False, "Be brief."),
        ("output format", "user", True, "Answer in one word."),
        SYSTEM_VAR,
        ("second system prompt", "system", True, "Be kind."),
    ]
    assert gradients_of(complaint_prompt(variables=variables)) == [
        'The frozen instructions should lead to "negative" for this input.',
        'The output format should lead to "negative" for this input.',
        'If the message mentions "frustrated", the sentiment is negative.',
        'The second system prompt should lead to "negative" for this input.',
    ]


def test_target_without_a_salient_word() -> None:
    prompt = chat_backward_user(
        [("system", TASK_SYSTEM), ("user", "Where is my parcel?")],
        EVAL_FEEDBACK,
        [SYSTEM_VAR, TEMPLATE_VAR],
    )
    assert gradients_of(prompt) == [
        'The system prompt should lead to "negative" for inputs like this one. No '
        "rule can be written: the input holds no evaluative word (SALIENCE_LEXICON) "
        "that the rule for the sentiment could name.",
        'The user message template should lead to "negative" for this input.',
    ]


def test_expected_value_without_is_is_accepted() -> None:
    feedback = 'Wrong label; the expected value "positive" was not produced.'
    assert gradients_of(complaint_prompt(feedback)) == [
        'If the message mentions "frustrated", the sentiment is positive.',
        'The user message template should lead to "positive" for this input.',
    ]


def test_feedback_without_a_target() -> None:
    feedback = "  Be more careful with sarcasm.\n"
    assert gradients_of(complaint_prompt(feedback)) == [
        "The system prompt should address this feedback: Be more careful with sarcasm.",
        "The user message template should address this feedback: Be more careful "
        "with sarcasm.",
    ]
    long = "x" * 150 + " " + "y" * 150
    gradients = gradients_of(complaint_prompt(long))
    assert gradients[0] == (
        "The system prompt should address this feedback: " + long[:200]
    )
    assert all(g for g in gradients)


@pytest.mark.parametrize("feedback", ["", "   \n\t "])
def test_empty_feedback_gives_empty_gradients(feedback: str) -> None:
    variables = [SYSTEM_VAR, TEMPLATE_VAR, ("style", "user", False, "Be nice.")]
    assert gradients_of(complaint_prompt(feedback, variables=variables)) == [
        "",
        "",
        "",
    ]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_one_gradient_per_variable_element(n: int) -> None:
    variables = [(f"part {i}", "user", False, f"text {i}") for i in range(n)]
    gradients = gradients_of(complaint_prompt(variables=variables))
    assert gradients == [
        f'The part {i} should lead to "negative" for this input.' for i in range(n)
    ]


def test_the_parsed_elements_win_over_the_count_attribute() -> None:
    prompt = complaint_prompt(count=5)
    assert '<VARIABLES count="5">' in prompt
    assert len(gradients_of(prompt)) == 2
    assert len(gradients_of(complaint_prompt(variables=[], count=1))) == 0


def test_braces_quotes_and_lines_in_variable_text_survive() -> None:
    tricky = (
        'Answer as {"label": "<one of: positive, negative>"}.\n'
        "Never write {message} or {{x}}; \"quote\" it 'as is'.\n"
        'If the message mentions "late", the sentiment is mildly negative.'
    )
    variables: list[Var] = [
        ("instructions", "system", True, tricky),
        ("message {template}", "user", False, 'Message: "{message}"\n---'),
        ("notes", "user", False, "</MESSAGE> } {"),
    ]
    prompt = chat_backward_user(
        [("system", tricky), ("user", 'He said "Frustrating!" {x}')],
        EVAL_FEEDBACK,
        variables,
    )
    assert tricky in prompt  # render() left the braces alone
    assert gradients_of(prompt) == [
        'If the message mentions "frustrating", the sentiment is negative.',
        'The message {template} should lead to "negative" for this input.',
        'The notes should lead to "negative" for this input.',
    ]


def test_attributes_and_multiline_elements_are_tolerated() -> None:
    prompt = (
        '<LM_CONVERSATION id="7">\n'
        '<MESSAGE  role="system" index="1">\nSort it.\n</MESSAGE>\n'
        "<MESSAGE role='user'>\nI am\nupset\n</MESSAGE>\n"
        "</LM_CONVERSATION>\n"
        '<FEEDBACK_ON_OUTPUT source="evaluator">\nthe expected value is "negative"\n'
        "</FEEDBACK_ON_OUTPUT>\n"
        '<VARIABLES count="1" kind="prompts">\n'
        '<VARIABLE trainable="true" location="system" role="a > b" index="1">\n'
        "Sort it.\n</VARIABLE>\n</VARIABLES>"
    )
    assert gradients_of(prompt) == [
        'If the message mentions "upset", the sentiment is negative.' + NO_FIELD
    ]


def test_a_backward_prompt_holding_rules_gets_gradients_not_a_label() -> None:
    rule = 'If the message mentions "late", the sentiment is mildly negative.'
    prompt = chat_backward_user(
        [("system", f"{TASK_SYSTEM} {rule}"), ("user", COMPLAINT)],
        EVAL_FEEDBACK,
        [("system prompt", "system", True, f"{TASK_SYSTEM} {rule}")],
    )
    # the task responder alone would answer the rule's label
    request = _request(CHAT_BACKWARD_SYSTEM, prompt)
    assert world.task_responder(request) == world.Answer(
        "mildly negative", field="sentiment", responder="task"
    )
    assert world.answer(request).responder == "chat_backward"
    assert gradients_of(prompt) == [
        'If the message mentions "frustrated", the sentiment is negative.'
    ]


def test_a_retry_is_answered_from_the_first_backward_message() -> None:
    messages = [
        *_chat_messages(CHAT_BACKWARD_SYSTEM, complaint_prompt()),
        {"role": "assistant", "content": "not json"},
        {
            "role": "user",
            "content": render(RETRY_USER, {"error": "not JSON", "count": 2}),
        },
    ]
    request = world.SimRequest.from_messages(
        messages, response_format=gradients_response_format()
    )
    assert json.loads(world.respond(request))["gradients"][0] == (
        'If the message mentions "frustrated", the sentiment is negative.'
    )


def test_the_rule_closes_the_loop_with_the_task_responder() -> None:
    rule = gradients_of(complaint_prompt())[0]
    improved = f"{TASK_SYSTEM} {rule}"
    assert world.respond(_request(improved, COMPLAINT)) == "negative"
    assert world.respond(_request(TASK_SYSTEM, COMPLAINT)) == "neutral"


# -- evaluator backward ----------------------------------------------------------------


def test_evaluator_backward_gradients() -> None:
    variables: list[Var] = [
        ("sentiment prediction", "prediction", True, "neutral"),
        ("system prompt", "system", True, TASK_SYSTEM),
        ("judge instructions", "input:rubric", False, 'Say "yes" {or} no.'),
    ]
    user = evaluator_backward_user(" neutral ", "negative\n", variables)
    content = world.respond(
        _request(EVALUATOR_BACKWARD_SYSTEM, user, gradients_response_format())
    )
    assert json.loads(content) == {
        "gradients": [
            'The prediction "neutral" is wrong: the expected value is "negative". '
            'Change what produces it so that this input leads to "negative".',
            'The system prompt should lead to the expected value "negative" for this '
            "input.",
            'The judge instructions should lead to the expected value "negative" for '
            "this input.",
        ]
    }


def test_evaluator_backward_parses_the_sample_not_the_explanation() -> None:
    user = evaluator_backward_user(
        'A "quoted"\nanswer {x}',
        "B",
        [("answer", "prediction", False, prompts.PREDICTION_PLACEHOLDER)],
        input='<MESSAGE role="user">It\'s {late}</MESSAGE>',
        explanation="Compared <PREDICTION> and <TARGET> fields.",
    )
    prompt = world.EvaluatorBackwardPrompt.parse(user)
    [sample] = prompt.samples
    assert sample.input == '<MESSAGE role="user">It\'s {late}</MESSAGE>'
    assert sample.prediction == 'A "quoted"\nanswer {x}'
    assert sample.target == "B"
    assert [v.location for v in prompt.variables] == ["prediction"]
    assert world.evaluator_backward_gradients(prompt) == [
        'The prediction "A "quoted"\nanswer {x}" is wrong: the expected value is "B". '
        'Change what produces it so that this input leads to "B".'
    ]


def test_markup_inside_texts_is_not_read_as_samples_or_variables() -> None:
    user = evaluator_backward_user(
        "neutral",
        "negative",
        [("sentiment", "prediction", False, prompts.PREDICTION_PLACEHOLDER)],
        input='It broke. <SAMPLE index="9"> and </VARIABLES> inside the text',
        explanation="No <SAMPLE> here.",
        more=[("Thanks </VARIABLES>", "neutral", "positive")],
    )
    prompt = world.EvaluatorBackwardPrompt.parse(user)
    assert [(s.prediction, s.target) for s in prompt.samples] == [
        ("neutral", "negative"),
        ("neutral", "positive"),
    ]
    assert len(prompt.variables) == 1


def test_evaluator_backward_answers_every_sample_of_a_group_in_order() -> None:
    variables: list[Var] = [
        ("sentiment prediction", "prediction", True, prompts.PREDICTION_PLACEHOLDER),
        ("system prompt", "system", True, TASK_SYSTEM),
    ]
    user = evaluator_backward_user(
        "neutral",
        "negative",
        variables,
        more=[("Thanks!", "neutral", "positive"), ("Ok.", "positive", "neutral")],
    )
    prompt = world.EvaluatorBackwardPrompt.parse(user)
    assert [(s.prediction, s.target) for s in prompt.samples] == [
        ("neutral", "negative"),
        ("neutral", "positive"),
        ("positive", "neutral"),
    ]
    gradients = json.loads(world.respond(_request(EVALUATOR_BACKWARD_SYSTEM, user)))[
        "gradients"
    ]
    assert len(gradients) == 6
    assert gradients[2] == (
        'The prediction "neutral" is wrong: the expected value is "positive". '
        'Change what produces it so that this input leads to "positive".'
    )
    assert gradients[5] == (
        'The system prompt should lead to the expected value "neutral" for this input.'
    )


def test_the_evaluator_gradient_feeds_the_chat_backward() -> None:
    user = evaluator_backward_user(
        "neutral", "negative", [("sentiment", "prediction", False, "neutral")]
    )
    feedback = json.loads(world.respond(_request(EVALUATOR_BACKWARD_SYSTEM, user)))
    prompt = complaint_prompt(feedback["gradients"][0])
    assert gradients_of(prompt)[0] == (
        'If the message mentions "frustrated", the sentiment is negative.'
    )


# -- judge -----------------------------------------------------------------------------


JUDGE_SYSTEM = "Decide whether the prediction means the same as the target."


def judge(prediction: str | None, target: str | None, **kwargs: Any) -> dict:
    user = "Compare the <PREDICTION> with the <TARGET>.\n"
    if prediction is not None:
        user += f'<PREDICTION role="answer">{prediction}</PREDICTION>\n'
    if target is not None:
        user += f"<TARGET>{target}</TARGET>"
    request = _request(
        kwargs.get("system", JUDGE_SYSTEM), user, judge_response_format()
    )
    return json.loads(world.respond(request))


def test_judge_match_and_mismatch() -> None:
    assert judge(" Ciao Mondo\n", "ciao mondo") == {
        "score": True,
        "explanation": 'The prediction "Ciao Mondo" matches the target "ciao mondo".',
    }
    assert judge("Hola Mundo", "Ciao Mondo") == {
        "score": False,
        "explanation": 'The prediction "Hola Mundo" does not match the target '
        '"Ciao Mondo".',
    }


def test_judge_missing_tags() -> None:
    missing = {
        "score": False,
        "explanation": "No <PREDICTION> and <TARGET> to compare.",
    }
    assert judge("yes", None) == missing
    assert judge(None, "yes") == missing
    assert judge(None, None) == missing


def test_judge_compares_json_values() -> None:
    assert judge('{"a": 1, "b": ["X"]}', '{ "b":["x"],\n "a":1.0 }')["score"] is True
    assert judge("[1, 2]", "[2, 1]")["score"] is False
    assert judge("true", "1")["score"] is False
    assert judge("3", "3.0")["score"] is True
    assert judge("NaN", "nan")["score"] is True  # not JSON: compared as text


def test_judge_reads_elements_across_messages_and_ignores_rules() -> None:
    rule = 'If the message mentions "yes", the verdict is maybe.'
    request = world.SimRequest.from_messages(
        [
            {"role": "system", "content": f"<TARGET>\n  Yes\n</TARGET> {rule}"},
            {"role": "user", "content": "<PREDICTION>yes</PREDICTION>"},
        ],
        response_format=judge_response_format(),
    )
    assert world.answer(request).responder == "judge"
    assert json.loads(world.respond(request)) == {
        "score": True,
        "explanation": 'The prediction "yes" matches the target "Yes".',
    }
    # without the afnio_judgement schema, it is an ordinary task prompt
    plain = world.SimRequest.from_messages(
        [{"role": "system", "content": rule}, {"role": "user", "content": "yes"}]
    )
    assert world.respond(plain) == "maybe"


def test_judge_answers_under_every_format() -> None:
    user = "<PREDICTION>a</PREDICTION><TARGET>b</TARGET>"
    request = _request(JUDGE_SYSTEM, user, judge_response_format())
    result = world.answer(request)
    expected = {
        "score": False,
        "explanation": 'The prediction "a" does not match the target "b".',
    }
    assert json.loads(result.label) == expected  # the plain-text form
    assert json.loads(world.render_content(result, {"type": "json_object"})) == (
        expected
    )


# -- through the HTTP server with the openai SDK --------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Simulator, openai.OpenAI]]:
    with (
        Simulator() as sim,
        openai.OpenAI(base_url=sim.base_url, api_key="test", max_retries=0) as c,
    ):
        yield sim, c


@pytest.fixture
def client(served: tuple[Simulator, openai.OpenAI]) -> openai.OpenAI:
    served[0].clear_faults()
    return served[1]


def _chat(
    client: openai.OpenAI,
    system: str,
    user: str,
    response_format: dict[str, Any] | None = None,
) -> str:
    kwargs: dict[str, Any] = {}
    if response_format is not None:
        kwargs["response_format"] = response_format
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_chat_messages(system, user), **kwargs
    )
    return reply.choices[0].message.content or ""


def test_http_chat_backward(client: openai.OpenAI) -> None:
    content = _chat(
        client, CHAT_BACKWARD_SYSTEM, complaint_prompt(), gradients_response_format()
    )
    assert json.loads(content) == {
        "gradients": [
            'If the message mentions "frustrated", the sentiment is negative.',
            'The user message template should lead to "negative" for this input.',
        ]
    }
    # without response_format: the same JSON text; json_object: the same object
    assert _chat(client, CHAT_BACKWARD_SYSTEM, complaint_prompt()) == content
    as_object = _chat(
        client, CHAT_BACKWARD_SYSTEM, complaint_prompt(), {"type": "json_object"}
    )
    assert json.loads(as_object) == json.loads(content)
    empty = _chat(
        client, CHAT_BACKWARD_SYSTEM, complaint_prompt(""), gradients_response_format()
    )
    assert json.loads(empty) == {"gradients": ["", ""]}


def test_http_evaluator_backward(client: openai.OpenAI) -> None:
    user = evaluator_backward_user(
        "neutral", "negative", [("sentiment", "prediction", True, "neutral")]
    )
    content = _chat(
        client, EVALUATOR_BACKWARD_SYSTEM, user, gradients_response_format()
    )
    assert json.loads(content) == {
        "gradients": [
            'The prediction "neutral" is wrong: the expected value is "negative". '
            'Change what produces it so that this input leads to "negative".'
        ]
    }


def test_http_judge(client: openai.OpenAI) -> None:
    fmt = judge_response_format()
    user = "<PREDICTION>Salve a tutti</PREDICTION>\n<TARGET>salve a tutti</TARGET>"
    assert json.loads(_chat(client, JUDGE_SYSTEM, user, fmt)) == {
        "score": True,
        "explanation": 'The prediction "Salve a tutti" matches the target '
        '"salve a tutti".',
    }
    missing = json.loads(_chat(client, JUDGE_SYSTEM, "nothing here", fmt))
    assert missing == {
        "score": False,
        "explanation": "No <PREDICTION> and <TARGET> to compare.",
    }


def test_http_priority_over_the_task_responder(client: openai.OpenAI) -> None:
    rule = 'If the message mentions "frustrated", the sentiment is angry.'
    prompt = chat_backward_user(
        [("system", rule), ("user", COMPLAINT)], EVAL_FEEDBACK, [SYSTEM_VAR]
    )
    content = _chat(client, rule, prompt)  # the rule is in the system message too
    assert json.loads(content) == {
        "gradients": [
            'If the message mentions "frustrated", the sentiment is negative.'
        ]
    }


def test_http_legacy_completions_get_gradients_too(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=SIMULATOR_MODEL, prompt=complaint_prompt())
    assert json.loads(reply.choices[0].text)["gradients"][1] == (
        'The user message template should lead to "negative" for this input.'
    )


@pytest.mark.parametrize(
    "response_format", [gradients_response_format(), None], ids=["schema", "plain"]
)
def test_http_malformed_json_cuts_the_gradients(
    served: tuple[Simulator, openai.OpenAI],
    client: openai.OpenAI,
    response_format: dict[str, Any] | None,
) -> None:
    sim = served[0]
    good = _chat(client, CHAT_BACKWARD_SYSTEM, complaint_prompt(), response_format)
    sim.inject(Fault.MALFORMED_JSON)
    bad = _chat(client, CHAT_BACKWARD_SYSTEM, complaint_prompt(), response_format)
    assert bad and good.startswith(bad) and len(bad) < len(good)
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad)


def test_http_malformed_json_cuts_the_judgement(
    served: tuple[Simulator, openai.OpenAI], client: openai.OpenAI
) -> None:
    user = "<PREDICTION>a</PREDICTION><TARGET>a</TARGET>"
    good = _chat(client, JUDGE_SYSTEM, user, judge_response_format())
    served[0].inject(Fault.MALFORMED_JSON)
    bad = _chat(client, JUDGE_SYSTEM, user, judge_response_format())
    assert good.startswith(bad) and len(bad) < len(good)
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad)
