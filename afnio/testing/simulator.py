"""An OpenAI-compatible HTTP simulator: a **deterministic stand-in, not a model**.

:class:`Simulator` serves the OpenAI wire format on ``127.0.0.1`` (only) from a
standard-library ``ThreadingHTTPServer`` in daemon threads, so any program written for
OpenAI and configured only by ``OPENAI_BASE_URL`` runs against it unchanged. Answers
come from the rule world (:mod:`afnio.testing.world`): rules written in the prompt,
``If the message mentions "<word>", the <field> is <label>.``, decide the label, and
``response_format`` is honoured the way a real model honours it. afnio's own prompts
are recognised first, by their markers (see :data:`afnio.testing.world.RESPONDERS`):
an LM judge call (``json_schema`` named ``afnio_judgement``) gets ``{"score",
"explanation"}`` from comparing its ``<PREDICTION>`` and ``<TARGET>``; a ChatCompletion
backward call (``<LM_CONVERSATION>``, ``<FEEDBACK_ON_OUTPUT>``, ``<VARIABLES>``) and an
evaluator backward call (``<EVALUATION>``, ``<VARIABLES>``, one ``<SAMPLE>`` per failed
sample) get ``{"gradients": [one string per <VARIABLE> (per <SAMPLE>)]}``, the first
trainable system prompt
being given a new rule. afnio's tests use it to record reproducible HTTP cassettes
and to measure concurrency.

Tool calling: a chat request with function ``tools`` (and ``tool_choice``,
``parallel_tool_calls``) is answered with ``tool_calls`` (``content: null``,
``finish_reason: "tool_calls"``; streamed as OpenAI's ``tool_calls`` deltas, one
``index`` per parallel call) when rules route its message to tools
(``If the message begins with "<word>", call <tool>.`` in the prompt, ``Use this tool
when the message mentions "<word>".`` in a tool's description), and with a final text
answer after the tool results; see "Tool calling" in :mod:`afnio.testing.world`.
Malformed ``tools``/``tool_choice`` get a 400 naming the parameter, as do an empty
``tools`` list, ``tool_choice`` or ``parallel_tool_calls`` without ``tools``, and the
deprecated ``functions``/``function_call`` (use ``tools``).

Endpoints: ``POST /v1/chat/completions`` (also ``stream: true`` as server-sent
events), ``POST /v1/completions``, ``POST /v1/embeddings``, ``GET /v1/models`` and
``GET /v1/models/{id}``. Response bodies are reproducible: ids are hashes of the
request body, ``created`` is the constant :data:`CREATED`, token counts are word
counts (``prompt_tokens``: the words of every message plus 3 per message;
``completion_tokens``: the words of the answer).

The Batch API: ``POST /v1/files`` (multipart ``file`` and ``purpose``, parsed with
:mod:`email`), ``GET /v1/files/{id}`` and ``GET /v1/files/{id}/content`` (the stored
bytes), ``POST /v1/batches`` (``input_file_id``, ``endpoint`` one of
:data:`BATCH_ENDPOINTS`, ``completion_window: "24h"``), ``GET /v1/batches``,
``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``. Rules:

* a new batch is ``validating``; each ``GET /v1/batches/{id}`` is one *poll*, and the
  poll number :attr:`Simulator.batch_polls` (default 1) finishes it; the polls before
  answer ``in_progress`` with ``request_counts.completed`` rising in equal steps;
* finishing runs every input line through the normal rules of its endpoint (the same
  answer as the synchronous call, token counts included, added to the counters), and
  completes the batch with ``output_file_id`` (lines answered 200) and
  ``error_file_id`` (the others: ``{"custom_id", "response": {"status_code",
  "request_id", "body": {"error": ...}}, "error": null}``), each line keeping its
  ``custom_id``; a malformed input file (bad JSON, a missing or repeated
  ``custom_id``, another ``url``) fails the batch with ``errors.data``;
* failures on request: :meth:`Simulator.fail_batch_lines` fails the next matching
  lines (HTTP 500 in the error file), :meth:`Simulator.fail_next_batch` makes the
  next batches end ``failed`` or ``expired`` with no output;
* ``cancel`` makes a running batch ``cancelling`` and the next poll ``cancelled``;
* ids are hashes (a file's of its content; a batch's of its input file and creation
  number) and timestamps are offsets of :data:`CREATED`, so recordings are
  reproducible. :attr:`Simulator.batches_created` counts the batches created, and
  :attr:`Simulator.latency` applies to these requests too (injected faults do not).

Rate limits: ``Simulator(requests_per_minute=..., tokens_per_minute=...,
rate_limit_window=60.0)`` (or :meth:`Simulator.set_rate_limits`; ``serve --rpm
--tpm --rate-window``) enforces RPM/TPM limits per model as OpenAI does. Each model
has a request bucket and a token bucket, each holding at most its limit, starting
full and refilling continuously over ``rate_limit_window`` seconds; a chat,
completions or embeddings request needs 1 request and its token count (the words of
its prompt, plus 3 per chat message, plus ``max_completion_tokens``/``max_tokens``
when set), checked on arrival. When both buckets hold enough it is charged and
answered; otherwise it gets an immediate 429 that charges nothing, with OpenAI's body
(``{"error": {"message", "type": "requests"|"tokens", "param": null, "code":
"rate_limit_exceeded"}}``) and ``retry-after``/``retry-after-ms`` (the time until the
bucket holds enough). Every answer to a limited request carries
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (resets as durations:
``1s``, ``6m0s``, ``12ms``). A request larger than the TPM gets a 429 with
``x-should-retry: false``. :attr:`SimulatorStats.rate_limited` counts these 429s
and :attr:`SimulatorStats.served` the 200 answers. Details:
:mod:`afnio.testing.rate_limits`.

Counters (:attr:`Simulator.stats`), the received bodies (:attr:`Simulator.requests`),
a settable per-request ``latency``, per-request delays and fault injection
(:meth:`Simulator.inject`, :class:`Fault`) let tests observe and disturb a run.

Example::

    >>> import openai
    >>> from afnio.testing import Simulator
    >>> with Simulator() as sim:
    ...     client = openai.OpenAI(base_url=sim.base_url, api_key="test")
    ...     reply = client.chat.completions.create(
    ...         model="afnio-sim-1",
    ...         messages=[
    ...             {"role": "system", "content":
    ...              'If the message mentions "broken", the sentiment is negative.'},
    ...             {"role": "user", "content": "It arrived broken."},
    ...         ],
    ...     )
    ...     client.close()
    >>> reply.choices[0].message.content
    'negative'
    >>> sim.stats.calls
    1

Per-request latency: :meth:`Simulator.delay_when` delays the requests whose text (see
:func:`request_text`) holds a string, or whose parsed JSON body satisfies a predicate,
and ``Simulator(delay=...)`` (or the settable :attr:`Simulator.delay`) takes a
function of the parsed body that returns extra seconds. So a test can make chosen
requests (one sample of a batch, one branch of a program) finish after the others::

    >>> import time
    >>> with Simulator() as sim:
    ...     sim.delay_when("tortoise", 0.2)
    ...     client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    ...     start = time.perf_counter()
    ...     reply = client.chat.completions.create(
    ...         model="afnio-sim-1",
    ...         messages=[{"role": "user", "content": "The tortoise came last."}],
    ...     )
    ...     seconds = time.perf_counter() - start
    ...     client.close()
    >>> seconds >= 0.2
    True
    >>> hare = {"messages": [{"role": "user", "content": "The hare."}]}
    >>> sim.delay_for(hare), sim.delay_for({"prompt": "A tortoise"})
    (0.0, 0.2)
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import math
import re
import socket
import socketserver
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from afnio.testing import world
from afnio.testing.rate_limits import Admission, ServerRateLimits, request_tokens

__all__ = [
    "CREATED",
    "DEFAULT_DELAY_SECONDS",
    "ENDPOINTS",
    "SIMULATOR_MODEL",
    "SYSTEM_FINGERPRINT",
    "DelayFunction",
    "Fault",
    "RequestPredicate",
    "Simulator",
    "SimulatorStats",
    "request_text",
    "BATCH_ENDPOINTS",
    "BATCH_OUTCOMES",
]

SIMULATOR_MODEL = "afnio-sim-1"
"""The documented default model name (any model name is accepted)."""

CREATED = 1_700_000_000
"""The constant ``created`` timestamp of every response (bodies are reproducible)."""

SYSTEM_FINGERPRINT = "fp_afnio_sim"
"""The ``system_fingerprint`` of every generation response."""

DEFAULT_DELAY_SECONDS = 5.0
"""How long a :attr:`Fault.DELAY` waits when ``seconds`` is not given."""

DEFAULT_EMBEDDING_DIMENSIONS = 64
MAX_EMBEDDING_DIMENSIONS = 8192

ENDPOINTS: tuple[str, ...] = ("chat/completions", "completions", "embeddings", "models")
"""The endpoint names used by counters and by ``inject(endpoint=...)``."""

_GENERATION_ENDPOINTS = frozenset({"chat/completions", "completions"})
_LIMITED_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})


class Fault(StrEnum):
    """The kinds of injectable faults (plain strings such as ``"rate_limit"`` work too).

    * ``RATE_LIMIT``: HTTP 429 with an OpenAI error body and ``retry-after: 0``;
    * ``SERVER_ERROR``: HTTP 500 with an OpenAI error body;
    * ``DELAY``: wait ``seconds`` (default 5) and then answer normally, to trigger
      client timeouts;
    * ``MALFORMED_JSON``: HTTP 200 with a normal completion whose content is invalid
      JSON (the right JSON answer cut in the middle): a bad LM answer. Only the
      completion endpoints consume it.

    >>> Fault("rate_limit") is Fault.RATE_LIMIT
    True
    """

    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    DELAY = "delay"
    MALFORMED_JSON = "malformed_json"


@dataclass(frozen=True)
class SimulatorStats:
    """A snapshot of a simulator's counters since it was created or last reset.

    Attributes:
        calls: requests answered, including errors and faults.
        calls_by_endpoint: ``calls`` per endpoint name (see :data:`ENDPOINTS`;
            unknown URLs count under ``"unknown"``).
        prompt_tokens: the ``usage.prompt_tokens`` of every successful answer.
        completion_tokens: the ``usage.completion_tokens`` of every successful answer.
        in_flight: requests received and not answered yet.
        peak_in_flight: the most requests in flight at once.
        faults_served: injected faults consumed.
        rate_limited: 429s sent by the RPM/TPM limits (``requests_per_minute``,
            ``tokens_per_minute``; injected ``RATE_LIMIT`` faults count in
            ``faults_served`` only).
        served: requests answered with status 200.
    """

    calls: int = 0
    calls_by_endpoint: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    faults_served: int = 0
    rate_limited: int = 0
    served: int = 0


@dataclass
class _PendingFault:
    kind: Fault
    remaining: int
    endpoint: str | None
    seconds: float | None


class _RequestError(Exception):
    """An OpenAI-style error answer (status and error body)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "error": {"message": message, "type": type, "param": param, "code": code}
        }


@dataclass
class _Reply:
    """A complete HTTP answer, computed before anything is written."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    events: tuple[bytes, ...] | None = None  # server-sent events (chunked)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _endpoint_key(name: str) -> str:
    """Normalise ``"/v1/chat/completions"``, ``"chat.completions"``... to a key of
    :data:`ENDPOINTS`."""
    key = name.strip().strip("/").replace(".", "/")
    key = key.removeprefix("v1/")
    if key not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {name!r}; expected one of {ENDPOINTS}")
    return key


def _route(method: str, path: str) -> str | None:
    path = "/" + path.strip("/")
    if method == "POST" and path in {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }:
        return path.removeprefix("/v1/")
    if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
        return "models"
    for name in _BATCH_API_ENDPOINTS:  # files and batches (the Batch API)
        if path == f"/v1/{name}" or path.startswith(f"/v1/{name}/"):
            return name
    return None


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _words(text: str) -> int:
    return len(text.split())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError(
            400, "you must provide a model parameter", param="model", code=None
        )
    return model


def _check_n(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _RequestError(
            400,
            "The simulator only supports n=1.",
            param="n",
            code="invalid_value",
        )


def _check_response_format(fmt: Any) -> Mapping[str, Any] | None:
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping) or fmt.get("type") not in {
        "text",
        "json_object",
        "json_schema",
    }:
        raise _RequestError(
            400,
            "Invalid 'response_format': expected an object whose 'type' is 'text', "
            "'json_object' or 'json_schema'.",
            param="response_format",
            code="invalid_value",
        )
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise _RequestError(
                400,
                "Missing required parameter: 'response_format.json_schema.name'.",
                param="response_format.json_schema.name",
                code="missing_required_parameter",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise _RequestError(
                400,
                "Invalid 'response_format.json_schema.schema': expected an object.",
                param="response_format.json_schema.schema",
                code="invalid_type",
            )
    return fmt


def _is_json_object(text: str) -> bool:
    if not text.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _malform(content: str, request: world.SimRequest, label: str) -> str:
    """The right JSON answer cut in the middle (never valid JSON). A plain-text
    answer is first wrapped as ``{"answer": label}``, unless it is a JSON object
    already (the judge and backward answers)."""
    fmt = request.response_format
    text = content
    if (
        not fmt or fmt.get("type") not in {"json_object", "json_schema"}
    ) and not _is_json_object(content):
        text = json.dumps({"answer": label}, ensure_ascii=False)
    cut = text[: max(1, len(text) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return '{"answer": ' + cut


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _pieces(content: str) -> list[str]:
    """Split content into streamed pieces (words with their trailing whitespace)."""
    return re.findall(r"\S+\s*|\s+", content)


def _chat(
    raw: bytes,
    body: Mapping[str, Any],
    malformed: bool,
    feedback_words: int | None = None,
) -> _Reply:
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError(
            400,
            "Missing required parameter: 'messages'."
            if messages is None
            else "Invalid 'messages': expected a non-empty array of messages.",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_type",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise _RequestError(
                400,
                f"Invalid 'messages[{i}]': expected an object with a 'role'.",
                param=f"messages[{i}]",
                code="invalid_type",
            )
    _check_n(body)
    fmt = _check_response_format(body.get("response_format"))
    request = world.SimRequest(
        messages=tuple(
            world.Message(m["role"], world.message_text(m.get("content")))
            for m in messages
        ),
        model=model,
        response_format=fmt,
        endpoint="chat/completions",
        body=body,
    )
    tools = _check_tools(body)
    digest = _digest(raw)
    calls = world.choose_tool_calls(request, seed=digest) if tools else ()
    if calls:
        return _tool_calls_reply(raw, body, request, calls, malformed)
    result = (
        world.final_answer(request, feedback_words=feedback_words)
        if tools
        else world.answer(request, feedback_words=feedback_words)
    )
    content = world.render_content(result, fmt)
    if malformed:
        content = _malform(content, request, result.label)
    prompt_tokens = sum(_words(m.text) + 3 for m in request.messages)
    deltas = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": piece} for piece in _pieces(content)]
    return _chat_reply(
        raw,
        body,
        {"role": "assistant", "content": content, "refusal": None, "annotations": []},
        deltas,
        "stop",
        prompt_tokens,
        _words(content),
    )


def _chat_reply(
    raw: bytes,
    body: Mapping[str, Any],
    message: dict[str, Any],
    deltas: list[dict[str, Any]],
    finish: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> _Reply:
    """A chat completion answering ``message``: the plain JSON answer, or (with
    ``stream: true``) ``deltas`` as OpenAI's chunks, then a chunk with ``finish``, the
    usage chunk when ``stream_options.include_usage`` asks for it, and ``[DONE]``."""
    model = str(body.get("model"))
    usage = _usage(prompt_tokens, completion_tokens)
    digest = _digest(raw)
    completion_id = f"chatcmpl-{digest[:29]}"
    headers = (("x-request-id", f"req_{digest[:32]}"),)
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and bool(
            options.get("include_usage")
        )
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None}
            out: dict[str, Any] = {
                **base,
                "choices": [{**choice, "finish_reason": finish_reason}],
            }
            if include_usage:
                out["usage"] = None
            return _sse(out)

        events = [chunk(delta, None) for delta in deltas]
        events.append(chunk({}, finish))
        if include_usage:
            events.append(_sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return _Reply(
            200,
            b"",
            content_type="text/event-stream; charset=utf-8",
            headers=headers,
            events=tuple(events),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    payload = {
        "id": completion_id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    return _Reply(
        200,
        _dumps(payload),
        headers=headers,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _check_tools(body: Mapping[str, Any]) -> tuple[world.ToolSpec, ...]:
    """The request's function tools, ``tools`` and ``tool_choice`` checked as the
    API checks them (a 400 naming the parameter otherwise)."""
    try:
        tools = world.parse_tools(body)
        world.parse_tool_choice(body, tools)
    except world.ToolRequestError as error:
        raise _RequestError(
            400, str(error), param=error.param, code="invalid_value"
        ) from None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _RequestError(
            400,
            "Invalid 'parallel_tool_calls': expected a boolean.",
            param="parallel_tool_calls",
            code="invalid_type",
        )
    if parallel is not None and not tools:
        raise _RequestError(
            400,
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only "
            "allowed when 'tools' are specified.",
            param="parallel_tool_calls",
            code="invalid_value",
        )
    return tools


def _cut_arguments(arguments: str) -> str:
    """Tool-call arguments cut in the middle (never valid JSON): the
    ``MALFORMED_JSON`` fault of an answer that calls tools."""
    cut = arguments[: max(1, len(arguments) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return "{" + cut


def _tool_calls_reply(
    raw: bytes,
    body: Mapping[str, Any],
    request: world.SimRequest,
    calls: tuple[world.ToolCall, ...],
    malformed: bool,
) -> _Reply:
    """An assistant answer that calls ``calls`` (``finish_reason: "tool_calls"``,
    ``content: null``), plain or streamed in OpenAI's chunk format: per call, a delta
    with its ``index``, ``id``, ``type`` and ``function.name`` (and empty
    ``arguments``), then deltas carrying pieces of its ``arguments``."""
    if malformed:
        calls = tuple(
            dataclasses.replace(c, arguments=_cut_arguments(c.arguments)) for c in calls
        )
    prompt_tokens = sum(_words(m.text) + 3 for m in request.messages)
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "refusal": None}
    ]
    for index, call in enumerate(calls):
        header = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        deltas.append({"tool_calls": [header]})
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in _pieces(call.arguments)
        ]
    message = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in calls
        ],
    }
    return _chat_reply(
        raw,
        body,
        message,
        deltas,
        "tool_calls",
        prompt_tokens,
        sum(_words(c.name) + _words(c.arguments) for c in calls),
    )


def _completions(
    raw: bytes,
    body: Mapping[str, Any],
    malformed: bool,
    feedback_words: int | None = None,
) -> _Reply:
    model = _require_model(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise _RequestError(
            400,
            "Missing required parameter: 'prompt'."
            if prompt is None
            else "Invalid 'prompt': expected a string or a non-empty array of strings.",
            param="prompt",
            code="missing_required_parameter" if prompt is None else "invalid_type",
        )
    _check_n(body)
    texts = []
    for text in prompts:
        request = world.SimRequest(
            messages=(world.Message("user", text),),
            model=model,
            endpoint="completions",
            body=body,
        )
        result = world.answer(request, feedback_words=feedback_words)
        content = world.render_content(result, None)
        if malformed:
            content = _malform(content, request, result.label)
        texts.append(content)
    prompt_tokens = sum(_words(p) for p in prompts)
    completion_tokens = sum(_words(t) for t in texts)
    usage = _usage(prompt_tokens, completion_tokens)
    digest = _digest(raw)
    completion_id = f"cmpl-{digest[:29]}"
    headers = (("x-request-id", f"req_{digest[:32]}"),)
    base = {
        "id": completion_id,
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and bool(
            options.get("include_usage")
        )
        events = []
        for index, text in enumerate(texts):
            for piece in [*_pieces(text), None]:
                choice = {
                    "text": piece or "",
                    "index": index,
                    "logprobs": None,
                    "finish_reason": None if piece is not None else "stop",
                }
                out: dict[str, Any] = {**base, "choices": [choice]}
                if include_usage:
                    out["usage"] = None
                events.append(_sse(out))
        if include_usage:
            events.append(_sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return _Reply(
            200,
            b"",
            content_type="text/event-stream; charset=utf-8",
            headers=headers,
            events=tuple(events),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    payload = {
        **base,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, text in enumerate(texts)
        ],
        "usage": usage,
    }
    return _Reply(
        200,
        _dumps(payload),
        headers=headers,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def _embedding_inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [" ".join(f"token{v}" for v in value)]
    if all(
        isinstance(v, list)
        and v
        and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        return [" ".join(f"token{t}" for t in v) for v in value]
    return None


def _embeddings(raw: bytes, body: Mapping[str, Any]) -> _Reply:
    model = _require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    if inputs is None or any(text == "" for text in inputs):
        missing = body.get("input") is None
        raise _RequestError(
            400,
            "Missing required parameter: 'input'."
            if missing
            else "Invalid 'input': expected a non-empty string, a non-empty array of "
            "non-empty strings, or token arrays.",
            param="input",
            code="missing_required_parameter" if missing else "invalid_value",
        )
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS
    ):
        raise _RequestError(
            400,
            f"Invalid 'dimensions': expected an integer from 1 to "
            f"{MAX_EMBEDDING_DIMENSIONS}.",
            param="dimensions",
            code="invalid_value",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in {"float", "base64"}:
        raise _RequestError(
            400,
            "Invalid 'encoding_format': expected 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    data = []
    for index, text in enumerate(inputs):
        vector = world.embed(text, dimensions)
        embedding: list[float] | str = vector
        if encoding == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(_words(text) for text in inputs)
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    headers = (("x-request-id", f"req_{_digest(raw)[:32]}"),)
    return _Reply(200, _dumps(payload), headers=headers, prompt_tokens=tokens)


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "afnio"}


def _models(path: str) -> _Reply:
    rest = path.strip("/").removeprefix("v1/models").strip("/")
    if rest:
        payload: dict[str, Any] = _model_object(unquote(rest))
    else:
        payload = {"object": "list", "data": [_model_object(SIMULATOR_MODEL)]}
    return _Reply(200, _dumps(payload))


def _error_reply(error: _RequestError) -> _Reply:
    headers: tuple[tuple[str, str], ...] = ()
    if error.status == 429:
        headers = (("retry-after", "0"),)
    return _Reply(error.status, _dumps(error.body), headers=headers)


# -- files and batches (the Batch API) -----------------------------------------------

BATCH_ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)
"""The ``endpoint`` values a simulated batch accepts (each line's ``url`` too)."""

BATCH_OUTCOMES = ("failed", "expired")
"""The whole-batch outcomes :meth:`Simulator.fail_next_batch` can force."""

_BATCH_API_ENDPOINTS = frozenset({"files", "batches"})


def _batch_errors(code: str, message: str) -> dict[str, Any]:
    """The ``errors`` of a failed batch object: one whole-batch error (no line)."""
    return {
        "object": "list",
        "data": [{"code": code, "line": None, "message": message, "param": None}],
    }


def _multipart(raw: bytes) -> dict[str, Any]:
    """The fields of a ``multipart/form-data`` body (the boundary is its first line),
    parsed with :mod:`email`: ``{"file": (filename, bytes), "purpose": str, ...}``."""
    import email.parser
    import email.policy

    first = raw.split(b"\r\n", 1)[0]
    if not first.startswith(b"--") or len(first) < 3:
        raise _RequestError(
            400,
            "Invalid request: expected a multipart/form-data body with 'file' and "
            "'purpose'.",
        )
    boundary = first[2:].decode("latin-1")
    head = f'content-type: multipart/form-data; boundary="{boundary}"\r\n\r\n'
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        head.encode("latin-1") + raw
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "file":
            fields["file"] = (part.get_filename(), part.get_payload(decode=True) or b"")
        elif isinstance(name, str):
            fields[name] = part.get_content().strip()
    return fields


def _batch_line_reply(
    line: Mapping[str, Any], endpoint: str, feedback_words: int | None = None
) -> tuple[int, dict[str, Any], int, int]:
    """Answer one batch input line by the simulator's normal rules: ``(status, body,
    prompt_tokens, completion_tokens)``."""
    body = line.get("body")
    if not isinstance(body, Mapping):
        raise _RequestError(
            400, "Invalid 'body': expected a JSON object.", param="body"
        )
    if body.get("stream"):
        raise _RequestError(
            400, "Streaming is not supported in the Batch API.", param="stream"
        )
    raw = _dumps(body)
    key = endpoint.removeprefix("/v1/")
    if key == "chat/completions":
        reply = _chat(raw, body, False, feedback_words)
    elif key == "completions":
        reply = _completions(raw, body, False, feedback_words)
    else:
        reply = _embeddings(raw, body)
    return (
        reply.status,
        json.loads(reply.body),
        reply.prompt_tokens,
        reply.completion_tokens,
    )


@dataclass
class _LineFailure:
    match: str | RequestPredicate
    remaining: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # like HTTPServer.server_bind, without its reverse-DNS lookup (getfqdn), which
        # can stall for seconds on hosts with slow resolvers
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client went away (e.g. it timed out): nothing to report
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "afnio-simulator"
    sys_version = ""
    # one buffered write per answer, sent at once (no Nagle/delayed-ACK stalls)
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and benchmarks read their own output

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        try:
            raw = self._read_body()
        except OSError:
            self.close_connection = True
            return
        except ValueError:  # a bad Content-Length or chunk size: answer 400, hang up
            raw = b""
            self.close_connection = True
        path = urlsplit(self.path).path
        reply = self.server.simulator._process(self.command, path, raw)
        self._write(reply)

    def _write(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers:
                self.send_header(name, value)
            if reply.events is None:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            else:
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in reply.events:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(event), event))
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


FaultSpec = Fault | str | tuple[Any, ...] | Mapping[str, Any]
"""One entry of ``Simulator(faults=...)``: a kind, a tuple ``(kind, times[, endpoint
[, seconds]])`` or a mapping of :meth:`Simulator.inject` keyword arguments."""

DelayFunction = Callable[[Mapping[str, Any]], float]
"""``Simulator(delay=...)``: called with the parsed JSON body of every well-formed
``POST`` request (possibly from several server threads at once), it returns the extra
seconds to wait before answering (``0`` for none)."""

RequestPredicate = Callable[[Mapping[str, Any]], bool]
"""A :meth:`Simulator.delay_when` predicate on the parsed JSON body of a request."""


def request_text(body: Mapping[str, Any]) -> str:
    """The text a request carries, as one string: the content of every message
    (text parts of multimodal content included), the completion ``prompt`` and the
    embedding ``input`` strings, one per line. What :meth:`Simulator.delay_when`
    matches a string against.

    >>> request_text({"messages": [{"role": "system", "content": "Be brief."},
    ...     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    'Be brief.\\nHi'
    >>> request_text({"prompt": ["a", "b"]}), request_text({"input": "c"})
    ('a\\nb', 'c')
    """
    texts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        texts.extend(
            world.message_text(m.get("content"))
            for m in messages
            if isinstance(m, Mapping)
        )
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
    return "\n".join(texts)


@dataclass(frozen=True)
class _DelayRule:
    match: str | RequestPredicate
    seconds: float
    endpoint: str | None

    def applies(self, endpoint: str, body: Mapping[str, Any]) -> bool:
        if self.endpoint not in (None, endpoint):
            return False
        if isinstance(self.match, str):
            return self.match in request_text(body)
        return bool(self.match(body))


def _delay_seconds(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{source} must give a number of seconds, got {value!r}")
    seconds = float(value)
    if not seconds >= 0 or math.isinf(seconds):
        raise ValueError(f"{source} must give finite seconds >= 0, got {value!r}")
    return seconds


class Simulator:
    """An OpenAI-compatible HTTP server on 127.0.0.1 that answers by rules.

    Args:
        host: the loopback address to bind (``"127.0.0.1"``; ``"localhost"`` means
            the same). Anything else raises ``ValueError``: the simulator never
            listens on a public interface.
        port: the port; ``0`` (the default) picks a free one at :meth:`start`.
        latency: seconds slept before answering each request (settable at any time).
            Each connection has its own thread, so sleeping never blocks others.
        faults: an initial fault schedule, queued as if by :meth:`inject`; each
            entry is a kind (``"rate_limit"``), a tuple ``(kind, times)``,
            ``(kind, times, endpoint)`` or ``(kind, times, endpoint, seconds)``, or a
            mapping of ``inject`` keyword arguments. ``Simulator(faults=[("rate_limit",
            2), ("delay", 1, "embeddings", 0.5)])`` makes the next two requests get a
            429 and the next embeddings request wait half a second.
        delay: a function of the parsed JSON body of a request that returns extra
            seconds to wait before answering it (see :attr:`delay`); with
            :meth:`delay_when` rules, it gives chosen requests their own latency.
        requests_per_minute, tokens_per_minute: RPM and TPM limits enforced per
            model, as OpenAI does (token buckets; ``x-ratelimit-*`` headers on every
            answer, 429s with ``retry-after``); ``None`` (the default) for none.
            The rules are in :mod:`afnio.testing.rate_limits`; change them at any
            time with :meth:`set_rate_limits`.
        rate_limit_window: the seconds in which an empty bucket refills (60: per
            minute; tests shrink it to see limits act within seconds).
        feedback_words: pad every non-empty LM-written feedback string of a
            backward answer to at least this many words (see
            :attr:`feedback_words`); ``None`` (the default) for no padding.

    Use it as a context manager or call :meth:`start`/:meth:`stop` (both idempotent;
    a stopped simulator can be started again, keeping its counters and faults).

    Example::

        >>> with Simulator(latency=0.01) as sim:
        ...     sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        True
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        faults: Iterable[FaultSpec] | None = None,
        delay: DelayFunction | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        rate_limit_window: float = 60.0,
        feedback_words: int | None = None,
    ) -> None:
        if host == "localhost":
            host = "127.0.0.1"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is None or address.version != 4 or not address.is_loopback:
            raise ValueError(
                f"the simulator listens on the IPv4 loopback only (127.0.0.1), "
                f"not {host!r}"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port!r}")
        self.host = host
        self._requested_port = port
        self._bound_port: int | None = None
        self.latency = latency
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when in_flight drops
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._faults: list[_PendingFault] = []
        self._requests: list[Any] = []
        self._init_batch_api()
        self._rate_limits = ServerRateLimits(
            requests_per_minute, tokens_per_minute, rate_limit_window
        )
        self._reset_counters()
        self._in_flight = 0
        self._peak_in_flight = 0
        self._delay: DelayFunction | None = None
        self._delay_rules: list[_DelayRule] = []
        self.delay = delay
        self.feedback_words = feedback_words
        for spec in faults or ():
            self._inject_spec(spec)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind and serve in a daemon thread; a no-op when already running."""
        with self._lock:
            if self._server is not None:
                return self
            server = _Server((self.host, self._requested_port), self)
            self._stopping = threading.Event()
            self._server = server
            self._bound_port = server.server_address[1]
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"afnio-simulator-{self._bound_port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open connections; a no-op when not running.

        Requests still waiting (latency, delays, ``DELAY``) are woken and dropped;
        ``stop`` returns once none is in flight (or after 2 s).
        """
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        with self._idle:  # woken requests finish their (dropped) answers quickly
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=2)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the requested one before the first start)."""
        return (
            self._bound_port if self._bound_port is not None else self._requested_port
        )

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, for ``OpenAI(base_url=...)`` or
        ``OPENAI_BASE_URL``."""
        if self.port == 0:
            raise RuntimeError(
                "the simulator picks its port at start(): start it first"
            )
        return f"http://{self.host}:{self.port}/v1"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Simulator {state} on {self.host}:{self.port} latency={self.latency}>"

    # -- settings ------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds slept before answering each request (settable)."""
        return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        value = float(value)
        if not value >= 0:
            raise ValueError(f"latency must be a non-negative number, got {value!r}")
        self._latency = value

    @property
    def feedback_words(self) -> int | None:
        """Pad LM-written feedback to at least this many words (settable; ``None``:
        no padding, the default).

        Every non-empty feedback string of a backward answer (the responders of
        :data:`afnio.testing.world.FEEDBACK_RESPONDERS`: afnio's chat backward, one
        call or a group, and evaluator backward, and TextGrad's backward calls) gets
        the fixed neutral sentence :data:`afnio.testing.world.FEEDBACK_FILLER`
        appended until it holds at least this many words (whole sentences, so up to
        14 more; simulator tokens are words). The filler holds no quote, no rule and
        no expected value, so every rule the simulator reads from the feedback, and
        therefore the optimizer's edits, stay the same, while the feedback (and the
        optimizer prompt quoting it) grows, as a real model's longer prose would.
        It applies to every route: chat and legacy completions, streamed or not,
        and Batch API lines. Optimizer answers (afnio's and TextGrad's TGD, Trace's
        OptoPrime) and judge verdicts are never padded.

        >>> Simulator(feedback_words=60).feedback_words
        60
        >>> Simulator(feedback_words=0)
        Traceback (most recent call last):
        ...
        ValueError: feedback_words must be an int >= 1 (the least number of words of a padded feedback) or None for no padding, got 0
        """  # noqa: E501
        return self._feedback_words

    @feedback_words.setter
    def feedback_words(self, value: int | None) -> None:
        message = (
            "feedback_words must be an int >= 1 (the least number of words of a "
            f"padded feedback) or None for no padding, got {value!r}"
        )
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise TypeError(message)
        if value is not None and value < 1:
            raise ValueError(message)
        self._feedback_words = value

    # -- per-request delays --------------------------------------------------------

    @property
    def delay(self) -> DelayFunction | None:
        """A function of the parsed JSON body of each well-formed ``POST`` request
        (any endpoint) that returns extra seconds to wait, on top of :attr:`latency`
        and of the :meth:`delay_when` rules; ``None`` (the default) for none.
        Settable at any time. It is called from the server's threads, possibly
        several at once, so it must be thread-safe; one that raises or returns
        anything but finite seconds >= 0 makes the request fail with HTTP 500 (a
        simulator internal error, its traceback printed).

        >>> sim = Simulator(delay=lambda body: 0.05 if body.get("stream") else 0)
        >>> sim.delay_for({"stream": True}), sim.delay_for({"stream": False})
        (0.05, 0.0)
        """
        return self._delay

    @delay.setter
    def delay(self, function: DelayFunction | None) -> None:
        if function is not None and not callable(function):
            raise TypeError(f"delay must be callable or None, got {function!r}")
        self._delay = function

    def delay_when(
        self,
        match: str | RequestPredicate,
        seconds: float,
        endpoint: str | None = None,
    ) -> None:
        """Delay every matching request by ``seconds`` (until :meth:`clear_delays`).

        Args:
            match: a string that must occur in the request's text
                (:func:`request_text`: its message contents, ``prompt`` or
                ``input``), or a predicate on its parsed JSON body (called from the
                server's threads: it must be thread-safe).
            seconds: the extra wait, finite and ``>= 0``.
            endpoint: only requests to this endpoint match (``"chat/completions"``,
                ``"completions"``, ``"embeddings"``; ``"/v1/..."`` spellings work
                too); ``None``: any endpoint.

        The waits of all matching rules add up, and add to :attr:`latency` and to
        :attr:`delay`. Only well-formed ``POST`` requests are delayed (a 400 answers
        at once); a waiting request is woken by :meth:`stop`.

        >>> sim = Simulator()
        >>> sim.delay_when("slow", 0.25)
        >>> sim.delay_when(lambda body: body.get("temperature") == 0, 0.5)
        >>> body = {"messages": [{"role": "user", "content": "slow"}], "temperature": 0}
        >>> sim.delay_for(body)
        0.75
        >>> sim.clear_delays(); sim.delay_for(body)
        0.0
        """
        if not isinstance(match, str) and not callable(match):
            raise TypeError(f"match must be a string or a predicate, got {match!r}")
        rule = _DelayRule(
            match,
            _delay_seconds(seconds, "delay_when"),
            None if endpoint is None else _endpoint_key(endpoint),
        )
        with self._lock:
            self._delay_rules.append(rule)

    def clear_delays(self) -> None:
        """Drop every :meth:`delay_when` rule and the :attr:`delay` function."""
        with self._lock:
            self._delay_rules.clear()
            self._delay = None

    def delay_for(
        self, body: Mapping[str, Any], endpoint: str = "chat/completions"
    ) -> float:
        """The extra seconds (beyond :attr:`latency`) a request with this parsed body
        to ``endpoint`` would wait now: the :attr:`delay` function's answer plus the
        seconds of every matching :meth:`delay_when` rule."""
        key = _endpoint_key(endpoint)
        with self._lock:
            rules = list(self._delay_rules)
            function = self._delay
        total = 0.0
        if function is not None:
            total += _delay_seconds(function(body), "the delay function")
        for rule in rules:
            if rule.applies(key, body):
                total += rule.seconds
        return total

    # -- faults --------------------------------------------------------------------

    def inject(
        self,
        kind: Fault | str,
        times: int = 1,
        endpoint: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` matching requests.

        Args:
            kind: a :class:`Fault` (or its value, e.g. ``"rate_limit"``).
            times: how many requests it hits.
            endpoint: only requests to this endpoint consume it (``"chat/completions"``,
                ``"completions"``, ``"embeddings"``, ``"models"``; ``"/v1/..."`` and
                ``"chat.completions"`` spellings work too); ``None``: any endpoint.
            seconds: for ``DELAY`` only, the wait (default 5).

        Faults are consumed in the order they were queued, only by well-formed
        requests to a known endpoint (a 400 or 404 consumes nothing);
        ``MALFORMED_JSON`` is consumed only by the completion endpoints.

        >>> sim = Simulator()
        >>> sim.inject("rate_limit", times=2)
        >>> sim.inject(Fault.DELAY, endpoint="/v1/embeddings", seconds=0.5)
        >>> sim.fault_schedule
        [(<Fault.RATE_LIMIT: 'rate_limit'>, 2, None, None), \
(<Fault.DELAY: 'delay'>, 1, 'embeddings', 0.5)]
        """
        kind = Fault(kind)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}")
        key = None if endpoint is None else _endpoint_key(endpoint)
        if seconds is not None:
            if kind is not Fault.DELAY:
                raise ValueError("seconds applies to Fault.DELAY only")
            seconds = float(seconds)
            if not seconds >= 0:
                raise ValueError(f"seconds must be non-negative, got {seconds!r}")
        if kind is Fault.MALFORMED_JSON and key not in (None, *_GENERATION_ENDPOINTS):
            raise ValueError("MALFORMED_JSON applies to the completion endpoints only")
        with self._lock:
            self._faults.append(_PendingFault(kind, times, key, seconds))

    def _inject_spec(self, spec: FaultSpec) -> None:
        if isinstance(spec, Mapping):
            self.inject(**spec)
        elif isinstance(spec, tuple):
            self.inject(*spec)
        else:
            self.inject(spec)

    @property
    def fault_schedule(self) -> list[tuple[Fault, int, str | None, float | None]]:
        """The pending faults, in order: ``(kind, times left, endpoint, seconds)``."""
        with self._lock:
            return [(f.kind, f.remaining, f.endpoint, f.seconds) for f in self._faults]

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, endpoint: str) -> _PendingFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint not in (None, endpoint):
                    continue
                if (
                    fault.kind is Fault.MALFORMED_JSON
                    and endpoint not in _GENERATION_ENDPOINTS
                ):
                    continue
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                self._faults_served += 1
                return _PendingFault(fault.kind, 1, endpoint, fault.seconds)
        return None

    # -- files and batches (the Batch API) -------------------------------------------

    def _init_batch_api(self) -> None:
        self._batch_lock = threading.RLock()
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._batch_polls_left: dict[str, int] = {}
        self._batch_outcomes: list[str] = []
        self._line_failures: list[_LineFailure] = []
        self._batches_created = 0
        self.batch_polls = 1

    @property
    def batch_polls(self) -> int:
        """How many ``GET /v1/batches/{id}`` a batch answers before it is done
        (settable; default 1: the first poll runs its lines and completes it). The
        polls before that answer ``in_progress``; the count is per batch, so
        recordings stay deterministic."""
        return self._batch_polls

    @batch_polls.setter
    def batch_polls(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_polls must be an int >= 1, got {value!r}")
        self._batch_polls = value

    @property
    def batches_created(self) -> int:
        """How many ``POST /v1/batches`` created a batch (since the start; not reset
        by :meth:`reset_stats`)."""
        with self._batch_lock:
            return self._batches_created

    @property
    def batches(self) -> dict[str, dict[str, Any]]:
        """The batch objects by id (copies), as the last ``GET`` would answer them."""
        with self._batch_lock:
            return {k: json.loads(_dumps(v)) for k, v in self._batches.items()}

    def fail_next_batch(self, outcome: str = "failed", times: int = 1) -> None:
        """Make the next ``times`` batches to finish end ``"failed"`` (an
        ``errors.data`` entry, no output) or ``"expired"`` (no line run)."""
        if outcome not in BATCH_OUTCOMES:
            raise ValueError(
                f"outcome must be one of {BATCH_OUTCOMES}, got {outcome!r}"
            )
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}")
        with self._batch_lock:
            self._batch_outcomes.extend([outcome] * times)

    def fail_batch_lines(self, match: str | RequestPredicate, times: int = 1) -> None:
        """Fail the next ``times`` batch lines that match: a string in the line's
        request text (:func:`request_text`) or a predicate on its ``body``. A failed
        line goes to the batch's error file as ``{"custom_id", "response":
        {"status_code": 500, "body": {"error": ...}}, "error": null}``."""
        if not isinstance(match, str) and not callable(match):
            raise TypeError(f"match must be a string or a predicate, got {match!r}")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}")
        with self._batch_lock:
            self._line_failures.append(_LineFailure(match, times))

    def _take_line_failure(self, body: Mapping[str, Any]) -> bool:
        for failure in self._line_failures:
            hit = (
                failure.match in request_text(body)
                if isinstance(failure.match, str)
                else bool(failure.match(body))
            )
            if hit:
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._line_failures.remove(failure)
                return True
        return False

    def _store_file(
        self, content: bytes, filename: str, purpose: str, seed: str
    ) -> dict[str, Any]:
        file_id = f"file-{_digest(seed.encode() + content)[:24]}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": CREATED,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self._files[file_id] = (obj, content)
        return obj

    def _batch_api(self, method: str, path: str, raw: bytes) -> _Reply:
        """``/v1/files`` and ``/v1/batches`` (see the module docstring)."""
        parts = path.strip("/").split("/")[1:]  # without "v1"
        with self._batch_lock:
            if parts == ["files"] and method == "POST":
                fields = _multipart(raw)
                if "file" not in fields or not fields.get("purpose"):
                    raise _RequestError(
                        400,
                        "Missing required parameter: 'file' and 'purpose'.",
                        param="file" if "file" not in fields else "purpose",
                    )
                filename, content = fields["file"]
                obj = self._store_file(
                    content, filename or "upload", fields["purpose"], "upload"
                )
                return _Reply(200, _dumps(obj))
            if parts[:1] == ["files"] and len(parts) in (2, 3) and method == "GET":
                if parts[1] not in self._files:
                    raise _RequestError(
                        404, f"No such File object: {parts[1]}", param="id"
                    )
                obj, content = self._files[parts[1]]
                if len(parts) == 2:
                    return _Reply(200, _dumps(obj))
                if parts[2] == "content":
                    return _Reply(200, content, content_type="application/octet-stream")
            if parts == ["batches"] and method == "POST":
                return _Reply(200, _dumps(self._create_batch(raw)))
            if parts == ["batches"] and method == "GET":
                data = list(self._batches.values())
                listing = {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": False,
                }
                return _Reply(200, _dumps(listing))
            if parts[:1] == ["batches"] and len(parts) in (2, 3):
                batch = self._batches.get(parts[1])
                if batch is None:
                    raise _RequestError(
                        404, f"No batch found with id '{parts[1]}'.", param="batch_id"
                    )
                if len(parts) == 2 and method == "GET":
                    return self._poll_batch(batch)
                if parts[2:] == ["cancel"] and method == "POST":
                    if batch["status"] in ("validating", "in_progress", "finalizing"):
                        batch["status"] = "cancelling"
                        batch["cancelling_at"] = CREATED + 1
                    return _Reply(200, _dumps(batch))
        raise _RequestError(404, f"Invalid URL ({method} {path})", code="unknown_url")

    def _create_batch(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _RequestError(
                400, "We could not parse the JSON body of your request."
            ) from None
        if not isinstance(body, Mapping):
            raise _RequestError(400, "Invalid request body: expected a JSON object.")
        file_id = body.get("input_file_id")
        if file_id not in self._files:
            raise _RequestError(
                400, f"Invalid 'input_file_id': {file_id!r}.", param="input_file_id"
            )
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise _RequestError(
                400,
                f"Invalid 'endpoint': {endpoint!r}; the simulator batches "
                f"{list(BATCH_ENDPOINTS)}.",
                param="endpoint",
            )
        if body.get("completion_window") != "24h":
            raise _RequestError(
                400,
                "Invalid 'completion_window': only '24h' is supported.",
                param="completion_window",
            )
        self._batches_created += 1
        seed = f"{file_id}:{self._batches_created}".encode()
        batch_id = f"batch_{_digest(seed)[:24]}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": CREATED,
            "in_progress_at": None,
            "expires_at": CREATED + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self._batches[batch_id] = batch
        self._batch_polls_left[batch_id] = self._batch_polls
        return batch

    def _input_lines(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch's input lines, or raise ValueError naming the first bad one."""
        _, content = self._files[batch["input_file_id"]]
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, text in enumerate(content.decode("utf-8").splitlines(), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                raise ValueError(f"line {number}: not valid JSON") from None
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or custom_id in seen:
                raise ValueError(f"line {number}: a missing or repeated 'custom_id'")
            if line.get("method") != "POST" or line.get("url") != batch["endpoint"]:
                raise ValueError(
                    f"line {number}: 'method' must be POST and 'url' the batch's "
                    f"endpoint {batch['endpoint']!r}"
                )
            seen.add(custom_id)
            lines.append(line)
        if not lines:
            raise ValueError("the input file holds no request")
        return lines

    def _poll_batch(self, batch: dict[str, Any]) -> _Reply:
        """One ``GET /v1/batches/{id}``: advance the batch by one poll."""
        status = batch["status"]
        prompt_tokens = completion_tokens = 0
        if status == "cancelling":
            batch.update(status="cancelled", cancelled_at=CREATED + 2)
        elif status in ("validating", "in_progress"):
            try:
                lines = self._input_lines(batch)
            except ValueError as error:
                batch.update(
                    status="failed",
                    failed_at=CREATED + 1,
                    errors=_batch_errors(
                        "invalid_request", f"Invalid input file: {error}."
                    ),
                )
                return _Reply(200, _dumps(batch))
            total = len(lines)
            left = self._batch_polls_left[batch["id"]] - 1
            self._batch_polls_left[batch["id"]] = left
            if left > 0:
                done = total * (self._batch_polls - left) // self._batch_polls
                batch.update(
                    status="in_progress",
                    in_progress_at=CREATED + 1,
                    request_counts={"total": total, "completed": done, "failed": 0},
                )
            elif self._batch_outcomes:
                outcome = self._batch_outcomes.pop(0)
                batch["request_counts"] = {"total": total, "completed": 0, "failed": 0}
                if outcome == "expired":
                    batch.update(status="expired", expired_at=CREATED + 86_400)
                else:
                    batch.update(
                        status="failed",
                        failed_at=CREATED + 2,
                        errors=_batch_errors(
                            "server_error",
                            "The batch failed (simulated by afnio.testing).",
                        ),
                    )
            else:
                prompt_tokens, completion_tokens = self._run_batch(batch, lines)
        return _Reply(
            200,
            _dumps(batch),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _run_batch(
        self, batch: dict[str, Any], lines: list[dict[str, Any]]
    ) -> tuple[int, int]:
        """Answer every line, store the output and error files, complete the batch."""
        outputs: list[bytes] = []
        errors: list[bytes] = []
        prompt_tokens = completion_tokens = 0
        for line in lines:
            custom_id = line["custom_id"]
            body = line.get("body")
            digest = _digest(_dumps([batch["id"], custom_id]))
            try:
                if isinstance(body, Mapping) and self._take_line_failure(body):
                    raise _RequestError(
                        500,
                        "The server had an error while processing this request "
                        "(simulated by afnio.testing).",
                        type="server_error",
                    )
                status, answer, p_tokens, c_tokens = _batch_line_reply(
                    line, batch["endpoint"], self._feedback_words
                )
            except _RequestError as error:
                status, answer, p_tokens, c_tokens = error.status, error.body, 0, 0
            record = {
                "id": f"batch_req_{digest[:24]}",
                "custom_id": custom_id,
                "response": {
                    "status_code": status,
                    "request_id": f"req_{digest[:32]}",
                    "body": answer,
                },
                "error": None,
            }
            if status == 200:
                outputs.append(_dumps(record))
                prompt_tokens += p_tokens
                completion_tokens += c_tokens
            else:
                errors.append(_dumps(record))
        counts = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
        batch.update(
            status="completed",
            in_progress_at=CREATED + 1,
            finalizing_at=CREATED + 2,
            completed_at=CREATED + 3,
            request_counts=counts,
        )
        if outputs:
            out = self._store_file(
                b"\n".join(outputs) + b"\n",
                "batch_output.jsonl",
                "batch_output",
                f"{batch['id']}:output",
            )
            batch["output_file_id"] = out["id"]
        if errors:
            err = self._store_file(
                b"\n".join(errors) + b"\n",
                "batch_errors.jsonl",
                "batch_output",
                f"{batch['id']}:errors",
            )
            batch["error_file_id"] = err["id"]
        return prompt_tokens, completion_tokens

    # -- counters ------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._calls = 0
        self._calls_by_endpoint: dict[str, int] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._faults_served = 0
        self._rate_limited = 0
        self._served = 0

    @property
    def stats(self) -> SimulatorStats:
        """A consistent snapshot of the counters (see :class:`SimulatorStats`)."""
        with self._lock:
            return SimulatorStats(
                calls=self._calls,
                calls_by_endpoint=dict(self._calls_by_endpoint),
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self._completion_tokens,
                in_flight=self._in_flight,
                peak_in_flight=self._peak_in_flight,
                faults_served=self._faults_served,
                rate_limited=self._rate_limited,
                served=self._served,
            )

    def reset_stats(self) -> None:
        """Zero the counters and forget the received requests (``in_flight`` stays
        live; ``peak_in_flight`` restarts from it). Pending faults are kept."""
        with self._lock:
            self._reset_counters()
            self._peak_in_flight = self._in_flight
            self._requests.clear()

    @property
    def requests(self) -> list[Any]:
        """The parsed JSON bodies received (in arrival order), for assertions."""
        with self._lock:
            return list(self._requests)

    # -- serving -------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _process(self, method: str, path: str, raw: bytes) -> _Reply:
        """Compute the answer to one request and account for it (before it is
        written, so a client that has its answer sees up-to-date counters)."""
        endpoint = _route(method, path)
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        reply: _Reply | None = None
        try:
            admission = self._admit(endpoint, raw)
            if admission is not None and admission.status == 429:
                reply = _Reply(429, _dumps(admission.error), headers=admission.headers)
                with self._lock:
                    self._rate_limited += 1
                return reply
            reply = self._answer(endpoint, method, path, raw)
            if admission is not None:
                reply = dataclasses.replace(
                    reply, headers=reply.headers + admission.headers
                )
            return reply
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
                self._calls += 1
                key = endpoint or "unknown"
                self._calls_by_endpoint[key] = self._calls_by_endpoint.get(key, 0) + 1
                if reply is not None and reply.status == 200:
                    self._served += 1
                    self._prompt_tokens += reply.prompt_tokens
                    self._completion_tokens += reply.completion_tokens

    # -- rate limits -----------------------------------------------------------------

    def set_rate_limits(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        rate_limit_window: float = 60.0,
    ) -> None:
        """Set (or, with ``None``, remove) the per-model RPM and TPM limits; every
        bucket starts full again. The rules are in :mod:`afnio.testing.rate_limits`.

        Raises:
            ValueError: for a limit that is not a positive int, or a window that is
                not a positive number of seconds.
        """
        limits = ServerRateLimits(
            requests_per_minute, tokens_per_minute, rate_limit_window
        )
        with self._lock:
            self._rate_limits = limits

    @property
    def rate_limits(self) -> ServerRateLimits:
        """The RPM/TPM limits in force (see :meth:`set_rate_limits`)."""
        return self._rate_limits

    def _admit(self, endpoint: str | None, raw: bytes) -> Admission | None:
        """Charge a request to its model's RPM/TPM buckets: ``None`` when it is not
        limited (no limits set, another endpoint, no parsable ``model``)."""
        limits = self._rate_limits
        if not limits.enabled or endpoint not in _LIMITED_ENDPOINTS:
            return None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None  # answered 400 by the normal path
        if not isinstance(body, Mapping) or not isinstance(body.get("model"), str):
            return None
        return limits.admit(body["model"], request_tokens(body))

    def _answer(
        self, endpoint: str | None, method: str, path: str, raw: bytes
    ) -> _Reply:
        fault: _PendingFault | None = None
        try:
            if endpoint is None:
                raise _RequestError(
                    404,
                    f"Invalid URL ({method} {path})",
                    param=None,
                    code="unknown_url",
                )
            if endpoint in _BATCH_API_ENDPOINTS:  # multipart uploads: not JSON
                self._sleep(self._latency)
                return self._batch_api(method, path, raw)
            body: Any = None
            if method == "POST":
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise _RequestError(
                        400,
                        "We could not parse the JSON body of your request. (HINT: This "
                        "likely means you aren't using your HTTP library correctly. "
                        "The OpenAI API expects a JSON payload.)",
                    ) from None
                with self._lock:
                    self._requests.append(body)
                if not isinstance(body, Mapping):
                    raise _RequestError(
                        400, "Invalid request body: expected a JSON object."
                    )
                self._validate(endpoint, body)
            extra = 0.0
            if method == "POST" and isinstance(body, Mapping):
                extra = self.delay_for(body, endpoint)
            fault = self._take_fault(endpoint)
            self._sleep(self._latency + extra)
            if fault is not None and fault.kind is Fault.RATE_LIMIT:
                raise _RequestError(
                    429,
                    "Rate limit reached for requests (simulated by afnio.testing). "
                    "Please try again in 0s.",
                    type="requests",
                    code="rate_limit_exceeded",
                )
            if fault is not None and fault.kind is Fault.SERVER_ERROR:
                raise _RequestError(
                    500,
                    "The server had an error while processing your request "
                    "(simulated by afnio.testing).",
                    type="server_error",
                )
            if fault is not None and fault.kind is Fault.DELAY:
                seconds = fault.seconds
                self._sleep(DEFAULT_DELAY_SECONDS if seconds is None else seconds)
            malformed = fault is not None and fault.kind is Fault.MALFORMED_JSON
            words = self._feedback_words
            if endpoint == "chat/completions":
                return _chat(raw, body, malformed, words)
            if endpoint == "completions":
                return _completions(raw, body, malformed, words)
            if endpoint == "embeddings":
                return _embeddings(raw, body)
            return _models(path)
        except _RequestError as error:
            return _error_reply(error)
        except Exception as error:  # a simulator bug: answer 500 and show it
            traceback.print_exc()
            return _error_reply(
                _RequestError(
                    500,
                    f"afnio simulator internal error: {error!r}",
                    type="server_error",
                )
            )

    @staticmethod
    def _validate(endpoint: str, body: Mapping[str, Any]) -> None:
        """Raise the 400 a request would get, before any fault is consumed."""
        if endpoint == "chat/completions":
            _chat(b"", body, False)
        elif endpoint == "completions":
            _completions(b"", body, False)
        elif endpoint == "embeddings":
            _embeddings(b"", body)
