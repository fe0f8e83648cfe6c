"""The rule world's tool calling, as pure functions: the routing-rule grammar (in a
prompt and in a tool's description), the choice of calls under every ``tool_choice``,
the arguments filled from the schema, the final answer after tool results, the
feedback forms naming the expected tool, and the rules the chat backward and the
optimizer write for tool routing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from afnio.autodiff.lm_backward import VariableInfo, chat_backward_user
from afnio.autodiff.prompts import CHAT_BACKWARD_SYSTEM, gradients_response_format
from afnio.testing import world

ROUTER = (
    "Route the facility request to the right tool. "
    'If the message begins with "mop", call cleaning. '
    'If the message mentions "spill", call cleaning and repairs.'
)


def _tool(name: str, description: str = "", **properties: Any) -> dict[str, Any]:
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if properties:
        parameters["required"] = list(properties)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": parameters,
        },
    }


TOOLS = [
    _tool(
        "repairs",
        'Fixes broken equipment. Use this tool when the message mentions "broken".',
        query={"type": "string"},
        priority={"enum": ["low", "high"]},
    ),
    _tool("cleaning", "Sends a cleaner.", room={"type": "string"}),
    _tool("other", "Anything else."),
]


def _request(
    user: str | list[dict[str, Any]],
    system: str = ROUTER,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> world.SimRequest:
    messages = (
        [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if isinstance(user, str)
        else [{"role": "system", "content": system}, *user]
    )
    body = {
        "model": "m",
        "messages": messages,
        "tools": TOOLS if tools is None else tools,
    }
    return world.SimRequest.from_body({**body, **extra})


def _names(request: world.SimRequest) -> list[str]:
    return [call.name for call in world.choose_tool_calls(request, seed="s")]


def _after_calls(user: str, names: list[str], result: str = "done") -> list[dict]:
    """A conversation: the user message, an assistant message calling ``names``, and
    one tool result per call."""
    calls = [
        {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": n, "arguments": "{}"},
        }
        for i, n in enumerate(names)
    ]
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *(
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"{result} {n}"}
            for i, n in enumerate(names)
        ),
    ]


# -- the grammar -----------------------------------------------------------------------


def test_prompt_tool_rules_parse_one_several_and_no_tool() -> None:
    rules = world.find_tool_rules(
        'If the message begins with "mop", call cleaning. '
        'If the message mentions "spill", call cleaning, repairs and other. '
        'If the message mentions "hello", call no tool.'
    )
    assert [(r.kind, r.word, r.tools) for r in rules] == [
        ("begins with", "mop", ("cleaning",)),
        ("mentions", "spill", ("cleaning", "repairs", "other")),
        ("mentions", "hello", ()),
    ]
    assert rules[1].text() == (
        'If the message mentions "spill", call cleaning, repairs and other.'
    )


def test_tool_rules_and_label_rules_never_read_as_each_other() -> None:
    text = (
        'If the message mentions "leak", call repairs. '
        'If the message mentions "leak", the urgency is high.'
    )
    assert [r.label for r in world.find_rules(text)] == ["high"]
    assert [r.tools for r in world.find_tool_rules(text)] == [("repairs",)]


def test_description_rules_are_read_and_a_negated_sentence_is_not_one() -> None:
    spec = world.ToolSpec(
        "cleaning",
        'Cleans. Use this tool when the message begins with "mop". '
        'Do not use this tool when the message mentions "leak". '
        'Use this tool when the message mentions "dusty".',
    )
    assert [(r.kind, r.word, r.tools, r.source) for r in spec.rules()] == [
        ("begins with", "mop", ("cleaning",), "description"),
        ("mentions", "dusty", ("cleaning",), "description"),
    ]


def test_the_message_is_the_last_user_message_without_rule_sentences() -> None:
    messages = [
        world.Message("user", "Mop the hall"),
        world.Message("assistant", "ok"),
        world.Message("user", 'Broken tap. If the message mentions "tap", call x.'),
        world.Message("tool", "spill everywhere"),
    ]
    assert world.tool_message(messages).strip() == "Broken tap."


# -- choosing calls --------------------------------------------------------------------


def test_a_begins_with_rule_in_the_system_prompt_calls_its_tool() -> None:
    assert _names(_request("Mop the hall, please")) == ["cleaning"]
    assert _names(_request("Please mop the hall")) == ["cleaning"]  # lead word "mop"
    assert _names(_request("The hall needs a mop")) == []  # mop is not the lead word


def test_a_rule_listing_several_tools_makes_parallel_calls_in_rule_order() -> None:
    assert _names(_request("A spill by the door")) == ["cleaning", "repairs"]


def test_the_matching_rule_whose_word_comes_first_in_the_message_decides() -> None:
    prompt = (
        'If the message mentions "dust", call cleaning. '
        'If the message mentions "leak", call repairs. '
        'If the message begins with "invoice", call other.'
    )
    assert _names(_request("A leak, then dust everywhere", system=prompt)) == [
        "repairs"
    ]
    assert _names(_request("Dust after the leak", system=prompt)) == ["cleaning"]
    # a begins-with rule speaks of the message's start: it comes first
    assert _names(_request("Invoice for the leak and dust", system=prompt)) == ["other"]
    _, rules = world.tool_routing(
        _request("A leak, then dust", system=prompt), [world.ToolSpec("repairs")]
    )
    assert [r.word for r in rules] == ["leak"]


def test_description_rules_also_decide_by_the_earliest_word() -> None:
    tools = [
        _tool("repairs", 'Use this tool when the message mentions "leak".'),
        _tool("cleaning", 'Use this tool when the message mentions "dust".'),
    ]
    assert _names(_request("Dust, then a leak", system="Route.", tools=tools)) == [
        "cleaning"
    ]


def test_parallel_tool_calls_false_calls_one_tool_per_request() -> None:
    first = _request("A spill by the door", parallel_tool_calls=False)
    assert _names(first) == ["cleaning"]
    second = _request(
        _after_calls("A spill by the door", ["cleaning"]), parallel_tool_calls=False
    )
    assert _names(second) == ["repairs"]  # the next routed tool, then the answer
    third = _request(
        _after_calls("A spill by the door", ["cleaning", "repairs"]),
        parallel_tool_calls=False,
    )
    assert _names(third) == []


def test_a_tool_description_routes_when_no_prompt_rule_matches() -> None:
    assert _names(_request("The heater is broken")) == ["repairs"]
    assert _names(_request("The heater is broken", system="Route it.")) == ["repairs"]
    # a prompt rule that matches takes precedence over the descriptions
    prompt = 'If the message mentions "heater", call other.'
    assert _names(_request("The heater is broken", system=prompt)) == ["other"]


def test_call_no_tool_and_unknown_tool_names() -> None:
    prompt = (
        'If the message begins with "thanks", call no tool. '
        'If the message mentions "broken", call plumbing.'
    )
    assert _names(_request("Thanks, the broken tap works", system=prompt)) == []
    # "plumbing" is not offered: ignored, and the descriptions are not consulted
    assert _names(_request("A broken tap", system=prompt)) == []


@pytest.mark.parametrize(
    ("tool_choice", "text", "expected"),
    [
        ("auto", "Hello, when do you open?", []),
        ("none", "Mop the hall", []),
        ("required", "Hello, when do you open?", ["other"]),  # the last tool
        ("any", "Mop the hall", ["cleaning"]),  # LangChain's spelling of required
        ({"type": "function", "function": {"name": "other"}}, "Mop it", ["other"]),
        ({"type": "function", "name": "other"}, "Mop it", ["other"]),
    ],
)
def test_tool_choice_variants(tool_choice: Any, text: str, expected: list[str]) -> None:
    assert _names(_request(text, tool_choice=tool_choice)) == expected


def test_a_tool_is_never_called_again_for_the_same_message() -> None:
    after = _request(_after_calls("Mop the hall", ["cleaning"]))
    assert _names(after) == []
    # a new user message starts a new turn: the tool may be called again
    again = _request(
        [
            *_after_calls("Mop the hall", ["cleaning"]),
            {"role": "assistant", "content": "done cleaning"},
            {"role": "user", "content": "Mop the kitchen too"},
        ]
    )
    assert _names(again) == ["cleaning"]


def test_required_after_tool_results_calls_the_last_tool_not_called_yet() -> None:
    after = _request(_after_calls("Mop the hall", ["cleaning"]), tool_choice="required")
    assert _names(after) == ["other"]  # e.g. LangChain's structured-output tool
    everything = _request(
        _after_calls("Mop the hall", ["repairs", "cleaning", "other"]),
        tool_choice="required",
    )
    assert _names(everything) == ["other"]


def test_no_tools_means_no_calls_and_the_label_answer_is_unchanged() -> None:
    rules = 'If the message mentions "leak", the urgency is high.'
    plain = world.SimRequest.from_messages(
        [{"role": "system", "content": rules}, {"role": "user", "content": "A leak"}]
    )
    with_tools = _request("A leak", system=rules)
    assert world.choose_tool_calls(plain) == ()
    assert world.answer(plain).label == "high"
    assert world.final_answer(with_tools).label == "high"


def test_call_ids_are_deterministic_and_differ_per_seed_and_index() -> None:
    request = _request("A spill")
    first = world.choose_tool_calls(request, seed="a")
    assert first == world.choose_tool_calls(request, seed="a")
    ids = [c.id for c in first] + [c.id for c in world.choose_tool_calls(request, "b")]
    assert len(set(ids)) == 4
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


# -- arguments -------------------------------------------------------------------------


def test_arguments_fill_every_property_from_the_schema() -> None:
    spec = world.ToolSpec(
        "lookup",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "kind": {"enum": ["order", "refund"]},
                "limit": {"type": "integer"},
                "page": {"type": "integer", "default": 2},
                "tone": {"type": "string", "default": "polite"},
                "exact": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            "required": ["query", "kind"],
        },
    )
    request = _request("  Where is order 7?  ")
    assert json.loads(world.tool_arguments(spec, request)) == {
        "query": "Where is order 7?",
        "kind": "order",
        "limit": 0,
        "page": 2,
        "tone": "polite",
        "exact": False,
        "tags": [],
        "where": {"city": "Where is order 7?"},
    }
    assert world.tool_arguments(world.ToolSpec("ping"), request) == "{}"


def test_a_property_named_like_the_label_field_gets_the_rules_label() -> None:
    spec = world.ToolSpec(
        "Answer",
        parameters={
            "type": "object",
            "properties": {"urgency": {"enum": ["low", "high"]}},
        },
    )
    rules = 'If the message begins with "leak", the urgency is high.'
    args = world.tool_arguments(spec, _request("Leak in the lab", system=rules))
    assert json.loads(args) == {"urgency": "high"}


# -- the final answer ------------------------------------------------------------------


def test_the_final_answer_is_the_last_tool_result_without_label_rules() -> None:
    request = _request(_after_calls("Mop the hall", ["cleaning"], "Sent to"))
    assert world.choose_tool_calls(request) == ()
    result = world.final_answer(request)
    assert (result.label, result.responder) == ("Sent to cleaning", "tool_result")


def test_the_final_answer_follows_label_rules_when_the_prompt_has_them() -> None:
    system = ROUTER + ' If the message begins with "mop", the team is facilities.'
    request = _request(_after_calls("Mop the hall", ["cleaning"]), system=system)
    assert world.final_answer(request).label == "facilities"


# -- request checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": {"name": "x"}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        ({"tools": [_tool("a"), _tool("a")]}, "tools[1].function.name"),
    ],
)
def test_malformed_tools_are_refused_naming_the_parameter(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(world.ToolRequestError) as caught:
        world.parse_tools(body)
    assert param in caught.value.param


@pytest.mark.parametrize(
    ("tool_choice", "tools", "param"),
    [
        ("sometimes", [world.ToolSpec("a")], "tool_choice"),
        ("required", [], "tool_choice"),
        (
            {"type": "function", "function": {"name": "b"}},
            [world.ToolSpec("a")],
            "name",
        ),
        ({"type": "function"}, [world.ToolSpec("a")], "tool_choice"),
    ],
)
def test_bad_tool_choices_are_refused(
    tool_choice: Any, tools: list[world.ToolSpec], param: str
) -> None:
    with pytest.raises(world.ToolRequestError) as caught:
        world.parse_tool_choice({"tool_choice": tool_choice}, tools)
    assert param in caught.value.param


# -- feedback forms --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feedback", "expected"),
    [
        ("Wrong tool: expected a call to repairs, got cleaning.", ("repairs",)),
        ('expected a call to "repairs"', ("repairs",)),
        ("Expected calls to `cleaning` and `repairs`.", ("cleaning", "repairs")),
        ("expected a tool call to other", ("other",)),
        ('The expected tool is "cleaning".', ("cleaning",)),
        (
            "Expected tool calls: [lookup_order, refund-desk]",
            ("lookup_order", "refund-desk"),
        ),
        ('Expected tools: "a", "b"', ("a", "b")),
        ("The agent should have called repairs instead.", ("repairs",)),
        ("Expected no tool call: the message is a greeting.", ()),
        ('The prediction "x" is wrong: the expected value is "y".', None),
        ("", None),
    ],
)
def test_expected_tools_reads_the_documented_feedback_forms(
    feedback: str, expected: tuple[str, ...] | None
) -> None:
    assert world.expected_tools(feedback) == expected


# -- the chat backward -----------------------------------------------------------------


CALLED_CLEANING = json.dumps(
    [{"name": "cleaning", "args": {}, "id": "c", "type": "tool_call"}]
)
"""An ``<LM_OUTPUT>`` that shows tool calling: LangChain's ``tool_calls``."""


def _backward(
    feedback: str,
    variables: list[VariableInfo],
    user: str = "Leak under the sink in room 4",
    output: str = CALLED_CLEANING,
    system: str = "Route the facility request.",
) -> list[str]:
    conversation = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    prompt = chat_backward_user(conversation, "assistant", output, feedback, variables)
    request = world.SimRequest.from_messages(
        [
            {"role": "system", "content": CHAT_BACKWARD_SYSTEM},
            {"role": "user", "content": prompt},
        ],
        response_format=gradients_response_format(),
    )
    result = world.answer(request)
    assert result.responder == "chat_backward"
    return json.loads(world.respond(request))["gradients"]


SYSTEM_VAR = VariableInfo(
    "system prompt", "system", True, "Route the facility request."
)


def _lead_line_rules(
    tool: str, words: tuple[str, ...] = ("leak", "sink", "room")
) -> str:
    return " ".join(f'If the message mentions "{w}", call {tool}.' for w in words)


def test_the_backward_proposes_a_rule_for_each_lead_line_word() -> None:
    """The words of the message's lead line (what it says it is about) are proposed,
    one ``mentions`` rule each, in order; the optimizer weighs them over the batch."""
    gradients = _backward("Wrong tool: expected a call to repairs.", [SYSTEM_VAR])
    assert gradients == [_lead_line_rules("repairs")]


def test_without_a_topic_word_the_rules_name_the_lead_line_for_every_tool() -> None:
    # the message names no expected tool and no word of its (unshown) description
    for tool in ("repairs", "cleaning", "other"):
        gradients = _backward(f"expected a call to {tool}", [SYSTEM_VAR])
        assert gradients == [_lead_line_rules(tool)]


def test_only_the_lead_line_is_proposed_and_the_answer_after_tools_is_neutral() -> None:
    user = "Subject: Burst pipe\n\nDear team, the kitchen floods."
    gradients = _backward("expected a call to repairs", [SYSTEM_VAR], user=user)
    assert gradients == [_lead_line_rules("repairs", ("burst", "pipe"))]
    # the final-answer call of an agent loop (after the tool results, answering as
    # its rules say) did not choose the tools: the routing call carries the feedback
    system = 'Route. If the message mentions "pipe", call cleaning.'
    conversation = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": CALLED_CLEANING},
        {"role": "tool", "content": "A cleaner is on the way."},
    ]
    variables = [VariableInfo("system prompt", "system", True, system)]
    prompt = world.ChatBackwardPrompt.parse(
        chat_backward_user(
            conversation,
            "assistant",
            "A cleaner is on the way.",
            "Expected tool calls: [repairs], got [cleaning].",
            variables,
        )
    )
    assert world.chat_backward_gradients(prompt) == [
        "The system prompt should lead to a call to repairs for this input."
    ]


def test_the_rule_word_is_the_first_message_word_tied_to_the_expected_tool() -> None:
    """A model names the word that ties the message to the tool: the first word
    that names the expected tool or occurs in its description (a ``mentions``
    rule), not the lead word."""
    variables = [
        SYSTEM_VAR,
        VariableInfo("tool description", "tool:repairs", True, "Fix HVAC, plumbing."),
        VariableInfo("tool description", "tool:cleaning", True, "Deep cleaning."),
    ]
    user = "Urgent: the plumbing leaks and the hvac is down; repairs needed"
    gradients = _backward("expected a call to repairs", variables, user=user)
    # the topic word first, then the lead line's other words
    assert gradients[:2] == [
        _lead_line_rules(
            "repairs", ("plumbing", "urgent", "leaks", "hvac", "repairs", "needed")
        ),
        'Use this tool when the message mentions "plumbing".',
    ]
    # the tool's name counts too, any inflection (the stem's first letters)
    cleaning = _backward(
        "expected a call to cleaning", variables, user="Leak fixed; please clean up"
    )
    assert cleaning[0].startswith('If the message mentions "clean", call cleaning.')


def test_tool_vocabulary_and_topic_word_ignore_rules_stopwords_and_negation() -> None:
    spec = world.ToolSpec(
        "cleaning", 'Deep cleaning. Use this tool when the message mentions "urgent".'
    )
    assert "urgen" not in world.tool_vocabulary([spec])  # a rule is no description
    assert world.tool_topic_word("Not cleaning: a deep leak", [spec]) == "deep"
    assert world.tool_topic_word("Urgent: a leak", [spec]) is None


def test_the_topic_word_is_one_no_other_offered_tool_shares() -> None:
    """A word that several offered tools name or describe (``order``) ties the
    message to none of them: the backward names a word of the expected tool's
    own vocabulary."""
    variables = [
        SYSTEM_VAR,
        VariableInfo("tool description", "tool:refund", True, "Refund an order."),
        VariableInfo("tool description", "tool:lookup_order", True, "Find an order."),
    ]
    user = "My order 42 arrived broken, I want a refund"
    gradients = _backward(
        "expected a call to refund", variables, user=user, output="[]"
    )
    assert gradients[0] == _lead_line_rules(
        "refund", ("refund", "order", "arrived", "broken", "want")
    )
    assert gradients[1] == 'Use this tool when the message mentions "refund".'
    spec = world.ToolSpec("refund", "Refund an order.")
    other = world.ToolSpec("lookup_order", "Find an order.")
    assert world.tool_topic_word(user, [spec]) == "order"  # nothing to tell apart
    assert world.tool_topic_word("My order is late", [spec], [other]) is None


def test_a_rule_corrected_in_place_gives_descriptions_only_their_own_word() -> None:
    """When the prompt's deciding rule is corrected in place (its word reused), the
    expected tool's description gets its own topic word, or no rule: never the
    reused word, which may be any tool's (``dust`` here)."""
    system = 'Route. If the message mentions "dust", call cleaning.'
    variables = [
        VariableInfo("system prompt", "system", True, system),
        VariableInfo("tool description", "tool:repairs", True, "Fix a leak."),
    ]
    with_topic = _backward(
        "expected a call to repairs",
        variables,
        user="Dust from the leak repair",
        system=system,
    )
    assert with_topic[:2] == [
        'If the message mentions "dust", call repairs. '
        'If the message mentions "leak", call repairs. '
        'If the message mentions "repair", call repairs.',
        'Use this tool when the message mentions "leak".',
    ]
    without = _backward(
        "expected a call to repairs", variables, user="Dust again", system=system
    )
    assert without[0] == 'If the message mentions "dust", call repairs.'
    assert "dust" not in without[1] and without[1].startswith("The ")


def test_possessives_hyphens_and_camel_case_words_are_split_for_the_topic() -> None:
    spec = world.ToolSpec("hvacService", "Fix heating.")
    assert world.tool_vocabulary([spec]) >= {"hvac", "servi", "heati"}
    assert world.tool_topic_word("Our HVAC's fan", [spec]) == "hvac"
    assert world.tool_topic_word("An HVAC-related noise", [spec]) == "hvac"
    assert world.tool_topic_word("The heating-system failed", [spec]) == "heating"


def test_a_negated_word_does_not_trigger_a_mentions_tool_rule() -> None:
    prompt = (
        'If the message mentions "leak", call repairs. '
        'If the message mentions "dust", call cleaning.'
    )
    assert _names(_request("No leak, but dust everywhere", system=prompt)) == [
        "cleaning"
    ]
    assert _names(_request("There isn't any leak", system=prompt)) == []
    assert _names(_request("A leak, not dust", system=prompt)) == ["repairs"]


def test_a_begins_with_rule_decides_at_its_lead_words_place() -> None:
    """``begins with "urgent"`` and ``mentions "urgent"`` speak of the same word:
    they decide together, and a ``mentions`` rule for a word before the lead word
    (in a skipped header) comes first."""
    prompt = (
        'If the message begins with "urgent", call repairs. '
        'If the message mentions "urgent", call cleaning.'
    )
    assert _names(_request("Subject: Urgent - dust", system=prompt)) == [
        "repairs",
        "cleaning",
    ]
    header = (
        'If the message mentions "subject", call other. '
        'If the message begins with "urgent", call repairs.'
    )
    assert _names(_request("Subject: Urgent - dust", system=header)) == ["other"]


def test_the_vote_counts_exactly_and_reads_per_alternative_counts() -> None:
    alternatives = " | ".join(f'"{w}"' for w in "abcdefghi") + ' | "x"'
    feedback = "\n".join(
        [f"- If the message mentions {{{alternatives}}}, call p."] * 30
        + ['- If the message mentions "x", call q.']
    )
    # p: 30 shares of 1/10 = exactly 3 of the 4 proposals for "x": a clear majority
    # (RULE_MAJORITY, 3/4, reached exactly); a..i: 3 each, unopposed
    out = world.improve_value("R.", feedback)
    assert 'If the message mentions "x", call p.' in out
    assert 'If the message mentions "a", call p.' in out
    assert "call q." not in out
    counted = (
        '- If the message mentions {"hvac" (x10) | "leak" | "fan"}, '
        "call repairs. (x12)\n"
        '- If the message mentions "hvac", call cleaning. (x2)'
    )
    assert world.expand_alternatives(counted.splitlines()[0])[0] == (
        '- If the message mentions "hvac", call repairs. (x12)'
    )
    out = world.improve_value("R.", counted)
    assert 'If the message mentions "hvac", call repairs.' in out  # 10 of 12
    assert "call cleaning." not in out
    # 14 samples: "leak" and "fan" (one each) are anecdotes, below RULE_SUPPORT
    assert '"leak"' not in out and '"fan"' not in out


def test_several_condensed_sentences_on_one_line_are_weighed_one_by_one() -> None:
    """TGD condenses multi-rule feedback into one line with a group per sentence; each
    sentence's alternatives are weighed on their own (not every combination)."""
    line = (
        '- If the message mentions {"hvac" (x3) | "fan"}, call repairs. '
        'If the message mentions {"boiler" (x2) | "pipe" (x2)}, call repairs. (x4)'
    )
    other = '- If the message mentions "door", call locks. (x6)'
    out = world.improve_value("R.", line + "\n" + other)
    # 10 feedbacks propose rules: "fan" (1 of them) is below RULE_SUPPORT
    assert out == (
        'R. If the message mentions "hvac", call repairs. '
        'If the message mentions "boiler", call repairs. '
        'If the message mentions "pipe", call repairs. '
        'If the message mentions "door", call locks.'
    )


def test_a_rule_without_a_clear_majority_is_removed_a_small_batch_needs_one() -> None:
    current = 'Route. If the message mentions "urgent", call general.'
    split = (
        '- If the message mentions "urgent", call general. (x3)\n'
        '- If the message mentions "urgent", call repairs. (x2)'
    )
    # 3 of 5 is no clear majority: "urgent" does not tell the tools apart
    assert world.improve_value(current, split) == "Route."
    confirmed = (
        '- If the message mentions "urgent", call general. (x6)\n'
        '- If the message mentions "urgent", call repairs. (x2)'
    )
    assert world.improve_value(current, confirmed) == current  # 6 of 8 keep it
    # a feedback on fewer than RULE_SUPPORT_FEEDBACKS samples writes what one asks
    assert world.improve_value("R.", '- If the message mentions "mop", call c.') == (
        'R. If the message mentions "mop", call c.'
    )
    many = (
        '- If the message mentions "mop", call c.\n'
        '- If the message mentions "broom", call c. (x9)\n'
        "- Feedback that proposes no rule is no sample of the vote. (x30)"
    )
    assert world.improve_value("R.", many) == (
        'R. If the message mentions "broom", call c.'
    )
    # one contrary vote among many does not remove a rule without a clear majority
    lone = (
        '- If the message mentions "urgent", call repairs.\n'
        '- If the message mentions "urgent", call general.\n'
        '- If the message mentions "broom", call c. (x9)'
    )
    assert world.improve_value(current, lone).startswith(current)


def test_a_confirmed_call_restates_the_rule_that_made_it() -> None:
    system = 'Route. If the message mentions "leak", call repairs.'
    variables = [
        VariableInfo("system prompt", "system", True, system),
        VariableInfo("tool description", "tool:repairs", True, "Fixes."),
    ]
    called = json.dumps([{"name": "repairs", "args": {}, "id": "c"}])
    gradients = _backward(
        "The tool calls match the reference: [repairs].",
        variables,
        system=system,
        output=called,
    )
    # the deciding rule restated, then the words of the lead line (a vote on them)
    assert gradients == [
        'If the message mentions "leak", call repairs. '
        'If the message mentions "sink", call repairs. '
        'If the message mentions "room", call repairs.',
        "The tool description led to the call to repairs for this input.",
    ]
    assert world.confirmed_tools("Expected tool calls: [a], got [b].") is None


def test_the_backward_gives_tool_descriptions_their_own_rule_form() -> None:
    variables = [
        SYSTEM_VAR,
        VariableInfo("tool description", "tool:repairs", True, "Fixes things."),
        VariableInfo("tool description", "tool:cleaning", True, "Cleans."),
        VariableInfo("tool description", "tool:other", True, "Anything else."),
        VariableInfo("argument description", "tool:repairs:query", True, "What."),
    ]
    called = json.dumps(
        [{"name": "cleaning", "args": {}, "id": "c", "type": "tool_call"}]
    )
    gradients = _backward("expected a call to repairs", variables, output=called)
    assert gradients == [
        _lead_line_rules("repairs"),
        'Use this tool when the message mentions "leak".',
        'Do not use this tool when the message mentions "leak".',
        "The tool description should lead to a call to repairs for this input.",
        "The argument description should lead to a call to repairs for this input.",
    ]


def test_a_frozen_system_prompt_leaves_the_rule_to_the_description() -> None:
    frozen = VariableInfo("system prompt", "system", False, "Route.")
    by_role = VariableInfo("description of the repairs tool", "", True, "Fixes.")
    gradients = _backward("The expected tool is repairs.", [frozen, by_role])
    assert gradients == [
        "The system prompt should lead to a call to repairs for this input.",
        'Use this tool when the message mentions "leak".',
    ]


def test_the_backward_says_why_when_no_rule_can_be_written() -> None:
    gradients = _backward("expected a call to other", [SYSTEM_VAR], user="Hello there!")
    assert gradients[0].startswith(
        "The system prompt should lead to a call to other for inputs like this one. "
        "No rule can be written: the input holds no content word"
    )


def test_expected_no_tool_call_writes_a_call_no_tool_rule() -> None:
    gradients = _backward("Expected no tool call.", [SYSTEM_VAR], user="Thanks a lot!")
    assert gradients == [_lead_line_rules("no tool", ("thanks", "lot"))]


def test_label_feedback_still_writes_label_rules() -> None:
    gradients = _backward(
        'The prediction "low" is wrong: the expected value is "high".',
        [SYSTEM_VAR],
        system="Classify the urgency: low, medium or high.",
        output="low",
    )
    assert gradients == ['If the message begins with "leak", the urgency is high.']


# -- the optimizer ---------------------------------------------------------------------


def test_the_optimizer_replaces_the_tool_rule_for_the_same_word() -> None:
    current = (
        'Route. If the message begins with "leak", call cleaning. '
        'If the message begins with "leak", the urgency is high.'
    )
    improved = world.improve_value(
        current, '- If the message begins with "leak", call repairs.'
    )
    assert improved == (
        'Route. If the message begins with "leak", call repairs. '
        'If the message begins with "leak", the urgency is high.'
    )


def test_the_optimizer_adds_description_rules_once_and_removes_them() -> None:
    feedback = (
        'Use this tool when the message begins with "leak".\n'
        'Use this tool when the message begins with "leak".\n'
        'Use this tool when the message begins with "drip".'
    )
    added = world.improve_value("Fixes things.", feedback)
    assert added == (
        'Fixes things. Use this tool when the message begins with "leak". '
        'Use this tool when the message begins with "drip".'
    )
    removed = world.improve_value(
        added, 'Do not use this tool when the message begins with "leak".'
    )
    assert removed == 'Fixes things. Use this tool when the message begins with "drip".'


def test_the_optimizer_writes_a_tool_rule_only_for_a_clear_majority() -> None:
    feedback = (
        '- If the message mentions "hvac", call cleaning.\n'
        '- If the message mentions "hvac", call repairs. (x3)\n'
        '- If the message mentions {"hvac" | "dust"}, call other. (x4)'
    )
    # "hvac": repairs 3, cleaning 1, other 2 (4 shared by two words): 3 of 6 is no
    # clear majority (RULE_MAJORITY); "dust": other 2, unopposed
    assert world.improve_value("Route.", feedback) == (
        'Route. If the message mentions "dust", call other.'
    )
    feedback = feedback.replace("(x3)", "(x9)")  # 9 of 12: a clear majority
    assert world.improve_value("Route.", feedback) == (
        'Route. If the message mentions "hvac", call repairs. '
        'If the message mentions "dust", call other.'
    )
    # a tie is no majority; label rules are not voted (the last wins)
    tie = (
        '- If the message mentions "x", call a.\n- If the message mentions "x", call b.'
    )
    assert world.improve_value("R.", tie) == "R."
    labels = (
        '- If the message mentions "x", the mood is low. (x3)\n'
        '- If the message mentions "x", the mood is high.'
    )
    assert (
        world.improve_value("C.", labels)
        == 'C. If the message mentions "x", the mood is high.'
    )


def test_the_optimizer_votes_between_adding_and_removing_a_description_rule() -> None:
    current = 'Cleans. Use this tool when the message mentions "leak".'
    keep = (
        '- Use this tool when the message mentions "leak". (x2)\n'
        '- Do not use this tool when the message mentions "leak".'
    )
    assert world.improve_value(current, keep) == current
    drop = (
        '- Use this tool when the message mentions "leak".\n'
        '- Do not use this tool when the message mentions "leak". (x2)'
    )
    assert world.improve_value(current, drop) == "Cleans."


def test_backward_then_optimizer_then_forward_routes_the_message() -> None:
    """The loop closes without a model: a misrouted message gets a rule, the
    optimizer puts it in the prompt, and the next request calls the expected tool."""
    system = "Route the facility request."
    request = _request("Leak under the sink", system=system, tool_choice="required")
    assert _names(request) == ["other"]  # the default: the last tool
    wrong = _request("Leak under the sink", system=system, tools=TOOLS[1:])
    assert _names(wrong) == []  # "auto": no rule, no call
    gradient = _backward("expected a call to cleaning", [SYSTEM_VAR])[0]
    learned = world.improve_value(system, gradient)
    assert _names(_request("Leak under the sink", system=learned)) == ["cleaning"]
    # a message sharing no word with the rules is not routed by them
    assert _names(_request("The window is stuck", system=learned)) == []


# -- review fixes: label feedback, required, wrong rules, more forms, legacy params ---


@pytest.mark.parametrize(
    "feedback",
    [
        "You answered shipping, but you should call it billing. The expected topic is "
        '"billing".',
        "Wrong: you should call attention to the invoice. The expected topic is "
        '"billing".',
        'Wrong. Expected no calls for refunds here; the expected topic is "billing".',
        # a tool form, but the prompt shows no tool calling: label feedback
        'Expected a call to billing. The expected topic is "billing".',
    ],
)
def test_label_feedback_that_speaks_of_calls_still_writes_label_rules(
    feedback: str,
) -> None:
    gradients = _backward(
        feedback,
        [VariableInfo("system prompt", "system", True, "Classify the topic.")],
        user="Charged twice for my order",
        output="shipping",
        system="Classify the topic: billing or shipping.",
    )
    assert gradients == ['If the message begins with "charged", the topic is billing.']


def test_tool_feedback_naming_a_tool_not_offered_is_not_tool_feedback() -> None:
    offered = json.dumps([_tool("repairs", "Fixes."), _tool("cleaning", "Cleans.")])
    prompt = world.ChatBackwardPrompt(
        messages=(
            world.Message("system", "Classify the topic: billing or shipping."),
            world.Message("tools", offered),
            world.Message("user", "Charged twice"),
        ),
        feedback='Expected: [billing]. The expected topic is "billing".',
        variables=(world.PromptVariable("1", "system prompt", "system", True, "."),),
        output="shipping",
    )
    assert world.shown_tools(prompt, ["billing"]).evidence is False
    assert world.chat_backward_gradients(prompt) == [
        'If the message begins with "charged", the topic is billing.'
    ]
    tool_feedback = dataclasses.replace(prompt, feedback="Expected: [repairs].")
    assert world.chat_backward_gradients(tool_feedback) == [
        _lead_line_rules("repairs", ("charged", "twice"))
    ]


def test_required_with_nothing_routed_calls_the_last_tool_not_called_yet() -> None:
    # no rule matches: the last tool, before any tool result
    assert _names(_request("When do you open?", tool_choice="required")) == ["other"]
    # a matching "call no tool" rule cannot make a required request answer in text
    no_tool = 'If the message begins with "hello", call no tool.'
    assert _names(_request("Hello!", system=no_tool, tool_choice="required")) == [
        "other"
    ]
    # the last tool already called: the last one not called yet
    after = _request(_after_calls("Hello!", ["other"]), system=no_tool)
    assert _names(world.SimRequest.from_body({**after.body, "tool_choice": "any"})) == [
        "cleaning"
    ]


def test_the_backward_reuses_the_word_and_kind_of_the_wrong_rule() -> None:
    system = 'Route. If the message mentions "leak", call cleaning.'
    gradients = _backward(
        "Expected tool calls: [repairs], got ['cleaning']",
        [
            VariableInfo("system prompt", "system", True, system),
            VariableInfo("tool description", "tool:cleaning", True, "Cleans."),
        ],
        user="There is a leak under the sink",
        system=system,
    )
    assert gradients == [
        'If the message mentions "leak", call repairs. '
        'If the message mentions "sink", call repairs.',
        'Do not use this tool when the message mentions "leak".',
    ]


def test_a_removal_drops_a_description_rule_of_the_same_word_whatever_its_kind() -> (
    None
):
    removed = world.improve_value(
        'Cleans. Use this tool when the message mentions "leak".',
        'Do not use this tool when the message begins with "leak".',
    )
    assert removed == "Cleans."


def test_a_wrong_routing_rule_is_corrected_until_only_the_expected_tool_is_called() -> (
    None
):
    """Backward -> optimizer -> forward, from a wrong ``mentions`` rule: the rule is
    replaced in place (not outvoted by a second rule whose tools are added to it)."""
    system = 'Route the request. If the message mentions "leak", call cleaning.'
    description = 'Sends a cleaner. Use this tool when the message mentions "leak".'
    tools = [_tool("cleaning", description), _tool("repairs", "Fixes things.")]
    user = "There is a leak under the sink"
    history = []
    for _ in range(3):
        tools[0]["function"]["description"] = description
        called = _names(_request(user, system=system, tools=tools))
        history.append(called)
        if called == ["repairs"]:
            break
        output = json.dumps([{"name": n, "args": {}} for n in called])
        system_gradient, description_gradient = _backward(
            f"Expected tool calls: [repairs], got {called}",
            [
                VariableInfo("system prompt", "system", True, system),
                VariableInfo("tool description", "tool:cleaning", True, description),
            ],
            user=user,
            output=output,
            system=system,
        )
        system = world.improve_value(system, system_gradient)
        description = world.improve_value(description, description_gradient)
    assert history[-1] == ["repairs"]
    assert system == (
        'Route the request. If the message mentions "leak", call repairs. '
        'If the message mentions "sink", call repairs.'
    )
    assert description == "Sends a cleaner."


@pytest.mark.parametrize(
    ("feedback", "expected"),
    [
        ("Expected tool calls: [], got ['cleaning']", ()),
        ("expected tools ['repairs'] but got ['cleaning']", ("repairs",)),
        ("Expected: [repairs]. Got: [cleaning].", ("repairs",)),
        ("The agent should not have called any tool.", ()),
        ("No tool should have been called.", ()),
        ("Wrong tool: called cleaning, expected repairs.", ("repairs",)),
        ("The agent should have called the repairs tool", ("repairs",)),
        ("it should call a and b.", ("a", "b")),
        # label feedback
        ("You should call it billing.", None),
        ("The assistant should call attention to overdue invoices.", None),
        ("The agent should call out the urgency.", None),
        ("Expected no calls for refunds here.", None),
    ],
)
def test_expected_tools_reads_trajectory_metric_phrasings(
    feedback: str, expected: tuple[str, ...] | None
) -> None:
    assert world.expected_tools(feedback) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": []}, "tools"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_empty_tools_and_legacy_functions_are_refused(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(world.ToolRequestError) as caught:
        world.parse_tools(body)
    assert caught.value.param == param
    if param != "tools":
        assert "tools" in str(caught.value)  # says what to use instead


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required"])
def test_any_tool_choice_without_tools_is_refused(tool_choice: str) -> None:
    with pytest.raises(world.ToolRequestError) as caught:
        world.parse_tool_choice({"tool_choice": tool_choice}, [])
    assert caught.value.param == "tool_choice"
