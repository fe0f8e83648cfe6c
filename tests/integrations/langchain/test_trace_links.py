"""How a traced LangChain chain is wired (issue 17): batch samples keep their own runs,
a chat call's feedback goes only to the prompt that fed it and to the inputs its
template uses, and every standard composite's sub-chains are found (an LM call on a
prompt that was not found is warned about).

The chains are written the way LangChain's documentation writes them; LM calls replay
cassettes recorded against the simulator (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableBranch,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
    chain,
)
from langchain_core.runnables.router import RouterRunnable
from langchain_openai import ChatOpenAI

from afnio import functional as F
from afnio.cognitive.parameter import Parameter
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import (
    AfnioTracingWarning,
    find_prompt_slots,
    trace,
)
from tests.conftest import LMEndpoint

CLASSIFY = "Classify the sentiment of the message."
RULE = 'If the message mentions "frustrated", the sentiment is negative.'
WONDERFUL = "The new cleaning crew is wonderful."
FRUSTRATED = "I am frustrated with the heating."
SLOW_SECONDS = 0.5


def _llm(lm: LMEndpoint) -> ChatOpenAI:
    return ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=lm.base_url, api_key=lm.api_key, max_retries=0
    )


def _prompt(system: str, human: str = "{message}") -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([("system", system), ("human", human)])


def _param(traced: Any, text: str) -> Parameter:
    """The Parameter holding the system text ``text`` (one per prompt object)."""
    found = [p for _, p in traced.named_parameters() if p.data == text]
    assert len(found) == 1, [p.data for _, p in traced.named_parameters()]
    return found[0]


def _grads(param: Parameter) -> list[str]:
    return [str(g.data) for g in param.grad or []]


def _user_text(conversation: list[dict[str, str]]) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


def _conversation(output: Any) -> list[dict[str, str]]:
    """The conversation of the LM call that produced ``output``."""
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if isinstance(getattr(node, "conversation", None), list):
            return node.conversation
        stack.extend(e.node for e in node.next_functions if e.node is not None)
    raise AssertionError("no LM call produced this output")


def _optimize(traced: Any, lm: LMEndpoint) -> None:
    TGD(traced.parameters(), model_client=lm.client(), model=SIMULATOR_MODEL).step()
    traced.write_back()


def _rule(word: str, label: str) -> str:
    return f'If the message mentions "{word}", the sentiment is {label}.'


# -- defect 1: batch samples are matched to their own runs ----------------------------


@pytest.mark.afnio_replay
def test_batch_of_a_chain_function_keeps_each_sample_with_its_own_run(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    prompt = _prompt(CLASSIFY)
    llm = _llm(backward_lm)

    @chain
    def classify(message: str) -> str:
        prompt_value = prompt.invoke({"message": message})
        if "wonderful" in message:  # this sample's LM call finishes last
            time.sleep(SLOW_SECONDS)
        return StrOutputParser().invoke(llm.invoke(prompt_value))

    traced = trace(classify)
    messages = [WONDERFUL, FRUSTRATED]
    prediction = traced.batch(messages)
    assert prediction.data == ["neutral", "neutral"]
    # each sample's output comes from that sample's own LM call
    assert [_user_text(c) for c in prediction.grad_fn.rendered] == messages
    _, explanation = F.exact_match_evaluator(prediction, ["positive", "negative"])
    explanation.backward()
    assert sorted(_grads(traced.prompt_0)) == [
        _rule("frustrated", "negative"),
        _rule("wonderful", "positive"),
    ]
    _optimize(traced, backward_lm)
    assert classify.batch(messages) == ["positive", "negative"]


@pytest.mark.afnio_replay
def test_abatch_of_an_async_chain_function_keeps_each_sample_with_its_own_run(
    backward_lm: LMEndpoint,
) -> None:
    prompt = _prompt(CLASSIFY)
    llm = _llm(backward_lm)

    @chain
    async def classify(message: str) -> str:
        prompt_value = await prompt.ainvoke({"message": message})
        if "wonderful" in message:  # this sample's LM call finishes last
            await asyncio.sleep(SLOW_SECONDS)
        return await StrOutputParser().ainvoke(await llm.ainvoke(prompt_value))

    traced = trace(classify)
    messages = [WONDERFUL, FRUSTRATED]
    prediction = asyncio.run(traced.abatch(messages))
    assert [_user_text(c) for c in prediction.grad_fn.rendered] == messages
    _, explanation = F.exact_match_evaluator(prediction, ["positive", "negative"])
    explanation.backward()
    assert sorted(_grads(traced.prompt_0)) == [
        _rule("frustrated", "negative"),
        _rule("wonderful", "positive"),
    ]


@pytest.mark.afnio_replay
def test_calls_from_several_threads_do_not_cross(backward_lm: LMEndpoint) -> None:
    prompt = _prompt(CLASSIFY)
    llm = _llm(backward_lm)

    def call_model(prompt_value: Any) -> Any:
        if "wonderful" in prompt_value.to_string():  # this call finishes last
            time.sleep(SLOW_SECONDS)
        return llm.invoke(prompt_value)

    traced = trace(prompt | RunnableLambda(call_model) | StrOutputParser())
    messages = [WONDERFUL, FRUSTRATED]
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda m: traced.invoke({"message": m}), messages))
    for message, output in zip(messages, outputs, strict=True):
        _, explanation = F.exact_match_evaluator(output, "negative")
        explanation.backward()
        assert _user_text(_conversation(output)) == message
    assert sorted(_grads(traced.prompt_0)) == [
        _rule("frustrated", "negative"),
        _rule("wonderful", "negative"),
    ]


# -- defect 2: feedback goes only where the output came from ---------------------------


@pytest.mark.afnio_replay
def test_a_merge_prompt_links_only_the_branches_its_template_uses(
    backward_lm: LMEndpoint,
) -> None:
    llm = _llm(backward_lm)
    summarize = "Summarize the message in one sentence."
    keywords = "List the keywords of the message."
    translate = "Translate the message into French."
    merge = _prompt(CLASSIFY, "Summary: {summary}\nKeywords: {keywords}")
    chain = (
        RunnableParallel(
            summary=_prompt(summarize) | llm | StrOutputParser(),
            keywords=_prompt(keywords) | llm | StrOutputParser(),
            french=_prompt(translate) | llm | StrOutputParser(),
        )
        | merge
        | llm
        | StrOutputParser()
    )
    traced = trace(chain)
    prediction = traced.invoke({"message": FRUSTRATED})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert _grads(_param(traced, CLASSIFY))
    assert _grads(_param(traced, summarize)) and _grads(_param(traced, keywords))
    # the French translation never reaches the merge prompt: no feedback
    assert _grads(_param(traced, translate)) == []


@pytest.mark.afnio_replay
def test_branches_that_render_the_same_messages_are_told_apart(
    backward_lm: LMEndpoint,
) -> None:
    llm = _llm(backward_lm)
    rewrite = "Rewrite the message."
    used, unused = _prompt(rewrite), _prompt(rewrite)  # two objects, same text
    chain = (
        RunnableParallel(
            used=used | llm | StrOutputParser(), unused=unused | llm | StrOutputParser()
        )
        | _prompt(CLASSIFY, "{used}")
        | llm
        | StrOutputParser()
    )
    traced = trace(chain)
    used_param, unused_param = traced.prompt_0, traced.prompt_1
    used_param.data = "Rewrite the message briefly."  # which template is which
    traced.write_back()
    assert used.messages[0].prompt.template == "Rewrite the message briefly."
    assert unused.messages[0].prompt.template == rewrite
    used_param.data = rewrite
    prediction = traced.invoke({"message": FRUSTRATED})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert _grads(used_param) and _grads(unused_param) == []


@pytest.mark.afnio_replay
def test_inputs_the_template_does_not_use_are_not_linked(
    backward_lm: LMEndpoint,
) -> None:
    llm = _llm(backward_lm)
    rewrite, tone = "Rewrite the message.", "Describe the tone of the message."
    classify = _prompt(f"{CLASSIFY} Answer in {{language}}.").partial(
        language="English"
    )
    chain = (
        RunnablePassthrough.assign(
            message=_prompt(rewrite) | llm | StrOutputParser(),
            tone=_prompt(tone) | llm | StrOutputParser(),
        )
        | classify
        | llm
        | StrOutputParser()
    )
    traced = trace(chain)
    prediction = traced.invoke({"message": FRUSTRATED})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert _grads(_param(traced, f"{CLASSIFY} Answer in {{language}}."))
    assert _grads(_param(traced, rewrite))
    # the classify prompt does not use the tone (its language is a partial)
    assert _grads(_param(traced, tone)) == []


# -- defect 3: sub-chains of every composite are found ------------------------------


def test_sub_chains_of_every_standard_composite_are_discovered() -> None:
    def p(name: str) -> ChatPromptTemplate:
        return _prompt(f"{name}.")

    llm = ChatOpenAI(model=SIMULATOR_MODEL, api_key="sk-test", max_retries=0)
    parser = StrOutputParser()
    billing = p("Billing") | llm | parser
    general = p("General") | llm | parser
    nested = p("Nested") | llm | parser
    inner = RunnableLambda(lambda d: nested.invoke(d))
    summarize_chain = p("Summarize") | llm | parser

    @chain
    def summarize(d: dict[str, Any]) -> str:
        return summarize_chain.invoke(d)

    full_chain = (
        RunnablePassthrough.assign(
            topic=p("Topic") | llm.bind(stop=["\n"]) | parser,
            summary=summarize,
        )
        | RunnableBranch(
            (lambda d: "billing" in d["topic"], billing),
            (
                lambda d: "refund" in d["topic"],
                (p("Refund") | llm | parser).with_fallbacks([p("Backup") | llm]),
            ),
            general,
        )
        | RunnableLambda(lambda text: [{"message": text}])
        | (p("Mapped") | llm.with_retry() | parser).map()
        | RunnableLambda(lambda labels: {"key": "nested", "input": labels[0]})
        | RouterRunnable({"nested": RunnableLambda(lambda d: inner.invoke(d))})
        | RunnableParallel(answer=p("Answer") | llm | parser).pick("answer")
    )
    texts = [s.text for s in find_prompt_slots(full_chain)]
    assert texts == [
        "Topic.",
        "Summarize.",
        "Billing.",
        "Refund.",
        "Backup.",
        "General.",
        "Mapped.",
        "Nested.",
        "Answer.",
    ]


def _outage(_: Any) -> str:
    raise ConnectionError("the primary model is down")


def _around(composite: str, classifier: Runnable, llm: Runnable) -> Runnable:
    """A chain through one composite, whose output is the classifier's (the
    ``CLASSIFY`` prompt, the model and a parser) unless said otherwise."""
    if composite == "bind":
        return _prompt(CLASSIFY) | llm.bind(stop=["\n\n"]) | StrOutputParser()
    if composite == "with_retry":
        retried = llm.with_retry(stop_after_attempt=2)
        return _prompt(CLASSIFY) | retried | StrOutputParser()
    if composite == "branch":
        return RunnableBranch(
            (lambda d: "invoice" in d["message"], _prompt("Billing.") | llm),
            classifier,
        )
    if composite == "with_fallbacks":  # the primary answers
        return classifier.with_fallbacks([_prompt("Backup.") | llm])
    if composite == "fallback_used":  # the primary fails: the fallback answers
        primary = _prompt("Primary.") | RunnableLambda(_outage) | StrOutputParser()
        return primary.with_fallbacks([classifier])
    if composite == "fallbacks_in_a_sequence":
        primary = RunnableLambda(_outage)
        return _prompt(CLASSIFY) | primary.with_fallbacks([llm]) | StrOutputParser()
    if composite == "assign_pick":
        return RunnablePassthrough.assign(label=classifier).pick("label")
    if composite == "map":
        first = RunnableLambda(lambda labels: labels[0])
        return RunnableLambda(lambda d: [d]) | classifier.map() | first
    if composite == "map_bound":  # a bound model inside a mapped sequence
        bound = _prompt(CLASSIFY) | llm.bind(stop=["\n\n"]) | StrOutputParser()
        first = RunnableLambda(lambda labels: labels[0])
        both = RunnableLambda(lambda d: [d, {"message": "Please confirm the visit."}])
        return both | bound.map() | first
    if composite == "router":
        router = RouterRunnable(
            {"sentiment": classifier, "billing": _prompt("Billing.") | llm}
        )
        return RunnableLambda(lambda d: {"key": "sentiment", "input": d}) | router
    if composite == "nested_lambdas":
        return RunnableLambda(
            lambda d: RunnableLambda(lambda x: classifier.invoke(x)).invoke(d)
        )
    raise ValueError(composite)


COMPOSITES = [
    "bind",
    "with_retry",
    "branch",
    "with_fallbacks",
    "fallback_used",
    "fallbacks_in_a_sequence",
    "assign_pick",
    "map",
    "map_bound",
    "router",
    "nested_lambdas",
]


@pytest.mark.afnio_replay
@pytest.mark.parametrize("composite", COMPOSITES)
def test_a_sub_chain_inside_a_composite_is_traced(
    composite: str, backward_lm: LMEndpoint
) -> None:
    llm = _llm(backward_lm)
    classifier = _prompt(CLASSIFY) | llm | StrOutputParser()
    traced = trace(_around(composite, classifier, llm))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        prediction = traced.invoke({"message": "I am frustrated."})
    assert prediction.data == "neutral" and prediction.requires_grad
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    grads = _grads(_param(traced, CLASSIFY))
    if composite == "map_bound":
        # both mapped calls answered "neutral", and the lambda picking the first
        # answer is opaque: both are linked (inputs whose text occurs in its output)
        assert RULE in grads and len(grads) == 2
    else:
        assert grads == [RULE]
    others = [p for _, p in traced.named_parameters() if p.data != CLASSIFY]
    assert all(_grads(p) == [] for p in others)  # not on the output's path


@pytest.mark.afnio_replay
def test_a_runnable_branch_routes_feedback_to_the_branch_that_ran(
    backward_lm: LMEndpoint, vcr: Any
) -> None:
    llm = _llm(backward_lm)
    topic = _prompt("Name the topic of the message in one word.")
    billing = _prompt("You answer billing questions.")
    general = _prompt(CLASSIFY)
    branch = RunnableBranch(
        (lambda x: "invoice" in x["topic"].lower(), billing | llm | StrOutputParser()),
        general | llm | StrOutputParser(),
    )
    full_chain = {
        "topic": topic | llm | StrOutputParser(),
        "message": lambda x: x["message"],
    } | branch
    traced = trace(full_chain)
    assert len(list(traced.parameters())) == 3  # the branches' prompts are found
    prediction = traced.invoke({"message": "I am frustrated."})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert _grads(_param(traced, CLASSIFY)) == [RULE]
    # the condition read the topic, but the general prompt does not use it
    assert _grads(_param(traced, topic.messages[0].prompt.template)) == []
    assert _grads(_param(traced, "You answer billing questions.")) == []
    _optimize(traced, backward_lm)
    assert general.messages[0].prompt.template == f"{CLASSIFY} {RULE}"
    assert full_chain.invoke({"message": "So frustrated."}) == "negative"


@pytest.mark.afnio_replay
def test_an_lm_call_on_an_undiscovered_prompt_warns_once(
    backward_lm: LMEndpoint,
) -> None:
    llm = _llm(backward_lm)
    hidden = _prompt(CLASSIFY, "{text}") | llm | StrOutputParser()
    registry = {"classify": hidden}  # looked up at run time: invisible to discovery
    # a prompt with no system message: discovered, only not selected
    echo = PromptTemplate.from_template("Repeat: {message}") | llm | StrOutputParser()
    chain = RunnableParallel(
        rewritten=_prompt("Rewrite the message.") | llm | StrOutputParser(),
        echoed=echo,
    ) | RunnableLambda(lambda d: registry["classify"].invoke({"text": d["rewritten"]}))
    traced = trace(chain)
    with pytest.warns(AfnioTracingWarning, match=r"include=\[") as caught:
        traced.invoke({"message": "I am frustrated."})
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "RunnableLambda (seq:step:2)" in message and "ChatOpenAI" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", AfnioTracingWarning)
        traced.invoke({"message": "I am frustrated."})  # warned once per call site
        included = trace(chain, include=[hidden])
        prediction = included.invoke({"message": "I am frustrated."})
    _, explanation = F.exact_match_evaluator(prediction, "negative")
    explanation.backward()
    assert _grads(_param(included, CLASSIFY))
