"""afnio's OpenAI clients, replayed from cassettes (recorded against the simulator)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
import pytest

import afnio
from afnio.models import enable_cache, unpriced_models
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.models.pricing import calculate_cost, get_model_price
from afnio.testing import SIMULATOR_MODEL
from tests.conftest import LMEndpoint

MESSAGES = [
    {
        "role": "system",
        "content": 'If the message mentions "refund", the sentiment is negative.',
    },
    {"role": "user", "content": "I want a refund for this order."},
]
USAGE_KEYS = {
    "completion_tokens",
    "prompt_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "cost",
}


def http_exchanges(vcr: Any) -> int:
    """HTTP exchanges made so far: replayed ones, or recorded ones when recording."""
    return vcr.play_count or len(vcr)


def _assert_usage_priced(usage: dict[str, Any], model: str) -> None:
    assert set(usage) == USAGE_KEYS
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens", "audio_tokens"}
    assert set(usage["completion_tokens_details"]) == {
        "reasoning_tokens",
        "audio_tokens",
        "accepted_prediction_tokens",
        "rejected_prediction_tokens",
    }
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    price = get_model_price(model)
    assert price is not None
    assert usage["cost"]["currency"] == "USD"
    assert usage["cost"]["amount"] == pytest.approx(calculate_cost(usage, price))
    assert usage["cost"]["amount"] > 0


@pytest.mark.afnio_replay
@pytest.mark.parametrize("cls", [OpenAI, AsyncOpenAI])
def test_chat_answers_and_accounts_usage_and_cost(lm: LMEndpoint, cls: type) -> None:
    client = lm.client(cls)
    reply = client.chat(messages=MESSAGES, model=SIMULATOR_MODEL, temperature=0)
    assert reply == "negative"
    _assert_usage_priced(client.get_usage(), SIMULATOR_MODEL)


@pytest.mark.afnio_replay
def test_achat_from_a_running_event_loop(lm: LMEndpoint) -> None:
    client = lm.client(AsyncOpenAI)

    async def handler() -> str:
        return await client.achat(MESSAGES, model=SIMULATOR_MODEL, temperature=0)

    assert asyncio.run(handler()) == "negative"
    assert client.get_usage()["total_tokens"] > 0


@pytest.mark.afnio_replay
@pytest.mark.parametrize("cls", [OpenAI, AsyncOpenAI])
def test_complete_returns_text(lm: LMEndpoint, cls: type) -> None:
    client = lm.client(cls)
    prompt = (
        'If the message mentions "late", the sentiment is negative.\n'
        "The parcel came late."
    )
    assert client.complete(prompt, model=SIMULATOR_MODEL) == "negative"
    _assert_usage_priced(client.get_usage(), SIMULATOR_MODEL)


@pytest.mark.afnio_replay
@pytest.mark.parametrize("cls", [OpenAI, AsyncOpenAI])
def test_embed_returns_one_vector_per_text(lm: LMEndpoint, cls: type) -> None:
    client = lm.client(cls)
    vectors = client.embed(["the broken heater", "the heater"], model=SIMULATOR_MODEL)
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    dot = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    assert dot > 0
    usage = client.get_usage()
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 0


@pytest.mark.afnio_replay
def test_unpriced_model_costs_zero_and_warns_once(
    lm: LMEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    client = lm.client(OpenAI)
    with caplog.at_level(logging.WARNING, logger="afnio.models"):
        client.chat(messages=MESSAGES, model="sim-unpriced-model")
        client.chat(messages=MESSAGES[1:], model="sim-unpriced-model")
    usage = client.get_usage()
    assert usage["total_tokens"] > 0
    assert usage["cost"] == {"amount": 0.0, "currency": "USD"}
    warnings = [r for r in caplog.records if "sim-unpriced-model" in r.getMessage()]
    assert len(warnings) == 1
    assert "register_model_price" in warnings[0].getMessage()
    assert "openai/sim-unpriced-model" in unpriced_models()


@pytest.mark.afnio_replay
def test_rate_limit_then_success_is_retried(lm: LMEndpoint, vcr: Any) -> None:
    if lm.simulator is not None:
        from afnio.testing import Fault

        lm.simulator.inject(Fault.RATE_LIMIT, times=1)
    client = lm.client(OpenAI, max_retries=1)
    assert client.chat(messages=MESSAGES, model=SIMULATOR_MODEL) == "negative"
    statuses = [r["status"]["code"] for r in vcr.responses]
    assert statuses == [429, 200]
    assert http_exchanges(vcr) == 2
    assert client.get_usage()["total_tokens"] > 0


@pytest.mark.afnio_replay
def test_cache_makes_the_second_identical_call_free(lm: LMEndpoint, vcr: Any) -> None:
    cache = enable_cache()
    client = lm.client(OpenAI)
    first = client.chat(messages=MESSAGES, model=SIMULATOR_MODEL, temperature=0)
    usage_after_first = client.get_usage()
    second = client.chat(messages=MESSAGES, model=SIMULATOR_MODEL, temperature=0)
    assert first == second == "negative"
    assert client.get_usage() == usage_after_first  # a hit costs nothing
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert http_exchanges(vcr) == 1  # one HTTP exchange for two calls
    other = client.chat(messages=MESSAGES, model=SIMULATOR_MODEL, temperature=1)
    assert other == "negative" and cache.stats().misses == 2  # any parameter counts


@pytest.mark.afnio_replay
def test_persistent_cache_survives_a_new_cache_object(
    lm: LMEndpoint, tmp_path: Any
) -> None:
    path = tmp_path / "lm.sqlite"
    enable_cache(path)
    client = lm.client(OpenAI)
    assert client.chat(messages=MESSAGES, model=SIMULATOR_MODEL) == "negative"
    fresh = enable_cache(path)  # a new process would do the same
    assert client.chat(messages=MESSAGES, model=SIMULATOR_MODEL) == "negative"
    assert (fresh.stats().hits, fresh.stats().misses) == (1, 0)


@pytest.mark.afnio_replay
def test_backward_client_with_base_url(lm: LMEndpoint) -> None:
    afnio.set_backward_model_client(
        f"openai/{SIMULATOR_MODEL}",
        client_args={"base_url": lm.base_url, "api_key": lm.api_key, "max_retries": 0},
        completion_args={"temperature": 0},
    )
    backward = afnio.get_backward_model_client()
    assert backward.get_provider() == "openai"
    assert backward._model == SIMULATOR_MODEL
    assert backward.chat(MESSAGES) == "negative"
    assert backward.get_usage()["total_tokens"] > 0
    backward.clear_usage()
    assert backward.get_usage()["total_tokens"] == 0
    backward.client.close()  # built by afnio from the path: close its connections


def test_backward_client_errors_and_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import afnio._model_client as mc

    monkeypatch.setattr(mc, "_singleton", None)
    with pytest.raises(
        RuntimeError, match="No global model client set for backward pass"
    ):
        afnio.get_backward_model_client()
    with pytest.raises(ValueError, match="must be in the format 'provider/model'"):
        afnio.set_backward_model_client("gpt-4o")
    with pytest.raises(ValueError, match=r"Unsupported provider: anthropic\."):
        afnio.set_backward_model_client("anthropic/claude")
    args = {"base_url": "http://127.0.0.1:9/v1"}
    afnio.set_backward_model_client("openai/gpt-4o", client_args=args)
    first = afnio.get_backward_model_client()
    assert args == {"base_url": "http://127.0.0.1:9/v1"}  # not mutated
    afnio.set_backward_model_client("openai/gpt-4o", client_args=dict(args))
    assert afnio.get_backward_model_client() is first  # unchanged: not rebuilt
    afnio.set_backward_model_client("openai/gpt-4o-mini", client_args=dict(args))
    assert afnio.get_backward_model_client() is not first
    custom = OpenAI(base_url="http://127.0.0.1:9/v1")
    afnio.set_backward_model_client(custom, completion_args={"model": "x"})
    assert afnio.get_backward_model_client().client is custom
    assert afnio.get_backward_model_client()._model == "x"


def test_client_argument_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    client = OpenAI(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(
        ValueError, match=r"n > 1 is not supported for chat completions\."
    ):
        client.chat(messages=MESSAGES, model="m", n=2)
    with pytest.raises(ValueError, match="stream=True"):
        client.chat(messages=MESSAGES, model="m", stream=True)
    with pytest.raises(ValueError, match="`model` is required"):
        client.chat(messages=MESSAGES, model="")
    with pytest.raises(ValueError, match="max_retries"):
        OpenAI(max_retries=-1)
    with pytest.raises(TypeError, match=r"httpx\.AsyncClient"):
        OpenAI(http_client=object())  # type: ignore[arg-type]
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(openai.OpenAIError):
        OpenAI()


def test_api_key_never_shows_in_repr_or_config() -> None:
    client = AsyncOpenAI(
        api_key="sk-secret-value-123456", base_url="http://127.0.0.1:9/v1"
    )
    assert "secret" not in repr(client)
    assert "sk-secret" not in str(client.get_config())
    assert client.get_config()["base_url"] == "http://127.0.0.1:9/v1/"
    assert copy_checkpoint(client) == {
        "class_type": "AsyncOpenAI",
        "provider": "openai",
        "usage": client.get_usage(),
    }


def test_credentials_in_headers_query_and_url_never_show_but_are_sent() -> None:
    client = AsyncOpenAI(
        api_key="sk-ZQ9xw7",  # a short key: no part of it may show
        base_url="http://me:pw-SECRET1@127.0.0.1:9/v1",
        default_headers={
            "Authorization": "Bearer sk-HDR1abc",
            "api-key": "azure-SECRET2",
            "X-Trace": "trace-1",
        },
        default_query={"key": "google-SECRET3", "api-version": "2024-06-01"},
    )
    shown = f"{client!r} {client.get_config()} {client.get_config()!r}"
    for secret in ("ZQ9", "w7", "HDR1", "SECRET1", "SECRET2", "SECRET3"):
        assert secret not in shown, secret
    config = client.get_config()
    assert config["default_headers"] == {
        "Authorization": "<redacted>",
        "api-key": "<redacted>",
        "X-Trace": "trace-1",
    }
    assert config["default_query"] == {"key": "<redacted>", "api-version": "2024-06-01"}
    assert config["base_url"] == "http://me:<redacted>@127.0.0.1:9/v1/"
    # the live SDK client keeps (and sends) the real values
    sdk = client.client
    assert sdk.api_key == "sk-ZQ9xw7"
    assert sdk.default_headers["Authorization"] == "Bearer sk-HDR1abc"
    assert sdk.default_headers["api-key"] == "azure-SECRET2"
    assert sdk.default_query["key"] == "google-SECRET3"


def copy_checkpoint(client: Any) -> Any:
    import copy

    return copy.deepcopy(client)


def test_initial_and_cleared_usage_are_exact() -> None:
    expected = {
        "completion_tokens": 0,
        "prompt_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "cost": {"amount": 0.0, "currency": "USD"},
    }
    client = OpenAI(base_url="http://127.0.0.1:9/v1")
    assert client.get_usage() == expected
    client.update_usage(
        {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, "gpt-4o"
    )
    assert client.get_usage()["cost"]["amount"] == pytest.approx(
        (5 * 2.5 + 2 * 10) / 1e6
    )
    client.update_usage(
        {"prompt_tokens": 1, "cost": {"amount": 3.5, "currency": "USD"}}
    )
    assert client.get_usage()["cost"]["amount"] == 3.5  # a restore sets the cost
    client.clear_usage()
    assert client.get_usage() == expected


# -- live simulator (loopback only, no cassette) -----------------------------------


def test_requests_in_flight_never_exceed_the_bound() -> None:
    from afnio.testing import Simulator

    afnio.set_max_concurrency(4)
    with (
        Simulator(latency=0.05) as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):

        async def many() -> list[str]:
            calls = [
                client.achat(
                    [{"role": "user", "content": f"hello {i}"}], model=SIMULATOR_MODEL
                )
                for i in range(12)
            ]
            return await asyncio.gather(*calls)

        replies = asyncio.run(many())
        assert len(replies) == 12
        assert sim.stats.peak_in_flight == 4
    afnio.set_max_concurrency(16)
    with (
        Simulator(latency=0.2) as sim,
        AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
    ):

        async def sixteen() -> list[str]:
            return await asyncio.gather(
                *(
                    client.achat(
                        [{"role": "user", "content": f"hi {i}"}], model=SIMULATOR_MODEL
                    )
                    for i in range(16)
                )
            )

        asyncio.run(sixteen())
        assert sim.stats.peak_in_flight == 16


def test_client_timeout_is_enforced() -> None:
    from afnio.testing import Fault, Simulator

    with Simulator() as sim:
        sim.inject(Fault.DELAY, seconds=2)
        with OpenAI(
            base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=0.3
        ) as client:
            with pytest.raises(openai.APITimeoutError):
                client.chat(messages=MESSAGES, model=SIMULATOR_MODEL)
            assert client.get_usage()["total_tokens"] == 0


def test_every_header_the_cache_counts_as_an_account_is_masked() -> None:
    from afnio.models.cache import _is_account_entry
    from afnio.models.openai import OpenAI

    headers = {
        "x-functions-key": "hunter2-functions",
        "PRIVATE-TOKEN": "glpat-abcdef",
        "X-Vault-Token": "hvs.abcdef",
        "X-Session-Id": "s-123",
        "X-Request-Id": "r-1",
    }
    client = OpenAI(
        api_key="sk-test",
        base_url="http://127.0.0.1:9/v1",
        default_headers=headers,
        default_query={"code": "azure-fn-code", "api-version": "2024-10-21"},
    )
    config = client.get_config()
    for name, value in headers.items():
        masked = config["default_headers"][name] == "<redacted>"
        assert masked == _is_account_entry(name, value), name
    assert config["default_headers"]["X-Request-Id"] == "r-1"
    assert config["default_query"] == {
        "code": "<redacted>",
        "api-version": "2024-10-21",
    }
