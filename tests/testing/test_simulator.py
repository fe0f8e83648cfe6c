"""The simulator speaks the OpenAI wire format to the real ``openai`` SDK: chat (plain
and streamed), completions, embeddings, models, counters, faults, structured outputs,
errors and byte-for-byte reproducible bodies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import threading
import time
from enum import StrEnum

import httpx
import openai
import pydantic
import pytest

from afnio.testing import SIMULATOR_MODEL, Fault, Simulator, SimulatorStats

RULE = 'If the message mentions "broken", the sentiment is very negative indeed.'


def _messages(user: str = "It arrived broken.") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RULE},
        {"role": "user", "content": user},
    ]


def _ask(client: openai.OpenAI, **kwargs: object) -> str | None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL, messages=_messages(), **kwargs
    )
    return reply.choices[0].message.content


# -- chat completions ------------------------------------------------------------------


def test_chat_completion_wire_format(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="my-model", messages=_messages("It arrived broken.")
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.created == 1_700_000_000
    assert reply.model == "my-model"  # any model name is accepted and echoed
    assert reply.system_fingerprint == "fp_afnio_sim"
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "very negative indeed"
    usage = reply.usage
    assert usage is not None
    # system: 11 words + 3, user: 3 words + 3; answer: 3 words
    assert usage.prompt_tokens == 20
    assert usage.completion_tokens == 3
    assert usage.total_tokens == 23
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.audio_tokens == 0
    details = usage.completion_tokens_details
    assert details is not None
    assert details.reasoning_tokens == 0
    assert details.audio_tokens == 0
    assert details.accepted_prediction_tokens == 0
    assert details.rejected_prediction_tokens == 0


def test_raw_chat_body_has_every_field(sim: Simulator, http: httpx.Client) -> None:
    body = http.post(
        "/chat/completions", json={"model": SIMULATOR_MODEL, "messages": _messages()}
    ).json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "service_tier",
        "system_fingerprint",
    }
    assert body["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "total_tokens": 23,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def test_streaming_matches_the_plain_answer(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=SIMULATOR_MODEL, messages=_messages())
    chunks = list(
        client.chat.completions.create(
            model=SIMULATOR_MODEL,
            messages=_messages(),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.created == 1_700_000_000 for c in chunks)
    assert all(c.model == SIMULATOR_MODEL for c in chunks)
    assert all(c.system_fingerprint == "fp_afnio_sim" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content == "very negative indeed"
    content_chunks = [c for c in with_choices if c.choices[0].delta.content]
    assert len(content_chunks) == 3  # one per word
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == plain.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=SIMULATOR_MODEL, messages=_messages(), stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_raw_sse_format(http: httpx.Client) -> None:
    body = {
        "model": SIMULATOR_MODEL,
        "messages": _messages(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert payloads[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["total_tokens"] == 23


def test_configured_by_openai_base_url_only(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    with openai.OpenAI(max_retries=0) as env_client:  # key: OPENAI_API_KEY
        assert _ask(env_client) == "very negative indeed"
    assert sim.stats.calls == 1


def test_content_parts_are_supported(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": RULE}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello."},
                    {"type": "text", "text": "Screen BROKEN."},
                ],
            },
        ],
    )
    assert reply.choices[0].message.content == "very negative indeed"


# -- completions, embeddings, models ---------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    one = client.completions.create(
        model=SIMULATOR_MODEL, prompt=f"{RULE} The box came broken."
    )
    assert one.id.startswith("cmpl-")
    assert one.object == "text_completion"
    assert one.created == 1_700_000_000
    assert [c.text for c in one.choices] == ["very negative indeed"]
    assert one.choices[0].finish_reason == "stop"
    assert one.usage is not None
    assert one.usage.prompt_tokens == 15  # words of the prompt
    assert one.usage.completion_tokens == 3  # words of the answer
    assert one.usage.total_tokens == 18

    many = client.completions.create(
        model=SIMULATOR_MODEL, prompt=[f"{RULE} broken", "nothing to see"]
    )
    assert [(c.index, c.text) for c in many.choices] == [
        (0, "very negative indeed"),
        (1, "neutral"),
    ]
    assert many.usage is not None
    assert many.usage.completion_tokens == 4


def test_embeddings_shape_determinism_and_geometry(client: openai.OpenAI) -> None:
    texts = ["the cat sat on the mat", "the cat sat on the mat", "a cat on a sofa"]
    result = client.embeddings.create(model="afnio-embed", input=texts)
    assert result.object == "list"
    assert result.model == "afnio-embed"
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert [len(v) for v in vectors] == [64, 64, 64]
    for v in vectors:
        assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5)
    assert vectors[0] == vectors[1]
    cosine = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert cosine > 0.2
    assert result.usage.prompt_tokens == 6 + 6 + 5
    assert result.usage.total_tokens == 17

    again = client.embeddings.create(
        model="afnio-embed", input="the cat sat on the mat", encoding_format="float"
    )
    # float JSON and the SDK's default base64 (float32) agree
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    small = client.embeddings.create(
        model="afnio-embed", input="hello world", dimensions=16, encoding_format="float"
    )
    assert len(small.data[0].embedding) == 16


def test_embeddings_of_unrelated_texts_are_not_identical(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model="m", input=["alpha", "beta"], encoding_format="float"
    )
    assert result.data[0].embedding != result.data[1].embedding


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [SIMULATOR_MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve("gpt-anything").id == "gpt-anything"


# -- counters --------------------------------------------------------------------------


def test_stats_and_requests(sim: Simulator, client: openai.OpenAI) -> None:
    assert sim.stats == SimulatorStats()
    client.chat.completions.create(model=SIMULATOR_MODEL, messages=_messages())
    client.embeddings.create(model="m", input="one two", encoding_format="float")
    client.models.list()
    stats = sim.stats
    assert stats.calls == 3
    assert stats.calls_by_endpoint == {
        "chat/completions": 1,
        "embeddings": 1,
        "models": 1,
    }
    assert stats.prompt_tokens == 20 + 2
    assert stats.completion_tokens == 3
    assert stats.in_flight == 0
    assert stats.peak_in_flight == 1
    assert stats.faults_served == 0
    assert [r["model"] for r in sim.requests] == [SIMULATOR_MODEL, "m"]
    assert sim.requests[0]["messages"] == _messages()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.calls = 0  # type: ignore[misc]

    sim.reset_stats()
    assert sim.stats == SimulatorStats()
    assert sim.requests == []


def test_concurrent_requests_overlap(sim: Simulator) -> None:
    sim.latency = 0.2

    async def run() -> list[str | None]:
        async with openai.AsyncOpenAI(
            base_url=sim.base_url, api_key="test", max_retries=0
        ) as aclient:
            replies = await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=SIMULATOR_MODEL, messages=_messages(f"message {i}")
                    )
                    for i in range(16)
                )
            )
        return [r.choices[0].message.content for r in replies]

    start = time.perf_counter()
    contents = asyncio.run(run())
    elapsed = time.perf_counter() - start
    assert contents == ["neutral"] * 16
    stats = sim.stats
    assert stats.peak_in_flight == 16
    assert stats.in_flight == 0
    assert stats.calls == 16
    assert elapsed < 1.6  # serial would take 16 * 0.2 = 3.2 s


def test_latency_is_slept_per_request(sim: Simulator, client: openai.OpenAI) -> None:
    sim.latency = 0.15
    start = time.perf_counter()
    client.models.list()
    assert time.perf_counter() - start >= 0.15
    with pytest.raises(ValueError, match="non-negative"):
        sim.latency = -1


# -- per-request delays ----------------------------------------------------------------


def _finishing_order(sim: Simulator, texts: list[str]) -> list[str]:
    """Send one chat request per text at once; the texts in the order answered."""
    order: list[str] = []

    async def run() -> None:
        async with openai.AsyncOpenAI(
            base_url=sim.base_url, api_key="test", max_retries=0
        ) as aclient:

            async def one(text: str) -> None:
                await aclient.chat.completions.create(
                    model=SIMULATOR_MODEL, messages=_messages(text)
                )
                order.append(text)

            await asyncio.gather(*(one(t) for t in texts))

    asyncio.run(run())
    return order


def test_delay_when_makes_the_matching_request_finish_last(sim: Simulator) -> None:
    sim.delay_when("tortoise", 0.3)
    start = time.perf_counter()
    order = _finishing_order(sim, ["the tortoise", "hare 1", "hare 2", "hare 3"])
    elapsed = time.perf_counter() - start
    assert order[-1] == "the tortoise"
    assert 0.3 <= elapsed < 1.5  # the others did not wait
    assert sim.stats.calls == 4


def test_delay_function_sees_the_parsed_body_and_delays_add_up(
    sim: Simulator, client: openai.OpenAI, http: httpx.Client
) -> None:
    seen: list[str] = []

    def delay(body: object) -> float:
        assert isinstance(body, dict)
        seen.append(body["model"])
        return 0.1 if body["model"] == "slow-model" else 0

    sim.delay = delay
    sim.delay_when(lambda body: body.get("temperature") == 0, 0.15)
    sim.delay_when("broken", 0.05, endpoint="/v1/chat/completions")
    sim.delay_when("broken", 7, endpoint="embeddings")  # another endpoint
    body = {"model": "slow-model", "messages": _messages(), "temperature": 0}
    assert sim.delay_for(body) == pytest.approx(0.3)
    assert sim.delay_for({"model": "m", "input": "broken"}, "embeddings") == 7
    start = time.perf_counter()
    client.chat.completions.create(**body)  # type: ignore[call-overload]
    assert time.perf_counter() - start >= 0.3
    start = time.perf_counter()
    _ask(client)  # only the "broken" chat rule applies
    assert 0.05 <= time.perf_counter() - start < 0.3
    assert seen[-2:] == ["slow-model", SIMULATOR_MODEL]
    # malformed requests answer at once, without asking the delay function
    assert http.post("/chat/completions", json={"model": "x"}).status_code == 400
    assert len(seen) == 4  # two delay_for calls, two requests
    sim.clear_delays()
    assert sim.delay is None and sim.delay_for(body) == 0.0


def test_delays_are_thread_safe_and_woken_by_stop() -> None:
    calls: list[int] = []

    def delay(body: object) -> float:
        calls.append(1)  # from several server threads at once
        return 0.05

    with Simulator(delay=delay) as sim:
        order = _finishing_order(sim, [f"message {i}" for i in range(12)])
        assert sorted(order) == sorted(f"message {i}" for i in range(12))
        assert len(calls) == 12 and sim.stats.peak_in_flight > 1
        sim.delay_when("stuck", 30)
        client = openai.OpenAI(base_url=sim.base_url, api_key="t", max_retries=0)
        with client:
            start = time.perf_counter()
            stopper = threading.Timer(0.2, sim.stop)
            stopper.start()
            # woken at once: answered or dropped, never after 30 s
            with contextlib.suppress(openai.APIConnectionError):
                client.chat.completions.create(
                    model=SIMULATOR_MODEL, messages=_messages("stuck")
                )
            stopper.join()
        assert time.perf_counter() - start < 5


def test_bad_delays_are_refused_or_answer_500(
    sim: Simulator, client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="finite seconds"):
        sim.delay_when("x", -1)
    with pytest.raises(ValueError, match="finite seconds"):
        sim.delay_when("x", math.inf)
    with pytest.raises(TypeError, match="seconds"):
        sim.delay_when("x", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="string or a predicate"):
        sim.delay_when(3, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.delay_when("x", 1, endpoint="nowhere")
    with pytest.raises(TypeError, match="callable"):
        sim.delay = 0.5  # type: ignore[assignment]
    sim.delay = lambda body: -1
    with pytest.raises(openai.InternalServerError, match="finite seconds"):
        _ask(client)
    assert "Traceback" in capsys.readouterr().err
    sim.delay = None
    assert _ask(client) == "very negative indeed"


# -- faults ----------------------------------------------------------------------------


def test_rate_limit(sim: Simulator, client: openai.OpenAI) -> None:
    sim.inject(Fault.RATE_LIMIT)
    with pytest.raises(openai.RateLimitError) as info:
        _ask(client)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "0"
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.body["type"] == "requests"  # type: ignore[index]
    assert _ask(client) == "very negative indeed"  # consumed: next call succeeds
    assert sim.stats.calls == 2
    assert sim.stats.faults_served == 1


def test_sdk_retries_after_rate_limit(sim: Simulator) -> None:
    sim.inject("rate_limit")
    with openai.OpenAI(base_url=sim.base_url, api_key="test", max_retries=1) as c:
        assert _ask(c) == "very negative indeed"
    assert sim.stats.calls == 2
    assert sim.stats.faults_served == 1
    assert sim.stats.completion_tokens == 3  # only the answered call is counted


def test_server_error(sim: Simulator, client: openai.OpenAI) -> None:
    sim.inject(Fault.SERVER_ERROR, times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            _ask(client)
        assert info.value.status_code == 500
        assert info.value.body["type"] == "server_error"  # type: ignore[index]
    assert _ask(client) == "very negative indeed"
    assert sim.fault_schedule == []


def test_delay_triggers_client_timeout() -> None:
    # its own server: stopping it wakes the request still sleeping after the timeout
    with (
        Simulator() as sim,
        openai.OpenAI(base_url=sim.base_url, api_key="t", max_retries=0) as client,
    ):
        sim.inject(Fault.DELAY, seconds=2.0)
        start = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            _ask(client, timeout=0.3)
        assert time.perf_counter() - start < 1.5
        assert _ask(client, timeout=5) == "very negative indeed"
        assert sim.stats.in_flight == 1  # the delayed request still sleeps
    assert sim.stats.in_flight == 0  # stop() woke and dropped it


def test_delay_then_answers_normally(sim: Simulator, client: openai.OpenAI) -> None:
    sim.inject(Fault.DELAY, seconds=0.2)
    start = time.perf_counter()
    assert _ask(client) == "very negative indeed"
    assert time.perf_counter() - start >= 0.2


def test_malformed_json(sim: Simulator, client: openai.OpenAI) -> None:
    fmt = {"type": "json_object"}
    good = _ask(client, response_format=fmt)
    assert good is not None
    assert json.loads(good) == {"sentiment": "very negative indeed"}
    sim.inject(Fault.MALFORMED_JSON)
    bad = _ask(client, response_format=fmt)
    assert bad is not None
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad)
    assert good.startswith(bad)  # the right JSON, cut in the middle
    sim.inject(Fault.MALFORMED_JSON)
    broken = _ask(client)  # no response_format: still a cut JSON object
    assert broken is not None
    assert '{"answer": "very negative indeed"}'.startswith(broken)
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)


def test_fault_endpoint_filter(sim: Simulator, client: openai.OpenAI) -> None:
    sim.inject(Fault.RATE_LIMIT, endpoint="embeddings")
    assert _ask(client) == "very negative indeed"  # chat does not consume it
    assert sim.fault_schedule == [(Fault.RATE_LIMIT, 1, "embeddings", None)]
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="m", input="x")
    assert client.embeddings.create(model="m", input="x").data
    # MALFORMED_JSON is never consumed by embeddings
    sim.inject(Fault.MALFORMED_JSON)
    assert client.embeddings.create(model="m", input="x").data
    assert sim.fault_schedule == [(Fault.MALFORMED_JSON, 1, None, None)]
    with pytest.raises(ValueError, match="completion endpoints"):
        sim.inject(Fault.MALFORMED_JSON, endpoint="embeddings")
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.inject(Fault.RATE_LIMIT, endpoint="images")
    with pytest.raises(ValueError, match="DELAY only"):
        sim.inject(Fault.RATE_LIMIT, seconds=1)
    with pytest.raises(ValueError):
        sim.inject("no_such_fault")


def test_faults_are_consumed_in_order(sim: Simulator, client: openai.OpenAI) -> None:
    sim.inject(Fault.SERVER_ERROR)
    sim.inject(Fault.RATE_LIMIT, endpoint="/v1/chat/completions")
    with pytest.raises(openai.InternalServerError):
        _ask(client)
    with pytest.raises(openai.RateLimitError):
        _ask(client)
    assert _ask(client) == "very negative indeed"


def test_fault_schedule_at_construction() -> None:
    schedule = [
        ("rate_limit", 1),
        (Fault.SERVER_ERROR, 1, "chat.completions"),
        {"kind": "delay", "endpoint": "models", "seconds": 0.01},
    ]
    with (
        Simulator(faults=schedule) as sim,
        openai.OpenAI(base_url=sim.base_url, api_key="t", max_retries=0) as c,
    ):
        assert sim.fault_schedule == [
            (Fault.RATE_LIMIT, 1, None, None),
            (Fault.SERVER_ERROR, 1, "chat/completions", None),
            (Fault.DELAY, 1, "models", 0.01),
        ]
        with pytest.raises(openai.RateLimitError):
            c.models.list()
        assert c.models.list().data  # the DELAY, then a normal answer
        with pytest.raises(openai.InternalServerError):
            _ask(c)
        assert sim.fault_schedule == []
        assert sim.stats.faults_served == 3


def test_errors_consume_no_fault(sim: Simulator, http: httpx.Client) -> None:
    sim.inject(Fault.RATE_LIMIT)
    assert http.post("/chat/completions", content=b"{").status_code == 400
    assert http.get("/nope").status_code == 404
    assert sim.fault_schedule == [(Fault.RATE_LIMIT, 1, None, None)]


# -- structured outputs ----------------------------------------------------------------


def test_json_object(client: openai.OpenAI) -> None:
    content = _ask(client, response_format={"type": "json_object"})
    assert content is not None
    assert json.loads(content) == {"sentiment": "very negative indeed"}
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=[{"role": "user", "content": "hello"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"answer": "neutral"}


class Sentiment(StrEnum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"


class Review(pydantic.BaseModel):
    sentiment: Sentiment
    reason: str
    confidence: float
    stars: int
    flagged: bool
    tags: list[str]
    note: str | None


def _schema_format(schema: dict[str, object]) -> dict[str, object]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": schema, "strict": True},
    }


def test_json_schema_from_pydantic(client: openai.OpenAI) -> None:
    schema = Review.model_json_schema()
    assert "$defs" in schema  # the enum is a $ref
    rule = 'If the message mentions "broken", the sentiment is negative.'
    messages = [
        {"role": "system", "content": rule},
        {"role": "user", "content": "It came broken"},
    ]
    reply = client.chat.completions.create(
        model=SIMULATOR_MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format=_schema_format(schema),  # type: ignore[arg-type]
    )
    content = reply.choices[0].message.content or ""
    assert json.loads(content) == {
        "sentiment": "negative",
        "reason": "negative",
        "confidence": 0,
        "stars": 0,
        "flagged": False,
        "tags": [],
        "note": "negative",
    }
    assert list(json.loads(content)) == list(schema["properties"])  # schema order
    review = Review.model_validate_json(content)
    assert review.sentiment is Sentiment.negative


def test_sdk_parse_helper_with_pydantic(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=SIMULATOR_MODEL,
        messages=[{"role": "user", "content": "nothing special"}],
        response_format=Review,
    )
    parsed = completion.choices[0].message.parsed
    assert parsed is not None
    assert parsed.sentiment is Sentiment.neutral  # default label


def test_json_schema_label_outside_enum(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["good", "bad"]}},
        "required": ["sentiment"],
        "additionalProperties": False,
    }
    content = _ask(client, response_format=_schema_format(schema))
    assert json.loads(content or "") == {"sentiment": "good"}  # first enum value


# -- errors ----------------------------------------------------------------------------


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests(http: httpx.Client) -> None:
    response = http.post("/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"

    response = http.post("/chat/completions", json={"messages": _messages()})
    assert response.status_code == 400
    assert _error(response)["param"] == "model"

    response = http.post("/chat/completions", json={"model": "m"})
    assert response.status_code == 400
    assert _error(response)["param"] == "messages"

    response = http.post("/completions", json={"model": "m"})
    assert response.status_code == 400
    assert _error(response)["param"] == "prompt"

    response = http.post("/embeddings", json={"model": "m"})
    assert response.status_code == 400
    assert _error(response)["param"] == "input"

    response = http.post("/chat/completions", json=[1, 2])
    assert response.status_code == 400

    response = http.get("/v1/unknown")
    assert response.status_code == 404
    assert _error(response)["code"] == "unknown_url"

    response = http.get("/chat/completions")  # wrong method
    assert response.status_code == 404


def test_n_greater_than_one_is_rejected(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, n=2)
    assert info.value.status_code == 400
    assert info.value.param == "n"


def test_unknown_path_via_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.post("/images/generations", cast_to=object, body={})


def test_authorization_is_accepted_and_never_echoed(
    sim: Simulator, http: httpx.Client
) -> None:
    secret = "sk-very-secret-value-123"
    response = http.post(
        "/chat/completions",
        json={"model": "m", "messages": _messages()},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 200
    assert secret not in response.text
    assert all(secret not in value for value in response.headers.values())
    assert all(secret not in json.dumps(r) for r in sim.requests)


# -- determinism and lifecycle ---------------------------------------------------------


def test_identical_requests_give_identical_bodies(http: httpx.Client) -> None:
    body = {"model": "m", "messages": _messages()}
    first = http.post("/chat/completions", json=body)
    second = http.post("/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    other = http.post("/chat/completions", json={**body, "model": "n"})
    assert json.loads(other.content)["id"] != json.loads(first.content)["id"]
    # another simulator (another port, fresh counters) gives the same bytes
    with Simulator() as sim2, httpx.Client(base_url=sim2.base_url) as http2:
        assert http2.post("/chat/completions", json=body).content == first.content
        stream_body = {**body, "stream": True}
        assert (
            http2.post("/chat/completions", json=stream_body).content
            == http.post("/chat/completions", json=stream_body).content
        )
        emb = {"model": "m", "input": ["a b", "c"]}
        assert (
            http2.post("/embeddings", json=emb).content
            == http.post("/embeddings", json=emb).content
        )


def test_lifecycle() -> None:
    sim = Simulator()
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    sim.stop()  # stopping a stopped simulator is harmless
    sim.start()
    port = sim.port
    sim.start()  # so is starting twice
    assert sim.port == port
    assert sim.running
    assert sim.base_url == f"http://127.0.0.1:{port}/v1"
    with httpx.Client() as http:
        assert http.get(f"{sim.base_url}/models").status_code == 200
        sim.stop()
        sim.stop()
        assert not sim.running
        with pytest.raises(httpx.TransportError):
            http.get(f"{sim.base_url}/models")
    sim.start()  # a stopped simulator starts again
    try:
        with httpx.Client() as http:
            assert http.get(f"{sim.base_url}/models").status_code == 200
        assert sim.stats.calls == 2
    finally:
        sim.stop()


def test_only_loopback() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "::1", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            Simulator(host=host)
    assert Simulator(host="localhost").host == "127.0.0.1"
