"""Trajectory and answer metrics for agents and graphs (issue 19, item 5): the tools
called, read from every prediction shape; targets parsed; AgentEvals' match modes;
feedback the backward (and the bundled simulator) reads back to the reference."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from afnio.testing import world
from afnio_integrations.langchain._trajectory import (
    answer_match,
    expected_tools,
    final_answer_of,
    tool_calls_of,
    trajectory_match,
)

MODES = ("strict", "unordered", "subset", "superset")


class AgentOutput(str):
    """The shape the traced agent returns: the final answer text, with the final
    state and its messages."""

    state: dict[str, Any]
    messages: list[Any]

    def __new__(cls, text: str, state: dict[str, Any]) -> AgentOutput:
        out = super().__new__(cls, text)
        out.state = state
        out.messages = list(state.get("messages", []))
        return out


class StateOnly:
    """A duck-typed output with a ``.state`` only."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state


def lc_messages(*turns: list[str], answer: str = "Done.") -> list[Any]:
    """A LangChain agent loop: one AIMessage per turn of (parallel) tool calls, each
    answered by tool messages, then the final answer."""
    messages: list[Any] = [SystemMessage("Route."), HumanMessage("The lift is broken")]
    n = 0
    for names in turns:
        calls = []
        for name in names:
            n += 1
            calls.append({"name": name, "args": {"q": "x"}, "id": f"c{n}"})
        messages.append(AIMessage("", tool_calls=calls))
        messages += [ToolMessage("ok", tool_call_id=c["id"]) for c in calls]
    messages.append(AIMessage(answer))
    return messages


def openai_messages(*turns: list[str], answer: str = "Done.") -> list[dict[str, Any]]:
    """The same loop as OpenAI chat-completion message dicts."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "The lift is broken"}]
    n = 0
    for names in turns:
        calls = []
        for name in names:
            n += 1
            calls.append(
                {
                    "id": f"c{n}",
                    "type": "function",
                    "function": {"name": name, "arguments": "{}"},
                }
            )
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        messages += [
            {"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls
        ]
    messages.append({"role": "assistant", "content": answer})
    return messages


def langchain_dict_messages(*turns: list[str], answer: str = "Done.") -> list[Any]:
    """The loop as dicts holding LangChain's tool-call shape ``{"name", "args"}``."""
    messages: list[Any] = [{"role": "user", "content": "The lift is broken"}]
    for names in turns:
        messages.append(
            {"role": "ai", "tool_calls": [{"name": n, "args": {}} for n in names]}
        )
    messages.append({"role": "assistant", "content": answer})
    return messages


def shapes(calls: list[str], answer: str = "Done.") -> dict[str, Any]:
    """The calls (one tool call per model turn) in every accepted prediction shape."""
    lc = lc_messages(*[[c] for c in calls], answer=answer)
    state = {"messages": lc}
    return {
        "agent output": AgentOutput(answer, state),
        "state only object": StateOnly(state),
        "state dict": state,
        "langchain messages": lc,
        "tuple of messages": tuple(lc),
        "openai dicts": openai_messages(*[[c] for c in calls], answer=answer),
        "openai state dict": {
            "messages": openai_messages(*[[c] for c in calls], answer=answer)
        },
        "langchain dicts": langchain_dict_messages(
            *[[c] for c in calls], answer=answer
        ),
    }


# -- tool_calls_of ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(shapes([])))
def test_tool_calls_of_reads_every_accepted_prediction_shape(shape: str) -> None:
    calls = ["lookup_order", "refund", "lookup_order"]
    assert tool_calls_of(shapes(calls)[shape]) == calls
    assert tool_calls_of(shapes([])[shape]) == []


def test_tool_calls_of_keeps_the_order_of_parallel_calls_across_messages() -> None:
    messages = lc_messages(["b", "a"], ["c"], ["a", "a"])
    assert tool_calls_of(messages) == ["b", "a", "c", "a", "a"]
    dicts = openai_messages(["b", "a"], ["c"], ["a", "a"])
    assert tool_calls_of(dicts) == ["b", "a", "c", "a", "a"]


def test_tool_calls_of_reads_streamed_chunks_and_skips_invalid_tool_calls() -> None:
    chunk = AIMessageChunk(
        "",
        tool_call_chunks=[{"name": "repairs", "args": "{}", "id": "1", "index": 0}],
    )
    invalid = AIMessage(
        "",
        invalid_tool_calls=[
            {"name": "cleaning", "args": "{oops", "id": "2", "error": "bad json"}
        ],
    )
    assert tool_calls_of([HumanMessage("x"), chunk, invalid]) == ["repairs"]


def test_tool_calls_of_counts_only_assistant_messages() -> None:
    messages = [
        {"role": "user", "content": "hi", "tool_calls": [{"name": "not_a_call"}]},
        {"role": "tool", "content": "ok", "tool_call_id": "1"},
        {"type": "ai", "tool_calls": [{"name": "repairs", "args": {}}]},
        {"role": "Assistant", "tool_calls": [{"function": {"name": "cleaning"}}]},
    ]
    assert tool_calls_of(messages) == ["repairs", "cleaning"]


def test_tool_calls_of_leaves_out_ignored_names() -> None:
    messages = lc_messages(["repairs"], ["ResponseFormat"])
    assert tool_calls_of(messages, ignore="ResponseFormat") == ["repairs"]
    assert tool_calls_of(messages, ignore={"ResponseFormat", "repairs"}) == []
    assert tool_calls_of(messages) == ["repairs", "ResponseFormat"]


def test_an_agent_output_with_no_messages_has_no_tool_calls() -> None:
    out = AgentOutput("answer", {"answer": "answer"})
    assert tool_calls_of(out) == []


@pytest.mark.parametrize(
    "prediction",
    ["repairs", 3, None, object(), {"answer": "x"}],
    ids=["str", "int", "none", "object", "dict without messages"],
)
def test_an_unsupported_prediction_is_a_type_error_naming_the_accepted_shapes(
    prediction: Any,
) -> None:
    with pytest.raises(TypeError, match=r"prediction") as caught:
        tool_calls_of(prediction)
    text = str(caught.value)
    assert "'messages'" in text
    assert "LangChain messages" in text
    assert "OpenAI-style" in text


def test_a_plain_str_prediction_says_it_has_no_trajectory() -> None:
    with pytest.raises(TypeError, match="A plain str has no trajectory"):
        tool_calls_of("repairs")


@pytest.mark.parametrize(
    ("prediction", "match"),
    [
        ({"messages": "hello"}, r"prediction\['messages'\] must be a list"),
        ([HumanMessage("x"), 42], r"prediction message 1 must be a LangChain message"),
        ([{"content": "x"}], r"prediction message 0 is a message dict without"),
        ([{"role": "assistant", "tool_calls": [{"args": {}}]}], r"tool call 0 has no"),
        ([{"role": "assistant", "tool_calls": "repairs"}], r"tool_calls must be a"),
    ],
)
def test_a_malformed_message_is_a_type_error_naming_where(
    prediction: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        tool_calls_of(prediction)


def test_ignore_must_be_names() -> None:
    with pytest.raises(TypeError, match="ignore must"):
        tool_calls_of([], ignore=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ignore must hold tool names"):
        trajectory_match(ignore=[1])  # type: ignore[list-item]


# -- expected_tools --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "names"),
    [
        ("repairs", ["repairs"]),
        ("  repairs  ", ["repairs"]),
        ("lookup, refund", ["lookup", "refund"]),
        ("lookup,refund", ["lookup", "refund"]),
        ("lookup and refund", ["lookup", "refund"]),
        ("lookup, refund AND notify", ["lookup", "refund", "notify"]),
        ("lookup refund", ["lookup", "refund"]),
        ("[lookup, refund]", ["lookup", "refund"]),
        ("[ lookup ]", ["lookup"]),
        ("['lookup', 'refund']", ["lookup", "refund"]),
        ('["lookup", "refund"]', ["lookup", "refund"]),
        ("('lookup', 'lookup')", ["lookup", "lookup"]),
        ("get-weather, lookup_2", ["get-weather", "lookup_2"]),
        (["lookup", "refund"], ["lookup", "refund"]),
        (("refund", "refund"), ["refund", "refund"]),
        ([" spaced "], ["spaced"]),
        ("", []),
        ("   ", []),
        ("none", []),
        ("None", []),
        ("no tool", []),
        ("No Tools", []),
        ("no tool calls", []),
        ("[]", []),
        ("[ ]", []),
        ([], []),
        ((), []),
    ],
)
def test_expected_tools_parses_each_target_form(target: Any, names: list[str]) -> None:
    assert expected_tools(target) == names


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (3, TypeError, r"^target must be a tool name"),
        (None, TypeError, r"^target must be a tool name"),
        ({"tools": ["a"]}, TypeError, r"^target must be a tool name"),
        (["a", 2], TypeError, r"^target\[1\] must be a tool name"),
        (["a", " "], ValueError, r"^target\[1\] is an empty tool name"),
        ("lookup; refund", ValueError, r"^target 'lookup; refund' holds 'lookup;'"),
        ("call repairs.", ValueError, r"holds 'repairs\.'"),
    ],
)
def test_expected_tools_rejects_other_targets_naming_the_argument(
    target: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        expected_tools(target)


# -- trajectory_match ------------------------------------------------------------------

# (reference, calls, {mode: score})
CASES: list[tuple[str, list[str], dict[str, float]]] = [
    ("repairs", ["repairs"], dict.fromkeys(MODES, 1.0)),
    ("repairs", ["cleaning"], dict.fromkeys(MODES, 0.0)),
    ("none", [], dict.fromkeys(MODES, 1.0)),
    ("none", ["cleaning"], {**dict.fromkeys(MODES, 0.0), "superset": 1.0}),
    ("repairs", [], {**dict.fromkeys(MODES, 0.0), "subset": 1.0}),
    # order
    ("a, b", ["b", "a"], {"strict": 0.0, "unordered": 1.0, "subset": 1, "superset": 1}),
    ("a, b", ["a", "b"], dict.fromkeys(MODES, 1.0)),
    # an extra call
    ("a", ["a", "b"], {"strict": 0, "unordered": 0, "subset": 0, "superset": 1}),
    # a missing call
    ("a, b", ["a"], {"strict": 0, "unordered": 0, "subset": 1, "superset": 0}),
    # duplicates are counted
    ("a", ["a", "a"], {"strict": 0, "unordered": 0, "subset": 0, "superset": 1}),
    ("a, a", ["a"], {"strict": 0, "unordered": 0, "subset": 1, "superset": 0}),
    (
        "a, a, b",
        ["a", "b", "a"],
        {"strict": 0, "unordered": 1, "subset": 1, "superset": 1},
    ),
    # missing one and extra another
    ("a, b", ["a", "c"], dict.fromkeys(MODES, 0.0)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("reference", "calls", "scores"), CASES)
def test_trajectory_match_scores_each_mode_like_agentevals(
    mode: str, reference: str, calls: list[str], scores: dict[str, float]
) -> None:
    score, feedback = trajectory_match(mode)(lc_messages([*calls]), reference)
    assert score == scores[mode], feedback
    expected = tuple(expected_tools(reference))
    if score == 1.0:
        assert world.expected_tools(feedback) is None
    else:
        assert feedback.startswith(
            f"Expected tool calls: [{', '.join(expected)}], got [{', '.join(calls)}]."
        )
        assert world.expected_tools(feedback) == expected


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_names_its_metric(mode: str) -> None:
    metric = trajectory_match(mode)  # type: ignore[arg-type]
    assert metric.__name__ == f"trajectory_match_{mode}"
    assert metric.mode == mode  # type: ignore[attr-defined]


def test_the_default_mode_is_strict() -> None:
    assert trajectory_match().__name__ == "trajectory_match_strict"


def test_an_unknown_mode_is_a_value_error_listing_the_modes() -> None:
    with pytest.raises(ValueError, match=r"mode must be one of 'strict', 'unordered'"):
        trajectory_match("exact")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "reference", "calls", "feedback"),
    [
        (
            "strict",
            "repairs",
            ["cleaning"],
            "Expected tool calls: [repairs], got [cleaning]. Missing: [repairs]; "
            "not in the reference: [cleaning].",
        ),
        (
            "strict",
            "a, b",
            ["b", "a"],
            "Expected tool calls: [a, b], got [b, a]. The same calls, in a different "
            "order than the reference.",
        ),
        (
            "unordered",
            "none",
            ["cleaning"],
            "Expected tool calls: [], got [cleaning]. Not in the reference: "
            "[cleaning].",
        ),
        (
            "subset",
            "a",
            ["a", "b", "b"],
            "Expected tool calls: [a], got [a, b, b]. Only calls in the reference may "
            "be made; not in the reference: [b, b].",
        ),
        (
            "superset",
            "a, b, a",
            ["a"],
            "Expected tool calls: [a, b, a], got [a]. Every call in the reference must "
            "be made; missing: [b, a].",
        ),
        ("strict", "a, b", ["a", "b"], "The tool calls match the reference: [a, b]."),
        (
            "subset",
            "a, b",
            ["b"],
            "The tool calls [b] are all in the reference [a, b].",
        ),
        (
            "superset",
            "a",
            ["a", "b"],
            "The tool calls [a, b] include every call in the reference [a].",
        ),
    ],
)
def test_trajectory_feedback_reads_plainly(
    mode: str, reference: str, calls: list[str], feedback: str
) -> None:
    assert trajectory_match(mode)(lc_messages(calls), reference)[1] == feedback  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", list(shapes([])))
def test_trajectory_match_accepts_every_prediction_shape(shape: str) -> None:
    metric = trajectory_match("strict")
    assert metric(shapes(["lookup", "refund"])[shape], "lookup, refund")[0] == 1.0
    assert metric(shapes(["refund"])[shape], ["lookup"])[0] == 0.0


def test_ignored_tools_are_left_out_of_calls_and_reference() -> None:
    messages = lc_messages(["repairs"], ["ResponseFormat"])
    metric = trajectory_match("strict", ignore=["ResponseFormat"])
    assert metric(messages, "repairs") == (
        1.0,
        "The tool calls match the reference: [repairs].",
    )
    assert metric(messages, "repairs, ResponseFormat")[0] == 1.0
    assert trajectory_match("strict")(messages, "repairs")[0] == 0.0


def test_the_metric_rejects_a_plain_str_prediction_naming_the_argument() -> None:
    with pytest.raises(TypeError, match=r"^prediction must be"):
        trajectory_match("unordered")("repairs", "repairs")


def _reference_score(mode: str, reference: list[str], calls: list[str]) -> float:
    """The modes, computed the obvious way."""
    if mode == "strict":
        ok = calls == reference
    elif mode == "unordered":
        ok = sorted(calls) == sorted(reference)
    elif mode == "subset":
        ok = all(calls.count(n) <= reference.count(n) for n in calls)
    else:
        ok = all(reference.count(n) <= calls.count(n) for n in reference)
    return 1.0 if ok else 0.0


def _random_prediction(rng: random.Random, calls: list[str]) -> Any:
    """The calls split into random model turns (parallel calls), in a random
    prediction shape."""
    turns: list[list[str]] = []
    for name in calls:
        if turns and rng.random() < 0.4:
            turns[-1].append(name)
        else:
            turns.append([name])
    kind = rng.randrange(5)
    if kind == 0:
        return openai_messages(*turns)
    if kind == 1:
        return {"messages": langchain_dict_messages(*turns)}
    messages = lc_messages(*turns)
    if kind == 2:
        return messages
    if kind == 3:
        return {"messages": messages}
    return AgentOutput("Done.", {"messages": messages})


def _random_target(rng: random.Random, reference: list[str]) -> Any:
    """The reference in a random target form."""
    if not reference:
        return rng.choice(["", "none", "No tool", "[]", [], ()])
    form = rng.randrange(6)
    if form == 0:
        return list(reference)
    if form == 1:
        return tuple(reference)
    if form == 2:
        return ", ".join(reference)
    if form == 3:
        return "[" + ", ".join(reference) + "]"
    if form == 4:
        return str(list(reference))  # what str(target) makes of a list
    if len(reference) == 1:
        return reference[0]
    return ", ".join(reference[:-1]) + " and " + reference[-1]


def test_random_trajectories_score_as_defined_and_feedback_names_reference() -> None:
    rng = random.Random(19)
    pool = ["repairs", "cleaning", "billing", "lookup_order", "refund-2", "A1"]
    seen: Counter[tuple[str, float]] = Counter()
    for _ in range(400):
        reference = [rng.choice(pool[:3]) for _ in range(rng.randrange(4))]
        if rng.random() < 0.5:  # near misses: permute, drop or add a call
            calls = list(reference)
            rng.shuffle(calls)
            if calls and rng.random() < 0.5:
                calls.pop(rng.randrange(len(calls)))
            if rng.random() < 0.5:
                calls.insert(rng.randrange(len(calls) + 1), rng.choice(pool))
        else:
            calls = [rng.choice(pool) for _ in range(rng.randrange(4))]
        prediction = _random_prediction(rng, calls)
        target = _random_target(rng, reference)
        for mode in MODES:
            score, feedback = trajectory_match(mode)(prediction, target)  # type: ignore[arg-type]
            assert score == _reference_score(mode, reference, calls), (
                mode,
                reference,
                calls,
                feedback,
            )
            seen[mode, score] += 1
            parsed = world.expected_tools(feedback)
            if score == 0.0:
                assert parsed == tuple(reference), (mode, target, feedback)
            else:
                assert parsed is None, feedback
    # the draw exercised both outcomes of every mode
    assert all(seen[mode, s] >= 20 for mode in MODES for s in (0.0, 1.0)), seen


# -- final_answer_of and answer_match --------------------------------------------------


@pytest.mark.parametrize("shape", list(shapes([])))
def test_final_answer_of_reads_every_prediction_shape(shape: str) -> None:
    prediction = shapes(["repairs"], answer="A technician is on the way.")[shape]
    assert final_answer_of(prediction) == "A technician is on the way."


def test_final_answer_of_a_str_is_the_str_itself() -> None:
    out = AgentOutput("The answer", {"messages": [AIMessage("something else")]})
    assert final_answer_of(out) == "The answer"
    assert type(final_answer_of(out)) is str
    assert final_answer_of("plain") == "plain"


def test_final_answer_of_joins_text_blocks_and_is_empty_without_an_answer() -> None:
    blocks = AIMessage(
        content=[
            {"type": "text", "text": "Ticket "},
            {"type": "image_url", "image_url": {"url": "data:,"}},
            "R-1.",
        ]
    )
    assert final_answer_of([HumanMessage("x"), blocks]) == "Ticket R-1."
    assert final_answer_of([HumanMessage("x")]) == ""
    assert final_answer_of({"messages": []}) == ""
    calls_only = AIMessage("", tool_calls=[{"name": "a", "args": {}, "id": "1"}])
    assert final_answer_of([AIMessage("earlier"), calls_only]) == ""
    assert final_answer_of([{"role": "assistant", "content": None}]) == ""


def test_final_answer_of_an_unsupported_prediction_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^prediction must be"):
        final_answer_of(3.5)


def test_answer_match_normalizes_case_and_spaces_by_default() -> None:
    metric = answer_match()
    assert metric.__name__ == "answer_match"
    assert metric("  Repairs\n", "repairs") == (
        1.0,
        'The answer matches the expected answer "repairs".',
    )
    assert metric("ticket   R-1", "Ticket R-1")[0] == 1.0
    assert metric("cleaning", "repairs") == (
        0.0,
        'Expected the answer "repairs", got "cleaning".',
    )


def test_answer_match_without_normalize_compares_exactly() -> None:
    metric = answer_match(normalize=False)
    assert metric("Repairs", "Repairs")[0] == 1.0
    assert metric("repairs", "Repairs")[0] == 0.0
    assert metric("Repairs ", "Repairs")[0] == 0.0


def test_answer_match_applies_a_normalize_function_to_both_sides() -> None:
    metric = answer_match(normalize=lambda s: s.strip(" .!").lower())
    assert metric("Repairs!", "repairs.")[0] == 1.0
    with pytest.raises(TypeError, match=r"^normalize must be"):
        answer_match(normalize="yes")  # type: ignore[arg-type]


def test_answer_match_accepts_any_of_several_answers() -> None:
    metric = answer_match()
    assert metric("Maintenance", ("repairs", "maintenance")) == (
        1.0,
        'The answer matches the expected answer "maintenance".',
    )
    assert metric("cleaning", ["repairs", "maintenance"]) == (
        0.0,
        'Expected the answer "repairs" (or "maintenance"), got "cleaning".',
    )


def test_answer_match_reads_the_final_answer_of_a_trajectory() -> None:
    messages = lc_messages(["repairs"], answer="A technician is on the way.")
    metric = answer_match()
    assert metric({"messages": messages}, "a technician is on the way.")[0] == 1.0
    assert metric(AgentOutput("Nope", {"messages": messages}), "nope")[0] == 1.0


def test_answer_match_cuts_a_long_answer_in_its_feedback() -> None:
    _, feedback = answer_match()("x" * 2000, "y")
    assert feedback == 'Expected the answer "y", got "' + "x" * 500 + '...".'


@pytest.mark.parametrize("target", [3, None, [], ["a", 1]])
def test_answer_match_rejects_a_target_that_is_not_text(target: Any) -> None:
    with pytest.raises(TypeError, match=r"^target(\[1\])? must be"):
        answer_match()("x", target)


def test_the_simulator_backward_reads_the_expected_answer_from_the_feedback() -> None:
    """The answer feedback names the target in a form the chat backward reads: it
    writes a rule for the expected answer."""
    _, feedback = answer_match()("neutral", "negative")
    prompt = world.ChatBackwardPrompt(
        messages=(
            world.Message(
                "system",
                'If the message mentions "unhappy", the sentiment is negative.',
            ),
            world.Message("user", "I am so frustrated today"),
        ),
        feedback=feedback,
        variables=(world.PromptVariable("1", "system prompt", "system", True, "..."),),
    )
    assert world.chat_backward_gradients(prompt) == [
        'If the message mentions "frustrated", the sentiment is negative.'
    ]


# -- a real agent ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "calls"),
    [
        ("A flood in the basement!", ["cleaning", "repairs"]),
        ("What are the opening hours?", []),
    ],
)
def test_metrics_read_the_state_a_create_agent_agent_returns(
    message: str, calls: list[str]
) -> None:
    """On the simulator: the final state of ``create_agent`` (LangChain messages,
    parallel calls in one AIMessage, tool results) is read as the calls made."""
    pytest.importorskip("langgraph", reason="needs the agents extra")
    from langchain.agents import create_agent
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    from afnio.testing import SIMULATOR_MODEL, Simulator

    @tool
    def repairs(request: str) -> str:
        """Fix broken equipment."""
        return "A technician is on the way."

    @tool
    def cleaning(request: str) -> str:
        """Send a cleaner."""
        return "A cleaner is on the way."

    system = 'If the message mentions "flood", call cleaning and repairs.'
    with Simulator() as sim:
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="sk-test"
        )
        agent = create_agent(llm, tools=[repairs, cleaning], system_prompt=system)
        state = agent.invoke({"messages": [{"role": "user", "content": message}]})
    final = state["messages"][-1].content
    assert tool_calls_of(state) == calls
    assert final_answer_of(state) == final != ""
    reference = ", ".join(reversed(calls)) or "none"
    assert trajectory_match("unordered")(state, reference)[0] == 1.0
    assert trajectory_match("strict")(state, reference)[0] == (
        1.0 if len(calls) < 2 else 0.0
    )
    score, feedback = trajectory_match("superset")(state, "lookup_order")
    assert score == 0.0
    assert world.expected_tools(feedback) == ("lookup_order",)
    assert answer_match()(AgentOutput(final, state), final.upper())[0] == 1.0
