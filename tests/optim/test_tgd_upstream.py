"""Upstream afnio's TGD calls run unchanged: its placeholder messages
(``TGD_MESSAGES``) get afnio's default prompt, and custom messages that cannot show the
LM the parameter's value or feedback are warned about (issue 18, item 8)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from afnio import Variable
from afnio.cognitive import Parameter
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD, prompts, tgd
from afnio.optim.tgd import TGD_MESSAGES, TGDMessagesWarning
from afnio.testing import SIMULATOR_MODEL
from tests.conftest import LMEndpoint

BASE = "Classify the sentiment of the customer message."
RULE_AWFUL = 'If the message mentions "awful", the sentiment is negative.'
RULE_LOVE = 'If the message mentions "love", the sentiment is positive.'
SYSTEM_PLACEHOLDER = "Placeholder for Textual Gradient Descent optimizer system prompt"
USER_PLACEHOLDER = "Placeholder for Textual Gradient Descent optimizer user prompt"


def upstream_messages(system: str = SYSTEM_PLACEHOLDER) -> list[dict[str, Any]]:
    """The placeholder messages exactly as upstream's own tests build them."""
    return [
        {
            "role": "system",
            "content": [
                Variable(
                    data=system,
                    role="Textual Gradient Descent optimizer system prompt",
                )
            ],
        },
        {
            "role": "user",
            "content": [
                Variable(
                    data=USER_PLACEHOLDER,
                    role="Textual Gradient Descent optimizer user prompt",
                )
            ],
        },
    ]


class Recording(ChatCompletionModel):
    """Records every chat it gets; answers with a fixed improved value."""

    def __init__(self, value: str = "IMPROVED VALUE") -> None:
        super().__init__(provider="recording")
        self.value = value
        self.chats: list[list[dict[str, Any]]] = []

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.chats.append(messages)
        return json.dumps({"improved_value": self.value})

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        pass


def _all_text(chat: list[dict[str, Any]]) -> str:
    return "\n".join(m["content"] for m in chat)


# -- TGD_MESSAGES --------------------------------------------------------------------


def test_tgd_messages_is_upstreams_placeholder_list() -> None:
    assert [m["role"] for m in TGD_MESSAGES] == ["system", "user"]
    assert [[v.data for v in m["content"]] for m in TGD_MESSAGES] == [
        [SYSTEM_PLACEHOLDER],
        [USER_PLACEHOLDER],
    ]
    assert [[v.role for v in m["content"]] for m in TGD_MESSAGES] == [
        ["Textual Gradient Descent optimizer system prompt"],
        ["Textual Gradient Descent optimizer user prompt"],
    ]
    import afnio.optim

    assert afnio.optim.TGD_MESSAGES is TGD_MESSAGES


# -- placeholders give the default prompt (simulator, replayed from cassettes) -------


@pytest.mark.afnio_replay
def test_upstream_functional_tgd_call_sends_the_default_prompt_and_updates_sensibly(
    lm: LMEndpoint, vcr: Any
) -> None:
    param = Variable(data=BASE, role="system prompt", requires_grad=True)
    grad_1 = Variable(data=RULE_AWFUL, role="gradient")
    grad_2 = Variable(data=RULE_LOVE, role="gradient")
    momentum_buffer_list: list[list[Any]] = [[]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # placeholders are not "custom" messages
        tgd(  # upstream's own test, call for call
            params=[param],
            grads=[[grad_1, grad_2]],
            momentum_buffer_list=momentum_buffer_list,
            model_client=lm.client(),
            messages=upstream_messages(),
            inputs={},
            constraints=[],
            momentum=2,
            model=SIMULATOR_MODEL,
        )
    (request,) = vcr.sent_requests
    sent = json.loads(request.body)["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert sent[0]["content"] == prompts.TGD_SYSTEM
    user = sent[1]["content"]
    assert "Placeholder" not in _all_text(sent)
    assert "<VARIABLE_ROLE>system prompt</VARIABLE_ROLE>" in user
    assert f"<CURRENT_VALUE>{BASE}</CURRENT_VALUE>" in user
    assert f"- {RULE_AWFUL}" in user and f"- {RULE_LOVE}" in user
    assert param.data == f"{BASE} {RULE_AWFUL} {RULE_LOVE}"
    ((snapshot, saved),) = momentum_buffer_list[0]
    assert snapshot.data == BASE and saved == [grad_1, grad_2]


@pytest.mark.afnio_replay
def test_tgd_class_with_tgd_messages_sends_the_default_prompt(
    lm: LMEndpoint, vcr: Any
) -> None:
    prompt = Parameter(BASE, role="system prompt")
    prompt.append_grad(Variable(RULE_AWFUL, role="feedback"))
    optimizer = TGD(
        [prompt], model_client=lm.client(), messages=TGD_MESSAGES, model=SIMULATOR_MODEL
    )
    group_texts = [
        v.data for m in optimizer.param_groups[0]["messages"] for v in m["content"]
    ]
    assert group_texts == [prompts.TGD_SYSTEM, prompts.TGD_USER]
    optimizer.step()
    sent = json.loads(vcr.sent_requests[0].body)["messages"]
    assert sent[0]["content"] == prompts.TGD_SYSTEM
    assert f"<CURRENT_VALUE>{BASE}</CURRENT_VALUE>" in sent[1]["content"]
    assert prompt.data == f"{BASE} {RULE_AWFUL}"


# -- placeholders, no HTTP -----------------------------------------------------------


@pytest.mark.parametrize(
    "system",
    [
        SYSTEM_PLACEHOLDER,
        # the spelling of upstream's Module.optimizers() docstring
        "Placeholder Textual Gradient Descent optimizer system prompt",
    ],
)
def test_placeholder_spellings_are_recognised(system: str) -> None:
    client = Recording()
    param = Parameter("Old value.", role="instructions")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tgd(
            [param],
            [[Variable("Be shorter.")]],
            [[]],
            client,
            upstream_messages(system),
        )
    (chat,) = client.chats
    assert chat[0]["content"] == prompts.TGD_SYSTEM
    assert "<CURRENT_VALUE>Old value.</CURRENT_VALUE>" in chat[1]["content"]
    assert "- Be shorter." in chat[1]["content"]
    assert param.data == "IMPROVED VALUE"


def test_placeholders_next_to_a_shot_keep_the_shot() -> None:
    client = Recording()
    shot = {"role": "user", "content": [Variable("Example: 'Hi' became 'Hello'.")]}
    messages = [*upstream_messages(), shot]
    param = Parameter("Hi", role="greeting")
    param.append_grad(Variable("Be formal."))
    TGD([param], model_client=client, messages=messages).step()
    (chat,) = client.chats
    assert chat[0]["content"] == prompts.TGD_SYSTEM
    assert "<CURRENT_VALUE>Hi</CURRENT_VALUE>" in chat[1]["content"]
    assert chat[2]["content"] == "Example: 'Hi' became 'Hello'."
    assert [m["content"][0].data for m in messages][:2] == [
        SYSTEM_PLACEHOLDER,
        USER_PLACEHOLDER,
    ]  # the caller's list is not modified


def test_placeholders_restored_into_a_group_still_get_the_default_prompt() -> None:
    client = Recording()
    param = Parameter("Hi", role="greeting")
    param.append_grad(Variable("Be formal."))
    optimizer = TGD([param], model_client=client)
    optimizer.param_groups[0]["messages"] = upstream_messages()  # e.g. a loaded state
    optimizer.step()
    (chat,) = client.chats
    assert chat[0]["content"] == prompts.TGD_SYSTEM
    assert "<CURRENT_VALUE>Hi</CURRENT_VALUE>" in chat[1]["content"]


# -- custom messages -----------------------------------------------------------------


def _custom(text: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [Variable("You improve prompts.")]},
        {"role": "user", "content": [Variable(text)]},
    ]


def test_custom_messages_without_slots_warn_in_tgd_class() -> None:
    with pytest.warns(TGDMessagesWarning) as record:
        TGD(
            [Parameter("x")],
            model_client=Recording(),
            messages=_custom("Make it better."),
        )
    (warning,) = record
    assert issubclass(warning.category, UserWarning)
    text = str(warning.message)
    assert "neither a {variable} nor a {feedback} placeholder" in text
    assert "neither the parameter's current value nor its feedback" in text
    assert "leave `messages` out" in text
    assert warning.filename == __file__  # points at the caller's line


def test_custom_messages_without_slots_warn_in_functional_tgd() -> None:
    client = Recording()
    param = Parameter("x", role="prompt")
    with pytest.warns(TGDMessagesWarning, match=r"neither a \{variable\}") as record:
        tgd([param], [[Variable("Be shorter.")]], [[]], client, _custom("Improve."))
    assert record[0].filename == __file__
    assert client.chats[0][1]["content"] == "Improve."  # used as given


def test_custom_messages_of_a_param_group_warn() -> None:
    optimizer = TGD([Parameter("a")], model_client=Recording())
    with pytest.warns(TGDMessagesWarning) as record:
        optimizer.add_param_group(
            {"params": [Parameter("b")], "messages": _custom("Improve it.")}
        )
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("Improve {variable}.", "no {feedback} placeholder"),
        ("Apply this feedback: {feedback}", "no {variable} placeholder"),
    ],
)
def test_custom_messages_missing_one_slot_warn_naming_it(
    text: str, missing: str
) -> None:
    with pytest.warns(TGDMessagesWarning, match=missing):
        TGD([Parameter("x")], model_client=Recording(), messages=_custom(text))


def test_custom_messages_with_both_slots_do_not_warn_and_are_rendered() -> None:
    client = Recording()
    param = Parameter("Old.", role="prompt")
    param.append_grad(Variable("Add a greeting."))
    messages = _custom("Value: {variable}\nFeedback:\n{feedback}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = TGD([param], model_client=client, messages=messages)
        optimizer.step()
        tgd([param], [[Variable("Shorter.")]], [[]], client, messages)
    assert optimizer.defaults["messages"] is messages  # kept as given
    assert client.chats[0][1]["content"] == "Value: Old.\nFeedback:\n- Add a greeting."


def test_default_messages_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TGD([Parameter("x")], model_client=Recording())
        tgd([Parameter("y")], [[Variable("z")]], [[]], Recording())


def test_a_placeholder_beside_a_custom_message_without_slots_still_warns() -> None:
    # the system placeholder becomes afnio's system prompt, but the custom user
    # message shows the LM neither the value nor the feedback
    messages = [
        {"role": "system", "content": [TGD_MESSAGES[0]["content"][0]]},
        {"role": "user", "content": [Variable("Make it better.")]},
    ]
    with pytest.warns(TGDMessagesWarning, match=r"neither a \{variable\}"):
        TGD([Parameter("x")], model_client=Recording(), messages=messages)
