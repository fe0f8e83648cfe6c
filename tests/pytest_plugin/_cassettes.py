"""Helpers for the in-process tests of ``afnio_pytest``'s cassette: write a cassette
file, open it the way the plugin does (vcrpy's patchers active, the cassette upgraded
to ``AfnioCassette``), and send requests through real httpx clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from afnio_pytest._types import (
    REPLAY_BASE_URL,
    SIMULATOR_RECORDING,
    ReplayOptions,
    ReplayState,
)

CHAT = "/v1/chat/completions"


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat request body with one user message."""
    return {
        "model": "afnio-sim-1",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def write_cassette(
    path: Path,
    interactions: list[tuple[str, dict[str, Any] | bytes, str]],
    recorded_with: str = SIMULATOR_RECORDING,
) -> None:
    """A cassette of ``(path with query, body, answer text)`` interactions, as the
    plugin records them (host ``simulator.invalid``)."""
    from vcr.request import Request
    from vcr.serializers import yamlserializer

    from afnio_pytest._cassette import AtomicPersister

    requests, responses = [], []
    for target, body, answer in interactions:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        requests.append(
            Request(
                "POST",
                f"http://simulator.invalid{target}",
                raw,
                {"content-type": "application/json"},
            )
        )
        reply = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        responses.append(
            {
                "status": {"code": 200, "message": "OK"},
                "headers": {"content-type": ["application/json"]},
                "body": {"string": json.dumps(reply).encode()},
            }
        )
    data = {
        "requests": requests,
        "responses": responses,
        "metadata": {"recorded_with": recorded_with},
    }
    AtomicPersister.save_cassette(str(path), data, yamlserializer)


def new_state(**options: Any) -> ReplayState:
    """A replay state as the collection hook builds it."""
    return ReplayState(
        "tests/test_x.py::test_x", ReplayOptions(**options), "none", None
    )


@contextmanager
def open_cassette(
    path: Path,
    state: ReplayState,
    record_mode: str = "none",
    simulator_netloc: str | None = None,
) -> Iterator[Any]:
    """Open ``path`` as pytest-recording would for a marked test, and upgrade it."""
    import vcr

    from afnio_pytest._cassette import AtomicPersister, make_body_matcher, upgrade

    recorder = vcr.VCR(record_mode=record_mode)
    recorder.register_matcher("afnio_body", make_body_matcher(state))
    state.phase = "loading"
    context = recorder.use_cassette(
        str(path),
        persister=AtomicPersister.bound(state),
        before_record_request=state.before_record_request,
        before_record_response=state.before_record_response,
        decode_compressed_response=True,
        match_on=("method", "path", "afnio_body"),
    )
    with context as cassette:
        upgrade(cassette, state)
        state.cassette = cassette
        if simulator_netloc is None:
            state.mode, state.endpoint_netloc = "replay", "127.0.0.1:9"
        else:
            state.mode = "record"
            state.simulator_netloc = state.endpoint_netloc = simulator_netloc
        state.phase, state.active = "live", True
        yield cassette


def answer(response: Any) -> str:
    """The assistant text of a (replayed) chat response."""
    return response.json()["choices"][0]["message"]["content"]


BASE_URL = REPLAY_BASE_URL
