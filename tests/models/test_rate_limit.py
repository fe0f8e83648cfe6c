"""afnio's rate limiter (issue 21, item 3): header parsing, explicit budgets, and
live runs against the simulator's RPM/TPM limits, proven by counters (the
simulator's 429s and answers, afnio's usage), never by tight timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import afnio
from afnio._runtime import run_sync
from afnio.models import rate_limit
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.models.rate_limit import (
    estimate_tokens,
    get_rate_limit_stats,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    set_max_rate_limit_wait,
)
from afnio.testing import Fault, Simulator

MODEL = "afnio-sim-1"
LATENCY = 0.05


# -- header parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1.5s", 1.5),
        ("17.284s", 17.284),
        ("1h2m3s", 3723.0),
        ("250us", 0.00025),
        ("0.75", 0.75),
        ("2", 2.0),
    ],
)
def test_reset_durations_are_parsed(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "-1", "1s2", None])
def test_unreadable_durations_are_none(text: str | None) -> None:
    assert parse_duration(text) is None


def test_retry_after_prefers_milliseconds_then_seconds_then_an_http_date() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    date = "Wed, 21 Oct 2015 07:28:05 GMT"  # 1445412485
    assert parse_retry_after({"retry-after": date}, now=1445412480.0) == 5.0
    assert parse_retry_after({"retry-after": date}, now=1445412490.0) == 0.0  # past
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "tomorrow"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "4"}) == 4.0  # any case


def test_rate_limit_headers_are_parsed_from_httpx_headers() -> None:
    import httpx

    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "599",
            "x-ratelimit-reset-requests": "100ms",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
            "retry-after-ms": "20",
            "x-should-retry": "false",
        }
    )
    parsed = parse_rate_limit_headers(headers)
    assert (parsed.limit_requests, parsed.remaining_requests) == (600, 599)
    assert parsed.reset_requests == pytest.approx(0.1)
    assert (parsed.limit_tokens, parsed.remaining_tokens) == (150000, 149984)
    assert parsed.reset_tokens == 360.0
    assert parsed.retry_after == pytest.approx(0.02)
    assert parsed.should_retry is False
    assert parse_rate_limit_headers({}) == rate_limit.RateLimitHeaders()


def test_token_estimates_are_never_below_the_simulators_word_count() -> None:
    text = "a b c d e f g h"  # 8 words, 15 characters
    assert estimate_tokens({"messages": [{"role": "user", "content": text}]}) == 11
    long_words = "internationalisation considerations"  # 2 words, 35 characters
    assert estimate_tokens({"prompt": long_words, "max_tokens": 5}) == 9 + 5


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"requests_per_minute": 0}, ValueError, "requests_per_minute"),
        ({"requests_per_minute": -5}, ValueError, "requests_per_minute"),
        ({"tokens_per_minute": float("inf")}, ValueError, "tokens_per_minute"),
        ({"tokens_per_minute": "1000"}, TypeError, "tokens_per_minute"),
        ({"requests_per_minute": True}, TypeError, "requests_per_minute"),
        ({"requests_per_minute": 10, "base_url": 5}, TypeError, "base_url"),
    ],
)
def test_bad_budgets_raise_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        afnio.set_rate_limit(MODEL, **kwargs)


def test_a_budget_needs_a_model_name() -> None:
    with pytest.raises(ValueError, match="model"):
        afnio.set_rate_limit("", requests_per_minute=10)


def test_the_total_wait_must_be_a_number() -> None:
    with pytest.raises(ValueError, match="seconds"):
        set_max_rate_limit_wait(-1)


# -- live runs ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_budgets() -> Iterator[None]:
    yield
    afnio.set_rate_limit(MODEL)
    set_max_rate_limit_wait(rate_limit.MAX_RATE_LIMIT_WAIT)


def _many(client: AsyncOpenAI, n: int, **kwargs: Any) -> list[Any]:
    """``n`` distinct chat calls at once (as a batched forward makes them)."""

    async def main() -> list[Any]:
        calls = [
            client.achat([{"role": "user", "content": f"hello {i}"}], model=MODEL)
            for i in range(n)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    return run_sync(main())


def _limited_run(
    n: int, budget: int | None = None, **limits: float
) -> tuple[list[Any], float, Any, AsyncOpenAI, str]:
    """``n`` concurrent calls against a simulator with ``limits``
    (``requests_per_minute=``, ``tokens_per_minute=``, ``rate_limit_window=``), with
    an explicit afnio ``budget`` in requests per minute if given: the results, the
    seconds they took, the simulator's counters, the (closed) client and the
    simulator's base URL."""
    with Simulator(latency=LATENCY, **limits) as sim:
        if budget is not None:
            afnio.set_rate_limit(
                MODEL, requests_per_minute=budget, base_url=sim.base_url
            )
        client = AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
        start = time.monotonic()
        results = _many(client, n)
        elapsed = time.monotonic() - start
        stats = sim.stats
        client.close()
    return results, elapsed, stats, client, str(sim.base_url)


def test_an_unknown_limit_is_learned_and_429s_stay_rare() -> None:
    # 30 requests per 2 s: 30 at once, then 15 per second; afnio is told nothing
    n, limit, window = 150, 30, 2.0
    run = _limited_run(n, requests_per_minute=limit, rate_limit_window=window)
    results, elapsed, stats, client, base_url = run
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []  # 429s never surface
    assert stats.served == n and client.calls == n
    assert stats.rate_limited <= 0.05 * stats.calls
    # throughput: what was answered against what the bucket allowed meanwhile
    # (it starts full; the last answer needs one latency after its send)
    allowed = limit + limit / window * max(0.0, elapsed - LATENCY)
    assert stats.served >= 0.9 * allowed
    learned = get_rate_limit_stats(MODEL, base_url=base_url)
    assert learned.limit_requests == limit
    assert learned.requests == n and learned.rate_limited == stats.rate_limited


def test_an_explicit_budget_below_the_server_limit_gets_no_429(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rate_limit, "MINUTE", 2.0)  # a "minute" of 2 s
    n, limit, budget, window = 80, 30, 20, 2.0
    run = _limited_run(
        n, budget=budget, requests_per_minute=limit, rate_limit_window=window
    )
    results, elapsed, stats, _client, _url = run
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats.rate_limited == 0 and stats.served == n
    # the budget, not the server, set the pace: never more than it allows
    assert n <= budget + budget / window * elapsed + 1


def test_a_token_limit_is_paced_by_the_token_headers() -> None:
    # 100 tokens per 2 s; each request is 5 tokens ("hello i" + 3): 20 at once,
    # then 10 per second
    n, limit, window = 60, 100, 2.0
    run = _limited_run(n, tokens_per_minute=limit, rate_limit_window=window)
    results, elapsed, stats, _client, base_url = run
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats.served == n
    assert stats.rate_limited <= max(1, 0.05 * stats.calls)
    allowed_tokens = limit + limit / window * max(0.0, elapsed - LATENCY)
    assert stats.prompt_tokens >= 0.8 * allowed_tokens  # afnio's estimate is higher
    assert get_rate_limit_stats(MODEL, base_url=base_url).limit_tokens == limit


def test_429s_are_retried_beyond_max_retries_and_billed_once() -> None:
    with Simulator(faults=[(Fault.RATE_LIMIT, 4)]) as sim:
        with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
            reply = client.chat(
                [{"role": "user", "content": "It arrived broken."}], model=MODEL
            )
            usage = client.get_usage()
        stats = sim.stats
    assert reply == "neutral"
    assert stats.calls == 5 and stats.faults_served == 4  # 4 x 429, then the answer
    assert client.calls == 1  # one answered request
    assert usage["prompt_tokens"] == stats.prompt_tokens  # the 429s cost nothing
    counters = get_rate_limit_stats(MODEL, base_url=sim.base_url)
    assert (counters.requests, counters.rate_limited, counters.retries) == (1, 4, 4)


def test_other_errors_keep_the_sdks_retries() -> None:
    with (
        Simulator(faults=[(Fault.SERVER_ERROR, 1)]) as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
        pytest.raises(openai.InternalServerError),
    ):
        client.chat([{"role": "user", "content": "hi"}], model=MODEL)
    assert sim.stats.calls == 1
    with Simulator(faults=[(Fault.SERVER_ERROR, 1)]) as sim:
        with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=1) as client:
            assert client.chat([{"role": "user", "content": "hi"}], model=MODEL)
        assert sim.stats.calls == 2


def test_a_wait_beyond_the_bound_raises_the_429() -> None:
    set_max_rate_limit_wait(5.0)
    # 1 request per 60 s: the second would wait ~60 s, more than the 5 s allowed
    with Simulator(requests_per_minute=1) as sim:
        with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
            client.chat([{"role": "user", "content": "hi"}], model=MODEL)
            with pytest.raises(openai.RateLimitError):
                client.chat([{"role": "user", "content": "hello"}], model=MODEL)
        assert sim.stats.rate_limited == 1  # given up at once, not hammered
    assert get_rate_limit_stats(MODEL, base_url=sim.base_url).gave_up == 1


def test_a_request_larger_than_the_token_limit_is_not_retried() -> None:
    with (
        Simulator(tokens_per_minute=4) as sim,  # x-should-retry: false
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=3) as client,
        pytest.raises(openai.RateLimitError, match="Request too large"),
    ):
        client.chat([{"role": "user", "content": "a b c d e f"}], model=MODEL)
    assert sim.stats.calls == 1


def test_the_sdk_client_is_still_an_openai_async_client() -> None:
    with Simulator() as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-test")
        assert isinstance(client.client, openai.AsyncOpenAI)
        # a request made with the SDK client directly keeps the SDK's own retries
        sim.inject(Fault.RATE_LIMIT)

        async def direct() -> Any:
            return await client.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )

        assert run_sync(direct()).choices[0].message.content == "neutral"
        assert sim.stats.calls == 2
        client.close()


def test_the_sdk_methods_the_limiter_hooks_into_still_exist() -> None:
    """The limiter overrides two private methods of the openai SDK (verified on
    openai 2.x): an SDK that renames them would silently take back 429 retries and
    hide the rate-limit headers, so this fails first."""
    import inspect

    import openai

    should_retry = inspect.signature(openai.AsyncOpenAI._should_retry)
    assert list(should_retry.parameters) == ["self", "response"]
    process = inspect.signature(openai.AsyncOpenAI._process_response)
    assert "response" in process.parameters
    assert inspect.iscoroutinefunction(openai.AsyncOpenAI._process_response)
