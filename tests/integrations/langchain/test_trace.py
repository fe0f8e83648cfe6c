"""Tracing LangChain chains (ChatOpenAI, replayed from cassettes recorded against the
simulator), backward through them, and writing the optimized prompts back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langchain_openai import ChatOpenAI

import afnio
from afnio import functional as F
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import (
    PlaceholderMismatchError,
    find_prompt_slots,
    heal_braces,
    trace,
)
from tests.conftest import LMEndpoint

CLASSIFY = "Classify the sentiment of the message."
RULE = 'If the message mentions "frustrated", the sentiment is negative.'


def _llm(lm: LMEndpoint) -> ChatOpenAI:
    return ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=lm.base_url, api_key=lm.api_key, max_retries=0
    )


def _classifier(lm: LMEndpoint) -> tuple[ChatPromptTemplate, Any]:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    return prompt, prompt | _llm(lm) | StrOutputParser()


def _last_system_prompt(vcr: Any) -> str:
    body = json.loads(vcr.sent_requests[-1].body)
    return body["messages"][0]["content"]


def _optimize(traced: Any, lm: LMEndpoint) -> None:
    TGD(traced.parameters(), model_client=lm.client(), model=SIMULATOR_MODEL).step()
    traced.write_back()


def _assert_user_chain_sends(vcr: Any, chain: Any, inputs: Any, text: str) -> None:
    """After write-back, the user's own chain object sends ``text`` on its next call:
    the system prompts of the requests it made (recorded now, or replayed from the
    cassette) include it."""
    before = len(vcr.sent_requests)  # what the test sent, recorded or replayed
    chain.invoke(inputs)
    bodies = [json.loads(r.body) for r in vcr.sent_requests[before:]]
    assert bodies, "the chain made no request"
    assert text in [b["messages"][0]["content"] for b in bodies if "messages" in b]


@pytest.mark.afnio_replay
def test_one_call_chain_learns_and_writes_back(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    prompt, chain = _classifier(backward_lm)
    traced = trace(chain)
    assert [name for name, _ in traced.named_parameters()] == ["prompt_0"]
    prediction = traced.invoke({"message": "I am frustrated with the heating."})
    assert prediction.data == "neutral" and prediction.requires_grad
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [RULE]
    _optimize(traced, backward_lm)
    assert prompt.messages[0].prompt.template == f"{CLASSIFY} {RULE}"
    # the user's own chain object now sends the new prompt
    assert chain.invoke({"message": "So frustrated."}) == "negative"
    assert _last_system_prompt(vcr) == f"{CLASSIFY} {RULE}"


@pytest.mark.afnio_replay
def test_two_call_chain_sends_feedback_to_both_system_prompts(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    summarize = ChatPromptTemplate.from_messages(
        [("system", "Summarize the message in one sentence."), ("human", "{message}")]
    )
    classify = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{summary}")]
    )
    chain = (
        {"summary": summarize | _llm(backward_lm) | StrOutputParser()}
        | classify
        | _llm(backward_lm)
        | StrOutputParser()
    )
    traced = trace(chain)
    assert len(list(traced.parameters())) == 2
    prediction = traced.invoke({"message": "I am thrilled with the gardener."})
    _, explanation = F.exact_match_evaluator(prediction, "positive")
    explanation.backward()
    grads = {name: [g.data for g in p.grad] for name, p in traced.named_parameters()}
    assert all(len(g) == 1 and g[0] for g in grads.values()), grads
    # (the simulator's summaries carry no salience word, so its optimizer has no rule
    # to add here: write an improved text directly, as an optimizer would)
    classify_param = next(p for _, p in traced.named_parameters() if p.data == CLASSIFY)
    classify_param.data = f"{CLASSIFY} Answer with one lowercase word."
    traced.write_back()
    new = classify.messages[0].prompt.template
    assert new == f"{CLASSIFY} Answer with one lowercase word."
    _assert_user_chain_sends(vcr, chain, {"message": "I am thrilled again."}, new)


@pytest.mark.afnio_replay
def test_parallel_branches_each_get_feedback(backward_lm: LMEndpoint, vcr: Any) -> None:
    polite = ChatPromptTemplate.from_messages(
        [("system", "Rewrite the message politely."), ("human", "{message}")]
    )
    classify = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    chain = RunnableParallel(
        polite=polite | _llm(backward_lm) | StrOutputParser(),
        sentiment=classify | _llm(backward_lm) | StrOutputParser(),
    ) | RunnableLambda(lambda d: d["sentiment"])
    traced = trace(chain)
    prediction = traced.invoke({"message": "The repair was awful."})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    sentiment_param = next(
        p for _, p in traced.named_parameters() if p.data == CLASSIFY
    )
    assert [g.data for g in sentiment_param.grad] == [
        'If the message mentions "awful", the sentiment is negative.'
    ]
    _optimize(traced, backward_lm)
    new = f'{CLASSIFY} If the message mentions "awful", the sentiment is negative.'
    assert classify.messages[0].prompt.template == new
    _assert_user_chain_sends(vcr, chain, {"message": "Awful again."}, new)


@pytest.mark.afnio_replay
def test_batch_and_abatch_are_traced_per_sample(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    import asyncio

    prompt, chain = _classifier(backward_lm)
    traced = trace(chain)
    inputs = [{"message": "I love it."}, {"message": "This is the worst."}]
    prediction = traced.batch(inputs)
    assert prediction.data == ["neutral", "neutral"]
    _, explanation = F.exact_match_evaluator(prediction, ["positive", "negative"])
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [
        'If the message mentions "love", the sentiment is positive.',
        'If the message mentions "worst", the sentiment is negative.',
    ]
    again = asyncio.run(traced.abatch(inputs))
    assert again.data == ["neutral", "neutral"] and again.requires_grad
    _optimize(traced, backward_lm)
    new = prompt.messages[0].prompt.template
    assert '"love"' in new and '"worst"' in new
    _assert_user_chain_sends(vcr, chain, {"message": "Love it."}, new)


@pytest.mark.afnio_replay
def test_a_streamed_call_is_traced(backward_lm: LMEndpoint, vcr: Any) -> None:
    _, chain = _classifier(backward_lm)
    traced = trace(chain)
    prediction = traced.stream({"message": "I am frustrated."})
    assert prediction.data == "neutral" and prediction.requires_grad
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [RULE]
    _optimize(traced, backward_lm)
    _assert_user_chain_sends(
        vcr, chain, {"message": "Frustrated."}, f"{CLASSIFY} {RULE}"
    )


# -- write-back safety (no LM) ------------------------------------------------------


def test_a_candidate_that_drops_a_placeholder_is_rejected_and_nothing_changes() -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Classify {topic} messages."), ("human", "{message}")]
    )
    traced = trace(prompt)
    traced.prompt_0.data = "Classify messages."
    with pytest.raises(PlaceholderMismatchError, match=r"drops \['topic'\]"):
        traced.write_back()
    assert prompt.messages[0].prompt.template == "Classify {topic} messages."


def test_literal_braces_in_an_optimized_prompt_stay_literal() -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Classify {topic} messages."), ("human", "{message}")]
    )
    traced = trace(prompt)
    traced.prompt_0.data = 'Classify {topic} messages. Answer as {"label": "..."}.'
    traced.write_back()
    assert sorted(prompt.input_variables) == ["message", "topic"]
    rendered = prompt.format_messages(topic="support", message="hi")[0].content
    assert rendered == 'Classify support messages. Answer as {"label": "..."}.'
    assert heal_braces("{a} {b} {{c}}", {"a"}) == "{a} {{b}} {{c}}"


def test_save_load_and_export(tmp_path: Path) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    traced = trace(prompt)
    traced.prompt_0.data = f"{CLASSIFY} {RULE}"
    path = tmp_path / "prompts.json"
    traced.save_prompts(path)
    assert json.loads(path.read_text()) == {"prompt0.system0": f"{CLASSIFY} {RULE}"}
    fresh = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    trace(fresh).load_prompts(path)
    assert fresh.messages[0].prompt.template == f"{CLASSIFY} {RULE}"
    exported = traced.export()
    assert exported is not prompt
    assert exported.messages[0].prompt.template == f"{CLASSIFY} {RULE}"
    assert not (exported.metadata or {}).get("afnio_prompt_id")


def test_discovery_selects_roles_and_skips_placeholders() -> None:
    from langchain_core.messages import SystemMessage
    from langchain_core.prompts import MessagesPlaceholder

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Be brief."),
            SystemMessage(content="A literal {not a variable}."),
            MessagesPlaceholder("history"),
            ("human", "{message}"),
        ]
    )
    assert [s.key for s in find_prompt_slots(prompt)] == ["prompt0.system0"]
    assert [s.key for s in find_prompt_slots(prompt, "all")] == [
        "prompt0.system0",
        "prompt0.human0",
    ]
    with pytest.raises(ValueError, match="No prompt template text"):
        trace(prompt, select="ai")
    afnio.set_max_concurrency(16)


@pytest.mark.afnio_replay
def test_a_sub_chain_called_inside_a_lambda_is_traced(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    from langchain_core.runnables import RunnablePassthrough

    classify, sub = _classifier(backward_lm)
    chain = RunnablePassthrough.assign(
        label=RunnableLambda(lambda d: sub.invoke({"message": d["message"]}))
    ) | RunnableLambda(lambda d: d["label"])
    traced = trace(chain)  # found through the lambda's closure
    prediction = traced.invoke({"message": "I am frustrated."})
    assert prediction.requires_grad
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [RULE]
    _optimize(traced, backward_lm)
    assert classify.messages[0].prompt.template == f"{CLASSIFY} {RULE}"
    _assert_user_chain_sends(
        vcr, chain, {"message": "Frustrated."}, f"{CLASSIFY} {RULE}"
    )


@pytest.mark.afnio_replay
def test_structured_output_with_a_pydantic_schema(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    import asyncio
    from typing import Literal

    from pydantic import BaseModel

    class Sentiment(BaseModel):
        sentiment: Literal["negative", "neutral", "positive"]

    classify = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    chain = (
        classify
        | _llm(backward_lm).with_structured_output(Sentiment)
        | RunnableLambda(lambda s: s.sentiment)
    )
    traced = trace(chain)
    prediction = asyncio.run(traced.ainvoke({"message": "I am frustrated."}))
    assert prediction.data == "neutral" and prediction.requires_grad
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert [g.data for g in traced.prompt_0.grad] == [RULE]
    _optimize(traced, backward_lm)
    assert chain.invoke({"message": "Frustrated again."}) == "negative"
    assert _last_system_prompt(vcr) == f"{CLASSIFY} {RULE}"


@pytest.mark.afnio_replay
def test_an_async_stream_is_traced(backward_lm: LMEndpoint) -> None:
    import asyncio

    _, chain = _classifier(backward_lm)
    traced = trace(chain)
    prediction = asyncio.run(traced.astream({"message": "I am frustrated."}))
    assert prediction.data == "neutral" and prediction.requires_grad


def test_include_adds_prompts_reached_another_way() -> None:
    hidden = ChatPromptTemplate.from_messages([("system", "Hidden."), ("human", "{x}")])
    registry = {"hidden": hidden}
    chain = RunnableLambda(lambda d: registry["hidden"].invoke(d))
    with pytest.raises(ValueError, match="No prompt template text"):
        trace(chain)
    assert [s.key for s in find_prompt_slots(chain, include=[hidden])] == [
        "prompt0.system0"
    ]


@pytest.mark.afnio_replay
def test_feedback_passes_through_a_lambda_between_two_calls(
    backward_lm: LMEndpoint,
) -> None:
    first = ChatPromptTemplate.from_messages(
        [("system", "Rewrite the message."), ("human", "{message}")]
    )
    second = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{text}")]
    )
    llm = _llm(backward_lm)
    chain = (
        first
        | llm
        | StrOutputParser()
        | RunnableLambda(lambda s: {"text": s.upper()})
        | second
        | llm
        | StrOutputParser()
    )
    traced = trace(chain)
    prediction = traced.invoke({"message": "I am frustrated."})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    grads = {name: [g.data for g in p.grad] for name, p in traced.named_parameters()}
    assert all(len(g) == 1 and g[0] for g in grads.values()), grads
    rewrite = next(
        p for _, p in traced.named_parameters() if p.data == "Rewrite the message."
    )
    assert "RunnableLambda" in rewrite.grad[0].data  # the step in between is named
