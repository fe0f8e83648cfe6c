"""Optimizer base and TGD mechanics that need no LM."""

from __future__ import annotations

import io

import pytest

import afnio
from afnio import Variable
from afnio.cognitive import Parameter
from afnio.models.openai import AsyncOpenAI
from afnio.optim import TGD
from afnio.optim.optimizer import Optimizer, required
from afnio.optim.tgd import _check_answer, render_feedback


def _client() -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-test")


def test_defaults_and_param_groups() -> None:
    p = Parameter("x", role="prompt")
    client = _client()
    opt = TGD([p], model_client=client, model="gpt-4o")
    group = opt.param_groups[0]
    assert group["params"] == [p]
    assert group["model_client"] is client
    assert (
        group["inputs"] == {} and group["constraints"] == [] and group["momentum"] == 0
    )
    assert group["completion_args"] == {"model": "gpt-4o"}
    assert [m["role"] for m in group["messages"]] == ["system", "user"]
    assert opt.state == {}
    assert opt.defaults["completion_args"] == {"model": "gpt-4o"}


def test_add_param_group_and_errors() -> None:
    a, b = Parameter("a"), Parameter("b")
    opt = TGD([a], model_client=_client())
    groups = opt.param_groups
    opt.add_param_group({"params": [b], "momentum": 2})
    assert opt.param_groups is groups and len(groups) == 2
    assert groups[1]["momentum"] == 2 and groups[1]["constraints"] == []
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(TypeError, match="use a list"):
        opt.add_param_group({"params": {Parameter("c")}})
    with pytest.raises(TypeError, match="only optimize Variables"):
        opt.add_param_group({"params": ["text"]})
    with pytest.raises(ValueError, match="empty parameter list"):
        TGD([], model_client=_client())
    with pytest.raises(ValueError, match="non-leaf"):
        TGD([a + Variable("b")], model_client=_client())
    with pytest.raises(ValueError, match="`momentum` must be an int >= 0"):
        TGD([Parameter("x")], model_client=_client(), momentum=-1)
    with pytest.raises(ValueError, match="`on_error`"):
        TGD([Parameter("x")], model_client=_client(), on_error="ignore")
    with pytest.raises(TypeError, match="`model_client` must be a ChatCompletionModel"):
        TGD([Parameter("x")], model_client="gpt-4o")  # type: ignore[arg-type]


def test_required_option() -> None:
    class Needs(Optimizer):
        def __init__(self, params: list[Variable]) -> None:
            super().__init__(params, {"lr": required})

    with pytest.raises(ValueError, match="required optimization parameter lr"):
        Needs([Parameter("x")])


def test_clear_grad_keeps_list_identity_and_zero_grad_is_an_alias() -> None:
    p = Parameter("x")
    p.append_grad(Variable("fb"))
    grads = p.grad
    opt = TGD([p], model_client=_client())
    opt.clear_grad()
    assert p.grad == [] and p.grad is grads
    p.append_grad(Variable("fb"))
    opt.zero_grad()
    assert p.grad == []


def test_step_without_feedback_makes_no_call_and_returns_closure_value() -> None:
    p = Parameter("unchanged")
    opt = TGD([p], model_client=_client())  # its address is never contacted
    assert opt.step() is None
    assert opt.step(lambda: ("score", "explanation")) == ("score", "explanation")
    assert p.data == "unchanged"


def test_repr_lists_group_options() -> None:
    opt = TGD([Parameter("x")], model_client=_client(), momentum=2)
    text = repr(opt)
    assert text.startswith("TGD (\nParameter Group 0\n")
    assert "    momentum: 2" in text and "params" not in text
    assert text.endswith(")")


def test_state_dict_round_trip_through_afnio_save() -> None:
    p = Parameter("v1", role="prompt")
    client = _client()
    opt = TGD([p], model_client=client, momentum=2, model="gpt-4o")
    snapshot = Variable("v0", role="prompt")
    opt.state[p] = {"momentum_buffer": [(snapshot, [Variable("fb", role="feedback")])]}
    client.update_usage({"prompt_tokens": 3, "total_tokens": 3}, "gpt-4o")
    buf = io.BytesIO()
    afnio.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = afnio.load(buf)
    assert loaded["param_groups"][0]["params"] == [0]
    assert loaded["param_groups"][0]["model_client"]["class_type"] == "AsyncOpenAI"

    q = Parameter("v1", role="prompt")
    fresh_client = _client()
    fresh = TGD([q], model_client=fresh_client)
    with pytest.raises(ValueError, match="Missing model client for 'model_client'"):
        fresh.load_state_dict(loaded)
    fresh.load_state_dict(loaded, model_clients={"model_client": fresh_client})
    assert fresh.param_groups[0]["momentum"] == 2
    assert fresh.param_groups[0]["model_client"] is fresh_client
    assert fresh.param_groups[0]["params"] == [q]
    ((snap, grads),) = fresh.state[q]["momentum_buffer"]
    assert (snap.data, grads[0].data) == ("v0", "fb")
    assert fresh_client.get_usage()["prompt_tokens"] == 3
    with pytest.raises(ValueError, match="different number of parameter groups"):
        fresh.load_state_dict({"state": {}, "param_groups": []})


def test_feedback_is_deduplicated_with_counts() -> None:
    grads = [
        Variable(["Use A.", "", "Use A.", "Use B."], role="feedback"),
        Variable("Use B.", role="feedback"),
    ]
    text, count = render_feedback(grads)
    assert text == "- Use A. (x2)\n- Use B. (x2)"
    assert count == 4


def test_condensed_alternatives_carry_their_own_counts() -> None:
    """A condensed line says how often each alternative was given (``(xN)`` above
    one), so the line's total is split exactly, not evenly."""
    words = [f"w{i:02d}" for i in range(40)]
    texts = [f'Route "{w}" to the repairs team, please.' for w in words]
    texts += ['Route "w00" to the repairs team, please.'] * 4
    text, count = render_feedback([Variable(texts, role="feedback")])
    assert count == 44
    (line,) = text.splitlines()
    assert line.startswith('- Route {"w00" (x5) | "w01" | "w02" | ')
    assert line.endswith("} to the repairs team, please. (x44)")
    from afnio.testing import world

    shares = dict(
        (text.split('"')[1], weight)
        for text, weight in world._weighted_alternatives(line, 44)
    )
    assert shares["w00"] == 5 and shares["w39"] == 1


WORDS = [
    "angry", "annoyed", "awful", "complaint", "delighted", "disappointed",
    "disappointing", "dissatisfied", "excellent", "exceptional", "fantastic",
    "frustrated", "frustrating", "frustration", "grateful", "great", "impressed",
    "love", "outstanding", "poor", "terrible", "thrilled", "top-notch",
    "unacceptable", "unsatisfactory", "upset", "wonderful", "worst",
]  # fmt: skip


def _rules(n: int) -> Variable:
    texts = [
        f'If the message mentions "{WORDS[i % len(WORDS)]}", the sentiment is '
        f"{'negative' if i % 2 else 'positive'}."
        for i in range(n)
    ]
    other = [
        f'The user template should lead to "{w}" for this input.' for w in WORDS[:n]
    ]
    return Variable(texts + other, role="feedback")


def test_condensed_feedback_stays_small_and_keeps_every_distinct_rule() -> None:
    from afnio._template import render
    from afnio.optim import prompts

    def prompt_size(n: int) -> tuple[int, str]:
        feedback, count = render_feedback([_rules(n)])
        user = render(
            prompts.TGD_USER,
            {
                "variable_role": "system prompt",
                "variable": "Classify the sentiment.",
                "feedback": feedback,
                "feedback_count": count,
                "past_iterations": "",
                "constraints": "",
            },
        )
        return len(prompts.TGD_SYSTEM) + len(user), feedback

    small, _ = prompt_size(4)
    large, feedback = prompt_size(32)
    assert large <= 3 * small
    for i in range(32):
        assert f'"{WORDS[i % len(WORDS)]}"' in feedback
    assert "{" in feedback and " | " in feedback  # condensed into alternatives


def test_answer_checking_and_the_placeholder_guard() -> None:
    template = Parameter("Message: {message} in {language}", role="template")
    assert _check_answer('{"improved_value": "Text: {message} ({language})"}', template)
    with pytest.raises(ValueError, match=r"drops \{language\}"):
        _check_answer('{"improved_value": "Text: {message}"}', template)
    with pytest.raises(ValueError, match=r"adds \{extra\}"):
        _check_answer('{"improved_value": "{message} {language} {extra}"}', template)
    with pytest.raises(ValueError, match="not valid JSON"):
        _check_answer('{"improved_value": "cut', template)
    with pytest.raises(ValueError, match="improved_value"):
        _check_answer('{"value": "x"}', template)
    with pytest.raises(ValueError, match="empty"):
        _check_answer('{"improved_value": "  "}', Parameter("x"))
