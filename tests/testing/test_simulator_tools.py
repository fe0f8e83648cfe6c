"""The simulator speaks OpenAI tool calling to the real ``openai`` SDK (sync, async,
streamed, parallel, every ``tool_choice``, an agent loop with tool results) and to
LangChain's ``ChatOpenAI(...).bind_tools([...])``, against the live server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from afnio.testing import SIMULATOR_MODEL, Fault, Simulator

ROUTER = (
    "Route the facility request. "
    'If the message begins with "mop", call cleaning. '
    'If the message mentions "spill", call cleaning and repairs.'
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "repairs",
            "description": "Fixes equipment. "
            'Use this tool when the message mentions "broken".',
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "priority": {"type": "string", "enum": ["low", "high"]},
                },
                "required": ["query", "priority"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "cleaning",
            "description": "Sends a cleaner.",
            "parameters": {
                "type": "object",
                "properties": {"room": {"type": "string"}},
                "required": ["room"],
            },
        },
    },
]


def _messages(user: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": ROUTER}, {"role": "user", "content": user}]


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (call.function.name, json.loads(call.function.arguments))
        for call in message.tool_calls or []
    ]


# -- one call, parallel calls, no call -------------------------------------------------


def test_a_routed_message_gets_a_tool_call_in_the_openai_shape(
    sim: Simulator, client: openai.OpenAI
) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages("Mop the lobby"), tools=TOOLS
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert _calls(choice.message) == [("cleaning", {"room": "Mop the lobby"})]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    # usage: prompt as without tools; completion: the words of name and arguments
    assert reply.usage.prompt_tokens == len(ROUTER.split()) + 3 + 3 + 3
    arguments = choice.message.tool_calls[0].function.arguments
    assert reply.usage.completion_tokens == 1 + len(arguments.split())
    assert sim.stats.completion_tokens == reply.usage.completion_tokens


def test_several_matching_rules_give_parallel_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages("A spill in room 4"), tools=TOOLS
    )
    message = reply.choices[0].message
    assert _calls(message) == [
        ("cleaning", {"room": "A spill in room 4"}),
        ("repairs", {"query": "A spill in room 4", "priority": "low"}),
    ]
    assert len({call.id for call in message.tool_calls}) == 2


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=_messages("A spill in room 4"),
        tools=TOOLS,
        parallel_tool_calls=False,
    )
    assert [name for name, _ in _calls(reply.choices[0].message)] == ["cleaning"]


def test_a_tool_description_rule_routes_the_message(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages("The boiler is broken"), tools=TOOLS
    )
    assert [name for name, _ in _calls(reply.choices[0].message)] == ["repairs"]


@pytest.mark.parametrize(
    ("tool_choice", "text", "expected"),
    [
        ("auto", "When does the gym open?", []),
        ("none", "Mop the lobby", []),
        ("required", "When does the gym open?", ["cleaning"]),  # the last tool
        ({"type": "function", "function": {"name": "repairs"}}, "Mop it", ["repairs"]),
    ],
)
def test_tool_choice_variants(
    client: openai.OpenAI, tool_choice: Any, text: str, expected: list[str]
) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=_messages(text),
        tools=TOOLS,
        tool_choice=tool_choice,
    )
    choice = reply.choices[0]
    assert [name for name, _ in _calls(choice.message)] == expected
    if not expected:
        assert choice.finish_reason == "stop"
        assert choice.message.content == "neutral"  # the label world, as today
        assert choice.message.tool_calls is None


# -- the agent loop --------------------------------------------------------------------


def test_two_turns_a_tool_result_then_the_final_answer(client: openai.OpenAI) -> None:
    messages = _messages("A spill in room 4")
    first = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=messages, tools=TOOLS
    )
    assistant = first.choices[0].message
    messages.append(assistant.model_dump(exclude_none=True))
    for call in assistant.tool_calls:
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": f"{call.function.name} team sent to room 4.",
            }
        )
    final = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=messages, tools=TOOLS
    )
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert choice.message.content == "repairs team sent to room 4."  # the last result


def test_async_client_calls_tools_concurrently(sim: Simulator) -> None:
    async def run() -> list[list[str]]:
        async with openai.AsyncOpenAI(
            base_url=sim.base_url, api_key="test", max_retries=0
        ) as client:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=SIMULATOR_MODEL, messages=_messages(text), tools=TOOLS
                    )
                    for text in ("Mop the lobby", "A spill", "The boiler is broken")
                )
            )
        return [[n for n, _ in _calls(r.choices[0].message)] for r in replies]

    assert asyncio.run(run()) == [["cleaning"], ["cleaning", "repairs"], ["repairs"]]


# -- streaming -------------------------------------------------------------------------


def test_streamed_tool_calls_accumulate_like_the_plain_answer(
    client: openai.OpenAI,
) -> None:
    plain = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages("A spill in room 4"), tools=TOOLS
    )
    with client.chat.completions.stream(
        model=SIMULATOR_MODEL,
        messages=_messages("A spill in room 4"),
        tools=TOOLS,
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert _calls(final.choices[0].message) == _calls(plain.choices[0].message)
    ids = [c.id for c in final.choices[0].message.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert final.usage is not None
    assert final.usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_tool_call_chunks_have_openais_delta_format(
    http: httpx.Client,
) -> None:
    body = {
        "model": SIMULATOR_MODEL,
        "messages": _messages("A spill in room 4"),
        "tools": TOOLS,
        "stream": True,
    }
    with http.stream("POST", "/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    assert finishes[-1] == "tool_calls" and deltas[-1] == {}
    assert all(f is None for f in finishes[:-1])
    parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    headers = [p for p in parts if "id" in p]
    assert [(h["index"], h["type"], h["function"]["name"]) for h in headers] == [
        (0, "function", "cleaning"),
        (1, "function", "repairs"),
    ]
    assert all(h["function"]["arguments"] == "" for h in headers)
    arguments = {0: "", 1: ""}
    for part in parts:
        assert set(part) <= {"index", "id", "type", "function"}
        arguments[part["index"]] += part["function"]["arguments"]
    assert json.loads(arguments[1]) == {"query": "A spill in room 4", "priority": "low"}
    assert sum(1 for p in parts if "id" not in p and p["index"] == 1) > 1  # pieces


# -- errors and faults -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "x"}},
            },
            "tool_choice.function.name",
        ),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": []}, "tools"),
        ({"tool_choice": "none"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_parameter(
    sim: Simulator, http: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    sim.inject(Fault.RATE_LIMIT)
    body = {"model": SIMULATOR_MODEL, "messages": _messages("Mop it"), **extra}
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400
    assert param in response.json()["error"]["param"]
    assert sim.stats.faults_served == 0  # a 400 consumes no fault


def test_malformed_json_fault_cuts_the_tool_arguments(
    sim: Simulator, client: openai.OpenAI
) -> None:
    sim.inject(Fault.MALFORMED_JSON)
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages("Mop the lobby"), tools=TOOLS
    )
    arguments = reply.choices[0].message.tool_calls[0].function.arguments
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)


# -- LangChain -------------------------------------------------------------------------


@pytest.fixture
def chat_model(sim: Simulator) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="test", max_retries=0
    )


def _lc_tools() -> list[Any]:
    tools = pytest.importorskip("langchain_core.tools")

    @tools.tool
    def repairs(query: str, priority: str = "low") -> str:
        """Fixes equipment. Use this tool when the message mentions "broken"."""
        return f"Repair ticket opened ({priority})."

    @tools.tool
    def cleaning(room: str) -> str:
        """Sends a cleaner."""
        return "Cleaner sent."

    return [repairs, cleaning]


def test_langchain_bind_tools_invoke_and_tool_loop(chat_model: Any) -> None:
    messages = pytest.importorskip("langchain_core.messages")
    tools = _lc_tools()
    by_name = {t.name: t for t in tools}
    model = chat_model.bind_tools(tools)
    history: list[Any] = [
        messages.SystemMessage(ROUTER),
        messages.HumanMessage("A spill by the broken boiler"),
    ]
    ai = model.invoke(history)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [
        ("cleaning", {"room": "A spill by the broken boiler"}),
        ("repairs", {"query": "A spill by the broken boiler", "priority": "low"}),
    ]
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    history.append(ai)
    history.extend(by_name[call["name"]].invoke(call) for call in ai.tool_calls)
    final = model.invoke(history)
    assert final.tool_calls == []
    assert final.content == "Repair ticket opened (low)."


def test_langchain_streams_tool_call_chunks(chat_model: Any) -> None:
    model = chat_model.bind_tools(_lc_tools())
    chunks = list(model.stream(_messages("A spill in room 4")))
    assert any(chunk.tool_call_chunks for chunk in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        ("cleaning", {"room": "A spill in room 4"}),
        ("repairs", {"query": "A spill in room 4", "priority": "low"}),
    ]


def test_langchain_async_invoke_and_tool_choice(chat_model: Any) -> None:
    forced = chat_model.bind_tools(_lc_tools(), tool_choice="repairs")
    auto = chat_model.bind_tools(_lc_tools())

    async def run() -> tuple[Any, Any]:
        try:
            return await asyncio.gather(
                forced.ainvoke(_messages("Mop the lobby")),
                auto.ainvoke(_messages("When does the gym open?")),
            )
        finally:  # the connections belong to this event loop: close them in it
            await chat_model.root_async_client.close()

    forced_reply, auto_reply = asyncio.run(run())
    assert [c["name"] for c in forced_reply.tool_calls] == ["repairs"]
    assert auto_reply.tool_calls == [] and auto_reply.content == "neutral"
